"""`compress export gguf`: write a Hugging Face model folder as one GGUF file for llama.cpp."""

from __future__ import annotations

import sys
from pathlib import Path

from ..errors import CompressError

FORMATS = ("gguf",)


def register(sub) -> None:
    e = sub.add_parser("export", help="export a model for another runtime (GGUF for llama.cpp)",
                       description="Export a model folder to a file another runtime loads.")
    fmt = e.add_subparsers(dest="format", metavar="<format>")
    g = fmt.add_parser("gguf", help="one GGUF file for llama.cpp (float, legacy block and k-quant types)",
                       description="Write a Llama, Mistral, Qwen2 or BERT model folder as a GGUF file, "
                                   "tokenizer included, quantized to --type.")
    from ..gguf.writer import TYPES

    g.add_argument("--model", metavar="PATH", help="local model folder or .gguf file (default: the embedded all-MiniLM-L6-v2)")
    g.add_argument("--out", metavar="FILE.gguf", required=True, help="the GGUF file to write")
    g.add_argument("--type", default="f16", metavar="TYPE", help=f"tensor type: {', '.join(TYPES)} (default f16)")
    g.add_argument("--from-gptq", metavar="PATH",
                   help="a GPTQ checkpoint (4-bit, group size 32) of --model whose quantized weights are carried "
                        "into Q4_0/Q4_1 blocks instead of rounding again")
    g.add_argument("--imatrix", metavar="SRC",
                   help="calibration text (builtin, prose, a .txt/.jsonl/.csv file) whose activation statistics steer "
                        "the k-quant scales (an importance matrix)")
    g.add_argument("--nsamples", type=int, default=64, help="calibration samples for --imatrix (default 64)")
    g.add_argument("--seqlen", type=int, default=256, help="tokens per calibration sample for --imatrix (default 256)")
    g.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    g.set_defaults(func=run)
    e.set_defaults(func=missing_format)


def missing_format(args) -> None:
    raise CompressError(f"choose an export format: {', '.join(FORMATS)} (see compress export gguf --help)")


def run(args) -> None:
    from ..cli import check_outputs
    from ..files import default_model_path, named_model
    from ..gguf.writer import TYPES, export_gguf

    if args.type not in TYPES:
        raise CompressError(f"unknown GGUF type '{args.type}'; choose one of {', '.join(TYPES)}")
    check_outputs(args, out_is_file=True, out_suffixes=(".gguf",))
    model = named_model(args.model) or default_model_path()
    if Path(model).suffix.lower() == ".gguf":
        from ..models import resolve_model_path

        model = resolve_model_path(model)  # a GGUF input is imported into a float folder first
    extra = {}
    if args.from_gptq or args.imatrix:  # both read the model before the export would check it
        from ..gguf.writer import check_source

        check_source(model, args.type)
    if args.from_gptq:
        from ..gguf.calibrated import gptq_blocks

        extra["replace"] = gptq_blocks(model, args.from_gptq, args.type)
    if args.imatrix:
        from ..gguf.calibrated import importance_matrix

        extra["importance"] = importance_matrix(model, args.imatrix, nsamples=args.nsamples, seqlen=args.seqlen)
    report = export_gguf(model, args.out, args.type, overwrite=args.overwrite, progress=sys.stderr.isatty(), **extra)
    print(report.summary())
