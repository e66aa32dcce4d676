"""Bad configs, checkpoints and data files: one sentence and exit code 2 before any work, nothing written,
the input unchanged, whichever command meets them."""

import json
import os
import shutil
import subprocess
import threading
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import compress
from compress.errors import CompressError

NO_EVAL = ["--no-eval", "--device", "cpu"]
QUICK = ["--eval-tokens", "64", "--eval-samples", "8", "--eval-seqlen", "32", "--repeats", "1", "--no-latency",
         "--device", "cpu"]
TRAIN = ["--steps", "1", "--batch-size", "2", "--max-length", "16", "--max-samples", "8", "--no-train-eval", *NO_EVAL]

# command -> argv for a model folder M and an output path O (None: compress.load in this process)
COMMANDS = {
    "rtn": ["quantize", "--method", "rtn", "--model", "M", "--out", "O", *NO_EVAL],
    "gptq": ["quantize", "--method", "gptq", "--nsamples", "2", "--seqlen", "16", "--model", "M", "--out", "O", *NO_EVAL],
    "nf4": ["quantize", "--method", "nf4", "--model", "M", "--out", "O", *NO_EVAL],
    "prune": ["prune", "--model", "M", "--out", "O", *NO_EVAL],
    "gguf": ["export", "gguf", "--model", "M", "--out", "O.gguf"],
    "eval": ["eval", "--model", "M", "--out", "O", *QUICK],
    "load": None,
}
TRAINING = {
    "distill": ["distill", "--model", "M", "--data", "D", "--out", "O", *TRAIN],
    "qat": ["qat", "--model", "M", "--data", "D", "--out", "O", *TRAIN],
}


def invoke(capsys, argv, model: Path | None = None, out: Path | None = None, data: Path | None = None):
    """(exit code, stderr lines) of ``compress argv`` in this process, or of compress.load(model) for argv None."""
    if argv is None:
        try:
            compress.load(model)
        except CompressError as e:
            return 2, [f"error: {e}"]
        return 0, []
    from compress.cli import main

    subst = {"M": model, "O": out, "O.gguf": out.with_suffix(".gguf") if out else None, "D": data}
    capsys.readouterr()
    try:
        code = main([str(subst.get(a, a)) if a in subst else str(a) for a in argv])
    except SystemExit as e:  # argparse refusals
        code = e.code
    return code, [line for line in capsys.readouterr().err.splitlines() if line.strip()]


def assert_refused(result, *fragments):
    code, err = result
    assert code == 2 and len(err) == 1 and err[0].startswith("error: "), err
    assert "Traceback" not in err[0]
    for fragment in fragments:
        assert fragment in err[0], err[0]


def assert_nothing_written(root: Path, out: Path):
    assert not out.exists() and not out.with_suffix(".gguf").exists()
    leftovers = [p.name for p in root.iterdir() if p.name.startswith(".")]
    assert not leftovers, f"temporary files left: {leftovers}"


def variant(src: Path, dst: Path, config=None, tensors=None) -> Path:
    """A copy of ``src`` with config.json changed by ``config(dict) -> dict | bytes | None`` and the
    checkpoint by ``tensors(dict) -> None``."""
    shutil.copytree(src, dst)
    if config is not None:
        cfg = json.loads((dst / "config.json").read_text())
        changed = config(cfg)
        changed = cfg if changed is None else changed
        data = changed if isinstance(changed, bytes) else json.dumps(changed).encode()
        (dst / "config.json").write_bytes(data)
    if tensors is not None:
        state = load_file(str(dst / "model.safetensors"))
        tensors(state)
        save_file(state, str(dst / "model.safetensors"), metadata={"format": "pt"})
    return dst


def _set(**values):
    def change(cfg):
        for key, value in values.items():
            if value is ...:
                cfg.pop(key, None)
            else:
                cfg[key] = value
    return change


# ----------------------------------------------------------------------------------------------------------
# 1. config.json


