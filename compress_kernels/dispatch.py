"""One entry point per quantized matmul; picks the best available implementation.

Backends are registered per weight layout (``GPTQ`` for the GPTQ int layout, ``NF4`` for the 4-bit
blockwise NF4 / FP4 layout), best first. Each one says whether it applies to an input (device, dtype,
bits: a cheap check), may convert the stored tensors once into a layout it computes from faster
(``prepare``, cached by the calling module and redone when its tensors change), and computes
``x @ W.T + bias``. ``prepare`` returns None when a layer's shape or grouping is outside what the
backend handles; the next backend is tried.

``COMPRESS_KERNEL=<name>`` (or ``force=``, or the :func:`forced` context) selects one backend
explicitly; the pure-torch reference always applies and is the fallback, with a one-time warning
because it dequantizes the whole weight on every call.
"""

from __future__ import annotations

import contextlib
import os
import threading
import warnings
from dataclasses import dataclass
from typing import Any, Callable

import torch

from . import reference

ENV_VAR = "COMPRESS_KERNEL"


@dataclass(frozen=True)
class Backend:
    """A matmul implementation for one weight layout.

    ``applies(x, layer, forced) -> bool`` is the cheap check (device, dtype, bits; ``forced`` when the
    user named this backend); ``prepare(layer)`` returns
    the backend's own form of the weight (or None when this layer is not supported; None as the
    function itself means the stored tensors are used as they are); ``run(x, prepared, layer)`` returns
    ``x @ W.T + bias`` in x's dtype, shape [..., N].
    """

    name: str
    applies: Callable[[torch.Tensor, dict, bool], bool]
    run: Callable[[torch.Tensor, Any, dict], torch.Tensor]
    prepare: Callable[[dict], Any] | None = None


GPTQ: dict[str, Backend] = {}
NF4: dict[str, Backend] = {}
_state = threading.local()
_warned: set[str] = set()


def register(registry: dict[str, Backend], backend: Backend, before: str | None = "reference") -> None:
    """Add ``backend`` to ``registry``, ahead of ``before`` (default: just ahead of the reference)."""
    items = [(k, v) for k, v in registry.items() if k != backend.name]
    at = next((i for i, (k, _) in enumerate(items) if k == before), len(items))
    items.insert(at, (backend.name, backend))
    registry.clear()
    registry.update(items)


def available_backends() -> list[str]:
    """Names of the registered GPTQ-layout backends, best first."""
    return list(GPTQ)


def available_nf4_backends() -> list[str]:
    """Names of the registered NF4 / FP4 backends, best first."""
    return list(NF4)


@contextlib.contextmanager
def forced(name: str | None, strict: bool = True):
    """Within the block, every quantized matmul of this thread uses backend ``name`` (None: automatic).

    strict=False: layers or inputs the backend cannot run (the CUDA GEMV and a prompt of many tokens)
    take the automatic choice instead of raising.
    """
    previous = getattr(_state, "force", None), getattr(_state, "strict", True)
    _state.force, _state.strict = name, strict
    try:
        yield
    finally:
        _state.force, _state.strict = previous


def _wanted(force: str | None) -> str | None:
    return force or getattr(_state, "force", None) or os.environ.get(ENV_VAR) or None


def _token(layer: dict) -> tuple:
    """Identity of a layer's tensors: a prepared form is valid while these are unchanged.

    Tensors made under ``torch.inference_mode`` (a model loaded there) keep no version counter; they
    are identified by storage alone.
    """
    return tuple((t.data_ptr(), -1 if t.is_inference() else t._version, t.device) if isinstance(t, torch.Tensor)
                 else t for t in layer.values())


def _prepared(backend: Backend, layer: dict, cache: dict | None):
    if backend.prepare is None:
        return layer
    token = _token(layer)
    if cache is not None:
        hit = cache.get(backend.name)
        if hit is not None and hit[0] == token:
            return hit[1]
    value = backend.prepare(layer)
    if cache is not None:
        cache[backend.name] = (token, value)
    return value


