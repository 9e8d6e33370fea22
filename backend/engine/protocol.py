"""What the engine takes and gives: chat messages (with tool calls), the tools a model may
call, the output schema, resolved sampling parameters in; tokens' log-probabilities out.

The service's request types (backend/protocol.py) build on these and re-export them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

Role = Literal["system", "user", "assistant", "tool"]
GREEDY_BELOW = 1e-5
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
