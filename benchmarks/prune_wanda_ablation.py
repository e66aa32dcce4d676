"""Why Wanda does not beat magnitude pruning on the reference LM: score and comparison group taken apart.

Wanda differs from magnitude pruning in two ways: the score (|W_ij| times the input channel's norm
||X_j|| instead of |W_ij|) and the comparison group (each output row pruned to the same sparsity instead
of one threshold per layer). This script crosses the two on the cached reference LM at several
sparsities and reports, for each of the four combinations:

- held-out perplexity (16384 tokens of the built-in corpus, as in the harness) and mean per-token KL to
  the dense model (the first 8 evaluation windows);
- the layer-wise objective Wanda approximates: the relative output error ||(W - W_pruned) X||^2 / ||W X||^2
  of every pruned Linear on the dense model's calibration inputs, averaged over the layers.

Statistics come from one pass of the dense model over the calibration set (128 x 256 tokens of the
built-in corpus, compress's own InputNormObserver); the masks come from compress.prune (wanda_scores,
mask_for), the same functions `compress prune --method wanda` uses. The difference to the CLI is that the
CLI collects each block's statistics after the earlier blocks are pruned.

    python benchmarks/prune_wanda_ablation.py                       # 0.5 0.6 0.7 0.8
    python benchmarks/prune_wanda_ablation.py --sparsity 0.5 --json wanda-ablation.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sparsity", type=float, nargs="+", default=[0.5, 0.6, 0.7, 0.8])
    parser.add_argument("--nsamples", type=int, default=128)
    parser.add_argument("--seqlen", type=int, default=256)
    parser.add_argument("--ppl-tokens", type=int, default=16384)
    parser.add_argument("--kl-windows", type=int, default=8)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    sys.path.insert(0, str(HERE))
    from hostinfo import machine
    from reference_lm import ensure_reference_lm

    import compress
    from compress.config import EvalConfig
    from compress.data import calibration
    from compress.eval.tasks import _eval_windows, evaluate_causal
    from compress.models import load_tokenizer
    from compress.prune.unstructured import LayerSparsity, mask_for
    from compress.prune.wanda import InputNormObserver, wanda_scores

    torch.manual_seed(0)
    src = ensure_reference_lm()
    print(machine(), flush=True)
    loaded = compress.load(src, device="cpu")
    model = loaded.model.eval()
    dense = {k: v.clone() for k, v in model.state_dict().items()}
    linears = {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and ".layers." in n}
    samples = calibration(load_tokenizer(src), "builtin", args.nsamples, args.seqlen, 0)
    norms, hessians = collect(model, linears, samples, InputNormObserver)

    cfg = EvalConfig(device="cpu", latency=False, ppl_tokens=args.ppl_tokens, kl_tokens=16)
    windows = _eval_windows(loaded, cfg, args.ppl_tokens)[: args.kl_windows]
    reference = logprobs(model, windows)
    scores = {"magnitude": lambda n, w: w.abs(), "wanda": lambda n, w: wanda_scores(w, norms[n])}

    def evaluate(sparsity: float, score: str, group: str) -> dict:
        model.load_state_dict(dense)
        errors = []
        with torch.no_grad():
            for name, layer in linears.items():
                w = layer.weight
                mask = mask_for(scores[score](name, w), LayerSparsity(sparsity), per_row=group == "row", weight=w)
                errors.append(relative_error(w.double(), mask, hessians[name]))
                w.mul_(mask)
        ppl = evaluate_causal(loaded, cfg, None)[0]["perplexity"]
        lp = logprobs(model, windows)
        kl = float((reference.exp() * (reference - lp)).sum(-1).mean())
        return {"perplexity": ppl, "kl": kl, "layer_error": sum(errors) / len(errors)}

    model.load_state_dict(dense)
    dense_ppl = evaluate_causal(loaded, cfg, None)[0]["perplexity"]
    print(f"dense perplexity {dense_ppl:.3f}; input-norm spread (max / median of ||X_j||) by layer type:")
    for kind in ("q_proj", "o_proj", "gate_proj", "down_proj"):
        spread = [float(norms[n].sqrt().max() / norms[n].sqrt().median()) for n in linears if n.endswith(kind)]
        print(f"  {kind}: " + ", ".join(f"{s:.2f}" for s in spread))
    results = []
    print("\n| sparsity | score | group | ppl | added ppl | KL | layer error |")
    print("|---|---|---|---|---|---|---|")
    for sparsity in args.sparsity:
        for score in ("magnitude", "wanda"):
            for group in ("layer", "row"):
                r = {"sparsity": sparsity, "score": score, "group": group, **evaluate(sparsity, score, group)}
                results.append(r)
                print(f"| {sparsity:.0%} | {score} | {group} | {r['perplexity']:.3f} | {r['perplexity'] - dense_ppl:+.3f} | "
                      f"{r['kl']:.5f} | {r['layer_error']:.4f} |", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps({"dense_perplexity": dense_ppl, "results": results}, indent=2) + "\n")


def collect(model, linears: dict, samples: torch.Tensor, observer_cls):
    """Input-norm observers (sums of squares) and input second moments X^T X of every target Linear."""
    norms = {n: observer_cls(m.in_features, torch.device("cpu")) for n, m in linears.items()}
    hessians = {n: torch.zeros(m.in_features, m.in_features, dtype=torch.float64) for n, m in linears.items()}

    def hook(name):
        def record(_module, inputs):
            x = inputs[0].reshape(-1, inputs[0].shape[-1])
            norms[name].add_batch(x)
            hessians[name].add_(x.double().T @ x.double())
        return record

    handles = [m.register_forward_pre_hook(hook(n)) for n, m in linears.items()]
    try:
        with torch.no_grad():
            for batch in samples.split(8):
                model(input_ids=batch, use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return {n: o.sumsq for n, o in norms.items()}, hessians


def relative_error(weight: torch.Tensor, mask: torch.Tensor, hessian: torch.Tensor) -> float:
    """||(W - W * mask) X||^2 / ||W X||^2 with H = X^T X: the layer-wise pruning objective."""
    removed = weight * (~mask)
    return float(torch.einsum("ik,kl,il->", removed, hessian, removed) / torch.einsum("ik,kl,il->", weight, hessian, weight))


@torch.no_grad()
def logprobs(model, windows: torch.Tensor) -> torch.Tensor:
    return torch.cat([torch.log_softmax(model(input_ids=w.unsqueeze(0), use_cache=False).logits[0, :-1].float(), -1)
                      for w in windows])


if __name__ == "__main__":
    main()
