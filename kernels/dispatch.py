"""One entry point per quantized matmul; picks the best available implementation.

Backends register themselves per weight layout (``_BACKENDS`` for the GPTQ int layout, ``_NF4_BACKENDS``
for the 4-bit blockwise NF4 / FP4 layout) with a predicate saying when they apply (device, dtype,
shape). ``COMPRESS_KERNEL=<name>`` (or ``force=``) selects one explicitly; the pure-torch reference is
the fallback that always applies.
"""

from __future__ import annotations

import os
from typing import Callable

import torch

from . import reference

ENV_VAR = "COMPRESS_KERNEL"

# name -> (applies(x, **layer) -> bool, fn(x, **layer) -> Tensor), in order of preference
_BACKENDS: dict[str, tuple[Callable[..., bool], Callable[..., torch.Tensor]]] = {
    "reference": (lambda x, **_: True, reference.gptq_matmul),
}


def available_backends() -> list[str]:
    """Names of the registered GPTQ-layout backends, best first."""
    return list(_BACKENDS)


def choose_backend(x: torch.Tensor, force: str | None = None, registry: dict | None = None, **layer) -> str:
    """The backend that ``gptq_matmul`` (or, with ``registry=_NF4_BACKENDS``, ``nf4_matmul``) would use."""
    registry = _BACKENDS if registry is None else registry
    wanted = force or os.environ.get(ENV_VAR) or None
    if wanted:
        if wanted not in registry:
            raise ValueError(f"{ENV_VAR}={wanted} is not a known kernel; choose one of {', '.join(registry)}")
        return wanted
    for name, (applies, _) in registry.items():
        if applies(x, **layer):
            return name
    return "reference"


def gptq_matmul(
    x: torch.Tensor,
    qweight: torch.Tensor,
    qzeros: torch.Tensor,
    scales: torch.Tensor,
    g_idx: torch.Tensor,
    bits: int,
    bias: torch.Tensor | None = None,
    zero_offset: int = 1,
    force: str | None = None,
) -> torch.Tensor:
    """``x @ W.T + bias`` for a GPTQ-layout weight, on the best backend for x's device and dtype."""
    layer = dict(qweight=qweight, qzeros=qzeros, scales=scales, g_idx=g_idx, bits=bits, bias=bias, zero_offset=zero_offset)
    name = choose_backend(x, force, **layer)
    return _BACKENDS[name][1](x, **layer)


# 4-bit blockwise layout (NF4 / FP4, bitsandbytes), same conventions as _BACKENDS
_NF4_BACKENDS: dict[str, tuple[Callable[..., bool], Callable[..., torch.Tensor]]] = {
    "reference": (lambda x, **_: True, reference.nf4_matmul),
}


def available_nf4_backends() -> list[str]:
    """Names of the registered NF4 / FP4 backends, best first."""
    return list(_NF4_BACKENDS)


def nf4_matmul(
    x: torch.Tensor,
    packed: torch.Tensor,
    absmax: torch.Tensor,
    quant_map: torch.Tensor,
    shape: tuple[int, int],
    blocksize: int,
    nested_absmax: torch.Tensor | None = None,
    nested_quant_map: torch.Tensor | None = None,
    offset: torch.Tensor | None = None,
    nested_blocksize: int = 256,
    bias: torch.Tensor | None = None,
    force: str | None = None,
) -> torch.Tensor:
    """``x @ W.T + bias`` for a 4-bit blockwise weight W [N, K] (``shape``), computed in x's dtype.

    ``absmax`` holds float32 block scales, or uint8 codes of them decoded with ``nested_absmax``,
    ``nested_quant_map`` and ``offset`` (double quantization).
    """
    layer = dict(packed=packed, absmax=absmax, quant_map=quant_map, shape=tuple(shape), blocksize=blocksize,
                 nested_absmax=nested_absmax, nested_quant_map=nested_quant_map, offset=offset,
                 nested_blocksize=nested_blocksize, bias=bias)
    name = choose_backend(x, force, _NF4_BACKENDS, **layer)
    return _NF4_BACKENDS[name][1](x, **layer)
