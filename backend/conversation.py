"""Keeping a long conversation inside the model's context: the engine does it (it counts the
prompt's tokens), in backend/engine/prompt.py."""

from backend.engine.prompt import fit_to_context  # noqa: F401