BAD_CONFIGS = {
    "a JSON list": (lambda cfg: [cfg], "holds a JSON list"),
    "a string size": (_set(hidden_size="abc"), "hidden_size must be a positive integer, not 'abc'"),
    "heads not dividing the width": (_set(num_attention_heads=3, num_key_value_heads=1, head_dim=...),
                                     "hidden_size 64 is not a multiple of num_attention_heads 3"),
    "key/value heads not dividing the heads": (_set(num_key_value_heads=3), "not a multiple of num_key_value_heads 3"),
    "no layers": (_set(num_hidden_layers=0), "num_hidden_layers must be a positive integer, not 0"),
    "negative layers": (_set(num_hidden_layers=-2), "num_hidden_layers must be a positive integer, not -2"),
    "a layer count no model has": (_set(num_hidden_layers=2**40), "num_hidden_layers 1099511627776 is larger than any"),
    "a size beyond 32-bit indexing": (_set(intermediate_size=2**62), "intermediate_size 4611686018427387904 is larger"),
    "an empty activation name": (_set(hidden_act=""), "hidden_act must name a function or variant, not ''"),
    "an unknown activation": (_set(hidden_act="no_such_function"), "no_such_function"),
    "a negative size": (_set(intermediate_size=-5), "intermediate_size must be a positive integer, not -5"),
    "an empty vocabulary": (_set(vocab_size=0), "vocab_size must be a positive integer, not 0"),
    "a NaN epsilon": (_set(rms_norm_eps=float("nan")), "rms_norm_eps must be a positive finite number"),
    "no model_type": (_set(model_type=...), "has no model_type"),
    "bytes that are not UTF-8": (lambda cfg: b"\xff\xfe{\x00", "is not UTF-8 text"),
    "text that is not JSON": (lambda cfg: b'{"model_type": "llama",', "is not valid JSON"),
}


@pytest.fixture(scope="module")
def bad_configs(tiny_model, tmp_path_factory):
    root = tmp_path_factory.mktemp("configs")
    return {name: (variant(tiny_model("llama"), root / f"c{i}", config=change), message)
            for i, (name, (change, message)) in enumerate(BAD_CONFIGS.items())}


@pytest.mark.parametrize("command", [*COMMANDS, *TRAINING])
def test_bad_configs_are_one_sentence_before_any_work(command, bad_configs, tmp_path, capsys, hash_tree):
    argv = COMMANDS.get(command, TRAINING.get(command))
    data = tmp_path / "data.txt"
    data.write_text("Some training text for the language model, long enough to fill a window or two.\n" * 20)
    for name, (folder, message) in bad_configs.items():
        before = hash_tree(folder)
        out = tmp_path / "out"
        assert_refused(invoke(capsys, argv, folder, out, data), message)
        assert_nothing_written(tmp_path, out)
        assert hash_tree(folder) == before, name


def test_finetune_checks_the_base_model_before_training(bad_configs, tiny_model, tmp_path, capsys, hash_tree):
    labeled = tmp_path / "train.csv"
    labeled.write_text("text,label\n" + "".join(f"sample text number {i},{'ab'[i % 2]}\n" for i in range(16)))
    folder, message = bad_configs["a string size"]
    assert_refused(invoke(capsys, ["finetune", "--model", "M", "--data", "D", "--out", "O", *TRAIN], folder,
                          tmp_path / "out", labeled), message)
    shorter = variant(tiny_model("bert", "embedding"), tmp_path / "short",
                      tensors=lambda s: s.update({k: v[:, :32].clone() for k, v in s.items() if k.endswith("query.weight")}))
    assert_refused(invoke(capsys, ["finetune", "--model", "M", "--data", "D", "--out", "O", *TRAIN], shorter,
                          tmp_path / "out", labeled), "has shape (64, 32) but config.json implies (64, 64)")
    assert_nothing_written(tmp_path, tmp_path / "out")


# ----------------------------------------------------------------------------------------------------------
# 2. checkpoint against config

