"""Affine integer quantization primitives: choose_qparams, quantize, dequantize.

Conventions (those of GPTQ and of the GPTQ checkpoint format), for a weight W [N, K] in nn.Linear
orientation, quantized along its input dimension in groups of ``group_size`` columns:

- ``maxq = 2**bits - 1``; codes ``q = clamp(round(w / scale) + zero, 0, maxq)``; ``w ~ scale * (q - zero)``.
- Asymmetric: the range [min(w, 0), max(w, 0)] maps onto 0..maxq; ``zero = round(-min / scale)``. A
  zero of 0 cannot be written in checkpoint format v1 (it stores zero - 1, and readers add 1 without
  wrapping), so groups that are entirely non-negative use ``zero = 1`` with ``scale = max / (maxq - 1)``.
- Symmetric: ``scale = 2 * max|w| / maxq`` and ``zero = 2**(bits - 1)`` for every group.
- Scales are rounded to float16 before the codes are chosen, because the checkpoint stores them in
  float16: the weight a reader reconstructs is exactly the one the quantizer evaluated.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import CompressError

SUPPORTED_BITS = (2, 3, 4, 8)
SUPPORTED_GROUP_SIZES = (16, 32, 64, 128, 256, 512, 1024, -1)
_FP16_MAX = 65504.0
_SCALE_MIN = 2.0**-24  # smallest positive float16 (subnormal)


@dataclass(frozen=True)
class QuantSpec:
    """How one layer is quantized.

    Args:
        bits: code width, one of 2, 3, 4, 8.
        group_size: input columns sharing a scale and zero; -1 for one group per output row.
        sym: symmetric (fixed zero point) or asymmetric.
    """

    bits: int = 4
    group_size: int = 128
    sym: bool = True

    def __post_init__(self):
        if self.bits not in SUPPORTED_BITS:
            raise CompressError(f"--bits {self.bits} is not supported; choose one of {', '.join(map(str, SUPPORTED_BITS))}")
        if self.group_size not in SUPPORTED_GROUP_SIZES:
            raise CompressError(
                f"--group-size {self.group_size} is not supported; choose one of {', '.join(map(str, SUPPORTED_GROUP_SIZES))}"
            )

    @property
    def maxq(self) -> int:
        return (1 << self.bits) - 1


def group_index(in_features: int, group_size: int) -> torch.Tensor:
    """g_idx without act-order: input channel i belongs to group i // group_size (int32 [K]).

    When K is not a multiple of the group size the last group is shorter, as GPTQModel writes it.
    """
    g = in_features if group_size == -1 else group_size
    return (torch.arange(in_features) // g).to(torch.int32)


def qparams_from_range(xmin: torch.Tensor, xmax: torch.Tensor, bits: int, sym: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero per row for the value range [xmin, xmax] (float32 [N] each).

    Scales come back float16-representable and at least 2**-24; zeros are whole numbers.
    """
    maxq = (1 << bits) - 1
    xmin = xmin.float().clamp(max=0)
    xmax = xmax.float().clamp(min=0)
    if sym:
        amax = torch.maximum(-xmin, xmax)
        amax = torch.where(amax == 0, torch.ones_like(amax), amax)
        scale = 2 * amax / maxq
        zero = torch.full_like(scale, float(1 << (bits - 1)))
    else:
        empty = (xmin == 0) & (xmax == 0)
        xmin = torch.where(empty, -torch.ones_like(xmin), xmin)
        xmax = torch.where(empty, torch.ones_like(xmax), xmax)
        scale = (xmax - xmin) / maxq
        nonneg = xmin == 0
        scale = torch.where(nonneg, xmax / (maxq - 1), scale)
    if not torch.isfinite(scale).all() or scale.max() > _FP16_MAX:
        raise CompressError("a weight group's range does not fit float16 scales; the model has weights above 1e6 or non-finite values")
    scale = scale.clamp(min=_SCALE_MIN).half().float()
    if not sym:
        zero = torch.round(-xmin / scale).clamp(1 if maxq > 1 else 0, maxq)
    return scale, zero


