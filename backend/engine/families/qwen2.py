"""Qwen2 and Qwen2.5: Llama's layers with biases on the q, k and v projections (read off the
weights: the fused projection carries them), and sliding windows on the layers `layer_types` names."""

from backend.engine.families import Family

FAMILY = Family("qwen2", ("qwen2",))
