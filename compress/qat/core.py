"""prepare / train with any loop / convert.

    from compress.qat import prepare, convert, QATCallback
    from compress.qat.config import QATConfig

    model = prepare(model, QATConfig(bits=4, group_size=128))    # swaps the block Linears in place
    ...train: a plain torch loop as is, or the Hugging Face Trainer with callbacks=[QATCallback(config)]...
    convert(model, "out/model-qat", source="path/to/model")      # GPTQ layout (int) or bitsandbytes NF4

The converted folder loads with ``compress.load`` (and, for NF4, with transformers + bitsandbytes), runs
on the 4-bit kernels and exports to GGUF like any other checkpoint of those formats; its outputs equal
the fake-quant model's.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from ..errors import CompressError
from .config import QATConfig
from .fake import FakeQuantLinear

CONFIG_ATTR = "_compress_qat_config"


def _targets(model: nn.Module, config: QATConfig, blocks: str | None) -> dict[str, nn.Linear]:
    from ..models import find_blocks, find_linears

    prefix, block_list = find_blocks(model, blocks)
    found: dict[str, nn.Module] = {}
    for i, block in enumerate(block_list):
        found.update(find_linears(block, f"{prefix}.{i}"))
    if config.quantize_head:
        head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        if head is None:
            raise CompressError("--quantize-head: the model has no output head to quantize")
        inputs = model.get_input_embeddings()
        if inputs is not None and head.weight is inputs.weight:
            raise CompressError("the output head shares its weight with the input embeddings (tied), which stay in "
                                "floating point; it cannot be quantized on its own")
        found.update({name: m for name, m in model.named_modules() if m is head})
    targets = {}
    for name, module in found.items():
        if config.skips(name):
            continue
        if type(module) is not nn.Linear:
            raise CompressError(f"layer {name} is a {type(module).__name__}; quantization-aware training handles "
                                f"nn.Linear layers (Llama-family, Qwen2, Mistral, BERT, OPT)")
        targets[name] = module
    if not targets:
        raise CompressError("no Linear layer is left to quantize (check --skip)")
    return targets


def prepare(model: nn.Module, config: QATConfig, *, blocks: str | None = None) -> nn.Module:
    """Swap the Linear layers of ``model``'s blocks (and the head if asked) for FakeQuantLinear, in place.

    The layers keep their weight and bias parameters (create the optimizer after this call or before:
    the parameters are the same objects); learnable scales are new parameters. Returns ``model``.
    """
    if any(isinstance(m, FakeQuantLinear) for m in model.modules()):
        raise CompressError("the model is already prepared for quantization-aware training")
    for name, linear in _targets(model, config, blocks).items():
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, FakeQuantLinear.from_linear(linear, config))
    setattr(model, CONFIG_ATTR, config)
    return model


def fake_layers(model: nn.Module) -> dict[str, FakeQuantLinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, FakeQuantLinear)}


def set_fake_quant(model: nn.Module, enabled: bool) -> None:
    """Turn fake quantization on or off (off: the layers compute in floating point)."""
    for m in fake_layers(model).values():
        m.enabled = enabled


def freeze_ranges(model: nn.Module) -> None:
    """Fix every integer layer's scales and zero points at their current values."""
    for m in fake_layers(model).values():
        m.freeze()


def _callback_base():
    from transformers import TrainerCallback

    return TrainerCallback


class QATCallback(_callback_base()):
    """Hugging Face Trainer hooks: floating point for ``warmup_steps``, fake quantization after, ranges
    frozen once ``freeze_at`` of the steps are done. A plain torch loop needs none of this: a prepared
    model trains with fake quantization from its first step.
    """

    def __init__(self, config: QATConfig):
        self.config = config
        self.enabled_at: int | None = None
        self.frozen_at: int | None = None

    def _apply(self, step: int, max_steps: int, model) -> None:
        if model is None:
            return
        on = step >= self.config.warmup_steps
        set_fake_quant(model, on)
        if on and self.enabled_at is None:
            self.enabled_at = step
        if self.frozen_at is None and self.config.freeze_at < 1 and max_steps and step >= self.config.freeze_at * max_steps:
            freeze_ranges(model)
            self.frozen_at = step

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self._apply(state.global_step, state.max_steps, model)

    def on_step_begin(self, args, state, control, model=None, **kwargs):
        self._apply(state.global_step, state.max_steps, model)

    def on_train_end(self, args, state, control, model=None, **kwargs):
        if model is not None:
            set_fake_quant(model, True)  # what is evaluated and converted is the quantized model


