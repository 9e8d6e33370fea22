"""Llama (SmolLM2, Llama 2 and 3.x): the shared transformer as it is, with a SiLU-gated MLP.
Rotary scaling (Llama 3's among it) is the model's own rotary module's business."""

from backend.engine.families import Family

FAMILY = Family("llama", ("llama",))
