"""4-bit blockwise quantization (NF4 and FP4) with double quantization of the block constants.

The numerics are those of bitsandbytes 0.50 on the CPU, reproduced in plain torch so that a checkpoint
written here is byte-for-byte the one bitsandbytes would write, with no runtime dependency on it
(REFERENCES.md section 2):

- A weight is flattened row-major and cut into blocks of ``blocksize`` values (32 to 4096, a power of
  two; 64 by default). Each block stores its absolute maximum; every value becomes the index of the
  nearest entry of a 16-value code table after division by that maximum. Two codes share a byte, the
  first element in the high nibble. An element count that is not a multiple of the block size leaves
  a shorter last block with its own maximum; an odd count pads the last byte with the code of 0.
- Double quantization stores the block maxima themselves in 8 bits: their mean is subtracted
  (``offset``) and the rest is quantized blockwise (256 maxima per block) with the signed dynamic map.
  This second step follows bitsandbytes' CPU kernel exactly, including its 65536-entry lookup table
  and the fused multiply-add it compiles to.

Shapes use nn.Linear orientation: a weight is [N, K] (out_features, in_features).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from compress_kernels.reference import absmax_of, dequantize_4bit

from ..errors import CompressError

# --------------------------------------------------------------------------------------------------
# Code tables (the only place these numbers live)

QUANT_TYPES = ("nf4", "fp4")
DEFAULT_BLOCKSIZE = 64
MIN_BLOCKSIZE, MAX_BLOCKSIZE = 32, 4096
NESTED_BLOCKSIZE = 256  # block maxima per 8-bit block in double quantization (fixed by bitsandbytes)

# NormalFloat4: quantiles of N(0, 1) scaled to [-1, 1], with an exact zero (QLoRA, bitsandbytes get_4bit_type)
NF4_CODE = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
)
# FP4 (1 sign, 2 exponent, 1 mantissa bit, bias 2) in bit-pattern order, before normalization by its
# largest magnitude (12); index 8 is negative zero.
FP4_VALUES = (0.0, 0.0625, 8.0, 12.0, 4.0, 6.0, 2.0, 3.0, -0.0, -0.0625, -8.0, -12.0, -4.0, -6.0, -2.0, -3.0)

# The signed dynamic 8-bit map (Dettmers 2015): for exponent e = 0..6, 2**e fraction steps between 0.1
# and 1 scaled by 10**(e - 6), both signs, plus 0 and 1.
_DYNAMIC_EXPONENT_BITS = 7
_LUT_SIZE = 65536  # bins of [-1, 1] in bitsandbytes' CPU 8-bit quantizer


def code_table(quant_type: str) -> torch.Tensor:
    """The 16-entry float32 code table of ``quant_type`` ('nf4' or 'fp4'), as stored in ``quant_map``."""
    return _code_table(quant_type).clone()


@functools.lru_cache(maxsize=None)
def _code_table(quant_type: str) -> torch.Tensor:
    if quant_type == "nf4":
        return torch.tensor(NF4_CODE, dtype=torch.float32)
    if quant_type == "fp4":
        values = torch.tensor(FP4_VALUES, dtype=torch.float32)
        return values / values.abs().max()
    raise CompressError(f"quant type '{quant_type}' is not supported; choose nf4 or fp4")


def dynamic_map() -> torch.Tensor:
    """The 256-entry signed dynamic map (float32, sorted) used for the double-quantized block maxima."""
    return _dynamic_map().clone()


@functools.lru_cache(maxsize=None)
def _dynamic_map() -> torch.Tensor:
    values = [0.0, 1.0]
    for e in range(_DYNAMIC_EXPONENT_BITS):
        steps = torch.linspace(0.1, 1, 2**e + 1, dtype=torch.float32)
        means = (steps[:-1] + steps[1:]) / 2.0
        # the products are float32, as bitsandbytes computes them, before the table is sorted
        scale = 10.0 ** (e - (_DYNAMIC_EXPONENT_BITS - 1))
        values += (scale * means).tolist() + (-scale * means).tolist()
    return torch.tensor(sorted(values), dtype=torch.float32)


@functools.lru_cache(maxsize=None)
def _bounds_and_order(quant_type: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Decision boundaries (midpoints of the sorted table) and the table index of each sorted slot."""
    code = _code_table(quant_type)
    order = torch.argsort(code, stable=True)
    return (code[order[:-1]] + code[order[1:]]) / 2, order


def _lut_for(code: torch.Tensor) -> torch.Tensor:
    """bitsandbytes' CPU lookup table for a sorted 256-entry ``code``: bin i of [-1, 1] (65536 bins) ->
    index of the code nearest the bin's centre (float32 arithmetic, as its kernel builds it)."""
    code = code.float().cpu()
    midpoints = 0.5 * (code[:-1] + code[1:])
    i = torch.arange(_LUT_SIZE, dtype=torch.float32)
    centers = -1.0 + (2.0 * i) / (_LUT_SIZE - 1)
    return torch.bucketize(centers, midpoints).to(torch.uint8)  # count of midpoints below each centre


@functools.lru_cache(maxsize=None)
def _dynamic_lut() -> torch.Tensor:
    return _lut_for(_dynamic_map())


