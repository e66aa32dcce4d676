"""The Hugging Face bitsandbytes 4-bit checkpoint layout (REFERENCES.md section 2).

For a quantized Linear ``L`` with weight shape (N, K), the state dict holds (bitsandbytes
``Linear4bit._save_to_state_dict``, read back by transformers' ``Bnb4bitDeserialize``):

| key | dtype | shape |
|---|---|---|
| ``L.weight`` | uint8 | [ceil(N*K / 2), 1], two codes per byte |
| ``L.weight.absmax`` | float32, or uint8 with double quantization | [blocks] |
| ``L.weight.quant_map`` | float32 | [16] |
| ``L.weight.nested_absmax`` | float32 | [ceil(blocks / 256)], double quantization only |
| ``L.weight.nested_quant_map`` | float32 | [256], double quantization only |
| ``L.weight.quant_state.bitsandbytes__<nf4|fp4>`` | uint8 | UTF-8 JSON: quant_type, blocksize, dtype, shape, and nested_blocksize, nested_dtype, nested_offset |
| ``L.bias`` | as the original | [N] |

config.json's ``quantization_config`` has ``quant_method: bitsandbytes``, ``load_in_4bit``, the
``bnb_4bit_*`` options and ``llm_int8_skip_modules``: the Linear layers kept in full precision, which
transformers must not convert.
"""

from __future__ import annotations

import json

import torch

from .. import __version__
from ..errors import CompressError
from .nf4 import NESTED_BLOCKSIZE, QUANT_TYPES, NestedState, NF4Result, check_blocksize

QUANT_STATE_PREFIX = "quant_state.bitsandbytes__"
WEIGHT_SUFFIXES = ("absmax", "quant_map", "nested_absmax", "nested_quant_map") + tuple(
    QUANT_STATE_PREFIX + t for t in QUANT_TYPES)
COMPUTE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_STORAGE_DTYPES = {"uint8": torch.uint8, "int8": torch.int8, "float16": torch.float16, "bfloat16": torch.bfloat16,
                   "float32": torch.float32}


def dtype_name(dtype: torch.dtype) -> str:
    """'float32' for torch.float32 (the spelling bitsandbytes writes into quant_state)."""
    return str(dtype).removeprefix("torch.")


def quant_state_dict(result: NF4Result) -> dict:
    """The JSON fields of ``quant_state.bitsandbytes__<type>``, in the order bitsandbytes writes them."""
    state = {"quant_type": result.quant_type, "blocksize": result.blocksize, "dtype": dtype_name(result.dtype),
             "shape": list(result.shape)}
    if result.nested is not None:
        state.update(nested_blocksize=result.nested.blocksize, nested_dtype="float32",
                     nested_offset=float(result.nested.offset.item()))
    return state


