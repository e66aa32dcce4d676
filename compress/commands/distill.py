"""`compress distill`: train a smaller student to imitate a teacher, then compare the two in the harness table."""

from __future__ import annotations

import sys

from ..cli import add_common, check_eval_args, finish
from ..errors import CompressError

TASKS = ("classify", "mlm", "causal", "embed")
_KIND_TASK = {"classifier": "classify", "masked": "mlm", "causal": "causal", "embedding": "embed"}


def _weight(text: str) -> float:
    return float(text)


def add_training_flags(p, *, epochs_default: float, lr_default: float):
    """The schedule, batch, checkpoint and resume flags shared by distill and finetune; returns the data group."""
    g = p.add_argument_group("training")
    length = g.add_mutually_exclusive_group()
    length.add_argument("--epochs", type=float, default=epochs_default, metavar="N",
                        help=f"passes over the training data (default {epochs_default:g})")
    length.add_argument("--steps", type=int, metavar="N", help="optimizer steps instead of epochs")
    g.add_argument("--batch-size", type=int, default=32, metavar="N", help="examples per device per step (default 32)")
    g.add_argument("--grad-accum", type=int, default=1, metavar="N", help="batches accumulated per optimizer step (default 1)")
    g.add_argument("--lr", type=float, default=lr_default, metavar="LR", help=f"peak learning rate (default {lr_default:g})")
    g.add_argument("--weight-decay", type=float, default=0.01, help="AdamW weight decay (default 0.01)")
    g.add_argument("--warmup-ratio", type=float, default=0.1, help="fraction of steps warming up the learning rate (default 0.1)")
    g.add_argument("--max-length", type=int, default=128, metavar="N", help="tokens per example or LM window (default 128)")
    g.add_argument("--max-samples", type=int, metavar="N", help="use at most N training examples")
    g.add_argument("--seed", type=int, default=0, help="seed for initialisation, shuffling, dropout and masking (default 0)")
    g.add_argument("--precision", default="fp32", choices=("fp32", "bf16", "fp16"), help="training precision (default fp32)")
    g.add_argument("--save-steps", type=int, default=500, metavar="N", help="write a resumable checkpoint every N steps (default 500)")
    g.add_argument("--logging-steps", type=int, default=10, metavar="N", help="log the loss every N steps (default 10)")
    g.add_argument("--no-train-eval", action="store_true", help="skip the held-out evaluation after each epoch")
    g.add_argument("--checkpoints", metavar="DIR", help="checkpoint folder (default OUT.checkpoints)")
    g.add_argument("--keep-checkpoints", action="store_true", help="keep the checkpoint folder after a successful run")
    g.add_argument("--resume", action="store_true", help="continue from the newest checkpoint of an interrupted run")
    g.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    d = p.add_argument_group("data")
    d.add_argument("--data", metavar="SRC", help="training data: a labeled .csv/.jsonl, demo, builtin, prose, a text file, or hf:NAME")
    return d


def training_fields(args) -> dict:
    """TrainingConfig fields from the shared flags."""
    return dict(epochs=args.epochs, steps=args.steps, batch_size=args.batch_size, grad_accum=args.grad_accum,
                learning_rate=args.lr, weight_decay=args.weight_decay, warmup_ratio=args.warmup_ratio,
                max_length=args.max_length, max_samples=args.max_samples, seed=args.seed, precision=args.precision,
                save_steps=args.save_steps, logging_steps=args.logging_steps, evaluate=not args.no_train_eval)


