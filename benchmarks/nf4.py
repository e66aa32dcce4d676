"""NF4 / FP4 benchmarks: quantization throughput against bitsandbytes, and quality against other 4-bit methods.

    python benchmarks/nf4.py throughput [--repeats 7]     # ours vs bitsandbytes.functional.quantize_4bit
    python benchmarks/nf4.py quality [--json out.json]    # MiniLM (and the reference LM when available)

Throughput: the same tensors (every Linear weight of all-MiniLM-L6-v2, and 4096 x 4096 / 11008 x 4096
random weights as in a 7B Llama layer) go through both quantizers in the same process on the CPU,
alternating tensor by tensor, and the outputs are checked byte for byte. A figure is the sum over a
group's tensors of each one's best time over the repeats; the ratio is bitsandbytes' time over ours
(above 1: ours is faster).

Quality: the harness (compress.compare) on the model quantized with NF4 and FP4 (block size 64, with
and without double quantization), int4 round-to-nearest g64, and GPTQ 4-bit g128 (calibrated on the
built-in corpus); then the same on the reference LM (benchmarks/reference_lm.py trains and caches it).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

import compress
from compress import EvalConfig, NF4Config, RTNConfig
from compress.config import GPTQConfig
from compress.quant import nf4
from hostinfo import machine  # the scripts beside it (benchmarks/ is on sys.path)

HERE = Path(__file__).resolve().parent


# --------------------------------------------------------------------------------------------------
# Throughput


def benchmark_tensors() -> list[tuple[str, list[tuple[str, torch.Tensor]]]]:
    """Groups of (name, weight) timed together: MiniLM's Linear weights, and two large random weights."""
    from safetensors.torch import load_file

    from compress.models import default_model_path

    state = load_file(str(default_model_path() / "model.safetensors"))
    minilm = [(k, v) for k, v in state.items() if k.endswith(".weight") and v.dim() == 2 and "embeddings" not in k]
    g = torch.Generator().manual_seed(0)
    big = [("random 4096x4096", torch.randn(4096, 4096, generator=g) * 0.02),
           ("random 11008x4096", torch.randn(11008, 4096, generator=g) * 0.02)]
    return [("MiniLM, 37 weights", minilm)] + [(name, [(name, t)]) for name, t in big]


def throughput(repeats: int) -> list[dict]:
    """Best-of-``repeats`` time of each tensor under both quantizers, summed over each group.

    Each round quantizes every tensor with both, alternating which goes first, so both see the same
    caches and the same background load; the best round of each tensor is the least disturbed one on
    a shared machine. The untimed first round checks that the bytes agree.
    """
    import bitsandbytes as bnb

    rows = []
    for quant_type, double_quant in (("nf4", True), ("nf4", False), ("fp4", True)):
        for group, tensors in benchmark_tensors():
            best_theirs, best_ours = [float("inf")] * len(tensors), [float("inf")] * len(tensors)
            for r in range(repeats + 1):
                for i, (_, w) in enumerate(tensors):
                    times = {}
                    for who in (("theirs", "ours") if (r + i) % 2 == 0 else ("ours", "theirs")):
                        start = time.perf_counter()
                        if who == "theirs":
                            packed, state = bnb.functional.quantize_4bit(w, blocksize=64, quant_type=quant_type,
                                                                         compress_statistics=double_quant)
                        else:
                            result = nf4.quantize_weight(w, quant_type, 64, double_quant)
                        times[who] = time.perf_counter() - start
                    if r == 0:
                        assert torch.equal(packed, result.packed) and torch.equal(state.absmax, result.absmax)
                    else:
                        best_theirs[i] = min(best_theirs[i], times["theirs"])
                        best_ours[i] = min(best_ours[i], times["ours"])
            params = sum(w.numel() for _, w in tensors)
            a, b = sum(best_theirs), sum(best_ours)
            rows.append({"config": f"{quant_type}{' dq' if double_quant else ''} b64", "tensors": group,
                         "params_m": params / 1e6, "bitsandbytes_ms": a * 1e3, "ours_ms": b * 1e3,
                         "ours_mparams_s": params / b / 1e6, "ratio": a / b})
            print(f"{rows[-1]['config']:<10} {group:<18} bitsandbytes {a * 1e3:8.1f} ms  ours {b * 1e3:8.1f} ms  "
                  f"ratio {a / b:.2f}", file=sys.stderr)
    return rows


