"""Model families on the engine's shared transformer (`transformer.py`): each family is its differences.

The transformer runs Hugging Face's module tree (transformers' own model, or `modules.py`'s
lean copy of it) over the slot cache, the prefix cache and the compiled decode step. What a
family changes is said in one small file beside this one, as a `Family`: which norms sit where,
how they scale, the MLP's activation, whether queries and keys are normalised per head, and
which layers see only a sliding window. Biases, head sizes, attention scales and rotary
embeddings are read off the model's own modules, so they need no saying.

A model of no family here, or one using a feature the transformer does not run, goes through
transformers' own forward (`batch.py`): `why_not` names the reason, for the log and `/v1/models`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch.nn.functional as F

ACTIVATIONS: dict[str, Callable] = {
    "silu": F.silu,
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
}


@dataclass(frozen=True)
class Family:
    """What sets one family's decoder layers apart. Norm fields name the layer's module
    attributes (Hugging Face's names); None where the family has no such norm."""

    name: str
    model_types: tuple[str, ...]
    attention_norm: str = "input_layernorm"  # before attention
    attention_out_norm: str | None = None  # on attention's output, before the residual add
    mlp_norm: str = "post_attention_layernorm"  # before the MLP (Llama's name for it)
    mlp_out_norm: str | None = None  # on the MLP's output, before the residual add
    norm_offset: float = 0.0  # norms scale by (offset + weight): Gemma stores weight - 1
    qk_norm: bool = False  # queries and keys normalised per head (q_norm, k_norm) before rotary
    scaled_embedding: bool = False  # embeddings multiplied by the square root of the width (Gemma)
    activation_key: str = "hidden_act"  # the config key naming the MLP's gate activation
    # Every layer sees a sliding window (Mistral), rather than the layers `layer_types` names.
    window_everywhere: bool = False
    unsupported: tuple[tuple[str, Callable[[dict], bool]], ...] = field(default=())

    def activation(self, config: dict) -> str:
        return config.get(self.activation_key) or "silu"

    def window(self, config: dict, layer: int) -> int | None:
        """How many positions back layer `layer` attends (itself included), or None for all."""
        if self.window_everywhere:
            return config.get("sliding_window")
        types = config.get("layer_types")
        return config.get("sliding_window") if types and types[layer] == "sliding_attention" else None


def _registry() -> dict[str, Family]:
    from backend.engine.families import gemma3, llama, mistral, qwen2, qwen3

    return {model_type: module.FAMILY for module in (llama, mistral, qwen2, qwen3, gemma3)
            for model_type in module.FAMILY.model_types}


def why_not(config: dict) -> str | None:
    """None if the shared transformer runs this Hugging Face config (a dict); else why not, in a phrase."""
    model_type = config.get("model_type")
    family = _registry().get(model_type)
    if family is None:
        return f"the {model_type!r} architecture has no family file in backend/engine/families"
    if (activation := family.activation(config)) not in ACTIVATIONS:
        return f"its MLP activation {activation!r} is not one the transformer runs"
    for reason, applies in family.unsupported:
        if applies(config):
            return reason
    return None


def family_of(config: dict) -> Family | None:
    """The config's family, if the shared transformer runs it."""
    return None if why_not(config) else _registry()[config["model_type"]]

