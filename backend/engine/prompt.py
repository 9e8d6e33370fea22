"""A conversation as the model's prompt tokens."""

from __future__ import annotations

from backend.protocol import ChatMessage


def encode_chat(tokenizer, messages: list[ChatMessage]) -> list[int]:
    """Prompt tokens for a conversation, ending where the assistant's reply starts.

    Models with a chat template use it. Models without one (DialoGPT, GPT-2)
    get DialoGPT's own training format: each turn's text followed by the EOS
    token, system messages as plain leading text; the reply follows the last EOS.
    """
    plain = [m.model_dump() for m in messages]
    if tokenizer.chat_template:
        encoded = tokenizer.apply_chat_template(plain, add_generation_prompt=True, return_dict=True)
        return list(encoded["input_ids"])
    eos = tokenizer.eos_token or ""
    text = "".join(m["content"] + eos for m in plain)
    return tokenizer.encode(text, add_special_tokens=False)
