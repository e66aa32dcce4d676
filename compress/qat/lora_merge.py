"""Merging trained adapters into their quantized base: dequantize, add the LoRA update, quantize again.

The packed base cannot absorb ``B @ A * scaling`` in place, so the merge goes through a float model:
every quantized layer is dequantized (float32), the adapted ones get their update added, the model is
written as an ordinary full-precision folder (temporary) and quantized again with compress.quantize,
by default in the base's own format: a GPTQ-format int base with GPTQ at its own bits, group size and
symmetry (per layer, so mixed-precision bases stay mixed; calibrated on the built-in corpus), an NF4 /
FP4 base with its own quant type, block size and double quantization. Layers the base kept in full
precision stay so.

The update is small next to a quantization step, so re-quantizing can round part of it away, and plain
round-to-nearest (``requantize="rtn"``, data-free) adds a second rounding error on top of the first;
benchmarks/qat_lora.py measures how much of the recovery survives each way.
"""

from __future__ import annotations

import dataclasses
import json
import re
import shutil
from pathlib import Path

import torch
from torch import nn

from ..config import GPTQConfig, NF4Config, RTNConfig, WeightQuantConfig
from ..errors import CompressError
from ..files import copy_side_files
from ..outputs import atomic_output, check_output, scratch_folder
from ..models import (
    LoadedModel,
    build_skeleton,
    get_submodule,
    is_conv1d,
    linear_types,
    read_config_dict,
)
from .lora import MERGED_FILE, quantized_layers


def _layer_split(model: nn.Module) -> tuple[dict[str, nn.Module], list[str]]:
    """(quantized layers by their name in the plain model, names of full-precision Linear layers)."""
    from .lora_layer import QuantLoraLayer

    model = model.get_base_model() if hasattr(model, "get_base_model") else model
    quantized = {name.removesuffix(".base_layer"): m for name, m in quantized_layers(model).items()}
    adapters = [name for name, m in model.named_modules() if isinstance(m, QuantLoraLayer)]
    dense = [name for name, m in model.named_modules()
             if isinstance(m, linear_types()) and not any(name.startswith(a + ".") for a in adapters)]
    return quantized, dense


def _anchored(names) -> list[str]:
    return [f"^{re.escape(n)}$" for n in names]


def _dtype_choice(source: Path) -> str:
    config = read_config_dict(source)
    stored = str(config.get("torch_dtype") or config.get("dtype") or "auto")
    return stored if stored in ("float16", "bfloat16", "float32") else "auto"


def requantize_config(model: nn.Module, quant: dict, requantize, source: Path):
    """The config that quantizes the merged float model again (see merge_adapters for ``requantize``)."""
    if isinstance(requantize, (WeightQuantConfig, NF4Config)):
        return requantize
    if requantize not in (None, "rtn", "gptq", "nf4"):
        raise CompressError(f"requantize '{requantize}' is not one of rtn, gptq, nf4 (or a quantization config)")
    quantized, dense = _layer_split(model)
    skip = _anchored(dense)
    dtype = _dtype_choice(source)
    method = quant.get("quant_method")
    if method == "bitsandbytes":
        if requantize in ("rtn", "gptq"):
            raise CompressError(f"the base is {quant.get('bnb_4bit_quant_type', 'nf4')}; re-quantize it as nf4, or pass "
                                "an RTNConfig / GPTQConfig to choose the integer settings")
        first = next(iter(quantized.values()))
        compute = str(quant.get("bnb_4bit_compute_dtype", "float32")).removeprefix("torch.")
        return NF4Config(quant_type=first.quant_type, double_quant=bool(first.double_quant), blocksize=first.blocksize,
                         compute_dtype=compute if compute in ("float32", "bfloat16", "float16") else "float32",
                         skip=skip, dtype=dtype)
    if requantize == "nf4":
        return NF4Config(skip=skip, dtype=dtype)
    from ..quant.formats import GPTQFormat

    fmt = GPTQFormat.from_config(quant)
    overrides = {}
    for name, layer in quantized.items():
        if (layer.bits, layer.group_size) != (fmt.bits, fmt.group_size):
            overrides[_anchored([name])[0]] = {"bits": layer.bits, "group_size": layer.group_size}
    # calibrated by default: round-to-nearest adds a second rounding error as large as the first, which
    # measured worse than no adapters at all (BENCHMARKS.md, "QAT adapter recovery")
    cls = RTNConfig if requantize == "rtn" else GPTQConfig
    return cls(bits=fmt.bits, group_size=fmt.group_size, sym=fmt.sym, skip=skip, overrides=overrides, dtype=dtype)


