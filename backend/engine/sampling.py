"""Choosing the next token from a row of logits, with the request's own parameters and seed."""

from __future__ import annotations

import torch

from backend.protocol import ResolvedSampling


def sample(logits: torch.Tensor, sampling: ResolvedSampling, rng: torch.Generator,
           generated: list[int] = ()) -> int:
    """Greedy at temperature 0; otherwise temperature, then nucleus (top-p) sampling.
    Logit bias and the penalties on the tokens already `generated` apply first, to both."""
    logits = adjust(logits, sampling, generated)
    if sampling.greedy:
        return int(torch.argmax(logits))
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
