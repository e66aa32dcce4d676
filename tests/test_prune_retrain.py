"""Retraining with fixed masks, and the cubic and iterative schedules, on tiny models (a few steps each)."""

import re

import pytest
import torch

from compress.errors import CompressError
from compress.models import load
from compress.prune.retrain import RetrainOptions, masks_from_zeros, retrain
from compress.prune.schedule import run_schedule
from compress.prune.unstructured import PruneConfig

FAST = dict(data="builtin", batch_size=4, max_length=32, learning_rate=1e-3)


def _block_weights(model):
    return {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and re.search(r"\.layers?\.\d+\.", n)}


def test_retraining_keeps_every_pruned_weight_at_zero(tiny_model, tmp_path):
    from compress.prune.pipeline import prune

    prune(tiny_model("llama"), tmp_path / "p", PruneConfig(sparsity=0.6), device="cpu", progress=False)
    loaded = load(tmp_path / "p")
    names = list(_block_weights(loaded.model))
    masks = masks_from_zeros(loaded.model, names)
    before = {n: loaded.model.get_submodule(n).weight.detach().clone() for n in names}
    metrics = retrain(loaded, RetrainOptions(steps=3, **FAST), masks=masks, device="cpu", progress=False)
    assert metrics["train_loss"] > 0
    changed = 0
    for n in names:
        w = loaded.model.get_submodule(n).weight.detach()
        assert torch.equal(w != 0, masks[n])  # exactly the same zeros, none revived
        changed += int((w != before[n]).sum())
    assert changed > 0  # the kept weights did train


def test_cubic_schedule_with_distillation_reaches_the_target(tiny_model, tmp_path):
    out = tmp_path / "cubic"
    report = run_schedule(tiny_model("llama"), out, PruneConfig(sparsity=0.5), schedule="cubic",
                          options=RetrainOptions(steps=4, distill=True, **FAST), device="cpu", progress=False)
    assert report.sparsity == pytest.approx(0.5, abs=1e-6)
    assert any("distilled" in note for note in report.notes)
    weights = _block_weights(load(out).model)
    assert all((m.weight == 0).float().mean() == 0.5 for m in weights.values())


def test_iterative_wanda_rounds(tiny_model, tmp_path):
    out = tmp_path / "iter"
    cfg = PruneConfig(method="wanda", sparsity=0.5, nsamples=4, seqlen=32, storage="sparse")
    report = run_schedule(tiny_model("qwen2"), out, cfg, schedule="iterative", rounds=2,
                          options=RetrainOptions(steps=2, **FAST), device="cpu", progress=False)
    assert report.sparsity == pytest.approx(0.5, abs=0.01)
    import json

    section = json.loads((out / "config.json").read_text())["sparsity_config"]
    assert section["schedule"] == "iterative" and section["rounds"] == 2 and section["format"] == "bitmask"


def test_embedding_models_retrain_only_by_distillation(tiny_model):
    loaded = load(tiny_model("bert", "embedding"))
    with pytest.raises(CompressError, match="--distill"):
        retrain(loaded, RetrainOptions(steps=1, **FAST), device="cpu", progress=False)
    with pytest.raises(CompressError, match="training data"):
        RetrainOptions(data=None)


@pytest.mark.parametrize("distill", [False, True])
def test_classifier_retrains_on_labels_with_masks_fixed(tiny_model, tmp_path, distill):
    from compress.prune.pipeline import prune

    words = ["quick fox", "model folder", "weights scale", "tokenizer merges", "calibration data", "integer codes"]
    labels = ("neg", "neu", "pos")
    rows = ["text,label"] + [f"{words[i % 6]} number {i},{labels[i % 3]}" for i in range(60)]
    (tmp_path / "train.csv").write_text("\n".join(rows) + "\n")
    source = tiny_model("bert", "classifier")
    prune(source, tmp_path / "p", PruneConfig(sparsity=0.5, storage="dense"), device="cpu", progress=False)
    loaded = load(tmp_path / "p")
    assert loaded.kind == "classifier"
    names = list(_block_weights(loaded.model))
    assert len(names) == 12  # 2 layers x (q, k, v, attention output, intermediate, output)
    masks = masks_from_zeros(loaded.model, names)
    before = {n: loaded.model.get_submodule(n).weight.detach().clone() for n in names}
    options = RetrainOptions(steps=4, distill=distill, data=str(tmp_path / "train.csv"), batch_size=8, max_length=16,
                             learning_rate=1e-3)
    metrics = retrain(loaded, options, masks=masks, teacher=load(source) if distill else None, device="cpu",
                      progress=False)
    assert metrics["train_loss"] > 0
    for n in names:
        w = loaded.model.get_submodule(n).weight.detach()
        assert torch.equal(w != 0, masks[n])
        assert float((w == 0).float().mean()) == pytest.approx(0.5, abs=0.01)
    assert any(not torch.equal(loaded.model.get_submodule(n).weight, before[n]) for n in names)
