"""Pack integer codes into int32 words, GPTQ style (the inverse of compress_kernels.reference's unpackers).

Codes are packed along one dimension, low bits first: for 2/4/8 bits word r holds codes
r*(32/bits) ... r*(32/bits) + 32/bits - 1, code j shifted left by bits*j; for 3 bits 32 codes make one
96-bit little-endian stream over 3 words, so codes 10 and 21 straddle word boundaries (the AutoGPTQ
layout that vLLM and GPTQModel read). Lengths that do not fill the last word (or the last 32-code run for
3 bits) are padded with zero codes; GPTQModel 7.7 crashes on 3-bit layers whose output width is not a
multiple of 32, compress pads instead.
"""

from __future__ import annotations

import torch

from compress_kernels.reference import SUPPORTED_BITS, packed_length, unpack_dim0, unpack_dim1

__all__ = ["pack_dim0", "pack_dim1", "unpack_dim0", "unpack_dim1", "packed_length"]


def pack_dim0(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack codes [n, M] (integers in 0 .. 2**bits - 1) along dim 0 into int32 [packed_length(n, bits), M]."""
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"bits must be one of {SUPPORTED_BITS}, got {bits}")
    n, m = codes.shape
    codes = codes.to(torch.int64)
    if codes.numel() and (codes.min() < 0 or codes.max() >= (1 << bits)):
        raise ValueError(f"codes must lie in 0..{(1 << bits) - 1} for {bits}-bit packing")
    rows = packed_length(n, bits)
    per_run = 32 if bits == 3 else 32 // bits
    padded = torch.zeros(-(-n // per_run) * per_run, m, dtype=torch.int64, device=codes.device)
    padded[:n] = codes
    if bits == 3:
        runs = padded.view(-1, 32, m)
        pos = torch.arange(32, device=codes.device) * 3
        word, off = pos // 32, pos % 32
        out = torch.zeros(runs.shape[0], 3, m, dtype=torch.int64, device=codes.device)
        for j in range(32):  # 32 fixed positions; each is a vectorized op over all runs and columns
            out[:, word[j]] |= (runs[:, j] << off[j]) & 0xFFFFFFFF
            if off[j] > 29:  # the code's high bits spill into the next word
                out[:, word[j] + 1] |= runs[:, j] >> (32 - off[j])
        words = out.view(rows, m)
    else:
        per_word = 32 // bits
        shifts = torch.arange(per_word, device=codes.device) * bits
        words = (padded.view(rows, per_word, m) << shifts.view(1, -1, 1)).sum(1)
    # reinterpret the unsigned 32-bit values as int32 (two's complement)
    return (words - ((words >> 31) << 32)).to(torch.int32)


def pack_dim1(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack codes [M, n] along dim 1 into int32 [M, packed_length(n, bits)]."""
    return pack_dim0(codes.t(), bits).t().contiguous()
