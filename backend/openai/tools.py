"""Tool calls: what `tool_choice` asks of the reply, and reading calls out of it.

`required` and a named function are enforced as vLLM enforces them, with a JSON schema
the reply must follow: a named function's reply is its arguments object; a required
call's is `{"name": ..., "arguments": ...}` for one of the tools. Under `auto` the model
is free, and a call is a `<tool_call>{"name": ..., "arguments": ...}</tool_call>` block
in its text (the form the prompt teaches when the chat template has no tools of its own:
backend/engine/prompt.py).
"""

from __future__ import annotations

import json
import re
import uuid

from backend.engine.stops import held_back
from backend.openai.protocol import ChatCompletionRequest, NamedToolChoice
from backend.protocol import FunctionCall, OutputSchema, ToolCall

CALL_OPEN, CALL_CLOSE = "<tool_call>", "</tool_call>"
_CALL_BLOCK = re.compile(re.escape(CALL_OPEN) + r"(.*?)(?:" + re.escape(CALL_CLOSE) + r"|$)", re.DOTALL)


def call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


def mode(request: ChatCompletionRequest) -> str:
    """'none' (no tools in play), 'auto', 'required', or 'named'."""
    choice = request.tool_choice or ("auto" if request.tools else "none")
    if isinstance(choice, NamedToolChoice):
        return "named"
    return "none" if not request.tools else choice


def tools_for_prompt(request: ChatCompletionRequest):
    """The tools the model is told of: none when tool_choice is 'none', only the named one when forced."""
    if mode(request) == "none":
        return None
    if mode(request) == "named":
        return [t for t in request.tools if t.function.name == request.tool_choice.function.name]
    return request.tools


def forced_schema(request: ChatCompletionRequest) -> OutputSchema | None:
    """The schema a forced tool call puts on the reply, or None."""
    if mode(request) == "named":
        [tool] = tools_for_prompt(request)
        return OutputSchema(json_schema=tool.function.parameters, strict=bool(tool.function.strict), source="tools")
    if mode(request) == "required":
        calls = [{"type": "object", "required": ["name", "arguments"],
                  "properties": {"name": {"const": t.function.name}, "arguments": t.function.parameters}}
                 for t in request.tools]
        schema = calls[0] if len(calls) == 1 else {"anyOf": calls}
        return OutputSchema(json_schema=schema, strict=any(t.function.strict for t in request.tools), source="tools")
    return None


def parse_required(text: str) -> list[ToolCall]:
    """A `required` reply: one `{"name", "arguments"}` object (empty if cut short)."""
    try:
        call = json.loads(text)
        return [_call(call["name"], call["arguments"])]
    except (ValueError, KeyError, TypeError):
        return []


def parse_auto(text: str) -> tuple[str, list[ToolCall]]:
    """The text outside `<tool_call>` blocks, and the calls in them that parse."""
    calls = []
    for block in _CALL_BLOCK.findall(text):
        try:
            call = json.loads(block)
            calls.append(_call(call["name"], call.get("arguments", {})))
        except (ValueError, KeyError, TypeError, AttributeError):
            continue
    if not calls:
        return text, []
    return _CALL_BLOCK.sub("", text).strip(), calls


def _call(name, arguments) -> ToolCall:
    if not isinstance(name, str):
        raise TypeError("a tool's name is a string")
    text = arguments if isinstance(arguments, str) else json.dumps(arguments)
    return ToolCall(id=call_id(), function=FunctionCall(name=name, arguments=text))


class CallOpening:
    """Streams text under `auto` while watching for a call: text that could begin
    `<tool_call>` is held back; from the tag on, everything is kept for `parse_auto`."""

    def __init__(self):
        self.held = ""
        self.calling = False

    def push(self, piece: str) -> str:
        """The text safe to stream now."""
        if self.calling:
            self.held += piece
            return ""
        text = self.held + piece
        if (start := text.find(CALL_OPEN)) >= 0:
            self.calling, self.held = True, text[start:]
            return text[:start]
        keep = held_back(text, (CALL_OPEN,))
        self.held = text[len(text) - keep:]
        return text[:len(text) - keep]
