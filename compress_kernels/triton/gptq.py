"""Triton dequant-matmul for 4-bit (and 2/8-bit) weights packed along K, GPTQ style, and for NF4.

One kernel body serves both formats. The weight arrives as int32 words [ceil(K/PER_WORD), N] (code k of
column n in bits BITS*(k % PER_WORD) of word (k // PER_WORD, n)), with per-group parameters [G, N]:

- GPTQ (``LUT=False``): ``W[k, n] = s[g, n] * (q - z[g, n])``, zeros packed along N as in the checkpoint;
- NF4 (``LUT=True``): ``W[k, n] = table[q] * absmax[g, n]``; the bitsandbytes layout (row-major codes,
  two per byte) is repacked once at load into this one, blocks becoming groups along K.

Dequantization happens in registers inside the K loop; the products accumulate in float32.

- skinny path (M <= 16): split-K, so a one-row GEMV has enough programs to fill the GPU; partial sums
  [SPLIT_K, M, N] are added by torch. BLOCK_M = 1 uses broadcast-multiply-sum (no tensor cores needed),
  larger tiles use ``tl.dot``;
- tiled path (larger M): ``tl.dot`` tiles, no split;
- above ``DEQUANT_MIN_M`` rows the weight is dequantized by a Triton kernel and multiplied by cuBLAS
  (whichever is faster is for ``compress_kernels.bench`` on a GPU to tell; the threshold is a guess).

Act-order layers are repacked at load with input channels sorted by group, so each group is a
contiguous run: when the group size is a multiple of BLOCK_K a tile reads one row of scales; otherwise
the kernel gathers per channel through the sorted g_idx. x's columns are gathered in the same order.

On CPU the kernels run in Triton's interpreter (``TRITON_INTERPRET=1``) with one fixed configuration;
on a GPU the configurations are autotuned per (M bucket, N, K).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from ..reference import absmax_of, unpack_4bit, unpack_dim0

SKINNY_MAX_M = 16
DEQUANT_MIN_M = 512


@triton.jit
def _dequant_tile(qw_ptr, s_ptr, qz_ptr, g_ptr, lut_ptr, k0, offs_n, mask_n, N, NZ, KW, K, zero_offset,
                  BITS: tl.constexpr, LUT: tl.constexpr, USE_GIDX: tl.constexpr, GROUP_SIZE: tl.constexpr,
                  BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr):
    """Weights [BLOCK_K, BLOCK_N] in float32 for rows k0 .. k0 + BLOCK_K (zero beyond K)."""
    PER_WORD: tl.constexpr = 32 // BITS
    MASK: tl.constexpr = (1 << BITS) - 1
    rows = k0 // PER_WORD + tl.arange(0, BLOCK_K // PER_WORD)
    words = tl.load(qw_ptr + rows[:, None] * N + offs_n[None, :], mask=(rows[:, None] < KW) & mask_n[None, :], other=0)
    shifts = tl.arange(0, PER_WORD) * BITS
    q = (words[:, None, :] >> shifts[None, :, None]) & MASK
    q = tl.reshape(q, (BLOCK_K, BLOCK_N))
    offs_k = k0 + tl.arange(0, BLOCK_K)
    mask_k = offs_k < K
    if USE_GIDX:
        g = tl.load(g_ptr + offs_k, mask=mask_k, other=0)[:, None]
    elif GROUP_SIZE % BLOCK_K == 0:
        g = ((k0 + tl.arange(0, 1)) // GROUP_SIZE)[:, None]  # one group for the whole tile
    else:
        g = (offs_k // GROUP_SIZE)[:, None]
    s = tl.load(s_ptr + g * N + offs_n[None, :], mask=mask_n[None, :], other=0.0).to(tl.float32)
    if LUT:
        w = tl.load(lut_ptr + q) * s
    else:
        zw = tl.load(qz_ptr + g * NZ + (offs_n // PER_WORD)[None, :], mask=mask_n[None, :], other=0)
        z = ((zw >> ((offs_n % PER_WORD) * BITS)[None, :]) + zero_offset) & MASK
        w = (q - z).to(tl.float32) * s
    return tl.where(mask_k[:, None], w, 0.0)


@triton.jit
def _matmul_kernel(x_ptr, qw_ptr, s_ptr, qz_ptr, g_ptr, lut_ptr, b_ptr, out_ptr,
                   M, N, K, KW, NZ, stride_xm, zero_offset, m_bucket,
                   BITS: tl.constexpr, LUT: tl.constexpr, USE_GIDX: tl.constexpr, GROUP_SIZE: tl.constexpr,
                   HAS_BIAS: tl.constexpr, IEEE: tl.constexpr, SPLIT_K: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    pid_n, pid_m, pid_k = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m, mask_n = offs_m < M, offs_n < N
    k_per_split = tl.cdiv(tl.cdiv(K, SPLIT_K), BLOCK_K) * BLOCK_K
    k_begin = pid_k * k_per_split
    k_end = tl.minimum(k_begin + k_per_split, K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(k_begin, k_end, BLOCK_K):
        w = _dequant_tile(qw_ptr, s_ptr, qz_ptr, g_ptr, lut_ptr, k0, offs_n, mask_n, N, NZ, KW, K, zero_offset,
                          BITS, LUT, USE_GIDX, GROUP_SIZE, BLOCK_K, BLOCK_N)
        offs_k = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :],
                    mask=mask_m[:, None] & (offs_k[None, :] < k_end), other=0.0)
        if BLOCK_M < 16:  # GEMV-like: no tensor cores, a reduction over K in registers
            acc += tl.sum(x.to(tl.float32)[:, :, None] * w[None, :, :], axis=1)
        elif IEEE:
            acc += tl.dot(x.to(tl.float32), w, input_precision="ieee")
        else:
            acc += tl.dot(x, w.to(x.dtype))
    out = out_ptr + pid_k * M * N + offs_m[:, None] * N + offs_n[None, :]
    if SPLIT_K == 1:
        if HAS_BIAS:
            acc += tl.load(b_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
        tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])
    else:
        tl.store(out, acc, mask=mask_m[:, None] & mask_n[None, :])


@triton.jit
def _dequant_kernel(qw_ptr, s_ptr, qz_ptr, g_ptr, lut_ptr, out_ptr, N, K, KW, NZ, zero_offset,
                    BITS: tl.constexpr, LUT: tl.constexpr, USE_GIDX: tl.constexpr, GROUP_SIZE: tl.constexpr,
                    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """Dense W^T [K, N] in out's dtype."""
    k0 = tl.program_id(0) * BLOCK_K
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    w = _dequant_tile(qw_ptr, s_ptr, qz_ptr, g_ptr, lut_ptr, k0, offs_n, mask_n, N, NZ, KW, K, zero_offset,
                      BITS, LUT, USE_GIDX, GROUP_SIZE, BLOCK_K, BLOCK_N)
    offs_k = k0 + tl.arange(0, BLOCK_K)
    tl.store(out_ptr + offs_k[:, None] * N + offs_n[None, :], w.to(out_ptr.dtype.element_ty),
             mask=(offs_k[:, None] < K) & mask_n[None, :])


