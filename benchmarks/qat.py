"""Quantization-aware training against post-training quantization, and how much of the PTQ loss it recovers.

For each model and bit width: round-to-nearest and GPTQ (post-training), QAT on the task loss, and QAT
distilled from the float model (`compress qat --distill`), all with the same grid (asymmetric, groups
of 128). The models:

- the reference LM (benchmarks/reference_lm.py): held-out perplexity and KL on the built-in corpus;
  QAT trains on the built-in corpus's training split.
- the MiniLM demo-task classifier (make it as benchmarks/distill_minilm.py does:
  ``compress finetune --model default --data demo --lr 1e-4 --epochs 8 --out teacher``): held-out
  accuracy on the demo task's test split; QAT trains on its training split.

The classifier gets one more recipe, its own: `qat-kd-transfer` distills (alpha 1, T 2, lr 5e-5, 240
steps of 32) with the demo task's 1923 unlabeled texts added as a transfer set (`--transfer-data demo`),
which only the teacher term learns from, so QAT does not just re-fit the 2400 labeled examples.

Training more on the same data can improve a model by itself (the reference LM is small and
under-trained), so a control is trained too: the float model with exactly the same schedule and no
fake quantization. Recovery is reported both ways:

    recovered = (PTQ - QAT) / (PTQ - float)                     against the original float model
    recovered vs control = (RTN(control) - QAT) / (RTN(control) - control)

where the metric is perplexity (lower is better) or accuracy (signs flipped). Every step is skipped
when its output folder exists, so a long run continues where it stopped.

    python benchmarks/qat.py --out out/qat --classifier out/bench/teacher --json qat.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


def compress_cli(*args: str) -> None:
    cmd = [sys.executable, "-m", "compress", *map(str, args)]
    print("$", " ".join(cmd[2:]), flush=True)
    subprocess.run(cmd, check=True)


def control(model: Path, out: Path, task: str, data: str, steps: int, batch: int, length: int, lr: float) -> None:
    """The float model trained with the QAT schedule but no fake quantization."""
    import torch

    from compress.config import DistillConfig
    from compress.distill import classification_data, distill, lm_data
    from compress.models import load

    loaded = load(model, dtype=torch.float32)
    cfg = DistillConfig(task=task, alpha=0.0, steps=steps, batch_size=batch, max_length=length, learning_rate=lr,
                        evaluate=False, save_steps=10**6, logging_steps=50)
    if task == "causal":
        data_ = lm_data("causal", loaded.tokenizer, data, length)
    else:
        label2id = {str(k): int(v) for k, v in loaded.config.label2id.items()}
        data_ = classification_data(loaded.tokenizer, data, label2id, loaded.config.num_labels, length)
    result = distill(None, loaded.model.train(), data_, cfg, output_dir=out.with_name(out.name + ".ck"),
                     tokenizer=loaded.tokenizer, device="cpu", progress=False)
    result.save(out)
    import shutil

    shutil.rmtree(out.with_name(out.name + ".ck"), ignore_errors=True)


def run_model(name: str, model: Path, out: Path, bits: list[int], steps: int, batch: int, length: int, lr: float,
              data: str, task: str, calib: list[str], eval_args: list[str], extra: dict | None = None) -> dict:
    """Every method at every bit width; ``extra`` adds QAT recipes: label -> `compress qat` flags after the grid."""
    out.mkdir(parents=True, exist_ok=True)
    ctrl = out / f"{name}-control"
    if not ctrl.exists():
        control(model, ctrl, task, data, steps, batch, length, lr)
    folders = {"float": model, "control": ctrl}
    train = ["--data", data, "--steps", steps, "--batch-size", batch, "--max-length", length, "--lr", lr,
             "--no-eval", "--device", "cpu", "--logging-steps", 50]
    for b in bits:
        grid = ["--bits", b, "--group-size", 128, "--asym"]
        for label, args in ((f"rtn-w{b}", ["quantize", "--method", "rtn", *grid, "--dtype", "float32"]),
                            (f"gptq-w{b}", ["quantize", "--method", "gptq", *grid, "--dtype", "float32", *calib]),
                            (f"control-rtn-w{b}", ["quantize", "--method", "rtn", *grid, "--dtype", "float32"]),
                            (f"qat-w{b}", ["qat", *grid, *train]),
                            (f"qat-kd-w{b}", ["qat", *grid, *train, "--distill", "--alpha", "1.0", "--temperature", "1.0"]),
                            *((f"{label}-w{b}", ["qat", *grid, *flags]) for label, flags in (extra or {}).items())):
            folder = out / f"{name}-{label}"
            source = ctrl if label.startswith("control") else model
            if not folder.exists():
                compress_cli(*args, "--model", source, "--out", folder, *(["--no-eval"] if args[0] == "quantize" else []))
            folders[label] = folder
    report = out / f"{name}-eval.json"
    models = [a for f in folders.values() for a in ("--model", str(f))]
    compress_cli("eval", *models, "--no-latency", *eval_args, "--json", report)
    rows = {Path(r["path"]).name: r for r in json.loads(report.read_text())["results"]}
    return {label: rows[Path(folder).name] for label, folder in folders.items()}


def metric(row: dict, key: str) -> float:
    return row["metrics"][key]


def summarize(name: str, rows: dict, bits: list[int], key: str, lower_is_better: bool, extra=()) -> list[str]:
    sign = 1 if lower_is_better else -1
    lines = [f"\n{name} ({key}); float {metric(rows['float'], key):.4f}, control {metric(rows['control'], key):.4f}",
             f"| bits | method | {key} | KL / agreement | recovered of RTN's loss | of GPTQ's | vs control |",
             "|---|---|---|---|---|---|---|"]
    base, ctrl = metric(rows["float"], key), metric(rows["control"], key)
    for b in bits:
        rtn, gptq = metric(rows[f"rtn-w{b}"], key), metric(rows[f"gptq-w{b}"], key)
        crtn = metric(rows[f"control-rtn-w{b}"], key)
        for label in (f"rtn-w{b}", f"gptq-w{b}", f"qat-w{b}", f"qat-kd-w{b}", *(f"{e}-w{b}" for e in extra)):
            v = metric(rows[label], key)
            other = rows[label]["metrics"].get("kl", rows[label]["metrics"].get("agreement"))

            def frac(ptq, ref):
                gap = sign * (ptq - ref)
                return f"{sign * (ptq - v) / gap:.0%}" if gap > 0 else "-"

            qat = label.startswith("qat")
            lines.append(f"| {b} | {label.rsplit('-w', 1)[0]} | {v:.4f} | {other if other is None else f'{other:.5f}'} | "
                         f"{frac(rtn, base) if qat else '-'} | {frac(gptq, base) if qat else '-'} | "
                         f"{frac(crtn, ctrl) if qat else '-'} |")
    return lines


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=Path("out/qat"))
    p.add_argument("--classifier", type=Path, help="the MiniLM demo-task classifier (omit to skip MiniLM)")
    p.add_argument("--skip-lm", action="store_true")
    p.add_argument("--bits", default="4,3")
    p.add_argument("--lm-steps", type=int, default=100)
    p.add_argument("--cls-steps", type=int, default=120)
    p.add_argument("--seed", type=int, default=0, help="seed of the classifier's transfer-set QAT run")
    p.add_argument("--json", type=Path)
    args = p.parse_args()
    bits = [int(b) for b in args.bits.split(",")]
    print("load average at the start:", os.getloadavg(), flush=True)
    results, lines = {}, []
    if not args.skip_lm:
        sys.path.insert(0, str(HERE))
        from reference_lm import ensure_reference_lm

        lm = run_model("lm", ensure_reference_lm(), args.out, bits, args.lm_steps, 8, 256, 1e-4, "builtin", "causal",
                       ["--nsamples", "128", "--seqlen", "512"], ["--eval-tokens", "16384"])
        results["reference-lm"] = lm
        lines += summarize("reference LM", lm, bits, "perplexity", True)
    if args.classifier:
        from compress.calib_data.demo_task import ensure_demo_task

        demo = ensure_demo_task()
        # the classifier's own recipe: distilled (T 2) with the demo task's unlabeled texts as a transfer set
        transfer = {"qat-kd-transfer": ["--data", "demo", "--steps", 240, "--batch-size", 32, "--max-length", 128,
                                        "--lr", 5e-5, "--no-eval", "--device", "cpu", "--no-train-eval", "--distill",
                                        "--alpha", "1.0", "--temperature", "2.0", "--transfer-data", "demo",
                                        "--seed", args.seed]}
        cls = run_model("minilm", args.classifier, args.out, bits, args.cls_steps, 32, 128, 2e-5, "demo", "classify",
                        ["--calib", str(demo["train"]), "--nsamples", "128", "--seqlen", "128"],
                        ["--labeled", str(demo["test"])], extra=transfer)
        results["minilm-classifier"] = cls
        lines += summarize("MiniLM demo classifier", cls, bits, "accuracy", False, extra=tuple(transfer))
    print("\n".join(lines))
    print("load average at the end:", os.getloadavg())
    if args.json:
        args.json.write_text(json.dumps(results, indent=2, default=str) + "\n")


if __name__ == "__main__":
    main()