def register(sub) -> None:
    p = sub.add_parser("distill", help="distill a teacher into a smaller student (classify, mlm, causal, embed)",
                       description="Train a student (derived from the teacher by keeping some of its layers, or "
                                   "loaded with --student) to imitate the teacher, then compare them.")
    add_common(p, output_help="folder for the trained student", model_flags=("--teacher", "--model"),
               model_help="teacher model folder (default: the embedded all-MiniLM-L6-v2)")
    p.add_argument("--task", choices=TASKS, help="what is distilled (default: from the teacher's kind)")
    s = p.add_argument_group("student")
    s.add_argument("--student", metavar="PATH", help="a student folder of the teacher's kind (instead of deriving one)")
    s.add_argument("--student-layers", type=int, metavar="K", help="keep K evenly spaced teacher layers (default: half)")
    s.add_argument("--layer-indices", metavar="I,J,...", help="keep these teacher layers (0-based, increasing)")
    s.add_argument("--student-hidden", type=int, metavar="N", help="narrower hidden size (initialised by slicing)")
    s.add_argument("--student-intermediate", type=int, metavar="N", help="narrower feed-forward size (initialised by slicing)")
    s.add_argument("--vocab-map", metavar="FILE.json", help="student token -> teacher token map for a student with another vocabulary")
    loss = p.add_argument_group("loss")
    loss.add_argument("--temperature", type=float, default=2.0, help="softening temperature T > 0 (default 2.0)")
    loss.add_argument("--alpha", type=float, default=0.5, help="weight of the soft (teacher) term in [0, 1]; 1 - alpha goes to the hard labels (default 0.5)")
    loss.add_argument("--hidden-loss", type=_weight, nargs="?", const=1.0, default=0.0, metavar="W",
                      help="add the hidden-state MSE over the layer map, weight W (default 1 when given)")
    loss.add_argument("--attn-loss", type=_weight, nargs="?", const=1.0, default=0.0, metavar="W",
                      help="add the attention-map KL over the layer map, weight W (default 1 when given)")
    loss.add_argument("--cosine-loss", type=_weight, nargs="?", const=1.0, default=0.0, metavar="W",
                      help="add DistilBERT's cosine loss on the last hidden states, weight W (default 1 when given)")
    loss.add_argument("--layer-map", metavar="S:T,...", help="student:teacher hidden-state pairs (0 = embeddings)")
    loss.add_argument("--embed-loss", default="mse", choices=("mse", "cosine"), help="embed task: regression loss on embeddings")
    loss.add_argument("--similarity-temperature", type=float, default=0.05, help="embed task: temperature of in-batch similarities")
    loss.add_argument("--mlm-probability", type=float, default=0.15, help="mlm task: fraction of tokens masked (default 0.15)")
    data = add_training_flags(p, epochs_default=3.0, lr_default=5e-5)
    data.add_argument(
        "--transfer-data", metavar="SRC",
        help="classify: unlabeled text learned from the teacher's predictions alone (demo: the demo task's unlabeled set)")
    p.set_defaults(func=run)


def _int_list(text: str | None, flag: str) -> list[int] | None:
    if text is None:
        return None
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise CompressError(f"{flag} '{text}' must be comma-separated integers, for example 0,2,5") from None


def _layer_map(text: str | None) -> list[list[int]] | None:
    if text is None:
        return None
    pairs = []
    for part in text.split(","):
        s, colon, t = part.partition(":")
        if not colon or not s.strip().isdigit() or not t.strip().isdigit():
            raise CompressError(f"--layer-map '{text}' must be student:teacher pairs, for example 0:0,1:2,2:4")
        pairs.append([int(s), int(t)])
    return pairs


def build_configs(args):
    """(DistillConfig, StudentConfig) from the flags; the task comes from the teacher when not given."""
    from ..config import DistillConfig, StudentConfig

    task = args.task
    if task is None:
        from ..models import detect_kind, read_config_dict, resolve_model_path

        path = resolve_model_path(args.model)
        task = _KIND_TASK[detect_kind(path, read_config_dict(path))]
    distill_config = DistillConfig(
        task=task, temperature=args.temperature, alpha=args.alpha, hidden_weight=args.hidden_loss,
        attn_weight=args.attn_loss, cosine_weight=args.cosine_loss, layer_map=_layer_map(args.layer_map),
        embed_loss=args.embed_loss, similarity_temperature=args.similarity_temperature,
        mlm_probability=args.mlm_probability, vocab_map=args.vocab_map, **training_fields(args))
    student = StudentConfig(layers=args.student_layers, layer_indices=_int_list(args.layer_indices, "--layer-indices"),
                            hidden_size=args.student_hidden, intermediate_size=args.student_intermediate)
    return distill_config, student


def run(args) -> None:
    from ..distill.pipeline import distill_model

    check_eval_args(args)  # outputs first: finding the task may import a GGUF teacher, which takes a while
    config, student = build_configs(args)
    data = args.data
    if data is None:
        if config.task == "classify":
            raise CompressError("--data is required for --task classify: a labeled .csv/.jsonl file, demo, or hf:NAME")
        data = "builtin"
    report = distill_model(args.model, args.out, config, data=data, student_path=args.student,
                           student=student, labeled=args.labeled, text_field=args.text_field,
                           label_field=args.label_field, transfer=args.transfer_data, checkpoints=args.checkpoints,
                           resume=args.resume,
                           keep_checkpoints=args.keep_checkpoints, overwrite=args.overwrite, device=args.device,
                           trust_remote_code=args.trust_remote_code, progress=sys.stderr.isatty())
    if not report.main_process:
        return
    print(report.summary())
    if args.labeled is None and report.eval_file is not None:
        args.labeled = str(report.eval_file)
    finish(args, report.source, report.output)
