"""SparseGPT: prune a Linear weight column by column, updating the remaining weights to compensate.

After Frantar and Alistarh, "SparseGPT: Massive Language Models Can Be Accurately Pruned in One-Shot"
(2023). With the inputs' Hessian H = 2 X X^T (the same one GPTQ uses, and prepared by the same
``prepare_hessian``), removing weight w_ij costs w_ij^2 / [H^-1]_jj and its error is spread over the
later columns through the inverse Hessian's Cholesky factor, exactly like a rounding error in GPTQ.
The mask is chosen per block of columns (adaptive: the lowest-cost weights of the block, over all
rows), or per run of M columns for N:M patterns. Weights that are already zero stay pruned.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..checkpoint import check_finite
from ..quant.gptq import InverseHessian, prepare_hessian
from .unstructured import LayerSparsity


@dataclass
class SparseResult:
    """A pruned weight: ``weight`` [N, K] with exact zeros where ``mask`` [N, K] is False, and the
    reconstruction loss (half the sum of w^2 / [H^-1]_jj over the pruned weights, SparseGPT's objective)."""

    weight: torch.Tensor
    mask: torch.Tensor
    loss: float


def sparsegpt_prune(weight: torch.Tensor, prep: InverseHessian, spec: LayerSparsity, *, block_size: int = 128) -> SparseResult:
    """Prune ``weight`` [N, K] to ``spec`` given the factored inverse Hessian of its inputs (no act-order)."""
    w = weight.detach().to(torch.float32).contiguous().clone(memory_format=torch.contiguous_format)
    n, k = w.shape
    was_zero = w == 0
    hinv = prep.hinv
    prune_n, m = (spec.pattern[1] - spec.pattern[0], spec.pattern[1]) if spec.pattern else (0, 0)
    pruned = torch.zeros(n, k, dtype=torch.bool, device=w.device)
    losses = torch.zeros(n, device=w.device)
    for i1 in range(0, k, block_size):
        i2 = min(i1 + block_size, k)
        w1 = w[:, i1:i2].clone()
        err1 = torch.zeros_like(w1)
        hinv1 = hinv[i1:i2, i1:i2]
        diag = torch.diagonal(hinv1)
        mask1 = torch.zeros(w1.shape, dtype=torch.bool, device=w.device)  # True: pruned
        if prune_n == 0:
            # the block's cheapest weights over all rows (the saliency of each weight as it stands now)
            cost = w1.pow(2) / diag.pow(2).unsqueeze(0)
            cost = torch.where(was_zero[:, i1:i2], torch.full_like(cost, -1.0), cost)
            count = int(round(cost.numel() * spec.sparsity))
            if count:
                mask1.view(-1)[torch.topk(cost.reshape(-1), count, largest=False).indices] = True
        for i in range(i2 - i1):
            if prune_n and i % m == 0:
                cost = w1[:, i:i + m].pow(2) / diag[i:i + m].pow(2).unsqueeze(0)
                cost = torch.where(was_zero[:, i1 + i:i1 + i + m], torch.full_like(cost, -1.0), cost)
                mask1.scatter_(1, i + torch.topk(cost, prune_n, dim=1, largest=False).indices, True)
            col = w1[:, i]
            q = torch.where(mask1[:, i], torch.zeros_like(col), col)
            e = (col - q) / diag[i]
            losses += (col - q).pow(2) / diag[i].pow(2)
            w1[:, i:].addr_(e, hinv1[i, i:], alpha=-1)
            w1[:, i] = q
            err1[:, i] = e
        w[:, i1:i2] = w1
        pruned[:, i1:i2] = mask1
        # lazy update: the block's errors reach the later columns in one matrix product
        w[:, i2:].addmm_(err1, hinv[i1:i2, i2:], alpha=-1)
    w[pruned] = 0
    return SparseResult(w, ~pruned, float(losses.sum() / 2))


class SparseGPTMethod:
    """The calibration runner's method for SparseGPT: Hessian observers (GPTQ's), sparsegpt_prune as the solve."""

    def __init__(self, specs: dict[str, LayerSparsity], *, damp: float = 0.01, block_size: int = 128):
        self.specs = specs
        self.damp = damp
        self.block_size = block_size

    def wants(self, name: str) -> bool:
        return name in self.specs

    def observer(self, in_features: int, device: torch.device):
        from ..quant.gptq_model import HessianObserver

        return HessianObserver(in_features, device)

    def solve(self, name: str, weight: torch.Tensor, observer):
        check_finite(f"{name}.weight", weight)
        if observer.prepared is None:
            observer.prepared = prepare_hessian(observer.hessian, damp=self.damp, act_order=False, name=name)
        result = sparsegpt_prune(weight, observer.prepared, self.specs[name], block_size=self.block_size)
        return result.weight.to(weight.dtype), result.mask