def _select(registry: dict[str, Backend], x: torch.Tensor, layer: dict, force: str | None, cache: dict | None,
            automatic: bool = False):
    wanted = None if automatic else _wanted(force)
    if wanted:
        if wanted not in registry:
            raise ValueError(f"{ENV_VAR}={wanted} is not a known kernel; choose one of {', '.join(registry)}")
        backend = registry[wanted]
        prepared = _prepared(backend, layer, cache) if backend.applies(x, layer, True) else None
        if prepared is None and not force and getattr(_state, "force", None) == wanted and not _state.strict:
            return _select(registry, x, layer, None, cache, automatic=True)
        if prepared is None:
            raise ValueError(f"kernel {wanted} does not support this layer ({_describe(x, layer)}); "
                             f"unset {ENV_VAR} or choose another of {', '.join(registry)}")
        return backend, prepared
    for backend in registry.values():
        if backend.name == "reference" or not backend.applies(x, layer, False):
            continue
        prepared = _prepared(backend, layer, cache)
        if prepared is not None:
            return backend, prepared
    key = f"{x.device.type}/{x.dtype}/{layer.get('bits', 'nf4')}"
    if key not in _warned:
        _warned.add(key)
        warnings.warn(f"no fast 4-bit kernel applies ({_describe(x, layer)}); using the pure-torch reference, "
                      "which dequantizes the whole weight on every call", RuntimeWarning, stacklevel=4)
    return registry["reference"], layer


def _describe(x: torch.Tensor, layer: dict) -> str:
    bits = layer.get("bits")
    return f"device {x.device.type}, dtype {str(x.dtype).replace('torch.', '')}" + (f", {bits}-bit" if bits else "")


def usable_backends(x: torch.Tensor, registry: dict | None = None, cache: dict | None = None, **layer) -> list[str]:
    """Backends that would run this layer for x without being forced (plus the reference), best first."""
    registry = GPTQ if registry is None else registry
    names = [b.name for b in registry.values() if b.name != "reference" and b.applies(x, layer, False)
             and _prepared(b, layer, cache) is not None]
    return names + ["reference"]


def choose_backend(x: torch.Tensor, force: str | None = None, registry: dict | None = None,
                   cache: dict | None = None, **layer) -> str:
    """The backend that ``gptq_matmul`` (or, with ``registry=NF4``, ``nf4_matmul``) would use."""
    registry = GPTQ if registry is None else registry
    return _select(registry, x, layer, force, cache)[0].name


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
    cache: dict | None = None,
) -> torch.Tensor:
    """``x @ W.T + bias`` [..., N] for a GPTQ-layout weight, on the best backend for x's device and dtype.

    ``cache``: a dict owned by the calling module where backends keep their load-time form of the
    weight; without it that conversion is redone on every call.
    """
    layer = dict(qweight=qweight, qzeros=qzeros, scales=scales, g_idx=g_idx, bits=bits, bias=bias, zero_offset=zero_offset)
    backend, prepared = _select(GPTQ, x, layer, force, cache)
    return backend.run(x, prepared, layer)


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
    cache: dict | None = None,
) -> torch.Tensor:
    """``x @ W.T + bias`` for a 4-bit blockwise weight W [N, K] (``shape``), computed in x's dtype.

    ``absmax`` holds float32 block scales, or uint8 codes of them decoded with ``nested_absmax``,
    ``nested_quant_map`` and ``offset`` (double quantization).
    """
    layer = dict(packed=packed, absmax=absmax, quant_map=quant_map, shape=tuple(shape), blocksize=blocksize,
                 nested_absmax=nested_absmax, nested_quant_map=nested_quant_map, offset=offset,
                 nested_blocksize=nested_blocksize, bias=bias)
    backend, prepared = _select(NF4, x, layer, force, cache)
    return backend.run(x, prepared, layer)


def _reference_gptq(x, layer, _):
    return reference.gptq_matmul(x, **layer)


def _reference_nf4(x, layer, _):
    return reference.nf4_matmul(x, **layer)


register(GPTQ, Backend("reference", lambda x, layer, forced: True, _reference_gptq), before=None)
register(NF4, Backend("reference", lambda x, layer, forced: True, _reference_nf4), before=None)

# the fast paths register themselves; each imports its heavy parts (triton, the CUDA build) only when used
from . import backends  # noqa: E402,F401
