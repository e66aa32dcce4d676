"""`compress qat`: quantization-aware training, then the table of float, PTQ baseline and QAT result."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

from ..cli import add_common, check_eval_args, input_paths, run_eval
from ..errors import CompressError


def register(sub) -> None:
    from .distill import _weight, add_training_flags

    p = sub.add_parser("qat", help="quantization-aware training: train with fake quantization, write the packed model",
                       description="Train a model with fake-quantized weights (int per-group or NF4), optionally "
                                   "distilled from its float self, and write the GPTQ-layout or bitsandbytes-layout "
                                   "checkpoint; the closing table compares it with round-to-nearest PTQ.")
    add_common(p, output_help="folder for the quantized model")
    q = p.add_argument_group("quantization")
    q.add_argument("--method", default="int", choices=("int", "nf4"), help="int per-group (GPTQ layout) or nf4 (default int)")
    q.add_argument("--bits", type=int, default=4, help="2, 3, 4 or 8 for --method int (default 4)")
    q.add_argument("--group-size", type=int, default=128, help="32, 64, 128 or -1 for --method int (default 128)")
    sym = q.add_mutually_exclusive_group()
    sym.add_argument("--sym", dest="sym", action="store_true", help="symmetric integer grid")
    sym.add_argument("--asym", dest="sym", action="store_false", help="asymmetric integer grid (default)")
    p.set_defaults(sym=False)
    q.add_argument("--learnable-scales", action="store_true", help="train the integer scales (LSQ)")
    q.add_argument("--act-bits", type=int, choices=(8,), help="also fake-quantize layer inputs per token (W4A8 training)")
    q.add_argument("--blocksize", type=int, default=64, help="NF4 block size (default 64)")
    q.add_argument("--no-double-quant", action="store_true", help="NF4: keep the block maxima in float32")
    q.add_argument("--quantize-head", action="store_true", help="also quantize an untied output head")
    q.add_argument("--skip", action="append", default=[], metavar="REGEX", help="keep matching layers in floating point")
    q.add_argument("--blocks", metavar="NAME", help="dotted name of the repeated block list (when detection picks wrong)")
    q.add_argument("--warmup-steps", type=int, default=0, metavar="N", help="steps in floating point before fake quantization")
    q.add_argument("--freeze-at", type=float, default=1.0, metavar="F",
                   help="fraction of the steps after which integer ranges stop moving (default 1: never)")
    k = p.add_argument_group("distillation from the float model")
    k.add_argument("--distill", action="store_true", help="learn from the unquantized model's outputs too")
    k.add_argument("--temperature", type=float, default=2.0, help="softening temperature (default 2.0)")
    k.add_argument("--alpha", type=float, default=0.5, help="weight of the teacher term in [0, 1] (default 0.5)")
    k.add_argument("--hidden-loss", type=_weight, nargs="?", const=1.0, default=0.0, metavar="W",
                   help="also match the float model's hidden states layer by layer (MSE), weight W (default 1 when given)")
    k.add_argument("--transfer-data", metavar="SRC",
                   help="classifiers: unlabeled text learned from the float model's predictions alone (demo: the demo "
                        "task's unlabeled set); needs --distill")
    a = p.add_argument_group("adapter recovery (instead of training the weights)")
    a.add_argument("--lora", action="store_true",
                   help="train LoRA adapters on a frozen quantized base: --model quantized already, or quantized "
                        "here (round-to-nearest int, or NF4) first; --distill learns from the float model")
    a.add_argument("--lora-rank", type=int, default=16, help="adapter rank (default 16)")
    a.add_argument("--lora-alpha", type=float, default=32.0, help="adapter scaling alpha (default 32)")
    a.add_argument("--merge", action="store_true",
                   help="merge the adapters and quantize again in the base's format (default: save the adapters apart)")
    a.add_argument("--teacher", metavar="PATH", help="the float model, for --distill when --model is already quantized")
    add_training_flags(p, epochs_default=1.0, lr_default=2e-5)
    p.set_defaults(func=run)


def build_configs(args):
    from ..config import DistillConfig
    from ..qat.config import QATConfig
    from .distill import training_fields

    qat = QATConfig(method=args.method, bits=args.bits, group_size=args.group_size, sym=args.sym,
                    learnable_scales=args.learnable_scales, blocksize=args.blocksize,
                    double_quant=not args.no_double_quant, act_bits=args.act_bits, quantize_head=args.quantize_head,
                    skip=args.skip, warmup_steps=args.warmup_steps, freeze_at=args.freeze_at)
    fields = training_fields(args)
    if (args.hidden_loss or args.transfer_data) and not args.distill:
        raise CompressError("--hidden-loss and --transfer-data learn from the float model: add --distill")
    train = DistillConfig(task="causal", temperature=args.temperature, alpha=args.alpha if args.distill else 0.0,
                          hidden_weight=args.hidden_loss, **fields)
    return qat, train


def _baseline(source: Path, folder: Path, qat, device: str):
    """Round-to-nearest (or plain NF4) of the same configuration: the post-training baseline."""
    import compress
    from compress.config import NF4Config, RTNConfig

    if qat.method == "nf4":
        cfg = NF4Config(blocksize=qat.blocksize, double_quant=qat.double_quant, dtype="float32", skip=qat.skip)
    else:
        cfg = RTNConfig(bits=qat.bits, group_size=qat.group_size, sym=qat.sym, dtype="float32", skip=qat.skip)
    compress.quantize(source, folder, cfg, device=device, progress=False)


def run_lora(args, qat) -> None:
    """--lora: adapters on a frozen quantized base, then the table (float, base, base with adapters or merged)."""
    from ..outputs import check_output
    from ..models import read_config_dict, resolve_model_path
    from ..qat.lora import LoraRecoveryConfig, recover_model

    if args.data is None:
        raise CompressError("--data is required: the text the adapters train on")
    if args.hidden_loss:
        raise CompressError("--hidden-loss trains the weights toward the float hidden states; adapters (--lora) learn "
                            "from the outputs only: drop --hidden-loss")
    if args.out is None:
        raise CompressError("--out is required: the folder the adapters (or the merged model) are written to")
    source = resolve_model_path(args.model)
    inputs = [source, *input_paths(args)]
    out = check_output(args.out, inputs=inputs, overwrite=args.overwrite)
    quantized = bool(read_config_dict(source).get("quantization_config"))
    teacher = args.teacher if quantized else (source if args.distill else None)
    if args.distill and teacher is None:
        raise CompressError("--distill on an already quantized --model needs --teacher PATH (the float model)")
    config = LoraRecoveryConfig(rank=args.lora_rank, alpha=args.lora_alpha, steps=args.steps or 200,
                                learning_rate=args.lr, batch_size=args.batch_size, max_length=args.max_length,
                                max_samples=args.max_samples, grad_accum=args.grad_accum, distill=args.distill,
                                temperature=args.temperature, kd_weight=args.alpha, seed=args.seed,
                                logging_steps=args.logging_steps, text_field=args.text_field)
    base = source
    if not quantized:  # the base the adapters sit on: kept next to the adapters, which name it
        base = out.with_name(out.name + ("-base-nf4" if qat.method == "nf4" else f"-base-w{qat.bits}"))
        check_output(base, inputs=inputs, overwrite=args.overwrite, what="base folder")
        _baseline(source, base, qat, args.device)
        print(f"quantized {source.name} into {base}")
    try:
        report = recover_model(base, out, config, data=args.data, teacher=teacher, transfer=args.transfer_data,
                               merge=args.merge, device=args.device, progress=sys.stderr.isatty(),
                               overwrite=args.overwrite)
    except BaseException:
        if base != source:  # the base was made for these adapters alone: it goes with them
            shutil.rmtree(base, ignore_errors=True)
        raise
    print(report.summary())
    if not args.no_eval:
        if args.labeled is None and report.eval_file is not None:
            args.labeled = str(report.eval_file)
        run_eval([teacher or source, base, out], args)


def run(args) -> None:
    from ..qat.pipeline import qat_model

    qat, train = build_configs(args)
    check_eval_args(args)
    if args.lora:
        return run_lora(args, qat)
    if args.resume:
        raise CompressError("--resume is not supported by compress qat; start the run again")
    report = qat_model(args.model, args.out, qat, train=train, data=args.data, distill=args.distill,
                       labeled=args.labeled, text_field=args.text_field, label_field=args.label_field,
                       transfer=args.transfer_data, blocks=args.blocks, checkpoints=args.checkpoints,
                       keep_checkpoints=args.keep_checkpoints, overwrite=args.overwrite, device=args.device,
                       trust_remote_code=args.trust_remote_code, progress=sys.stderr.isatty())
    print(report.summary())
    if args.no_eval:
        return
    if args.labeled is None and report.eval_file is not None:
        args.labeled = str(report.eval_file)
    from ..outputs import scratch_folder

    with scratch_folder(report.output) as tmp:
        ptq = tmp / f"{report.output.name}-ptq-{'nf4' if qat.method == 'nf4' else 'rtn'}"
        _baseline(report.source, ptq, qat, args.device)
        run_eval([report.source, ptq, report.output], args)