def _dense_like(shape_of: nn.Module, weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Module:
    """A float layer of the skeleton's own type (nn.Linear, or GPT-2's Conv1D storing W transposed)."""
    n, k = weight.shape
    if is_conv1d(shape_of):
        from transformers.pytorch_utils import Conv1D

        layer = Conv1D(n, k)
        layer.weight = nn.Parameter(weight.t().contiguous())
        layer.bias = nn.Parameter(bias if bias is not None else torch.zeros(n))
        return layer
    layer = nn.Linear(k, n, bias=bias is not None)
    layer.weight = nn.Parameter(weight)
    if bias is not None:
        layer.bias = nn.Parameter(bias)
    return layer


@torch.no_grad()
def merged_float_model(model: nn.Module, kind: str) -> nn.Module:
    """Replace every quantized layer (adapted or not) by a float32 dense layer holding
    ``dequantize(W) + sum of active adapter updates``; returns the plain transformers model.

    ``model`` is a peft model or a plain quantized model; it is consumed (its layers are replaced).
    """
    from ..quant.linear import QuantModule
    from .lora_layer import QuantLoraLayer

    plain = model.get_base_model() if hasattr(model, "get_base_model") else model
    skeleton = build_skeleton(plain.config, kind)
    replacements = {}
    for name, module in plain.named_modules():
        if isinstance(module, QuantLoraLayer):
            base = module.get_base_layer()
            weight = base.dequantize(torch.float32).float().cpu()
            for adapter in module.active_adapters:
                if adapter in module.lora_A:
                    weight += module.get_delta_weight(adapter).cpu()
        elif isinstance(module, QuantModule) and not name.endswith(".base_layer"):
            base, weight = module, module.dequantize(torch.float32).float().cpu()
        else:
            continue
        bias = base.bias.detach().float().cpu().clone() if base.bias is not None else None
        replacements[name] = _dense_like(get_submodule(skeleton, name), weight, bias)
    for name, layer in replacements.items():
        parent, _, child = name.rpartition(".")
        setattr(plain.get_submodule(parent) if parent else plain, child, layer)
    if getattr(plain.config, "quantization_config", None) is not None:
        del plain.config.quantization_config
    return plain.float()


def merge_loaded(model: nn.Module, loaded: LoadedModel, source: Path, out: Path, requantize, info: dict, *,
                 overwrite: bool = False, progress: bool = True) -> dict:
    """Merge a peft model on ``loaded``'s base and write it to ``out`` quantized again; returns the config used."""
    from ..quant.apply import quantize

    out = Path(out).expanduser().absolute()
    quant = info.get("base_quantization") or loaded.quantization
    config = requantize_config(model, quant, requantize, source)
    auto = not isinstance(requantize, (WeightQuantConfig, NF4Config))
    expected, _ = _layer_split(model)
    float_model = merged_float_model(model, loaded.kind)
    check_output(out, inputs=[source], overwrite=overwrite)
    with scratch_folder(out) as scratch:
        float_dir = scratch / "merged"
        float_model.save_pretrained(str(float_dir))
        copy_side_files(source, float_dir, skip=("config.json", "quantize_config.json", "generation_config.json"))
        with atomic_output(out, overwrite=overwrite, inputs=[source], command="merge") as tmp:
            staged = tmp / "quantized"
            report = quantize(float_dir, staged, config, device="cpu", progress=progress)
            missing = sorted(set(expected) - {layer.name for layer in report.layers})
            if auto and missing:
                raise CompressError(f"re-quantization left {len(missing)} layers of the base in float ({missing[0]}); "
                                    "pass a quantization config whose blocks option names the base's block list")
            for item in staged.iterdir():
                shutil.move(str(item), tmp / item.name)
            staged.rmdir()
            used = {**dataclasses.asdict(config), "method": type(config).method}
            (tmp / MERGED_FILE).write_text(json.dumps({**info, "requantized": used}, indent=2, sort_keys=True,
                                                      default=str) + "\n")
    return used
