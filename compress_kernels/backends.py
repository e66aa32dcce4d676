"""Registration of the fast paths with ``dispatch``, best first: CUDA GEMV (one row, int4), Triton
(GPU; on CPU only when forced under TRITON_INTERPRET=1, for tests), the CPU int4 path, then the
reference. Nothing heavy is imported here: each backend imports triton or builds its extension on use.
"""

from __future__ import annotations

import os

import torch

from .dispatch import GPTQ, NF4, Backend, register

_HALF = (torch.float16, torch.bfloat16)


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def _triton_installed() -> bool:
    import importlib.util

    return importlib.util.find_spec("triton") is not None


def _triton_device(x: torch.Tensor, forced: bool) -> bool:
    # on CPU Triton runs only in its interpreter (numpy, slow): only when asked for by name (tests)
    return (x.is_cuda or (forced and x.device.type == "cpu" and _interpreting())) and _triton_installed()


# ------------------------------------------------------------------ CPU: torch's packed int4 matmul
def _cpu_int4_applies(x, layer, forced):
    from .cpu import int4

    return x.device.type == "cpu" and layer["bits"] == 4 and int4.supported_dtype(x.dtype) and int4.available()


def _cpu_int4_prepare(layer):
    from .cpu import int4

    return int4.prepare(**layer)


def _cpu_int4_run(x, prepared, layer):
    from .cpu import int4

    return int4.matmul(x, prepared, layer["bias"])


# ------------------------------------------------------------------ Triton
def _triton_gptq_applies(x, layer, forced):
    return layer["bits"] in (2, 4, 8) and x.dtype in (*_HALF, torch.float32) and _triton_device(x, forced)


def _triton_gptq_prepare(layer):
    from .triton import gptq

    return gptq.prepare(**layer)


def _triton_gptq_run(x, prepared, layer):
    from .triton import gptq

    return gptq.matmul(x, prepared, layer["bias"])


def _triton_nf4_applies(x, layer, forced):
    return x.dtype in (*_HALF, torch.float32) and _triton_device(x, forced)


def _triton_nf4_prepare(layer):
    from .triton import gptq

    return gptq.prepare_nf4(**layer)


# ------------------------------------------------------------------ CUDA C++: the one-row int4 GEMV
def _cuda_applies(x, layer, forced):
    if not x.is_cuda or layer["bits"] != 4 or x.dtype not in _HALF or x.numel() != x.shape[-1]:
        return False
    from .cuda import gemv

    return gemv.available()


def _cuda_prepare(layer):
    from .cuda import gemv

    return gemv.prepare(**layer)


def _cuda_run(x, prepared, layer):
    from .cuda import gemv

    return gemv.matmul(x, prepared, layer["bias"])


register(GPTQ, Backend("cpu_int4", _cpu_int4_applies, _cpu_int4_run, _cpu_int4_prepare))
register(GPTQ, Backend("triton", _triton_gptq_applies, _triton_gptq_run, _triton_gptq_prepare), before="cpu_int4")
register(GPTQ, Backend("cuda", _cuda_applies, _cuda_run, _cuda_prepare), before="triton")
register(NF4, Backend("triton", _triton_nf4_applies, _triton_gptq_run, _triton_nf4_prepare))
