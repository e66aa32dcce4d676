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
shows as a KL of the order of the quantization error itself. What remains for a correct reader is
arithmetic: float32 summation order, or float16 / bfloat16 activations. That part is measured, not
guessed: compress's own logits computed in float16 and in bfloat16 differ from its float32 logits by a
max |diff| (the floors). "Within fp16 tolerance": a consumer's max |diff| is at most 2x the float16
floor, the difference that running this very model in float16 makes (2x: a consumer's own rounding is
as large as ours and need not fall below it). GPTQModel's CPU kernels compute in bfloat16 whatever the
model's dtype (TorchFusedLinear casts float32 activations to bfloat16; TorchCpuAvx512Linear takes
bfloat16 only), so they are also held to 2x the bfloat16 floor.
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
    parser.add_argument("--work", help="keep the token batch and the consumers' logits here (reused when the "
                                       "folders and tokens are the same; default: a temporary folder)")
    parser.add_argument("--produce", action="store_true", help=argparse.SUPPRESS)  # half 1, in the peer
    parser.add_argument("--tokens", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.produce:
        return produce(args)
    if not args.peer:
        parser.error("--peer is required: the python of GPTQModel's virtual environment")

    folders = [str(Path(f).resolve()) for f in args.folders]
    ids = token_batch(folders[0], args.data, args.batch, args.seqlen)
    with tempfile.TemporaryDirectory(prefix="gptq-consumers-") as tmp:
        work = Path(args.work or tmp)
        work.mkdir(parents=True, exist_ok=True)
        request = json.dumps({"folders": folders, "tokens": ids.tolist()})
        if not (work / "status.json").exists() or (work / "request.json").read_text() != request:
            (work / "status.json").unlink(missing_ok=True)
            (work / "request.json").write_text(request)
            (work / "tokens.json").write_text(json.dumps(ids.tolist()))
            # run outside the repository, so that nothing in it shadows a package of the peer's environment
            subprocess.run([args.peer, str(HERE / "gptq_consumers.py"), "--produce", "--tokens", str(work / "tokens.json"),
                            "--out", str(work), *folders], check=True, cwd=work,
                           env={**os.environ, "GPTQMODEL_CPU_WORKERS": "2"})
        results = ours_against(folders, ids, work, json.loads((work / "status.json").read_text()))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    print_table(results, ids.shape)


def ours_against(folders: list[str], ids: torch.Tensor, work: Path, status: dict) -> dict:
    """compress.load's logits of every folder (float32; float16 and bfloat16 for the floors) against each
    consumer's saved logits."""
    from safetensors.torch import load_file

    import compress

    results = {}
    for i, folder in enumerate(folders):
        # loaded outside inference_mode: compress's kernel dispatch reads the buffers' version counters,
        # which tensors created under inference_mode do not have (no_grad instead)
        with torch.no_grad():
            logits = {dtype: compress.load(folder, dtype=dtype).model(input_ids=ids).logits.float()
                      for dtype in (torch.float32, torch.float16, torch.bfloat16)}
        ours = logits[torch.float32]
        floors = {str(d).replace("torch.", ""): (ours - v).abs().max().item() for d, v in logits.items() if d != torch.float32}
        row = {"logit_max": ours.abs().max().item(), "floors": floors, "consumers": {}}
        for key, st in status.items():
            if not key.startswith(f"{i}-"):
                continue
            name = key.split("-", 1)[1]
            if not st["ok"]:
                row["consumers"][name] = st
                continue
            m = compare(ours, load_file(str(work / f"{key}.safetensors"))["logits"])
            m["within_fp16"] = m["max_abs_diff"] <= 2 * floors["float16"]
            m["within_bf16"] = m["max_abs_diff"] <= 2 * floors["bfloat16"]
            row["consumers"][name] = {**st, **m}
        results[folder] = row
    return results


def print_table(results: dict, shape) -> None:
    print(f"\nlogits of {shape[0]} x {shape[1]} held-out tokens against compress.load (float32)\n")
    print("| folder | consumer | computes in | max abs diff | within 2x fp16 floor | within 2x bf16 floor | top1 agree | KL |")
    print("|---|---|---|---|---|---|---|---|")
    yes = lambda b: "yes" if b else "NO"
    for folder, row in results.items():
        name, f = Path(folder).name, row["floors"]
        for dtype, floor in f.items():
            print(f"| {name} | compress.load {dtype} (floor) | {dtype} | {floor:.4f} | - | - | - | - |")
        for consumer, r in row["consumers"].items():
            if not r["ok"]:
                print(f"| {name} | {consumer} | - | FAILED: {r['error'][:300]} | | | | |")
                continue
            print(f"| {name} | {consumer} | {r['computed_in']} | {r['max_abs_diff']:.4f} | {yes(r['within_fp16'])} | "
                  f"{yes(r['within_bf16'])} | {r['top1_agree']:.4f} | {r['kl']:.2e} |")


if __name__ == "__main__":
    main()
