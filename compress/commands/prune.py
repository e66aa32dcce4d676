"""`compress prune`: unstructured, N:M or structured pruning, optional retraining, then the harness table."""

from __future__ import annotations

import sys
from pathlib import Path

from ..cli import add_common, check_eval_args, finish
from ..errors import CompressError


def register(sub) -> None:
    p = sub.add_parser("prune", help="prune weights (magnitude, Wanda, SparseGPT, N:M) or heads and neurons (--structured)",
                       description="Remove weights from a model's Linear layers (unstructured or N:M, stored as "
                                   "bitmask + values so the file shrinks) or remove attention heads and FFN neurons "
                                   "(--structured), optionally retrain with the masks fixed, and compare the result.")
    add_common(p)
    p.add_argument("--method", choices=("magnitude", "wanda", "sparsegpt"),
                   help="how weights are chosen: magnitude (data-free), wanda or sparsegpt (calibrated); "
                        "default magnitude, or none with --structured alone")
    p.add_argument("--sparsity", type=float, metavar="S", help="fraction of each layer's weights removed, in [0, 1) (default 0.5)")
    p.add_argument("--pattern", metavar="N:M", help="semi-structured sparsity: keep N of every M input weights (2:4, 4:8)")
    p.add_argument("--scope", default="layer", choices=("layer", "global"),
                   help="magnitude: the same sparsity per layer (default), or one threshold over all layers")
    p.add_argument("--skip", action="append", default=[], metavar="REGEX", help="leave layers whose name matches dense (repeatable)")
    p.add_argument("--override", action="append", default=[], metavar="REGEX=sparsity:S|pattern:N:M",
                   help="another sparsity or pattern for matching layers (repeatable; the first match wins)")
    p.add_argument("--blocks", metavar="NAME", help="dotted name of the repeated block list, if not found automatically")
    p.add_argument("--storage", default="sparse", choices=("sparse", "dense"),
                   help="sparse: bitmask + nonzero values, the file shrinks (default); dense: zeros stored, for stock loaders")
    p.add_argument("--structured", metavar="heads=R,ffn=R",
                   help="remove this fraction of attention heads and FFN neurons physically (the model gets smaller)")
    p.add_argument("--importance", default="weight", choices=("weight", "activation", "taylor"),
                   help="how --structured ranks heads and neurons (default weight)")
    c = p.add_argument_group("calibration (wanda, sparsegpt; activation and taylor importance)")
    c.add_argument("--calib", default="builtin", metavar="SRC",
                   help="calibration text: builtin, prose (GNU manuals; better for LLMs), a .txt/.jsonl/.csv file, "
                        "or hf:NAME (default builtin)")
    c.add_argument("--nsamples", type=int, default=128, help="calibration samples (default 128)")
    c.add_argument("--seqlen", type=int, default=None,
                   help="tokens per sample (default 2048 or the model's maximum, whichever is smaller)")
    c.add_argument("--calib-batch-size", type=int, default=8, help="samples per forward pass (default 8)")
    c.add_argument("--damp", type=float, default=0.01, help="SparseGPT's Hessian damping (default 0.01)")
    c.add_argument("--seed", type=int, default=0, help="seed for calibration samples and training (default 0)")
    s = p.add_argument_group("schedule and retraining")
    s.add_argument("--schedule", default="oneshot", choices=("oneshot", "cubic", "iterative"),
                   help="oneshot (default); cubic: sparsity rises during training (magnitude); iterative: prune/retrain rounds")
    s.add_argument("--rounds", type=int, default=3, help="prune/retrain rounds of --schedule iterative (default 3)")
    s.add_argument("--retrain", action="store_true", help="train after pruning, pruned weights kept at zero")
    s.add_argument("--data", metavar="SRC", help="training data: builtin, prose, a text file, hf:NAME; a labeled file or demo for classifiers")
    s.add_argument("--distill", action="store_true", help="retrain by distillation from the unpruned model")
    s.add_argument("--steps", type=int, default=100, help="training steps in all (default 100)")
    s.add_argument("--lr", type=float, default=5e-5, help="peak learning rate (default 5e-5)")
    s.add_argument("--batch-size", type=int, default=8, help="examples per step (default 8)")
    s.add_argument("--max-length", type=int, default=128, help="tokens per training example (default 128)")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    p.set_defaults(func=run)


def build_config(args):
    """The PruneConfig of the unstructured part, or None when only --structured was asked for."""
    from ..prune.unstructured import PruneConfig, parse_prune_overrides

    if args.method is None and args.structured and args.sparsity is None and args.pattern is None:
        return None
    return PruneConfig(method=args.method or "magnitude", sparsity=args.sparsity, pattern=args.pattern, scope=args.scope,
                       skip=args.skip, overrides=parse_prune_overrides(args.override), blocks=args.blocks,
                       calib=args.calib, nsamples=args.nsamples, seqlen=args.seqlen,
                       calib_batch_size=args.calib_batch_size, seed=args.seed, text_field=args.text_field,
                       damp=args.damp, storage=args.storage)


