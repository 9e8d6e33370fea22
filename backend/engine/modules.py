"""Every family's weights as plain torch modules (families/: Llama, Mistral, Qwen2, Qwen3,
Gemma 3), which a converted copy loads into: what the slot path (`slots.forward`) runs,
without transformers' modelling code.

Why not transformers' models: the engine never calls their forward (the slot path is written
out in `slots.py`), yet importing one pulls in torch._dynamo, torch.distributed and sympy: 1.3 s
of the default model's start, and 1.9 s of a sleeping Gemma's wake (docs/BENCHMARKS.md). The
module tree, parameter names and `config` attributes are Hugging Face's, so a converted copy's
state dict loads as it was saved, `quant.quantize_model` and `slots` treat both alike, and a
test checks that both give the same logits for every family (tests/test_families.py).

What a family changes is read off its Family (which norms a layer has, per-head query and key
norms, scaled embeddings); which projections carry a bias is read off the saved weights
(Qwen2's q, k and v do, its output projection does not). Only default rotary embeddings: a
model with rotary scaling loads through transformers, which implements every variant.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import torch

from backend.engine import families


def supports(config: dict) -> bool:
    """Whether a Hugging Face `config.json` (as a dict) describes a model this module builds."""
    ropes = [*_ropes(config).values(), config.get("rope_scaling") or {}]
    return families.why_not(config) is None and all(
        rope.get("rope_type", rope.get("type", "default")) == "default" for rope in ropes)


def _ropes(config: dict) -> dict[str | None, dict]:
    """Rotary settings by layer type (Gemma 3's rope_parameters has one per type), or one for all
    layers under None. transformers 5 writes `rope_parameters`; older configs say `rope_scaling`."""
    parameters = config.get("rope_parameters") or {}
    if parameters and all(isinstance(value, dict) for value in parameters.values()):
        return parameters
    scaling = config.get("rope_scaling") or {}
    return {None: {"rope_theta": config.get("rope_theta", 10000.0), **scaling, **parameters}}


class Linear(torch.nn.Linear):
    """A linear layer whose weights the state dict fills: no random initialisation first."""

    def reset_parameters(self) -> None:
        pass


class Embedding(torch.nn.Embedding):
    """The token embedding; `scale` multiplies what it looks up (Gemma's square root of the
    width), in the weights' dtype, as transformers' scaled embedding does."""

    def __init__(self, num_embeddings: int, embedding_dim: int, dtype: torch.dtype, scale: float | None = None):
        super().__init__(num_embeddings, embedding_dim, dtype=dtype)
        if scale is not None:  # read by quant.Q8Embedding.of too, which replaces this module
            self.register_buffer("embed_scale", torch.tensor(scale), persistent=False)

    def reset_parameters(self) -> None:
        pass

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        found = super().forward(ids)
        scale = getattr(self, "embed_scale", None)
        return found if scale is None else found * scale.to(found.dtype)


class RMSNorm(torch.nn.Module):
    """x / rms(x) * (offset + weight); Gemma stores its norms' weights less one (offset 1)."""

    def __init__(self, size: int, eps: float, dtype: torch.dtype, offset: float = 0.0):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.empty(size, dtype=dtype))
        self.variance_epsilon, self.offset = eps, offset

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.rms_norm(x, x.shape[-1:], self.weight + self.offset, self.variance_epsilon)


class RotaryEmbedding(torch.nn.Module):
    """cos and sin of each position's rotation, as transformers' default rotary embedding computes
    them (float32, then the input's dtype), so the same model gives the same logits either way."""

    def __init__(self, head_dim: int, theta: float):
        super().__init__()
        self.head_dim, self.theta = head_dim, theta

    def forward(self, x: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return _rotation(x, positions, self.head_dim, self.theta)


class RotaryEmbeddingPerLayerType(torch.nn.Module):
    """A rotary base per layer type (Gemma 3's sliding layers have their own). `forward` takes the
    layer type, as transformers' Gemma 3 rotary module does: the slot path keeps a table per type."""

    def __init__(self, head_dim: int, thetas: dict[str, float]):
        super().__init__()
        self.head_dim, self.thetas = head_dim, thetas

    def forward(self, x: torch.Tensor, positions: torch.Tensor, layer_type: str) -> tuple[torch.Tensor, torch.Tensor]:
        return _rotation(x, positions, self.head_dim, self.thetas[layer_type])


def _rotation(x: torch.Tensor, positions: torch.Tensor, head_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    inverse_frequencies = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float) / head_dim))
    angles = positions[..., None].float() * inverse_frequencies
    angles = torch.cat((angles, angles), dim=-1)
    return angles.cos().to(x.dtype), angles.sin().to(x.dtype)


