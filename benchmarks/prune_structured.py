"""Structured pruning benchmark: the MiniLM demo-task classifier with heads and FFN neurons removed.

Takes the classifier that benchmarks/distill_minilm.py fine-tunes (all-MiniLM-L6-v2 with an 8-class head,
``compress finetune ... --epochs 8``; made here with the same command when ``OUT/teacher`` is missing),
removes a fraction of every layer's attention heads and FFN neurons, retrains the pruned model (by
distillation from the unpruned classifier, or by fine-tuning on the labels) and reports, for the
unpruned and the pruned model: parameters, size on disk, accuracy on the 800 held-out examples (right
after pruning with each importance measure, and after retraining), and latency.

Latency: the two models alternate in one process (unpruned, pruned, unpruned, ...), each timing a batch
of 32 x 128 tokens and a single query of 1 x 64 tokens per round; the medians over the rounds and their
ratio are reported, with the load average before and after.

    python benchmarks/prune_structured.py --out out/bench
    python benchmarks/prune_structured.py --out out/bench --heads 0.5 --ffn 0.6 --retrain finetune
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from hostinfo import cpu_name  # the scripts beside it (benchmarks/ is on sys.path)


def load_avg() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def accuracy(model, tokenizer, test_file: Path) -> float:
    """Held-out accuracy with the evaluation harness's classifier task (the same as `compress eval`)."""
    from compress.config import EvalConfig
    from compress.eval.tasks import evaluate_classifier
    from compress.models import LoadedModel

    loaded = LoadedModel(model=model.eval(), tokenizer=tokenizer, kind="classifier", path=test_file)
    result, _ = evaluate_classifier(loaded, EvalConfig(labeled=str(test_file), batch_size=32, device="cpu"), None)
    return result["accuracy"]


def calibration_batches(tokenizer, label2id: dict, n_batches: int, batch_size: int = 32) -> list[dict]:
    """``n_batches`` labeled batches from the demo task's training split (a fixed shuffle)."""
    from compress.distill.data import classification_data

    data = classification_data(tokenizer, "demo", label2id, len(label2id), 128)
    order = torch.randperm(len(data.train), generator=torch.Generator().manual_seed(0)).tolist()
    return [data.collator([data.train[i] for i in order[s:s + batch_size]])
            for s in range(0, min(len(order), n_batches * batch_size), batch_size)]


def retrain(teacher, student, tokenizer, label2id: dict, args, workdir: Path):
    """Distill ``student`` from ``teacher`` (labels plus the unlabeled transfer set), or fine-tune it on the labels."""
    from compress.config import DistillConfig
    from compress.distill.data import classification_data
    from compress.distill.trainer import distill

    kd = args.retrain == "distill"
    data = classification_data(tokenizer, "demo", label2id, len(label2id), 128, transfer="demo" if kd else None)
    config = DistillConfig(task="classify", alpha=args.alpha if kd else 0.0, temperature=2.0, epochs=args.epochs,
                           learning_rate=args.lr, batch_size=32, max_length=128, save_steps=10_000, evaluate=False)
    result = distill(teacher if kd else None, student, data, config, output_dir=workdir, tokenizer=tokenizer,
                     device="cpu", progress=False)
    return result.student.eval(), result.metrics


