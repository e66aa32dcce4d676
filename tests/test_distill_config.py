"""Distillation and fine-tuning configs: validation with one clear sentence, and the JSON round trip."""

import pytest

from compress.config import DistillConfig, FinetuneConfig, StudentConfig
from compress.errors import CompressError


def test_json_round_trip():
    cfg = DistillConfig(task="mlm", temperature=4.0, alpha=0.9, hidden_weight=0.5, layer_map=[[0, 0], [1, 2]],
                        steps=100, precision="bf16", vocab_map="map.json")
    assert DistillConfig.from_json(cfg.to_json()) == cfg
    ft = FinetuneConfig(epochs=2.5, learning_rate=3e-5)
    assert FinetuneConfig.from_json(ft.to_json()) == ft
    st = StudentConfig(layer_indices=[0, 2, 5], hidden_size=256)
    assert StudentConfig.from_json(st.to_json()) == st
    with pytest.raises(CompressError, match="no option 'temprature'"):
        DistillConfig.from_dict({"temprature": 2.0})


@pytest.mark.parametrize("kwargs,match", [
    (dict(temperature=0), "--temperature must be greater than 0"),
    (dict(temperature=-1), "--temperature must be greater than 0"),
    (dict(alpha=1.01), r"--alpha must be in \[0, 1\]"),
    (dict(alpha=-0.5), r"--alpha must be in \[0, 1\]"),
    (dict(task="regress"), "task 'regress' is not one of classify, mlm, causal, embed"),
    (dict(hidden_weight=-1), "hidden_weight cannot be negative"),
    (dict(layer_map=[[0, 0, 1]]), "layer_map"),
    (dict(embed_loss="l1"), "embed loss 'l1'"),
    (dict(similarity_temperature=0), "similarity temperature"),
    (dict(mlm_probability=1.0), "--mlm-probability"),
    (dict(steps=0), "--steps must be at least 1"),
    (dict(epochs=0), "--epochs must be positive"),
    (dict(batch_size=0), "batch_size must be at least 1"),
    (dict(learning_rate=0), "--lr must be positive"),
    (dict(warmup_ratio=1.0), "warm-up ratio"),
    (dict(max_length=4), "--max-length"),
    (dict(precision="fp8"), "precision 'fp8'"),
])
def test_bad_values_are_refused(kwargs, match):
    with pytest.raises(CompressError, match=match):
        DistillConfig(**kwargs)


def test_which_terms_need_the_teacher():
    assert DistillConfig(alpha=0.5).needs_teacher
    assert not DistillConfig(alpha=0.0).needs_teacher
    assert DistillConfig(alpha=0.0, hidden_weight=1.0).needs_teacher
    assert DistillConfig(task="embed", alpha=0.0).needs_teacher  # its hard target is the teacher's embedding
