"""compress prune end to end on tiny models: the CLI and its table, the stored format read back exactly,
Wanda / SparseGPT with N:M and overrides through the runner, prune-then-quantize, and every bad input."""

import json

import pytest
import torch
from test_cli import QUICK, assert_clean_error, run

from compress.models import load
from compress.prune.pipeline import prune
from compress.prune.unstructured import PruneConfig, parse_prune_overrides


def _linears(model):
    return {n: m.weight.detach() for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and ".layers." in n}


def test_magnitude_cli_prunes_shrinks_and_reports(tiny_model, tmp_path, hash_tree):
    src = tiny_model("llama")
    before = hash_tree(src)
    out = tmp_path / "pruned"
    proc = run("prune", "--model", src, "--out", out, "--sparsity", "0.5", "--device", "cpu", "--no-latency",
               "--json", tmp_path / "r.json", *QUICK)
    assert proc.returncode == 0, proc.stderr
    assert "pruned 14 layers" in proc.stdout and "50.0% sparsity" in proc.stdout
    assert hash_tree(src) == before
    section = json.loads((out / "config.json").read_text())["sparsity_config"]
    assert section["format"] == "bitmask" and section["method"] == "magnitude" and section["sparsity"] == 0.5
    rows = json.loads((tmp_path / "r.json").read_text())["results"]
    size = (out / "model.safetensors").stat().st_size
    assert rows[1]["weights_bytes"] == size < rows[0]["weights_bytes"]  # the true, smaller file size
    assert rows[1]["quantization"] == "fp32 50% sparse"
    dense, sparse = _linears(load(src).model), _linears(load(out).model)
    for name, w in sparse.items():
        kept = w != 0
        assert kept.float().mean() == 0.5
        assert torch.equal(w[kept], dense[name][kept])  # magnitude pruning changes nothing else


def test_sparse_and_dense_storage_hold_the_same_model(tiny_model, tmp_path):
    import transformers

    src = tiny_model("llama")
    cfg = PruneConfig(pattern="4:8")
    prune(src, tmp_path / "sparse", cfg, device="cpu", progress=False)
    prune(src, tmp_path / "dense", PruneConfig(pattern="4:8", storage="dense"), device="cpu", progress=False)
    a, b = load(tmp_path / "sparse").model.state_dict(), load(tmp_path / "dense").model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert (tmp_path / "sparse" / "model.safetensors").stat().st_size < (tmp_path / "dense" / "model.safetensors").stat().st_size
    stock = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "dense")  # dense storage: any loader
    assert torch.equal(stock.state_dict()["model.layers.0.mlp.up_proj.weight"], a["model.layers.0.mlp.up_proj.weight"])


@pytest.mark.parametrize("method", ["wanda", "sparsegpt"])
def test_calibrated_methods_with_patterns_and_overrides(tiny_model, tmp_path, method):
    src = tiny_model("llama")
    cfg = PruneConfig(method=method, pattern="2:4", nsamples=8, seqlen=32, skip=["down_proj"],
                      overrides=parse_prune_overrides(["q_proj=sparsity:0.25"]))
    report = prune(src, tmp_path / method, cfg, device="cpu", progress=False)
    assert len(report.layers) == 12 and len(report.skipped) == 2
    weights = _linears(load(tmp_path / method).model)
    for name, w in weights.items():
        if "down_proj" in name:
            assert (w != 0).all()
        elif "q_proj" in name:
            assert (w == 0).float().mean() == pytest.approx(0.25, abs=0.01)
        else:
            assert ((w != 0).reshape(w.shape[0], -1, 4).sum(-1) == 2).all()


def test_pruned_then_gptq_keeps_the_zeros(tiny_model, tmp_path):
    from compress.config import GPTQConfig
    from compress.quant.apply import quantize

    src = tiny_model("qwen2")
    prune(src, tmp_path / "p", PruneConfig(method="sparsegpt", nsamples=8, seqlen=32), device="cpu", progress=False)
    quantize(tmp_path / "p", tmp_path / "q", GPTQConfig(bits=4, group_size=32, nsamples=8, seqlen=32), device="cpu",
             progress=False)
    pruned = _linears(load(tmp_path / "p").model)
    quantized = {n: m.dequantize() for n, m in load(tmp_path / "q").model.named_modules() if hasattr(m, "qweight")}
    assert quantized.keys() == pruned.keys()
    for name, w in pruned.items():
        assert (quantized[name][w == 0] == 0).all()
    config = json.loads((tmp_path / "q" / "config.json").read_text())
    assert config["sparsity_config"]["format"] == "dense" and config["quantization_config"]["quant_method"] == "gptq"


def test_bad_inputs_give_one_sentence_and_write_nothing(tiny_model, tmp_path, hash_tree, capsys):
    from compress.cli import main

    src = tiny_model("llama")
    before = hash_tree(src)
    out = tmp_path / "never"
    base = ["prune", "--model", str(src), "--out", str(out), "--device", "cpu", "--no-eval"]
    # the three the feature promises, through a real process
    for flags, fragment in [(["--sparsity", "1.0"], "outside [0, 1)"), (["--pattern", "2:3"], "divisible by 3"),
                            (["--retrain"], "needs training data")]:
        assert_clean_error(run(*base, *flags), fragment)
    # the rest in this process (the same parser and checks, without the start-up cost)
    capsys.readouterr()
    for flags, fragment in [
        (["--sparsity", "-0.2"], "outside [0, 1)"),
        (["--schedule", "cubic"], "add --retrain"),
        (["--schedule", "cubic", "--retrain", "--data", "builtin", "--method", "wanda"], "magnitude"),
        (["--schedule", "iterative", "--retrain", "--data", "builtin", "--pattern", "2:4"], "one step"),
        (["--override", "q_proj"], "REGEX=sparsity"),
        (["--scope", "global", "--pattern", "2:4"], "magnitude only"),
        (["--data", "builtin"], "add --retrain"),
    ]:
        assert main(base + flags) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error: ") and fragment in err[0], err
    assert not out.exists() and not list(tmp_path.glob(".never*"))
    assert hash_tree(src) == before
