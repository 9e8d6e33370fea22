"""Anthropic's Messages API (`POST /v1/messages`, `POST /v1/messages/count_tokens`), laid out as
backend/openai/ is: request and response models in protocol.py, the serving logic in
messages.py, over the same engine path as the OpenAI routes (backend/openai/plan.py)."""