Q = "model.layers.0.self_attn.q_proj.weight"
BAD_CHECKPOINTS = {
    "a weight with fewer rows": (None, lambda s: s.update({Q: s[Q][:32].clone()}),
                                 f"{Q} has shape (32, 64) but config.json implies (64, 64)"),
    "a transposed weight": (None, lambda s: s.update({"model.layers.1.mlp.down_proj.weight":
                                                      s["model.layers.1.mlp.down_proj.weight"].t().contiguous()}),
                            "has shape (80, 64) but config.json implies (64, 80)"),
    "a missing weight": (None, lambda s: s.pop("model.layers.1.mlp.down_proj.weight"),
                         "of shape (64, 80), which config.json implies"),
    "integer weights": (None, lambda s: s.update({Q: (s[Q] * 100).to(torch.int32)}), f"{Q} "),
    "embeddings of another vocabulary": (_set(vocab_size=400), None, "implies (400, 64)"),
    "a tokenizer larger than the vocabulary": (
        _set(vocab_size=300),
        lambda s: s.update({k: s[k][:300].clone() for k in ("model.embed_tokens.weight", "lm_head.weight")}),
        "the tokenizer"),
}


@pytest.fixture(scope="module")
def bad_checkpoints(tiny_model, tmp_path_factory):
    root = tmp_path_factory.mktemp("checkpoints")
    return {name: (variant(tiny_model("llama"), root / f"w{i}", config=change, tensors=tensors), message)
            for i, (name, (change, tensors, message)) in enumerate(BAD_CHECKPOINTS.items())}


@pytest.mark.parametrize("command", COMMANDS)
def test_checkpoints_that_disagree_with_their_config_are_refused(command, bad_checkpoints, tmp_path, capsys, hash_tree):
    for name, (folder, message) in bad_checkpoints.items():
        before = hash_tree(folder)
        out = tmp_path / "out"
        extra = {"tokenizer": "tokens", "integer": "floating-point"}  # words every command's sentence has
        assert_refused(invoke(capsys, COMMANDS[command], folder, out), message,
                       *(word for key, word in extra.items() if key in name))
        assert_nothing_written(tmp_path, out)
        assert hash_tree(folder) == before, name


@pytest.mark.parametrize("command", COMMANDS)
def test_a_weights_file_of_garbage_is_one_sentence(command, tiny_model, tmp_path, capsys):
    folder = shutil.copytree(tiny_model("llama"), tmp_path / "garbage")
    (folder / "model.safetensors").write_bytes(os.urandom(760))  # a header length of anything up to 2**64
    assert_refused(invoke(capsys, COMMANDS[command], folder, tmp_path / "out"), "model.safetensors")
    assert_nothing_written(tmp_path, tmp_path / "out")


def test_tied_embeddings_may_be_left_out(tiny_model, tmp_path, capsys):
    tied = variant(tiny_model("llama"), tmp_path / "tied", config=_set(tie_word_embeddings=True),
                   tensors=lambda s: s.pop("lm_head.weight"))
    loaded = compress.load(tied)
    assert loaded.model.lm_head.weight.data_ptr() == loaded.model.model.embed_tokens.weight.data_ptr()
    assert invoke(capsys, COMMANDS["rtn"], tied, tmp_path / "q")[0] == 0
    assert invoke(capsys, COMMANDS["gguf"], tied, tmp_path / "m")[0] == 0


# ----------------------------------------------------------------------------------------------------------
# 3. the harness: kinds side by side, pooling files


def test_eval_refuses_mixed_kinds_and_broken_pooling(tiny_model, tmp_path, capsys):
    assert_refused(invoke(capsys, ["eval", "--model", tiny_model("llama"), "--model", tiny_model("bert"), *QUICK]),
                   "models of different kinds cannot be compared", "is causal", "is masked")
    pooled = tmp_path / "pooled"
    shutil.copytree(tiny_model("bert", "embedding"), pooled)
    (pooled / "modules.json").write_text(json.dumps([
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}]))
    (pooled / "1_Pooling").mkdir()
    for content, message in ((b"{not json", "is not valid JSON"), (b'["mean"]', "must be a JSON object")):
        (pooled / "1_Pooling" / "config.json").write_bytes(content)
        assert_refused(invoke(capsys, ["eval", "--model", "M", "--out", "O", *QUICK], pooled, tmp_path / "out"),
                       "1_Pooling/config.json", message)
        assert_refused(invoke(capsys, None, pooled), message)
        assert_refused(invoke(capsys, COMMANDS["gguf"], pooled, tmp_path / "out"), "pooling")
    assert_nothing_written(tmp_path, tmp_path / "out")


