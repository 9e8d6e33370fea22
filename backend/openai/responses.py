"""Serving /v1/responses: a Responses request as a ReplyPlan (backend/openai/plan.py), and the
reply read back (tools.ReplyReader) as a Response object, or as its typed stream events:
response.created, response.in_progress, then per output item its .added / delta / .done
events (a named function's arguments as they come, other calls whole at the end), then
response.completed (or response.incomplete when the token budget ran out).

Nothing is stored: `previous_response_id` is refused (the route says why) and every
response says `store: false`.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator

from backend.errors import APIError
from backend.openai import tools
from backend.openai.plan import ReplyPlan, constrained
from backend.openai.replies import Reply, UsageCounter
from backend.openai.responses_protocol import (
    ArgumentsDeltaEvent, ArgumentsDoneEvent, ContentPartEvent, ErrorEvent, FunctionCallItem,
    FunctionCallOutputItem, FunctionToolChoice, IncompleteDetails, InputMessage, InputTokensDetails, OutputItemEvent,
    OutputFunctionCall, OutputMessage, OutputText, Response, ResponseEvent, ResponseLifecycleEvent, ResponseRequest, ResponseUsage,
    TextDeltaEvent, TextDoneEvent,
)
from backend.protocol import ChatMessage, FunctionCall, FunctionSpec, SamplingParams, ToolCall, ToolSpec

ROUTE = "POST /v1/responses"


def refuse_stored_state(request: ResponseRequest) -> None:
    """Textbot keeps no responses, so it cannot continue one by id: say so, and what to do instead."""
    if request.previous_response_id is not None:
        raise APIError(400, "previous_response_id is not supported: this server stores no responses. "
                       "Send the whole conversation in 'input' (earlier output items may be sent back as they are).",
                       param="previous_response_id", code="unsupported_parameter")


def tool_use(request: ResponseRequest) -> tools.ToolUse:
    specs = [ToolSpec(type="function", function=FunctionSpec(
        name=t.name, description=t.description, strict=t.strict,
        **({"parameters": t.parameters} if t.parameters is not None else {}))) for t in request.tools or ()]
    choice = request.tool_choice
    if isinstance(choice, FunctionToolChoice):
        return tools.ToolUse.of(specs, None, choice.name)
    return tools.ToolUse.of(specs, choice)


def conversation(request: ResponseRequest) -> list[ChatMessage]:
    """The input items as chat messages: instructions first, as a system message; function calls
    join the assistant turn they follow (or make one); their outputs are tool turns."""
    messages = [ChatMessage(role="system", content=request.instructions)] if request.instructions else []
    for item in request.items:
        if isinstance(item, InputMessage):
            messages.append(ChatMessage(role="system" if item.role == "developer" else item.role, content=item.text))
        elif isinstance(item, FunctionCallItem):
            call = ToolCall(id=item.call_id, function=FunctionCall(name=item.name, arguments=item.arguments))
            if messages and messages[-1].role == "assistant":
                last = messages[-1]
                messages[-1] = last.model_copy(update={"tool_calls": [*(last.tool_calls or []), call]})
            else:
                messages.append(ChatMessage(role="assistant", content="", tool_calls=[call]))
        elif isinstance(item, FunctionCallOutputItem):
            messages.append(ChatMessage(role="tool", content=item.text, tool_call_id=item.call_id))
    return messages


def reply_plan(request: ResponseRequest, session: str | None) -> ReplyPlan:
    refuse_stored_state(request)
    use = tool_use(request)
    sampling = SamplingParams(max_new_tokens=request.max_output_tokens, temperature=request.temperature,
                              top_p=request.top_p)
    return ReplyPlan(conversation(request), constrained(sampling, use, request.output_schema), use, ROUTE,
                     param="input", truncate=request.truncation == "auto",
                     session=session or request.prompt_cache_key)


def _shell(request: ResponseRequest, model: str) -> Response:
    """The response as created, before any output: it echoes the request's settings."""
    return Response(model=model, instructions=request.instructions, max_output_tokens=request.max_output_tokens,
                    temperature=request.temperature, top_p=request.top_p, tools=request.tools or [],
                    tool_choice=request.tool_choice or ("auto" if request.tools else "none"),
                    parallel_tool_calls=request.parallel_tool_calls is not False, text=request.text,
                    truncation=request.truncation or "disabled", metadata=request.metadata or {})


def _finished(response: Response, output: list, finish_reason: str, usage: UsageCounter) -> Response:
    incomplete = finish_reason == "length"
    return response.model_copy(update={
        "status": "incomplete" if incomplete else "completed", "output": output,
        "completed_at": None if incomplete else int(time.time()),
        "incomplete_details": IncompleteDetails(reason="max_output_tokens") if incomplete else None,
        "usage": ResponseUsage(input_tokens=usage.prompt_tokens,
                               input_tokens_details=InputTokensDetails(cached_tokens=usage.cached_tokens),
                               output_tokens=usage.completion_tokens,
                               total_tokens=usage.prompt_tokens + usage.completion_tokens)})


def _call_item(call: ToolCall, status: str = "completed") -> OutputFunctionCall:
    return OutputFunctionCall(call_id=call.id, name=call.function.name, arguments=call.function.arguments, status=status)


