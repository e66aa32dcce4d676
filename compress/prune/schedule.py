"""Pruning schedules: one-shot, gradual (Zhu and Gupta's cubic schedule during training), iterative rounds.

- ``oneshot``: prune once (compress.prune.pipeline.prune), then optionally retrain with the masks fixed.
- ``cubic``: start dense and raise each layer's sparsity along s_t = s_f (1 - (1 - t/T)^3) while training
  (Zhu and Gupta, "To prune, or not to prune", 2017): every ``every`` steps the masks are recomputed by
  magnitude over the weights as trained so far, for the first 3/4 of the steps (T); the last quarter
  trains with the final masks fixed. Magnitude only: the scores must be cheap enough to recompute.
- ``iterative``: R rounds of prune (any method, on the current weights, to the cubic schedule's
  sparsity at round r) then retrain (steps / R) with the masks fixed; pruned weights never come back.

Retraining runs in memory; the result is written once at the end, as one-shot pruning writes it.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import torch

from ..checkpoint import DEFAULT_SHARD_BYTES, CheckpointReader, ShardWriter
from ..outputs import atomic_output, check_output, scratch_folder
from ..errors import CompressError
from ..models import LoadedModel, checkpoint_key_map, load, resolve_model_path
from . import sparse_format
from .pipeline import PruneReport, default_output, plan_targets, prune, write_config
from .retrain import RetrainOptions, masks_from_zeros, retrain
from .unstructured import (SCHEDULES, LayerSparsity, PruneConfig, cubic_sparsity, global_threshold, magnitude_mask,
                           threshold_mask)

PRUNE_FRACTION = 0.75  # share of the steps during which the gradual schedule prunes


def check_schedule(schedule: str, config: PruneConfig, options: RetrainOptions | None, rounds: int) -> None:
    """Refuse combinations that cannot run, before any work starts."""
    if schedule not in SCHEDULES:
        raise CompressError(f"--schedule {schedule} is not one of {', '.join(SCHEDULES)}")
    if schedule == "oneshot":
        return
    if options is None:
        raise CompressError(f"--schedule {schedule} interleaves pruning with training: add --retrain --data SRC")
    if config.target.pattern is not None or any("pattern" in v for v in config.overrides.values()):
        raise CompressError("an N:M pattern is reached in one step; use --schedule oneshot (with --retrain) for --pattern")
    if schedule == "cubic" and config.method != "magnitude":
        raise CompressError("--schedule cubic recomputes masks by magnitude during training; use --method magnitude, "
                            "or --schedule iterative for wanda and sparsegpt")
    if schedule == "iterative" and rounds < 1:
        raise CompressError(f"--rounds must be at least 1, got {rounds}")
    if schedule == "iterative" and options.steps < rounds:
        raise CompressError(f"--steps {options.steps} cannot be shared by {rounds} rounds; give at least one step per round")


def scaled(config: PruneConfig, fraction: float) -> PruneConfig:
    """The config with every sparsity (default and overrides) multiplied by ``fraction`` (no patterns)."""
    overrides = {k: {"sparsity": v["sparsity"] * fraction} for k, v in config.overrides.items()}
    return dataclasses.replace(config, sparsity=config.target.sparsity * fraction, overrides=overrides)


def save_pruned(loaded: LoadedModel, source: Path, out: Path, config: PruneConfig, names: list[str], *, overwrite: bool,
                extra: dict | None = None, max_shard_bytes: int = DEFAULT_SHARD_BYTES, atomic: bool = True) -> dict:
    """Write ``loaded.model`` under the input checkpoint's tensor names; the layers ``names`` sparse.

    Returns the sparsity_config written to config.json.
    """
    state = loaded.model.state_dict()
    with CheckpointReader(source) as reader:
        key_of = checkpoint_key_map(loaded.model, reader.keys())
    pruned_keys = {key_of[f"{n}.weight"] for n in names}
    stats = {}
    seen: set[str] = set()
    with atomic_output(out, overwrite, inputs=[source], command="prune") as tmp:
        writer = ShardWriter(tmp, max_shard_bytes)
        for pname, key in key_of.items():
            if key in seen:
                continue
            seen.add(key)
            tensor = state[pname].detach().cpu().contiguous()
            if key in pruned_keys:
                stats[key] = (int((tensor == 0).sum()), tensor.numel())
                sparse_format.add_weight(writer, key, tensor, config.storage == "sparse")
            else:
                writer.add(key, tensor)
        writer.close()
        section = sparse_format.sparsity_config(config.method, config.target.label, stats, config.storage == "sparse",
                                                **(extra or {}))
        write_config(source, tmp, section)
    return section


def magnitude_masks(model: torch.nn.Module, specs: dict[str, LayerSparsity], fraction: float, scope: str) -> dict:
    """Magnitude keep-masks of the layers ``specs`` at ``fraction`` of each layer's target sparsity."""
    weights = {n: model.get_submodule(n).weight.detach() for n in specs}
    if scope == "global":
        target = next(iter(specs.values())).sparsity * fraction
        threshold = global_threshold([w.abs() for w in weights.values()], target)
        return {n: threshold_mask(w, threshold) for n, w in weights.items()}
    return {n: magnitude_mask(w, LayerSparsity(specs[n].sparsity * fraction)) for n, w in weights.items()}