def _configs(skinny: bool):
    out = []
    for bn in (32, 64, 128):
        for bk in (64, 128, 256):
            for warps in (2, 4):
                if skinny and bn * bk <= 16384:  # the one-row path holds a BLOCK_K x BLOCK_N product in registers
                    out.append(triton.Config({"BLOCK_N": bn, "BLOCK_K": bk}, num_warps=warps, num_stages=3))
                elif bk <= 128:
                    for bm in (32, 64, 128):
                        out.append(triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk}, num_warps=warps * 2,
                                                 num_stages=3))
    return out


_KEY = ["m_bucket", "N", "K"]
_skinny = triton.autotune(configs=_configs(True), key=_KEY + ["SPLIT_K", "BLOCK_M"])(_matmul_kernel)
_tiled = triton.autotune(configs=_configs(False), key=_KEY)(_matmul_kernel)


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


@dataclass
class PackedWeight:
    """A layer in the kernels' form: qweight int32 [ceil(K/PER_WORD), N]; scales [G, N] (GPTQ: as stored,
    NF4: float32 absmax); qzeros int32 [G, ceil(N/PER_WORD)] or None; g_idx int32 [K] (sorted) or None
    when group g covers channels g*group_size ...; perm int64 [K] (x's column order) or None; lut [16]."""

    qweight: torch.Tensor
    scales: torch.Tensor
    qzeros: torch.Tensor | None
    g_idx: torch.Tensor | None
    perm: torch.Tensor | None
    lut: torch.Tensor | None
    bits: int
    group_size: int
    zero_offset: int
    in_features: int
    out_features: int


