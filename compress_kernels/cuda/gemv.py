"""The one-row int4 GEMV in CUDA C++ (``gemv_int4.cu`` + its torch binding ``gemv_int4.cpp``), built on
first use with torch's extension loader and cached by torch (TORCH_EXTENSIONS_DIR).

Load-time form: act-order layers get their channels sorted by group and their codes repacked (x is
gathered to match); the kernel needs every packed word (8 channels) inside one group, i.e. group sizes
that are multiples of 8 after sorting, and N a multiple of 4 (16-byte loads). Other layers go to Triton.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from ..build import LazyExtension
from ..reference import unpack_dim0

_HERE = Path(__file__).parent
SOURCES = (_HERE / "gemv_int4.cpp", _HERE / "gemv_int4.cu")
_EXTENSION = LazyExtension("compress_gemv_int4", [str(p) for p in SOURCES],
                           "CUDA int4 GEMV", "Triton or the reference", extra_cuda_cflags=["-O3"])


def extension():
    """The compiled extension; raises RuntimeError when it cannot be built (no CUDA toolkit, no GPU build)."""
    return _EXTENSION.get()


def available() -> bool:
    """Whether a GPU is present and the extension builds (the first call pays the build)."""
    return torch.cuda.is_available() and _EXTENSION.available()


@dataclass
class GemvWeight:
    """qweight int32 [ceil(K/8), N]; scales float16 [G, N]; qzeros int32 [G, ceil(N/8)]; g_idx int32
    [ceil(K/8)*8] (sorted, padded with its last value); perm int64 [K] or None."""

    qweight: torch.Tensor
    scales: torch.Tensor
    qzeros: torch.Tensor
    g_idx: torch.Tensor
    perm: torch.Tensor | None
    zero_offset: int
    in_features: int
    out_features: int


def prepare(qweight, qzeros, scales, g_idx, bits, zero_offset=1, **_) -> GemvWeight | None:
    """GPTQ layer -> GemvWeight, or None when the kernel cannot read it (see the module docstring)."""
    k, n = g_idx.numel(), scales.shape[1]
    if bits != 4 or n % 4:
        return None
    g = g_idx.long()
    perm = None
    if k > 1 and bool((g[1:] < g[:-1]).any()):
        from ..triton.gptq import _pack_rows

        perm = torch.argsort(g, stable=True)
        g = g[perm]
        qweight = _pack_rows(unpack_dim0(qweight, 4, k)[perm], 4)
    padded = torch.cat([g, g[-1:].expand(-(-k // 8) * 8 - k)]).view(-1, 8)
    if not bool((padded == padded[:, :1]).all()):
        return None
    return GemvWeight(qweight.contiguous(), scales.half().contiguous(), qzeros.contiguous(),
                      padded.reshape(-1).to(torch.int32).contiguous(), perm, zero_offset, k, n)


def split_for(k: int, n: int, device: torch.device) -> int:
    """K splits so that the grid has about four blocks per SM (blocks of 256 outputs)."""
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    blocks = -(-n // 256)
    return max(1, min(-(-k // 8) // 16, -(-4 * sms // blocks)))


def matmul(x: torch.Tensor, w: GemvWeight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x @ W.T + bias`` for one row: x [..., K] with a single row, float16 or bfloat16 on CUDA."""
    lead = x.shape[:-1]
    x1 = x.reshape(-1)
    if w.perm is not None:
        x1 = torch.index_select(x1, 0, w.perm)
    out = torch.zeros(w.out_features, device=x.device, dtype=torch.float32)
    extension().gemv_int4(x1.contiguous(), w.qweight, w.scales, w.qzeros, w.g_idx, out, w.zero_offset,
                          split_for(w.in_features, w.out_features, x.device), torch.cuda.current_stream(x.device).cuda_stream)
    if bias is not None:
        out += bias.float()
    return out.to(x.dtype).reshape(*lead, w.out_features)