def throughput_markdown(rows: list[dict]) -> str:
    out = ["| config | tensors | params M | bitsandbytes ms | ours ms | ours Mparams/s | bitsandbytes / ours |",
           "|---|---|---|---|---|---|---|"]
    for r in rows:
        out.append(f"| {r['config']} | {r['tensors']} | {r['params_m']:.2f} | {r['bitsandbytes_ms']:.1f} | "
                   f"{r['ours_ms']:.1f} | {r['ours_mparams_s']:.0f} | {r['ratio']:.2f} |")
    return "\n".join(out)


# --------------------------------------------------------------------------------------------------
# Quality


def quality_configs() -> list[tuple[str, object]]:
    """(folder name, config) of every method in the table."""
    return [("nf4-b64-dq", NF4Config()), ("nf4-b64", NF4Config(double_quant=False)),
            ("fp4-b64-dq", NF4Config(quant_type="fp4")), ("fp4-b64", NF4Config(quant_type="fp4", double_quant=False)),
            ("rtn-w4g64", RTNConfig(bits=4, group_size=64)), ("gptq-w4g128", GPTQConfig(bits=4, group_size=128))]


def reference_lm() -> Path:
    """benchmarks/reference_lm.py's model folder (trained once, then cached)."""
    sys.path.insert(0, str(HERE))
    try:
        from reference_lm import ensure_reference_lm
    finally:
        sys.path.remove(str(HERE))
    return Path(ensure_reference_lm())


def quality(work: Path, eval_config: EvalConfig, lm: Path | None = None) -> list[dict]:
    """One harness table per model: MiniLM, then ``lm`` (default: the reference LM)."""
    from compress.models import default_model_path

    models = [("all-MiniLM-L6-v2", default_model_path())]
    models.append((lm.name, lm) if lm is not None else ("reference LM", reference_lm()))
    tables = []
    for title, source in models:
        outs = []
        for name, config in quality_configs():
            out = work / title.replace(" ", "-") / name  # the folder name is the row's name in the table
            start = time.perf_counter()
            compress.quantize(source, out, config, overwrite=True, progress=False)
            print(f"{title}: {name} quantized in {time.perf_counter() - start:.1f} s", file=sys.stderr)
            outs.append(out)
        report = compress.compare([source, *outs], eval_config)
        print(report.table())
        tables.append({"model": title, "markdown": report.markdown(), "report": report.to_dict()})
    return tables


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("what", choices=("throughput", "quality", "all"))
    parser.add_argument("--repeats", type=int, default=7, help="timed rounds per tensor (the best one counts)")
    parser.add_argument("--samples", type=int, default=256, help="texts for embedding fidelity")
    parser.add_argument("--lm", help="a causal LM folder for the language-model table (default: the reference LM)")
    parser.add_argument("--work", help="folder for the quantized models (default: a temporary folder, removed)")
    parser.add_argument("--json", help="write every figure to this JSON file")
    args = parser.parse_args()
    torch.manual_seed(0)
    results = {"machine": machine()}
    print(f"machine: {results['machine']}")
    if args.what in ("throughput", "all"):
        rows = throughput(args.repeats)
        results["throughput"] = rows
        print(throughput_markdown(rows))
    if args.what in ("quality", "all"):
        work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="nf4-bench-"))
        try:
            cfg = EvalConfig(samples=args.samples, latency=False, device="cpu")
            results["quality"] = quality(work, cfg, Path(args.lm) if args.lm else None)
            for t in results["quality"]:
                print(f"\n{t['model']}\n\n{t['markdown']}")
        finally:
            if not args.work:
                shutil.rmtree(work, ignore_errors=True)
    print(f"load average at the end: {os.getloadavg()[0]:.2f}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2, default=str) + "\n")


if __name__ == "__main__":
    main()
