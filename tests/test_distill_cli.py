"""`compress finetune` and `compress distill` in a subprocess: the tables, resuming, DDP, and every bad input."""

import json
import os
import shutil
import subprocess
import sys

import pytest
import transformers
from safetensors.torch import load_file

import tiny
from test_cli import assert_clean_error, run
from test_distill_students import _other_tokenizer

QUICK = ["--eval-samples", "16", "--repeats", "1", "--eval-seqlen", "32", "--eval-tokens", "256"]
WORDS = ["quick fox", "model folder", "weights scale", "tokenizer merges", "calibration data", "integer codes"]


def _write_labeled(path, n, offset=0, labels=("neg", "neu", "pos"), header="text,label"):
    rows = [header] + [f"{WORDS[i % 6]} {WORDS[(i * 5) % 6]} number {i},{labels[i % len(labels)]}"
                       for i in range(offset, offset + n)]
    path.write_text("\n".join(rows) + "\n")
    return path


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    return {
        "root": root,
        "base": tiny.build("bert", root / "base", "embedding", layers=2),
        "train": _write_labeled(root / "train.csv", 96),
        "test": _write_labeled(root / "test.csv", 30, offset=1000),
    }


@pytest.fixture(scope="module")
def teacher(files):
    """A classifier made by `compress finetune` from a tiny base encoder."""
    out = files["root"] / "teacher"
    proc = run("finetune", "--model", files["base"], "--data", files["train"], "--labeled", files["test"],
               "--steps", 40, "--batch-size", 8, "--lr", 3e-3, "--out", out, "--device", "cpu",
               "--json", files["root"] / "finetune.json", *QUICK)
    assert proc.returncode == 0, proc.stderr
    files["finetune_stdout"] = proc.stdout
    return out


def _header(stdout):
    return next(line for line in stdout.splitlines() if line.startswith("model "))


def test_finetune_makes_a_classifier_teacher(files, teacher):
    header = _header(files["finetune_stdout"])
    assert all(column in header for column in ("params M", "size MB", "batch ms", "accuracy"))
    results = json.loads((files["root"] / "finetune.json").read_text())["results"]
    assert len(results) == 1 and results[0]["metrics"]["accuracy"] > 0.6  # 3 classes: chance is 1/3
    config = json.loads((teacher / "config.json").read_text())
    assert config["architectures"] == ["BertForSequenceClassification"]
    assert config["label2id"] == {"neg": 0, "neu": 1, "pos": 2}
    assert not (teacher / "modules.json").exists()  # a classifier, not an embedding model
    assert not (files["root"] / "teacher.checkpoints").exists()


def test_distill_prints_teacher_against_student(files, teacher, tmp_path, hash_tree):
    before = hash_tree(teacher)
    out = tmp_path / "student"
    proc = run("distill", "--teacher", teacher, "--task", "classify", "--data", files["train"], "--labeled", files["test"],
               "--student-layers", 1, "--steps", 12, "--batch-size", 8, "--lr", 2e-3, "--temperature", 2, "--alpha", 0.7,
               "--hidden-loss", "--out", out, "--device", "cpu", "--json", tmp_path / "r.json", *QUICK)
    assert proc.returncode == 0, proc.stderr
    assert "trained a 1-of-2-layer student [0]" in proc.stdout
    header = _header(proc.stdout)
    assert all(column in header for column in ("params M", "size MB", "batch ms", "accuracy", "agree"))
    results = json.loads((tmp_path / "r.json").read_text())["results"]
    assert [r["name"] for r in results] == ["teacher", "student"]
    assert results[1]["params"] < results[0]["params"] and results[1]["metrics"]["accuracy"] is not None
    assert hash_tree(teacher) == before
    assert not (tmp_path / "student.checkpoints").exists()
    info = json.loads((out / "distill_config.json").read_text())
    assert info["student_layers"] == [0] and info["layer_map"] == [[0, 0], [1, 1]]
    assert info["config"]["temperature"] == 2 and info["config"]["hidden_weight"] == 1.0
    model, loading = transformers.AutoModelForSequenceClassification.from_pretrained(str(out), output_loading_info=True)
    assert model.config.num_hidden_layers == 1 and not loading["missing_keys"]


def test_resume_from_the_command_line(files, teacher, tmp_path):
    common = ["distill", "--teacher", teacher, "--data", files["train"], "--student-layers", 1, "--steps", 4,
              "--save-steps", 2, "--batch-size", 8, "--device", "cpu", "--no-eval"]
    first = run(*common, "--out", tmp_path / "a", "--keep-checkpoints")
    assert first.returncode == 0, first.stderr
    # an interrupted run: only the step-2 checkpoint exists, no output
    shutil.copytree(tmp_path / "a.checkpoints", tmp_path / "b.checkpoints")
    shutil.rmtree(tmp_path / "b.checkpoints" / "checkpoint-4")
    again = run(*common, "--out", tmp_path / "b")
    assert_clean_error(again, "--resume")
    resumed = run(*common, "--out", tmp_path / "b", "--resume")
    assert resumed.returncode == 0, resumed.stderr
    a, b = load_file(str(tmp_path / "a" / "model.safetensors")), load_file(str(tmp_path / "b" / "model.safetensors"))
    assert a.keys() == b.keys() and all((a[k] - b[k]).abs().max() < 1e-6 for k in a)


