"""OpenAI Responses (`POST /v1/responses`) request, response and stream-event models (the
subset Textbot serves: text in, text and function calls out).

Requests are strict, as chat completions' are: an unknown field or an unsupported value is
a 400 naming it. Items a client sends back from an earlier response's `output` (a common
way to continue a conversation) carry fields such as `id`, `status` and `annotations`;
those are accepted and ignored, whether the SDK's objects are sent as they are or as their
`model_dump()` (which names a function call's `async` by its Python name, `async_`).
"""

import time
import uuid
from typing import Annotated, Any, Literal

from pydantic import AliasChoices, BaseModel, ConfigDict, Discriminator, Field, Tag, model_validator

from backend.protocol import OutputSchema

ItemStatus = Literal["in_progress", "completed", "incomplete"]


def response_id() -> str:
    return f"resp_{uuid.uuid4().hex}"


def item_id(kind: str) -> str:
    return f"{kind}_{uuid.uuid4().hex}"


# ---- The request ----

class InputText(BaseModel):
    """Text in a message: `input_text` from the client, `output_text` from an earlier response."""

    model_config = ConfigDict(extra="forbid")

    type: Literal["input_text", "output_text"]
    text: str
    annotations: list | None = None
    logprobs: list | None = None


class InputMessage(BaseModel):
    model_config = ConfigDict(extra="forbid")

    type: Literal["message"] = "message"
    role: Literal["user", "system", "developer", "assistant"]
    content: str | list[InputText]
    id: str | None = None
    status: ItemStatus | None = None
    phase: str | None = None

    @property
    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class FunctionCallItem(BaseModel):
    """A call the model made in an earlier turn, sent back with the conversation."""

    model_config = ConfigDict(extra="forbid")

    type: Literal["function_call"]
    call_id: str
    name: str
    arguments: str
    id: str | None = None
    status: ItemStatus | None = None
    # Fields of the SDK's own item (ResponseFunctionToolCall) that say nothing to this server.
    run_async: bool | None = Field(None, validation_alias=AliasChoices("async", "async_"))
    caller: Any = None
    namespace: str | None = None


class FunctionCallOutputItem(BaseModel):
    """The result of running a call, for the model to read."""

    model_config = ConfigDict(extra="forbid")

    type: Literal["function_call_output"]
    call_id: str
    output: str | list[InputText]
    id: str | None = None
    status: ItemStatus | None = None

    @property
    def text(self) -> str:
        return self.output if isinstance(self.output, str) else "".join(p.text for p in self.output)


def _item_kind(item: Any) -> str:
    kind = item.get("type", "message") if isinstance(item, dict) else getattr(item, "type", "message")
    # Tags that are not field names keep error locations clean ("input.0.content", not "input.0.message.content").
    return f"kind:{kind}" if kind in ("message", "function_call", "function_call_output") else "kind:unsupported"


class UnsupportedItem(BaseModel):
    """Any other item type (images, files, built-in tools' calls, reasoning): refused by name."""

    type: str

    @model_validator(mode="after")
    def _refuse(self):
        raise ValueError(f"input items of type {self.type!r} are not supported; send 'message', "
                         "'function_call' and 'function_call_output' items")


InputItem = Annotated[
    Annotated[InputMessage, Tag("kind:message")] | Annotated[FunctionCallItem, Tag("kind:function_call")]
    | Annotated[FunctionCallOutputItem, Tag("kind:function_call_output")] | Annotated[UnsupportedItem, Tag("kind:unsupported")],
    Discriminator(_item_kind)]


class FunctionTool(BaseModel):
    """A function the model may call, as the Responses API declares it (flat, unlike chat's)."""

    model_config = ConfigDict(extra="forbid")

    type: Literal["function"] = Field(description="Only function tools: Textbot runs no built-in tools.")
    name: str = Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")
    description: str | None = None
    parameters: dict | None = None
    strict: bool | None = None


class FunctionToolChoice(BaseModel):
    model_config = ConfigDict(extra="forbid")

    type: Literal["function"]
    name: str


