"""`compress quantize`: weight quantization into a checkpoint that compress.load and other tools read."""

from __future__ import annotations

import sys

from ..cli import add_common, check_eval_args, finish
from ..errors import CompressError

METHODS = ("rtn", "gptq", "nf4")


def register(sub) -> None:
    q = sub.add_parser("quantize", help="quantize weights (GPTQ, round-to-nearest: GPTQ checkpoint format; nf4: bitsandbytes 4-bit)",
                       description="Quantize a model's Linear layers and save a folder that compress.load, "
                                   "transformers and vLLM read (nf4: compress.load and transformers with bitsandbytes).")
    add_common(q)
    q.add_argument("--method", default="gptq", help=f"quantization method: {', '.join(METHODS)} (default gptq)")
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
    q.add_argument("--dtype", default="auto", choices=("auto", "float16", "bfloat16", "float32"),
                   help="dtype of the tensors left unquantized (auto: float16, or bfloat16 for bfloat16 models)")
    g = q.add_argument_group("GPTQ (--method gptq)")
    g.add_argument("--calib", default="builtin", metavar="SRC",
                   help="calibration text: builtin, prose (GNU manuals; better for LLMs), a .txt/.jsonl/.csv file, "
                        "or hf:NAME (default builtin)")
    g.add_argument("--nsamples", type=int, default=128, help="calibration samples (default 128)")
    g.add_argument("--seqlen", type=int, default=None,
                   help="tokens per sample (default 2048 or the model's maximum, whichever is smaller)")
    g.add_argument("--act-order", action="store_true", help="quantize columns by decreasing Hessian diagonal (desc_act)")
    g.add_argument("--static-groups", action="store_true", help="with --act-order, fix group parameters up front")
    g.add_argument("--damp", type=float, default=0.01, help="Hessian damping, a fraction of its mean diagonal (default 0.01)")
    g.add_argument("--mse", action="store_true", help="search each group's clipping range for the smallest error")
    g.add_argument("--no-true-sequential", dest="true_sequential", action="store_false",
                   help="solve all layers of a block from the block's unquantized inputs (faster, less accurate)")
    g.add_argument("--calib-batch-size", type=int, default=8, help="samples per forward pass (default 8)")
    g.add_argument("--offload", action="store_true", help="keep calibration activations on disk instead of in memory")
    g.add_argument("--calib-dtype", default="auto", choices=("auto", "float32", "bfloat16", "float16"),
                   help="dtype of the calibration forwards' matrix products (auto: float32 on the CPU, half "
                        "precision on a GPU; bfloat16 on the CPU: norms and residuals stay float32, 1.5x "
                        "faster with AMX, 7%% worse in KL on SmolLM2). Solves and Hessians stay float32")
    g.add_argument("--seed", type=int, default=0, help="seed for drawing calibration samples (default 0)")
    nf4 = q.add_argument_group("nf4 (4-bit blockwise, bitsandbytes layout)")
    nf4.add_argument("--quant-type", choices=("nf4", "fp4"), help="code table: nf4 (default) or fp4")
    dq = nf4.add_mutually_exclusive_group()
    dq.add_argument("--double-quant", dest="double_quant", action="store_true", default=None,
                    help="quantize the block maxima to 8 bits too (default; ~4.127 bits per weight at block size 64)")
    dq.add_argument("--no-double-quant", dest="double_quant", action="store_false",
                    help="keep float32 block maxima (4.5 bits per weight at block size 64)")
    nf4.add_argument("--blocksize", type=int, metavar="N", help="weights per block: a power of two from 32 to 4096 (default 64)")
    nf4.add_argument("--compute-dtype", choices=("float32", "bfloat16", "float16"),
                     help="matmul dtype at inference (default float32)")
    q.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    q.set_defaults(func=run)


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


def build_nf4_config(args):
    """NF4Config from the nf4 flags; refuses the integer-only flags, which do not apply to it."""
    from ..config import NF4Config

    if args.bits != 4:
        raise CompressError(f"--method nf4 stores 4-bit codes; --bits {args.bits} does not apply (drop it)")
    if args.override or args.group_size != 128 or not args.sym:
        flag = "--override" if args.override else "--group-size" if args.group_size != 128 else "--asym"
        raise CompressError(f"{flag} does not apply to --method nf4; use --blocksize for its block size")
    given = {k: v for k, v in (("quant_type", args.quant_type), ("double_quant", args.double_quant),
                               ("blocksize", args.blocksize), ("compute_dtype", args.compute_dtype)) if v is not None}
    return NF4Config(**given, skip=args.skip, blocks=args.blocks, dtype=args.dtype)


def build_config(args):
    from ..config import GPTQConfig, RTNConfig

    if args.method not in METHODS:
        raise CompressError(f"unknown method '{args.method}'; choose one of {', '.join(METHODS)}")
    if args.method == "nf4":
        return build_nf4_config(args)
    nf4_only = [flag for flag, v in (("--quant-type", args.quant_type), ("--blocksize", args.blocksize),
                                     ("--compute-dtype", args.compute_dtype),
                                     ("--double-quant/--no-double-quant", args.double_quant)) if v is not None]
    if nf4_only:
        raise CompressError(f"{nf4_only[0]} applies to --method nf4 only")
    common = dict(bits=args.bits, group_size=args.group_size, sym=args.sym, skip=args.skip,
                  overrides=parse_overrides(args.override), blocks=args.blocks, dtype=args.dtype)
    if args.method == "gptq":
        return GPTQConfig(**common, act_order=args.act_order, static_groups=args.static_groups, damp=args.damp,
                          mse=args.mse, true_sequential=args.true_sequential, calib=args.calib, nsamples=args.nsamples,
                          seqlen=args.seqlen, calib_batch_size=args.calib_batch_size, offload=args.offload,
                          seed=args.seed, text_field=args.text_field, calib_dtype=args.calib_dtype)
    return RTNConfig(**common)


def run(args) -> None:
    from ..quant.apply import quantize

    config = build_config(args)
    check_eval_args(args)
    if getattr(config, "offload", False):
        from ..outputs import offload_folder

        offload_folder()  # a bad COMPRESS_OFFLOAD_DIR is found before calibration starts
    report = quantize(args.model, args.out, config, device=args.device, overwrite=args.overwrite,
                      trust_remote_code=args.trust_remote_code, progress=sys.stderr.isatty())
    print(report.summary())
    finish(args, args.model, report.output)
