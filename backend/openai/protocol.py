"""OpenAI chat-completions and completions request and response models (the subset Textbot serves).

Requests are strict: an unknown field or an unsupported value is a 400 naming
it, rather than a setting silently ignored.
"""

import time
import uuid
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

from backend.protocol import (MAX_CHOICES, MAX_TOP_LOGPROBS, ChatMessage, OutputSchema, ToolCall,
                              ToolSpec)

FinishReason = Literal["stop", "length", "tool_calls"]


class TextPart(BaseModel):
    model_config = ConfigDict(extra="forbid")

    type: Literal["text"]
    text: str


class RequestMessage(BaseModel):
    model_config = ConfigDict(extra="forbid")

    role: Literal["system", "developer", "user", "assistant", "tool"]
    # Checked after tool_calls (below): only an assistant turn that calls tools may leave it out.
    tool_calls: list[ToolCall] | None = Field(None, description="An assistant turn's calls of tools.")
    content: str | list[TextPart] | None = Field(None, validate_default=True)
    name: str | None = None
    tool_call_id: str | None = Field(None, description="A tool turn: the id of the call it answers.")
    refusal: str | None = None

    @field_validator("content")
    @classmethod
    def _content_where_needed(cls, content, info: ValidationInfo):
        if content is None and not (info.data.get("role") == "assistant" and info.data.get("tool_calls")):
            raise ValueError("Field required (only an assistant message with tool_calls may leave it out)")
        return content

    @model_validator(mode="after")
    def _tool_turns_name_their_call(self):
        if self.role == "tool" and not self.tool_call_id:
            raise ValueError("a tool message needs the tool_call_id of the call it answers")
        return self

    @property
    def text(self) -> str:
        if self.content is None:
            return ""
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)

    def to_chat(self) -> ChatMessage:
        return ChatMessage(role="system" if self.role == "developer" else self.role, content=self.text,
                           tool_calls=self.tool_calls, tool_call_id=self.tool_call_id)


