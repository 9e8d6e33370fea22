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

Role = Literal["system", "user", "assistant"]
GREEDY_BELOW = 1e-5


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid")

    role: Role
    content: str


class SamplingParams(BaseModel):
    """Per-request generation parameters; None means "use the deployment's default"."""

    model_config = ConfigDict(extra="forbid")

    max_new_tokens: int | None = Field(None, ge=1, le=8192)
    temperature: float | None = Field(None, ge=0.0, le=2.0, description="0 means greedy.")
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    seed: int | None = Field(None, ge=0, le=2**63 - 1)
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    logit_bias: dict[int, float] | None = None


class ResolvedSampling(BaseModel):
    """SamplingParams with every default filled in: what the engine runs."""

    model_config = ConfigDict(frozen=True)

    max_new_tokens: int
    temperature: float
    top_p: float
    seed: int | None = None
    # As OpenAI defines them: subtracted from the logits of tokens the reply has used,
    # once (presence) or per use (frequency); logit_bias is added by token id.
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[int, float] | None = None

    @property
    def greedy(self) -> bool:
        # Below this, logits / temperature overflows to inf and sampling is greedy anyway.
        return self.temperature < GREEDY_BELOW


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


def check_text(text: str, param: str, max_chars: int) -> str:
    """A message must say something and stay under the deployment's size limit."""
    if not text.strip():
        raise APIError(400, f"'{param}' is empty: send the text to reply to.", param=param)
    if len(text) > max_chars:
        raise APIError(413, f"'{param}' is {len(text)} characters; the limit is {max_chars}.",
                       param=param, code="prompt_too_long")
    return text
