"""GPTQ: quantize a Linear weight column by column, correcting the remaining columns for each error.

Pure functions over tensors (after Frantar et al., "GPTQ: Accurate Post-Training Quantization for
Generative Pre-trained Transformers", 2022). With the layer's inputs X, the Hessian of the
reconstruction error ||W X - Q X||^2 is H = 2 X X^T; GPTQ quantizes one input column at a time and
spreads its rounding error over the not-yet-quantized columns through the inverse Hessian, processing
columns in blocks whose updates are applied lazily.

    H = make_hessian(K); accumulate_hessian(H, n, x) for each batch of inputs
    result = quantize_weight(W, H, spec, act_order=True)   # QuantResult with .loss
"""

from __future__ import annotations

import torch

from ..errors import CompressError
from .primitives import QuantResult, QuantSpec, choose_qparams, choose_qparams_mse, quantize, dequantize

DAMP_STEPS = 4  # damping tries: damp, then x10 each time, up to DAMP_STEPS tries


def make_hessian(in_features: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """An empty Hessian accumulator, float32 [K, K]."""
    return torch.zeros(in_features, in_features, dtype=torch.float32, device=device)


def accumulate_hessian(hessian: torch.Tensor, count: int, inputs: torch.Tensor) -> int:
    """Fold a batch of layer inputs (any shape [..., K]) into the running mean H = 2/n sum x x^T.

    Returns the new sample count. The update keeps H an average so its scale does not depend on how
    many tokens were seen (which makes the relative damping meaningful).
    """
    x = inputs.reshape(-1, inputs.shape[-1]).to(hessian.dtype)
    new = x.shape[0]
    if new == 0:
        return count
    total = count + new
    hessian.mul_(count / total)
    x = x * (2.0 / total) ** 0.5
    hessian.addmm_(x.t(), x)
    return total


def _inverse_cholesky(h: torch.Tensor, damp: float, name: str) -> tuple[torch.Tensor, float]:
    """Upper Cholesky factor of (H + damp * mean(diag H) * I)^-1, raising damp until it factors."""
    mean_diag = torch.mean(torch.diag(h))
    for step in range(DAMP_STEPS):
        d = damp * 10**step
        damped = h.clone()
        damped.diagonal().add_(d * mean_diag)
        chol, info = torch.linalg.cholesky_ex(damped)
        if info == 0:
            inv = torch.cholesky_inverse(chol)
            upper, info = torch.linalg.cholesky_ex(inv, upper=True)
            if info == 0 and torch.isfinite(upper).all():
                return upper, d
    raise CompressError(
        f"the Hessian of layer {name or 'this layer'} stays singular after raising the damping to {damp * 10 ** (DAMP_STEPS - 1):g}; "
        "its calibration inputs are degenerate (NaN, Inf or far out of range): check the model's weights and the calibration data"
    )


def quantize_weight(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    spec: QuantSpec,
    *,
    act_order: bool = False,
    static_groups: bool = False,
    damp: float = 0.01,
    block_size: int = 128,
    mse: bool = False,
    name: str = "",
) -> QuantResult:
    """GPTQ-quantize ``weight`` [N, K] given the Hessian [K, K] of its inputs.

    Args:
        spec: bits, group size (-1: one group per row) and symmetry.
        act_order: quantize columns in order of decreasing Hessian diagonal (most salient first);
            g_idx then records each original column's group.
        static_groups: with act_order, fix every group's scale and zero from the original weights before
            any update, so groups stay contiguous in the original column order.
        damp: fraction of the mean Hessian diagonal added to the diagonal; raised x10 up to 3 times
            when the factorization fails.
        block_size: columns per lazy-update block.
        mse: search the clipping range of each group for the smallest error instead of using min/max.
        name: layer name for error messages.

    Returns:
        QuantResult with codes in the original column order and ``loss`` = sum over columns of the
        squared rounding error weighted by the inverse Hessian (GPTQ's reconstruction loss).
    """
    w = weight.detach().to(torch.float32).clone()
    h = hessian.detach().to(torch.float32).clone()
    n, k = w.shape
    if h.shape != (k, k):
        raise ValueError(f"Hessian shape {tuple(h.shape)} does not match weight columns {k}")
    if not torch.isfinite(h).all():
        raise CompressError(
            f"the Hessian of layer {name or 'this layer'} contains NaN or Inf, so it stays singular whatever the damping; "
            "the calibration inputs overflow: check the model's weights and the calibration data"
        )
    maxq = spec.maxq
    group = k if spec.group_size == -1 else spec.group_size
    params = (lambda x: choose_qparams_mse(x, spec.bits, spec.sym)) if mse else (lambda x: choose_qparams(x, spec.bits, spec.sym))

    # input channels that never fire carry no information: fix them to zero
    dead = torch.diag(h) == 0
    h[dead, dead] = 1
    w[:, dead] = 0

    num_groups = -(-k // group)
    static = None
    if static_groups and spec.group_size != -1:
        static = [params(w[:, g * group:(g + 1) * group]) for g in range(num_groups)]

    perm = torch.argsort(torch.diag(h), descending=True) if act_order else None
    if perm is not None:
        w, h = w[:, perm], h[perm][:, perm]
    hinv, _ = _inverse_cholesky(h, damp, name)

    codes = torch.zeros(n, k, dtype=torch.uint8, device=w.device)
    scales = torch.zeros(n, num_groups, device=w.device)
    zeros = torch.zeros(n, num_groups, device=w.device)
    g_idx = torch.zeros(k, dtype=torch.int32)
    losses = torch.zeros(n, device=w.device)
    scale, zero = params(w) if spec.group_size == -1 else (None, None)

    for i1 in range(0, k, block_size):
        i2 = min(i1 + block_size, k)
        w1 = w[:, i1:i2].clone()
        err1 = torch.zeros_like(w1)
        hinv1 = hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = i1 + i
            orig = int(perm[col]) if perm is not None else col
            if static is not None:
                g = orig // group
                scale, zero = static[g]
            elif spec.group_size != -1 and col % group == 0:
                # the group's range comes from the columns as updated so far (block, then not yet updated)
                g = col // group
                span = torch.cat([w1[:, i:], w[:, i2:col + group]], dim=1)[:, :group]
                scale, zero = params(span)
            else:
                g = 0 if spec.group_size == -1 else col // group
            scales[:, g], zeros[:, g] = scale, zero
            g_idx[orig] = g

            x = w1[:, i]
            d = hinv1[i, i]
            q = quantize(x, scale, zero, maxq)
            deq = dequantize(q, scale, zero)
            codes[:, orig] = q.to(torch.uint8)
            losses += (x - deq).pow(2) / d**2
            e = (x - deq) / d
            w1[:, i:] -= e.unsqueeze(1) * hinv1[i, i:].unsqueeze(0)
            err1[:, i] = e
        # lazy update: the whole block's error reaches the later columns in one matrix product
        w[:, i2:] -= err1 @ hinv[i1:i2, i2:]

    return QuantResult(q=codes, scales=scales, zeros=zeros.to(torch.int32), g_idx=g_idx, spec=spec,
                       loss=float(losses.sum() / 2))