# ----------------------------------------------------------------------------------------------------------
# 4. resuming from a checkpoint that cannot be trusted


class _RunsCode:
    def __reduce__(self):
        return (os.getcwd, ())


def test_resume_refuses_untrusted_training_state(tiny_model, tmp_path, capsys):
    from compress.distill.trainer import check_resumable

    ckdir = tmp_path / "run.checkpoints" / "checkpoint-1"
    ckdir.mkdir(parents=True)
    torch.save({"state": {}, "param_groups": []}, ckdir / "optimizer.pt")
    torch.save({"python": 1, "numpy": 2, "cpu": torch.zeros(2)}, ckdir / "rng_state.pth")
    check_resumable(ckdir)  # a well-formed state passes
    cases = [(lambda p: torch.save({"x": _RunsCode()}, p), "optimizer.pt", "holds objects other than tensors"),
             (lambda p: p.write_bytes(p.read_bytes()[:40]), "optimizer.pt", "cannot be trusted or read"),
             (lambda p: torch.save([1, 2], p), "rng_state.pth", "it is not an RNG state")]
    for damage, name, message in cases:
        good = (ckdir / name).read_bytes()
        damage(ckdir / name)
        with pytest.raises(CompressError, match=message):
            check_resumable(ckdir)
        (ckdir / name).write_bytes(good)
    torch.save({"x": _RunsCode()}, ckdir / "optimizer.pt")
    data = tmp_path / "data.txt"
    data.write_text("Some training text for the language model, long enough to fill a window or two.\n" * 20)
    result = invoke(capsys, ["distill", "--model", tiny_model("llama"), "--data", data, "--out", tmp_path / "run",
                             "--resume", *TRAIN])
    assert_refused(result, "optimizer.pt cannot be trusted or read", "without --resume")
    assert not (tmp_path / "run").exists()


# ----------------------------------------------------------------------------------------------------------
# 5. data files


@pytest.fixture
def fifos(tmp_path):
    """Named pipes pipe.txt and pipe.csv; a helper thread writes to them after a while, so a regression
    fails instead of hanging."""
    paths = [tmp_path / "pipe.txt", tmp_path / "pipe.csv"]
    for path in paths:
        os.mkfifo(path)
    done = threading.Event()

    def unblock():
        while not done.wait(60):
            for path in paths:
                try:
                    fd = os.open(path, os.O_WRONLY | os.O_NONBLOCK)  # fails while nobody reads
                    os.write(fd, b"text,label\n")
                    os.close(fd)
                except OSError:
                    pass

    threading.Thread(target=unblock, daemon=True).start()
    yield paths
    done.set()


def test_data_files_must_be_regular_files(tiny_model, tmp_path, fifos, capsys, monkeypatch):
    llama, classifier = tiny_model("llama"), tiny_model("bert", "classifier")
    fifo, labeled_fifo = fifos
    labeled = tmp_path / "train.csv"
    labeled.write_text("text,label\n" + "".join(f"sample text number {i},{'ab'[i % 2]}\n" for i in range(16)))
    (tmp_path / "corpus").mkdir()
    out = tmp_path / "out"
    gptq = ["quantize", "--model", llama, "--nsamples", "2", "--seqlen", "16", "--out", out, *NO_EVAL]
    cases = [
        ([*gptq, "--calib", fifo], "data file", "is not a regular file"),
        ([*gptq, "--calib", "/dev/zero"], "/dev/zero is not a regular file"),
        ([*gptq, "--calib", tmp_path / "corpus"], "is a folder"),
        (["prune", "--model", llama, "--method", "wanda", "--calib", fifo, "--out", out, *NO_EVAL], "is not a regular file"),
        (["eval", "--model", llama, "--eval-data", fifo, *QUICK], "is not a regular file"),
        # evaluation files are read before the output is written, not at the closing table after it
        (["quantize", "--method", "rtn", "--model", llama, "--out", out, "--eval-data", "/dev/zero", *QUICK],
         "/dev/zero is not a regular file"),
        (["quantize", "--method", "rtn", "--model", classifier, "--out", out, "--labeled", tmp_path / "corpus", *QUICK],
         "labeled file", "is a folder"),
        (["eval", "--model", classifier, "--labeled", labeled_fifo, *QUICK], "labeled file", "is not a regular file"),
        (["distill", "--model", llama, "--data", fifo, "--out", out, *TRAIN], "is not a regular file"),
        (["distill", "--model", classifier, "--data", labeled_fifo, "--out", out, *TRAIN], "is not a regular file"),
        (["distill", "--model", classifier, "--data", labeled, "--transfer-data", "/dev/zero", "--out", out, *TRAIN],
         "/dev/zero is not a regular file"),
    ]
    for argv, *fragments in cases:
        assert_refused(invoke(capsys, argv), *fragments)
        assert not out.exists()
    from compress import data

    big = tmp_path / "big.txt"
    big.write_text("word " * 100)
    monkeypatch.setattr(data, "MAX_DATA_BYTES", 64)
    with pytest.raises(CompressError, match="is larger than"):
        data.load_texts(str(big))