def _pack_rows(codes: torch.Tensor, bits: int) -> torch.Tensor:
    per_word = 32 // bits
    k, n = codes.shape
    padded = torch.zeros(-(-k // per_word) * per_word, n, dtype=torch.int64, device=codes.device)
    padded[:k] = codes
    words = (padded.view(-1, per_word, n) << (torch.arange(per_word, device=codes.device) * bits).view(1, -1, 1)).sum(1)
    return (words - ((words >> 31) << 32)).to(torch.int32).contiguous()


def prepare(qweight, qzeros, scales, g_idx, bits, zero_offset=1, **_) -> PackedWeight | None:
    """GPTQ layer -> PackedWeight; None for bit widths the kernel does not read (3)."""
    if bits not in (2, 4, 8):
        return None
    k, n = g_idx.numel(), scales.shape[1]
    g = g_idx.long()
    perm = None
    if k > 1 and bool((g[1:] < g[:-1]).any()):  # act-order: sort channels by group, repack the codes
        perm = torch.argsort(g, stable=True)
        g = g[perm]
        qweight = _pack_rows(unpack_dim0(qweight, bits, k)[perm], bits)
    group_size = _uniform_group(g)
    return PackedWeight(qweight.contiguous(), scales.contiguous(), qzeros.contiguous(),
                        None if group_size else g.to(torch.int32).contiguous(), perm, None, bits, group_size or 0,
                        zero_offset, k, n)


def _uniform_group(g: torch.Tensor) -> int | None:
    """The group size if sorted g_idx is exactly ``i // size``, else None (then the kernel gathers)."""
    k = g.numel()
    size = int((g == 0).sum())
    if size and bool((g == torch.arange(k, device=g.device) // size).all()):
        return size
    return None


def prepare_nf4(packed, absmax, quant_map, shape, blocksize, nested_absmax=None, nested_quant_map=None, offset=None,
                nested_blocksize=256, **_) -> PackedWeight | None:
    """NF4 / FP4 (bitsandbytes layout) -> PackedWeight with codes along K; None when blocks straddle rows."""
    n, k = shape
    if k % blocksize:
        return None
    codes = unpack_4bit(packed, n * k).view(n, k).t()  # [K, N]
    absmax = absmax_of(absmax, nested_absmax, nested_quant_map, offset, nested_blocksize)
    return PackedWeight(_pack_rows(codes.to(torch.int64), 4), absmax.view(n, k // blocksize).t().contiguous(), None, None,
                        None, quant_map.float().contiguous(), 4, blocksize, 0, k, n)


def _split_k(n_programs: int, k: int, device: torch.device) -> int:
    """Split K until the grid has about four programs per SM (a GEMV has only N / BLOCK_N otherwise)."""
    if device.type != "cuda":
        return 2 if k >= 64 else 1  # the interpreter: exercise the split path on small shapes
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    split = 1
    while split < 16 and n_programs * split * 2 <= 4 * sms and k // (split * 2) >= 256:
        split *= 2
    return split


def matmul(x: torch.Tensor, w: PackedWeight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x @ W.T + bias``: x [..., K] (float16, bfloat16 or float32) -> [..., N] in x's dtype."""
    lead = x.shape[:-1]
    x2 = x.reshape(-1, w.in_features)
    if w.perm is not None:
        x2 = torch.index_select(x2, 1, w.perm)
    x2 = x2.contiguous()
    m, n, k = x2.shape[0], w.out_features, w.in_features
    if m >= DEQUANT_MIN_M:
        y = torch.nn.functional.linear(x2, dequantize(w, x.dtype), None if bias is None else bias.to(x.dtype))
        return y.reshape(*lead, n)
    dummy = w.qweight  # stands in for absent optional pointers; never read
    args = (x2, w.qweight, w.scales, w.qzeros if w.qzeros is not None else dummy, w.g_idx if w.g_idx is not None else dummy,
            w.lut if w.lut is not None else dummy, bias if bias is not None else dummy)
    meta = dict(BITS=w.bits, LUT=w.lut is not None, USE_GIDX=w.g_idx is not None, GROUP_SIZE=max(w.group_size, 1),
                HAS_BIAS=bias is not None,
                # float32 dots in IEEE precision (not TF32); the interpreter has no bfloat16 arithmetic,
                # so there bfloat16 tiles are multiplied in float32 too
                IEEE=x.dtype == torch.float32 or (interpreting() and x.dtype == torch.bfloat16))
    sizes = (m, n, k, w.qweight.shape[0], w.qzeros.shape[1] if w.qzeros is not None else 0, x2.stride(0),
             w.zero_offset, triton.next_power_of_2(m))
    skinny = m <= SKINNY_MAX_M
    block_m = 1 if m == 1 else 16
    if skinny:
        split = _split_k(triton.cdiv(n, 64), k, x.device)
        out = torch.empty((split, m, n), device=x.device, dtype=torch.float32 if split > 1 else x.dtype)
        grid = lambda meta_: (triton.cdiv(n, meta_["BLOCK_N"]), triton.cdiv(m, block_m), split)  # noqa: E731
        if interpreting():
            _matmul_kernel[grid(dict(BLOCK_N=32))](*args, out, *sizes, **meta, SPLIT_K=split, BLOCK_M=block_m,
                                                   BLOCK_N=32, BLOCK_K=32)
        else:
            _skinny[grid](*args, out, *sizes, **meta, SPLIT_K=split, BLOCK_M=block_m)
        if split > 1:
            y = out.sum(0)
            if bias is not None:
                y += bias.float()
            out = y.to(x.dtype)
        else:
            out = out[0]
    else:
        out = torch.empty((m, n), device=x.device, dtype=x.dtype)
        grid = lambda meta_: (triton.cdiv(n, meta_["BLOCK_N"]), triton.cdiv(m, meta_["BLOCK_M"]), 1)  # noqa: E731
        if interpreting():
            _matmul_kernel[grid(dict(BLOCK_N=32, BLOCK_M=32))](*args, out, *sizes, **meta, SPLIT_K=1, BLOCK_M=32,
                                                               BLOCK_N=32, BLOCK_K=32)
        else:
            _tiled[grid](*args, out, *sizes, **meta, SPLIT_K=1)
    return out.reshape(*lead, n)


def dequantize(w: PackedWeight, dtype: torch.dtype) -> torch.Tensor:
    """Dense W [N, K] in ``dtype`` (in the sorted channel order when act-order repacked it)."""
    k, n = w.in_features, w.out_features
    out = torch.empty((k, n), device=w.qweight.device, dtype=dtype)
    block_n, block_k = (32, 32) if interpreting() else (128, 64)
    dummy = w.qweight
    _dequant_kernel[(triton.cdiv(k, block_k), triton.cdiv(n, block_n))](
        w.qweight, w.scales, w.qzeros if w.qzeros is not None else dummy, w.g_idx if w.g_idx is not None else dummy,
        w.lut if w.lut is not None else dummy, out, n, k, w.qweight.shape[0],
        w.qzeros.shape[1] if w.qzeros is not None else 0, w.zero_offset,
        BITS=w.bits, LUT=w.lut is not None, USE_GIDX=w.g_idx is not None, GROUP_SIZE=max(w.group_size, 1),
        BLOCK_N=block_n, BLOCK_K=block_k)
    return out.t()
