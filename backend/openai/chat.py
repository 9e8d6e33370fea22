"""Serving /v1/chat/completions: a Textbot reply's pieces (one stream, `n` choices
interleaved) turned into OpenAI's chat completion, or its Server-Sent Event chunks,
with tool calls and log-probabilities where the request asked for them."""

from __future__ import annotations

from collections.abc import AsyncIterator

from backend.openai import tools
from backend.openai.protocol import (
    AssistantMessage, ChatCompletion, ChatCompletionChunk, ChatCompletionRequest, Choice, ChoiceLogprobs,
    ChunkChoice, CompletionHeader, Delta, DeltaFunction, DeltaToolCall, LogprobEntry, NamedToolChoice, TopLogprobEntry,
)
from backend.openai.plan import ReplyPlan, constrained
from backend.openai.replies import Reply, UsageCounter, sse
from backend.protocol import ReplyPiece, SamplingParams, TokenLogprob


def logprob_entries(logprobs: tuple[TokenLogprob, ...], top: int) -> list[LogprobEntry]:
    return [LogprobEntry(token=t.token, logprob=t.logprob, bytes=list(t.bytes), top_logprobs=[
        TopLogprobEntry(token=a.token, logprob=a.logprob, bytes=list(a.bytes)) for a in t.top[:top]])
        for t in logprobs]


def tool_use(request: ChatCompletionRequest) -> tools.ToolUse:
    """The request's tools and tool_choice, as the shared tool reading takes them."""
    choice = request.tool_choice
    if isinstance(choice, NamedToolChoice):
        return tools.ToolUse.of(request.tools, None, choice.function.name)
    return tools.ToolUse.of(request.tools, choice)


def reply_plan(request: ChatCompletionRequest, session: str | None) -> ReplyPlan:
    """What the request asks of the model (backend/openai/plan.py)."""
    use = tool_use(request)
    sampling = SamplingParams(
        max_new_tokens=request.token_limit, temperature=request.temperature, top_p=request.top_p, seed=request.seed,
        n=request.n, presence_penalty=request.presence_penalty or 0.0,
        frequency_penalty=request.frequency_penalty or 0.0, logit_bias=request.logit_bias,
        stop=request.stop_strings or None, logprobs=(request.top_logprobs or 0) if request.logprobs else None)
    output_schema = request.response_format and request.response_format.output_schema()
    return ReplyPlan([m.to_chat() for m in request.messages], constrained(sampling, use, output_schema), use,
                     "POST /v1/chat/completions", truncate=request.truncation == "auto", session=session)


class ChatChoice:
    """One choice as it streams: the text the model wrote, read as tool calls where the
    request's tool_choice says so (tools.ReplyReader); a named function's arguments
    stream as they come."""

    def __init__(self, index: int, request: ChatCompletionRequest):
        self.index = index
        self.reader = tools.ReplyReader(tool_use(request))
        self.mode = self.reader.mode
        self.top = (request.top_logprobs or 0) if request.logprobs else None  # alternatives per token
        self.logprobs: list[LogprobEntry] = []
        self.streamed_call = False

    def push(self, piece: ReplyPiece) -> Delta | None:
        """Take a piece; returns what to stream now."""
        if self.top is not None:
            self.logprobs += logprob_entries(piece.logprobs, self.top)
        text = self.reader.push(piece)
        if self.mode == "named" and piece.text:  # the reply is the arguments: stream them as they come
            first, self.streamed_call = not self.streamed_call, True
            return Delta(tool_calls=[DeltaToolCall(
                index=0, id=self.reader.call_id if first else None, type="function" if first else None,
                function=DeltaFunction(name=self.reader.tool_use.function if first else None,
                                       arguments=piece.text))])
        return Delta(content=text) if text else None

    def outcome(self, finish_reason: str) -> tuple[tools.Outcome, str]:
        """The reply read whole, and OpenAI's finish reason."""
        outcome = self.reader.finish(finish_reason)
        if self.mode == "named":
            return outcome, "tool_calls" if finish_reason == "stop" else finish_reason
        return outcome, "tool_calls" if outcome.called else finish_reason

    def last_delta(self, finish_reason: str) -> tuple[Delta | None, str]:
        """What was held back, streamed at the end, and the finish reason."""
        outcome, reason = self.outcome(finish_reason)
        if self.mode in ("none", "named"):
            return None, reason
        if not outcome.called:  # held back in case it was a call; it was not
            return (Delta(content=outcome.held) if outcome.held else None), reason
        return Delta(tool_calls=[
            DeltaToolCall(index=i, id=c.id, type="function",
                          function=DeltaFunction(name=c.function.name, arguments=c.function.arguments))
            for i, c in enumerate(outcome.calls)]), reason

    def choice_logprobs(self, entries: list[LogprobEntry]) -> ChoiceLogprobs | None:
        return None if self.top is None else ChoiceLogprobs(content=entries)


