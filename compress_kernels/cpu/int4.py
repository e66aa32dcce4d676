"""GPTQ int4 matmul on CPU: our C++ kernel (``int4_matmul.cpp``), built on first use with torch's
extension loader, reading the packed codes directly.

Load-time conversion (``prepare``, once per layer, cached by the module):

- act-order: input channels are sorted by group (a stable argsort of g_idx) and the codes repacked in
  that order; each call gathers x's columns the same way (M x K elements: cheap beside the weight);
- the sorted channels form runs that share one group; the kernel sums ``x * q`` over a run, then
  applies the run's scale and zero once per output: ``s * sum(x q) - s z * sum(x)``. Any group size and
  any g_idx work, asymmetric or symmetric zeros alike (the zero is just a number per group and output);
- the packed words are regrouped in panels of 16 outputs, each contiguous over K (see the C++ source);
- scales and ``scale * zero`` are kept as float32 [G, N].

The weight is never dequantized: memory stays at the packed codes plus 8 bytes per group and output.
torch's own packed-int4 CPU op (``aten._weight_int4pack_mm_for_cpu``) was measured as a candidate and is
much slower than fp32 F.linear on this project's CPUs (see BENCHMARKS.md), so it is only a peer in
``compress_kernels.bench``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from ..build import LazyExtension
from ..reference import unpack_dim0, unpack_dim1

# multiply-adds below which one thread does the whole product: at M=1 and M=16 on 4096 x 4096 a single
# thread was 4x and 3x faster than two on the 2-core machine of BENCHMARKS.md (thread wake-ups dominate)
PARALLEL_WORK = 1 << 30
_EXTENSION = LazyExtension("compress_int4_cpu", [str(Path(__file__).with_name("int4_matmul.cpp"))],
                           "CPU int4 kernel", "the slower reference", extra_cflags=["-O3", "-march=native", "-fopenmp"])


def extension():
    """The compiled C++ module (built on first use, then cached by torch under TORCH_EXTENSIONS_DIR)."""
    return _EXTENSION.get()


def available() -> bool:
    """Whether the CPU kernel builds (and loads) here; the first call pays the build."""
    return _EXTENSION.available()


@dataclass
class Int4CpuWeight:
    """A GPTQ int4 layer in the kernel's form.

    panels: int32 [N // 16, ceil(K/8), 16], the packed words regrouped by 16 outputs; edge: int32
    [ceil(K/8), N % 16], the words of the last outputs; scales, scaled_zeros:
    float32 [G, N]; run_starts int32 [R + 1], run_groups int32 [R]; perm: int64 [K] or None.
    """

    panels: torch.Tensor
    edge: torch.Tensor
    scales: torch.Tensor
    scaled_zeros: torch.Tensor
    run_starts: torch.Tensor
    run_groups: torch.Tensor
    perm: torch.Tensor | None
    in_features: int
    out_features: int


def pack_rows_4bit(codes: torch.Tensor) -> torch.Tensor:
    """Codes [K, N] in 0..15 -> int32 words [ceil(K/8), N], code k in bits 4*(k%8) of word k//8."""
    k, n = codes.shape
    padded = torch.zeros(-(-k // 8) * 8, n, dtype=torch.int64)
    padded[:k] = codes
    words = (padded.view(-1, 8, n) << (torch.arange(8) * 4).view(1, 8, 1)).sum(1)
    return (words - ((words >> 31) << 32)).to(torch.int32)


def prepare(qweight, qzeros, scales, g_idx, bits, zero_offset=1, **_) -> Int4CpuWeight | None:
    """Convert a GPTQ-layout layer (see ``compress_kernels.reference``); None unless 4-bit on CPU."""
    if bits != 4 or qweight.device.type != "cpu":
        return None
    k, n = g_idx.numel(), scales.shape[1]
    g = g_idx.long()
    perm = None
    if k > 1 and bool((g[1:] < g[:-1]).any()):
        perm = torch.argsort(g, stable=True)
        g = g[perm]
        qweight = pack_rows_4bit(unpack_dim0(qweight, 4, k)[perm])
    change = torch.nonzero(g[1:] != g[:-1]).flatten() + 1
    starts = torch.cat([torch.zeros(1, dtype=torch.long), change, torch.tensor([k])]).to(torch.int32)
    z = ((unpack_dim1(qzeros, 4, n) + zero_offset) & 15).float()  # [G, N]
    s = scales.float()
    rows, full = qweight.shape[0], n - n % 16
    panels = qweight[:, :full].reshape(rows, full // 16, 16).permute(1, 0, 2).contiguous()
    edge = qweight[:, full:].contiguous()
    return Int4CpuWeight(panels, edge, s.contiguous(), (s * z).contiguous(), starts,
                         g[starts[:-1].long()].to(torch.int32), perm, k, n)


def supported_dtype(dtype: torch.dtype) -> bool:
    return dtype in (torch.float32, torch.bfloat16, torch.float16)


def matmul(x: torch.Tensor, w: Int4CpuWeight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x @ W.T + bias``: x [..., K] (float32, bfloat16, float16) on CPU -> [..., N] in x's dtype.

    Computed in float32 whatever x's dtype (the CPU has no faster half-precision arithmetic to offer).
    """
    lead = x.shape[:-1]
    x2 = x.reshape(-1, w.in_features)
    if w.perm is not None:
        x2 = torch.index_select(x2, 1, w.perm)  # (x2[:, perm] is 1000x slower here: a threaded index kernel)
    parallel = x2.shape[0] * w.in_features * w.out_features >= PARALLEL_WORK
    y = extension().int4_matmul(x2.float().contiguous(), w.panels, w.edge, w.scales, w.scaled_zeros, w.run_starts,
                                w.run_groups, parallel)
    if bias is not None:
        y += bias.float()
    return y.to(x.dtype).reshape(*lead, w.out_features)
