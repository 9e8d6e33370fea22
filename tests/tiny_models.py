"""Tiny, randomly initialised causal LMs that the tests build themselves (seeded).

A real tokenizer (byte-level BPE, trained here on a few sentences with
non-ASCII text) and real transformers architectures, small enough to load in
well under a second: one Llama with a ChatML chat template, one GPT-2 without
a template (exercising the fallback prompt format), and a slower Llama whose long
prompts take seconds to read.
"""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

CORPUS = [
    "Hello there! How are you today? I am fine, thank you.",
    "Once upon a time a small robot learned to tell stories.",
    "Crème brûlée, naïve café, jalapeño, Straße, smörgåsbord.",
    "日本語のテキスト、中文文本, 한국어 텍스트, Ελληνικά, русский текст.",
    "Emoji too: 🙂 🚀 🎉 and symbols like € £ ¥ ©.",
]
CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def build_tokenizer(chat_template: str | None) -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(CORPUS * 5, trainer)
    eos = "<|im_end|>" if chat_template else "<|endoftext|>"
    wrapped = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=eos, bos_token=eos)
    wrapped.chat_template = chat_template
    return wrapped


def build_tiny_chat_model(folder: Path) -> Path:
    """A 2-layer Llama with a chat template and a 4096-token context (long replies to cancel)."""
    return _chat_llama(folder, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096)


def build_slow_chat_model(folder: Path) -> Path:
    """A wider, 8-layer Llama (134 MB) with an 8192-token context: reading a 7700-token
    prompt in one forward pass takes 10-15 s on one core, for the wedged-loop test."""
    return _chat_llama(folder, hidden_size=512, intermediate_size=2048, num_hidden_layers=8,
                       num_attention_heads=8, num_key_value_heads=8, max_position_embeddings=8192)


def build_plain_llama(folder: Path) -> Path:
    """The tiny chat model's shape without a chat template: DialoGPT's prompt format on the slot path."""
    return _chat_llama(folder, chat_template=None, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096)


def _chat_llama(folder: Path, chat_template: str | None = CHATML, **shape) -> Path:
    torch.manual_seed(0)
    tokenizer = build_tokenizer(chat_template)
    config = LlamaConfig(vocab_size=len(tokenizer), eos_token_id=tokenizer.eos_token_id,
                         bos_token_id=tokenizer.bos_token_id, **shape)
    save(LlamaForCausalLM(config), tokenizer, folder)
    return folder


def build_broken_model(folder: Path) -> Path:
    """The tiny chat model with NaN output weights: sampling from it raises inside generation."""
    build_tiny_chat_model(folder)
    model = LlamaForCausalLM.from_pretrained(folder)
    with torch.no_grad():
        model.get_output_embeddings().weight.fill_(float("nan"))
    model.save_pretrained(folder)
    return folder


def build_tiny_gpt2(folder: Path) -> Path:
    """A 2-layer GPT-2 without a chat template, DialoGPT-style."""
    torch.manual_seed(0)
    tokenizer = build_tokenizer(None)
    config = GPT2Config(
        vocab_size=len(tokenizer), n_embd=64, n_layer=2, n_head=4, n_positions=256,
        eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.bos_token_id,
    )
    save(GPT2LMHeadModel(config), tokenizer, folder)
    return folder


def save(model, tokenizer, folder: Path) -> None:
    # A random model often ends its reply at once; without a logit for EOS its greedy
    # replies run to max_new_tokens, so tests get long streams they can predict.
    with torch.no_grad():
        model.get_output_embeddings().weight[tokenizer.eos_token_id] = 0.0
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)


def build_tiny_family(folder: Path, family: str) -> Path:
    """A 4-layer model of `family` (qwen2, qwen3, gemma3, mistral) with a chat template, its norms'
    weights drawn at random too (they start as ones or zeros, which would hide a misplaced norm).
    Gemma 3's and Mistral's sliding windows are 8 positions, so that prompts outgrow them."""
    from transformers import (Gemma3ForCausalLM, Gemma3TextConfig, MistralConfig, MistralForCausalLM, Qwen2Config,
                              Qwen2ForCausalLM, Qwen3Config, Qwen3ForCausalLM)

    torch.manual_seed(1)
    tokenizer = build_tokenizer(CHATML)
    shape = dict(vocab_size=len(tokenizer), eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.bos_token_id,
                 hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                 num_key_value_heads=2, max_position_embeddings=4096)
    if family == "qwen2":  # biases on q, k and v
        model = Qwen2ForCausalLM(Qwen2Config(**shape))
    elif family == "qwen3":  # per-head q and k norms; heads wider than hidden_size / heads
        model = Qwen3ForCausalLM(Qwen3Config(**shape, head_dim=32))
    elif family == "mistral":
        model = MistralForCausalLM(MistralConfig(**shape, sliding_window=8))
    elif family == "gemma3":
        kinds = ["sliding_attention", "sliding_attention", "full_attention", "sliding_attention"]
        model = Gemma3ForCausalLM(Gemma3TextConfig(
            **shape | {"num_key_value_heads": 1}, head_dim=32, query_pre_attn_scalar=24, sliding_window=8,
            layer_types=kinds, tie_word_embeddings=True))
    else:
        raise ValueError(family)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "norm" in name:
                parameter.normal_(0.0 if family == "gemma3" else 1.0, 0.3)
    save(model, tokenizer, folder)
    return folder
