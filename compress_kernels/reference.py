"""Pure-torch reference of every kernel: the oracle that fast paths are tested against.

GPTQ int layout (REFERENCES.md section 1), for a Linear with K inputs, N outputs and G groups:

- ``qweight`` int32 [rows(K), N]: integer codes packed along the input dimension; for 2/4/8 bits word r
  holds rows r*(32/bits) ... with element j shifted left by bits*j; for 3 bits the codes form one
  little-endian bit stream, 32 codes in 3 words, straddling word boundaries.
- ``qzeros`` int32 [G, cols(N)]: zero points packed the same way along the output dimension. Checkpoint
  format "gptq" (v1) stores zero - 1, "gptq_v2" stores the zero itself.
- ``scales`` [G, N], ``g_idx`` int32 [K]: ``W[n, k] = scales[g_idx[k], n] * (q[k, n] - zero[g_idx[k], n])``.

Rows are padded with zero codes up to a whole number of words (32 values for 3 bits); the unpackers take
the true length as an argument.
"""

from __future__ import annotations

import torch

SUPPORTED_BITS = (2, 3, 4, 8)


def packed_length(n: int, bits: int) -> int:
    """Number of int32 words holding ``n`` codes of ``bits`` bits (padded to whole words / 32-code runs)."""
    if bits == 3:
        return -(-n // 32) * 3
    per_word = 32 // bits
    return -(-n // per_word)


def _as_unsigned(words: torch.Tensor) -> torch.Tensor:
    return words.to(torch.int64) & 0xFFFFFFFF


def unpack_dim0(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """Unpack int32 words [packed_length(n), M] along dim 0 into codes [n, M] (int32, 0 .. 2**bits - 1)."""
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"bits must be one of {SUPPORTED_BITS}, got {bits}")
    words = _as_unsigned(packed)
    mask = (1 << bits) - 1
    if bits == 3:
        rows, m = words.shape
        words = words.view(rows // 3, 3, m)
        pos = torch.arange(32, device=packed.device) * 3  # bit offset of each code in its 96-bit run
        word, off = pos // 32, pos % 32
        lo = words[:, word, :] >> off.view(1, -1, 1)
        # codes 10 and 21 straddle a word boundary: their high bits come from the next word
        nxt = (word + 1).clamp(max=2)
        spill = (32 - off).clamp(max=31)
        hi = (words[:, nxt, :] << spill.view(1, -1, 1)) * (off > 29).view(1, -1, 1)
        codes = ((lo | hi) & mask).reshape(-1, m)
    else:
        per_word = 32 // bits
        shifts = torch.arange(per_word, device=packed.device) * bits
        codes = ((words.unsqueeze(1) >> shifts.view(1, -1, 1)) & mask).reshape(-1, words.shape[-1])
    return codes[:n].to(torch.int32)


def unpack_dim1(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """Unpack int32 words [M, packed_length(n)] along dim 1 into codes [M, n]."""
    return unpack_dim0(packed.t(), bits, n).t()


def gptq_dequantize(
    qweight: torch.Tensor,
    qzeros: torch.Tensor,
    scales: torch.Tensor,
    g_idx: torch.Tensor,
    bits: int,
    zero_offset: int = 1,
    dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Dense weight [N, K] (nn.Linear orientation) of a GPTQ-layout layer.

    Args:
        zero_offset: added to the stored zero points: 1 for checkpoint_format "gptq" (v1), 0 for v2.
            The sum is taken modulo 2**bits, so a v1 zero of 0 (stored as all ones) reads back as 0.
        dtype: result dtype (default: the dtype of ``scales``).
    """
    k = g_idx.shape[0]
    n = scales.shape[1]
    q = unpack_dim0(qweight, bits, k)  # [K, N]
    z = (unpack_dim1(qzeros, bits, n) + zero_offset) & ((1 << bits) - 1)  # [G, N]
    g = g_idx.long()
    dtype = dtype or scales.dtype
    w = (q - z[g]).to(dtype) * scales[g].to(dtype)  # [K, N]
    return w.t()


def gptq_matmul(
    x: torch.Tensor,
    qweight: torch.Tensor,
    qzeros: torch.Tensor,
    scales: torch.Tensor,
    g_idx: torch.Tensor,
    bits: int,
    bias: torch.Tensor | None = None,
    zero_offset: int = 1,
) -> torch.Tensor:
    """``x @ W.T + bias`` for a GPTQ-layout weight: unpack, dequantize in x's dtype, then F.linear."""
    w = gptq_dequantize(qweight, qzeros, scales, g_idx, bits, zero_offset, dtype=x.dtype)
    return torch.nn.functional.linear(x, w, None if bias is None else bias.to(x.dtype))


# --------------------------------------------------------------------------------------------------
# 4-bit blockwise layout (bitsandbytes NF4 / FP4, REFERENCES.md section 2), for a weight of shape (N, K)
# holding n = N*K values in blocks of ``blocksize``:
#
# - ``packed`` uint8 [ceil(n / 2), 1]: the row-major flattened codes, two per byte, first in the high nibble;
# - ``absmax`` float32 [ceil(n / blocksize)]: each block's scale, ``W.flat[i] = quant_map[code_i] * absmax[i // blocksize]``;
# - with double quantization ``absmax`` is uint8 codes of the scales:
#   ``scale[j] = nested_quant_map[absmax[j]] * nested_absmax[j // nested_blocksize] + offset``.


def absmax_of(
    absmax: torch.Tensor,
    nested_absmax: torch.Tensor | None = None,
    nested_quant_map: torch.Tensor | None = None,
    offset: torch.Tensor | float | None = None,
    nested_blocksize: int = 256,
) -> torch.Tensor:
    """float32 block scales [blocks]: ``absmax`` itself, or decoded from its 8-bit codes when nested."""
    if nested_absmax is None:
        return absmax.float()
    return blockwise_dequantize(absmax, nested_absmax, nested_quant_map, nested_blocksize) + offset


def blockwise_dequantize(codes: torch.Tensor, absmax: torch.Tensor, quant_map: torch.Tensor, blocksize: int) -> torch.Tensor:
    """float32 [n]: ``quant_map[codes[i]] * absmax[i // blocksize]`` for flat codes [n] (any integer dtype)."""
    values = quant_map.float()[codes.reshape(-1).long()]
    return _scale_blocks(values, absmax.float(), blocksize)


def _scale_blocks(values: torch.Tensor, absmax: torch.Tensor, blocksize: int) -> torch.Tensor:
    n = values.numel()
    full = n - n % blocksize
    out = torch.empty_like(values)
    out[:full] = (values[:full].view(-1, blocksize) * absmax[: full // blocksize].unsqueeze(1)).view(-1)
    if full < n:
        out[full:] = values[full:] * absmax[full // blocksize]
    return out


def unpack_4bit(packed: torch.Tensor, n: int) -> torch.Tensor:
    """Codes uint8 [n] from bytes holding two codes each (first in the high nibble)."""
    flat = packed.reshape(-1)
    if flat.dtype != torch.uint8:
        flat = flat.view(torch.uint8)  # storages other than uint8 hold the same bytes
    return torch.stack((flat >> 4, flat & 0xF), dim=1).reshape(-1)[:n]


def dequantize_4bit(
    packed: torch.Tensor,
    absmax: torch.Tensor,
    quant_map: torch.Tensor,
    shape: tuple[int, ...],
    blocksize: int,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Dense weight of ``shape`` in ``dtype`` from 4-bit codes and float32 block scales.

    The products are formed in float32 and then rounded to ``dtype``, as bitsandbytes does.
    """
    n = 1
    for d in shape:
        n *= d
    codes = unpack_4bit(packed, n)
    return blockwise_dequantize(codes, absmax, quant_map, blocksize).view(shape).to(dtype)


def nf4_matmul(
    x: torch.Tensor,
    packed: torch.Tensor,
    absmax: torch.Tensor,
    quant_map: torch.Tensor,
    shape: tuple[int, int],
    blocksize: int,
    nested_absmax: torch.Tensor | None = None,
    nested_quant_map: torch.Tensor | None = None,
    offset: torch.Tensor | float | None = None,
    nested_blocksize: int = 256,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """``x @ W.T + bias`` for a 4-bit blockwise weight W [N, K]: decode the scales, dequantize straight
    into x's dtype (float32 products rounded once, as bitsandbytes' matmul does whatever dtype the
    weight had before quantization), then F.linear."""
    scales = absmax_of(absmax, nested_absmax, nested_quant_map, offset, nested_blocksize)
    w = dequantize_4bit(packed, scales, quant_map, shape, blocksize, x.dtype)
    return torch.nn.functional.linear(x, w, None if bias is None else bias.to(x.dtype))
