"""Serving /v1/chat/completions: a Textbot reply's pieces (one stream, `n` choices
interleaved) turned into OpenAI's chat completion, or its Server-Sent Event chunks,
with tool calls and log-probabilities where the request asked for them."""

from __future__ import annotations

from collections.abc import AsyncIterator

from backend.openai import tools
from backend.openai.protocol import (
    AssistantMessage, ChatCompletion, ChatCompletionChunk, ChatCompletionRequest, Choice, ChoiceLogprobs,
    ChunkChoice, CompletionHeader, Delta, DeltaFunction, DeltaToolCall, LogprobEntry, TopLogprobEntry,
)
from backend.openai.replies import Reply, UsageCounter, sse
from backend.protocol import FunctionCall, ReplyPiece, TokenLogprob, ToolCall


def logprob_entries(logprobs: tuple[TokenLogprob, ...], top: int) -> list[LogprobEntry]:
    return [LogprobEntry(token=t.token, logprob=t.logprob, bytes=list(t.bytes), top_logprobs=[
        TopLogprobEntry(token=a.token, logprob=a.logprob, bytes=list(a.bytes)) for a in t.top[:top]])
        for t in logprobs]


class ChatChoice:
    """One choice as it streams: the text the model wrote, read as tool calls where the
    request's tool_choice says so (backend/openai/tools.py)."""

    def __init__(self, index: int, request: ChatCompletionRequest):
        self.index = index
        self.mode = tools.mode(request)
        self.function = request.tool_choice.function.name if self.mode == "named" else None
        self.call_id = tools.call_id()
        self.top = (request.top_logprobs or 0) if request.logprobs else None  # alternatives per token
        self.text = ""
        self.logprobs: list[LogprobEntry] = []
        self.opening = tools.CallOpening()
        self.streamed_call = False

    def push(self, piece: ReplyPiece) -> Delta | None:
        """Take a piece; returns what to stream now."""
        self.text += piece.text
        if self.top is not None:
            self.logprobs += logprob_entries(piece.logprobs, self.top)
        if not piece.text:
            return None
        if self.mode == "named":  # the reply is the arguments: stream them as they come
            first, self.streamed_call = not self.streamed_call, True
            return Delta(tool_calls=[DeltaToolCall(
                index=0, id=self.call_id if first else None, type="function" if first else None,
                function=DeltaFunction(name=self.function if first else None, arguments=piece.text))])
        if self.mode == "required":
            return None  # one object holding name and arguments: read whole at the end
        if self.mode == "auto":
            return Delta(content=text) if (text := self.opening.push(piece.text)) else None
        return Delta(content=piece.text)

    def outcome(self, finish_reason: str) -> tuple[str | None, list[ToolCall], str]:
        """The reply as content and tool calls, and OpenAI's finish reason."""
        if self.mode == "named":
            call = ToolCall(id=self.call_id, function=FunctionCall(name=self.function, arguments=self.text))
            return None, [call], "tool_calls" if finish_reason == "stop" else finish_reason
        if self.mode == "required":
            calls = tools.parse_required(self.text)
        elif self.mode == "auto":
            content, calls = tools.parse_auto(self.text)
            if calls:
                return content or None, calls, "tool_calls"
        else:
            calls = []
        return (None, calls, "tool_calls") if calls else (self.text, [], finish_reason)

    def last_delta(self, finish_reason: str) -> tuple[Delta | None, str]:
        """What was held back, streamed at the end, and the finish reason."""
        content, calls, reason = self.outcome(finish_reason)
        if self.mode in ("none", "named"):
            return None, reason
        if not calls:  # held back in case it was a call; it was not
            held = self.text if self.mode == "required" else self.opening.held
            return (Delta(content=held) if held else None), reason
        return Delta(tool_calls=[
            DeltaToolCall(index=i, id=c.id, type="function",
                          function=DeltaFunction(name=c.function.name, arguments=c.function.arguments))
            for i, c in enumerate(calls)]), reason

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
        content, calls, reason = choice.outcome(finished[choice.index])
        results.append(Choice(index=choice.index, message=AssistantMessage(content=content, tool_calls=calls or None),
                              logprobs=choice.choice_logprobs(choice.logprobs), finish_reason=reason))
    return ChatCompletion(model=model, usage=usage.usage(), choices=results)
