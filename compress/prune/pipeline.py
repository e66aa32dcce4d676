"""One-shot pruning of a model folder into a new folder: the file-to-file path behind `compress prune`.

Magnitude pruning needs no data, so it streams the checkpoint tensor by tensor (with a first pass over
the target weights for the global threshold). Wanda and SparseGPT run the shared calibration runner
(compress/calibrate.py): one block in memory at a time, each block's Linear layers pruned in the order
they run, so later layers see the already-pruned earlier ones, and each finished block written before
the next is loaded. Either way the output holds the sparse weights (bitmask + values, or dense with
zeros), config.json with ``sparsity_config``, and every other file of the input; it is built in a
temporary sibling and renamed into place, and the input is only read.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path


from ..checkpoint import DEFAULT_SHARD_BYTES, CheckpointReader, ShardWriter, check_finite, copy_side_files
from ..outputs import atomic_output
from ..models import (DEFAULT_MODEL_NAME, plan_block_linears, is_conv1d,
                      linear_shape, read_config_dict, resolve_device, resolve_model_path)
from . import sparse_format
from .unstructured import (LayerSparsity, PruneConfig, check_pattern_fits, global_threshold, magnitude_mask,
                           threshold_mask)


@dataclass
class PruneTarget:
    """One Linear layer chosen for pruning."""

    name: str  # module name in the model
    key: str  # checkpoint key of its weight
    in_features: int
    out_features: int
    conv1d: bool  # GPT-2 Conv1D: weight stored [in, out]
    spec: LayerSparsity


@dataclass
class PruneReport:
    """What a pruning run did: per layer, the fraction of zeros reached (checkpoint key -> sparsity)."""

    source: Path
    output: Path
    method: str
    target: str
    layers: dict[str, float] = field(default_factory=dict)
    skipped: list[str] = field(default_factory=list)
    sparsity: float = 0.0  # over all pruned layers, weighted by size
    seconds: float = 0.0
    bytes_before: int = 0
    bytes_after: int = 0
    notes: list[str] = field(default_factory=list)

    def summary(self) -> str:
        lines = [f"pruned {len(self.layers)} layers of {self.source} with {self.method} ({self.target}) to "
                 f"{self.sparsity:.1%} sparsity in {self.seconds:.1f} s -> {self.output}"]
        if self.layers:
            lo, hi = min(self.layers.values()), max(self.layers.values())
            if hi - lo > 1e-3:
                lines.append(f"per-layer sparsity from {lo:.1%} to {hi:.1%}")
        if self.skipped:
            lines.append(f"left dense by --skip: {len(self.skipped)} layers")
        if self.bytes_before and self.bytes_after:
            lines.append(f"weights on disk: {self.bytes_before / 1e6:.1f} MB -> {self.bytes_after / 1e6:.1f} MB")
        lines += self.notes
        return "\n".join(lines)


def default_output(source: Path, config: PruneConfig) -> Path:
    """``<model>-<method>-<sparsity>`` in the current folder."""
    from ..quant.apply import _is_default

    name = DEFAULT_MODEL_NAME if _is_default(source) else source.name
    return Path.cwd() / f"{name}-{config.label}"


def plan_targets(source: Path, config: PruneConfig, reader: CheckpointReader, trust_remote_code: bool = False):
    """(targets, skipped, skeleton, key_of): the Linear layers of the repeated blocks and how each is pruned."""
    _, skeleton, key_of, chosen, skipped = plan_block_linears(
        source, reader, config.sparsity_for, blocks=config.blocks, trust_remote_code=trust_remote_code,
        verb="prune", quantized_hint="prune its full-precision original, then quantize")
    targets = []
    for name, module, key, _, spec in chosen:
        k, n = linear_shape(module)
        check_pattern_fits(name, k, spec)
        targets.append(PruneTarget(name, key, k, n, is_conv1d(module), spec))
    return targets, skipped, skeleton, key_of


def write_config(source: Path, out: Path, section: dict) -> None:
    """config.json with ``sparsity_config``, and the input's other files."""
    config = read_config_dict(source)
    config["sparsity_config"] = section
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    copy_side_files(source, out)


def _weights_bytes(folder: Path) -> int:
    from ..eval.measure import weights_bytes

    return weights_bytes(folder)


