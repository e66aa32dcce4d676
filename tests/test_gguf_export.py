"""GGUF export read back with the gguf package: metadata, tensor names and values, type policy, bad inputs."""

import json
import shutil

import numpy as np
import pytest
from safetensors.torch import load_file

gguf = pytest.importorskip("gguf", reason="the gguf package is needed for GGUF export (pip install 'compress[gguf]')")

from compress.errors import CompressError  # noqa: E402
from compress.gguf.arch import permute_rotary  # noqa: E402
from compress.gguf.tokenizer import bpe_pre_type  # noqa: E402
from compress.gguf.writer import choose_type, export_gguf, fit_to_rows  # noqa: E402
from test_cli import assert_clean_error, run  # noqa: E402


def fields(reader):
    out = {}
    for name, f in reader.fields.items():
        if not f.types:
            continue
        if f.types[0] == gguf.GGUFValueType.ARRAY:
            out[name] = len(f.data)
        else:
            out[name] = f.contents()
    return out


def test_llama_f32_round_trip(tiny_model, tmp_path, hash_tree):
    src = tiny_model("llama")
    before = hash_tree(src)
    report = export_gguf(src, tmp_path / "m.gguf", "f32")
    assert hash_tree(src) == before
    reader = gguf.GGUFReader(tmp_path / "m.gguf")
    meta = fields(reader)
    assert meta["general.architecture"] == "llama"
    assert meta["llama.block_count"] == 2 and meta["llama.embedding_length"] == 64
    assert meta["llama.attention.head_count"] == 4 and meta["llama.attention.head_count_kv"] == 2
    assert meta["tokenizer.ggml.model"] == "gpt2" and meta["tokenizer.ggml.pre"] == "gpt-2"
    assert meta["tokenizer.ggml.tokens"] == 320 and meta["tokenizer.ggml.merges"] > 0
    weights = load_file(src / "model.safetensors")
    tensors = {t.name: t for t in reader.tensors}
    assert len(tensors) == len(report.tensors) == 2 + 1 + 2 * 9
    emb = np.asarray(tensors["token_embd.weight"].data)
    assert np.array_equal(emb, weights["model.embed_tokens.weight"].numpy())
    q = np.asarray(tensors["blk.1.attn_q.weight"].data)
    assert np.array_equal(q, permute_rotary(weights["model.layers.1.self_attn.q_proj.weight"].numpy(), 4))
    k = np.asarray(tensors["blk.0.attn_k.weight"].data)
    assert np.array_equal(k, permute_rotary(weights["model.layers.0.self_attn.k_proj.weight"].numpy(), 2))


def test_qwen2_keeps_biases_unpermuted(tiny_model, tmp_path):
    src = tiny_model("qwen2")
    export_gguf(src, tmp_path / "q.gguf", "q8_0")
    reader = gguf.GGUFReader(tmp_path / "q.gguf")
    tensors = {t.name: t for t in reader.tensors}
    assert fields(reader)["general.architecture"] == "qwen2"
    weights = load_file(src / "model.safetensors")
    bias = np.asarray(tensors["blk.0.attn_q.bias"].data)
    assert np.array_equal(bias, weights["model.layers.0.self_attn.q_proj.bias"].numpy())
    assert tensors["blk.0.attn_q.weight"].tensor_type == gguf.GGMLQuantizationType.Q8_0
    # rows of 80 (ffn_down's input) do not split into blocks of 32: float16, as llama.cpp does
    assert tensors["blk.0.ffn_down.weight"].tensor_type == gguf.GGMLQuantizationType.F16


def test_minilm_embedding_metadata(minilm, tmp_path):
    report = export_gguf(minilm, tmp_path / "e.gguf", "f16")
    meta = fields(gguf.GGUFReader(tmp_path / "e.gguf"))
    assert meta["general.architecture"] == "bert"
    assert meta["bert.pooling_type"] == 1  # mean, from 1_Pooling/config.json
    assert meta["bert.attention.causal"] is False
    assert meta["tokenizer.ggml.model"] == "bert" and meta["tokenizer.ggml.tokens"] == 30522
    assert meta["tokenizer.ggml.bos_token_id"] == 101 and meta["tokenizer.ggml.seperator_token_id"] == 102
    assert report.type_counts == {"F16": 37, "F32": 64}


