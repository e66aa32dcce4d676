"""The command line in a subprocess: help, the main jobs, and every bad input giving one sentence and exit 2."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file, save_file

QUICK = ["--eval-tokens", "256", "--eval-samples", "16", "--eval-seqlen", "64", "--repeats", "1"]


def run(*args, cwd=None):
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    return subprocess.run([sys.executable, "-m", "compress", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd, env=env, timeout=600)


def assert_clean_error(proc, *fragments):
    assert proc.returncode == 2, proc.stderr
    lines = [line for line in proc.stderr.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    assert "Traceback" not in proc.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def test_help_lists_commands():
    proc = run("--help")
    assert proc.returncode == 0
    for command in ("quantize", "eval"):
        assert command in proc.stdout
    q = run("quantize", "--help")
    for flag in ("--model", "--out", "--device", "--no-eval", "--bits", "--group-size", "--asym"):
        assert flag in q.stdout


def test_quantize_then_eval(tiny_model, tmp_path, hash_tree):
    src = tiny_model("llama")
    before = hash_tree(src)
    out = tmp_path / "q"
    proc = run("quantize", "--method", "rtn", "--model", src, "--out", out, "--bits", 4, "--group-size", 32,
               "--device", "cpu", "--json", tmp_path / "r.json", *QUICK)
    assert proc.returncode == 0, proc.stderr
    assert "quantized 14 layers" in proc.stdout
    header = next(line for line in proc.stdout.splitlines() if line.startswith("model"))
    assert "ppl" in header and "KL" in header and "size MB" in header
    assert hash_tree(src) == before
    assert json.loads((tmp_path / "r.json").read_text())["results"][1]["quantization"] == "rtn w4 g32"
    ev = run("eval", "--model", src, "--model", out, "--no-latency", "--out", tmp_path / "report", *QUICK)
    assert ev.returncode == 0, ev.stderr
    assert {p.name for p in (tmp_path / "report").iterdir()} == {"report.json", "report.md", "report.png",
                                                                ".compress-output"}


def test_no_eval_skips_the_table(tiny_model, tmp_path):
    proc = run("quantize", "--method", "rtn", "--model", tiny_model("gpt2"), "--out", tmp_path / "q", "--no-eval")
    assert proc.returncode == 0, proc.stderr
    assert "model " not in proc.stdout and "quantized 8 layers" in proc.stdout


def test_gptq_is_the_default_method(tiny_model, tmp_path):
    proc = run("quantize", "--model", tiny_model("qwen2"), "--out", tmp_path / "q", "--bits", 4, "--group-size", 32,
               "--nsamples", 8, "--seqlen", 32, "--act-order", "--damp", "0.02", "--no-latency", *QUICK)
    assert proc.returncode == 0, proc.stderr
    assert "with gptq" in proc.stdout and "gptq w4 g32 act" in proc.stdout
    cfg = json.loads((tmp_path / "q" / "config.json").read_text())["quantization_config"]
    assert cfg["desc_act"] and cfg["damp_percent"] == 0.02 and cfg["meta"]["nsamples"] == 8


def test_python_m_and_console_script_agree():
    exe = shutil.which("compress", path=str(Path(sys.executable).parent))
    assert exe, "the console script is installed next to the interpreter"
    proc = subprocess.run([exe, "--version"], capture_output=True, text=True)
    assert proc.returncode == 0 and proc.stdout.startswith("compress ")


def _bad_models(tmp_path, tiny_model):
    no_config = tmp_path / "no-config"
    no_config.mkdir()
    truncated = tmp_path / "truncated"
    shutil.copytree(tiny_model("llama"), truncated)
    data = (truncated / "model.safetensors").read_bytes()
    (truncated / "model.safetensors").write_bytes(data[: len(data) // 3])
    nan = tmp_path / "nan"
    shutil.copytree(tiny_model("llama"), nan)
    state = load_file(str(nan / "model.safetensors"))
    state["model.layers.1.self_attn.q_proj.weight"][3, 3] = float("inf")
    save_file(state, str(nan / "model.safetensors"))
    return no_config, truncated, nan


def test_bad_inputs_one_sentence_exit_2_nothing_written(tiny_model, tmp_path, hash_tree):
    no_config, truncated, nan = _bad_models(tmp_path, tiny_model)
    good = tiny_model("llama")
    short = tmp_path / "short.txt"
    short.write_text("too short\n")
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    cases = [
        (["quantize", "--model", tmp_path / "missing"], ["does not exist"]),
        (["quantize", "--model", no_config], ["no config.json"]),
        (["quantize", "--model", truncated, "--method", "rtn"], ["truncated"]),
        (["quantize", "--model", good, "--bits", 5], ["--bits 5"]),
        (["quantize", "--model", good, "--group-size", 100], ["--group-size 100"]),
        (["quantize", "--model", good, "--method", "magic"], ["unknown method 'magic'"]),
        (["quantize", "--model", nan, "--method", "rtn"], ["NaN or Inf"]),
        (["quantize", "--model", nan, "--nsamples", 4, "--seqlen", 32], ["NaN or Inf"]),
        (["quantize", "--model", good, "--seqlen", 4096], ["beyond the model's 256 positions"]),
        (["quantize", "--model", good, "--calib", short, "--nsamples", 4, "--seqlen", 64], ["enough for 0 samples"]),
        (["quantize", "--model", good, "--damp", 0], ["--damp 0"]),
        (["quantize", "--model", good, "--calib-dtype", "float16", "--device", "cpu"], ["float16 calibration needs a GPU"]),
        (["quantize", "--model", good, "--skip", "("], ["not a valid regular expression"]),
        (["quantize", "--model", good, "--bits", "four"], ["invalid int value"]),
        (["quantize", "--model", "some-org/some-model"], ["never downloads"]),
        (["eval", "--model", good, "--eval-data", empty], ["holds no text"]),
        (["eval", "--model", good, "--eval-data", short, "--no-latency"], ["fewer than"]),
    ]
    hashes = {p: hash_tree(p) for p in (good, truncated, nan)}
    for args, fragments in cases:
        out = tmp_path / "out"
        proc = run(*args, *(["--out", out] if args[0] == "quantize" else []))
        assert_clean_error(proc, *fragments)
        assert not out.exists(), f"{args}: partial output left behind"
        leftovers = [p.name for p in tmp_path.iterdir() if p.name.startswith(".out")]
        assert not leftovers, f"{args}: temporary files left: {leftovers}"
    assert {p: hash_tree(p) for p in hashes} == hashes


def test_existing_output_is_refused_without_overwrite(tiny_model, tmp_path):
    out = tmp_path / "q"
    first = run("quantize", "--method", "rtn", "--model", tiny_model("gpt2"), "--out", out, "--no-eval")
    assert first.returncode == 0, first.stderr
    (out / "keep.txt").write_text("mine")
    proc = run("quantize", "--method", "rtn", "--model", tiny_model("gpt2"), "--out", out, "--no-eval")
    assert_clean_error(proc, "--overwrite")
    assert (out / "keep.txt").read_text() == "mine"
    proc = run("quantize", "--method", "rtn", "--model", tiny_model("gpt2"), "--out", out, "--no-eval", "--overwrite")
    assert proc.returncode == 0 and not (out / "keep.txt").exists()


@pytest.mark.skipif(shutil.which("nvidia-smi") is not None, reason="checks the error on a machine without a GPU")
def test_cuda_without_gpu(tiny_model, tmp_path):
    assert_clean_error(run("quantize", "--model", tiny_model("gpt2"), "--out", tmp_path / "q", "--device", "cuda"), "no CUDA GPU")
