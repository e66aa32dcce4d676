"""The evaluation harness: size, bits per weight, parameters, peak memory, latency, accuracy and KL of
any models, side by side. Every command ends with it; nothing else measures these things its own way.

Models are evaluated one after another in this process; each is loaded, measured and released before
the next, and its peak memory is the resident-set growth over what was in use before it was loaded.
The first model is the reference: the others' KL divergence, embedding cosine and agreement are
computed against its outputs.
"""

from __future__ import annotations

import gc
import time
from pathlib import Path

import torch

from ..config import EvalConfig
from ..errors import CompressError
from ..models import LoadedModel, load, resolve_device
from . import measure
from .report import ModelResult, Report
from .tasks import EVALUATORS


def describe_quantization(quant: dict | None, dtype: torch.dtype | None = None) -> str:
    """Short label of a model's format: 'fp32', 'rtn w4 g128', 'gptq w3 g128 asym' ..."""
    if not quant:
        return {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}.get(dtype, "full")
    method = quant.get("meta", {}).get("method") or quant.get("quant_method", "?")
    if quant.get("quant_method") == "gptq":
        group = quant.get("group_size", -1)
        label = f"{method} w{quant.get('bits')} g{'pc' if group == -1 else group}"
        if not quant.get("sym", True):
            label += " asym"
        if quant.get("desc_act"):
            label += " act"
        return label
    if quant.get("quant_method") == "bitsandbytes":  # 'nf4 b64 dq'; the block size is ours to record
        if quant.get("load_in_8bit") or quant.get("_load_in_8bit"):
            return "bnb int8"
        block = quant.get("meta", {}).get("blocksize")
        label = str(quant.get("bnb_4bit_quant_type", "fp4")) + (f" b{block}" if block else "")
        return label + (" dq" if quant.get("bnb_4bit_use_double_quant") else "")
    return str(method)


def _sparsity_label(path: Path) -> str:
    """' 2:4' or ' 50% sparse' for a pruned model (config.json's sparsity_config), else ''."""
    import json

    try:
        section = json.loads((Path(path) / "config.json").read_text()).get("sparsity_config") or {}
    except (OSError, ValueError):
        return ""
    if not section:
        return ""
    target = str(section.get("target", ""))
    return f" {target}" if ":" in target else f" {section.get('sparsity', 0):.0%} sparse"


def _stored_dtype(loaded: LoadedModel) -> torch.dtype | None:
    from ..checkpoint import CheckpointReader

    with CheckpointReader(loaded.path) as reader:
        for key in reader.keys():
            dtype, _ = reader.info(key)
            if dtype.is_floating_point:
                return dtype
    return None


def evaluate_one(item, cfg: EvalConfig, ref: dict | None, device: torch.device, trust_remote_code: bool = False):
    """Measure one model (a path or a LoadedModel); returns (ModelResult, outputs for later comparison).

    Peak memory is the larger of the growth while loading and the model's resident size plus the growth
    while running the latency workload (prefill and decode, or one encoder batch). That workload runs
    after the accuracy evaluation, so one-time costs of a first forward pass are not counted.
    """
    from ..qat.lora import is_adapter_folder, load_with_adapters

    start = time.perf_counter()
    adapters = None if isinstance(item, LoadedModel) or item is None or not is_adapter_folder(item) else Path(item)
    with measure.PeakMemory(device) as load_mem:
        if isinstance(item, LoadedModel):
            loaded = item
        elif adapters is not None:  # LoRA adapters on a quantized base: measured as base plus adapters
            loaded = load_with_adapters(adapters, device=str(device))
        else:
            loaded = load(item, device=device, trust_remote_code=trust_remote_code)
    metrics, outputs = EVALUATORS[loaded.kind](loaded, cfg, ref)
    repeats, warmup = (cfg.repeats, cfg.warmup) if cfg.latency else (1, 0)
    with measure.PeakMemory(device) as run_mem:
        if loaded.kind == "causal":
            latency = measure.causal_latency(loaded, cfg.seqlen, cfg.decode_tokens, repeats, warmup)
            if cfg.latency:  # 4-bit models: decode speed under each kernel that can run them
                latency.update(measure.decode_by_kernel(loaded, cfg.decode_tokens, repeats, warmup))
        else:
            latency = measure.encoder_latency(loaded, cfg.batch_size, cfg.latency_seqlen, repeats, warmup)
    if not cfg.latency:
        latency = {}
    peak = None
    if load_mem.peak is not None and run_mem.peak is not None:
        peak = max(load_mem.peak, (load_mem.end or 0) + run_mem.peak)
    label = describe_quantization(loaded.quantization, _stored_dtype(loaded)) + _sparsity_label(loaded.path)
    weights, folder = measure.weights_bytes(loaded.path), measure.folder_bytes(loaded.path)
    if adapters is not None:
        label += f" +lora r{_adapter_rank(adapters)}"
        weights, folder = weights + measure.weights_bytes(adapters), folder + measure.folder_bytes(adapters)
    result = ModelResult(
        name=adapters.name if adapters is not None else loaded.name,
        path=str(adapters if adapters is not None else loaded.path),
        kind=loaded.kind,
        quantization=label,
        weights_bytes=weights,
        folder_bytes=folder,
        bits_per_weight=_adapted_bits(loaded, adapters) if adapters is not None else measure.bits_per_weight(loaded),
        params=measure.count_parameters(loaded.model),
        peak_bytes=peak,
        latency=latency,
        metrics=metrics,
        seconds=time.perf_counter() - start,
    )
    return result, outputs


