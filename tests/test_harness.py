"""The evaluation harness: metric math, what it measures per model kind, and its outputs."""

import json
import math

import pytest
import torch

import compress
from compress.config import EvalConfig, RTNConfig
from compress.errors import CompressError
from compress.eval import metrics
from compress.eval.report import ModelResult, Report


def test_kl_divergence_known_value():
    p = torch.log(torch.tensor([[0.5, 0.5]]))
    q = torch.log(torch.tensor([[0.25, 0.75]]))
    expected = 0.5 * math.log(0.5 / 0.25) + 0.5 * math.log(0.5 / 0.75)
    assert metrics.kl_divergence(p, q) == pytest.approx(expected)
    assert metrics.kl_divergence(p, p) == 0.0


def test_perplexity_and_retrieval():
    assert metrics.perplexity(math.log(4) * 10, 10) == pytest.approx(4.0)
    q = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    d = torch.tensor([[0.0, 2.0], [3.0, 0.1]])
    assert metrics.top1(q, d).tolist() == [1, 0]
    assert metrics.mean_cosine(q, q) == pytest.approx(1.0)


def test_model_against_itself_has_no_divergence(tiny_model, fast_eval):
    src = tiny_model("llama")
    report = compress.compare([src, src], fast_eval, progress=False)
    a, b = report.results
    assert a.metrics["perplexity"] == pytest.approx(b.metrics["perplexity"])
    assert b.metrics["kl"] == pytest.approx(0.0, abs=1e-9)
    assert a.metrics["eval_tokens"] >= 512
    assert a.latency["prefill_ms"] > 0 and a.latency["decode_tok_s"] > 0
    assert a.bits_per_weight == 32.0 and a.params == sum(p.numel() for p in compress.load(src).model.parameters())


def test_bits_per_weight_counts_scales_and_zeros(tiny_model, tmp_path, fast_eval):
    out = tmp_path / "q"
    compress.quantize(tiny_model("llama"), out, RTNConfig(bits=4, group_size=32), progress=False)
    loaded = compress.load(out)
    from compress.eval.measure import bits_per_weight
    from compress.quant.linear import QuantLinear

    stored = weights = 0
    for m in loaded.model.modules():
        if isinstance(m, QuantLinear):
            stored += sum(t.numel() * (16 if t.is_floating_point() else 32)
                          for t in (m.qweight, m.qzeros, m.g_idx)) + m.scales.numel() * 16
            weights += m.num_weights
    assert bits_per_weight(loaded) == pytest.approx(stored / weights)
    assert 4.5 < bits_per_weight(loaded) < 6  # 4 bits + fp16 scale and 4-bit zero per 32 + g_idx


def test_embedding_fidelity_on_minilm(minilm, tmp_path):
    out = tmp_path / "q8"
    compress.quantize(minilm, out, RTNConfig(bits=8, group_size=128), progress=False)
    cfg = EvalConfig(samples=32, batch_size=16, latency=False, device="cpu")
    report = compress.compare([minilm, out], cfg, progress=False)
    ref, q8 = report.results
    assert q8.metrics["cosine"] > 0.995 and q8.metrics["retrieval_agreement"] > 0.9
    assert 0 < ref.metrics["recall_at_1"] <= 1
    assert ref.quantization == "fp32" and q8.quantization == "rtn w8 g128"


def test_classifier_accuracy_from_labeled_file(tiny_model, tmp_path, fast_eval):
    path = tiny_model("bert", "classifier")
    labeled = tmp_path / "labels.csv"
    labeled.write_text("text,label\n" + "".join(f"sample text {i},{['neg', 'neu', 'pos'][i % 3]}\n" for i in range(30)))
    cfg = EvalConfig(**{**fast_eval.to_dict(), "labeled": str(labeled)})
    report = compress.compare([path, path], cfg, progress=False)
    a, b = report.results
    assert 0 <= a.metrics["accuracy"] <= 1 and a.metrics["samples"] == 30
    assert b.metrics["agreement"] == 1.0
    bad = tmp_path / "bad.csv"
    bad.write_text("text,label\nx,unknown\n")
    with pytest.raises(CompressError, match="not one of the model's labels"):
        compress.compare([path], EvalConfig(**{**fast_eval.to_dict(), "labeled": str(bad)}), progress=False)


def test_masked_lm_metrics(tiny_model, fast_eval):
    report = compress.compare([tiny_model("bert")], fast_eval, progress=False)
    m = report.results[0].metrics
    assert m["mlm_perplexity"] > 1 and 0 <= m["mlm_accuracy"] <= 1 and m["eval_tokens"] > 0


def test_mixed_kinds_are_refused(tiny_model, fast_eval):
    with pytest.raises(CompressError, match="different kinds"):
        compress.compare([tiny_model("llama"), tiny_model("bert")], fast_eval, progress=False)


def test_report_outputs(tmp_path):
    rows = [ModelResult("base", "/a", "causal", "fp32", 4_000_000, 4_100_000, 32.0, 1_000_000, 50_000_000,
                        {"prefill_ms": 12.5, "decode_tok_s": 80.0, "prefill_tokens": 512}, {"perplexity": 20.1}),
            ModelResult("q4", "/b", "causal", "rtn w4 g128", 700_000, 800_000, 4.25, 1_000_000, 20_000_000,
                        {"prefill_ms": 30.0, "decode_tok_s": 40.0, "prefill_tokens": 512}, {"perplexity": 20.9, "kl": 0.0123})]
    report = Report(rows, device="cpu")
    table = report.table()
    lines = table.splitlines()
    assert lines[0].split()[:3] == ["model", "quant", "size"]
    assert len({len(line) for line in lines[:4]}) <= 2  # aligned columns
    assert "20.900" in table and "0.01230" in table and "cosine" not in lines[0]
    assert report.markdown().startswith("| model | quant |")
    report.write_json(tmp_path / "r.json")
    data = json.loads((tmp_path / "r.json").read_text())
    assert data["results"][1]["metrics"]["kl"] == 0.0123
    report.plot(tmp_path / "r.png")
    assert (tmp_path / "r.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_peak_memory_is_measured(tiny_model, fast_eval):
    report = compress.compare([tiny_model("gpt2")], fast_eval, progress=False)
    assert report.results[0].peak_bytes is not None
