"""Mistral: Llama's layers, where a configured `sliding_window` applies to every layer."""

from backend.engine.families import Family

FAMILY = Family("mistral", ("mistral",), window_everywhere=True)
