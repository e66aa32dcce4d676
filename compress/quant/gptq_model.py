"""GPTQ over a whole model: calibration data through the shared runner, one block at a time, straight
into GPTQ-format shards.

The model is never loaded whole: the runner builds its skeleton, loads one block at a time from the
checkpoint, and hands each finished block back here to be written before the next is loaded. Tensors
outside the blocks (embeddings, final norm, output head) are copied from the input as stored.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from ..calibrate import Runner, calibration_precision, default_offload_dir
from ..checkpoint import DEFAULT_SHARD_BYTES, CheckpointReader, ShardWriter, check_finite
from ..outputs import atomic_output
from ..config import GPTQConfig
from ..data import calibration
from ..errors import CompressError
from ..models import load_tokenizer, max_positions, read_config_dict, resolve_device, resolve_model_path
from .apply import (LayerReport, QuantizeReport, cast_floating, default_output, output_dtype, plan_targets,
                    write_config_files)
from .formats import gptq_quantization_config, gptq_tensors, vllm_refusals
from .gptq import accumulate_hessian, make_hessian, prepare_hessian, quantize_weight

DEFAULT_MAX_SEQLEN = 2048


class HessianObserver:
    """Accumulates H = 2/n sum x x^T over the inputs of one Linear layer (or of several that share them)."""

    def __init__(self, in_features: int, device: torch.device):
        self.hessian = make_hessian(in_features, device)
        self.count = 0
        self.prepared = None  # the factored inverse, shared by the layers that read this input

    def add_batch(self, inputs: torch.Tensor) -> None:
        self.count = accumulate_hessian(self.hessian, self.count, inputs)


class GPTQMethod:
    """The calibration runner's method for GPTQ: Hessian observers, quantize_weight as the solve."""

    def __init__(self, config: GPTQConfig, specs: dict, keep_zeros: bool = False):
        self.config = config
        self.specs = specs  # layer name -> QuantSpec
        self.keep_zeros = keep_zeros  # a pruned model: its zeros are a fixed mask that stays exactly zero

    def wants(self, name: str) -> bool:
        return name in self.specs

    def observer(self, in_features: int, device: torch.device) -> HessianObserver:
        return HessianObserver(in_features, device)

    def solve(self, name: str, weight: torch.Tensor, observer: HessianObserver):
        check_finite(f"{name}.weight", weight)
        cfg = self.config
        if observer.prepared is None:
            observer.prepared = prepare_hessian(observer.hessian, damp=cfg.damp, act_order=cfg.act_order, name=name)
        result = quantize_weight(weight, None, self.specs[name], static_groups=cfg.static_groups,
                                 block_size=cfg.block_size, mse=cfg.mse, name=name, prepared=observer.prepared,
                                 mask=(weight != 0) if self.keep_zeros else None)
        return result.dequantize(weight.dtype).to(weight.device), result


def calibration_seqlen(config: GPTQConfig, model_config) -> int:
    """--seqlen, checked against the model's positions; by default 2048 or the model's maximum."""
    limit = max_positions(model_config)
    if config.seqlen is None:
        return min(DEFAULT_MAX_SEQLEN, limit)
    if config.seqlen > limit:
        raise CompressError(f"--seqlen {config.seqlen} is beyond the model's {limit} positions; use --seqlen {limit} or less")
    window = getattr(model_config, "sliding_window", None)
    layer_types = set(getattr(model_config, "layer_types", None) or [])
    if len(layer_types) > 1 and window and config.seqlen > window:
        raise CompressError(f"this model mixes attention types across layers; calibrate with --seqlen {window} or less")
    return config.seqlen


def quantize_gptq(model, out, config: GPTQConfig, *, device: str = "auto", overwrite: bool = False,
                  trust_remote_code: bool = False, progress: bool = True,
                  max_shard_bytes: int = DEFAULT_SHARD_BYTES) -> QuantizeReport:
    """GPTQ-quantize the model folder ``model`` into ``out``; see compress.quantize for the arguments."""
    source = resolve_model_path(model)
    dev = resolve_device(device)
    out_path = Path(out) if out else default_output(source, config)
    start = time.perf_counter()
    with CheckpointReader(source) as reader:
        _, targets, skipped, skeleton, key_of = plan_targets(source, config, reader, trust_remote_code)
        seqlen = calibration_seqlen(config, skeleton.config)
        samples = calibration(load_tokenizer(source, trust_remote_code), config.calib, config.nsamples, seqlen,
                              config.seed, text_field=config.text_field)
        by_name = {t.name: t for t in targets}
        dtype = output_dtype(config.dtype, reader)
        method = GPTQMethod(config, {t.name: t.spec for t in targets},
                            keep_zeros=bool(read_config_dict(source).get("sparsity_config")))
        calib_dtype, autocast = calibration_precision(dev, reader, config.calib_dtype)
        runner = Runner(skeleton, reader, key_of, device=dev, dtype=calib_dtype, autocast=autocast, blocks=config.blocks,
                        batch_size=config.calib_batch_size,
                        offload_dir=default_offload_dir() if config.offload else None,
                        true_sequential=config.true_sequential)
        bar = _progress_bar(len(targets), progress)
        reports: dict[str, LayerReport] = {}

        def on_layer(name, result):
            if bar is not None:
                bar.set_postfix_str(f"{name} loss {result.loss:.4g}", refresh=False)
                bar.update(1)

        with atomic_output(out_path, overwrite, inputs=[source], command="quantize") as tmp:
            writer = ShardWriter(tmp, max_shard_bytes)
            written: set[str] = set()
            for block in runner.run(samples, method, progress=on_layer):
                if bar is not None:
                    bar.set_description(f"block {block.index + 1}/{len(runner.blocks)}")
                for name in block.order:
                    result, target = block.payloads[name], by_name[name]
                    bias = reader.get(target.bias_key) if target.bias_key else None
                    prefix = target.key[: -len(".weight")]
                    for suffix, value in gptq_tensors(result, bias).items():
                        writer.add(f"{prefix}.{suffix}", value)
                    written.update(k for k in (target.key, target.bias_key) if k)
                    reports[name] = LayerReport(name, target.in_features, target.out_features, target.spec.bits,
                                                target.spec.group_size, result.loss,
                                                vllm_refusals(name, target.in_features, target.out_features, target.spec))
                for pname in block.module.state_dict(keep_vars=True):
                    key = key_of.get(f"{block.prefix}.{pname}")
                    if key is not None and key not in written:
                        writer.add(key, cast_floating(reader.get(key), dtype))
                        written.add(key)
            for key in reader.keys():
                if key not in written:
                    tensor = reader.get(key)
                    check_finite(key, tensor)
                    writer.add(key, cast_floating(tensor, dtype))
            writer.close()
            qcfg = gptq_quantization_config(
                config.spec, method="gptq", desc_act=config.act_order, damp_percent=config.damp,
                static_groups=config.static_groups, true_sequential=config.true_sequential, skip=config.skip,
                overrides=config.overrides,
                extra_meta={"calibration": config.calib, "nsamples": config.nsamples, "seqlen": seqlen,
                            "mse": config.mse, "seed": config.seed,
                            "calib_dtype": str(autocast or calib_dtype).removeprefix("torch.")})
            write_config_files(source, tmp, qcfg, dtype)
        if bar is not None:
            bar.close()
    layers = [reports[t.name] for t in targets]
    return QuantizeReport(source, out_path.absolute(), "gptq", config.to_dict(), layers, skipped,
                          time.perf_counter() - start)


def _progress_bar(total: int, enabled: bool):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="block 1", unit="layer", leave=False)
