"""Anthropic Messages request, response and stream-event models (the subset Textbot serves:
text and tool use; no images, documents, thinking or server tools).

Requests are strict: an unknown field or an unsupported block is a 400 in Anthropic's error
shape naming it. Blocks a client sends back from an earlier message (`citations: null` on
text, `caller` and `toolset_name` on tool_use), as the SDK's objects or their `model_dump()`,
are accepted.
"""

import uuid
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag, model_validator

from backend.protocol import OutputSchema


def message_id() -> str:
    return f"msg_{uuid.uuid4().hex[:24]}"


class CacheControl(BaseModel):
    """Accepted on any block: the replica's prefix cache is automatic, so it changes nothing."""

    model_config = ConfigDict(extra="allow")

    type: Literal["ephemeral"] = "ephemeral"


class TextBlock(BaseModel):
    model_config = ConfigDict(extra="forbid")

    type: Literal["text"]
    text: str
    cache_control: CacheControl | None = None
    citations: list | None = None


class ToolUseBlock(BaseModel):
    """A call the model made in an earlier turn, sent back with the conversation."""

    model_config = ConfigDict(extra="forbid")

    type: Literal["tool_use"]
    id: str
    name: str
    input: dict
    cache_control: CacheControl | None = None
    caller: Any = None
    toolset_name: str | None = None


class ToolResultBlock(BaseModel):
    """The result of running a call, for the model to read."""

    model_config = ConfigDict(extra="forbid")

    type: Literal["tool_result"]
    tool_use_id: str
    content: str | list[TextBlock] = ""
    is_error: bool | None = None
    cache_control: CacheControl | None = None

    @property
    def text(self) -> str:
        text = self.content if isinstance(self.content, str) else "".join(b.text for b in self.content)
        return f"Error: {text}" if self.is_error else text


class UnsupportedBlock(BaseModel):
    """Images, documents, thinking and server tools' blocks: refused by name."""

    type: str

    @model_validator(mode="after")
    def _refuse(self):
        raise ValueError(f"content blocks of type {self.type!r} are not supported; send 'text', 'tool_use' "
                         "and 'tool_result' blocks")


def _block_kind(block: Any) -> str:
    kind = block.get("type") if isinstance(block, dict) else getattr(block, "type", None)
    return f"kind:{kind}" if kind in ("text", "tool_use", "tool_result") else "kind:unsupported"


ContentBlock = Annotated[
    Annotated[TextBlock, Tag("kind:text")] | Annotated[ToolUseBlock, Tag("kind:tool_use")]
    | Annotated[ToolResultBlock, Tag("kind:tool_result")] | Annotated[UnsupportedBlock, Tag("kind:unsupported")],
    Discriminator(_block_kind)]


class ConversationMessage(BaseModel):
    model_config = ConfigDict(extra="forbid")

    role: Literal["user", "assistant"]
    content: str | list[ContentBlock]

    @property
    def blocks(self) -> list:
        return [TextBlock(type="text", text=self.content)] if isinstance(self.content, str) else self.content


class Tool(BaseModel):
    model_config = ConfigDict(extra="forbid")

    type: Literal["custom"] | None = Field(None, description="Only client tools: Textbot runs no server tools.")
    name: str = Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")
    description: str | None = None
    input_schema: dict
    cache_control: CacheControl | None = None
    strict: bool | None = None


class ToolChoice(BaseModel):
    model_config = ConfigDict(extra="forbid")

    type: Literal["auto", "any", "tool", "none"]
    name: str | None = None
    disable_parallel_tool_use: bool | None = Field(None, description="Accepted; a forced choice makes one call.")

    @model_validator(mode="after")
    def _name_with_tool(self):
        if (self.type == "tool") != (self.name is not None):
            raise ValueError("tool_choice of type 'tool' needs the tool's 'name', and only it takes one")
        return self


class JsonOutputFormat(BaseModel):
    model_config = ConfigDict(extra="forbid")

    type: Literal["json_schema"]
    schema_: dict = Field(alias="schema")


class OutputConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    format: JsonOutputFormat | None = Field(None, description="Structured output, enforced while decoding.")
    effort: str | None = Field(None, description="Accepted; not used.")


class Metadata(BaseModel):
    model_config = ConfigDict(extra="forbid")

    user_id: str | None = None


class Thinking(BaseModel):
    model_config = ConfigDict(extra="forbid")

    type: Literal["disabled"] = Field(description="Only 'disabled': the model does not think apart from its reply.")