class Attention(torch.nn.Module):
    def __init__(self, config: SimpleNamespace, family: families.Family, biased: set[str]):
        super().__init__()
        self.head_dim = config.head_dim
        # Gemma scales scores by its own query_pre_attn_scalar; every other family by the head size.
        self.scaling = (getattr(config, "query_pre_attn_scalar", None) or config.head_dim) ** -0.5
        queries, keys = config.num_attention_heads * config.head_dim, config.num_key_value_heads * config.head_dim
        for name, inputs, outputs in (("q_proj", config.hidden_size, queries), ("k_proj", config.hidden_size, keys),
                                      ("v_proj", config.hidden_size, keys), ("o_proj", queries, config.hidden_size)):
            setattr(self, name, Linear(inputs, outputs, bias=name in biased, dtype=config.dtype))
        if family.qk_norm:
            self.q_norm = RMSNorm(config.head_dim, config.rms_norm_eps, config.dtype, family.norm_offset)
            self.k_norm = RMSNorm(config.head_dim, config.rms_norm_eps, config.dtype, family.norm_offset)


class MLP(torch.nn.Module):
    def __init__(self, config: SimpleNamespace, biased: set[str]):
        super().__init__()
        for name, inputs, outputs in (("gate_proj", config.hidden_size, config.intermediate_size),
                                      ("up_proj", config.hidden_size, config.intermediate_size),
                                      ("down_proj", config.intermediate_size, config.hidden_size)):
            setattr(self, name, Linear(inputs, outputs, bias=name in biased, dtype=config.dtype))


class DecoderLayer(torch.nn.Module):
    def __init__(self, config: SimpleNamespace, family: families.Family, biased: set[str]):
        super().__init__()
        self.self_attn = Attention(config, family, biased)
        self.mlp = MLP(config, biased)
        for name in {family.attention_norm, family.attention_out_norm, family.mlp_norm, family.mlp_out_norm} - {None}:
            setattr(self, name, RMSNorm(config.hidden_size, config.rms_norm_eps, config.dtype, family.norm_offset))


class Decoder(torch.nn.Module):
    def __init__(self, config: SimpleNamespace, family: families.Family, biased: list[set[str]]):
        super().__init__()
        scale = config.hidden_size ** 0.5 if family.scaled_embedding else None
        self.embed_tokens = Embedding(config.vocab_size, config.hidden_size, config.dtype, scale)
        self.layers = torch.nn.ModuleList(DecoderLayer(config, family, biased[i]) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, config.dtype, family.norm_offset)
        ropes = _ropes(vars(config))
        if None in ropes:
            self.rotary_emb = RotaryEmbedding(config.head_dim, ropes[None]["rope_theta"])
        else:
            self.rotary_emb = RotaryEmbeddingPerLayerType(
                config.head_dim, {kind: rope["rope_theta"] for kind, rope in ropes.items()})


class CausalLM(torch.nn.Module):
    """Named as transformers names its models' parts, so its state dict is the same."""

    def __init__(self, config: SimpleNamespace, generation_config: SimpleNamespace, biased: list[set[str]]):
        super().__init__()
        self.config, self.generation_config = config, generation_config
        self.model = Decoder(config, families.family_of(vars(config)), biased)
        self.lm_head = Linear(config.hidden_size, config.vocab_size, bias=False, dtype=config.dtype)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def get_input_embeddings(self) -> torch.nn.Module:  # an Embedding, or quant.Q8Embedding
        return self.model.embed_tokens

    def set_input_embeddings(self, embedding: torch.nn.Module) -> None:
        self.model.embed_tokens = embedding

    def get_output_embeddings(self) -> torch.nn.Module:
        return self.lm_head

    def set_output_embeddings(self, head: torch.nn.Module) -> None:
        self.lm_head = head


def read_config(folder: Path) -> dict:
    return json.loads((folder / "config.json").read_text())


def empty_model(folder: Path, config: dict, dtype: torch.dtype, weight_names: list[str]) -> CausalLM:
    """The model of `config` with uninitialised parameters (`torch.empty`: pages not touched
    until written), for a state dict with `weight_names` loaded with `assign=True` to replace.
    Not on the meta device: its first op imports torch._dynamo, 0.8 s."""
    settings = SimpleNamespace(**{
        **config,
        "head_dim": config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"],
        "num_key_value_heads": config.get("num_key_value_heads") or config["num_attention_heads"],
        "tie_word_embeddings": config.get("tie_word_embeddings", False),
        "dtype": dtype,
    })
    # "model.layers.3.self_attn.q_proj.bias": layer 3's q_proj has a bias.
    biased = [set() for _ in range(settings.num_hidden_layers)]
    for name in weight_names:
        parts = name.split(".")
        if parts[-1] == "bias" and parts[:2] == ["model", "layers"]:
            biased[int(parts[2])].add(parts[-2])
    generation_file = folder / "generation_config.json"
    generation = json.loads(generation_file.read_text()) if generation_file.is_file() else {}
    generation_config = SimpleNamespace(eos_token_id=generation.get("eos_token_id", config.get("eos_token_id")))
    return CausalLM(settings, generation_config, biased)
