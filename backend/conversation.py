"""Keeping a long conversation inside the model's context."""

from collections.abc import Callable

from backend.protocol import ChatMessage


def fit_to_context(messages: list[ChatMessage], count_tokens: Callable[[list[ChatMessage]], int],
                   max_prompt_tokens: int) -> tuple[list[ChatMessage], int]:
    """Drop the oldest turns until the prompt fits, keeping system messages and the last message.

    Returns the messages that fit and how many were dropped. If even the system
    messages and the last message do not fit, they are returned as they are and
    the engine refuses the prompt with its own message.
    """
    system = [m for m in messages if m.role == "system"]
    turns = [m for m in messages if m.role != "system"]
    dropped = 0
    while len(turns) > 1 and count_tokens(system + turns) > max_prompt_tokens:
        # A user message and the reply to it go together, so the model never sees half a turn.
        cut = 2 if len(turns) > 2 and turns[0].role == "user" and turns[1].role == "assistant" else 1
        turns, dropped = turns[cut:], dropped + cut
    return system + turns, dropped
