"""Importance-weighted encoders for GGUF's symmetric 32-weight blocks, Q4_0 and Q5_0.

Without an importance vector these types are written by the gguf package (llama.cpp's reference
rounding: the block's largest-magnitude weight lands on code -8 or -16). With one, llama-quantize
--imatrix searches the block scale instead, weighting each weight's squared error by its column's
importance times sqrt(sigma^2 + x^2) (sigma^2 the row's mean square); this module does the same. The
row-length fallbacks of k-quant mixes land here: SmolLM2's 576-wide rows make 166 of its 211
Q4_K_M matrices Q5_0, so an importance matrix that skipped them would steer almost nothing.

Both encoders take float32 rows [n_rows, n_cols] (n_cols a multiple of 32) and an importance vector
[n_cols], and return the bytes uint8 [n_rows, n_cols / 32 * type_size] that gguf.quants.dequantize reads.
"""

from __future__ import annotations

import numpy as np

QK = 32


def _codes(x: np.ndarray, w: np.ndarray, nmax: int) -> tuple[np.ndarray, np.ndarray]:
    """(scale [n], codes int [n, 32] in 0..2*nmax-1) per block x [n, 32] for w ~ scale*(code - nmax).

    Candidate inverse scales -(nmax + 0.1*k)/max for k in -9..9 (max the signed largest-magnitude
    weight); for each rounding the weighted least-squares scale, keeping the one with the least error.
    """
    idx = np.abs(x).argmax(axis=-1)
    peak = np.take_along_axis(x, idx[:, None], axis=-1)[:, 0]
    zero = np.abs(peak) < 1e-30
    peak = np.where(zero, 1.0, peak)
    best_scale = np.zeros(x.shape[0], dtype=np.float64)
    best_score = np.full(x.shape[0], -1.0)
    best_q = np.zeros(x.shape, dtype=np.int64)
    for step in range(-9, 10):
        q = np.clip(np.rint(-(nmax + 0.1 * step) / peak[:, None] * x), -nmax, nmax - 1)
        sum_lx = (w * x * q).sum(axis=-1)
        sum_l2 = (w * q * q).sum(axis=-1)
        safe = np.where(sum_l2 > 0, sum_l2, 1.0)
        score = np.where(sum_l2 > 0, sum_lx * sum_lx / safe, 0.0)  # error falls as this grows
        better = (sum_l2 > 0) & (score > best_score)
        best_score = np.where(better, score, best_score)
        best_scale = np.where(better, sum_lx / safe, best_scale)
        best_q = np.where(better[:, None], q, best_q)
    return np.where(zero, 0.0, best_scale), np.where(zero[:, None], 0, best_q) + nmax


def _blocks(rows: np.ndarray, importance: np.ndarray, nmax: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rows = np.ascontiguousarray(rows, dtype=np.float32)
    if rows.ndim != 2 or rows.shape[1] % QK or importance.shape != (rows.shape[1],):
        raise ValueError(f"rows [n, cols] with cols a multiple of {QK} and importance [cols] expected, got "
                         f"{rows.shape} and {importance.shape}")
    sigma2 = (rows.astype(np.float64) ** 2).mean(axis=1, keepdims=True)
    w = importance.astype(np.float64)[None, :] * np.sqrt(sigma2 + rows.astype(np.float64) ** 2)
    scale, q = _codes(rows.reshape(-1, QK).astype(np.float64), w.reshape(-1, QK), nmax)
    d = scale.astype(np.float16).reshape(-1, 1).view(np.uint8)  # [blocks, 2]
    q = q.astype(np.uint8)
    return d, q, rows


def quantize_q4_0(rows: np.ndarray, importance: np.ndarray) -> np.ndarray:
    """Q4_0 bytes [n_rows, n_cols/32*18]: float16 d, then 16 bytes of codes (j low nibble, j+16 high)."""
    d, q, rows = _blocks(rows, importance, 8)
    qs = q[:, :16] | (q[:, 16:] << 4)
    return np.concatenate([d, qs], axis=1).reshape(rows.shape[0], -1)


def quantize_q5_0(rows: np.ndarray, importance: np.ndarray) -> np.ndarray:
    """Q5_0 bytes [n_rows, n_cols/32*22]: float16 d, 32 high bits (little-endian uint32), 16 bytes of low nibbles."""
    d, q, rows = _blocks(rows, importance, 16)
    qs = (q[:, :16] & 0x0F) | ((q[:, 16:] & 0x0F) << 4)
    qh = ((q >> 4).astype(np.uint32) << np.arange(QK, dtype=np.uint32)).sum(axis=1, dtype=np.uint32)
    return np.concatenate([d, qh.astype("<u4").reshape(-1, 1).view(np.uint8), qs], axis=1).reshape(rows.shape[0], -1)


ENCODERS = {"Q4_0": quantize_q4_0, "Q5_0": quantize_q5_0}
