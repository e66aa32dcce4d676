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

from .kquants import fit_symmetric

QK = 32


def _blocks(rows: np.ndarray, importance: np.ndarray, nmax: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rows = np.ascontiguousarray(rows, dtype=np.float32)
    if rows.ndim != 2 or rows.shape[1] % QK or importance.shape != (rows.shape[1],):
        raise ValueError(f"rows [n, cols] with cols a multiple of {QK} and importance [cols] expected, got "
                         f"{rows.shape} and {importance.shape}")
    sigma2 = (rows.astype(np.float64) ** 2).mean(axis=1, keepdims=True)
    w = importance.astype(np.float64)[None, :] * np.sqrt(sigma2 + rows.astype(np.float64) ** 2)
    # llama.cpp's search: candidate inverse scales -(nmax + 0.1*k)/max for k in -9..9, each refit by
    # weighted least squares; the codes of the best candidate, offset to 0..2*nmax-1
    scale, q = fit_symmetric(rows.reshape(-1, QK).astype(np.float64), w.reshape(-1, QK), nmax)
    q = q.astype(np.int64) + nmax
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