# ----------------------------------------------------------------------------------------------------------
# 6. --from-gptq of another model


@pytest.fixture(scope="module")
def wide_models(tmp_path_factory):
    """Llamas whose rows split into groups of 32: a, b differing in their feed-forward width, c of a's shapes
    with other weights, and a GPTQ checkpoint of each (round-to-nearest writes the GPTQ layout)."""
    import tiny
    import transformers

    from compress.config import RTNConfig

    root = tmp_path_factory.mktemp("wide")
    tokenizer = tiny.train_bpe(root / "tokenizer")
    for name, width, seed in (("a", 192, 0), ("b", 256, 0), ("c", 192, 1)):
        tokenizer.save_pretrained(str(root / name))
        config = transformers.LlamaConfig(vocab_size=len(tokenizer), hidden_size=128, intermediate_size=width,
                                          num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
                                          max_position_embeddings=64, tie_word_embeddings=False)
        torch.manual_seed(seed)
        transformers.LlamaForCausalLM(config).save_pretrained(str(root / name))
        compress.quantize(root / name, root / f"{name}-gptq", RTNConfig(bits=4, group_size=32), device="cpu",
                          progress=False)
    return root


def test_from_gptq_refuses_another_models_checkpoint(wide_models, tmp_path, capsys, hash_tree):
    a = wide_models / "a"
    lying = tmp_path / "lying-gptq"  # b's tensors under a config that claims to be a's
    shutil.copytree(wide_models / "b-gptq", lying)
    shutil.copy(wide_models / "a-gptq" / "config.json", lying / "config.json")
    before = hash_tree(a)
    for gptq, fragment in ((wide_models / "b-gptq", "its config has intermediate_size 256 instead of 192"),
                           (lying, "but a 128 x 192 layer needs"),
                           (wide_models / "c-gptq", "has a cosine of")):  # same shapes, other weights
        argv = ["export", "gguf", "--model", a, "--from-gptq", gptq, "--type", "q4_0", "--out", tmp_path / "m.gguf"]
        assert_refused(invoke(capsys, argv), "does not belong to this model" if gptq == lying else "was not made from a",
                       fragment)
    assert not (tmp_path / "m.gguf").exists() and hash_tree(a) == before
    argv = ["export", "gguf", "--model", a, "--from-gptq", wide_models / "a-gptq", "--type", "q4_0", "--out", tmp_path / "m.gguf"]
    assert invoke(capsys, argv)[0] == 0


# ----------------------------------------------------------------------------------------------------------
# 7. numeric flags