def _message(text: str, status: str = "completed") -> OutputMessage:
    return OutputMessage(status=status, content=[OutputText(text=text)])


async def respond(request: ResponseRequest, plan: ReplyPlan, reply: Reply, model: str) -> Response:
    reader = tools.ReplyReader(plan.tool_use)
    usage = UsageCounter()
    finish_reason = "stop"
    async for piece in reply:
        usage.count(piece)
        reader.push(piece)
        finish_reason = piece.finish_reason or finish_reason
    outcome = reader.finish(finish_reason)
    output = [_message(outcome.content)] if outcome.content or not outcome.called else []
    output += [_call_item(call) for call in outcome.calls]
    return _finished(_shell(request, model), output, finish_reason, usage)


def sse_stream(request: ResponseRequest, plan: ReplyPlan, reply: Reply, model: str) -> AsyncIterator[str]:
    """The Responses stream: each event as `event: <type>` and its JSON, numbered in order."""
    async def numbered() -> AsyncIterator[str]:
        sequence = 0
        try:
            async for event in _events(request, plan, reply, model):
                event.sequence_number = sequence
                sequence += 1
                yield f"event: {event.type}\ndata: {event.model_dump_json(by_alias=True)}\n\n"
        except Exception as error:  # the status line is long gone: an error event ends the stream
            failed = ErrorEvent(message=f"Generation failed: {error or type(error).__name__}", code="server_error",
                                sequence_number=sequence)
            yield f"event: error\ndata: {failed.model_dump_json()}\n\n"

    return numbered()


class _OpenMessage:
    """The message item being streamed, opened at its first text."""

    def __init__(self, output_index: int):
        self.item = OutputMessage()
        self.output_index = output_index
        self.text = ""

    def opening(self) -> list[ResponseEvent]:
        return [OutputItemEvent(type="response.output_item.added", output_index=self.output_index, item=self.item),
                ContentPartEvent(type="response.content_part.added", item_id=self.item.id,
                                 output_index=self.output_index, part=OutputText(text=""))]

    def delta(self, text: str) -> TextDeltaEvent:
        self.text += text
        return TextDeltaEvent(item_id=self.item.id, output_index=self.output_index, delta=text)

    def closing(self) -> list[ResponseEvent]:
        part = OutputText(text=self.text)
        self.item = self.item.model_copy(update={"status": "completed", "content": [part]})
        return [TextDoneEvent(item_id=self.item.id, output_index=self.output_index, text=self.text),
                ContentPartEvent(type="response.content_part.done", item_id=self.item.id,
                                 output_index=self.output_index, part=part),
                OutputItemEvent(type="response.output_item.done", output_index=self.output_index, item=self.item)]


async def _events(request: ResponseRequest, plan: ReplyPlan, reply: Reply, model: str
                  ) -> AsyncIterator[ResponseEvent]:
    response = _shell(request, model)
    yield ResponseLifecycleEvent(type="response.created", response=response)
    yield ResponseLifecycleEvent(type="response.in_progress", response=response)
    reader = tools.ReplyReader(plan.tool_use)
    usage = UsageCounter()
    message: _OpenMessage | None = None
    streamed_call: OutputFunctionCall | None = None  # a named function's call, its arguments streamed as they come
    finish_reason = "stop"
    async for piece in reply:
        usage.count(piece)
        finish_reason = piece.finish_reason or finish_reason
        if reader.streams_arguments and piece.text:
            if streamed_call is None:
                streamed_call = OutputFunctionCall(call_id=reader.call_id, name=plan.tool_use.function, arguments="")
                yield OutputItemEvent(type="response.output_item.added", output_index=0, item=streamed_call)
            yield ArgumentsDeltaEvent(item_id=streamed_call.id, output_index=0, delta=piece.text)
        if text := reader.push(piece):
            if message is None:
                message = _OpenMessage(0)
                for event in message.opening():
                    yield event
            yield message.delta(text)
    outcome = reader.finish(finish_reason)
    if message is None and (outcome.held or not outcome.called):  # a reply of text, possibly empty
        message = _OpenMessage(0)
        for event in message.opening():
            yield event
    if outcome.held:
        yield message.delta(outcome.held)
    output = []
    if message is not None:
        for event in message.closing():
            yield event
        output.append(message.item)
    for call in outcome.calls:
        index = len(output)
        if streamed_call is not None and call.id == streamed_call.call_id:
            item = streamed_call  # added, and its arguments streamed, already
        else:
            item = _call_item(call, "in_progress").model_copy(update={"arguments": ""})
            yield OutputItemEvent(type="response.output_item.added", output_index=index, item=item)
            yield ArgumentsDeltaEvent(item_id=item.id, output_index=index, delta=call.function.arguments)
        item = item.model_copy(update={"arguments": call.function.arguments, "status": "completed"})
        yield ArgumentsDoneEvent(item_id=item.id, output_index=index, name=item.name, arguments=item.arguments)
        yield OutputItemEvent(type="response.output_item.done", output_index=index, item=item)
        output.append(item)
    finished = _finished(response, output, finish_reason, usage)
    kind = "response.incomplete" if finished.status == "incomplete" else "response.completed"
    yield ResponseLifecycleEvent(type=kind, response=finished)
