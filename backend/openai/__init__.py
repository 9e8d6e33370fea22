"""The OpenAI-compatible API: request and response models (protocol.py) apart from the
serving logic that turns the engine's reply pieces into them (serving.py)."""
