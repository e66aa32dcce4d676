"""`compress finetune`: turn a base model into a sequence classifier on labeled text (a teacher for distill)."""

from __future__ import annotations

import sys

from ..cli import add_common, check_eval_args, run_eval
from ..errors import CompressError
from .distill import add_training_flags, training_fields


def register(sub) -> None:
    p = sub.add_parser("finetune", help="fine-tune a base model into a sequence classifier (a teacher for distill)",
                       description="Add a classification head for the labels of --data to a base model, train the "
                                   "whole model with cross-entropy, and evaluate it.")
    add_common(p, output_help="folder for the fine-tuned classifier",
               model_help="base model folder (default: the embedded all-MiniLM-L6-v2)")
    add_training_flags(p, epochs_default=4.0, lr_default=1e-4)
    p.set_defaults(func=run)


def run(args) -> None:
    from ..config import FinetuneConfig
    from ..distill.pipeline import finetune_model

    config = FinetuneConfig(**training_fields(args))
    check_eval_args(args)
    if args.data is None:
        raise CompressError("--data is required: a labeled .csv/.jsonl file, demo, or hf:NAME")
    report = finetune_model(args.model, args.out, config, data=args.data, labeled=args.labeled,
                            text_field=args.text_field, label_field=args.label_field, checkpoints=args.checkpoints,
                            resume=args.resume, keep_checkpoints=args.keep_checkpoints, overwrite=args.overwrite,
                            device=args.device, trust_remote_code=args.trust_remote_code, progress=sys.stderr.isatty())
    if not report.main_process:
        return
    print(report.summary())
    if args.labeled is None and report.eval_file is not None:
        args.labeled = str(report.eval_file)
    if not args.no_eval:
        # the base model is of another kind (no classification head), so the table has the result alone
        run_eval([report.output], args)
