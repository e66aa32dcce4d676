"""Quantize a model folder to NF4 / FP4 in the bitsandbytes layout: the writer behind ``--method nf4``.

Data-free, so the checkpoint is streamed tensor by tensor: each Linear weight inside the repeated blocks
is cast to the output dtype, quantized as it is read and written straight into the output shards with
its quant_state tensors; every other tensor (biases included) is stored in the output dtype. That is
what transformers saves when it loads the model in that dtype and quantizes it. Memory stays at one
tensor plus one shard.

The output folder loads with ``compress.load`` and with ``transformers.AutoModel*.from_pretrained`` when
bitsandbytes is installed: config.json carries the bitsandbytes quantization_config, and every Linear
kept in full precision is listed in ``llm_int8_skip_modules`` so transformers leaves it alone.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path


from ..checkpoint import DEFAULT_SHARD_BYTES, CheckpointReader, ShardWriter, check_finite, copy_side_files
from ..outputs import atomic_output
from ..config import NF4Config
from ..models import DEFAULT_MODEL_NAME, default_model_path, linear_types, read_config_dict, resolve_device, resolve_model_path
from .apply import LayerReport, QuantizeReport, cast_floating, output_dtype, plan_targets
from .bnb_format import bnb_cpu_limits, bnb_quantization_config, bnb_tensors
from .nf4 import quantize_weight

@dataclass
class NF4QuantizeReport(QuantizeReport):
    """A QuantizeReport that also names the layers bitsandbytes' CPU kernels mishandle."""

    label: str = "nf4"
    bnb_cpu_limited: list[tuple[str, list[str]]] = field(default_factory=list)

    def summary(self) -> str:
        lines = [f"quantized {len(self.layers)} layers of {self.source} with {self.label} in {self.seconds:.1f} s -> {self.output}"]
        if self.skipped:
            lines.append(f"kept in full precision by --skip: {len(self.skipped)} layers")
        if self.bnb_cpu_limited:
            lines.append(f"bitsandbytes 0.50's CPU kernels mishandle {len(self.bnb_cpu_limited)} layers (quantized exactly as "
                         "bitsandbytes quantizes them; compress.load runs them correctly):")
            lines += [f"  {name}: {'; '.join(reasons)}" for name, reasons in self.bnb_cpu_limited[:20]]
            if len(self.bnb_cpu_limited) > 20:
                lines.append(f"  ... and {len(self.bnb_cpu_limited) - 20} more")
        return "\n".join(lines)


def default_nf4_output(source: Path, config: NF4Config) -> Path:
    """``<model>-nf4-b64-dq`` (or -fp4-, without -dq) in the current folder."""
    try:
        is_default = source == default_model_path()
    except Exception:
        is_default = False
    return Path.cwd() / f"{DEFAULT_MODEL_NAME if is_default else source.name}-{config.label}"


def full_precision_linears(skeleton, quantized: set[str]) -> list[str]:
    """Names of the Linear layers left in full precision, relative to the base model when they are inside it.

    transformers matches ``llm_int8_skip_modules`` entries from the start of a module name or as its
    suffix, so a name relative to the base model matches whether the folder is loaded with the base
    class (``AutoModel``) or with a head class that adds the prefix.
    """
    prefix = getattr(skeleton, "base_model_prefix", "") or ""
    names = []
    for name, module in skeleton.named_modules():
        if isinstance(module, linear_types()) and name not in quantized:
            names.append(name[len(prefix) + 1:] if prefix and name.startswith(prefix + ".") else name)
    return sorted(names)


def quantize_nf4(
    model: str | Path | None,
    out: str | Path | None,
    config: NF4Config,
    *,
    device: str = "auto",
    overwrite: bool = False,
    trust_remote_code: bool = False,
    progress: bool = True,
    max_shard_bytes: int = DEFAULT_SHARD_BYTES,
) -> NF4QuantizeReport:
    """Quantize the model folder ``model`` into ``out`` in the bitsandbytes 4-bit layout.

    Arguments are those of :func:`compress.quant.apply.quantize`; the default output is
    ``./<model>-<quant_type>-b<blocksize>[-dq]``. The 4-bit codes are computed on ``device``; the
    double quantization of the block maxima always runs on the CPU, where it is bit-exact with
    bitsandbytes.
    """
    source = resolve_model_path(model)
    dev = resolve_device(device)
    out_path = Path(out) if out else default_nf4_output(source, config)
    start = time.perf_counter()
    with CheckpointReader(source) as reader:
        _, targets, skipped, skeleton, _ = plan_targets(source, config, reader, trust_remote_code)
        keep = full_precision_linears(skeleton, {t.name for t in targets})
        by_key = {t.key: t for t in targets}
        dtype = output_dtype(config.dtype, reader)
        reports, limited = [], []
        with atomic_output(out_path, overwrite, inputs=[source], command="quantize") as tmp:
            writer = ShardWriter(tmp, max_shard_bytes)
            for key in _progress(reader.keys(), progress):
                tensor = reader.get(key)
                check_finite(key, tensor)
                target = by_key.get(key)
                if target is None:
                    writer.add(key, cast_floating(tensor, dtype))  # biases too, as bitsandbytes keeps them
                    continue
                w = tensor.t() if target.conv1d else tensor  # bitsandbytes stores [out, in], as nn.Linear
                result = quantize_weight(w.to(dev, dtype), config.quant_type, config.blocksize, config.double_quant)
                prefix = key[: -len(".weight")]
                for suffix, value in bnb_tensors(result).items():
                    writer.add(f"{prefix}.{suffix}", value)
                reports.append(LayerReport(target.name, target.in_features, target.out_features, 4, config.blocksize))
                reasons = bnb_cpu_limits(target.in_features, target.out_features, config.blocksize)
                if reasons:
                    limited.append((target.name, reasons))
            writer.close()
            qcfg = bnb_quantization_config(config.quant_type, config.double_quant, config.compute_dtype,
                                           config.blocksize, keep)
            model_config = read_config_dict(source)
            model_config["quantization_config"] = qcfg
            model_config["torch_dtype"] = str(dtype).removeprefix("torch.")
            if "dtype" in model_config:
                model_config["dtype"] = model_config["torch_dtype"]
            (tmp / "config.json").write_text(json.dumps(model_config, indent=2) + "\n")
            copy_side_files(source, tmp)
    return NF4QuantizeReport(source, out_path.absolute(), config.method, config.to_dict(), reports, skipped,
                             time.perf_counter() - start, label=config.label, bnb_cpu_limited=limited)


def _progress(keys, enabled: bool):
    if not enabled:
        return keys
    from tqdm.auto import tqdm

    return tqdm(keys, desc="quantize nf4", unit="tensor", leave=False)
