"""OpenAI chat-completions request and response models (the subset Textbot serves).

Requests are strict: an unknown field or an unsupported value is a 400 naming
it, rather than a setting silently ignored.
"""

import time
import uuid
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from backend.protocol import ChatMessage


class TextPart(BaseModel):
    model_config = ConfigDict(extra="forbid")

    type: Literal["text"]
    text: str


class RequestMessage(BaseModel):
    model_config = ConfigDict(extra="forbid")

    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart]
    name: str | None = None

    def to_chat(self) -> ChatMessage:
        text = self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)
        return ChatMessage(role="system" if self.role == "developer" else self.role, content=text)


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
    n: int = Field(1, description="Only 1 is supported.")
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
    parallel_tool_calls: bool | None = Field(None, description="Accepted; this server has no tools yet.")
    service_tier: str | None = Field(None, description="Accepted; there is one tier.")
    truncation: Literal["disabled", "auto"] = Field(
        "disabled",
        description=("Textbot extension, named as in OpenAI's Responses API: 'auto' drops the oldest turns "
                     "(never system messages or the last message) until the conversation fits the context; "
                     "the response header X-Textbot-Dropped-Messages says how many."),
    )

    @field_validator("n")
    @classmethod
    def _one_choice(cls, n: int) -> int:
        if n != 1:
            raise ValueError("only n=1 is supported: send one request per reply")
        return n

    @field_validator("stop")
    @classmethod
    def _stop_strings(cls, stop):
        stops = [stop] if isinstance(stop, str) else stop
        if stops is not None and any(s == "" for s in stops):
            raise ValueError("stop strings must not be empty")
        return stops

    @model_validator(mode="after")
    def _stream_options_need_stream(self):
        if self.stream_options is not None and not self.stream:
            raise ValueError("stream_options is only allowed with stream: true")
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


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class Choice(BaseModel):
    index: int = 0
    message: AssistantMessage
    finish_reason: Literal["stop", "length"]


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


class Delta(BaseModel):
    # OpenAI leaves a key out of the delta rather than sending null.
    role: Literal["assistant"] | None = _omit_none()
    content: str | None = _omit_none()


class ChunkChoice(BaseModel):
    index: int = 0
    delta: Delta
    finish_reason: Literal["stop", "length"] | None = None


class ChatCompletionChunk(CompletionHeader):
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    choices: list[ChunkChoice]
    usage: Usage | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "textbot"


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]