def latency(models: dict, repeats: int) -> dict:
    """Alternating timings: per model the median ms of a 32 x 128 batch and of a 1 x 64 query."""
    gen = torch.Generator().manual_seed(0)
    batch = torch.randint(1000, 30000, (32, 128), generator=gen)
    query = torch.randint(1000, 30000, (1, 64), generator=gen)
    times = {name: {"batch": [], "query": []} for name in models}
    with torch.inference_mode():
        for model in models.values():  # warm-up
            model(input_ids=batch, attention_mask=torch.ones_like(batch))
            model(input_ids=query, attention_mask=torch.ones_like(query))
        for _ in range(repeats):
            for name, model in models.items():
                for key, ids in (("batch", batch), ("query", query)):
                    mask = torch.ones_like(ids)
                    reps = 1 if key == "batch" else 10  # a single query is short: time ten, report one
                    start = time.perf_counter()
                    for _ in range(reps):
                        model(input_ids=ids, attention_mask=mask)
                    times[name][key].append((time.perf_counter() - start) * 1e3 / reps)
    return {name: {k: statistics.median(v) for k, v in t.items()} for name, t in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="out/bench", help="folder for the models and results (teacher in OUT/teacher)")
    parser.add_argument("--heads", type=float, default=0.5, help="fraction of each layer's heads to remove")
    parser.add_argument("--ffn", type=float, default=0.6, help="fraction of each layer's FFN neurons to remove")
    parser.add_argument("--importance", default="taylor", choices=("weight", "activation", "taylor"),
                        help="the measure whose pruned model is retrained (all three are scored before retraining)")
    parser.add_argument("--calib-batches", type=int, default=16, help="labeled batches of 32 for activation and taylor")
    parser.add_argument("--retrain", default="distill", choices=("distill", "finetune"))
    parser.add_argument("--epochs", type=float, default=3.0)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--alpha", type=float, default=0.5, help="weight of the teacher's soft targets (distill)")
    parser.add_argument("--repeats", type=int, default=15, help="alternating latency rounds (median)")
    parser.add_argument("--no-score-all", dest="score_all", action="store_false",
                        help="skip the accuracy of the other two importance measures before retraining")
    parser.add_argument("--timing-only", action="store_true",
                        help="only re-measure the latency of an earlier run's models (on a quieter machine)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads for scoring and retraining (default all cores; 1 suits a busy machine, "
                             "where threads wait for each other); timing always uses all cores")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.timing_only:
        return timing_only(args)

    from compress.calib_data.demo_task import ensure_demo_task

    from compress.eval.measure import weights_bytes
    from compress.models import load
    from compress.prune.structured import prune_structured

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    teacher_dir = out / "teacher"
    if not teacher_dir.exists():
        cmd = [sys.executable, "-m", "compress", "finetune", "--model", "default", "--lr", "1e-4", "--epochs", "8",
               "--out", str(teacher_dir), "--data", "demo", "--max-length", "128", "--batch-size", "32", "--no-eval"]
        print("$ " + " ".join(cmd[2:]), flush=True)
        subprocess.run(cmd, check=True)
    test_file = ensure_demo_task()["test"]
    print(f"load average at the start: {load_avg()}", flush=True)

    teacher = load(teacher_dir)
    tok, label2id = teacher.tokenizer, {str(k): int(v) for k, v in teacher.config.label2id.items()}
    batches = calibration_batches(tok, label2id, args.calib_batches)
    chosen = copy.deepcopy(teacher.model)
    report = prune_structured(chosen, heads=args.heads, ffn=args.ffn, importance=args.importance,
                              batches=None if args.importance == "weight" else batches)
    print("\n".join(report.lines()), flush=True)
    tag = f"pruned-h{round(args.heads * 100)}-f{round(args.ffn * 100)}-{args.importance}"
    pruned_dir, retrained_dir = out / tag, out / f"{tag}-{args.retrain}"
    json_file = out / f"{tag}-{args.retrain}.json"
    chosen.save_pretrained(pruned_dir)
    tok.save_pretrained(pruned_dir)
    results = {"args": vars(args), "machine": f"{cpu_name()}, {os.cpu_count()} cores",
               "params": {"unpruned": report.params_before, "pruned": report.params_after},
               "fraction_removed": report.fraction_removed,
               "widths": {"unpruned": [report.heads[0], report.ffn[0]], "pruned": [report.heads[1], report.ffn[1]]},
               "bytes": {"unpruned": weights_bytes(teacher_dir), "pruned": weights_bytes(pruned_dir)},
               "accuracy": {"after_pruning": {}}}

    # speed first (retraining changes values, not shapes): the folder as transformers rebuilds it
    time_and_report(teacher.model, load(pruned_dir, trust_remote_code=True).model, results, args, json_file)
    if args.threads:
        torch.set_num_threads(args.threads)

    acc = results["accuracy"]
    acc["unpruned"] = accuracy(teacher.model, tok, test_file)
    acc["after_pruning"][args.importance] = accuracy(chosen, tok, test_file)
    print(f"unpruned: accuracy {acc['unpruned']:.4f}; pruned by {args.importance}: "
          f"{acc['after_pruning'][args.importance]:.4f} before retraining", flush=True)
    json_file.write_text(json.dumps(results, indent=2))

    if retrained_dir.exists():
        print(f"reusing {retrained_dir}", flush=True)
    else:
        start = time.time()
        retrained, results["train"] = retrain(teacher.model, chosen, tok, label2id, args, out / f"{tag}.checkpoints")
        results["train"]["wall_s"] = time.time() - start
        retrained.save_pretrained(retrained_dir)
        tok.save_pretrained(retrained_dir)
    # the saved folder is what users get: measure the model transformers rebuilds from it
    acc["retrained"] = accuracy(load(retrained_dir, trust_remote_code=True).model, tok, test_file)
    print(f"pruned and retrained ({args.retrain}): accuracy {acc['retrained']:.4f}", flush=True)
    json_file.write_text(json.dumps(results, indent=2))

    for importance in [i for i in ("weight", "activation", "taylor") if i != args.importance and args.score_all]:
        model = copy.deepcopy(teacher.model)
        prune_structured(model, heads=args.heads, ffn=args.ffn, importance=importance,
                         batches=None if importance == "weight" else batches)
        acc["after_pruning"][importance] = accuracy(model, tok, test_file)
        print(f"pruned by {importance}: accuracy {acc['after_pruning'][importance]:.4f} before retraining", flush=True)
    json_file.write_text(json.dumps(results, indent=2))
    print_table(results)


