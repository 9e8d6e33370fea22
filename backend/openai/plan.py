"""One engine path for the three APIs (chat completions, Responses, Anthropic's Messages):
each API's serving module turns its request into a `ReplyPlan`, and the ingress runs every
plan the same way (backend/api.py `TextbotAPI._reply`): text checks, truncation, the
model's prompt and tools, sampling with its grammar and stop strings, and one stream of
`ReplyPiece`s. What comes back is read by `tools.ReplyReader` and counted by
`replies.UsageCounter`, whichever API writes it out.
"""

from __future__ import annotations

from dataclasses import dataclass

from backend.openai.tools import ToolUse
from backend.protocol import ChatMessage, OutputSchema, SamplingParams


@dataclass(frozen=True)
class ReplyPlan:
    """What a request asks of the model, in no API's terms.

    `messages` is the conversation (tool calls and results included), `sampling` the
    generation parameters with the output schema the reply must follow (a forced tool call's
    or the request's structured-output format: see `constrained`), `tool_use` the tools the
    model is told of and how its reply is read. `route` names the route in the request log;
    `param` is the request field holding the messages, for errors; `truncate` drops the
    oldest turns to fit the context; `session` routes to the replica with the prefix cache.
    """

    messages: list[ChatMessage]
    sampling: SamplingParams
    tool_use: ToolUse
    route: str
    param: str = "messages"
    truncate: bool = False
    session: str | None = None


def constrained(sampling: SamplingParams, tool_use: ToolUse, output_schema: OutputSchema | None) -> SamplingParams:
    """`sampling` with the grammar the reply must follow: a forced tool call's schema, else the
    requested output format's (each API's protocol refuses a request that sets both)."""
    schema = tool_use.forced_schema() or output_schema
    return sampling.model_copy(update={"output_schema": schema}) if schema else sampling