def test_type_policy():
    # the q4_k_m mix: output and the more-bits layers' attn_v / ffn_down get Q6_K, the rest Q4_K
    assert choose_type("output.weight", (4096, 512), "q4_k_m", 8, False) == "Q6_K"
    assert choose_type("blk.0.attn_v.weight", (512, 512), "q4_k_m", 8, False) == "Q6_K"
    assert choose_type("blk.1.attn_v.weight", (512, 512), "q4_k_m", 8, False) == "Q4_K"
    assert choose_type("blk.3.ffn_down.weight", (512, 512), "q5_k_m", 8, False) == "Q6_K"
    assert choose_type("blk.7.ffn_down.weight", (512, 512), "q5_k_m", 8, False) == "Q6_K"
    assert choose_type("blk.1.attn_q.weight", (512, 512), "q5_k_m", 8, False) == "Q5_K"
    assert choose_type("token_embd.weight", (4096, 512), "q4_k_m", 8, True) == "Q6_K"
    assert choose_type("blk.0.attn_norm.weight", (512,), "q4_0", 8, False) == "F32"
    # every quantized type keeps the output matrix (or the embedding tied to it) at 6 bits or more, as llama.cpp
    assert choose_type("output.weight", (4096, 512), "q4_0", 8, False) == "Q6_K"
    assert choose_type("token_embd.weight", (49152, 576), "q4_0", 30, True) == "Q6_K"
    assert fit_to_rows("Q6_K", 576) == "Q8_0"
    assert choose_type("token_embd.weight", (4096, 512), "q4_0", 8, False) == "Q4_0"
    assert choose_type("output.weight", (4096, 512), "q8_0", 8, False) == "Q8_0"
    assert choose_type("output.weight", (4096, 512), "f16", 8, False) == "F16"
    # with an importance matrix, llama-quantize gives the first eighth of Q4_0/Q5_0 ffn_down layers Q4_1/Q5_1
    assert choose_type("blk.2.ffn_down.weight", (576, 1536), "q4_0", 30, True, calibrated=True) == "Q4_1"
    assert choose_type("blk.3.ffn_down.weight", (576, 1536), "q4_0", 30, True, calibrated=True) == "Q4_0"
    assert choose_type("blk.0.ffn_down.weight", (576, 1536), "q5_0", 30, True, calibrated=True) == "Q5_1"
    assert choose_type("blk.0.ffn_down.weight", (576, 1536), "q4_0", 30, True) == "Q4_0"
    assert choose_type("blk.0.ffn_down.weight", (576, 1536), "q4_k_m", 30, True, calibrated=True) == "Q6_K"
    assert choose_type("position_embd.weight", (512, 384), "q8_0", 6, False) == "F32"
    # llama.cpp's fallbacks for rows that do not fill a block
    assert fit_to_rows("Q4_K", 384) == "Q5_0" and fit_to_rows("Q5_K", 384) == "Q5_1"
    assert fit_to_rows("Q6_K", 96) == "Q8_0" and fit_to_rows("Q4_0", 80) == "F16"
    assert fit_to_rows("Q4_K", 512) == "Q4_K"


def test_bpe_pre_tokenizer_mapping():
    assert bpe_pre_type({"type": "ByteLevel", "add_prefix_space": False, "use_regex": True}) == "gpt-2"
    llama3 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
              r"|\s*[\r\n]+|\s+(?!\S)|\s+")
    seq = {"type": "Sequence", "pretokenizers": [
        {"type": "Split", "pattern": {"Regex": llama3}, "behavior": "Isolated", "invert": False},
        {"type": "ByteLevel", "add_prefix_space": False, "use_regex": False}]}
    assert bpe_pre_type(seq) == "llama-bpe"
    seq["pretokenizers"][0]["pattern"]["Regex"] = llama3.replace("{1,3}", "")
    assert bpe_pre_type(seq) == "qwen2"
    seq["pretokenizers"][0]["pattern"]["Regex"] = r"\w+"
    with pytest.raises(CompressError, match="matches no llama.cpp pre-tokenizer"):
        bpe_pre_type(seq)
    with pytest.raises(CompressError, match="no llama.cpp equivalent"):
        bpe_pre_type({"type": "Whitespace"})


def test_digits_before_byte_level_is_smollm():
    """Every digit alone, then GPT-2's regex (SmolLM2's tokenizer) is llama.cpp's smollm, not gpt-2."""
    byte_level = {"type": "ByteLevel", "add_prefix_space": False, "use_regex": True}
    digits = {"type": "Digits", "individual_digits": True}
    assert bpe_pre_type({"type": "Sequence", "pretokenizers": [digits, byte_level]}) == "smollm"
    with pytest.raises(CompressError, match="runs of digits"):
        bpe_pre_type({"type": "Sequence", "pretokenizers": [{**digits, "individual_digits": False}, byte_level]})


def test_bad_inputs_library(tiny_model, tmp_path):
    with pytest.raises(CompressError, match="unknown GGUF type 'q3_x'"):
        export_gguf(tiny_model("llama"), tmp_path / "a.gguf", "q3_x")
    with pytest.raises(CompressError, match="does not support model type 'opt'.*Llama, Mistral, Qwen2"):
        export_gguf(tiny_model("opt"), tmp_path / "a.gguf", "f16")
    assert list(tmp_path.iterdir()) == []


