"""Quantize a model folder into a GPTQ-format folder: the entry point behind `compress quantize`.

Round-to-nearest needs no data, so it streams the checkpoint tensor by tensor: each Linear weight inside
the repeated blocks is quantized as it is read and written straight into the output shards; every other
tensor is copied. Memory stays at one tensor plus one output shard, whatever the model's size.

The output folder holds the sharded safetensors, config.json with ``quantization_config``,
quantize_config.json, and every other file of the input (tokenizer, generation config, pooling).
It is built in a temporary sibling and renamed into place; the input is only read.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..checkpoint import DEFAULT_SHARD_BYTES, CheckpointReader, ShardWriter, check_finite, copy_side_files
from ..outputs import atomic_output
from ..config import GPTQConfig, RTNConfig, WeightQuantConfig
from ..errors import CompressError
from ..models import (DEFAULT_MODEL_NAME, plan_block_linears, default_model_path,
                      is_conv1d, linear_shape, read_config_dict, resolve_device,
                      resolve_model_path)
from .formats import gptq_quantization_config, gptq_tensors, vllm_refusals
from .primitives import QuantSpec, quantize_groups


@dataclass
class LayerTarget:
    """One Linear layer chosen for quantization."""

    name: str  # module name in the model
    key: str  # checkpoint key of its weight
    bias_key: str | None
    in_features: int
    out_features: int
    conv1d: bool  # GPT-2 Conv1D: weight stored [in, out]
    spec: QuantSpec
    block: int


@dataclass
class LayerReport:
    name: str
    in_features: int
    out_features: int
    bits: int
    group_size: int
    loss: float | None = None
    vllm: list[str] = field(default_factory=list)


@dataclass
class QuantizeReport:
    """What a quantization run did."""

    source: Path
    output: Path
    method: str
    config: dict
    layers: list[LayerReport]
    skipped: list[str]
    seconds: float

    def vllm_refused(self) -> list[LayerReport]:
        return [layer for layer in self.layers if layer.vllm]

    def summary(self) -> str:
        lines = [f"quantized {len(self.layers)} layers of {self.source} with {self.method} in {self.seconds:.1f} s -> {self.output}"]
        losses = [layer for layer in self.layers if layer.loss is not None]
        if losses:
            worst = max(losses, key=lambda layer: layer.loss)
            mean = sum(layer.loss for layer in losses) / len(losses)
            lines.append(f"reconstruction loss: mean {mean:.4g}, largest {worst.loss:.4g} ({worst.name})")
        if self.skipped:
            lines.append(f"kept in full precision by --skip: {len(self.skipped)} layers")
        refused = self.vllm_refused()
        if refused:
            lines.append(f"vLLM's GPTQ kernels would refuse {len(refused)} layers:")
            lines += [f"  {layer.name}: {'; '.join(layer.vllm)}" for layer in refused[:20]]
            if len(refused) > 20:
                lines.append(f"  ... and {len(refused) - 20} more")
        return "\n".join(lines)


def default_output(source: Path, config: WeightQuantConfig) -> Path:
    """``<model>-<method>-w<bits>g<group>`` in the current folder."""
    name = DEFAULT_MODEL_NAME if _is_default(source) else source.name
    group = "pc" if config.group_size == -1 else str(config.group_size)
    return Path.cwd() / f"{name}-{config.method}-w{config.bits}g{group}"


def _is_default(source: Path) -> bool:
    try:
        return source == default_model_path()
    except CompressError:
        return False


def plan_targets(source: Path, config: WeightQuantConfig, reader: CheckpointReader, trust_remote_code: bool = False):
    """(kind, targets, skipped, skeleton, key_of): the Linear layers of the repeated blocks and how each
    is quantized, the model's skeleton and the map from its state-dict names to checkpoint keys."""
    kind, skeleton, key_of, chosen, skipped = plan_block_linears(
        source, reader, config.spec_for, blocks=config.blocks, trust_remote_code=trust_remote_code)
    targets = []
    for name, module, key, block, spec in chosen:
        k, n = linear_shape(module)
        bias_key = key_of.get(f"{name}.bias") if module.bias is not None else None
        targets.append(LayerTarget(name, key, bias_key, k, n, is_conv1d(module), spec, block))
    return kind, targets, skipped, skeleton, key_of


def output_dtype(choice: str, reader: CheckpointReader) -> torch.dtype:
    """dtype for the unquantized floating-point tensors of the output (see WeightQuantConfig.dtype)."""
    if choice != "auto":
        return getattr(torch, choice)
    stored = {reader.info(k)[0] for k in reader.keys()}
    return torch.bfloat16 if torch.bfloat16 in stored else torch.float16