def _adapted_bits(loaded: LoadedModel, adapters: Path) -> float | None:
    """Bits per weight of the base's quantized layers plus the adapters' stored bits spread over them."""
    import dataclasses

    from ..quant.linear import QuantModule

    base = loaded.model.get_base_model()
    bits = measure.bits_per_weight(dataclasses.replace(loaded, model=base))
    weights = sum(m.num_weights for m in base.modules() if isinstance(m, QuantModule))
    if bits is None or not weights:
        return None
    return bits + 8 * measure.weights_bytes(adapters) / weights


def _adapter_rank(folder: Path) -> str:
    import json

    try:
        return str(json.loads((folder / "adapter_config.json").read_text()).get("r", "?"))
    except (OSError, ValueError):
        return "?"


def _warm_up(models, cfg: EvalConfig, trust_remote_code: bool) -> None:
    """Check every model and pay one-time costs before any measurement (reading the evaluation text,
    importing each model's code, starting its tokenizer), so a bad input stops the run before the first
    model is measured and that model's memory and time are not inflated by them."""
    from ..models import check_folder, load_tokenizer
    from ..qat.lora import adapter_info, is_adapter_folder
    from .tasks import _heldout

    kinds = {}
    for item in models:
        if isinstance(item, LoadedModel):
            kinds[item.kind] = item.name
            continue
        if item is not None and is_adapter_folder(item):  # check and warm up the base the adapters belong to
            item = adapter_info(item)["base"]
        path, kind = check_folder(item, trust_remote_code)
        kinds.setdefault(kind, path.name)
        load_tokenizer(path, trust_remote_code)
    if len(kinds) > 1:
        listed = ", ".join(f"{name} is {kind}" for kind, name in kinds.items())
        raise CompressError(f"models of different kinds cannot be compared in one table ({listed})")
    if not cfg.labeled:
        _heldout(cfg)


def compare(models, config: EvalConfig | None = None, *, trust_remote_code: bool = False, progress: bool = True) -> Report:
    """Evaluate ``models`` (paths, or LoadedModel objects) side by side; the first is the reference.

    Args:
        models: model folders (None for the embedded default model) or already loaded models.
        config: what to measure (EvalConfig defaults: held-out built-in corpus, latency on).
        progress: print one line per model to stderr as it finishes.

    Returns:
        A Report; ``report.table()`` is what the CLI prints.
    """
    cfg = config or EvalConfig()
    if not models:
        raise CompressError("evaluation needs at least one model")
    device = resolve_device(cfg.device)
    _warm_up(models, cfg, trust_remote_code)
    results, ref = [], None
    kinds = set()
    for i, item in enumerate(models):
        result, outputs = evaluate_one(item, cfg, ref, device, trust_remote_code)
        kinds.add(result.kind)
        if len(kinds) > 1:
            raise CompressError(f"models of different kinds cannot be compared ({', '.join(sorted(kinds))})")
        if i == 0:
            ref = outputs
        results.append(result)
        if progress:
            import sys

            print(f"evaluated {result.name} in {result.seconds:.1f} s", file=sys.stderr)
        del outputs
        gc.collect()
    _disambiguate(results)
    return Report(results=results, device=str(device), config=cfg.to_dict())


def _disambiguate(results: list[ModelResult]) -> None:
    """Give rows that share a folder name the parent folder too, so the table tells them apart."""
    names = [r.name for r in results]
    for r in results:
        if names.count(r.name) > 1 and r.path:
            parent = Path(r.path).parent.name
            r.name = f"{parent}/{r.name}" if parent else r.name

