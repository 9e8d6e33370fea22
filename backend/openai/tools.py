"""Tool calls, for all three APIs: what the request's tool choice asks of the reply, and
reading calls out of it.

Each API names its tools and tool choice its own way; its serving module turns them into a
`ToolUse`, and everything below works on that alone.

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
from dataclasses import dataclass
from typing import Literal

from backend.engine.stops import held_back
from backend.protocol import FunctionCall, OutputSchema, ReplyPiece, ToolCall, ToolSpec

CALL_OPEN, CALL_CLOSE = "<tool_call>", "</tool_call>"
_CALL_BLOCK = re.compile(re.escape(CALL_OPEN) + r"(.*?)(?:" + re.escape(CALL_CLOSE) + r"|$)", re.DOTALL)

ToolMode = Literal["none", "auto", "required", "named"]


def call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


@dataclass(frozen=True)
class ToolUse:
    """The tools a request declares and what its tool choice asks: 'none' (no tools in
    play), 'auto' (the model may call one), 'required' (it must call one) or 'named'
    (it must call `function`)."""

    tools: tuple[ToolSpec, ...] = ()
    mode: ToolMode = "none"
    function: str | None = None

    @classmethod
    def of(cls, tools: list[ToolSpec] | None, choice: str | None, function: str | None = None) -> ToolUse:
        """From a request's tools and its choice ('none', 'auto', 'required', or None for the
        default: 'auto' with tools), or the function it names. Without tools, always 'none'."""
        if not tools:
            return cls()
        if function is not None:
            return cls(tuple(tools), "named", function)
        return cls(tuple(tools), choice or "auto")

    def for_prompt(self) -> list[ToolSpec] | None:
        """The tools the model is told of: none when tool choice is 'none', only the named one when forced."""
        if self.mode == "none":
            return None
        if self.mode == "named":
            return [t for t in self.tools if t.function.name == self.function]
        return list(self.tools)

    def forced_schema(self) -> OutputSchema | None:
        """The schema a forced tool call puts on the reply, or None."""
        if self.mode == "named":
            [tool] = self.for_prompt()
            return OutputSchema(json_schema=tool.function.parameters, strict=bool(tool.function.strict),
                                source="tools")
        if self.mode == "required":
            calls = [{"type": "object", "required": ["name", "arguments"],
                      "properties": {"name": {"const": t.function.name}, "arguments": t.function.parameters}}
                     for t in self.tools]
            schema = calls[0] if len(calls) == 1 else {"anyOf": calls}
            return OutputSchema(json_schema=schema, strict=any(t.function.strict for t in self.tools),
                                source="tools")
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


@dataclass
class Outcome:
    """A finished reply read as the APIs report it: its text (None when it only called tools),
    its calls, whether they were why it stopped, the engine's finish reason ('stop', 'length'),
    and the text held back while streaming that turned out not to be a call (to stream last)."""

    content: str | None
    calls: list[ToolCall]
    finish_reason: str
    held: str = ""

    @property
    def called(self) -> bool:
        return bool(self.calls)


class ReplyReader:
    """One reply as it streams, read as text and tool calls, whichever API serves it.

    `push` returns the text that can be streamed as the reply's text now: all of it
    without tools; under 'auto' all but what may open a `<tool_call>` block; nothing
    when a call is forced (the reply is then the call). `finish` reads the whole reply.
    The id of a forced call is known from the start (`call_id`), so an API may stream
    its arguments as they come.
    """

    def __init__(self, tool_use: ToolUse):
        self.tool_use = tool_use
        self.call_id = call_id()
        self.text = ""
        self._opening = CallOpening()

    @property
    def mode(self) -> ToolMode:
        return self.tool_use.mode

    @property
    def streams_arguments(self) -> bool:
        """Whether each piece's text is the forced function's arguments, to stream as they come."""
        return self.mode == "named"

    def push(self, piece: ReplyPiece | str) -> str:
        text = piece if isinstance(piece, str) else piece.text
        self.text += text
        if not text or self.mode in ("named", "required"):
            return ""
        return self._opening.push(text) if self.mode == "auto" else text

    def finish(self, finish_reason: str) -> Outcome:
        if self.mode == "named":
            call = ToolCall(id=self.call_id, function=FunctionCall(name=self.tool_use.function, arguments=self.text))
            return Outcome(None, [call], finish_reason)
        if self.mode == "required":
            calls = parse_required(self.text)
            return Outcome(None, calls, finish_reason) if calls else Outcome(self.text, [], finish_reason, self.text)
        if self.mode == "auto":
            content, calls = parse_auto(self.text)
            if calls:
                return Outcome(content or None, calls, finish_reason)
            return Outcome(self.text, [], finish_reason, self._opening.held)
        return Outcome(self.text, [], finish_reason)