def build_retrain(args):
    """RetrainOptions from the flags, or None without --retrain (and no schedule that trains)."""
    from ..prune.retrain import RetrainOptions

    if not args.retrain:
        if args.schedule != "oneshot":
            raise CompressError(f"--schedule {args.schedule} interleaves pruning with training: add --retrain --data SRC")
        if args.data or args.distill:
            raise CompressError("--data and --distill take effect with --retrain; add --retrain")
        return None
    if not args.data:
        raise CompressError("retraining needs training data: pass --data SRC (builtin, prose, a text file, or hf:NAME)")
    return RetrainOptions(data=args.data, steps=args.steps, distill=args.distill, learning_rate=args.lr,
                          batch_size=args.batch_size, max_length=args.max_length, seed=args.seed, labeled=args.labeled,
                          text_field=args.text_field, label_field=args.label_field)


def run(args) -> None:
    config = build_config(args)
    options = build_retrain(args)
    check_eval_args(args)
    if args.structured:
        output = run_structured(args, config, options)
    else:
        from ..prune.schedule import check_schedule, run_schedule

        check_schedule(args.schedule, config, options, args.rounds)
        report = run_schedule(args.model, args.out, config, schedule=args.schedule, options=options, rounds=args.rounds,
                              device=args.device, overwrite=args.overwrite, trust_remote_code=args.trust_remote_code,
                              progress=sys.stderr.isatty())
        print(report.summary())
        output = report.output
    finish(args, args.model, output)


def run_structured(args, config, options) -> Path:
    """Remove heads and FFN neurons (compress.prune.structured), retrain without masks, save; then the
    unstructured part, if asked for, on the smaller model."""
    from ..files import copy_side_files
    from ..outputs import atomic_output, check_output, scratch_folder
    from ..models import load, resolve_model_path
    from ..prune.structured import parse_structured, prune_structured

    ratios = parse_structured(args.structured)
    if config is not None and args.schedule != "oneshot":
        raise CompressError("--structured with unstructured pruning runs one shot; drop --schedule")
    source = resolve_model_path(args.model)
    out = check_output(args.out or Path.cwd() / f"{source.name}-structured", inputs=[source], overwrite=args.overwrite)
    loaded = load(source, device=args.device, trust_remote_code=args.trust_remote_code)
    batches = None
    if args.importance != "weight":
        batches = _calibration_batches(loaded, args)
    report = prune_structured(loaded.model, **ratios, importance=args.importance, batches=batches)
    print("\n".join(report.lines()))
    if type(loaded.model).__module__.endswith(".pruned_bert"):
        # a BERT with heads removed is saved with compress's own pruned_bert.py (transformers 5 has no class
        # for it); reading back the folder written here runs only that file
        args.trust_remote_code = True
    if options is not None:
        from ..prune.retrain import retrain

        teacher = load(source, device=args.device, trust_remote_code=args.trust_remote_code) if options.distill else None
        metrics = retrain(loaded, options, masks=None, teacher=teacher, device=args.device, progress=sys.stderr.isatty())
        if "train_loss" in metrics:
            print(f"retrained {options.steps} steps: final training loss {metrics['train_loss']:.4f}")
    if config is None:
        with atomic_output(out, args.overwrite, inputs=[source], command="prune") as tmp:
            loaded.model.save_pretrained(str(tmp))
            copy_side_files(source, tmp, skip=("config.json", "model.safetensors"))
        print(f"wrote {out}")
        return out
    from ..prune.pipeline import prune

    with scratch_folder(out) as work:
        smaller = work / "model"
        smaller.mkdir()
        loaded.model.save_pretrained(str(smaller))
        copy_side_files(source, smaller, skip=("config.json", "model.safetensors"))
        result = prune(smaller, out, config, device=args.device, overwrite=args.overwrite,
                       trust_remote_code=args.trust_remote_code, progress=sys.stderr.isatty())
    print(result.summary())
    return result.output


def _calibration_batches(loaded, args) -> list[dict]:
    """Calibration windows as model inputs, for activation and Taylor importance."""
    import torch

    from ..data import calibration

    seqlen = args.seqlen or min(128, loaded.max_positions())
    samples = calibration(loaded.tokenizer, args.calib, args.nsamples, seqlen, args.seed, text_field=args.text_field)
    device = loaded.device
    return [{"input_ids": b.to(device), "attention_mask": torch.ones_like(b).to(device)}
            for b in samples.split(args.calib_batch_size)]
