"""`compress prune --structured` end to end in a subprocess: tiny BERT and Llama, and bad inputs."""

import json

import pytest
import torch
from test_cli import QUICK, assert_clean_error, run


def test_structured_bert_classifier(tiny_model, tmp_path, hash_tree):
    """Heads and FFN neurons removed from a BERT classifier; the closing table loads the pruned folder."""
    import transformers

    src = tiny_model("bert", "classifier")
    before = hash_tree(src)
    out = tmp_path / "pruned"
    proc = run("prune", "--model", src, "--structured", "heads=0.5,ffn=0.25", "--out", out, "--device", "cpu", *QUICK)
    assert proc.returncode == 0, proc.stderr
    assert "attention heads per layer 4 -> 2" in proc.stdout and "FFN neurons per layer 80 -> 60" in proc.stdout
    rows = [line.split()[0] for line in proc.stdout.splitlines() if line.strip()]
    assert "model" in rows and "pruned" in rows  # the closing table has a row for the pruned folder
    assert hash_tree(src) == before
    config = json.loads((out / "config.json").read_text())
    assert config["intermediate_size"] == 60 and all(len(h) == 2 for h in config["pruned_heads"].values())
    model = transformers.AutoModelForSequenceClassification.from_pretrained(out, trust_remote_code=True)
    assert model.bert.encoder.layer[0].attention.self.query.weight.shape == (32, 64)
    tok = transformers.AutoTokenizer.from_pretrained(out)
    with torch.no_grad():
        assert model(**tok(["a short text"], return_tensors="pt")).logits.shape == (1, 3)


def test_structured_llama_taylor(tiny_model, tmp_path):
    """A grouped-query Llama: one of two key-value groups and half the FFN go; stock transformers loads it."""
    import transformers

    out = tmp_path / "pruned"
    proc = run("prune", "--model", tiny_model("llama"), "--structured", "heads=0.5,ffn=0.5", "--importance", "taylor",
               "--nsamples", 4, "--seqlen", 32, "--out", out, "--device", "cpu", "--no-eval")
    assert proc.returncode == 0, proc.stderr
    assert "2 -> 1 key-value heads" in proc.stdout
    model = transformers.AutoModelForCausalLM.from_pretrained(out)
    assert (model.config.num_attention_heads, model.config.num_key_value_heads, model.config.intermediate_size) == (2, 1, 40)
    assert model.model.layers[1].self_attn.k_proj.weight.shape == (16, 64)


@pytest.mark.parametrize("arch,kind,structured,fragment", [
    ("llama", None, "heads=1.0", "outside [0, 1)"),
    ("llama", None, "heads=0.25", "grouped-query"),
    ("bert", "masked", "heads=0.9", "all 4 attention heads"),
    ("llama", None, "heads=0.5,heads=0.2", "twice"),
    ("gpt2", None, "ffn=0.5", "BERT and Llama"),
])
def test_structured_bad_inputs(tiny_model, tmp_path, hash_tree, arch, kind, structured, fragment):
    src = tiny_model(arch, kind)
    before = hash_tree(src)
    out = tmp_path / "never"
    proc = run("prune", "--model", src, "--structured", structured, "--out", out, "--device", "cpu", "--no-eval")
    assert_clean_error(proc, fragment)
    assert not out.exists() and not any(p.name.startswith("never") for p in tmp_path.iterdir())
    assert hash_tree(src) == before
