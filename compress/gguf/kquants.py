"""Encoders for GGUF's k-quant types Q4_K, Q5_K and Q6_K (the gguf package only decodes them).

A k-quant super-block holds 256 weights. Q4_K and Q5_K split it into 8 sub-blocks of 32 with an
asymmetric code ``w = d*sc*q - dmin*m`` (q in 0..15 or 0..31, sc and m 6-bit, d and dmin float16);
Q6_K splits it into 16 sub-blocks of 16 with a symmetric code ``w = d*sc*(q - 32)`` (q in 0..63, sc
int8). The scale search follows the published llama.cpp approach: try a few scales around the
min/max fit, refit scale and offset by weighted least squares for each rounding, keep the best. An
optional importance vector (one weight per input column, from calibration activations) steers that
fit toward the columns that matter, as llama.cpp's importance matrix does.

Every function takes ``rows`` float32 [n_rows, n_cols] with n_cols a multiple of 256 and returns the
raw bytes uint8 [n_rows, n_cols // 256 * type_size] that ``gguf.quants.dequantize`` reads back.
"""

from __future__ import annotations

import numpy as np

QK_K = 256
TYPE_SIZE = {"Q4_K": 144, "Q5_K": 176, "Q6_K": 210}


def _weights(x: np.ndarray, importance: np.ndarray | None) -> np.ndarray:
    """Per-weight fit weights [n, size]: |x| plus the block RMS, or the importance scaled likewise."""
    sigma2 = (x * x).mean(axis=-1, keepdims=True)
    if importance is None:
        return np.sqrt(sigma2) + np.abs(x)
    return importance * np.sqrt(sigma2 + x * x)


def _fit_asymmetric(x: np.ndarray, w: np.ndarray, nmax: int, nstep: int = 20, rmin: float = -1.0,
                    rdelta: float = 0.1) -> tuple[np.ndarray, np.ndarray]:
    """Best (scale, offset) per row of x [n, 32] for codes 0..nmax, offset <= 0: w ~ scale*q + offset."""
    lo = np.minimum(x.min(axis=-1), 0.0)
    hi = x.max(axis=-1)
    span = hi - lo
    flat = span <= 0
    span = np.where(flat, 1.0, span)
    best_scale = span / nmax
    best_min = lo.copy()
    q = np.clip(np.rint((x - lo[:, None]) / best_scale[:, None]), 0, nmax)
    best_err = (w * (best_scale[:, None] * q + lo[:, None] - x) ** 2).sum(axis=-1)
    sum_w = w.sum(axis=-1)
    sum_x = (w * x).sum(axis=-1)
    for step in range(nstep + 1):
        iscale = (rmin + rdelta * step + nmax) / span
        q = np.clip(np.rint(iscale[:, None] * (x - lo[:, None])), 0, nmax)
        sum_l = (w * q).sum(axis=-1)
        sum_l2 = (w * q * q).sum(axis=-1)
        sum_xl = (w * q * x).sum(axis=-1)
        det = sum_w * sum_l2 - sum_l * sum_l
        ok = det > 0
        safe = np.where(ok, det, 1.0)
        scale = (sum_w * sum_xl - sum_x * sum_l) / safe
        offset = (sum_l2 * sum_x - sum_l * sum_xl) / safe
        # an offset above zero cannot be stored (the code only subtracts): refit the scale alone
        pos = offset > 0
        scale = np.where(pos, sum_xl / np.where(sum_l2 > 0, sum_l2, 1.0), scale)
        offset = np.where(pos, 0.0, offset)
        err = (w * (scale[:, None] * q + offset[:, None] - x) ** 2).sum(axis=-1)
        better = ok & (err < best_err)
        best_err = np.where(better, err, best_err)
        best_scale = np.where(better, scale, best_scale)
        best_min = np.where(better, offset, best_min)
    best_scale = np.where(flat, 0.0, best_scale)
    return best_scale, -best_min  # the format stores the offset as a positive minimum


