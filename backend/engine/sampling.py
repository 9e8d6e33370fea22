"""Choosing the next token from a row of logits, with the request's own parameters and seed."""

from __future__ import annotations

import torch

from collections.abc import Callable

from backend.engine.protocol import ResolvedSampling, TokenLogprob, TopLogprob


def sample(logits: torch.Tensor, sampling: ResolvedSampling, rng: torch.Generator) -> int:
    """Greedy at temperature 0; otherwise temperature, then top-k, then nucleus (top-p) sampling.
    `logits` are adjusted already (`adjust`, the output schema's mask)."""
    if sampling.greedy:
        return int(torch.argmax(logits))
    if sampling.top_k is not None and sampling.top_k < logits.shape[-1]:
        # Everything below the k-th largest logit is out (ties at the k-th stay in).
        logits = logits.masked_fill(logits < torch.topk(logits, sampling.top_k).values[-1], float("-inf"))
    probs = torch.softmax(logits.float() / sampling.temperature, dim=-1)
    if sampling.top_p < 1.0:
        # Stable: among equal probabilities the lowest id first, as argmax (greedy) picks.
        sorted_probs, order = torch.sort(probs, descending=True, stable=True)
        # Keep the smallest set of tokens whose mass reaches top_p (always at least one).
        outside = torch.cumsum(sorted_probs, dim=-1) - sorted_probs >= sampling.top_p
        outside[0] = False  # a top_p below float32's smallest value rounds to 0 and would drop all
        sorted_probs[outside] = 0.0
        probs = torch.zeros_like(probs).scatter_(0, order, sorted_probs)
    return int(torch.multinomial(probs, 1, generator=rng))


def adjust(logits: torch.Tensor, sampling: ResolvedSampling, generated: list[int]) -> torch.Tensor:
    """OpenAI's logit_bias, presence and frequency penalties (a copy; untouched when none is set)."""
    penalised = generated and (sampling.presence_penalty or sampling.frequency_penalty)
    if not (sampling.logit_bias or penalised):
        return logits
    logits = logits.float().clone()
    if sampling.logit_bias:
        ids = torch.tensor(list(sampling.logit_bias))
        logits[ids] += torch.tensor(list(sampling.logit_bias.values()))
    if penalised:
        counts = torch.bincount(torch.tensor(generated), minlength=logits.shape[-1])[:logits.shape[-1]]
        logits -= sampling.frequency_penalty * counts + sampling.presence_penalty * (counts > 0)
    return logits


def token_logprobs(logits: torch.Tensor, token_id: int, top: int,
                   text_of: Callable[[int], tuple[str, bytes]]) -> TokenLogprob:
    """The chosen token's log-probability and the `top` likeliest at its place, from the
    logits it was sampled from (before temperature: the model's own distribution)."""
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    best = torch.topk(logprobs, top) if top else None
    alternatives = () if best is None else tuple(
        TopLogprob(*text_of(int(i)), float(v)) for v, i in zip(best.values, best.indices) if v > float("-inf"))
    return TokenLogprob(*text_of(token_id), float(logprobs[token_id]), alternatives)