class JsonSchemaFormat(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")
    description: str | None = None
    schema_: dict = Field(default_factory=lambda: {"type": "object"}, alias="schema")
    strict: bool | None = None


class ResponseFormat(BaseModel):
    """`text` (free), `json_object` (any JSON object) or `json_schema`: enforced while decoding."""

    model_config = ConfigDict(extra="forbid")

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None

    @model_validator(mode="after")
    def _schema_with_its_type(self):
        if (self.type == "json_schema") != (self.json_schema is not None):
            raise ValueError("json_schema is required with type 'json_schema', and only there")
        return self

    def output_schema(self) -> OutputSchema | None:
        if self.type == "json_object":
            return OutputSchema(json_schema={"type": "object"})
        if self.type == "json_schema":
            return OutputSchema(json_schema=self.json_schema.schema_, strict=bool(self.json_schema.strict))
        return None


class NamedFunction(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str


class NamedToolChoice(BaseModel):
    model_config = ConfigDict(extra="forbid")

    type: Literal["function"]
    function: NamedFunction


ToolChoice = Literal["none", "auto", "required"] | NamedToolChoice


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    include_usage: bool = False


class ChatCompletionRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str | None = Field(None, description="The served model's id (see /v1/models); may be left out.")
    messages: list[RequestMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1, le=8192)
    max_completion_tokens: int | None = Field(None, ge=1, le=8192)
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    seed: int | None = Field(None, ge=0, le=2**63 - 1)
    stop: str | Annotated[list[str], Field(max_length=4)] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = Field(1, ge=1, le=MAX_CHOICES, description="Replies to generate; the prompt is read once for all.")
    response_format: ResponseFormat | None = None
    tools: Annotated[list[ToolSpec], Field(min_length=1, max_length=64)] | None = None
    tool_choice: ToolChoice | None = Field(None, description="Default: 'auto' with tools, 'none' without.")
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    frequency_penalty: float | None = Field(None, ge=-2.0, le=2.0, description=(
        "Subtracted from a token's logit once per use in the reply so far."))
    presence_penalty: float | None = Field(None, ge=-2.0, le=2.0, description=(
        "Subtracted from a token's logit once it appears in the reply."))
    logit_bias: Annotated[dict[int, Annotated[float, Field(ge=-100, le=100)]], Field(max_length=300)] | None = Field(
        None, description="Token id -> value added to its logit before sampling (-100 bans it, 100 forces it).")
    # Accepted so that clients which send them work unchanged; they do not change the reply.
    user: str | None = Field(None, description="Accepted; not used.")
    store: bool | None = Field(None, description="Accepted; nothing is stored.")
    metadata: Annotated[dict[str, str], Field(max_length=16)] | None = Field(None, description="Accepted; not used.")
    parallel_tool_calls: bool | None = Field(None, description=(
        "Accepted; a reply makes one call when tool_choice forces it, any number in 'auto'."))
    service_tier: str | None = Field(None, description="Accepted; there is one tier.")
    truncation: Literal["disabled", "auto"] = Field(
        "disabled",
        description=("Textbot extension, named as in OpenAI's Responses API: 'auto' drops the oldest turns "
                     "(never system messages or the last message) until the conversation fits the context; "
                     "the response header X-Textbot-Dropped-Messages says how many."),
    )

    @field_validator("stop")
    @classmethod
    def _stop_strings(cls, stop):
        stops = [stop] if isinstance(stop, str) else stop
        if stops is not None and any(s == "" for s in stops):
            raise ValueError("stop strings must not be empty")
        return stops

    @model_validator(mode="after")
    def _consistent(self):
        if self.stream_options is not None and not self.stream:
            raise ValueError("stream_options is only allowed with stream: true")
        if self.top_logprobs is not None and not self.logprobs:
            raise ValueError("top_logprobs needs logprobs: true")
        choice = self.tool_choice
        if choice not in (None, "none") and not self.tools:
            raise ValueError("tool_choice needs tools")
        if isinstance(choice, NamedToolChoice) and choice.function.name not in {t.function.name for t in self.tools}:
            raise ValueError(f"tool_choice names {choice.function.name!r}, which is not among the tools")
        forced = isinstance(choice, NamedToolChoice) or choice == "required"
        if forced and self.response_format is not None and self.response_format.type != "text":
            raise ValueError("response_format and a forced tool_choice both set the reply's form: pick one")
        return self

    @property
    def stop_strings(self) -> list[str]:
        return self.stop or []

    @property
    def token_limit(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens


class PromptTokensDetails(BaseModel):
    cached_tokens: int = Field(0, description="Prompt tokens read from the replica's prefix cache.")


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails = PromptTokensDetails()


class TopLogprobEntry(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None


class LogprobEntry(TopLogprobEntry):
    top_logprobs: list[TopLogprobEntry]


class ChoiceLogprobs(BaseModel):
    content: list[LogprobEntry] | None
    refusal: None = None


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None
    tool_calls: list[ToolCall] | None = None
    refusal: None = None


class Choice(BaseModel):
    index: int = 0
    message: AssistantMessage
    logprobs: ChoiceLogprobs | None = None
    finish_reason: FinishReason


class CompletionHeader(BaseModel):
    """What a completion and each of its chunks carry alike (the chunks of one stream share it)."""

    id: str = Field(default_factory=lambda: f"chatcmpl-{uuid.uuid4().hex}")
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str


class ChatCompletion(CompletionHeader):
    object: Literal["chat.completion"] = "chat.completion"
    choices: list[Choice]
    usage: Usage


def _omit_none():
    return Field(None, exclude_if=lambda value: value is None)


class DeltaFunction(BaseModel):
    name: str | None = _omit_none()
    arguments: str = ""


class DeltaToolCall(BaseModel):
    """A streamed tool call: its first delta has the id, type and name; later ones add arguments."""

    index: int
    id: str | None = _omit_none()
    type: Literal["function"] | None = _omit_none()
    function: DeltaFunction


class Delta(BaseModel):
    # OpenAI leaves a key out of the delta rather than sending null.
    role: Literal["assistant"] | None = _omit_none()
    content: str | None = _omit_none()
    tool_calls: list[DeltaToolCall] | None = _omit_none()


class ChunkChoice(BaseModel):
    index: int = 0
    delta: Delta
    logprobs: ChoiceLogprobs | None = None
    finish_reason: FinishReason | None = None


class ChatCompletionChunk(CompletionHeader):
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    choices: list[ChunkChoice]
    usage: Usage | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "textbot"
    # Beyond OpenAI's card (clients ignore what they do not know); None while no replica answers.
    loaded: bool = Field(description="Whether a model replica answered just now")
    context_length: int | None = Field(None, description="Tokens of prompt and reply together")
    quantization: str = Field(description="The weights as the engine runs them: int4, int8 or none")
    engine: Literal["textbot", "transformers"] | None = Field(
        None, description="textbot: the engine's own transformer, with its slot cache, prefix cache and compiled "
                          "step; transformers: transformers' forward, for a model of no family the engine knows")
    engine_reason: str | None = Field(None, description="Why the model runs on transformers' forward, when it does")


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


# ---- The legacy completions route (/v1/completions) ----

class CompletionRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str | None = Field(None, description="The served model's id (see /v1/models); may be left out.")
    prompt: (Annotated[str, Field(min_length=1)]
             | Annotated[list[Annotated[str, Field(min_length=1)]], Field(min_length=1, max_length=MAX_CHOICES)]
             | Annotated[list[int], Field(min_length=1)]
             | Annotated[list[Annotated[list[int], Field(min_length=1)]], Field(min_length=1, max_length=MAX_CHOICES)])
    max_tokens: int | None = Field(16, ge=1, le=8192, description="OpenAI's default is 16.")
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    n: int = Field(1, ge=1, le=MAX_CHOICES)
    best_of: int | None = Field(None, description="Only equal to n (or left out): no reply is generated unseen.")
    stream: bool = False
    stream_options: StreamOptions | None = None
    logprobs: int | None = Field(None, ge=0, le=5, description="Log-probabilities of each token and this many "
                                                             "alternatives.")
    echo: bool = Field(False, description="Repeat a text prompt before its completion.")
    stop: str | Annotated[list[str], Field(max_length=4)] | None = None
    seed: int | None = Field(None, ge=0, le=2**63 - 1)
    suffix: None = Field(None, description="Not supported (no insertion): leave it out.")
    frequency_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    presence_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    logit_bias: Annotated[dict[int, Annotated[float, Field(ge=-100, le=100)]], Field(max_length=300)] | None = None
    user: str | None = Field(None, description="Accepted; not used.")

    _stop_strings = field_validator("stop")(ChatCompletionRequest._stop_strings.__func__)

    @model_validator(mode="after")
    def _consistent(self):
        if self.stream_options is not None and not self.stream:
            raise ValueError("stream_options is only allowed with stream: true")
        if self.best_of not in (None, self.n):
            raise ValueError("best_of must equal n: every generated reply is returned")
        if self.echo and self.logprobs is not None:
            raise ValueError("echo with logprobs is not supported: the prompt's own log-probabilities "
                             "are not computed")
        if self.echo and not self.text_prompts:
            raise ValueError("echo needs a text prompt (not token ids)")
        if len(self.prompts) * self.n > MAX_CHOICES:
            raise ValueError(f"prompts times n must be at most {MAX_CHOICES}")
        return self

    @property
    def text_prompts(self) -> bool:
        return isinstance(self.prompt, str) or isinstance(self.prompt[0], str)

    @property
    def prompts(self) -> list[str] | list[list[int]]:
        """One entry per prompt: a text, or token ids."""
        if isinstance(self.prompt, str) or isinstance(self.prompt[0], int):
            return [self.prompt]
        return list(self.prompt)

    @property
    def stop_strings(self) -> list[str]:
        return self.stop or []


class LegacyLogprobs(BaseModel):
    tokens: list[str] = []
    token_logprobs: list[float] = []
    top_logprobs: list[dict[str, float]] = []
    text_offset: list[int] = []


class CompletionChoice(BaseModel):
    index: int = 0
    text: str
    logprobs: LegacyLogprobs | None = None
    finish_reason: Literal["stop", "length"] | None = None


class Completion(BaseModel):
    id: str = Field(default_factory=lambda: f"cmpl-{uuid.uuid4().hex}")
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None
