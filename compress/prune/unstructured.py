"""Unstructured and N:M sparsity masks, and the configuration of a pruning run.

A mask is a bool tensor shaped like the weight [N, K] (out, in): True keeps a weight, False prunes it.
Every method reduces to a score per weight (magnitude |W|, Wanda |W| x ||X_j||, SparseGPT's
w^2 / [H^-1]_jj) and one of three selection rules:

- per layer: the lowest-scoring ``sparsity`` fraction of the whole matrix is pruned;
- per row: the same fraction of each output row (Wanda's comparison group, which keeps every output
  neuron equally dense);
- N:M: in every run of M consecutive input weights of a row, the N highest-scoring are kept (2:4 and
  4:8 are what sparse tensor cores accelerate); the input width must divide by M.

Weights that are already exactly zero are treated as pruned first, so pruning a pruned model again
(iterative rounds) never brings a pruned weight back.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import ClassVar

import torch

from ..config import JSONConfig, _check_regexes
from ..errors import CompressError

METHODS = ("magnitude", "wanda", "sparsegpt")
SCOPES = ("layer", "global")
SCHEDULES = ("oneshot", "cubic", "iterative")


@dataclass(frozen=True)
class LayerSparsity:
    """How one layer is pruned: a fraction of its weights, or an N:M pattern (keep n of every m)."""

    sparsity: float
    pattern: tuple[int, int] | None = None

    @property
    def label(self) -> str:
        return f"{self.pattern[0]}:{self.pattern[1]}" if self.pattern else f"{self.sparsity:.0%}"


def parse_pattern(text: str | None) -> tuple[int, int] | None:
    """'2:4' -> (2, 4): keep 2 of every 4 consecutive input weights. None stays None."""
    if text is None or text == "":
        return None
    m = re.fullmatch(r"\s*(\d+)\s*:\s*(\d+)\s*", str(text))
    if not m:
        raise CompressError(f"pattern '{text}' must look like N:M, for example 2:4 or 4:8")
    n, mm = int(m.group(1)), int(m.group(2))
    if not 0 < n < mm:
        raise CompressError(f"pattern {text} must keep between 1 and M-1 of every M weights (for example 2:4)")
    return n, mm


def check_sparsity(value, option: str = "--sparsity") -> float:
    """A sparsity in [0, 1), or a CompressError naming ``option``."""
    try:
        value = float(value)
    except (TypeError, ValueError):
        raise CompressError(f"{option} must be a number in [0, 1), got {value!r}") from None
    if not 0 <= value < 1 or math.isnan(value):
        raise CompressError(f"{option} {value:g} is outside [0, 1); give the fraction of weights to remove, for example 0.5")
    return value


@dataclass
class PruneConfig(JSONConfig):
    """An unstructured (or N:M) pruning run.

    Args:
        method: magnitude (|W|, data-free), wanda (|W| times the input channel's activation norm,
            per output row) or sparsegpt (Hessian-based, with weight updates that compensate each pruned
            weight, as GPTQ does for rounding).
        sparsity: fraction of each target layer's weights removed, in [0, 1). With ``pattern`` it
            must be 1 - N/M (or left at None).
        pattern: 'N:M' semi-structured sparsity (keep N of every M consecutive input weights), or None.
        scope: 'layer' (every layer to the same sparsity) or 'global' (one magnitude threshold over all
            target layers, so layers end at different sparsities); global works with magnitude only.
        skip: regular expressions (re.search on the module's dotted name) of layers left dense. Only
            Linear layers inside the repeated blocks are candidates.
        overrides: regular expression -> {"sparsity": s} or {"pattern": "2:4"} for matching layers;
            the first matching pattern wins.
        blocks: dotted name of the repeated block list, when structure discovery picks the wrong one.
        calib, nsamples, seqlen, calib_batch_size, seed, text_field: calibration data (wanda,
            sparsegpt), as for GPTQ.
        damp: SparseGPT's Hessian damping, a fraction of the mean diagonal.
        block_size: SparseGPT's columns per lazy-update block (the mask is chosen per block).
        storage: 'sparse' (bitmask plus the nonzero values: the file shrinks; compress.load reads it)
            or 'dense' (ordinary tensors with zeros, loadable by stock transformers).
    """

    method: str = "magnitude"
    sparsity: float | None = None
    pattern: str | None = None
    scope: str = "layer"
    skip: list[str] = field(default_factory=list)
    overrides: dict[str, dict] = field(default_factory=dict)
    blocks: str | None = None
    calib: str = "builtin"
    nsamples: int = 128
    seqlen: int | None = None
    calib_batch_size: int = 8
    seed: int = 0
    text_field: str = "text"
    damp: float = 0.01
    block_size: int = 128
    storage: str = "sparse"

    calibrated: ClassVar[tuple[str, ...]] = ("wanda", "sparsegpt")

    def __post_init__(self):
        super().__post_init__()
        if self.method not in METHODS:
            raise CompressError(f"unknown pruning method '{self.method}'; choose one of {', '.join(METHODS)}")
        if self.scope not in SCOPES:
            raise CompressError(f"--scope {self.scope} is not one of {', '.join(SCOPES)}")
        if self.storage not in ("sparse", "dense"):
            raise CompressError(f"--storage {self.storage} is not one of sparse, dense")
        pattern = parse_pattern(self.pattern)
        if self.sparsity is not None:
            self.sparsity = check_sparsity(self.sparsity)
        if pattern is not None and self.sparsity is not None and abs(self.sparsity - (1 - pattern[0] / pattern[1])) > 1e-9:
            raise CompressError(f"--pattern {self.pattern} removes {1 - pattern[0] / pattern[1]:g} of the weights, "
                                f"not --sparsity {self.sparsity:g}; drop --sparsity")
        if self.scope == "global" and (self.method != "magnitude" or pattern is not None or self.overrides):
            raise CompressError("--scope global ranks all layers by one magnitude threshold: it works with "
                                "--method magnitude only, without --pattern or --override")
        _check_regexes(self.skip, "--skip")
        _check_regexes(self.overrides, "--override")
        for regex, values in self.overrides.items():
            extra = set(values) - {"sparsity", "pattern"}
            if extra or not values:
                raise CompressError(f"override '{regex}' must set sparsity:S or pattern:N:M")
            if "pattern" in values:
                parse_pattern(values["pattern"])
            if "sparsity" in values:
                values["sparsity"] = check_sparsity(values["sparsity"], f"--override {regex}")
        if self.nsamples < 1:
            raise CompressError(f"--nsamples must be at least 1, got {self.nsamples}")
        if self.seqlen is not None and self.seqlen < 2:
            raise CompressError(f"--seqlen must be at least 2 tokens, got {self.seqlen}")
        if not 0 < self.damp <= 1:
            raise CompressError(f"--damp {self.damp} must lie in (0, 1]; 0.01 is usual")
        if self.block_size < 1 or self.calib_batch_size < 1:
            raise CompressError("the SparseGPT block size and calibration batch size must be at least 1")

    @property
    def target(self) -> LayerSparsity:
        """The default layer sparsity (0.5 when neither --sparsity nor --pattern is given)."""
        pattern = parse_pattern(self.pattern)
        if pattern is not None:
            return LayerSparsity(1 - pattern[0] / pattern[1], pattern)
        return LayerSparsity(0.5 if self.sparsity is None else self.sparsity)

    def sparsity_for(self, name: str) -> LayerSparsity | None:
        """How layer ``name`` is pruned, or None when ``skip`` leaves it dense."""
        if any(re.search(p, name) for p in self.skip):
            return None
        for regex, values in self.overrides.items():
            if re.search(regex, name):
                if "pattern" in values:
                    n, m = parse_pattern(values["pattern"])
                    return LayerSparsity(1 - n / m, (n, m))
                return LayerSparsity(values["sparsity"])
        return self.target

    @property
    def label(self) -> str:
        return f"{self.method}-{self.target.label.replace(':', 'of').replace('%', 'pct')}"


def parse_prune_overrides(items: list[str]) -> dict[str, dict]:
    """'REGEX=sparsity:0.3' or 'REGEX=pattern:2:4' -> {'REGEX': {...}} (the CLI's --override)."""
    out = {}
    for item in items:
        regex, sep, body = item.rpartition("=")
        key, colon, value = body.partition(":")
        if not sep or not regex or not colon or key.strip() not in ("sparsity", "pattern"):
            raise CompressError(f"--override '{item}' must look like REGEX=sparsity:0.3 or REGEX=pattern:2:4")
        out[regex] = {key.strip(): value.strip()}
    return out


def check_pattern_fits(name: str, in_features: int, spec: LayerSparsity) -> None:
    """CompressError when an N:M pattern's M does not divide the layer's input width."""
    if spec.pattern is not None and in_features % spec.pattern[1]:
        raise CompressError(f"pattern {spec.label} needs an input width divisible by {spec.pattern[1]}, but layer {name} "
                            f"has {in_features}; skip it with --skip or pick another pattern")


# --------------------------------------------------------------------------------------------------
# Masks from scores


def _pruned_first(scores: torch.Tensor, weight: torch.Tensor | None) -> torch.Tensor:
    """Scores in float32 with already-zero weights ranked below everything else."""
    s = scores.detach().float()
    if weight is not None:
        s = torch.where(weight == 0, torch.full_like(s, -1.0), s)
    return s


def topk_mask(scores: torch.Tensor, sparsity: float, *, per_row: bool = False, weight: torch.Tensor | None = None) -> torch.Tensor:
    """Keep the highest scores of ``scores`` [N, K], pruning round(sparsity x count) of them.

    Args:
        per_row: count and prune within each output row (Wanda) instead of over the whole matrix.
        weight: the weight itself; its exact zeros are pruned before anything else.
    Returns a bool mask [N, K], True where the weight is kept.
    """
    s = _pruned_first(scores, weight).contiguous()
    mask = torch.ones(s.shape, dtype=torch.bool, device=s.device)
    if per_row:
        k = int(round(s.shape[1] * sparsity))
        if k:
            idx = torch.topk(s, k, dim=1, largest=False).indices
            mask.scatter_(1, idx, False)
        return mask
    k = int(round(s.numel() * sparsity))
    if k:
        idx = torch.topk(s.reshape(-1), k, largest=False).indices
        mask.view(-1)[idx] = False
    return mask


def nm_mask(scores: torch.Tensor, n: int, m: int, weight: torch.Tensor | None = None) -> torch.Tensor:
    """Keep the ``n`` highest scores in every run of ``m`` consecutive columns of ``scores`` [N, K]."""
    rows, cols = scores.shape
    if cols % m:
        raise CompressError(f"pattern {n}:{m} needs an input width divisible by {m}, got {cols}")
    s = _pruned_first(scores, weight).reshape(rows, cols // m, m)
    idx = torch.topk(s, m - n, dim=2, largest=False).indices
    mask = torch.ones(s.shape, dtype=torch.bool, device=s.device)
    mask.scatter_(2, idx, False)
    return mask.reshape(rows, cols)


def mask_for(scores: torch.Tensor, spec: LayerSparsity, *, per_row: bool = False,
             weight: torch.Tensor | None = None) -> torch.Tensor:
    """The mask a LayerSparsity asks for: N:M when it has a pattern, else top-k (per row or per layer)."""
    if spec.pattern is not None:
        return nm_mask(scores, *spec.pattern, weight=weight)
    return topk_mask(scores, spec.sparsity, per_row=per_row, weight=weight)


def magnitude_mask(weight: torch.Tensor, spec: LayerSparsity) -> torch.Tensor:
    """Prune the smallest |W| of ``weight`` [N, K] (over the whole layer, or N:M)."""
    return mask_for(weight.abs(), spec, weight=weight)


def global_threshold(magnitudes: list[torch.Tensor], sparsity: float) -> float:
    """The |W| below which ``sparsity`` of all the given weights lie (one threshold for every layer).

    The k-th smallest magnitude over the concatenation; ties at the threshold are pruned too, so the
    achieved sparsity can exceed the target by the number of tied weights.
    """
    total = sum(m.numel() for m in magnitudes)
    k = int(round(total * sparsity))
    if k == 0:
        return -1.0
    flat = torch.cat([m.detach().reshape(-1).float() for m in magnitudes])
    return float(torch.kthvalue(flat, k).values)


def threshold_mask(weight: torch.Tensor, threshold: float) -> torch.Tensor:
    """Keep the weights whose magnitude is above ``threshold`` (the global-magnitude rule)."""
    return weight.abs().float() > threshold


def cubic_sparsity(step: int, total: int, final: float, initial: float = 0.0) -> float:
    """Zhu and Gupta's gradual schedule: s_t = s_f + (s_i - s_f)(1 - t/T)^3, clamped to [0, T]."""
    t = min(max(step, 0), max(total, 1))
    return final + (initial - final) * (1 - t / max(total, 1)) ** 3


def sparsity_of(weight: torch.Tensor) -> float:
    """Fraction of exact zeros in a tensor."""
    return float((weight == 0).sum()) / max(weight.numel(), 1)
