"""One entry point per quantized matmul; picks the best available implementation.

Backends register themselves in ``_BACKENDS`` with a predicate saying when they apply (device, dtype,
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


def choose_backend(x: torch.Tensor, force: str | None = None, **layer) -> str:
    """The backend that ``gptq_matmul`` would use for this input and layer."""
    wanted = force or os.environ.get(ENV_VAR) or None
    if wanted:
        if wanted not in _BACKENDS:
            raise ValueError(f"{ENV_VAR}={wanted} is not a known kernel; choose one of {', '.join(_BACKENDS)}")
        return wanted
    for name, (applies, _) in _BACKENDS.items():
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