def sse_stream(request: ChatCompletionRequest, reply: Reply, model: str) -> AsyncIterator[str]:
    """OpenAI's streaming format: a role chunk per choice, delta chunks, a finish chunk per
    choice, optionally a usage chunk, then [DONE]."""
    header = CompletionHeader(model=model).model_dump()  # one id and timestamp for every chunk
    usage = UsageCounter()

    def usage_chunk() -> str:
        return ChatCompletionChunk(**header, choices=[], usage=usage.usage()).model_dump_json()

    wanted = request.stream_options and request.stream_options.include_usage
    return sse(_chunks(request, reply, header, usage), usage_chunk if wanted else None)


async def _chunks(request: ChatCompletionRequest, reply: Reply, header: dict, usage: UsageCounter
                  ) -> AsyncIterator[str]:
    choices = [ChatChoice(i, request) for i in range(request.n)]

    def chunk(choice: ChatChoice, delta: Delta, finish_reason=None, entries=None) -> str:
        logprobs = choice.choice_logprobs(entries) if entries is not None else None
        return ChatCompletionChunk(**header, choices=[
            ChunkChoice(index=choice.index, delta=delta, logprobs=logprobs,
                        finish_reason=finish_reason)]).model_dump_json()

    for choice in choices:
        yield chunk(choice, Delta(role="assistant", content=""))
    async for piece in reply:
        usage.count(piece)
        choice = choices[piece.index]
        logged = len(choice.logprobs)
        delta = choice.push(piece)
        if piece.finish_reason is None:
            if delta is not None:
                yield chunk(choice, delta, entries=choice.logprobs[logged:])
            continue
        last, reason = choice.last_delta(piece.finish_reason)
        if delta is not None or last is not None:
            yield chunk(choice, _joined(delta, last), entries=choice.logprobs[logged:])
        yield chunk(choice, Delta(), reason)


def _joined(first: Delta | None, second: Delta | None) -> Delta:
    if first is None or second is None:
        return first or second
    return Delta(content=(first.content or "") + (second.content or "") or None,
                 tool_calls=(first.tool_calls or []) + (second.tool_calls or []) or None)


async def complete(request: ChatCompletionRequest, reply: Reply, model: str) -> ChatCompletion:
    choices = [ChatChoice(i, request) for i in range(request.n)]
    usage = UsageCounter()
    finished = {}
    async for piece in reply:
        usage.count(piece)
        choices[piece.index].push(piece)
        if piece.finish_reason is not None:
            finished[piece.index] = piece.finish_reason
    results = []
    for choice in choices:
        outcome, reason = choice.outcome(finished[choice.index])
        message = AssistantMessage(content=outcome.content, tool_calls=outcome.calls or None)
        results.append(Choice(index=choice.index, message=message,
                              logprobs=choice.choice_logprobs(choice.logprobs), finish_reason=reason))
    return ChatCompletion(model=model, usage=usage.usage(), choices=results)
