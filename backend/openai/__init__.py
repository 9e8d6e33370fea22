"""The OpenAI-compatible API, as vLLM's entrypoints lay it out: request and response models
(protocol.py, responses_protocol.py) apart from the serving logic, one module per route family:
chat.py for /v1/chat/completions, responses.py for /v1/responses, completions.py for
/v1/completions. plan.py is the one engine path the chat-like APIs share (Anthropic's Messages,
backend/anthropic/, too): tools.py reads text and tool calls out of any reply, replies.py counts
its usage and writes OpenAI's chat and completions Server-Sent Events."""
