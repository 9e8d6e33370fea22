"""Qwen3: Llama's layers with queries and keys normalised per head (q_norm, k_norm) before rotary."""

from backend.engine.families import Family

FAMILY = Family("qwen3", ("qwen3",), qk_norm=True)
