"""Every example script runs end to end on a tiny model."""

import subprocess
import sys
from pathlib import Path

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def test_quantize_and_evaluate(tiny_model, tmp_path):
    proc = subprocess.run([sys.executable, str(EXAMPLES / "quantize_and_evaluate.py"), "--model", str(tiny_model("qwen2")),
                           "--out", str(tmp_path / "out"), "--bits", "4", "--group-size", "32", "--quick"],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert "output shape" in proc.stdout and "ppl" in proc.stdout


def test_distill_classifier(tmp_path):
    import sys as _sys

    _sys.path.insert(0, str(Path(__file__).parent))
    import tiny
    from compress.config import DistillConfig
    from compress.distill import classification_data, distill
    from compress.models import load

    folder = tiny.build("bert", tmp_path / "random", "classifier", layers=2)
    rows = ["text,label"] + [f"quick fox number {i} {['model', 'weights', 'scale'][i % 3]},{['neg', 'neu', 'pos'][i % 3]}"
                             for i in range(48)]
    (tmp_path / "train.csv").write_text("\n".join(rows) + "\n")
    model = load(folder)  # a teacher with a trained head: a few steps on the labels
    data = classification_data(model.tokenizer, str(tmp_path / "train.csv"), model.config.label2id, 3, 32)
    cfg = DistillConfig(alpha=0.0, steps=10, batch_size=8, learning_rate=3e-3, evaluate=False, save_steps=100)
    distill(None, model.model.train(), data, cfg, output_dir=tmp_path / "ck", tokenizer=model.tokenizer,
            device="cpu", progress=False).save(tmp_path / "teacher")
    proc = subprocess.run([sys.executable, str(EXAMPLES / "distill_classifier.py"), "--teacher", str(tmp_path / "teacher"),
                           "--data", str(tmp_path / "train.csv"), "--labeled", str(tmp_path / "train.csv"),
                           "--out", str(tmp_path / "student"), "--steps", "4", "--quick"],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert "student keeps teacher layers [0]" in proc.stdout and "accuracy" in proc.stdout


def test_export_gguf(tiny_model, tmp_path):
    import importlib.util

    import pytest

    if importlib.util.find_spec("llama_cpp") is None:  # looked up, not loaded: llama.cpp runs in a child
        pytest.skip("llama-cpp-python runs the exported files (pip install 'compress[llama]')")
    for model, types, metric in [(tiny_model("llama"), "f16,q8_0", "mean KL"), (None, "q8_0", "min cosine")]:
        cmd = [sys.executable, str(EXAMPLES / "export_gguf.py"), "--types", types, "--out-dir", str(tmp_path / "gguf")]
        proc = subprocess.run(cmd + (["--model", str(model)] if model else []), capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr
        lines = [line for line in proc.stdout.splitlines() if metric in line]
        assert len(lines) == len(types.split(",")), proc.stdout
        value = float(lines[-1].split(metric)[1].split()[0])
        assert (value < 0.05) if metric == "mean KL" else (value > 0.99), proc.stdout
