"""What travels between Textbot's parts: chat messages and sampling parameters in,
reply pieces out.

These are the types behind the Textbot deployment's handle methods and every
HTTP route, so validation happens once, here, with pydantic's messages.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from backend.errors import APIError

Role = Literal["system", "user", "assistant", "tool"]
GREEDY_BELOW = 1e-5
# How many alternatives a token's log-probabilities may list (OpenAI's top_logprobs limit).
MAX_TOP_LOGPROBS = 20
# Replies from one prompt (`n`); each takes a place in the batch.
MAX_CHOICES = 8


class FunctionCall(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str
    arguments: str = Field(description="The arguments as JSON text, as the model wrote them.")


class ToolCall(BaseModel):
    model_config = ConfigDict(extra="forbid")

    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid")

    role: Role
    content: str
    tool_calls: list[ToolCall] | None = Field(None, description="An assistant turn's calls of tools.")
    tool_call_id: str | None = Field(None, description="A tool turn: the call it answers.")


class FunctionSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")
    description: str | None = None
    parameters: dict = Field(default_factory=lambda: {"type": "object", "properties": {}},
                             description="A JSON schema of the arguments object.")
    strict: bool | None = None


class ToolSpec(BaseModel):
    """A tool the model may call, as OpenAI declares it."""

    model_config = ConfigDict(extra="forbid")

    type: Literal["function"]
    function: FunctionSpec


class OutputSchema(BaseModel):
    """A JSON schema every reply must follow, enforced token by token while decoding."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    json_schema: dict
    strict: bool = Field(False, description="Refuse a schema with keywords the grammar cannot enforce, "
                                            "rather than ignoring them.")
    source: str = Field("response_format", description="The request parameter it came from, for errors.")


class SamplingParams(BaseModel):
    """Per-request generation parameters; None means "use the deployment's default"."""

    model_config = ConfigDict(extra="forbid")

    max_new_tokens: int | None = Field(None, ge=1, le=8192)
    temperature: float | None = Field(None, ge=0.0, le=2.0, description="0 means greedy.")
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    top_k: int | None = Field(None, ge=1, description="Sample only among this many likeliest tokens; None: all.")
    seed: int | None = Field(None, ge=0, le=2**63 - 1)
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    logit_bias: dict[int, float] | None = None
    stop: list[str] | None = Field(None, max_length=4, description="The reply ends before the first of these.")
    logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS, description=(
        "Report each token's log-probability and this many likeliest alternatives; None: do not."))
    output_schema: OutputSchema | None = None
    n: int = Field(1, ge=1, le=MAX_CHOICES, description="Replies to generate from the prompt.")


class ResolvedSampling(BaseModel):
    """SamplingParams with every default filled in: what the engine runs."""

    model_config = ConfigDict(frozen=True)

    max_new_tokens: int
    temperature: float
    top_p: float
    top_k: int | None = None
    seed: int | None = None
    # As OpenAI defines them: subtracted from the logits of tokens the reply has used,
    # once (presence) or per use (frequency); logit_bias is added by token id.
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[int, float] | None = None
    stop: tuple[str, ...] = ()
    logprobs: int | None = None
    output_schema: OutputSchema | None = None

    @property
    def greedy(self) -> bool:
        # Below this, logits / temperature overflows to inf and sampling is greedy anyway.
        return self.temperature < GREEDY_BELOW


@dataclass(frozen=True, slots=True)
class TopLogprob:
    token: str
    bytes: bytes
    logprob: float


@dataclass(frozen=True, slots=True)
class TokenLogprob:
    """A generated token's log-probability, and the likeliest tokens at its place (OpenAI's
    logprobs): computed after logit_bias, penalties and the output schema, before temperature."""

    token: str
    bytes: bytes
    logprob: float
    top: tuple[TopLogprob, ...] = ()


@dataclass(frozen=True, slots=True)
class ReplyPiece:
    """One step of a reply streamed from a Textbot replica to the HTTP ingress.

    The token counts are running totals, so a reader that stops early (a stop
    string) still knows the usage; the last piece has a `finish_reason`.
    """

    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str | None = None
    cached_tokens: int = 0  # of the prompt's, read from the replica's prefix cache
    index: int = 0  # which of the prompt's replies (`n`) this piece belongs to
    logprobs: tuple[TokenLogprob, ...] = ()  # of the tokens behind `text`, when asked for
    stop_sequence: str | None = None  # on the last piece: the stop string that ended the reply, if one did
    dropped: int = 0  # the conversation's oldest messages left out to fit the context (`truncate`)


def check_text(text: str, param: str, max_chars: int) -> str:
    """A message must say something and stay under the deployment's size limit."""
    if not text.strip():
        raise APIError(400, f"'{param}' is empty: send the text to reply to.", param=param)
    if len(text) > max_chars:
        raise APIError(413, f"'{param}' is {len(text)} characters; the limit is {max_chars}.",
                       param=param, code="prompt_too_long")
    return text
