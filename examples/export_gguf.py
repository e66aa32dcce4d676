"""Export a model to GGUF in several types and check each file in llama.cpp against transformers.

A BERT embedding model (the default: the embedded all-MiniLM-L6-v2) is compared by the cosine of its
pooled sentence embeddings, a causal LM (Llama, Mistral, Qwen2) by the KL divergence of its next-token
distributions. llama.cpp runs through llama-cpp-python (pip install 'compress[llama]').

    python examples/export_gguf.py                                  # MiniLM: f16, q8_0, q4_k_m
    python examples/export_gguf.py --model DIR --types f16,q4_0 --out-dir gguf-out
"""

import argparse
import json
from pathlib import Path

from compress import export_gguf
from compress.files import default_model_path
from compress.gguf import verify

TEXTS = ["Quantization stores each weight in fewer bits.",
         "The tokenizer splits text into pieces the model knows.",
         "A GGUF file holds the weights, the tokenizer and the metadata in one place."]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, help="local model folder (default: the embedded all-MiniLM-L6-v2)")
    parser.add_argument("--types", default="f16,q8_0,q4_k_m", help="comma-separated GGUF types")
    parser.add_argument("--out-dir", type=Path, default=Path("example-gguf-out"))
    args = parser.parse_args()
    model = args.model or default_model_path()
    is_bert = json.loads((model / "config.json").read_text()).get("model_type") == "bert"

    if is_bert:
        reference = verify.transformers_embeddings(model, TEXTS)
    else:
        from tokenizers import Tokenizer

        ids = Tokenizer.from_file(str(model / "tokenizer.json")).encode(" ".join(TEXTS)).ids
        reference = verify.transformers_logits(model, ids)

    print(f"{'type':8} {'MB':>7} {'bits/w':>6}  {'llama.cpp vs transformers'}")
    for export_type in args.types.split(","):
        report = export_gguf(model, args.out_dir / f"model-{export_type}.gguf", export_type, overwrite=True)
        llm = verify.open_model(report.path, embedding=is_bert)
        if is_bert:
            score = f"min cosine {verify.cosine(reference, verify.pooled_embeddings(llm, TEXTS)).min():.5f}"
        else:
            score = f"mean KL {verify.mean_kl(reference, verify.causal_logits(llm, ids)):.2e} nats"
        print(f"{export_type:8} {report.file_bytes / 1e6:7.2f} {report.bits_per_weight:6.2f}  {score}")
        llm.close()


if __name__ == "__main__":
    main()
