"""Rebuild a bitsandbytes 4-bit checkpoint (ours, or one that transformers or bitsandbytes saved) as a
runnable model: skeleton, NF4Linear for every Linear whose weight is stored packed, then the other tensors.

A layer counts as quantized when its checkpoint weight has quant_state companions (``.absmax``,
``.quant_map``, ``.quant_state.bitsandbytes__*``) or is itself stored as packed bytes; every such layer
must carry a complete quant_state, or loading stops with a sentence naming the layer and the key.
"""

from __future__ import annotations

import torch
from torch import nn

from ..errors import CompressError
from ..models import build_skeleton, checkpoint_key_map, linear_shape, linear_types, load_state
from .bnb_format import WEIGHT_SUFFIXES, check_bnb_config, read_layer
from .nf4_linear import NF4Linear


def build_bnb_model(config, kind: str, reader, quant: dict, dtype: torch.dtype, trust_remote_code: bool = False) -> nn.Module:
    """A model of ``kind`` whose 4-bit layers are NF4Linear modules, filled from ``reader``."""
    compute_dtype, _ = check_bnb_config(quant)
    model = build_skeleton(config, kind, trust_remote_code, dtype)
    keys = set(reader.keys())
    key_of = checkpoint_key_map(model, keys)
    swapped = []
    for name, module in list(model.named_modules()):
        if not isinstance(module, linear_types()):
            continue
        weight_key = key_of.get(f"{name}.weight")
        if weight_key is None or not _is_packed(reader, keys, weight_key, module):
            continue
        result = read_layer(reader, weight_key, name)
        k, n = linear_shape(module)
        if tuple(result.shape) != (n, k):
            raise CompressError(f"layer {name} is {n} x {k} in the model but its quant_state records shape {list(result.shape)}")
        bias = torch.empty(n, dtype=dtype, device="meta") if module.bias is not None else None
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, NF4Linear(result, bias, compute_dtype))
        swapped.append(name)
    if not swapped:
        raise CompressError("config.json declares a bitsandbytes 4-bit checkpoint but no layer's weight is stored in 4 bits")
    load_state(model, reader, dtype)
    return model


def _is_packed(reader, keys: set[str], weight_key: str, module: nn.Module) -> bool:
    if any(f"{weight_key}.{suffix}" in keys for suffix in WEIGHT_SUFFIXES):
        return True
    stored_dtype, stored_shape = reader.info(weight_key)
    return not stored_dtype.is_floating_point or tuple(stored_shape) != tuple(module.weight.shape)
