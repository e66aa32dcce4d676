"""Wanda: prune the weights with the smallest |W_ij| x ||X_j||, per output row, with no weight update.

After Sun et al., "A Simple and Effective Pruning Approach for Large Language Models" (2023): the
score of weight (i, j) is its magnitude times the L2 norm of input channel j over the calibration
tokens, and weights are compared within each output row (or within each run of M inputs for N:M).
The statistics come from the shared calibration runner (compress/calibrate.py), one block at a time.
"""

from __future__ import annotations

import torch

from ..checkpoint import check_finite
from .unstructured import LayerSparsity, mask_for


class InputNormObserver:
    """Running sum of squares of each input channel over every token seen: ||X_j||^2, float32 [K]."""

    def __init__(self, in_features: int, device: torch.device):
        self.sumsq = torch.zeros(in_features, dtype=torch.float32, device=device)
        self.count = 0

    def add_batch(self, inputs: torch.Tensor) -> None:
        x = inputs.reshape(-1, inputs.shape[-1]).float()
        self.sumsq += x.pow(2).sum(0)
        self.count += x.shape[0]


def wanda_scores(weight: torch.Tensor, sumsq: torch.Tensor) -> torch.Tensor:
    """|W| [N, K] times the input channel norms sqrt(sumsq) [K], broadcast over rows."""
    return weight.abs().float() * sumsq.sqrt().unsqueeze(0)


def wanda_prune(weight: torch.Tensor, sumsq: torch.Tensor, spec: LayerSparsity) -> tuple[torch.Tensor, torch.Tensor]:
    """(pruned weight, keep mask) of ``weight`` [N, K] given the inputs' sums of squares [K]."""
    mask = mask_for(wanda_scores(weight, sumsq), spec, per_row=True, weight=weight)
    return weight * mask, mask


class WandaMethod:
    """The calibration runner's method for Wanda: input-norm observers, wanda_prune as the solve."""

    def __init__(self, specs: dict[str, LayerSparsity]):
        self.specs = specs  # layer name -> LayerSparsity

    def wants(self, name: str) -> bool:
        return name in self.specs

    def observer(self, in_features: int, device: torch.device) -> InputNormObserver:
        return InputNormObserver(in_features, device)

    def solve(self, name: str, weight: torch.Tensor, observer: InputNormObserver):
        check_finite(f"{name}.weight", weight)
        pruned, mask = wanda_prune(weight, observer.sumsq, self.specs[name])
        return pruned, mask
