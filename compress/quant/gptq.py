"""GPTQ: quantize a Linear weight column by column, correcting the remaining columns for each error.

Pure functions over tensors (after Frantar et al., "GPTQ: Accurate Post-Training Quantization for
Generative Pre-trained Transformers", 2022). With the layer's inputs X, the Hessian of the
reconstruction error ||W X - Q X||^2 is H = 2 X X^T; GPTQ quantizes one input column at a time and
spreads its rounding error over the not-yet-quantized columns through the inverse Hessian, processing
columns in blocks whose updates are applied lazily.

    H = make_hessian(K); accumulate_hessian(H, n, x) for each batch of inputs
    result = quantize_weight(W, H, spec, act_order=True)   # QuantResult with .loss

Layers that share an input (q/k/v) share H: ``prepare_hessian`` factors it once for all of them.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from itertools import pairwise

import torch

from ..checkpoint import all_finite
from ..errors import CompressError
from .primitives import QuantResult, QuantSpec, choose_qparams, choose_qparams_mse

DAMP_STEPS = 4  # damping tries: damp, then x10 each time
HESSIAN_BLOCK = 192  # columns per block of the Hessian update (only the upper triangle of blocks is computed)


@contextmanager
def one_thread():
    """Run torch's CPU ops on a single thread inside the block, then restore the thread count.

    The solve is thousands of small ops (one column each) and small factorizations: a second thread
    saves little on them and makes every op wait at a barrier for it, which on a busy machine (where
    the other thread is often descheduled) makes the solve 10-25x slower.
    """
    threads = torch.get_num_threads()
    if threads > 1:
        torch.set_num_threads(1)
    try:
        yield
    finally:
        if threads > 1:
            torch.set_num_threads(threads)


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
    # H is symmetric: compute the blocks on and above the diagonal, each a product that also rescales
    # the old mean (no scaled copy of the inputs), and mirror the ones above into the ones below; on
    # 1536 inputs that is 0.65x the time of the full product
    k = x.shape[1]
    parts = max(1, round(k / HESSIAN_BLOCK))
    edges = [k * i // parts for i in range(parts + 1)]
    for a0, a1 in pairwise(edges):
        hessian[a0:a1, a0:].addmm_(x[:, a0:a1].t(), x[:, a0:], beta=count / total, alpha=2.0 / total)
    for a0, a1 in pairwise(edges[:-1]):
        hessian[a1:, a0:a1].copy_(hessian[a0:a1, a1:].t())
    return total


@dataclass
class InverseHessian:
    """What GPTQ needs from H, computed once per distinct input.

    Attributes:
        hinv: upper Cholesky factor of (H + damp * mean(diag H) * I)^-1, in processing order [K, K].
        perm: processing order of the columns (act-order), or None for the natural order.
        dead: input channels that never fired (zero diagonal) [K] bool.
        damp: the damping that made the factorization succeed.
    """

    hinv: torch.Tensor
    perm: torch.Tensor | None
    dead: torch.Tensor
    damp: float


@one_thread()
def prepare_hessian(hessian: torch.Tensor, *, damp: float = 0.01, act_order: bool = False, name: str = "") -> InverseHessian:
    """Factor the damped inverse Hessian; raise the damping x10 (up to 3 times) until it factors."""
    h = hessian.detach().to(torch.float32).clone()
    if not all_finite(h):
        raise CompressError(
            f"the Hessian of layer {name or 'this layer'} contains NaN or Inf, so it stays singular whatever the damping; "
            "the calibration inputs overflow: check the model's weights and the calibration data"
        )
    # input channels that never fire carry no information: a unit diagonal keeps H invertible
    dead = torch.diag(h) == 0
    h[dead, dead] = 1
    perm = torch.argsort(torch.diag(h), descending=True) if act_order else None
    if perm is not None:
        h = h[perm][:, perm]
    mean_diag = torch.mean(torch.diag(h))
    for step in range(DAMP_STEPS):
        d = damp * 10**step
        damped = h.clone()
        damped.diagonal().add_(d * mean_diag)
        chol, info = torch.linalg.cholesky_ex(damped)
        if info == 0:
            upper, info = torch.linalg.cholesky_ex(torch.cholesky_inverse(chol), upper=True)
            if info == 0 and torch.isfinite(upper).all():
                return InverseHessian(upper, perm, dead, d)
    raise CompressError(
        f"the Hessian of layer {name or 'this layer'} stays singular after raising the damping to "
        f"{damp * 10 ** (DAMP_STEPS - 1):g}; its calibration inputs are degenerate: check the model's weights and the "
        "calibration data"
    )


@one_thread()
def quantize_weight(
    weight: torch.Tensor,
    hessian: torch.Tensor | None,
    spec: QuantSpec,
    *,
    act_order: bool = False,
    static_groups: bool = False,
    damp: float = 0.01,
    block_size: int = 128,
    mse: bool = False,
    name: str = "",
    prepared: InverseHessian | None = None,
    mask: torch.Tensor | None = None,
) -> QuantResult:
    """GPTQ-quantize ``weight`` [N, K] given the Hessian [K, K] of its inputs.

    Args:
        spec: bits, group size (-1: one group per row) and symmetry.
        act_order: quantize columns in order of decreasing Hessian diagonal (most salient first);
            g_idx then records each original column's group.
        static_groups: fix every group's scale and zero from the original weights before any update,
            so groups stay contiguous in the original column order even with act_order.
        damp: fraction of the mean Hessian diagonal added to the diagonal; raised x10 up to 3 times
            when the factorization fails.
        block_size: columns per lazy-update block.
        mse: search the clipping range of each group for the smallest error instead of using min/max.
        name: layer name for error messages.
        prepared: the result of prepare_hessian for this Hessian (then ``hessian`` may be None).
        mask: bool [N, K], False where a weight was pruned: those are coded as the zero point, so they
            dequantize to exactly 0, and their error is spread like any rounding error (a pruned model
            stays pruned with the same mask).

    Returns:
        QuantResult with codes in the original column order and ``loss`` = half the sum over columns
        of the squared rounding error divided by the inverse Hessian's diagonal (GPTQ's reconstruction
        loss).
    """
    prep = prepared or prepare_hessian(hessian, damp=damp, act_order=act_order, name=name)
    w = weight.detach().to(torch.float32).clone()
    n, k = w.shape
    if prep.hinv.shape != (k, k):
        raise ValueError(f"Hessian shape {tuple(prep.hinv.shape)} does not match weight columns {k}")
    maxq = spec.maxq
    group = k if spec.group_size == -1 else spec.group_size
    params = (lambda x: choose_qparams_mse(x, spec.bits, spec.sym)) if mse else (lambda x: choose_qparams(x, spec.bits, spec.sym))
    w[:, prep.dead] = 0
    keep = mask.to(device=w.device, dtype=torch.bool) if mask is not None else None
    if keep is not None:
        w[~keep] = 0
    num_groups = -(-k // group)
    scales = torch.zeros(n, num_groups, device=w.device)
    zeros = torch.zeros(n, num_groups, device=w.device)

    # static groups (and one group per row) take their parameters from the weights before any update
    fixed = static_groups or spec.group_size == -1
    if fixed:
        for g in range(num_groups):
            scales[:, g], zeros[:, g] = params(w[:, g * group:(g + 1) * group])
    perm = prep.perm
    if perm is not None:
        w = w[:, perm]
        keep = keep[:, perm] if keep is not None else None
    # group of each processed column: runs in processing order, or the original column's group
    order = perm if perm is not None else torch.arange(k, device=w.device)
    col_group = (order // group) if fixed else (torch.arange(k, device=w.device) // group)
    col_group_list = col_group.tolist()

    hinv = prep.hinv
    # the loop walks columns, so hold them as contiguous rows: wt [K, N], each step a row
    wt = w.t().contiguous()
    keept = keep.t().contiguous() if keep is not None else None
    codes_t = torch.empty(k, n, device=w.device)
    losses = torch.zeros(n, device=w.device)
    scale = zero = None
    for i1 in range(0, k, block_size):
        i2 = min(i1 + block_size, k)
        w1 = wt[i1:i2]  # a view: updates land in wt, whose rows i1..i2 are not read again once quantized
        keep1 = keept[i1:i2] if keept is not None else None
        q1 = codes_t[i1:i2]
        err1 = torch.empty_like(w1)
        hinv1 = hinv[i1:i2, i1:i2]
        diag = torch.diagonal(hinv1)
        current = -1
        for i in range(i2 - i1):
            col = i1 + i
            g = col_group_list[col]
            if g != current:
                if not fixed and col % group == 0:
                    # the group's range comes from its columns as updated so far (rows from i2 on do
                    # not have this block's updates yet, as in the lazy scheme)
                    span = wt[col:col + group]
                    if keept is not None:  # pruned weights will be zero, whatever the updates made of them
                        span = span * keept[col:col + group]
                    scales[:, g], zeros[:, g] = params(span.t())
                scale, zero, current = scales[:, g].contiguous(), zeros[:, g].contiguous(), g
            x = w1[i]
            q = torch.clamp(torch.round(x / scale) + zero, 0, maxq)
            if keep1 is not None:
                q = torch.where(keep1[i], q, zero)
            e = (x - scale * (q - zero)) / diag[i]
            q1[i] = q
            err1[i] = e
            # spread this column's error over the rest of the block (one rank-1 update)
            w1[i + 1:].addr_(hinv1[i, i + 1:], e, alpha=-1)
        losses += err1.pow(2).sum(0)
        # lazy update: the whole block's error reaches the later columns in one matrix product
        wt[i2:].addmm_(hinv[i1:i2, i2:].t(), err1, alpha=-1)
    codes = codes_t.t()

    g_idx = torch.empty(k, dtype=torch.int32, device=w.device)
    if perm is not None:
        restored = torch.empty_like(codes)
        restored[:, perm] = codes
        codes = restored
        g_idx[perm] = col_group.to(torch.int32)
    else:
        g_idx = col_group.to(torch.int32)
    return QuantResult(q=codes.to(torch.uint8), scales=scales, zeros=zeros.to(torch.int32), g_idx=g_idx.cpu(),
                       spec=spec, loss=float(losses.sum() / 2))
