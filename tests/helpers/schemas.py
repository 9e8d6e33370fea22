"""Output schemas the client tests ask the models for, through each SDK."""

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class Verdict(BaseModel):
    """A bounded schema: enums, a boolean, a bounded integer and a short string."""

    model_config = ConfigDict(extra="forbid")
    mood: Literal["happy", "sad", "neutral"]
    confident: bool
    stars: int = Field(ge=1, le=5)
    note: str = Field(max_length=12)
