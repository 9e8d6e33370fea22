"""What a caller hands the engine: chat messages and sampling parameters.

These are the types behind the handle method `Textbot.stream_chat` and every
HTTP route, so validation happens once, here, with pydantic's messages.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

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


class ResolvedSampling(BaseModel):
    """SamplingParams with every default filled in: what the engine runs."""

    model_config = ConfigDict(frozen=True)

    max_new_tokens: int
    temperature: float
    top_p: float
    seed: int | None = None

    @property
    def greedy(self) -> bool:
        # Below this, logits / temperature overflows to inf and sampling is greedy anyway.
        return self.temperature < GREEDY_BELOW