# --------------------------------------------------------------------------------------------------
# conversion


def _config_of(model: nn.Module) -> QATConfig:
    config = getattr(model, CONFIG_ATTR, None)
    if config is None or not fake_layers(model):
        raise CompressError("the model has no fake-quant layers; call compress.qat.prepare before training")
    return config


def packed_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """The checkpoint's tensors: packed layers in the config's format, everything else as it is."""
    from ..quant.bnb_format import bnb_tensors
    from ..quant.formats import gptq_tensors

    config = _config_of(model)
    layers = fake_layers(model)
    out: dict[str, torch.Tensor] = {}
    for name, layer in layers.items():
        if config.method == "int":
            packed = gptq_tensors(layer.int_result(), layer.bias)
        else:
            packed = bnb_tensors(layer.nf4_result(), layer.bias)
        out.update({f"{name}.{suffix}": t for suffix, t in packed.items()})
    owned = tuple(f"{name}." for name in layers)
    seen: set[int] = set()
    for key, tensor in model.state_dict().items():
        if key.startswith(owned):
            continue
        ptr = tensor.data_ptr()
        if ptr in seen and tensor.numel():  # tied weights are written once, as save_pretrained does
            continue
        seen.add(ptr)
        out[key] = tensor.detach()
    return out


def quantization_config(model: nn.Module) -> dict:
    """config.json's quantization_config for the converted checkpoint."""
    from ..quant.bnb_format import bnb_quantization_config
    from ..quant.formats import gptq_quantization_config
    from ..quant.nf4_apply import full_precision_linears

    config = _config_of(model)
    layers = fake_layers(model)
    if config.method == "nf4":
        floating = full_precision_linears(model, set(layers))
        return bnb_quantization_config("nf4", config.double_quant, "float32", config.blocksize, floating)
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    quant = gptq_quantization_config(config.spec(), method="qat", extra_meta={"qat": config.to_dict()})
    quant["lm_head"] = head is not None and any(m is head for m in layers.values())
    return quant


def convert(model: nn.Module, out: str | Path, *, source: str | Path | None = None, tokenizer=None,
            overwrite: bool = False, info: dict | None = None) -> Path:
    """Write the prepared (trained) ``model`` as a packed checkpoint folder ``out``; returns its path.

    Integer layers go to the GPTQ v1 layout (REFERENCES.md section 1), NF4 layers to the bitsandbytes
    4-bit layout, with every other tensor in its training dtype. ``source`` (the folder the model was
    loaded from) provides the tokenizer and side files such as sentence-transformers' pooling;
    otherwise ``tokenizer`` is saved; ``info`` is written as qat_config.json. The model is not changed.
    """
    from ..checkpoint import ShardWriter
    from ..files import copy_side_files
    from ..outputs import atomic_output

    config = _config_of(model)  # activation fake-quant is not stored: the formats hold weights only
    tensors = packed_tensors(model)
    quant = quantization_config(model)
    out = Path(out)
    with atomic_output(out, overwrite, inputs=[source] if source is not None else [], command="qat") as tmp:
        writer = ShardWriter(tmp)
        for key, tensor in tensors.items():
            writer.add(key, tensor)
        writer.close()
        model_config = model.config.to_dict()
        model_config["quantization_config"] = quant
        dtype = str(next(iter(model.parameters())).dtype).removeprefix("torch.")
        model_config["torch_dtype"] = dtype
        if "dtype" in model_config:
            model_config["dtype"] = dtype
        (tmp / "config.json").write_text(json.dumps(model_config, indent=2, default=str) + "\n")
        if config.method == "int":
            (tmp / "quantize_config.json").write_text(json.dumps(quant, indent=2) + "\n")
        if source is not None:
            copy_side_files(Path(source), tmp)
        elif tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
        if info is not None:
            (tmp / "qat_config.json").write_text(json.dumps(info, indent=2, default=str) + "\n")
    return out
