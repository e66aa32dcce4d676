"""Quantize a model with round-to-nearest, load the result, and compare it with the original.

Everything goes through the public API that the `compress` command uses:

    python examples/quantize_and_evaluate.py                      # the embedded all-MiniLM-L6-v2
    python examples/quantize_and_evaluate.py --model DIR --bits 3 --out DIR-w3
"""

import argparse

import torch

import compress
from compress import EvalConfig, RTNConfig


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="local model folder (default: the embedded all-MiniLM-L6-v2)")
    parser.add_argument("--out", default="example-rtn-out", help="output folder (replaced if it exists)")
    parser.add_argument("--bits", type=int, default=4)
    parser.add_argument("--group-size", type=int, default=128)
    parser.add_argument("--quick", action="store_true", help="a short evaluation (for smoke tests)")
    args = parser.parse_args()

    # 1. quantize: a folder in the GPTQ checkpoint layout, the input untouched
    report = compress.quantize(args.model, args.out, RTNConfig(bits=args.bits, group_size=args.group_size),
                               overwrite=True)
    print(report.summary())

    # 2. load it back: Linear layers become QuantLinear modules that compute from the packed weights
    quantized = compress.load(args.out)
    texts = ["Quantization stores each weight in a few bits.", "The harness compares models side by side."]
    batch = quantized.tokenizer(texts, padding=True, return_tensors="pt")
    with torch.inference_mode():
        if quantized.kind == "embedding":
            out = quantized.embed(batch["input_ids"], batch["attention_mask"])
            print("embedding of the first text:", out[0, :4].tolist(), "...")
        else:
            out = quantized.model(**batch)
            print("output shape:", tuple(out.logits.shape))

    # 3. compare with the original: size, bits per weight, memory, latency, accuracy, KL
    quick = dict(ppl_tokens=512, kl_tokens=256, seqlen=64, samples=16, repeats=1, warmup=0) if args.quick else {}
    print(compress.compare([args.model, args.out], EvalConfig(**quick)).table())


if __name__ == "__main__":
    main()
