"""A prompt as the model's tokens: a conversation (through the model's chat template, with
the tools it may call), a plain text, or token ids as given; and a long conversation kept
inside the model's context (`fit_to_context`)."""

from __future__ import annotations

import json
from collections.abc import Callable

from backend.engine.protocol import ChatMessage, ToolSpec

Prompt = list[ChatMessage] | str | list[int]

# How a model without tools in its chat template learns of them, and how it calls one
# (the <tool_call> tags many open chat models are trained on; backend/openai/tools.py reads them).
TOOLS_INTRO = ("You can call these functions (JSON schemas of their arguments follow):\n{tools}\n"
               "To call one, reply with <tool_call>{{\"name\": <function name>, \"arguments\": "
               "<arguments object>}}</tool_call> and nothing else.")


def is_conversation(prompt: Prompt) -> bool:
    """Chat messages (which go through the chat template), not a text or token ids."""
    return isinstance(prompt, list) and bool(prompt) and isinstance(prompt[0], ChatMessage)


def encode_prompt(tokenizer, prompt: Prompt, tools: list[ToolSpec] | None = None) -> list[int]:
    if is_conversation(prompt):
        return encode_chat(tokenizer, prompt, tools)
    if isinstance(prompt, str):
        return tokenizer.encode(prompt)
    return list(prompt)


def encode_chat(tokenizer, messages: list[ChatMessage], tools: list[ToolSpec] | None = None) -> list[int]:
    """Prompt tokens for a conversation, ending where the assistant's reply starts.

    Models with a chat template use it; tools reach the model through it where it takes
    them, else as a system message. Models without one (DialoGPT, GPT-2, base models such as
    Gemma 3 270M) get DialoGPT's own training format, the plain template the README names:
    each turn's text followed by the EOS token, system messages as plain leading text; the
    reply follows the last EOS.
    """
    template = tokenizer.chat_template
    if template and "tools" in template:
        plain = [_templated(m) for m in messages]
        kwargs = {"tools": [t.model_dump(exclude_none=True) for t in tools]} if tools else {}
    else:
        plain = _tools_as_text(messages, tools)
        kwargs = {}
    if template:
        encoded = tokenizer.apply_chat_template(plain, add_generation_prompt=True, return_dict=True, **kwargs)
        return list(encoded["input_ids"])
    eos = tokenizer.eos_token or ""
    text = "".join(m["content"] + eos for m in plain)
    # With the tokens the tokenizer adds to any text: a base model such as Gemma reads nothing
    # well without its BOS token first (GPT-2's and DialoGPT's tokenizers add none).
    return tokenizer.encode(text)


def _templated(message: ChatMessage) -> dict:
    """A message as chat templates that know tools expect it: arguments as objects."""
    plain = message.model_dump(exclude_none=True)
    for call in plain.get("tool_calls", ()):
        try:
            call["function"]["arguments"] = json.loads(call["function"]["arguments"])
        except ValueError:
            pass  # not JSON: the template gets the text as written
    return plain


def _tools_as_text(messages: list[ChatMessage], tools: list[ToolSpec] | None) -> list[dict]:
    """The conversation for a template without tools: their declaration joins the system
    message, calls and results become tagged text in the turns that carry them."""
    plain = []
    for message in messages:
        content = message.content
        if message.tool_calls:
            content += "".join(f"<tool_call>{json.dumps(_call(c))}</tool_call>" for c in message.tool_calls)
        if message.role == "tool":
            plain.append({"role": "user", "content": f"<tool_response>{content}</tool_response>"})
        else:
            plain.append({"role": message.role, "content": content})
    if tools:
        intro = TOOLS_INTRO.format(tools="\n".join(json.dumps(t.function.model_dump(exclude_none=True))
                                                   for t in tools))
        if plain and plain[0]["role"] == "system":
            plain[0] = {"role": "system", "content": f"{plain[0]['content']}\n\n{intro}"}
        else:
            plain.insert(0, {"role": "system", "content": intro})
    return plain


def _call(call) -> dict:
    try:
        arguments = json.loads(call.function.arguments)
    except ValueError:
        arguments = call.function.arguments
    return {"name": call.function.name, "arguments": arguments}


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
