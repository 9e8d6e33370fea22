"""The OpenAI-compatible API, as vLLM's entrypoints lay it out: request and response models
(protocol.py) apart from the serving logic, one module per route family: chat.py for
/v1/chat/completions (with tools.py for tool calls), completions.py for /v1/completions;
replies.py holds what both read and write (usage, Server-Sent Events)."""
