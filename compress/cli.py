"""`compress <command>`: parse flags, build a config, call the public API, print the harness table.

Each command lives in ``compress/commands/<name>.py`` with a ``register(subparsers)`` function; this
module holds what they share: the flags every command takes (--model, --out, --device and the
evaluation options), the up-front check of every output path, the closing evaluation table, and error
handling. Errors the user can fix print one sentence and exit with code 2; Ctrl-C exits with 130 and
SIGTERM with 143, one line each; nothing partial is left behind.
"""

from __future__ import annotations

import argparse
import importlib
import os
import signal
import sys
import threading
from pathlib import Path

from . import __version__
from .errors import CompressError

# command modules under compress/commands, in the order --help lists them
COMMANDS = ("quantize", "export", "import", "distill", "finetune", "prune", "qat", "eval")


class Parser(argparse.ArgumentParser):
    """argparse that reports a bad flag as one line (and exit code 2) instead of the usage block."""

    def error(self, message: str):
        self.exit(2, f"error: {message} (see {self.prog} --help)\n")


def add_common(p: argparse.ArgumentParser, *, many_models: bool = False, output_help: str = "output path",
               model_help: str | None = None, model_flags: tuple[str, ...] = ("--model",)) -> None:
    """--model (or ``model_flags``), --out, --device, --trust-remote-code and the evaluation options."""
    if many_models:
        p.add_argument("--model", action="append", metavar="PATH",
                       help="model folder or .gguf file, or 'default' for the embedded all-MiniLM-L6-v2; repeat to compare several")
    else:
        p.add_argument(*model_flags, dest="model", metavar="PATH",
                       help=model_help or "local model folder or .gguf file (default: the embedded all-MiniLM-L6-v2)")
    p.add_argument("--out", metavar="PATH", help=output_help)
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"),
                   help="where to run: a GPU when present (auto), or force cpu / cuda")
    p.add_argument("--trust-remote-code", action="store_true", help="allow model folders that ship their own code")
    g = p.add_argument_group("evaluation (the table printed at the end)")
    if not many_models:
        g.add_argument("--no-eval", action="store_true", help="skip the evaluation table")
    g.add_argument("--eval-data", default="builtin", metavar="SRC",
                   help="held-out text: builtin, prose (GNU manuals; better for LLMs), a .txt/.jsonl/.csv file, "
                        "or hf:NAME (default builtin)")
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


def eval_config(args):
    """The EvalConfig the evaluation flags describe (validated)."""
    from .config import EvalConfig

    return EvalConfig(data=args.eval_data, labeled=args.labeled, text_field=args.text_field, label_field=args.label_field,
                      seqlen=args.eval_seqlen, ppl_tokens=args.eval_tokens, samples=args.eval_samples,
                      repeats=args.repeats, latency=not args.no_latency, device=args.device)


def check_eval_args(args) -> None:
    """Validate the evaluation flags, read the evaluation files, and check every output path (check_outputs)
    before any long work starts: an output is written before its closing table, so a bad --eval-data
    found only then would leave it behind a failed run."""
    if not getattr(args, "no_eval", False):
        from .data import load_labeled, load_texts

        config = eval_config(args)
        if config.data != "builtin":
            load_texts(config.data, "heldout", config.text_field)
        if config.labeled:
            load_labeled(config.labeled, config.text_field, config.label_field)
    check_outputs(args)


# flags whose value a command reads: an output may not be, contain or lie inside any of them
_INPUT_FLAGS = ("model", "teacher", "student", "from_gptq", "vocab_map", "data", "transfer_data", "calib",
                "eval_data", "labeled", "imatrix")


def input_paths(args) -> list[str]:
    """The paths a command reads, as given (the embedded default model for a missing or 'default' --model)."""
    from .files import default_model_path, named_model

    paths = []
    for flag in _INPUT_FLAGS:
        values = getattr(args, flag, None)
        for value in values if isinstance(values, list) else [values]:
            if flag == "model":
                try:
                    value = default_model_path() if value in (None, "default") else named_model(value)
                except CompressError:
                    continue
            if value is not None:
                paths.append(str(value))
    return paths