def _pack_scales(sc: np.ndarray, m: np.ndarray) -> np.ndarray:
    """Eight 6-bit scales and eight 6-bit minimums per super-block [nb, 8] -> the 12-byte layout."""
    out = np.empty((sc.shape[0], 12), dtype=np.uint8)
    out[:, 0:4] = sc[:, :4] | ((sc[:, 4:] >> 4) << 6)
    out[:, 4:8] = m[:, :4] | ((m[:, 4:] >> 4) << 6)
    out[:, 8:12] = (sc[:, 4:] & 0x0F) | ((m[:, 4:] & 0x0F) << 4)
    return out


def _scale_codes(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-super-block float16 step and 6-bit codes for sub-block values [nb, 8] (all >= 0)."""
    top = values.max(axis=-1)
    step = (top / 63.0).astype(np.float16)
    step32 = step.astype(np.float32)
    codes = np.clip(np.rint(values / np.where(step32 > 0, step32, 1.0)[:, None]), 0, 63).astype(np.uint8)
    return step, codes


def _asymmetric_blocks(rows: np.ndarray, nmax: int, importance: np.ndarray | None):
    """Shared part of Q4_K and Q5_K: codes q [nb, 256], d, dmin [nb] float16, packed scales [nb, 12]."""
    x = rows.reshape(-1, 32).astype(np.float32)
    imp = None if importance is None else np.broadcast_to(importance.reshape(1, -1, 32), (rows.shape[0], *importance.reshape(-1, 32).shape)).reshape(-1, 32)
    scale, minimum = _fit_asymmetric(x, _weights(x, imp), nmax)
    d, sc = _scale_codes(scale.reshape(-1, 8))
    dmin, m = _scale_codes(minimum.reshape(-1, 8))
    # requantize against the scales as they will be decoded (float16 step times 6-bit code)
    eff_scale = (d.astype(np.float32)[:, None] * sc).reshape(-1, 1)
    eff_min = (dmin.astype(np.float32)[:, None] * m).reshape(-1, 1)
    q = np.clip(np.rint((x + eff_min) / np.where(eff_scale > 0, eff_scale, 1.0)), 0, nmax)
    q = np.where(eff_scale > 0, q, 0).astype(np.uint8).reshape(-1, QK_K)
    return q, d, dmin, _pack_scales(sc, m)


def _nibbles(q: np.ndarray) -> np.ndarray:
    """Low 4 bits of codes [nb, 256] -> 128 bytes: sub-block 2j in the low nibble, 2j+1 in the high."""
    q = (q & 0x0F).reshape(-1, 4, 2, 32)
    return (q[:, :, 0] | (q[:, :, 1] << 4)).reshape(-1, 128)


def _check(rows: np.ndarray) -> np.ndarray:
    rows = np.asarray(rows, dtype=np.float32)
    if rows.ndim != 2 or rows.shape[1] % QK_K:
        raise ValueError(f"k-quants need rows whose length is a multiple of {QK_K}, got shape {rows.shape}")
    return rows


def quantize_q4_k(rows: np.ndarray, importance: np.ndarray | None = None) -> np.ndarray:
    """Q4_K bytes [n_rows, n_cols/256*144] for float rows [n_rows, n_cols]; importance: [n_cols] or None."""
    rows = _check(rows)
    q, d, dmin, scales = _asymmetric_blocks(rows, 15, importance)
    blocks = np.concatenate([d.reshape(-1, 1).view(np.uint8), dmin.reshape(-1, 1).view(np.uint8), scales, _nibbles(q)], axis=1)
    return blocks.reshape(rows.shape[0], -1)


def quantize_q5_k(rows: np.ndarray, importance: np.ndarray | None = None) -> np.ndarray:
    """Q5_K bytes [n_rows, n_cols/256*176] for float rows [n_rows, n_cols]; importance: [n_cols] or None."""
    rows = _check(rows)
    q, d, dmin, scales = _asymmetric_blocks(rows, 31, importance)
    high = (q >> 4).reshape(-1, 8, 32)  # bit i of byte l is the fifth bit of sub-block i, element l
    qh = np.zeros((q.shape[0], 32), dtype=np.uint8)
    for i in range(8):
        qh |= high[:, i] << i
    blocks = np.concatenate([d.reshape(-1, 1).view(np.uint8), dmin.reshape(-1, 1).view(np.uint8), scales, qh, _nibbles(q)], axis=1)
    return blocks.reshape(rows.shape[0], -1)


def fit_symmetric(x: np.ndarray, w: np.ndarray, nmax: int = 32) -> tuple[np.ndarray, np.ndarray]:
    """Best scale per row of x [n, size] for codes -nmax..nmax-1 (x ~ scale*q), searched around max|x|.

    Returns (scale [n], codes [n, size] signed) in x's float dtype: the codes of the winning candidate,
    as llama.cpp keeps them (Q4_0 / Q5_0 store those; Q6_K re-rounds against its stored scales).
    """
    idx = np.abs(x).argmax(axis=-1)
    peak = np.take_along_axis(x, idx[:, None], axis=-1)[:, 0]
    zero = np.abs(peak) < 1e-30
    peak = np.where(zero, 1.0, peak)
    best_scale = np.zeros(x.shape[0], dtype=x.dtype)
    best_score = np.full(x.shape[0], -1.0, dtype=x.dtype)
    best_q = np.zeros(x.shape, dtype=x.dtype)
    for step in range(-9, 10):
        iscale = -(nmax + 0.1 * step) / peak
        q = np.clip(np.rint(iscale[:, None] * x), -nmax, nmax - 1)
        sum_lx = (w * x * q).sum(axis=-1)
        sum_l2 = (w * q * q).sum(axis=-1)
        # with the least-squares scale sum_lx/sum_l2 the error falls as sum_lx^2/sum_l2 grows
        score = np.where(sum_l2 > 0, sum_lx * sum_lx / np.where(sum_l2 > 0, sum_l2, 1.0), 0.0)
        better = (sum_l2 > 0) & (score > best_score)
        best_score = np.where(better, score, best_score)
        best_scale = np.where(better, sum_lx / np.where(sum_l2 > 0, sum_l2, 1.0), best_scale)
        best_q = np.where(better[:, None], q, best_q)
    return np.where(zero, 0.0, best_scale).astype(x.dtype), np.where(zero[:, None], 0, best_q)


def quantize_q6_k(rows: np.ndarray, importance: np.ndarray | None = None) -> np.ndarray:
    """Q6_K bytes [n_rows, n_cols/256*210] for float rows [n_rows, n_cols]; importance: [n_cols] or None."""
    rows = _check(rows)
    x = rows.reshape(-1, 16)
    if importance is None:
        w = x * x
    else:
        imp = np.broadcast_to(importance.reshape(1, -1, 16), (rows.shape[0], *importance.reshape(-1, 16).shape)).reshape(-1, 16)
        w = _weights(x, imp)
    scale = fit_symmetric(x, w)[0].reshape(-1, 16)
    # the super-block step maps the largest sub-block scale (with its sign) to -128
    idx = np.abs(scale).argmax(axis=-1)
    peak = np.take_along_axis(scale, idx[:, None], axis=-1)[:, 0]
    zero = np.abs(peak) < 1e-30
    d = np.where(zero, 0.0, peak / -128.0).astype(np.float16)
    d32 = d.astype(np.float32)
    sc = np.clip(np.rint(scale / np.where(zero, 1.0, d32)[:, None]), -128, 127).astype(np.int8)
    eff = (d32[:, None] * sc).reshape(-1, 1)
    q = np.clip(np.rint(x / np.where(eff != 0, eff, 1.0)), -32, 31)
    q = (np.where(eff != 0, q, 0) + 32).astype(np.uint8).reshape(-1, 2, 128)
    low = (q & 0x0F).reshape(-1, 2, 2, 64)
    ql = (low[:, :, 0] | (low[:, :, 1] << 4)).reshape(-1, 128)
    high = (q >> 4).reshape(-1, 2, 4, 32)
    qh = (high[:, :, 0] | (high[:, :, 1] << 2) | (high[:, :, 2] << 4) | (high[:, :, 3] << 6)).reshape(-1, 64)
    blocks = np.concatenate([ql, qh, sc.view(np.uint8), d.reshape(-1, 1).view(np.uint8)], axis=1)
    return blocks.reshape(rows.shape[0], -1)


ENCODERS = {"Q4_K": quantize_q4_k, "Q5_K": quantize_q5_k, "Q6_K": quantize_q6_k}
