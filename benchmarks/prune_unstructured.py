"""Unstructured and 2:4 pruning of the reference LM: magnitude against Wanda and SparseGPT.

Every method prunes the cached reference LM (benchmarks/reference_lm.py) to 50% unstructured sparsity
and to the 2:4 pattern through the CLI, each in its own process (wall time and peak resident set of
that process); a pruned model is then quantized to 4 bits with GPTQ (pruned weights kept at zero).
The harness evaluates everything side by side against the dense model: held-out perplexity, mean
per-token KL, file size and bits per weight. The target: at 50%, Wanda and SparseGPT add at most half
the perplexity that magnitude pruning adds.

    python benchmarks/prune_unstructured.py                 # prints the tables, writes prune-bench.json
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
SETTINGS = {"50%": ["--sparsity", "0.5"], "2:4": ["--pattern", "2:4"]}
METHODS = ("magnitude", "wanda", "sparsegpt")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nsamples", type=int, default=128)
    parser.add_argument("--seqlen", type=int, default=256)
    parser.add_argument("--quantized", default="sparsegpt-50,wanda-2of4",
                        help="pruned results (by folder name) to quantize to 4 bits with GPTQ")
    parser.add_argument("--work", default=str(Path.home() / ".cache" / "compress" / "bench-prune"))
    parser.add_argument("--json", default="prune-bench.json")
    parser.add_argument("--ppl-tokens", type=int, default=16384, help="held-out tokens scored for perplexity")
    parser.add_argument("--kl-tokens", type=int, default=4096, help="positions compared for KL to the dense model")
    parser.add_argument("--reuse", action="store_true", help="keep outputs already in --work instead of pruning again")
    args = parser.parse_args()
    sys.path.insert(0, str(HERE))
    from reference_lm import ensure_reference_lm

    from compress.config import EvalConfig
    from compress.eval.harness import compare

    work = Path(args.work).resolve()
    work.mkdir(parents=True, exist_ok=True)
    src = ensure_reference_lm()
    calib = ["--nsamples", str(args.nsamples), "--seqlen", str(args.seqlen)]
    runs, outputs = {}, [src]
    for setting, flags in SETTINGS.items():
        for method in METHODS:
            name = f"{method}-{'50' if setting == '50%' else '2of4'}"
            out = work / name
            cmd = [sys.executable, "-m", "compress", "prune", "--model", str(src), "--out", str(out), "--method", method,
                   *flags, *calib, "--device", "cpu", "--no-eval"]
            runs[name] = run_once(cmd, out, work, args.reuse)
            outputs.append(out)
    for base in filter(None, args.quantized.split(",")):
        name = f"{base}-gptq-w4g128"
        out = work / name
        cmd = [sys.executable, "-m", "compress", "quantize", "--model", str(work / base), "--out", str(out),
               "--method", "gptq", "--bits", "4", "--group-size", "128", *calib, "--device", "cpu", "--no-eval"]
        runs[name] = run_once(cmd, out, work, args.reuse)
        outputs.append(out)
    dense_q = work / "dense-gptq-w4g128"
    cmd = [sys.executable, "-m", "compress", "quantize", "--model", str(src), "--out", str(dense_q), "--method", "gptq",
           "--bits", "4", "--group-size", "128", *calib, "--device", "cpu", "--no-eval"]
    runs[dense_q.name] = run_once(cmd, dense_q, work, args.reuse)
    outputs.append(dense_q)

    report = compare(outputs, EvalConfig(device="cpu", latency=False, ppl_tokens=args.ppl_tokens, kl_tokens=args.kl_tokens))
    print(report.table(), flush=True)
    results = {}
    for r in report.results:
        results[Path(r.path).name] = {"quantization": r.quantization, "size_mb": r.weights_bytes / 1e6,
                                      "bits_per_weight": r.bits_per_weight, **r.metrics, **runs.get(Path(r.path).name, {})}
    dense_ppl = report.results[0].metrics["perplexity"]
    checks = {}
    for setting in ("50", "2of4"):
        added = {m: results[f"{m}-{setting}"]["perplexity"] - dense_ppl for m in METHODS}
        checks[setting] = {m: added[m] / added["magnitude"] if added["magnitude"] > 0 else None for m in METHODS[1:]}
    Path(args.json).write_text(json.dumps({"results": results, "added_ppl_vs_magnitude": checks}, indent=2))
    print_markdown(results, checks, src.name)


def run_once(cmd: list[str], out: Path, work: Path, reuse: bool) -> dict:
    """Run one CLI job in its own process (wall time, peak RSS); with ``reuse`` an existing output is kept."""
    from gptq import run_measured

    record = {"command": " ".join(["compress", *cmd[3:]])}
    if reuse and out.is_dir():
        return record
    shutil.rmtree(out, ignore_errors=True)
    record.update(run_measured(cmd, work / f"{out.name}.log"))
    print(f"{out.name}: {record['seconds']:.1f} s", flush=True)
    return record


def print_markdown(results: dict, checks: dict, dense: str) -> None:
    fmt = lambda v, f: "-" if v is None else format(v, f)  # noqa: E731
    print("\n| model | format | size MB | bits/w | ppl | KL | wall s | peak RSS MB |")
    print("|---|---|---|---|---|---|---|---|")
    for name, r in results.items():
        label = "dense" if name == dense else name
        print(f"| {label} | {r['quantization']} | {r['size_mb']:.2f} | {fmt(r.get('bits_per_weight'), '.3f')} | "
              f"{fmt(r.get('perplexity'), '.3f')} | {fmt(r.get('kl'), '.5f')} | {fmt(r.get('seconds'), '.1f')} | "
              f"{fmt(r.get('peak_rss_mb'), '.0f')} |")
    print("\nAdded perplexity as a fraction of magnitude pruning's (target at 50%: at most 0.5):")
    for setting, ratios in checks.items():
        print(f"- {setting}: " + ", ".join(f"{m} {fmt(v, '.3f')}" for m, v in ratios.items()))


if __name__ == "__main__":
    main()