def prune(model=None, out=None, config: PruneConfig | None = None, *, device: str = "auto", overwrite: bool = False,
          trust_remote_code: bool = False, progress: bool = True, max_shard_bytes: int = DEFAULT_SHARD_BYTES) -> PruneReport:
    """Prune the model folder ``model`` into ``out`` in one shot (no retraining).

    Args:
        model: local model folder (None: the embedded default model). Only read, never modified.
        out: output folder (default ``./<model>-<method>-<sparsity>``); refused if it exists unless ``overwrite``.
        config: the PruneConfig (method, sparsity or N:M pattern, overrides, calibration).
        device: where the arithmetic runs: 'auto', 'cpu' or 'cuda'.

    Returns:
        A PruneReport; the folder loads with ``compress.load(out)`` (and, with storage 'dense', with
        stock transformers).
    """
    config = config or PruneConfig()
    source = resolve_model_path(model)
    dev = resolve_device(device)
    out_path = Path(out) if out else default_output(source, config)
    start = time.perf_counter()
    with CheckpointReader(source) as reader:
        targets, skipped, skeleton, key_of = plan_targets(source, config, reader, trust_remote_code)
        with atomic_output(out_path, overwrite, inputs=[source], command="prune") as tmp:
            writer = ShardWriter(tmp, max_shard_bytes)
            if config.method == "magnitude":
                stats = _prune_magnitude(reader, targets, config, writer, dev)
            else:
                stats = _prune_calibrated(source, reader, targets, skeleton, key_of, config, writer, dev,
                                          trust_remote_code, progress)
            writer.close()
            extra = {"scope": config.scope} if config.method == "magnitude" else {
                "calibration": config.calib, "nsamples": config.nsamples, "seqlen": stats.pop("__seqlen__", None)}
            if config.skip:
                extra["skip"] = config.skip
            if config.overrides:
                extra["overrides"] = config.overrides
            section = sparse_format.sparsity_config(config.method, config.target.label, stats,
                                                    config.storage == "sparse", **extra)
            write_config(source, tmp, section)
    report = PruneReport(source, out_path.absolute(), config.method, config.target.label,
                         {k: z / n for k, (z, n) in stats.items()}, skipped, section["sparsity"],
                         time.perf_counter() - start, _weights_bytes(source), _weights_bytes(out_path))
    return report


def _prune_magnitude(reader, targets, config: PruneConfig, writer, dev) -> dict[str, tuple[int, int]]:
    """Stream every tensor: target weights pruned by magnitude (per layer or one global threshold)."""
    by_key = {t.key: t for t in targets}
    threshold = None
    if config.scope == "global":
        threshold = global_threshold([reader.get(t.key).abs() for t in targets], config.target.sparsity)
    stats = {}
    for key in reader.keys():
        tensor = reader.get(key)
        check_finite(key, tensor)
        target = by_key.get(key)
        if target is None:
            writer.add(key, tensor)
            continue
        w = (tensor.t() if target.conv1d else tensor).to(dev)
        mask = threshold_mask(w, threshold) if threshold is not None else magnitude_mask(w, target.spec)
        pruned = (w * mask).to(tensor.dtype).cpu()
        pruned = pruned.t().contiguous() if target.conv1d else pruned
        stats[key] = (int((pruned == 0).sum()), pruned.numel())
        sparse_format.add_weight(writer, key, pruned, config.storage == "sparse")
    return stats


def _prune_calibrated(source, reader, targets, skeleton, key_of, config: PruneConfig, writer, dev, trust_remote_code,
                      progress) -> dict[str, tuple[int, int]]:
    """Wanda / SparseGPT through the calibration runner, block by block, straight into the writer."""
    from ..calibrate import Runner, calibration_precision
    from ..config import GPTQConfig
    from ..data import calibration
    from ..models import load_tokenizer
    from ..quant.gptq_model import calibration_seqlen

    seqlen = calibration_seqlen(GPTQConfig(seqlen=config.seqlen), skeleton.config)
    samples = calibration(load_tokenizer(source, trust_remote_code), config.calib, config.nsamples, seqlen, config.seed,
                          text_field=config.text_field)
    specs = {t.name: t.spec for t in targets}
    if config.method == "wanda":
        from .wanda import WandaMethod

        method = WandaMethod(specs)
    else:
        from .sparsegpt import SparseGPTMethod

        method = SparseGPTMethod(specs, damp=config.damp, block_size=config.block_size)
    # float32 on the CPU: how Wanda's and SparseGPT's choices fare with bfloat16 forwards is not measured yet
    dtype, _ = calibration_precision(dev, reader, "float32" if dev.type == "cpu" else "auto")
    runner = Runner(skeleton, reader, key_of, device=dev, dtype=dtype, blocks=config.blocks,
                    batch_size=config.calib_batch_size)
    by_name = {t.name: t for t in targets}
    bar = _progress_bar(len(targets), progress)
    stats: dict = {}
    written: set[str] = set()
    for block in runner.run(samples, method, progress=(lambda name, _: bar.update(1)) if bar else None):
        for name in block.order:
            target = by_name[name]
            stored_dtype = reader.info(target.key)[0]
            weight = block.module.get_submodule(name[len(block.prefix) + 1:]).weight.detach()
            pruned = weight.to(stored_dtype).cpu().contiguous()
            stats[target.key] = (int((pruned == 0).sum()), pruned.numel())
            sparse_format.add_weight(writer, target.key, pruned, config.storage == "sparse")
            written.add(target.key)
        for pname in block.module.state_dict(keep_vars=True):
            key = key_of.get(f"{block.prefix}.{pname}")
            if key is not None and key not in written:
                writer.add(key, reader.get(key))
                written.add(key)
    for key in reader.keys():
        if key not in written:
            tensor = reader.get(key)
            check_finite(key, tensor)
            writer.add(key, tensor)
    if bar is not None:
        bar.close()
    stats["__seqlen__"] = seqlen
    return stats


def _progress_bar(total: int, enabled: bool):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="prune", unit="layer", leave=False)