def cast_floating(tensor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Floating-point tensors in ``dtype``; integer tensors (ids, masks) untouched."""
    return tensor.to(dtype) if tensor.is_floating_point() else tensor


def write_config_files(source: Path, out: Path, quantization_config: dict, dtype: torch.dtype | None = None) -> None:
    """config.json with quantization_config (and the output's dtype), quantize_config.json, and the
    input's other files."""
    config = read_config_dict(source)
    config["quantization_config"] = quantization_config
    if config.get("sparsity_config"):  # a pruned input: its zeros survive in the quantized codes, stored densely
        config["sparsity_config"] = {**config["sparsity_config"], "format": "dense"}
    if dtype is not None:
        name = str(dtype).removeprefix("torch.")
        config["torch_dtype"] = name
        if "dtype" in config:
            config["dtype"] = name
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    (out / "quantize_config.json").write_text(json.dumps(quantization_config, indent=2) + "\n")
    copy_side_files(source, out)


def quantize(
    model: str | Path | None = None,
    out: str | Path | None = None,
    config: WeightQuantConfig | None = None,
    *,
    device: str = "auto",
    overwrite: bool = False,
    trust_remote_code: bool = False,
    progress: bool = True,
    max_shard_bytes: int = DEFAULT_SHARD_BYTES,
) -> QuantizeReport:
    """Quantize the model folder ``model`` into ``out`` (GPTQ checkpoint layout).

    Args:
        model: local model folder (None: the embedded default model). Only read, never modified.
        out: output folder (default ``./<model>-<method>-w<bits>g<group>``); refused if it exists
            unless ``overwrite``.
        config: an RTNConfig (the default) or a GPTQConfig (calibrated, layer by layer).
        device: where the arithmetic runs: 'auto', 'cpu' or 'cuda'.
        progress: show a progress bar on stderr.
        max_shard_bytes: largest output shard.

    Returns:
        A QuantizeReport; the folder loads with ``compress.load(out)``.
    """
    config = config or RTNConfig()
    if isinstance(config, GPTQConfig):
        from .gptq_model import quantize_gptq

        return quantize_gptq(model, out, config, device=device, overwrite=overwrite, trust_remote_code=trust_remote_code,
                             progress=progress, max_shard_bytes=max_shard_bytes)
    if config.method == "nf4":  # 4-bit blockwise into the bitsandbytes layout: its own streaming writer
        from .nf4_apply import quantize_nf4

        return quantize_nf4(model, out, config, device=device, overwrite=overwrite, trust_remote_code=trust_remote_code,
                            progress=progress, max_shard_bytes=max_shard_bytes)
    if not isinstance(config, RTNConfig):
        raise CompressError(f"method '{config.method}' is not available; use rtn, gptq or nf4")
    source = resolve_model_path(model)
    dev = resolve_device(device)
    out_path = Path(out) if out else default_output(source, config)
    start = time.perf_counter()
    with CheckpointReader(source) as reader:
        kind, targets, skipped, _, _ = plan_targets(source, config, reader, trust_remote_code)
        by_key = {t.key: t for t in targets}
        bias_keys = {t.bias_key: t for t in targets if t.bias_key}
        dtype = output_dtype(config.dtype, reader)
        reports = []
        with atomic_output(out_path, overwrite, inputs=[source], command="quantize") as tmp:
            writer = ShardWriter(tmp, max_shard_bytes)
            for key in _progress(reader.keys(), progress, by_key):
                tensor = reader.get(key)
                check_finite(key, tensor)
                if key in by_key:
                    target = by_key[key]
                    w = tensor.t() if target.conv1d else tensor
                    result = quantize_groups(w.to(dev), target.spec)
                    bias = reader.get(target.bias_key) if target.bias_key else None
                    prefix = key[: -len(".weight")]
                    for suffix, value in gptq_tensors(result, bias).items():
                        writer.add(f"{prefix}.{suffix}", value)
                    reports.append(LayerReport(target.name, target.in_features, target.out_features, target.spec.bits,
                                               target.spec.group_size, None,
                                               vllm_refusals(target.name, target.in_features, target.out_features, target.spec)))
                elif key in bias_keys:
                    continue  # written with its layer, in float16 as the format prescribes
                else:
                    writer.add(key, cast_floating(tensor, dtype))
            writer.close()
            qcfg = gptq_quantization_config(config.spec, method=config.method, skip=config.skip, overrides=config.overrides)
            write_config_files(source, tmp, qcfg, dtype)
    return QuantizeReport(source, out_path.absolute(), config.method, config.to_dict(), reports, skipped,
                          time.perf_counter() - start)


def _progress(keys, enabled: bool, by_key):
    if not enabled:
        return keys
    from tqdm.auto import tqdm

    return tqdm(keys, desc="quantize", unit="tensor", leave=False)