def check_outputs(args, *, out_is_file: bool = False, out_suffixes: tuple[str, ...] = (),
                  overwrite: bool | None = None, replaces: str | None = None) -> None:
    """Refuse --out, --checkpoints, --json and --plot paths compress must not write, up front (outputs.check_output).

    ``overwrite`` defaults to --overwrite; ``replaces`` limits what --out may replace to one command's outputs.
    """
    from .outputs import PLOT_SUFFIXES, check_checkpoints, check_output

    inputs = input_paths(args)
    overwrite = getattr(args, "overwrite", False) if overwrite is None else overwrite
    out = None
    if getattr(args, "out", None):
        out = check_output(args.out, inputs=inputs, overwrite=overwrite, is_file=out_is_file, suffixes=out_suffixes,
                           replaces=replaces)
    if getattr(args, "checkpoints", None):
        check_checkpoints(args.checkpoints, out=out, inputs=inputs)
    for flag, suffixes in (("json", (".json",)), ("plot", PLOT_SUFFIXES)):
        if getattr(args, flag, None):
            check_output(getattr(args, flag), inputs=inputs, overwrite=True, is_file=True, suffixes=suffixes,
                         what=f"--{flag} file", parent_must_exist=True, replaces="eval")


def run_eval(models: list, args, out_dir: Path | None = None) -> None:
    """Evaluate and print the table; write --json / --plot files, and report files in out_dir.

    Reports replace earlier reports compress wrote (no --overwrite needed), never anything else, not even
    another compress output.
    """
    from .eval.harness import compare
    from .outputs import atomic_output

    inputs = [str(m) for m in models if m is not None] + input_paths(args)
    report = compare(models, eval_config(args), trust_remote_code=args.trust_remote_code)
    print(report.table())
    if args.json:
        with atomic_output(args.json, overwrite=True, is_file=True, inputs=inputs, replaces="eval") as tmp:
            report.write_json(tmp)
    if args.plot:
        with atomic_output(args.plot, overwrite=True, is_file=True, inputs=inputs, replaces="eval") as tmp:
            report.plot(tmp)
    if out_dir is not None:
        with atomic_output(out_dir, overwrite=True, inputs=inputs, command="eval", replaces="eval") as tmp:
            report.write_json(tmp / "report.json")
            (tmp / "report.md").write_text(report.markdown() + "\n")
            report.plot(tmp / "report.png")
        print(f"wrote {out_dir}/report.json, report.md, report.png")


def finish(args, source, result) -> None:
    """The closing table every producing command prints: the input model against its result."""
    if not args.no_eval:
        run_eval([source, result], args)


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="compress", description="Make transformer models smaller and faster, and prove it.")
    parser.add_argument("--version", action="version", version=f"compress {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="<command>", parser_class=Parser)
    for name in COMMANDS:
        importlib.import_module(f"compress.commands.{name}").register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach for the network, whatever a library tries
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    _quiet_libraries()
    previous = _on_sigterm(_terminate)
    try:
        from .gguf.importer import gguf_models

        with gguf_models():  # a --model FILE.gguf is imported on first use and its folder removed at the end
            args.func(args)
    except CompressError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("interrupted; no partial output was left", file=sys.stderr)
        return 130
    except Terminated:
        print("terminated; no partial output was left", file=sys.stderr)
        return 143
    finally:
        _on_sigterm(previous)
    return 0


class Terminated(BaseException):
    """SIGTERM, raised in the main thread so that every output being built is removed as on Ctrl-C."""


def _terminate(signum, frame):
    raise Terminated


def _on_sigterm(handler):
    """Install a SIGTERM handler (only the main thread may); returns the previous one."""
    if handler is None or threading.current_thread() is not threading.main_thread():
        return None
    return signal.signal(signal.SIGTERM, handler)


def _quiet_libraries() -> None:
    """transformers' warnings off: by its environment variable, so commands that never use it do not import it.

    The hub-kernels package transformers uses (``kernels``) logs through the standard logging module, for
    example that it skips a publisher check offline; only its errors reach the user.
    """
    import logging
    import warnings

    warnings.filterwarnings("ignore", category=FutureWarning)
    logging.getLogger("kernels").setLevel(logging.ERROR)
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    if "transformers" in sys.modules:  # already imported (the CLI called in-process): the variable was read
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
