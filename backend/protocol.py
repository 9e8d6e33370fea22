"""What travels between Textbot's parts: chat messages and sampling parameters in,
reply pieces out.

These are the types behind the Textbot deployment's handle methods and every
HTTP route, so validation happens once, here, with pydantic's messages.
"""

from __future__ import annotations

from dataclasses import dataclass

from pydantic import BaseModel, ConfigDict, Field

# The engine's own types (what it takes and gives), re-exported: the service's requests build on them.
from backend.engine.protocol import (  # noqa: F401
    GREEDY_BELOW,
    MAX_CHOICES,
    ChatMessage,
    FunctionCall,
    FunctionSpec,
    OutputSchema,
    ResolvedSampling,
    Role,
    TokenLogprob,
    ToolCall,
    ToolSpec,
    TopLogprob,
)
from backend.errors import APIError

# How many alternatives a token's log-probabilities may list (OpenAI's top_logprobs limit).
MAX_TOP_LOGPROBS = 20


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
