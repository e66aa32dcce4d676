"""Quantize with GPTQModel on given calibration samples (runs in GPTQModel's own virtual environment).

    GPTQMODEL_CPU_WORKERS=2 /path/to/gptqmodel-venv/bin/python benchmarks/gptqmodel_peer.py \
        --model DIR --out DIR --bits 4 --group-size 128 --samples samples.json [--desc-act | --gar]

The samples file holds token-id lists (what compress's calibration draws), so both tools calibrate on
exactly the same tokens. By default GPTQModel runs plain GPTQ (no act-order, no group-aware
reordering, damping 0.01) to match compress's defaults. --desc-act is act-order, what compress's
--act-order does (columns by decreasing Hessian diagonal, g_idx records each column's group); GPTQModel
then turns its own group-aware reordering (act_group_aware, on by default without desc_act) off, and
the two cannot be combined. --gar keeps that default reordering instead.
"""

import argparse
import json
import time
from pathlib import Path

import torch


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--bits", type=int, default=4)
    parser.add_argument("--group-size", type=int, default=128)
    parser.add_argument("--samples", required=True)
    parser.add_argument("--batch-size", type=int, default=8)
    order = parser.add_mutually_exclusive_group()
    order.add_argument("--desc-act", action="store_true", help="act-order (desc_act=True, act_group_aware=False)")
    order.add_argument("--gar", action="store_true", help="keep GPTQModel's group-aware act reordering")
    args = parser.parse_args()

    from gptqmodel import GPTQModel, QuantizeConfig

    start = time.perf_counter()
    extra = {} if args.gar else {"act_group_aware": False}
    config = QuantizeConfig(bits=args.bits, group_size=args.group_size, desc_act=args.desc_act, sym=True,
                            damp_percent=0.01, **extra)
    model = GPTQModel.load(args.model, config, device="cpu")
    samples = json.loads(Path(args.samples).read_text())
    calibration = [{"input_ids": torch.tensor([s]), "attention_mask": torch.ones(1, len(s), dtype=torch.long)}
                   for s in samples]
    t0 = time.perf_counter()
    model.quantize(calibration, batch_size=args.batch_size)
    quantize_s = time.perf_counter() - t0
    model.save(args.out)
    print(json.dumps({"quantize_seconds": quantize_s, "total_seconds": time.perf_counter() - start}))


if __name__ == "__main__":
    main()
