"""Gemma 3 (text): a norm before and after both attention and the MLP, norms that scale by
1 + weight, queries and keys normalised per head, a GeLU-gated MLP, and sliding-window layers
with a rotary base of their own (the model's rotary module keeps one table per layer type), and
embeddings scaled by the square root of the width. The tied output layer over 262k tokens is the
output layer's business (`quant.Bf16Linear`)."""

from backend.engine.families import Family

FAMILY = Family(
    "gemma3", ("gemma3_text",),
    attention_out_norm="post_attention_layernorm",
    mlp_norm="pre_feedforward_layernorm",
    mlp_out_norm="post_feedforward_layernorm",
    norm_offset=1.0,
    qk_norm=True,
    scaled_embedding=True,
    activation_key="hidden_activation",
    unsupported=(
        ("it caps its logits (final_logit_softcapping)", lambda c: bool(c.get("final_logit_softcapping"))),
        ("it caps its attention scores (attn_logit_softcapping)", lambda c: bool(c.get("attn_logit_softcapping"))),
        ("its attention is bidirectional", lambda c: bool(c.get("use_bidirectional_attention"))),
    ),
)
