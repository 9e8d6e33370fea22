"""The Llama architecture (the default SmolLM2 among it) as plain torch modules: the
weights the slot path (`slots.forward`) runs, without transformers' modelling code.

Why not transformers' `LlamaForCausalLM`: the engine never calls its forward (the slot
path is written out in `slots.py`), yet importing it cost every engine process about
1.3 s of its start (it pulls in torch._dynamo, torch.distributed and sympy): a tenth
of a restart (docs/BENCHMARKS.md, restart to first token). The module tree, parameter
names and `config` attributes are Hugging Face's, so a converted copy's state dict loads
as it was saved, `quant.quantize_model` and `slots` treat both alike, and a test checks
that both give the same logits.

Only what the slot path runs: default rotary embeddings, SiLU MLP. A model with other
rotary scaling (or any other architecture) loads through transformers as before.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import torch


def supports(config: dict) -> bool:
    """Whether a Hugging Face `config.json` (as a dict) describes a model this module runs."""
    # transformers 5 writes `rope_parameters`; older configs say `rope_scaling`.
    ropes = (config.get("rope_parameters") or {}, config.get("rope_scaling") or {})
    return (config.get("model_type") == "llama" and config.get("hidden_act") == "silu"
            and all(rope.get("rope_type", rope.get("type", "default")) == "default" for rope in ropes))


class Linear(torch.nn.Linear):
    """A linear layer whose weights the state dict fills: no random initialisation first."""

    def reset_parameters(self) -> None:
        pass


class Embedding(torch.nn.Embedding):
    def reset_parameters(self) -> None:
        pass


class RMSNorm(torch.nn.Module):
    def __init__(self, size: int, eps: float, dtype: torch.dtype):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.ones(size, dtype=dtype))
        self.variance_epsilon = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.rms_norm(x, x.shape[-1:], self.weight, self.variance_epsilon)


class RotaryEmbedding(torch.nn.Module):
    """cos and sin of each position's rotation, as `LlamaRotaryEmbedding` computes them
    (float32, then the input's dtype), so the same model gives the same logits either way."""

    def __init__(self, head_dim: int, theta: float):
        super().__init__()
        self.head_dim, self.theta = head_dim, theta

    def forward(self, x: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        inverse_frequencies = 1.0 / (self.theta ** (torch.arange(0, self.head_dim, 2, dtype=torch.float)
                                                    / self.head_dim))
        angles = positions[..., None].float() * inverse_frequencies
        angles = torch.cat((angles, angles), dim=-1)
        return angles.cos().to(x.dtype), angles.sin().to(x.dtype)


class Attention(torch.nn.Module):
    def __init__(self, config: SimpleNamespace):
        super().__init__()
        self.head_dim = config.head_dim
        self.scaling = config.head_dim ** -0.5
        bias = config.attention_bias
        self.q_proj = Linear(config.hidden_size, config.num_attention_heads * config.head_dim, bias=bias, dtype=config.dtype)
        self.k_proj = Linear(config.hidden_size, config.num_key_value_heads * config.head_dim, bias=bias, dtype=config.dtype)
        self.v_proj = Linear(config.hidden_size, config.num_key_value_heads * config.head_dim, bias=bias, dtype=config.dtype)
        self.o_proj = Linear(config.num_attention_heads * config.head_dim, config.hidden_size, bias=bias, dtype=config.dtype)


class MLP(torch.nn.Module):
    def __init__(self, config: SimpleNamespace):
        super().__init__()
        bias = config.mlp_bias
        self.gate_proj = Linear(config.hidden_size, config.intermediate_size, bias=bias, dtype=config.dtype)
        self.up_proj = Linear(config.hidden_size, config.intermediate_size, bias=bias, dtype=config.dtype)
        self.down_proj = Linear(config.intermediate_size, config.hidden_size, bias=bias, dtype=config.dtype)


class DecoderLayer(torch.nn.Module):
    def __init__(self, config: SimpleNamespace):
        super().__init__()
        self.self_attn = Attention(config)
        self.mlp = MLP(config)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, config.dtype)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, config.dtype)


class Decoder(torch.nn.Module):
    def __init__(self, config: SimpleNamespace):
        super().__init__()
        self.embed_tokens = Embedding(config.vocab_size, config.hidden_size, dtype=config.dtype)
        self.layers = torch.nn.ModuleList(DecoderLayer(config) for _ in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, config.dtype)
        self.rotary_emb = RotaryEmbedding(config.head_dim, config.rope_theta)


class LlamaForCausalLM(torch.nn.Module):
    """Named as transformers names it, so its state dict is the same."""

    def __init__(self, config: SimpleNamespace, generation_config: SimpleNamespace):
        super().__init__()
        self.config, self.generation_config = config, generation_config
        self.model = Decoder(config)
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


def empty_model(folder: Path, config: dict, dtype: torch.dtype) -> LlamaForCausalLM:
    """The model of `config` with uninitialised parameters (`torch.empty`: pages not touched
    until written), for a state dict loaded with `assign=True` to replace. Not on the meta
    device: its first op imports torch._dynamo, 0.8 s."""
    rope = config.get("rope_parameters") or {}
    settings = SimpleNamespace(**{
        **config,
        "head_dim": config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"],
        "num_key_value_heads": config.get("num_key_value_heads") or config["num_attention_heads"],
        "rope_theta": rope.get("rope_theta", config.get("rope_theta", 10000.0)),
        "attention_bias": config.get("attention_bias", False),
        "mlp_bias": config.get("mlp_bias", False),
        "tie_word_embeddings": config.get("tie_word_embeddings", False),
        "dtype": dtype,
    })
    generation_file = folder / "generation_config.json"
    generation = json.loads(generation_file.read_text()) if generation_file.is_file() else {}
    generation_config = SimpleNamespace(eos_token_id=generation.get("eos_token_id", config.get("eos_token_id")))
    return LlamaForCausalLM(settings, generation_config)