class MessagesPrompt(BaseModel):
    """What a message and a token count share: the prompt, its tools and its output form."""

    model_config = ConfigDict(extra="forbid")

    model: str = Field(description="The served model's id (see /v1/models).")
    messages: list[ConversationMessage] = Field(min_length=1)
    system: str | list[TextBlock] | None = None
    tools: Annotated[list[Tool], Field(max_length=64)] | None = None
    tool_choice: ToolChoice | None = Field(None, description="Default: 'auto' with tools.")
    output_config: OutputConfig | None = None
    thinking: Thinking | None = None

    @model_validator(mode="after")
    def _consistent(self):
        if self.messages[-1].role != "user":
            raise ValueError("the last message must be the user's: continuing an assistant turn (prefill) "
                             "is not supported")
        choice = self.tool_choice
        if choice is not None and choice.type in ("any", "tool") and not self.tools:
            raise ValueError("tool_choice needs tools")
        if choice is not None and choice.type == "tool" and choice.name not in {t.name for t in self.tools}:
            raise ValueError(f"tool_choice names {choice.name!r}, which is not among the tools")
        forced = choice is not None and choice.type in ("any", "tool")
        if forced and self.output_schema is not None:
            raise ValueError("output_config.format and a forced tool_choice both set the reply's form: pick one")
        return self

    @property
    def system_text(self) -> str | None:
        if self.system is None or isinstance(self.system, str):
            return self.system or None
        return "\n".join(b.text for b in self.system) or None

    @property
    def output_schema(self) -> OutputSchema | None:
        output = self.output_config and self.output_config.format
        return OutputSchema(json_schema=output.schema_, strict=True, source="output_config.format") if output else None


class MessagesRequest(MessagesPrompt):
    max_tokens: int = Field(ge=1, le=8192)
    stop_sequences: Annotated[list[Annotated[str, Field(min_length=1)]], Field(max_length=4)] | None = None
    temperature: float | None = Field(None, ge=0.0, le=1.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    top_k: int | None = Field(None, ge=1)
    stream: bool = False
    metadata: Metadata | None = Field(None, description="Accepted; not used.")
    service_tier: Literal["auto", "standard_only"] | None = Field(None, description="Accepted; there is one tier.")


class CountTokensRequest(MessagesPrompt):
    pass


# ---- The response ----

class OutputTextBlock(BaseModel):
    type: Literal["text"] = "text"
    text: str
    citations: None = None


class OutputToolUseBlock(BaseModel):
    type: Literal["tool_use"] = "tool_use"
    id: str
    name: str
    input: dict


OutputBlock = OutputTextBlock | OutputToolUseBlock

StopReason = Literal["end_turn", "max_tokens", "stop_sequence", "tool_use"]


class MessageUsage(BaseModel):
    input_tokens: int = Field(description="Prompt tokens not read from the prefix cache (Anthropic's count).")
    output_tokens: int
    cache_creation_input_tokens: int = 0
    cache_read_input_tokens: int = Field(0, description="Prompt tokens read from the replica's prefix cache.")


class Message(BaseModel):
    id: str = Field(default_factory=message_id)
    type: Literal["message"] = "message"
    role: Literal["assistant"] = "assistant"
    model: str
    content: list[OutputBlock] = []
    stop_reason: StopReason | None = None
    stop_sequence: str | None = None
    usage: MessageUsage


class TokenCount(BaseModel):
    input_tokens: int


# ---- Stream events ----

class MessageStartEvent(BaseModel):
    type: Literal["message_start"] = "message_start"
    message: Message


class BlockStartEvent(BaseModel):
    type: Literal["content_block_start"] = "content_block_start"
    index: int
    content_block: OutputBlock


class TextDelta(BaseModel):
    type: Literal["text_delta"] = "text_delta"
    text: str


class InputJsonDelta(BaseModel):
    type: Literal["input_json_delta"] = "input_json_delta"
    partial_json: str


class BlockDeltaEvent(BaseModel):
    type: Literal["content_block_delta"] = "content_block_delta"
    index: int
    delta: TextDelta | InputJsonDelta


class BlockStopEvent(BaseModel):
    type: Literal["content_block_stop"] = "content_block_stop"
    index: int


class MessageDelta(BaseModel):
    stop_reason: StopReason | None = None
    stop_sequence: str | None = None


class MessageDeltaEvent(BaseModel):
    type: Literal["message_delta"] = "message_delta"
    delta: MessageDelta
    usage: MessageUsage


class MessageStopEvent(BaseModel):
    type: Literal["message_stop"] = "message_stop"