def choose_qparams(w: torch.Tensor, bits: int, sym: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero per row of ``w`` [N, k] (one group of columns) from its min and max: float32 [N] each."""
    w = w.float()
    return qparams_from_range(w.amin(dim=1), w.amax(dim=1), bits, sym)


def choose_qparams_mse(w: torch.Tensor, bits: int, sym: bool, grid: int = 100, max_shrink: float = 0.8,
                       norm: float = 2.4) -> tuple[torch.Tensor, torch.Tensor]:
    """Like choose_qparams, but shrink each row's range to minimise sum |w - fake_quant(w)|^norm.

    Tries ranges scaled by 1, 1 - 1/grid, ... down to 1 - max_shrink (GPTQ's clipping search); clipping
    a few outliers often lowers the error of all the other weights.
    """
    w = w.float()
    maxq = (1 << bits) - 1
    xmin, xmax = w.amin(dim=1), w.amax(dim=1)
    best_scale, best_zero = qparams_from_range(xmin, xmax, bits, sym)
    best_err = (fake_quantize(w, best_scale[:, None], best_zero[:, None], maxq) - w).abs().pow(norm).sum(1)
    for i in range(1, int(max_shrink * grid) + 1):
        p = 1 - i / grid
        scale, zero = qparams_from_range(p * xmin, p * xmax, bits, sym)
        err = (fake_quantize(w, scale[:, None], zero[:, None], maxq) - w).abs().pow(norm).sum(1)
        better = err < best_err
        if better.any():
            best_err = torch.where(better, err, best_err)
            best_scale = torch.where(better, scale, best_scale)
            best_zero = torch.where(better, zero, best_zero)
    return best_scale, best_zero


def quantize(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, maxq: int) -> torch.Tensor:
    """Codes of ``w`` [..., k] given per-element-broadcastable scale and zero (float tensor of integers)."""
    return torch.clamp(torch.round(w / scale) + zero, 0, maxq)


def dequantize(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    """``scale * (q - zero)``."""
    return scale * (q - zero)


def fake_quantize(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, maxq: int) -> torch.Tensor:
    """Quantize then dequantize (what the layer will compute with)."""
    return dequantize(quantize(w, scale, zero, maxq), scale, zero)


@dataclass
class QuantResult:
    """A quantized Linear weight, independent of how it is stored.

    Attributes:
        q: codes, uint8 [N, K] (nn.Linear orientation).
        scales: float32 [N, G], float16-representable.
        zeros: int32 [N, G], whole zero points (not the v1 stored value).
        g_idx: int32 [K], group of each input channel.
        spec: bits, group size, symmetry.
        loss: reconstruction loss reported by the algorithm (None for round-to-nearest).
    """

    q: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor
    g_idx: torch.Tensor
    spec: QuantSpec
    loss: float | None = None

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.q.shape)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Reconstructed weight [N, K]."""
        g = self.g_idx.long().to(self.q.device)
        s = self.scales[:, g]
        z = self.zeros[:, g].float()
        return dequantize(self.q.float(), s, z).to(dtype)


def quantize_groups(w: torch.Tensor, spec: QuantSpec, g_idx: torch.Tensor | None = None) -> QuantResult:
    """Round-to-nearest quantization of ``w`` [N, K] group by group.

    ``g_idx`` assigns input channels to groups (default: consecutive runs of group_size).
    """
    n, k = w.shape
    g_idx = group_index(k, spec.group_size) if g_idx is None else g_idx.to(torch.int32)
    gi = g_idx.long().to(w.device)
    num_groups = int(gi.max()) + 1 if k else 0
    w = w.float()
    scales = torch.empty(n, num_groups, device=w.device)
    zeros = torch.empty(n, num_groups, device=w.device)
    if spec.group_size == -1 or _contiguous(gi, spec.group_size):
        gsize = k if spec.group_size == -1 else spec.group_size
        pad = num_groups * gsize - k
        # padded columns repeat the last value so they cannot widen the group's range
        wp = torch.cat([w, w[:, -1:].expand(n, pad)], 1) if pad else w
        wg = wp.view(n, num_groups, gsize).reshape(n * num_groups, gsize)
        s, z = choose_qparams(wg, spec.bits, spec.sym)
        scales, zeros = s.view(n, num_groups), z.view(n, num_groups)
    else:
        for g in range(num_groups):
            s, z = choose_qparams(w[:, gi == g], spec.bits, spec.sym)
            scales[:, g], zeros[:, g] = s, z
    q = quantize(w, scales[:, gi], zeros[:, gi], spec.maxq)
    return QuantResult(q=q.to(torch.uint8), scales=scales, zeros=zeros.to(torch.int32), g_idx=g_idx.cpu(), spec=spec)


def _contiguous(gi: torch.Tensor, group_size: int) -> bool:
    return torch.equal(gi, torch.arange(gi.numel(), device=gi.device) // group_size)


def sqnr_db(reference: torch.Tensor, approx: torch.Tensor) -> float:
    """Signal-to-quantization-noise ratio in decibels: 10 log10(|ref|^2 / |ref - approx|^2)."""
    ref = reference.double()
    noise = (ref - approx.double()).pow(2).sum()
    if noise == 0:
        return float("inf")
    return float(10 * torch.log10(ref.pow(2).sum() / noise))