@pytest.mark.parametrize("argv,flag", [
    (["distill", "--temperature", "inf"], "--temperature"), (["distill", "--alpha", "nan"], "--alpha"),
    (["distill", "--lr", "inf"], "--lr"), (["distill", "--epochs", "inf"], "--epochs"),
    (["distill", "--hidden-loss", "nan"], "--hidden-loss"), (["distill", "--weight-decay", "inf"], "--weight-decay"),
    (["distill", "--similarity-temperature", "inf"], "--similarity-temperature"),
    (["finetune", "--lr", "nan"], "--lr"), (["quantize", "--damp", "nan"], "--damp"),
    (["prune", "--sparsity", "inf"], "--sparsity"), (["prune", "--damp", "inf"], "--damp"),
    (["prune", "--retrain", "--data", "builtin", "--lr", "inf"], "--lr"),
    (["qat", "--freeze-at", "nan", "--data", "builtin"], "--freeze-at"),
    (["qat", "--temperature", "inf", "--data", "builtin"], "--temperature"),
    (["qat", "--lora", "--lora-alpha", "inf", "--data", "builtin"], "--lora-alpha"),
])
def test_numeric_flags_must_be_finite(argv, flag, tiny_model, tmp_path, capsys):
    model = tiny_model("bert", "classifier") if argv[0] in ("distill", "finetune") else tiny_model("llama")
    extra = ["--data", "demo"] if argv[0] in ("distill", "finetune") else []
    result = invoke(capsys, [*argv, "--model", model, "--out", tmp_path / "out", *extra, *NO_EVAL])
    code, err = result
    assert code == 2 and len(err) == 1 and flag in err[0] and ("finite" in err[0] or "must" in err[0]), err
    assert not (tmp_path / "out").exists()


def test_config_dataclasses_refuse_nan_and_infinity():
    from compress.config import DistillConfig, GPTQConfig, TrainingConfig
    from compress.prune.unstructured import PruneConfig
    from compress.qat.config import QATConfig

    for make in (lambda: DistillConfig(temperature=float("inf")), lambda: DistillConfig(cosine_weight=float("nan")),
                 lambda: TrainingConfig(weight_decay=float("inf")), lambda: GPTQConfig(damp=float("nan")),
                 lambda: PruneConfig(sparsity=float("nan")), lambda: QATConfig(freeze_at=float("inf"))):
        with pytest.raises(CompressError, match="finite|must"):
            make()


# ----------------------------------------------------------------------------------------------------------
# 8. compress.load and a malformed quantization_config


@pytest.fixture(scope="module")
def rtn_folder(tiny_model, tmp_path_factory):
    from compress.config import RTNConfig

    out = tmp_path_factory.mktemp("rtn") / "q"
    compress.quantize(tiny_model("llama"), out, RTNConfig(bits=4, group_size=32), device="cpu", progress=False)
    return out


def _quant(**values):
    def change(cfg):
        if values.get("replace") is not None:
            cfg["quantization_config"] = values["replace"]
        else:
            _set(**values)(cfg["quantization_config"])
    return change


@pytest.mark.parametrize("change,message", [
    (_quant(replace=[4]), "quantization_config must be an object"),
    (_quant(quant_method=...), "quantization_config has no quant_method"),
    (_quant(quant_method="awq"), "quant_method 'awq' is not supported"),
    (_quant(bits="four"), "'four'-bit GPTQ"),
    (_quant(bits=5), "5-bit GPTQ"),
    (_quant(group_size="x"), "group_size must be -1 or a positive integer, not 'x'"),
    (_quant(sym="yes"), "sym must be true or false"),
    (_quant(dynamic={"+:.*": 3}), "dynamic must map module patterns to objects"),
    (_quant(group_size=64), "qzeros has shape (2, 8) but config.json implies (1, 8)"),
])
def test_load_refuses_a_malformed_quantization_config(change, message, rtn_folder, tmp_path, capsys, hash_tree):
    folder = variant(rtn_folder, tmp_path / "q", config=change)
    before = hash_tree(folder)
    assert_refused(invoke(capsys, None, folder), message)
    assert_refused(invoke(capsys, COMMANDS["eval"], folder, tmp_path / "out"), message)
    assert hash_tree(folder) == before


def test_cli_in_a_subprocess_prints_one_line(bad_configs):
    """The same refusals from the real console entry point: one line on stderr, no traceback."""
    import sys

    folder, message = bad_configs["a string size"]
    proc = subprocess.run([sys.executable, "-m", "compress", "quantize", "--method", "rtn", "--model", str(folder),
                           "--no-eval"], check=False, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and proc.stderr.strip().count("\n") == 0 and message in proc.stderr, proc.stderr