def run_schedule(model, out, config: PruneConfig, *, schedule: str = "oneshot", options: RetrainOptions | None = None,
                 rounds: int = 3, device: str = "auto", overwrite: bool = False, trust_remote_code: bool = False,
                 progress: bool = True) -> PruneReport:
    """Prune ``model`` into ``out`` on ``schedule``, retraining with ``options`` when given (see the module docstring)."""
    check_schedule(schedule, config, options, rounds)
    if schedule == "oneshot" and options is None:
        return prune(model, out, config, device=device, overwrite=overwrite, trust_remote_code=trust_remote_code,
                     progress=progress)
    source = resolve_model_path(model)
    out_path = Path(out) if out else default_output(source, config)
    check_output(out_path, inputs=[source], overwrite=overwrite)
    start = time.perf_counter()
    with CheckpointReader(source) as reader:
        targets, skipped, _, _ = plan_targets(source, config, reader, trust_remote_code)
    names = [t.name for t in targets]
    teacher = load(source, device=device, trust_remote_code=trust_remote_code) if options.distill else None
    metrics: dict = {}
    with scratch_folder(out_path) as work:
        dense = dataclasses.replace(config, storage="dense")
        if schedule == "cubic":
            loaded = load(source, device=device, trust_remote_code=trust_remote_code)
            metrics = _gradual(loaded, config, {t.name: t.spec for t in targets}, options, teacher, device, progress)
        else:
            current = source
            total = 1 if schedule == "oneshot" else rounds
            for r in range(1, total + 1):
                fraction = 1.0 if schedule == "oneshot" else cubic_sparsity(r, total, 1.0)
                step_cfg = dense if fraction == 1.0 else scaled(dense, fraction)
                pruned_dir = work / f"round-{r}"
                prune(current, pruned_dir, step_cfg, device=device, trust_remote_code=trust_remote_code, progress=progress)
                loaded = load(pruned_dir, device=device, trust_remote_code=trust_remote_code)
                steps = options.steps // total + (1 if r <= options.steps % total else 0)
                metrics = retrain(loaded, options, masks=masks_from_zeros(loaded.model, names), teacher=teacher,
                                  steps=steps, device=device, progress=progress)
                if r < total:
                    current = work / f"retrained-{r}"
                    save_pruned(loaded, source, current, dense, names, overwrite=False)
        extra = {"schedule": schedule, "retrain": {"data": options.data, "steps": options.steps,
                                                   "distill": options.distill},
                 **({"rounds": rounds} if schedule == "iterative" else {})}
        section = save_pruned(loaded, source, out_path, config, names, overwrite=overwrite, extra=extra)
    from .pipeline import _weights_bytes

    report = PruneReport(source, out_path.absolute(), config.method, config.target.label, dict(section["layers"]), skipped,
                         section["sparsity"], time.perf_counter() - start, _weights_bytes(source), _weights_bytes(out_path))
    if "train_loss" in metrics:
        report.notes.append(f"retrained ({schedule}, {options.steps} steps{', distilled' if options.distill else ''}): "
                            f"final training loss {metrics['train_loss']:.4f}")
    return report


def _gradual(loaded: LoadedModel, config: PruneConfig, specs: dict[str, LayerSparsity], options: RetrainOptions,
             teacher, device, progress) -> dict:
    """Train for options.steps steps while the masks follow the cubic schedule (magnitude)."""
    horizon = max(1, int(options.steps * PRUNE_FRACTION))
    every = max(1, horizon // 10)
    masks = {n: torch.ones_like(loaded.model.get_submodule(n).weight, dtype=torch.bool) for n in specs}

    def tighten(step: int) -> None:
        if step == 0 or step > horizon or (step % every and step != horizon):
            return
        fraction = cubic_sparsity(step, horizon, 1.0)
        for name, mask in magnitude_masks(loaded.model, specs, fraction, config.scope).items():
            masks[name].copy_(mask & masks[name])  # pruned weights stay pruned

    # horizon <= steps, so the final masks are in place before the last quarter of the steps
    return retrain(loaded, options, masks=masks, teacher=teacher, on_step=tighten, device=device, progress=progress)