class TextFormat(BaseModel):
    """`text` (free), `json_object` (any JSON object) or `json_schema`: enforced while decoding."""

    model_config = ConfigDict(extra="forbid")

    type: Literal["text", "json_object", "json_schema"]
    name: str | None = Field(None, pattern=r"^[A-Za-z0-9_-]{1,64}$")
    schema_: dict | None = Field(None, alias="schema")
    description: str | None = None
    strict: bool | None = None

    @model_validator(mode="after")
    def _schema_with_its_type(self):
        if self.type == "json_schema" and (self.schema_ is None or self.name is None):
            raise ValueError("a 'json_schema' format needs its 'name' and 'schema'")
        if self.type != "json_schema" and self.schema_ is not None:
            raise ValueError("'schema' goes only with type 'json_schema'")
        return self

    def output_schema(self) -> OutputSchema | None:
        if self.type == "json_object":
            return OutputSchema(json_schema={"type": "object"}, source="text.format")
        if self.type == "json_schema":
            return OutputSchema(json_schema=self.schema_, strict=bool(self.strict), source="text.format")
        return None


class TextConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    format: TextFormat | None = None
    verbosity: Literal["low", "medium", "high"] | None = Field(None, description="Accepted; not used.")


class ResponsesStreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    include_obfuscation: bool | None = Field(None, description="Accepted; events carry no obfuscation padding.")


class ResponseRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str | None = Field(None, description="The served model's id (see /v1/models); may be left out.")
    input: Annotated[str, Field(min_length=1)] | Annotated[list[InputItem], Field(min_length=1)]
    instructions: str | None = Field(None, description="A system message put before the input.")
    max_output_tokens: int | None = Field(None, ge=1, le=8192)
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    stream: bool = False
    stream_options: ResponsesStreamOptions | None = None
    text: TextConfig | None = None
    tools: Annotated[list[FunctionTool], Field(max_length=64)] | None = None
    tool_choice: Literal["none", "auto", "required"] | FunctionToolChoice | None = Field(
        None, description="Default: 'auto' with tools, 'none' without.")
    previous_response_id: str | None = Field(None, description=(
        "Refused: Textbot keeps no responses. Send the whole conversation in `input`."))
    store: bool | None = Field(None, description="Accepted; nothing is stored (the response says store: false).")
    truncation: Literal["disabled", "auto"] | None = Field(None, description=(
        "'auto' drops the oldest turns (never system messages or the last item) until the input fits."))
    prompt_cache_key: str | None = Field(None, max_length=200, description=(
        "Routes the request to the model replica holding this conversation's prefix cache, as x-session-id does."))
    # Accepted so that clients which send them work unchanged; they do not change the reply.
    parallel_tool_calls: bool | None = Field(None, description="Accepted; a forced tool choice makes one call.")
    metadata: Annotated[dict[str, str], Field(max_length=16)] | None = Field(None, description="Accepted; not used.")
    user: str | None = Field(None, description="Accepted; not used.")
    safety_identifier: str | None = Field(None, description="Accepted; not used.")
    service_tier: str | None = Field(None, description="Accepted; there is one tier.")
    include: list[str] | None = Field(None, description="Accepted; nothing optional is included.")
    reasoning: dict | None = Field(None, description="Accepted; the model does not reason apart from its reply.")

    @model_validator(mode="after")
    def _consistent(self):
        if self.stream_options is not None and not self.stream:
            raise ValueError("stream_options is only allowed with stream: true")
        choice = self.tool_choice
        if choice not in (None, "none") and not self.tools:
            raise ValueError("tool_choice needs tools")
        if isinstance(choice, FunctionToolChoice) and choice.name not in {t.name for t in self.tools}:
            raise ValueError(f"tool_choice names {choice.name!r}, which is not among the tools")
        forced = isinstance(choice, FunctionToolChoice) or choice == "required"
        if forced and self.output_schema is not None:
            raise ValueError("text.format and a forced tool_choice both set the reply's form: pick one")
        return self

    @property
    def output_schema(self) -> OutputSchema | None:
        return self.text.format.output_schema() if self.text and self.text.format else None

    @property
    def items(self) -> list:
        """The input as items: a string is one user message."""
        return [InputMessage(role="user", content=self.input)] if isinstance(self.input, str) else self.input


