"""`compress eval`: the evaluation harness on any models, side by side."""

from __future__ import annotations

from pathlib import Path

from ..cli import add_common, check_outputs, run_eval


def register(sub) -> None:
    e = sub.add_parser("eval", help="compare models side by side: size, bits per weight, memory, latency, accuracy, KL",
                       description="Evaluate models side by side; the first --model is the reference.")
    add_common(e, many_models=True, output_help="folder for report.json, report.md and report.png")
    e.set_defaults(func=run)


def run(args) -> None:
    check_outputs(args, overwrite=True, replaces="eval")  # an earlier report folder is replaced, nothing else
    run_eval(args.model or [None], args, Path(args.out) if args.out else None)
