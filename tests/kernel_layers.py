"""Random quantized layers in the stored formats, for the kernel tests (imported like tiny.py)."""

from __future__ import annotations

import torch

from compress.quant.packing import pack_dim0, pack_dim1


def gptq_layer(k: int, n: int, group: int = 32, bits: int = 4, act_order: bool = False, sym: bool = False,
               zero_offset: int = 1, bias: bool = True, seed: int = 0) -> dict:
    """GPTQ-layout tensors of a random K x N layer: qweight, qzeros, scales, g_idx, bits, bias, zero_offset.

    act_order: g_idx is a random permutation of ``i // group`` (channels quantized in another order, as
    GPTQ's desc_act produces); sym: every zero is 2**(bits-1); zero_offset: 1 stores zero - 1 (v1), 0 (v2).
    """
    gen = torch.Generator().manual_seed(seed)
    groups = -(-k // group) if group > 0 else 1
    g_idx = torch.arange(k) // (group if group > 0 else k)
    if act_order:
        g_idx = g_idx[torch.randperm(k, generator=gen)]
    maxq = (1 << bits) - 1
    q = torch.randint(0, maxq + 1, (k, n), generator=gen)
    if sym:
        z = torch.full((groups, n), 1 << (bits - 1))
    else:
        z = torch.randint(0, maxq + 1, (groups, n), generator=gen)
    scales = (torch.rand(groups, n, generator=gen) * 0.02 + 0.005).half()
    layer = dict(qweight=pack_dim0(q, bits), qzeros=pack_dim1((z - zero_offset) & maxq, bits), scales=scales,
                 g_idx=g_idx.to(torch.int32), bits=bits,
                 bias=(torch.randn(n, generator=gen) * 0.1).half() if bias else None, zero_offset=zero_offset)
    return layer


def rel_error(y: torch.Tensor, ref: torch.Tensor) -> float:
    """max |y - ref| / max |ref| in float32."""
    return float((y.float() - ref.float()).abs().max() / ref.float().abs().max().clamp_min(1e-12))
