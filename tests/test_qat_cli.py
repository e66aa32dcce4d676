"""`compress qat` in a subprocess: the closing table with the PTQ baseline, and every bad input."""

import json

import compress
from test_cli import assert_clean_error, run

QUICK = ["--eval-tokens", "512", "--eval-seqlen", "64", "--no-latency", "--eval-samples", "16"]
TRAIN = ["--steps", "4", "--batch-size", "4", "--max-length", "32", "--lr", "1e-3", "--device", "cpu", "--no-train-eval",
         "--max-samples", "64"]


def test_qat_llama_end_to_end(tiny_model, tmp_path, hash_tree):
    src = tiny_model("llama")
    before = hash_tree(src)
    out = tmp_path / "qat"
    proc = run("qat", "--model", src, "--bits", "4", "--group-size", "32", "--data", "builtin", *TRAIN,
               "--distill", "--out", out, *QUICK, "--json", tmp_path / "t.json")
    assert proc.returncode == 0, proc.stderr
    assert "distilled from the float model" in proc.stdout
    names = [r["name"] for r in json.loads((tmp_path / "t.json").read_text())["results"]]
    assert names == [src.name, "qat-ptq-rtn", "qat"]  # float, the PTQ baseline, the QAT result
    info = json.loads((out / "qat_config.json").read_text())
    assert info["qat"]["bits"] == 4 and info["distill"] is True
    assert compress.load(out).quantization["quant_method"] == "gptq"
    assert hash_tree(src) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["qat", "t.json"]  # the baseline was temporary


def test_qat_nf4_classifier(tiny_model, tmp_path):
    rows = ["text,label"] + [f"quick fox number {i} {['model', 'weights'][i % 2]},{['neg', 'pos'][i % 2]}" for i in range(40)]
    (tmp_path / "train.csv").write_text("\n".join(rows) + "\n")
    out = tmp_path / "cls"
    proc = run("qat", "--model", tiny_model("bert", "classifier"), "--method", "nf4", "--data", tmp_path / "train.csv",
               *TRAIN, "--out", out, "--no-eval")
    assert proc.returncode == 0, proc.stderr
    assert compress.load(out).quantization["bnb_4bit_quant_type"] == "nf4"


def test_qat_classifier_distilled_with_hidden_states_and_a_transfer_set(tiny_model, tmp_path):
    rows = ["text,label"] + [f"quick fox number {i} {['model', 'weights'][i % 2]},{['neg', 'pos'][i % 2]}" for i in range(40)]
    (tmp_path / "train.csv").write_text("\n".join(rows) + "\n")
    (tmp_path / "transfer.txt").write_text("\n".join(f"unlabeled weights text {i}" for i in range(24)) + "\n")
    out = tmp_path / "cls"
    proc = run("qat", "--model", tiny_model("bert", "classifier"), "--bits", "3", "--group-size", "32",
               "--data", tmp_path / "train.csv", *TRAIN, "--distill", "--alpha", "1", "--hidden-loss",
               "--transfer-data", tmp_path / "transfer.txt", "--out", out, "--no-eval")
    assert proc.returncode == 0, proc.stderr
    from compress.data import load_texts
    from compress.distill.data import read_labeled

    labeled = len(read_labeled(str(tmp_path / "train.csv"), "train", "text", "label")[0])
    unlabeled = len(load_texts(str(tmp_path / "transfer.txt"), "train", "text"))
    assert unlabeled > 0 and f"on {labeled + unlabeled} classify examples" in proc.stdout
    info = json.loads((out / "qat_config.json").read_text())
    assert info["training"]["hidden_weight"] == 1.0 and info["distill"] is True
    assert compress.load(out).quantization["bits"] == 3


def test_qat_bad_inputs(tiny_model, tmp_path):
    src = tiny_model("llama")
    out = tmp_path / "o"
    assert_clean_error(run("qat", "--model", src, "--out", out, *TRAIN), "--data is required")
    (tmp_path / "empty.txt").write_text("")
    assert_clean_error(run("qat", "--model", src, "--data", tmp_path / "empty.txt", "--out", out, *TRAIN), "empty")
    assert_clean_error(run("qat", "--model", src, "--method", "nf4", "--bits", "3", "--data", "builtin", "--out", out,
                           *TRAIN), "cannot be packed as NF4")
    from compress.config import RTNConfig

    rtn = tmp_path / "rtn"
    compress.quantize(src, rtn, RTNConfig(bits=4, group_size=32), progress=False)
    assert_clean_error(run("qat", "--model", rtn, "--data", "builtin", "--out", out, *TRAIN), "already quantized")
    assert_clean_error(run("qat", "--model", src, "--data", "builtin", "--hidden-loss", "--out", out, *TRAIN), "add --distill")
    assert_clean_error(run("qat", "--model", src, "--data", "builtin", "--distill", "--transfer-data", "builtin",
                           "--out", out, *TRAIN), "needs a classifier")
    assert_clean_error(run("qat", "--model", src, "--lora", "--data", "builtin", "--distill", "--hidden-loss",
                           "--out", out, *TRAIN), "drop --hidden-loss")
    assert not out.exists()


def test_qat_lora_merge_end_to_end(tiny_model, tmp_path):
    """--lora on a float model: quantized here, adapters trained (distilled), merged and quantized again."""
    src = tiny_model("llama")
    out = tmp_path / "merged"
    proc = run("qat", "--model", src, "--lora", "--merge", "--bits", "4", "--group-size", "32", "--data", "builtin",
               *TRAIN, "--distill", "--out", out, *QUICK, "--json", tmp_path / "t.json")
    assert proc.returncode == 0, proc.stderr
    names = [r["name"] for r in json.loads((tmp_path / "t.json").read_text())["results"]]
    assert names == [src.name, "merged-base-w4", "merged"]
    assert compress.load(out).quantization["quant_method"] == "gptq"
    assert_clean_error(run("qat", "--model", tmp_path / "merged-base-w4", "--lora", "--distill", "--data", "builtin",
                           "--out", tmp_path / "x", *TRAIN), "needs --teacher")


def test_qat_lora_classifier_adapters_in_the_table(tiny_model, tmp_path):
    """--lora without --merge on a classifier: the closing table has the float model, the base and the adapters."""
    rows = ["text,label"] + [f"quick fox number {i} {['model', 'weights'][i % 2]},{['neg', 'pos'][i % 2]}" for i in range(40)]
    (tmp_path / "train.csv").write_text("\n".join(rows) + "\n")
    src = tiny_model("bert", "classifier")
    out = tmp_path / "ad"
    proc = run("qat", "--model", src, "--lora", "--lora-rank", "4", "--bits", "3", "--group-size", "32", "--data",
               tmp_path / "train.csv", "--labeled", tmp_path / "train.csv", *TRAIN, "--distill", "--out", out, *QUICK,
               "--json", tmp_path / "t.json")
    assert proc.returncode == 0, proc.stderr
    assert "label loss" not in proc.stdout and "distilled from" in proc.stdout
    results = json.loads((tmp_path / "t.json").read_text())["results"]
    assert [r["name"] for r in results] == [src.name, "ad-base-w3", "ad"]
    assert results[2]["quantization"] == "rtn w3 g32 asym +lora r4" and "accuracy" in results[2]["metrics"]
