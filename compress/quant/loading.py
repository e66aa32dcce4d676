"""Rebuild a quantized checkpoint as a runnable model: skeleton, swap in runtime modules, load tensors.

The quantized layers are found from the checkpoint itself (a layer is quantized when ``<name>.qweight``
is present), so checkpoints written by other tools load the same way as ours; the config's
quantization_config supplies the bits (with GPTQModel's ``dynamic`` per-module rules) and the
zero-point convention.
"""

from __future__ import annotations

import torch
from torch import nn

from ..errors import CompressError
from ..models import build_skeleton, checkpoint_key_map, linear_shape, linear_types, load_state
from .formats import GPTQFormat
from .linear import QuantLinear


def check_quantization_config(quant: dict) -> None:
    """Refuse a quantization_config that compress.load cannot read, before anything is built."""
    method = quant.get("quant_method")
    if method == "bitsandbytes":
        from .bnb_format import check_bnb_config

        check_bnb_config(quant)
    elif method == "gptq":
        GPTQFormat.from_config(quant)
    else:
        raise CompressError(f"quant_method '{method}' is not supported by compress.load (supported: gptq, bitsandbytes)")


def build_quantized_model(config, kind: str, reader, quant: dict, dtype: torch.dtype, trust_remote_code: bool = False) -> nn.Module:
    """A model of ``kind`` whose quantized layers are runtime modules, filled from ``reader``."""
    check_quantization_config(quant)
    if quant.get("quant_method") == "bitsandbytes":  # 4-bit NF4 / FP4 (ours, transformers' or bitsandbytes' own)
        from .bnb_loading import build_bnb_model

        return build_bnb_model(config, kind, reader, quant, dtype, trust_remote_code)
    fmt = GPTQFormat.from_config(quant)
    model = build_skeleton(config, kind, trust_remote_code, dtype)
    swapped = swap_gptq_layers(model, reader, fmt)
    if not swapped:
        raise CompressError("config.json declares a GPTQ checkpoint but no layer has a qweight tensor")
    load_state(model, reader, dtype)
    return model


def swap_gptq_layers(model: nn.Module, reader, fmt: GPTQFormat) -> list[str]:
    """Replace every Linear whose checkpoint has ``.qweight`` by an empty QuantLinear; returns their names."""
    keys = set(reader.keys())
    # map module names to checkpoint prefixes through a parameter of each module
    names = {}
    for name, module in model.named_modules():
        if isinstance(module, linear_types()):
            names[name] = module
    prefix_of = {}
    key_map = checkpoint_key_map(model, [k.replace(".qweight", ".weight") for k in keys if k.endswith(".qweight")])
    for pname, key in key_map.items():
        if pname.endswith(".weight") and pname[: -len(".weight")] in names:
            prefix_of[pname[: -len(".weight")]] = key[: -len(".weight")]
    swapped = []
    for name, ckpt_prefix in prefix_of.items():
        module = names[name]
        k, n = linear_shape(module)
        bits, group_size = fmt.layer_spec(ckpt_prefix)
        qlayer = QuantLinear(k, n, bits, group_size, bias=module.bias is not None,
                             zero_offset=fmt.zero_offset, device="meta")
        if f"{ckpt_prefix}.g_idx" not in keys:  # older writers leave it out when there is no act-order
            g = k if group_size == -1 else group_size
            qlayer.g_idx = (torch.arange(k) // g).to(torch.int32)
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, qlayer)
        swapped.append(name)
    return swapped