# ---- The response ----

class OutputText(BaseModel):
    type: Literal["output_text"] = "output_text"
    text: str
    annotations: list = []
    logprobs: list = []


class OutputMessage(BaseModel):
    type: Literal["message"] = "message"
    id: str = Field(default_factory=lambda: item_id("msg"))
    role: Literal["assistant"] = "assistant"
    status: ItemStatus = "in_progress"
    content: list[OutputText] = []


class OutputFunctionCall(BaseModel):
    type: Literal["function_call"] = "function_call"
    id: str = Field(default_factory=lambda: item_id("fc"))
    call_id: str
    name: str
    arguments: str
    status: ItemStatus = "in_progress"


OutputItem = OutputMessage | OutputFunctionCall


class InputTokensDetails(BaseModel):
    cached_tokens: int = Field(0, description="Input tokens read from the replica's prefix cache.")


class OutputTokensDetails(BaseModel):
    reasoning_tokens: int = 0


class ResponseUsage(BaseModel):
    input_tokens: int
    input_tokens_details: InputTokensDetails
    output_tokens: int
    output_tokens_details: OutputTokensDetails = OutputTokensDetails()
    total_tokens: int


class IncompleteDetails(BaseModel):
    reason: Literal["max_output_tokens"]


class ResponseError(BaseModel):
    code: str
    message: str


ResponseStatus = Literal["in_progress", "completed", "incomplete", "failed"]


class Response(BaseModel):
    id: str = Field(default_factory=response_id)
    object: Literal["response"] = "response"
    created_at: int = Field(default_factory=lambda: int(time.time()))
    completed_at: int | None = None
    status: ResponseStatus = "in_progress"
    model: str
    output: list[OutputItem] = []
    instructions: str | None = None
    max_output_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    tools: list[FunctionTool] = []
    tool_choice: Literal["none", "auto", "required"] | FunctionToolChoice = "auto"
    parallel_tool_calls: bool = True
    text: TextConfig | None = None
    truncation: Literal["disabled", "auto"] = "disabled"
    store: bool = Field(False, description="Always false: Textbot keeps no responses.")
    previous_response_id: None = None
    metadata: dict[str, str] = {}
    error: ResponseError | None = None
    incomplete_details: IncompleteDetails | None = None
    usage: ResponseUsage | None = None


# ---- Stream events (each carries its `type` and a `sequence_number` the stream writer adds) ----

class ResponseEvent(BaseModel):
    type: str
    sequence_number: int = 0


class ResponseLifecycleEvent(ResponseEvent):
    """response.created, response.in_progress, response.completed, response.incomplete, response.failed"""

    response: Response


class OutputItemEvent(ResponseEvent):
    """response.output_item.added and .done"""

    output_index: int
    item: OutputItem


class ContentPartEvent(ResponseEvent):
    """response.content_part.added and .done"""

    item_id: str
    output_index: int
    content_index: int = 0
    part: OutputText


class TextDeltaEvent(ResponseEvent):
    type: Literal["response.output_text.delta"] = "response.output_text.delta"
    item_id: str
    output_index: int
    content_index: int = 0
    delta: str
    logprobs: list = []


class TextDoneEvent(ResponseEvent):
    type: Literal["response.output_text.done"] = "response.output_text.done"
    item_id: str
    output_index: int
    content_index: int = 0
    text: str
    logprobs: list = []


class ArgumentsDeltaEvent(ResponseEvent):
    type: Literal["response.function_call_arguments.delta"] = "response.function_call_arguments.delta"
    item_id: str
    output_index: int
    delta: str


class ArgumentsDoneEvent(ResponseEvent):
    type: Literal["response.function_call_arguments.done"] = "response.function_call_arguments.done"
    item_id: str
    output_index: int
    name: str
    arguments: str


class ErrorEvent(ResponseEvent):
    type: Literal["error"] = "error"
    code: str | None = None
    message: str
    param: str | None = None
