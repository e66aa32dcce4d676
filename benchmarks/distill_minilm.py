"""Distillation benchmark: all-MiniLM-L6-v2 fine-tuned on the demo task, distilled into a 3-layer student.

Runs the `compress` commands BENCHMARKS.md lists (each step is skipped when its output folder already
exists, so a long run can be continued), then one `compress eval` of teacher, KD student and hard-label
student in the same process, and prints the summary: teacher accuracy, both students' accuracy, the
fraction of the teacher's accuracy the KD student keeps, its speedup and its parameters.

    python benchmarks/distill_minilm.py --out out/bench
    python benchmarks/distill_minilm.py --out out/bench --only-eval      # re-measure existing models

Extra distillation flags (temperature, alpha, losses, epochs) go after ``--``; they are applied to the
KD student only, and the hard-label student gets the same schedule with --alpha 0:

    python benchmarks/distill_minilm.py --out out/bench -- --temperature 4 --alpha 0.9 --hidden-loss
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path
from hostinfo import cpu_name  # the scripts beside it (benchmarks/ is on sys.path)


def compress(*args: str) -> None:
    cmd = [sys.executable, "-m", "compress", *args]
    print("$ compress " + " ".join(args), flush=True)
    subprocess.run(cmd, check=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="out/bench", help="folder for the models and results")
    parser.add_argument("--teacher-epochs", default="8", help="epochs fine-tuning the teacher (default 8)")
    parser.add_argument("--epochs", default="4", help="epochs for both students (default 4)")
    parser.add_argument("--student-layers", default="3")
    parser.add_argument("--kd-name", default="student-kd", help="folder name of the KD student (to compare settings)")
    parser.add_argument("--only-eval", action="store_true", help="skip training; measure the existing folders")
    parser.add_argument("--repeats", default="10", help="timed forward passes per model (median; default 10)")
    args, extra = parser.parse_known_args()
    extra = [a for a in extra if a != "--"]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    teacher, kd, hard = out / "teacher", out / args.kd_name, out / "student-hard"
    common = ["--data", "demo", "--max-length", "128", "--batch-size", "32", "--no-eval"]
    if not args.only_eval:
        if not teacher.exists():
            compress("finetune", "--model", "default", "--lr", "1e-4", "--epochs", args.teacher_epochs,
                     "--out", str(teacher), *common)
        common += ["--epochs", args.epochs]
        if not kd.exists():
            compress("distill", "--teacher", str(teacher), "--student-layers", args.student_layers,
                     "--out", str(kd), *common, *extra)
        if not hard.exists():
            compress("distill", "--teacher", str(teacher), "--student-layers", args.student_layers, "--alpha", "0",
                     "--out", str(hard), *common)
    results = out / f"eval-{args.kd_name}.json"
    from compress.calib_data.demo_task import ensure_demo_task

    compress("eval", "--model", str(teacher), "--model", str(kd), "--model", str(hard),
             "--labeled", str(ensure_demo_task()["test"]), "--repeats", args.repeats, "--json", str(results))
    rows = {Path(r["path"]).name: r for r in json.loads(results.read_text())["results"]}
    t, k, h = rows[teacher.name], rows[kd.name], rows[hard.name]
    acc = lambda r: r["metrics"]["accuracy"]  # noqa: E731
    ms = lambda r: r["latency"]["batch_ms"]  # noqa: E731
    print()
    print(f"machine: {cpu_name()}, {os.cpu_count()} cores; load average {os.getloadavg()[0]:.2f} at the end")
    print("| model | layers | params M | size MB | batch ms (32x128) | speedup | accuracy | retained |")
    print("|---|---|---|---|---|---|---|---|")
    for name, r in ((teacher.name, t), (kd.name, k), (hard.name, h)):
        layers = json.loads((out / name / "config.json").read_text())["num_hidden_layers"]
        print(f"| {name} | {layers} | {r['params'] / 1e6:.2f} | {r['weights_bytes'] / 1e6:.1f} | {ms(r):.1f} | "
              f"{ms(t) / ms(r):.2f}x | {acc(r):.4f} | {acc(r) / acc(t):.1%} |")
    print()
    print(f"KD student: {acc(k) / acc(t):.1%} of the teacher's accuracy, {ms(t) / ms(k):.2f}x faster, "
          f"{k['params'] / t['params']:.1%} of its parameters; hard-label student {acc(h) / acc(t):.1%} "
          f"({'below' if acc(h) < acc(k) else 'not below'} the KD student)")


if __name__ == "__main__":
    main()