def bnb_tensors(result: NF4Result, bias: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """Checkpoint tensors of one layer, keyed by the suffix after the layer name ('weight', 'weight.absmax', ...)."""
    out = {"weight": result.packed, "weight.absmax": result.absmax, "weight.quant_map": result.quant_map}
    if result.nested is not None:
        out["weight.nested_absmax"] = result.nested.absmax
        out["weight.nested_quant_map"] = result.nested.quant_map
    text = json.dumps(quant_state_dict(result)).encode("utf-8")
    out[f"weight.{QUANT_STATE_PREFIX}{result.quant_type}"] = torch.tensor(list(text), dtype=torch.uint8)
    if bias is not None:
        out["bias"] = bias.detach()
    return {k: v.detach().cpu().contiguous() for k, v in out.items()}


def bnb_quantization_config(quant_type: str, double_quant: bool, compute_dtype: str, blocksize: int,
                            skip_modules: list[str]) -> dict:
    """config.json's ``quantization_config``: transformers' BitsAndBytesConfig fields, plus our ``meta``."""
    return {
        "quant_method": "bitsandbytes",
        "_load_in_4bit": True,
        "_load_in_8bit": False,
        "load_in_4bit": True,
        "load_in_8bit": False,
        "bnb_4bit_quant_type": quant_type,
        "bnb_4bit_use_double_quant": double_quant,
        "bnb_4bit_compute_dtype": compute_dtype,
        "bnb_4bit_quant_storage": "uint8",
        "llm_int8_skip_modules": skip_modules,
        "llm_int8_threshold": 6.0,
        "llm_int8_has_fp16_weight": False,
        "llm_int8_enable_fp32_cpu_offload": False,
        "meta": {"quantizer": [f"compress:{__version__}"], "method": quant_type, "blocksize": blocksize},
    }


# --------------------------------------------------------------------------------------------------
# Reading


def check_bnb_config(quant: dict) -> tuple[torch.dtype | None, torch.dtype]:
    """(compute dtype or None, storage dtype) of a bitsandbytes quantization_config; refuses 8-bit ones."""
    if quant.get("load_in_8bit") or quant.get("_load_in_8bit"):
        raise CompressError("bitsandbytes 8-bit checkpoints (load_in_8bit) are not supported by compress.load; "
                            "only 4-bit nf4 / fp4 checkpoints are")
    if not (quant.get("load_in_4bit") or quant.get("_load_in_4bit")):
        raise CompressError("the checkpoint's bitsandbytes quantization_config sets neither load_in_4bit nor "
                            "load_in_8bit, so it does not say how the weights are stored")
    compute = quant.get("bnb_4bit_compute_dtype")
    if compute is not None and str(compute).removeprefix("torch.") not in COMPUTE_DTYPES:
        raise CompressError(f"bnb_4bit_compute_dtype '{compute}' is not supported (float32, bfloat16, float16)")
    storage = str(quant.get("bnb_4bit_quant_storage", "uint8")).removeprefix("torch.")
    if storage not in _STORAGE_DTYPES:
        raise CompressError(f"bnb_4bit_quant_storage '{storage}' is not supported ({', '.join(_STORAGE_DTYPES)})")
    return (COMPUTE_DTYPES[str(compute).removeprefix("torch.")] if compute is not None else None), _STORAGE_DTYPES[storage]


def quant_state_key(keys, weight_key: str) -> str | None:
    """The ``<weight>.quant_state.bitsandbytes__<type>`` key present in ``keys``, or None."""
    for t in QUANT_TYPES:
        key = f"{weight_key}.{QUANT_STATE_PREFIX}{t}"
        if key in keys:
            return key
    return None


def read_layer(reader, weight_key: str, layer: str) -> NF4Result:
    """The NF4Result stored under ``weight_key`` (``L.weight`` and its companions) in a checkpoint reader.

    Raises CompressError naming the layer and the key when a companion tensor is missing or its
    quant_state is not valid.
    """
    keys = set(reader.keys())
    qs_key = quant_state_key(keys, weight_key)
    if qs_key is None:
        raise CompressError(f"layer {layer} is stored as packed 4-bit codes but the checkpoint has no "
                            f"{weight_key}.{QUANT_STATE_PREFIX}nf4 (or fp4) tensor; the checkpoint is incomplete, "
                            "save it again")
    try:
        state = json.loads(bytes(reader.get(qs_key).to(torch.uint8).tolist()).decode("utf-8"))
        quant_type, blocksize = str(state["quant_type"]), int(state["blocksize"])
        shape, dtype = tuple(int(d) for d in state["shape"]), str(state["dtype"])
    except (ValueError, KeyError, TypeError) as e:
        raise CompressError(f"{qs_key} is not a valid bitsandbytes quant_state ({type(e).__name__}: {e})") from None
    if quant_type not in QUANT_TYPES or not qs_key.endswith(quant_type):
        raise CompressError(f"{qs_key} declares quant_type '{quant_type}'; expected nf4 or fp4 matching its key")
    check_blocksize(blocksize, option=f"{qs_key}: blocksize")
    if dtype not in COMPUTE_DTYPES:
        raise CompressError(f"{qs_key} declares dtype '{dtype}'; expected float32, bfloat16 or float16")

    def need(suffix: str) -> torch.Tensor:
        key = f"{weight_key}.{suffix}"
        if key not in keys:
            raise CompressError(f"layer {layer}: the checkpoint has {qs_key} but no {key}; the checkpoint is incomplete")
        return reader.get(key)

    packed = reader.get(weight_key)
    if packed.dtype != torch.uint8:
        packed = packed.contiguous().view(torch.uint8)
    n = 1
    for d in shape:
        n *= d
    blocks = -(-n // blocksize)
    if packed.numel() != -(-n // 2):
        raise CompressError(f"{weight_key} holds {packed.numel()} bytes but its quant_state shape {list(shape)} needs {-(-n // 2)}")
    absmax, quant_map = need("absmax"), need("quant_map")
    nested = None
    if f"{weight_key}.nested_absmax" in keys or "nested_offset" in state:
        if "nested_offset" not in state:
            raise CompressError(f"layer {layer}: {qs_key} has no nested_offset although the weight is double-quantized")
        if absmax.dtype != torch.uint8:
            raise CompressError(f"layer {layer}: {weight_key}.absmax is {dtype_name(absmax.dtype)}; double-quantized maxima are uint8 codes")
        nested_bs = int(state.get("nested_blocksize", NESTED_BLOCKSIZE))
        if nested_bs != NESTED_BLOCKSIZE:
            raise CompressError(f"{qs_key} declares nested_blocksize {nested_bs}; bitsandbytes and compress use {NESTED_BLOCKSIZE}")
        nested = NestedState(absmax=need("nested_absmax").float(), quant_map=need("nested_quant_map").float(),
                             offset=torch.tensor(float(state["nested_offset"]), dtype=torch.float32), blocksize=nested_bs)
    elif not absmax.is_floating_point():
        raise CompressError(f"layer {layer}: {weight_key}.absmax is {dtype_name(absmax.dtype)} but there is no nested_absmax to decode it")
    if absmax.numel() != blocks or quant_map.numel() != 16:
        raise CompressError(f"layer {layer}: {weight_key}.absmax has {absmax.numel()} entries and quant_map "
                            f"{quant_map.numel()}; shape {list(shape)} at block size {blocksize} needs {blocks} and 16")
    return NF4Result(packed=packed.reshape(-1, 1), absmax=(absmax if nested else absmax.float()).reshape(-1), quant_map=quant_map.float().reshape(-1),
                     quant_type=quant_type, blocksize=blocksize, shape=shape, dtype=COMPUTE_DTYPES[dtype], nested=nested)


def bnb_cpu_limits(in_features: int, out_features: int, blocksize: int) -> list[str]:
    """Why bitsandbytes 0.50's CPU kernels mishandle this layer (empty when they do not).

    On CPUs with AVX-512, its dequantize kernel reads one scale per ``blocksize`` columns of each row,
    which is wrong when a row does not end on a block boundary (in_features a multiple of 16 but not of
    the block size); with AVX-512-BF16, inference in eval mode repacks the weight and needs
    in_features a multiple of the block size and out_features a multiple of 32. The quantized values
    are the same either way: compress.load computes such layers correctly, and bitsandbytes' CUDA
    kernels index the scales by position in the flattened weight.
    """
    reasons = []
    if in_features % blocksize:
        reasons.append(f"in_features {in_features} is not a multiple of the block size {blocksize}")
    if out_features % 32:
        reasons.append(f"out_features {out_features} is not a multiple of 32")
    return reasons