def time_and_report(unpruned, pruned, results: dict, args, json_file: Path) -> None:
    """Alternating latency of the two models, saved in the JSON file."""
    results["load_average_before_timing"] = load_avg()
    print(f"load average before timing: {results['load_average_before_timing']}", flush=True)
    torch.set_num_threads(os.cpu_count() or 1)
    results["latency_ms"] = latency({"unpruned": unpruned, "pruned": pruned}, args.repeats)
    results["load_average_after_timing"] = load_avg()
    results["repeats"] = args.repeats
    json_file.write_text(json.dumps(results, indent=2))


def print_table(results: dict) -> None:
    """The Markdown table of a run (accuracies that were not measured show as -)."""
    u, p = results["latency_ms"]["unpruned"], results["latency_ms"]["pruned"]
    params, size, acc = results["params"], results["bytes"], results["accuracy"]
    (h0, f0), (h1, f1) = results["widths"]["unpruned"], results["widths"]["pruned"]
    a = results["args"]
    fmt = lambda key: f"{acc[key]:.4f}" if key in acc else "-"  # noqa: E731
    print()
    print(f"machine: {results['machine']}; load average {results['load_average_before_timing']} before and "
          f"{results['load_average_after_timing']} after timing ({results['repeats']} alternating rounds)")
    print("| model | heads x FFN per layer | params M | removed | size MB | batch ms (32x128) | speedup | "
          "query ms (1x64) | speedup | accuracy |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    print(f"| unpruned | {h0} x {f0} | {params['unpruned'] / 1e6:.2f} | - | {size['unpruned'] / 1e6:.1f} | "
          f"{u['batch']:.1f} | 1.00x | {u['query']:.2f} | 1.00x | {fmt('unpruned')} |")
    print(f"| pruned ({a['importance']}), {a['retrain']} | {h1} x {f1} | {params['pruned'] / 1e6:.2f} | "
          f"{results['fraction_removed']:.1%} | {size['pruned'] / 1e6:.1f} | {p['batch']:.1f} | "
          f"{u['batch'] / p['batch']:.2f}x | {p['query']:.2f} | {u['query'] / p['query']:.2f}x | {fmt('retrained')} |")
    print()
    print("accuracy right after pruning: " + ", ".join(f"{k} {v:.4f}" for k, v in acc["after_pruning"].items()))
    if "retrained" in acc and "unpruned" in acc:
        print(f"accuracy change after retraining: {100 * (acc['retrained'] - acc['unpruned']):+.2f} points")


def timing_only(args) -> None:
    """Re-measure the latency of an earlier run's models (the rest is read from its JSON file)."""
    from compress.models import load

    out = Path(args.out)
    tag = f"pruned-h{round(args.heads * 100)}-f{round(args.ffn * 100)}-{args.importance}"
    json_file = out / f"{tag}-{args.retrain}.json"
    if not json_file.is_file():
        raise SystemExit(f"{json_file} is missing: run without --timing-only first")
    results = json.loads(json_file.read_text())
    pruned_dir = out / f"{tag}-{args.retrain}" if (out / f"{tag}-{args.retrain}").exists() else out / tag
    time_and_report(load(out / "teacher").model, load(pruned_dir, trust_remote_code=True).model, results, args, json_file)
    print_table(results)


if __name__ == "__main__":
    main()
