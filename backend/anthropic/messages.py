"""Serving /v1/messages and /v1/messages/count_tokens: a Messages request as a ReplyPlan
(backend/openai/plan.py), and the reply read back (tools.ReplyReader) as a Message, or as
Anthropic's stream: message_start, then per content block content_block_start / _delta /
_stop (a named tool's input as it comes, other calls whole at the end), then message_delta
(stop reason, usage) and message_stop.

Usage counts as Anthropic's does: `input_tokens` are the prompt tokens not read from the
cache, `cache_read_input_tokens` those that were (the replica's prefix cache).
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator

from backend.anthropic.protocol import (
    BlockDeltaEvent, BlockStartEvent, MessageUsage, BlockStopEvent, CountTokensRequest, InputJsonDelta, Message, MessageDelta,
    MessageDeltaEvent, MessagesPrompt, MessagesRequest, MessageStartEvent, MessageStopEvent, OutputTextBlock,
    OutputToolUseBlock, TextBlock, TextDelta, ToolResultBlock, ToolUseBlock,
)
from backend.openai import tools
from backend.openai.plan import ReplyPlan, constrained
from backend.openai.replies import Reply, UsageCounter
from backend.protocol import ChatMessage, FunctionCall, FunctionSpec, ReplyPiece, SamplingParams, ToolCall, ToolSpec

ROUTE = "POST /v1/messages"


def tool_use(request: MessagesPrompt) -> tools.ToolUse:
    specs = [ToolSpec(type="function", function=FunctionSpec(
        name=t.name, description=t.description, parameters=t.input_schema, strict=t.strict))
        for t in request.tools or ()]
    choice = request.tool_choice
    if choice is None:
        return tools.ToolUse.of(specs, None)
    if choice.type == "tool":
        return tools.ToolUse.of(specs, None, choice.name)
    return tools.ToolUse.of(specs, {"any": "required"}.get(choice.type, choice.type))


def conversation(request: MessagesPrompt) -> list[ChatMessage]:
    """The messages as chat messages: the system prompt first; an assistant turn's tool_use blocks
    are its calls; each tool_result block is a tool turn, before the user's own text."""
    messages = [ChatMessage(role="system", content=system)] if (system := request.system_text) else []
    for message in request.messages:
        text, calls = [], []
        for block in message.blocks:
            if isinstance(block, TextBlock):
                text.append(block.text)
            elif isinstance(block, ToolUseBlock):
                calls.append(ToolCall(id=block.id, function=FunctionCall(name=block.name,
                                                                         arguments=json.dumps(block.input))))
            elif isinstance(block, ToolResultBlock):
                messages.append(ChatMessage(role="tool", content=block.text, tool_call_id=block.tool_use_id))
        if text or calls or not message.blocks:
            messages.append(ChatMessage(role=message.role, content="".join(text), tool_calls=calls or None))
    return messages


def reply_plan(request: MessagesRequest, session: str | None) -> ReplyPlan:
    use = tool_use(request)
    sampling = SamplingParams(max_new_tokens=request.max_tokens, temperature=request.temperature,
                              top_p=request.top_p, top_k=request.top_k, stop=request.stop_sequences)
    return ReplyPlan(conversation(request), constrained(sampling, use, request.output_schema), use, ROUTE,
                     session=session)


def count_plan(request: CountTokensRequest, session: str | None) -> ReplyPlan:
    """The prompt of a message, with its tools, to count: the replica reads it (warming its
    prefix cache for the message that usually follows) and reports its tokens with the first
    one generated."""
    use = tool_use(request)
    return ReplyPlan(conversation(request), SamplingParams(max_new_tokens=1, temperature=0.0), use,
                     "POST /v1/messages/count_tokens", session=session)


def usage(counter: UsageCounter) -> MessageUsage:
    return MessageUsage(input_tokens=counter.prompt_tokens - counter.cached_tokens, output_tokens=counter.completion_tokens,
                 cache_read_input_tokens=counter.cached_tokens)


def _stop(outcome: tools.Outcome, stop_sequence: str | None) -> dict:
    """`stop_reason` and `stop_sequence`, as Message and MessageDelta carry them."""
    if outcome.called:
        return {"stop_reason": "tool_use"}
    if stop_sequence is not None:
        return {"stop_reason": "stop_sequence", "stop_sequence": stop_sequence}
    return {"stop_reason": "max_tokens" if outcome.finish_reason == "length" else "end_turn"}


def _tool_use_id(call_id: str) -> str:
    return "toolu_" + call_id.removeprefix("call_")