def test_ddp_with_two_processes(files, teacher, tmp_path):
    """Two CPU processes under torchrun (what `accelerate launch --multi_gpu` starts on GPUs): one output."""
    out = tmp_path / "ddp"
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m", "compress",
                           "distill", "--teacher", str(teacher), "--data", str(files["train"]), "--student-layers", "1",
                           "--steps", "3", "--batch-size", "4", "--device", "cpu", "--out", str(out), "--no-eval",
                           "--logging-steps", "1"], capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count("trained a 1-of-2-layer student") == 1  # the main process reports and writes
    assert "epoch 0.25" in proc.stderr  # 2 processes x 4 examples per step: 3 steps are a quarter of 96 examples
    assert (out / "model.safetensors").is_file() and not (tmp_path / "ddp.checkpoints").exists()


def _bad_inputs(files, teacher, root):
    no_label = root / "no_label.csv"
    _write_labeled(no_label, 12, header="text,category")
    no_text = root / "no_text.jsonl"
    no_text.write_text("".join(json.dumps({"body": f"x {i}", "label": "neg"}) + "\n" for i in range(6)))
    one_class = _write_labeled(root / "one_class.csv", 12, labels=("pos",))
    other_vocab = root / "other_vocab"
    if not other_vocab.exists():
        tiny.build("bert", other_vocab, "classifier", layers=1)
        for f in other_vocab.glob("tokenizer*"):
            f.unlink()
        _other_tokenizer(other_vocab)
    masked = tiny.build("bert", root / "masked", "masked", layers=1) if not (root / "masked").exists() else root / "masked"
    base = ["distill", "--teacher", teacher, "--data", files["train"], "--no-eval"]
    return [
        (["distill", "--teacher", teacher, "--data", files["train"], "--student", other_vocab], ["vocabulary", "--vocab-map"]),
        ([*base[:4], no_label], ["no column 'label'"]),
        ([*base[:4], no_text], ["no field 'text'"]),
        ([*base[:4], one_class], ["single class", "'pos'"]),
        ([*base, "--temperature", 0], ["--temperature must be greater than 0"]),
        ([*base, "--temperature", -1.5], ["--temperature must be greater than 0"]),
        ([*base, "--alpha", 1.5], ["--alpha must be in [0, 1]"]),
        ([*base, "--alpha", -0.1], ["--alpha must be in [0, 1]"]),
        ([*base, "--task", "mlm"], ["needs a masked LM"]),
        (["distill", "--teacher", masked, "--task", "classify", "--data", files["train"]], ["sequence classifier", "compress finetune"]),
        (["distill", "--teacher", teacher, "--task", "classify"], ["--data is required"]),
        ([*base, "--resume"], ["no checkpoint to resume"]),
        ([*base, "--student-layers", 5], ["cannot keep 5 of 2"]),
        ([*base, "--layer-indices", "1,0"], ["strictly increasing"]),
        ([*base, "--student", teacher, "--student-layers", 1], ["either --student"]),
        ([*base, "--layer-map", "0-0"], ["--layer-map"]),
        ([*base, "--alpha", 0, "--transfer-data", files["train"]], ["--transfer-data needs", "--alpha"]),
        ([*base, "--task", "mlm", "--transfer-data", files["train"]], ["--transfer-data is for --task classify"]),
        ([*base, "--transfer-data", root / "missing.txt"], ["does not exist"]),
        (["finetune", "--model", files["base"], "--data", one_class], ["single class"]),
        (["finetune", "--model", files["base"], "--data", no_label], ["no column 'label'"]),
        (["finetune", "--model", files["base"]], ["--data is required"]),
    ]


def test_bad_inputs_one_sentence_exit_2_nothing_written(files, teacher, tmp_path, hash_tree, capsys):
    from compress.cli import main

    hashes = {p: hash_tree(p) for p in (teacher, files["base"])}
    cases = _bad_inputs(files, teacher, files["root"])
    for n, (args, fragments) in enumerate(cases):
        out = tmp_path / "out"
        argv = [str(a) for a in (*args, "--out", out, "--device", "cpu")]
        if n < 2:  # a real process: exit status and stderr as a user sees them
            assert_clean_error(run(*argv), *fragments)
        else:  # the same entry point in this process (no interpreter start-up per case)
            capsys.readouterr()
            code = main(argv)
            err = capsys.readouterr().err
            assert code == 2, (argv, err)
            assert_clean_error(subprocess.CompletedProcess(argv, code, "", err), *fragments)
        assert not out.exists() and not (tmp_path / "out.checkpoints").exists(), f"{args}: output left behind"
        assert not [p.name for p in tmp_path.iterdir()], f"{args}: files left behind"
    assert {p: hash_tree(p) for p in hashes} == hashes


def test_vocab_map_lets_a_different_vocabulary_train(files, teacher, tmp_path):
    other = files["root"] / "other_vocab"
    if not other.exists():
        _bad_inputs(files, teacher, files["root"])
    s_tok = transformers.AutoTokenizer.from_pretrained(str(other))
    t_tok = transformers.AutoTokenizer.from_pretrained(str(teacher))
    shared = sorted(set(s_tok.get_vocab()) & set(t_tok.get_vocab()))
    mapping = tmp_path / "map.json"
    mapping.write_text(json.dumps({t: t for t in shared}))
    proc = run("distill", "--teacher", teacher, "--data", files["train"], "--student", other, "--vocab-map", mapping,
               "--steps", 2, "--batch-size", 8, "--device", "cpu", "--out", tmp_path / "s", "--no-eval")
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "s" / "model.safetensors").is_file()