def test_cli_export_and_bad_inputs(tiny_model, tmp_path):
    out = tmp_path / "m.gguf"
    proc = run("export", "gguf", "--model", tiny_model("mistral"), "--out", out, "--type", "q4_k_m")
    assert proc.returncode == 0, proc.stderr
    assert "q4_k_m" in proc.stdout and "written as F16" in proc.stdout
    assert gguf.GGUFReader(out).fields["general.architecture"].contents() == "llama"

    assert_clean_error(run("export", "gguf", "--model", tiny_model("gpt2"), "--out", tmp_path / "g.gguf"),
                       "model type 'gpt2'", "supported")
    assert_clean_error(run("export", "gguf", "--model", tiny_model("llama"), "--out", tmp_path / "t.gguf",
                           "--type", "q9"), "unknown GGUF type 'q9'")
    no_tok = tmp_path / "no-tokenizer"
    shutil.copytree(tiny_model("llama"), no_tok)
    (no_tok / "tokenizer.json").unlink()
    assert_clean_error(run("export", "gguf", "--model", no_tok, "--out", tmp_path / "n.gguf"), "no tokenizer.json")
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    assert_clean_error(run("export", "gguf", "--model", tiny_model("llama"), "--out", blocker / "m.gguf"),
                       "is not a folder")
    assert_clean_error(run("export"), "choose an export format")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file", "m.gguf", "no-tokenizer"]


def test_unsupported_tokenizer_kind(tiny_model, tmp_path):
    src = tmp_path / "model"
    shutil.copytree(tiny_model("llama"), src)
    spec = json.loads((src / "tokenizer.json").read_text())
    spec["pre_tokenizer"] = {"type": "Sequence", "pretokenizers": [{"type": "Whitespace"},
                                                                    {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False}]}
    (src / "tokenizer.json").write_text(json.dumps(spec))
    with pytest.raises(CompressError, match="pre-tokenizer .* has no llama.cpp equivalent"):
        export_gguf(src, tmp_path / "x.gguf", "f16")
    assert not (tmp_path / "x.gguf").exists()


@pytest.mark.parametrize("arch", ["llama", "qwen2", "bert"])
def test_special_tokens_from_files_match_transformers(arch, tiny_model, minilm):
    """The JSON-and-tokenizers reading of special tokens gives what transformers' tokenizer reports."""
    from compress.gguf.tokenizer import _special_from_transformers, special_from_files

    for folder in ([tiny_model(arch)] + ([minilm] if arch == "bert" else [])):
        spec = json.loads((folder / "tokenizer.json").read_text())
        lean = special_from_files(folder, spec)
        assert lean is not None, folder
        assert lean == _special_from_transformers(folder)


def test_special_tokens_of_other_classes_ask_transformers(tiny_model, tmp_path):
    """A tokenizer class that may add its own templates (Llama's add_bos_token) is not read from files."""
    from compress.gguf.tokenizer import special_from_files

    src = tmp_path / "model"
    shutil.copytree(tiny_model("llama"), src)
    config = json.loads((src / "tokenizer_config.json").read_text())
    spec = json.loads((src / "tokenizer.json").read_text())
    (src / "tokenizer_config.json").write_text(json.dumps({**config, "tokenizer_class": "LlamaTokenizer"}))
    assert special_from_files(src, spec) is None
    (src / "tokenizer_config.json").write_text(json.dumps({**config, "add_bos_token": True}))
    assert special_from_files(src, spec) is None


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_numpy_source_reads_what_torch_reads(dtype, tmp_path):
    """Tensors come back as float32 equal to torch's conversion, from one file or from index shards."""
    import torch
    from safetensors.torch import save_file

    from compress.gguf.source import NumpyTensors, open_tensors

    torch.manual_seed(0)
    tensors = {"a.weight": torch.randn(5, 7).to(getattr(torch, dtype)), "b.bias": torch.randn(3).to(getattr(torch, dtype)),
               "c.empty": torch.zeros(0, 4, dtype=getattr(torch, dtype)), "d.count": torch.arange(4)}
    save_file({k: tensors[k] for k in ("a.weight", "c.empty")}, tmp_path / "model-00001-of-00002.safetensors")
    save_file({k: tensors[k] for k in ("b.bias", "d.count")}, tmp_path / "model-00002-of-00002.safetensors")
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {
        "a.weight": "model-00001-of-00002.safetensors", "c.empty": "model-00001-of-00002.safetensors",
        "b.bias": "model-00002-of-00002.safetensors", "d.count": "model-00002-of-00002.safetensors"}}))
    with open_tensors(tmp_path) as reader:
        assert isinstance(reader, NumpyTensors) and sorted(reader.keys()) == sorted(tensors)
        for name, t in tensors.items():
            assert reader.info(name) == (t.is_floating_point(), tuple(t.shape))
            got = reader.get(name)
            assert got.dtype == np.float32 and np.array_equal(got, t.float().numpy()), name
    (tmp_path / "model-00002-of-00002.safetensors").write_bytes(b"\x10\x00")
    with pytest.raises(CompressError, match="cannot be read|truncated|is damaged or not a safetensors file"):
        open_tensors(tmp_path)


def test_export_imports_neither_torch_nor_transformers(minilm, tmp_path):
    """f16 export of a BERT and of a byte-level BPE model runs without importing torch or transformers."""
    import subprocess
    import sys

    code = ("import sys; from compress.gguf.writer import export_gguf; "
            f"export_gguf({str(minilm)!r}, {str(tmp_path / 'm.gguf')!r}, 'q8_0'); "
            "print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