def _tool_block(call: ToolCall) -> OutputToolUseBlock:
    """A call as a tool_use block; arguments cut short (the token budget ran out) come as they are
    under `_partial`, rather than failing the whole reply."""
    try:
        arguments = json.loads(call.function.arguments)
    except ValueError:
        arguments = None
    if not isinstance(arguments, dict):
        arguments = {"_partial": call.function.arguments}
    return OutputToolUseBlock(id=_tool_use_id(call.id), name=call.function.name, input=arguments)


def _blocks(outcome: tools.Outcome) -> list:
    text = [OutputTextBlock(text=outcome.content)] if outcome.content or not outcome.called else []
    return text + [_tool_block(call) for call in outcome.calls]


async def create(plan: ReplyPlan, reply: Reply, model: str) -> Message:
    reader = tools.ReplyReader(plan.tool_use)
    counter = UsageCounter()
    finish_reason, stop_sequence = "stop", None
    async for piece in reply:
        counter.count(piece)
        reader.push(piece)
        finish_reason = piece.finish_reason or finish_reason
        stop_sequence = piece.stop_sequence or stop_sequence
    outcome = reader.finish(finish_reason)
    return Message(model=model, content=_blocks(outcome), usage=usage(counter), **_stop(outcome, stop_sequence))


async def count(reply: Reply) -> int:
    """The prompt tokens of a reply, from its first piece; the rest is not generated."""
    pieces = aiter(reply)
    try:
        first: ReplyPiece = await anext(pieces)
    finally:
        await pieces.aclose()  # the replica stops at once
    return first.prompt_tokens


def _event(event) -> str:
    return f"event: {event.type}\ndata: {event.model_dump_json()}\n\n"


def error_event(message: str) -> str:
    """Anthropic's error event: the SDK raises it as an APIStatusError-like error mid-stream."""
    body = {"type": "error", "error": {"type": "api_error", "message": message}}
    return f"event: error\ndata: {json.dumps(body)}\n\n"


def sse_stream(plan: ReplyPlan, reply: Reply, model: str) -> AsyncIterator[str]:
    async def written() -> AsyncIterator[str]:
        try:
            async for event in _events(plan, reply, model):
                yield _event(event)
        except Exception as error:  # the status line is long gone: an error event ends the stream
            yield error_event(f"Generation failed: {error or type(error).__name__}")

    return written()


async def _events(plan: ReplyPlan, reply: Reply, model: str) -> AsyncIterator:
    reader = tools.ReplyReader(plan.tool_use)
    counter = UsageCounter()
    finish_reason, stop_sequence = "stop", None
    started = False
    text_open = False
    streamed_call = False  # a named function's call (block 0), its input streamed as it comes
    async for piece in reply:
        counter.count(piece)
        finish_reason = piece.finish_reason or finish_reason
        stop_sequence = piece.stop_sequence or stop_sequence
        if not started:  # the first piece carries the prompt's token counts
            started = True
            opening = usage(counter).model_copy(update={"output_tokens": 0})
            yield MessageStartEvent(message=Message(model=model, usage=opening))
        if reader.streams_arguments and piece.text:
            if not streamed_call:
                streamed_call = True
                block = OutputToolUseBlock(id=_tool_use_id(reader.call_id), name=plan.tool_use.function, input={})
                yield BlockStartEvent(index=0, content_block=block)
            yield BlockDeltaEvent(index=0, delta=InputJsonDelta(partial_json=piece.text))
        if text := reader.push(piece):
            if not text_open:
                text_open = True
                yield BlockStartEvent(index=0, content_block=OutputTextBlock(text=""))
            yield BlockDeltaEvent(index=0, delta=TextDelta(text=text))
    outcome = reader.finish(finish_reason)
    if not text_open and (outcome.held or not outcome.called):  # a reply of text, possibly empty
        text_open = True
        yield BlockStartEvent(index=0, content_block=OutputTextBlock(text=""))
    if outcome.held:
        yield BlockDeltaEvent(index=0, delta=TextDelta(text=outcome.held))
    index = 0
    if text_open:
        yield BlockStopEvent(index=0)
        index = 1
    for call in outcome.calls:
        if not (streamed_call and call.id == reader.call_id):
            block = _tool_block(call)
            yield BlockStartEvent(index=index, content_block=block.model_copy(update={"input": {}}))
            yield BlockDeltaEvent(index=index, delta=InputJsonDelta(partial_json=json.dumps(block.input)))
        yield BlockStopEvent(index=index)
        index += 1
    yield MessageDeltaEvent(delta=MessageDelta(**_stop(outcome, stop_sequence)), usage=usage(counter))
    yield MessageStopEvent()
