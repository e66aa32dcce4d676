"""`compress <command>`: parse flags, build a config, call the public API, print the harness table.

Every command takes --model (default: the embedded all-MiniLM-L6-v2), --out and --device, and ends by
evaluating the input model against the result (--no-eval skips it). Errors the user can fix print one
sentence and exit with code 2; nothing partial is left behind.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from . import __version__
from .errors import CompressError

METHODS = ("rtn",)


class _Parser(argparse.ArgumentParser):
    """argparse that reports a bad flag as one line (and exit code 2) instead of the usage block."""

    def error(self, message: str):
        self.exit(2, f"error: {message} (see {self.prog} --help)\n")


def _add_common(p: argparse.ArgumentParser, *, many_models: bool = False, output: bool = True) -> None:
    if many_models:
        p.add_argument("--model", action="append", metavar="PATH",
                       help="model folder, or 'default' for the embedded all-MiniLM-L6-v2; repeat to compare several")
    else:
        p.add_argument("--model", metavar="PATH", help="local model folder (default: the embedded all-MiniLM-L6-v2)")
    p.add_argument("--out", metavar="PATH", help="output path" if output else "folder for report.json, report.md and report.png")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"),
                   help="where to run: a GPU when present (auto), or force cpu / cuda")
    p.add_argument("--trust-remote-code", action="store_true", help="allow model folders that ship their own code")
    g = p.add_argument_group("evaluation (the table printed at the end)")
    if not many_models:
        g.add_argument("--no-eval", action="store_true", help="skip the evaluation table")
    g.add_argument("--eval-data", default="builtin", metavar="SRC",
                   help="held-out text: builtin, a .txt/.jsonl/.csv file, or hf:NAME (default builtin)")
    g.add_argument("--labeled", metavar="FILE", help="labeled .csv/.jsonl for classifier accuracy")
    g.add_argument("--text-field", default="text", help="text column / field of data files (default text)")
    g.add_argument("--label-field", default="label", help="label column / field of --labeled (default label)")
    g.add_argument("--eval-tokens", type=int, default=8192, metavar="N", help="tokens scored for perplexity (default 8192)")
    g.add_argument("--eval-samples", type=int, default=256, metavar="N", help="texts for embedding / classifier metrics")
    g.add_argument("--eval-seqlen", type=int, default=512, metavar="N", help="perplexity window and prefill length")
    g.add_argument("--repeats", type=int, default=5, metavar="N", help="timed runs per latency figure (median)")
    g.add_argument("--no-latency", action="store_true", help="skip latency measurements")
    g.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    g.add_argument("--plot", metavar="FILE.png", help="also plot accuracy against size")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="compress", description="Make transformer models smaller and faster, and prove it.")
    parser.add_argument("--version", action="version", version=f"compress {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="<command>", parser_class=_Parser)

    q = sub.add_parser("quantize", help="quantize weights (round-to-nearest) into the GPTQ checkpoint format",
                       description="Quantize a model's Linear layers and save a folder that compress.load, "
                                   "transformers and vLLM read.")
    _add_common(q)
    q.add_argument("--method", default="rtn", help=f"quantization method: {', '.join(METHODS)} (default rtn)")
    q.add_argument("--bits", type=int, default=4, help="bits per weight: 2, 3, 4 or 8 (default 4)")
    q.add_argument("--group-size", type=int, default=128, help="columns per scale: 32, 64, 128 or -1 (default 128)")
    sym = q.add_mutually_exclusive_group()
    sym.add_argument("--sym", dest="sym", action="store_true", default=True, help="symmetric quantization (default)")
    sym.add_argument("--asym", dest="sym", action="store_false", help="asymmetric quantization (per-group zero points)")
    q.add_argument("--skip", action="append", default=[], metavar="REGEX",
                   help="keep layers whose name matches in full precision (repeatable)")
    q.add_argument("--override", action="append", default=[], metavar="REGEX=bits:B[,group_size:G]",
                   help="other bits / group size for matching layers (repeatable)")
    q.add_argument("--blocks", metavar="NAME", help="dotted name of the repeated block list, if not found automatically")
    q.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    q.set_defaults(func=cmd_quantize)

    e = sub.add_parser("eval", help="compare models side by side: size, bits per weight, memory, latency, accuracy, KL",
                       description="Evaluate models side by side; the first --model is the reference.")
    _add_common(e, many_models=True, output=False)
    e.set_defaults(func=cmd_eval)
    return parser


def parse_overrides(items: list[str]) -> dict[str, dict[str, int]]:
    """'REGEX=bits:8,group_size:32' -> {'REGEX': {'bits': 8, 'group_size': 32}}."""
    out = {}
    for item in items:
        pattern, sep, body = item.rpartition("=")
        if not sep or not pattern:
            raise CompressError(f"--override '{item}' must look like REGEX=bits:8 or REGEX=bits:8,group_size:32")
        values = {}
        for part in body.split(","):
            key, colon, value = part.partition(":")
            if not colon or not value.strip().lstrip("-").isdigit():
                raise CompressError(f"--override '{item}': '{part}' must be bits:N or group_size:N")
            values[key.strip()] = int(value)
        out[pattern] = values
    return out


def eval_config(args) -> "EvalConfig":
    from .config import EvalConfig

    return EvalConfig(data=args.eval_data, labeled=args.labeled, text_field=args.text_field, label_field=args.label_field,
                      seqlen=args.eval_seqlen, ppl_tokens=args.eval_tokens, samples=args.eval_samples,
                      repeats=args.repeats, latency=not args.no_latency, device=args.device)


def run_eval(models: list, args, out_dir: Path | None = None) -> None:
    """Evaluate and print the table; write --json / --plot files, and report files in out_dir."""
    from .eval.harness import compare

    report = compare(models, eval_config(args), trust_remote_code=args.trust_remote_code)
    print(report.table())
    if args.json:
        report.write_json(args.json)
    if args.plot:
        report.plot(args.plot)
    if out_dir is not None:
        from .checkpoint import atomic_output

        with atomic_output(out_dir, overwrite=True) as tmp:
            report.write_json(tmp / "report.json")
            (tmp / "report.md").write_text(report.markdown() + "\n")
            report.plot(tmp / "report.png")
        print(f"wrote {out_dir}/report.json, report.md, report.png")


def _check_eval_args(args) -> None:
    """Validate evaluation options before any long work starts."""
    if getattr(args, "no_eval", False):
        return
    eval_config(args)


def cmd_quantize(args) -> None:
    from .config import RTNConfig
    from .quant.apply import quantize

    if args.method not in METHODS:
        raise CompressError(f"unknown method '{args.method}'; choose one of {', '.join(METHODS)}")
    config = RTNConfig(bits=args.bits, group_size=args.group_size, sym=args.sym, skip=args.skip,
                       overrides=parse_overrides(args.override), blocks=args.blocks)
    _check_eval_args(args)
    report = quantize(args.model, args.out, config, device=args.device, overwrite=args.overwrite,
                      trust_remote_code=args.trust_remote_code, progress=sys.stderr.isatty())
    print(report.summary())
    if not args.no_eval:
        run_eval([args.model, report.output], args)


def cmd_eval(args) -> None:
    models = args.model or [None]
    out_dir = Path(args.out) if args.out else None
    run_eval(models, args, out_dir)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach for the network, whatever a library tries
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    _quiet_libraries()
    try:
        args.func(args)
    except CompressError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("interrupted; nothing was written", file=sys.stderr)
        return 130
    return 0


def _quiet_libraries() -> None:
    import warnings

    warnings.filterwarnings("ignore", category=FutureWarning)
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
    except ImportError:  # pragma: no cover
        pass


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
