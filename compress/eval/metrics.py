"""Metrics as pure functions over tensors: perplexity, KL divergence, cosine, retrieval, accuracy."""

from __future__ import annotations

import math

import torch


def perplexity(nll_sum: float, count: int) -> float:
    """exp(mean negative log-likelihood in nats)."""
    return math.exp(nll_sum / max(count, 1))


def kl_divergence(ref_logprobs: torch.Tensor, logprobs: torch.Tensor) -> float:
    """Mean over positions of KL(P_ref || P) = sum_v p_ref(v) (log p_ref(v) - log p(v)), in nats.

    Both arguments are log-probabilities [positions, classes] (log_softmax outputs).
    """
    ref = ref_logprobs.double()
    cur = logprobs.double()
    kl = (ref.exp() * (ref - cur)).sum(-1)
    return float(kl.clamp(min=0).mean()) if kl.numel() else float("nan")


def mean_cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean cosine similarity of matching rows of a and b [n, d]."""
    return float(torch.nn.functional.cosine_similarity(a.double(), b.double(), dim=-1).mean())


def top1(queries: torch.Tensor, docs: torch.Tensor) -> torch.Tensor:
    """Index of each query's most similar document by cosine similarity (int64 [n])."""
    q = torch.nn.functional.normalize(queries.double(), dim=-1)
    d = torch.nn.functional.normalize(docs.double(), dim=-1)
    return (q @ d.t()).argmax(-1)


def agreement(a: torch.Tensor, b: torch.Tensor) -> float:
    """Fraction of positions where two index tensors agree."""
    return float((a == b).double().mean()) if a.numel() else float("nan")
