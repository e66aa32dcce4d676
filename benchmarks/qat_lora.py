"""Adapter recovery on the reference LM: how much of the quantization loss LoRA adapters win back.

    python benchmarks/qat_lora.py [--steps 200] [--rank 16] [--bases int4,int3,nf4] [--json out.json]

For each base (int4 g128 RTN, int3 g128 RTN, NF4 block 64 with double quantization) of the reference
LM (benchmarks/reference_lm.py, cached), LoRA adapters are trained on the built-in corpus's training
split twice: on the next-token loss alone, and distilled from the float model (soft targets, T = 1).
Each run reports held-out perplexity (the corpus's held-out split, the windows reference_lm.py
measures on) for the float model, the PTQ base, base + adapters, and the adapters merged and
re-quantized (int bases: round-to-nearest in the base's own format, and GPTQ at the same settings;
NF4: NF4), with the mean per-token KL divergence from the float model on the same tokens; and the
fraction of the PTQ degradation recovered:

    recovered = (ppl_ptq - ppl_x) / (ppl_ptq - ppl_float)      (and kl_x against kl_ptq, float's KL being 0)

GPTQ re-quantization is calibrated and would beat round-to-nearest even without adapters, so the
output also gives GPTQ of the float model at the same settings, the figure that merge competes with.

Output: a markdown table on stdout (and every number in --json).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

import compress
from compress import NF4Config, RTNConfig
from compress.config import GPTQConfig
from compress.qat import LoraRecoveryConfig, merge_adapters, recover_model
from hostinfo import machine  # the scripts beside it (benchmarks/ is on sys.path)

HERE = Path(__file__).resolve().parent
BASES = {
    "int4": ("int4 g128 RTN", RTNConfig(bits=4, group_size=128)),
    "int3": ("int3 g128 RTN", RTNConfig(bits=3, group_size=128)),
    "nf4": ("NF4 b64 dq", NF4Config(blocksize=64, double_quant=True)),
}


def reference_lm() -> Path:
    sys.path.insert(0, str(HERE))
    from reference_lm import ensure_reference_lm

    return ensure_reference_lm()


class HeldOut:
    """The held-out windows and the float model's log-probabilities on them, for perplexity and KL."""

    def __init__(self, teacher, stream: torch.Tensor, seqlen: int, windows: int):
        n = min(windows, stream.numel() // seqlen)
        self.batches = list(stream[: n * seqlen].view(n, seqlen).split(8))
        with torch.no_grad():
            self.teacher = [torch.log_softmax(teacher(input_ids=b).logits.float(), -1) for b in self.batches]

    @torch.no_grad()
    def measure(self, model) -> tuple[float, float]:
        """(perplexity, mean per-token KL(float || model) in nats) over the held-out windows."""
        import math

        model.eval()
        nll, kl, count = 0.0, 0.0, 0
        for batch, t in zip(self.batches, self.teacher):
            logp = torch.log_softmax(model(input_ids=batch).logits.float(), -1)
            tokens = batch.shape[0] * (batch.shape[1] - 1)
            nll -= float(logp[:, :-1].gather(-1, batch[:, 1:, None]).sum())
            kl += float((t.exp() * (t - logp)).sum(-1)[:, :-1].sum())
            count += tokens
        return math.exp(nll / count), kl / count


def recovered(ptq: float, x: float, reference: float) -> float:
    """Fraction of the PTQ degradation won back: (ptq - x) / (ptq - reference)."""
    return (ptq - x) / (ptq - reference)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seqlen", type=int, default=128, help="training window, tokens")
    parser.add_argument("--eval-seqlen", type=int, default=256)
    parser.add_argument("--eval-windows", type=int, default=32)
    parser.add_argument("--bases", default="int4,int3,nf4")
    parser.add_argument("--modes", default="ce,distill", help="ce (next-token loss), distill (from the float model)")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    torch.set_num_threads(2)
    from compress.data import load_texts, token_stream

    float_dir = reference_lm()
    work = Path(tempfile.mkdtemp(prefix="qat-lora-"))
    results = []
    try:
        teacher = compress.load(float_dir)
        held = HeldOut(teacher.model, token_stream(load_texts("builtin", "heldout"), teacher.tokenizer),
                       args.eval_seqlen, args.eval_windows)
        ppl_float, _ = held.measure(teacher.model)
        log(f"float: held-out perplexity {ppl_float:.3f}")
        for key in args.bases.split(","):
            label, qconfig = BASES[key]
            base_dir = work / key
            compress.quantize(float_dir, base_dir, qconfig, progress=False)
            ppl_ptq, kl_ptq = held.measure(compress.load(base_dir).model)
            gptq = None
            if isinstance(qconfig, RTNConfig):  # the calibrated PTQ a merged model's GPTQ re-quantization competes with
                gconfig = GPTQConfig(bits=qconfig.bits, group_size=qconfig.group_size, seqlen=512)
                compress.quantize(float_dir, work / f"{key}-gptq", gconfig, progress=False)
                gptq = held.measure(compress.load(work / f"{key}-gptq").model)
            log(f"{label}: PTQ perplexity {ppl_ptq:.3f}, KL {kl_ptq:.5f}; GPTQ from float {gptq}")
            for mode in args.modes.split(","):
                config = LoraRecoveryConfig(rank=args.rank, alpha=2.0 * args.rank, steps=args.steps,
                                            learning_rate=args.lr, batch_size=args.batch_size, max_length=args.seqlen,
                                            max_samples=args.steps * args.batch_size, distill=mode == "distill",
                                            logging_steps=50)
                adapters = work / f"{key}-{mode}"
                start = time.perf_counter()
                report = recover_model(base_dir, adapters, config, data="builtin",
                                       teacher=float_dir if mode == "distill" else None, progress=False)
                seconds = time.perf_counter() - start
                row = {"base": label, "mode": mode, "steps": args.steps, "rank": args.rank, "ppl_float": ppl_float,
                       "ppl_ptq": ppl_ptq, "kl_ptq": kl_ptq, "adapter_parameters": report.trainable,
                       "train_seconds": seconds, "gptq_from_float": gptq}
                row["ppl_adapters"], row["kl_adapters"] = held.measure(report.model)
                for how in (["rtn", "gptq"] if gptq else ["nf4"]):
                    merged = work / f"{key}-{mode}-merged-{how}"
                    merge_adapters(adapters, merged, how, progress=False)
                    row[f"ppl_merged_{how}"], row[f"kl_merged_{how}"] = held.measure(compress.load(merged).model)
                    shutil.rmtree(merged, ignore_errors=True)
                results.append(row)
                log(json.dumps(row))
                if args.json:  # written after every run, so an interrupted benchmark keeps what it measured
                    save(args, results)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"machine: {machine()}")
    print(f"settings: rank {args.rank}, alpha {2 * args.rank}, {args.steps} steps of {args.batch_size} x {args.seqlen} "
          f"tokens, lr {args.lr}; held-out perplexity and KL over {args.eval_windows} windows of {args.eval_seqlen} "
          "tokens\n")
    print("| base | training | PTQ ppl (KL) | + adapters ppl (KL) | recovered ppl / KL | merged, re-quantized as | "
          "merged ppl (KL) | merged recovered ppl / KL | train s |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in results:
        mode = "distilled from float" if r["mode"] == "distill" else "next-token loss"
        for i, how in enumerate(h for h in ("rtn", "gptq", "nf4") if f"ppl_merged_{h}" in r):
            head = (f"| {r['base']} | {mode} | {r['ppl_ptq']:.3f} ({r['kl_ptq']:.5f}) | {r['ppl_adapters']:.3f} "
                    f"({r['kl_adapters']:.5f}) | {pct(r, r['ppl_adapters'], r['kl_adapters'])} |") if i == 0 else \
                "| | | | | |"
            print(f"{head} {how} | {r[f'ppl_merged_{how}']:.3f} ({r[f'kl_merged_{how}']:.5f}) | "
                  f"{pct(r, r[f'ppl_merged_{how}'], r[f'kl_merged_{how}'])} | {r['train_seconds']:.0f} |")
    print(f"\nfloat perplexity {results[0]['ppl_float']:.3f}" if results else "")
    for r in results:
        if r["gptq_from_float"] and r["mode"] == args.modes.split(",")[0]:
            print(f"{r['base']}: GPTQ of the float model at the same settings: ppl {r['gptq_from_float'][0]:.3f} "
                  f"(KL {r['gptq_from_float'][1]:.5f})")
    if args.json:
        save(args, results)


def pct(r: dict, ppl: float, kl: float) -> str:
    """'ppl% / kl%': the fraction of the PTQ degradation recovered, by perplexity and by KL."""
    return f"{100 * recovered(r['ppl_ptq'], ppl, r['ppl_float']):.0f}% / {100 * recovered(r['kl_ptq'], kl, 0.0):.0f}%"


def save(args, results: list[dict]) -> None:
    args.json.write_text(json.dumps({"machine": machine(), "args": {k: str(v) for k, v in vars(args).items()},
                                     "results": results}, indent=2) + "\n")


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


if __name__ == "__main__":
    main()
