"""Do GPTQModel and transformers read compress's GPTQ folders as compress does? Logits side by side.

    python benchmarks/gptq_consumers.py --peer /work/venvs/gptqmodel/bin/python FOLDER [FOLDER ...]

Run with compress's python, it drives two halves of this one file:

1. In GPTQModel's environment (--peer; benchmarks/peer_venv.sh builds it) each folder is loaded twice:
   ``GPTQModel.load(folder, device="cpu")`` and plain ``AutoModelForCausalLM.from_pretrained(folder)``
   (transformers' GPTQ loader, which goes through optimum and GPTQModel's kernels), each in the dtype it
   picks by itself and again in float32, and the logits of one token batch are saved. A loader that
   fails is recorded with its exception, not hidden.
2. Back in compress's environment, ``compress.load(folder)`` (float32 on the CPU) scores the same
   batch, and every consumer's logits are compared with it: max |difference|, top-1 agreement, mean
   per-token KL(compress || consumer).

Tolerance. All readers dequantize the same integers with the same float16 scales, so a format
misreading (a zero point off by one, a wrong g_idx) moves every weight by a whole quantization step and
the logits by whole units. What remains for a correct reader is arithmetic: the order of float32 sums,
and float16 activations when a consumer computes in float16. The float16 part is measured, not
guessed: compress's own logits computed in float16 differ from its float32 logits by some max |diff|
(the "float16 floor"). A consumer in float16 passes at up to 2x that floor; one in float32 passes at
up to 1e-3 x the largest |logit| (float32 rounding across 30 layers stays orders of magnitude below).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import tempfile
import traceback
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent


# ---- half 1: inside GPTQModel's environment (no compress there) -------------------------------------


def consumer_logits(folder: str, loader: str, dtype: str, ids: torch.Tensor) -> tuple[torch.Tensor, str]:
    """Logits [B, T, V] as float32 from one consumer, and the dtype its model actually computed in."""
    kw = {} if dtype == "auto" else {"dtype": getattr(torch, dtype)}
    if loader == "gptqmodel":
        from gptqmodel import GPTQModel

        model = GPTQModel.load(folder, device="cpu", **kw)
        module = model.model
    else:
        from transformers import AutoModelForCausalLM

        module = model = AutoModelForCausalLM.from_pretrained(folder, device_map="cpu", **kw)
    used = str(next(p for p in module.parameters() if p.is_floating_point()).dtype).replace("torch.", "")
    kernels = sorted({type(m).__name__ for m in module.modules() if hasattr(m, "qweight")})
    with torch.inference_mode():
        logits = model(input_ids=ids).logits
    return logits.float(), f"{used}, {'/'.join(kernels) or 'no quantized layers'}"


def produce(args) -> None:
    from safetensors.torch import save_file

    ids = torch.tensor(json.loads(Path(args.tokens).read_text()))
    out, status = Path(args.out), {}
    for i, folder in enumerate(args.folders):
        for loader in ("gptqmodel", "transformers"):
            for dtype in ("auto", "float32"):
                key = f"{i}-{loader}-{dtype}"
                try:
                    logits, used = consumer_logits(folder, loader, dtype, ids)
                    save_file({"logits": logits.contiguous()}, str(out / f"{key}.safetensors"))
                    status[key] = {"ok": True, "computed_in": used}
                except Exception as exc:  # noqa: BLE001 - recorded and reported: which loader fails, and how
                    status[key] = {"ok": False, "error": f"{type(exc).__name__}: {exc}"[:600],
                                   "where": traceback.format_exc().strip().splitlines()[-3:]}
                print(key, json.dumps(status[key]), flush=True)
    (out / "status.json").write_text(json.dumps(status, indent=2))


# ---- half 2: compress's environment ------------------------------------------------------------------


def token_batch(folder: str, data: str, batch: int, seqlen: int) -> torch.Tensor:
    """``batch`` consecutive held-out windows of ``seqlen`` tokens [batch, seqlen]."""
    from compress.data import load_texts, token_stream
    from compress.models import load_tokenizer

    stream = token_stream(load_texts(data, "heldout"), load_tokenizer(folder), max_tokens=batch * seqlen)
    return stream[: batch * seqlen].reshape(batch, seqlen)


def compare(ours: torch.Tensor, theirs: torch.Tensor) -> dict:
    """Max |difference|, top-1 agreement and mean per-token KL(ours || theirs) of logits [B, T, V]."""
    logp, logq = ours.log_softmax(-1), theirs.log_softmax(-1)
    kl = (logp.exp() * (logp - logq)).sum(-1).mean().item()
    return {"max_abs_diff": (ours - theirs).abs().max().item(),
            "top1_agree": (ours.argmax(-1) == theirs.argmax(-1)).float().mean().item(), "kl": kl}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folders", nargs="+", help="GPTQ folders written by compress quantize --method gptq")
    parser.add_argument("--peer", help="python of GPTQModel's virtual environment")
    parser.add_argument("--data", default="builtin", help="held-out text for the token batch (as --eval-data)")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seqlen", type=int, default=128)
    parser.add_argument("--json", help="also write the results here")
    parser.add_argument("--produce", action="store_true", help=argparse.SUPPRESS)  # half 1, in the peer
    parser.add_argument("--tokens", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.produce:
        return produce(args)
    if not args.peer:
        parser.error("--peer is required: the python of GPTQModel's virtual environment")

    from safetensors.torch import load_file

    import compress

    folders = [str(Path(f).resolve()) for f in args.folders]
    ids = token_batch(folders[0], args.data, args.batch, args.seqlen)
    results = {}
    with tempfile.TemporaryDirectory(prefix="gptq-consumers-") as tmp:
        (Path(tmp) / "tokens.json").write_text(json.dumps(ids.tolist()))
        # run outside the repository: its kernels/ folder would shadow the `kernels` package there
        subprocess.run([args.peer, str(HERE / "gptq_consumers.py"), "--produce", "--tokens", str(Path(tmp) / "tokens.json"),
                        "--out", tmp, *folders], check=True, cwd=tmp, env={**os.environ, "GPTQMODEL_CPU_WORKERS": "2"})
        status = json.loads((Path(tmp) / "status.json").read_text())
        for i, folder in enumerate(folders):
            with torch.inference_mode():
                ours = compress.load(folder).model(input_ids=ids).logits.float()
                half = compress.load(folder, dtype=torch.float16).model(input_ids=ids).logits.float()
            floor = (ours - half).abs().max().item()
            row = {"logit_max": ours.abs().max().item(), "float16_floor": floor, "consumers": {}}
            for key, st in status.items():
                if not key.startswith(f"{i}-"):
                    continue
                name = key.split("-", 1)[1]
                if not st["ok"]:
                    row["consumers"][name] = st
                    continue
                m = compare(ours, load_file(str(Path(tmp) / f"{key}.safetensors"))["logits"])
                in_fp32 = st["computed_in"].startswith("float32")
                m["tolerance"] = 1e-3 * row["logit_max"] if in_fp32 else 2 * floor
                m["within"] = m["max_abs_diff"] <= m["tolerance"]
                row["consumers"][name] = {**st, **m}
            results[folder] = row
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    print_table(results, ids.shape)


def print_table(results: dict, shape) -> None:
    print(f"\nlogits of {shape[0]} x {shape[1]} held-out tokens against compress.load (float32)\n")
    print("| folder | consumer | computed in | max abs diff | tolerance | within | top1 agree | KL |")
    print("|---|---|---|---|---|---|---|---|")
    for folder, row in results.items():
        name = Path(folder).name
        print(f"| {name} | compress float16 (floor) | float16 | {row['float16_floor']:.4f} | - | - | - | - |")
        for consumer, r in row["consumers"].items():
            if not r["ok"]:
                print(f"| {name} | {consumer} | - | FAILED: {r['error'][:200]} | | | | |")
                continue
            print(f"| {name} | {consumer} | {r['computed_in']} | {r['max_abs_diff']:.4f} | {r['tolerance']:.4f} | "
                  f"{'yes' if r['within'] else 'NO'} | {r['top1_agree']:.4f} | {r['kl']:.2e} |")


if __name__ == "__main__":
    main()
