"""GPTQ against round-to-nearest (and against GPTQModel) on the reference LM and on MiniLM.

For every setting (4-bit g128, 4-bit per-channel, 3-bit g128) each method quantizes in its own process
(wall time and peak resident set of that process; with --repeats N every method runs N times, the
order of the methods rotating between rounds, and the median wall time is reported), then the harness evaluates all results side by side
against the full-precision model: held-out perplexity and mean per-token KL for the LM, embedding cosine
and retrieval agreement for MiniLM, file size, bits per weight.

GPTQModel needs a newer torch, so it lives in its own virtual environment; pass its interpreter with
--peer. It gets exactly the calibration samples compress uses (same token ids, written to a file).

    python benchmarks/gptq.py --models reference-lm,minilm --peer /path/to/gptqmodel-venv/bin/python
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
SETTINGS = {"w4g128": (4, 128), "w4pc": (4, -1), "w3g128": (3, 128)}


def run_measured(cmd: list[str], log: Path, env: dict | None = None, cwd: Path | None = None) -> dict:
    """Run a command; its wall time and the peak resident set of its process tree's main process."""
    start = time.perf_counter()
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})},
                                cwd=cwd)
        _, status, usage = os.wait4(proc.pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{log.read_text()[-3000:]}")
    return {"seconds": time.perf_counter() - start, "peak_rss_mb": usage.ru_maxrss / 1024}


def model_path(name: str) -> Path:
    if name == "minilm":
        from compress.models import default_model_path

        return default_model_path()
    sys.path.insert(0, str(HERE))
    from reference_lm import ensure_reference_lm

    return ensure_reference_lm()


def write_samples(model: Path, nsamples: int, seqlen: int, path: Path) -> None:
    """The calibration samples compress draws (builtin corpus, seed 0), as token ids for the peer."""
    from compress.data import calibration
    from compress.models import load_tokenizer

    samples = calibration(load_tokenizer(model), "builtin", nsamples, seqlen, seed=0)
    path.write_text(json.dumps(samples.tolist()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="reference-lm,minilm")
    parser.add_argument("--settings", default=",".join(SETTINGS))
    parser.add_argument("--peer", help="python of a virtual environment with gptqmodel installed")
    parser.add_argument("--nsamples", type=int, default=128)
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=1, help="runs per method and setting; the median wall time counts")
    parser.add_argument("--work", default=str(Path.home() / ".cache" / "compress" / "bench-gptq"))
    parser.add_argument("--json", default="gptq-bench.json")
    args = parser.parse_args()
    work = Path(args.work).resolve()
    work.mkdir(parents=True, exist_ok=True)
    from compress.config import EvalConfig
    from compress.eval.harness import compare

    results = {}
    for name in args.models.split(","):
        src = model_path(name)
        rows, outputs = {}, [src]
        samples_file = work / f"{name}-samples.json"
        write_samples(src, args.nsamples, args.seqlen, samples_file)
        for setting in args.settings.split(","):
            bits, group = SETTINGS[setting]
            jobs = []
            for method in ("rtn", "gptq"):
                out = work / f"{name}-{method}-{setting}"
                cmd = [sys.executable, "-m", "compress", "quantize", "--method", method, "--model", str(src),
                       "--out", str(out), "--bits", str(bits), "--group-size", str(group), "--no-eval", "--overwrite",
                       "--device", "cpu", "--nsamples", str(args.nsamples), "--seqlen", str(args.seqlen)]
                jobs.append((out, cmd, None))
            if args.peer and name != "minilm":  # GPTQModel does not quantize BERT encoders
                out = work / f"{name}-gptqmodel-{setting}"
                cmd = [args.peer, str(HERE / "gptqmodel_peer.py"), "--model", str(src), "--out", str(out),
                       "--bits", str(bits), "--group-size", str(group), "--samples", str(samples_file)]
                jobs.append((out, cmd, {"GPTQMODEL_CPU_WORKERS": "2"}))
            runs: dict[str, list[dict]] = {out.name: [] for out, _, _ in jobs}
            for r in range(args.repeats):  # rotate who goes first, so drifting load hits every method alike
                for out, cmd, env in jobs[r % len(jobs):] + jobs[:r % len(jobs)]:
                    shutil.rmtree(out, ignore_errors=True)
                    runs[out.name].append(run_measured(cmd, work / f"{out.name}.log", env=env, cwd=work))  # GPTQModel writes logs/ into its cwd
            for out, _, _ in jobs:
                seconds = sorted(m["seconds"] for m in runs[out.name])
                rows[out.name] = {"seconds": statistics.median(seconds), "all_seconds": seconds,
                                  "peak_rss_mb": max(m["peak_rss_mb"] for m in runs[out.name])}
                outputs.append(out)
            print(f"{name} {setting}: " + ", ".join(f"{k} {v['seconds']:.1f} s" for k, v in rows.items()), flush=True)
        report = compare(outputs, EvalConfig(device="cpu", latency=False, ppl_tokens=16384, kl_tokens=4096))
        print(report.table(), flush=True)
        for r in report.results:
            r_quant = rows.get(Path(r.path).name, {})
            results[f"{name}/{Path(r.path).name}"] = {"quantization": r.quantization, "size_mb": r.weights_bytes / 1e6,
                                                      "bits_per_weight": r.bits_per_weight, **r.metrics, **r_quant}
    Path(args.json).write_text(json.dumps(results, indent=2))
    print_markdown(results)


def print_markdown(results: dict) -> None:
    print("\n| model | method | size MB | bits/w | ppl | KL | cosine | top1 agree | wall s | peak RSS MB |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    fmt = lambda v, f: "-" if v is None else format(v, f)
    for key, r in results.items():
        print(f"| {key.split('/')[0]} | {key.split('/')[1]} ({r['quantization']}) | {r['size_mb']:.2f} | "
              f"{fmt(r.get('bits_per_weight'), '.3f')} | {fmt(r.get('perplexity'), '.3f')} | {fmt(r.get('kl'), '.5f')} | "
              f"{fmt(r.get('cosine'), '.4f')} | {fmt(r.get('retrieval_agreement'), '.4f')} | "
              f"{fmt(r.get('seconds'), '.1f')} | {fmt(r.get('peak_rss_mb'), '.0f')} |")


if __name__ == "__main__":
    main()