def check_blocksize(blocksize: int, option: str = "--blocksize") -> None:
    """CompressError unless ``blocksize`` is a power of two from 32 to 4096."""
    if (not isinstance(blocksize, int) or isinstance(blocksize, bool) or blocksize < MIN_BLOCKSIZE
            or blocksize > MAX_BLOCKSIZE or blocksize & (blocksize - 1)):
        raise CompressError(f"{option} {blocksize} is not supported; choose a power of two from {MIN_BLOCKSIZE} "
                            f"to {MAX_BLOCKSIZE} (default {DEFAULT_BLOCKSIZE})")


# --------------------------------------------------------------------------------------------------
# Results


@dataclass
class NestedState:
    """Double quantization of the block maxima: ``absmax = dynamic[codes] * nested_absmax + offset``.

    Attributes:
        absmax: float32 [ceil(blocks / 256)], the maximum of each block of 256 centred maxima.
        quant_map: float32 [256], the signed dynamic map.
        offset: float32 scalar tensor, the mean of the maxima.
        blocksize: maxima per nested block (256).
    """

    absmax: torch.Tensor
    quant_map: torch.Tensor
    offset: torch.Tensor
    blocksize: int = NESTED_BLOCKSIZE


@dataclass
class NF4Result:
    """A weight quantized to 4-bit codes, independent of how it is stored.

    Attributes:
        packed: uint8 [ceil(N*K / 2), 1], two codes per byte, the first in the high nibble.
        absmax: float32 [blocks] block maxima, or uint8 [blocks] codes of them when ``nested`` is set.
        quant_map: float32 [16], the code table.
        quant_type: 'nf4' or 'fp4'.
        blocksize: values per block.
        shape: the weight's shape (N, K).
        dtype: the weight's dtype before quantization (what dequantization returns).
        nested: the double-quantization state, or None.
    """

    packed: torch.Tensor
    absmax: torch.Tensor
    quant_map: torch.Tensor
    quant_type: str
    blocksize: int
    shape: tuple[int, ...]
    dtype: torch.dtype
    nested: NestedState | None = None

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n

    def block_absmax(self) -> torch.Tensor:
        """float32 [blocks]: the block maxima, decoded when they are double-quantized."""
        return absmax_of(self.absmax, self.nested.absmax if self.nested else None,
                         self.nested.quant_map if self.nested else None,
                         self.nested.offset if self.nested else None,
                         self.nested.blocksize if self.nested else NESTED_BLOCKSIZE)

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The reconstructed weight, shape ``shape``, in ``dtype`` (default: the original dtype)."""
        return dequantize_4bit(self.packed, self.block_absmax(), self.quant_map, self.shape, self.blocksize,
                               self.dtype).to(dtype or self.dtype)


# --------------------------------------------------------------------------------------------------
# Quantization


def quantize_4bit(w: torch.Tensor, blocksize: int = DEFAULT_BLOCKSIZE, quant_type: str = "nf4") -> tuple[torch.Tensor, torch.Tensor]:
    """Blockwise 4-bit codes of ``w`` (any shape, float16 / bfloat16 / float32).

    Returns:
        (packed, absmax): uint8 [ceil(n / 2), 1] and float32 [ceil(n / blocksize)], on w's device.
    """
    check_blocksize(blocksize)
    bounds, order = _bounds_and_order(quant_type)
    flat = w.reshape(-1).float()
    n = flat.numel()
    full = n - n % blocksize
    codes = torch.zeros(n + n % 2, dtype=torch.uint8, device=w.device)
    blocks = flat[:full].view(-1, blocksize)
    absmax = blocks.abs().amax(dim=1)
    # multiply by the reciprocal (not divide), as bitsandbytes does: the codes depend on that rounding.
    # Values past +-1 by rounding need no clamp: they fall in the outermost bucket either way.
    scaled = blocks * (1.0 / absmax.clamp(min=1e-38)).unsqueeze(1)
    _count_bounds_below(scaled.view(-1), bounds, codes[:full])
    if full < n:
        # the short last block divides, and keeps its clamped maximum, again as bitsandbytes does
        tail_max = flat[full:].abs().amax().clamp(min=1e-38)
        _count_bounds_below(flat[full:] / tail_max, bounds, codes[full:n])
        absmax = torch.cat([absmax, tail_max.view(1)])
    if n % 2:
        codes[n] = int((bounds < 0).sum())  # the pad value 0
    pairs = codes.view(-1, 2)
    packed = (pairs[:, 0] << 4) | pairs[:, 1]
    if quant_type != "nf4":  # sorted slots -> the table's own indices, both nibbles of a byte at once
        packed = _byte_map(quant_type).to(w.device)[packed.long()]
    return packed.view(-1, 1), absmax


@functools.lru_cache(maxsize=None)
def _byte_map(quant_type: str) -> torch.Tensor:
    """uint8 [256]: a byte of two sorted-slot nibbles -> the byte of the two table indices."""
    order = _bounds_and_order(quant_type)[1].to(torch.uint8)
    byte = torch.arange(256)
    return (order[byte >> 4] << 4) | order[byte & 15]


_CHUNK = 1 << 14  # values per pass of the comparisons below: small enough to stay in the CPU's cache


def _count_bounds_below(x: torch.Tensor, bounds: torch.Tensor, out: torch.Tensor) -> None:
    """out[i] (uint8) = the number of ``bounds`` strictly below x[i]: ``torch.bucketize(x, bounds)``.

    Fifteen comparisons per value, chunk by chunk, measure several times faster than bucketize's binary
    search on the CPU, and give the very same index (the same strict comparisons).
    """
    if x.device.type != "cpu":  # one kernel launch per chunk and bound would dominate on an accelerator
        out.copy_(torch.bucketize(x, bounds.to(x.device)))
        return
    limits = bounds.tolist()
    flag = torch.empty(min(_CHUNK, x.numel()), dtype=torch.bool, device=x.device)
    for start in range(0, x.numel(), _CHUNK):
        xs, cs = x[start:start + _CHUNK], out[start:start + _CHUNK]
        f = flag[: xs.numel()]
        for b in limits:
            torch.gt(xs, b, out=f)
            cs += f


def quantize_blockwise_8bit(x: torch.Tensor, code: torch.Tensor, blocksize: int = NESTED_BLOCKSIZE) -> tuple[torch.Tensor, torch.Tensor]:
    """8-bit blockwise codes of ``x`` against a sorted 256-entry ``code`` table, as bitsandbytes' CPU kernel.

    The kernel scales each block by the reciprocal of its maximum, maps the result to one of 65536 bins
    of [-1, 1] and reads the nearest code from a table built for the bins' centres.

    Returns:
        (codes, absmax): uint8 [n] and float32 [ceil(n / blocksize)], on the CPU.
    """
    flat = x.reshape(-1).float().cpu()
    n = flat.numel()
    nblocks = -(-n // blocksize)
    padded = torch.zeros(nblocks * blocksize, dtype=torch.float32)
    padded[:n] = flat
    blocks = padded.view(nblocks, blocksize)
    absmax = blocks.abs().amax(dim=1)
    nonzero = absmax > 0
    inv = torch.where(nonzero, 1.0 / absmax, torch.zeros_like(absmax))
    v = (blocks * inv.unsqueeze(1)).clamp(-1.0, 1.0)
    t = (v + 1.0) * 0.5
    # the kernel computes t * 65535 + 0.5 as one fused multiply-add in float32 and truncates; the
    # product is exact in float64, so rounding the float64 sum to float32 gives the fused result
    bins = (t.double() * (_LUT_SIZE - 1) + 0.5).float().to(torch.int64)
    lut = _dynamic_lut() if torch.equal(code, _dynamic_map()) else _lut_for(code)
    codes = lut[bins]
    codes = torch.where(nonzero.unsqueeze(1), codes, torch.zeros_like(codes))  # an all-zero block stores code 0
    return codes.reshape(-1)[:n], absmax


def double_quantize(absmax: torch.Tensor, blocksize: int = NESTED_BLOCKSIZE) -> tuple[torch.Tensor, NestedState]:
    """Quantize block maxima to 8 bits: subtract their mean, then the dynamic map in blocks of 256.

    Runs on the CPU whatever the device of ``absmax``, so the mean and the codes are those of
    bitsandbytes' CPU path. Returns (uint8 codes [blocks], NestedState).
    """
    absmax = absmax.float().cpu().contiguous()
    offset = absmax.mean()
    codes, nested_absmax = quantize_blockwise_8bit(absmax - offset, _dynamic_map(), blocksize)
    return codes, NestedState(absmax=nested_absmax, quant_map=dynamic_map(), offset=offset, blocksize=blocksize)


def quantize_weight(w: torch.Tensor, quant_type: str = "nf4", blocksize: int = DEFAULT_BLOCKSIZE,
                    double_quant: bool = True) -> NF4Result:
    """Quantize a weight [N, K] (or any shape) to 4-bit codes; results come back on the CPU.

    Args:
        w: float16, bfloat16 or float32 weight; its dtype is recorded as the dequantization dtype.
        quant_type: 'nf4' (normal-float code table) or 'fp4' (bitsandbytes' 4-bit float table).
        blocksize: values per block, a power of two from 32 to 4096.
        double_quant: also quantize the float32 block maxima to 8 bits (0.127 instead of 0.5 bits per
            weight at block size 64).
    """
    if quant_type not in QUANT_TYPES:
        raise CompressError(f"quant type '{quant_type}' is not supported; choose nf4 or fp4")
    if w.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise CompressError(f"4-bit quantization needs a float16, bfloat16 or float32 weight, got {w.dtype}")
    if w.numel() == 0:
        raise CompressError("cannot quantize an empty weight")
    packed, absmax = quantize_4bit(w, blocksize, quant_type)
    nested = None
    if double_quant:
        absmax, nested = double_quantize(absmax)
    return NF4Result(packed=packed.cpu(), absmax=absmax.cpu(), quant_map=code_table(quant_type), quant_type=quant_type,
                     blocksize=blocksize, shape=tuple(w.shape), dtype=w.dtype, nested=nested)
