"""End to end: quantize with round-to-nearest, save in the GPTQ layout, load back, run, evaluate."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

import compress
from compress.config import RTNConfig
from compress.errors import CompressError
from compress.quant.linear import QuantLinear


def _logits(loaded, ids):
    out = loaded.model(input_ids=ids)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2", "gpt2", "opt", "bert"])
def test_quantize_save_load_run(tiny_model, tmp_path, hash_tree, arch, fast_eval):
    src = tiny_model(arch)
    before = hash_tree(src)
    out = tmp_path / "q"
    report = compress.quantize(src, out, RTNConfig(bits=8, group_size=32), progress=False)
    assert hash_tree(src) == before, "the input folder must never change"
    assert len(report.layers) > 0
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["quantization_config"]["quant_method"] == "gptq" and cfg["quantization_config"]["bits"] == 8
    assert json.loads((out / "quantize_config.json").read_text()) == cfg["quantization_config"]
    assert (out / "tokenizer.json").is_file()

    full, quant = compress.load(src), compress.load(out)
    swapped = [m for m in quant.model.modules() if isinstance(m, QuantLinear)]
    assert len(swapped) == len(report.layers)
    ids = torch.randint(5, full.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    a, b = _logits(full, ids), _logits(quant, ids)
    cos = torch.nn.functional.cosine_similarity(a.flatten(), b.flatten(), dim=0)
    assert cos > 0.999, f"8-bit RTN should barely change {arch}'s outputs (cosine {cos:.5f})"

    result = compress.compare([src, out], fast_eval, progress=False)
    assert [r.kind for r in result.results] == [full.kind] * 2
    assert result.results[1].weights_bytes < result.results[0].weights_bytes
    assert 8 < result.results[1].bits_per_weight < 10


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_low_bit_quantization_tracks_the_dense_weights(tiny_model, tmp_path, bits):
    src = tiny_model("llama")
    out = tmp_path / f"q{bits}"
    compress.quantize(src, out, RTNConfig(bits=bits, group_size=64, sym=False), progress=False)
    full_state = load_file(str(src / "model.safetensors"))
    quant = compress.load(out)
    layer = quant.model.get_submodule("model.layers.1.mlp.down_proj")  # K=80: shorter last group, 3-bit padding
    assert isinstance(layer, QuantLinear) and layer.bits == bits
    dense = full_state["model.layers.1.mlp.down_proj.weight"]
    err = (layer.dequantize() - dense).abs().max()
    assert err <= dense.abs().max() * 2 / (2**bits - 1), "error within half a quantization step per group"


def test_vllm_refusals_are_reported(tiny_model, tmp_path):
    report = compress.quantize(tiny_model("llama"), tmp_path / "q", RTNConfig(bits=4, group_size=64), progress=False)
    refused = {layer.name for layer in report.vllm_refused()}
    assert refused == {f"model.layers.{i}.mlp.down_proj" for i in range(2)}  # in_features 80, group size 64
    assert "vLLM" in report.summary()


def test_skip_and_overrides(tiny_model, tmp_path):
    cfg = RTNConfig(bits=4, group_size=32, skip=[r"self_attn\.o_proj"], overrides={r"mlp\.down_proj": {"bits": 8}})
    report = compress.quantize(tiny_model("llama"), tmp_path / "q", cfg, progress=False)
    assert {n for n in report.skipped} == {f"model.layers.{i}.self_attn.o_proj" for i in range(2)}
    quant = compress.load(tmp_path / "q")
    assert isinstance(quant.model.get_submodule("model.layers.0.self_attn.o_proj"), torch.nn.Linear)
    assert quant.model.get_submodule("model.layers.0.mlp.down_proj").bits == 8
    assert quant.model.get_submodule("model.layers.0.mlp.up_proj").bits == 4
    # embeddings and the output head stay in full precision
    assert isinstance(quant.model.lm_head, torch.nn.Linear)


def test_sharded_output_loads(tiny_model, tmp_path):
    out = tmp_path / "q"
    compress.quantize(tiny_model("qwen2"), out, RTNConfig(bits=4, group_size=32), progress=False, max_shard_bytes=30_000)
    assert (out / "model.safetensors.index.json").is_file() and len(list(out.glob("model-*.safetensors"))) > 1
    assert compress.load(out).kind == "causal"


def test_embedding_folder_keeps_its_pooling(minilm, tmp_path):
    out = tmp_path / "q"
    compress.quantize(minilm, out, RTNConfig(bits=8, group_size=128), progress=False)
    assert (out / "modules.json").is_file() and (out / "1_Pooling" / "config.json").is_file()
    loaded = compress.load(out)
    assert loaded.kind == "embedding" and loaded.pooling.normalize


def test_nan_weights_are_refused(tiny_model, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(tiny_model("llama"), bad)
    state = load_file(str(bad / "model.safetensors"))
    state["model.layers.0.mlp.up_proj.weight"][0, 0] = float("nan")
    save_file(state, str(bad / "model.safetensors"))
    with pytest.raises(CompressError, match="NaN or Inf"):
        compress.quantize(bad, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad"], "no partial output"


def test_already_quantized_input_is_refused(tiny_model, tmp_path):
    compress.quantize(tiny_model("llama"), tmp_path / "q", progress=False)
    with pytest.raises(CompressError, match="already quantized"):
        compress.quantize(tmp_path / "q", tmp_path / "qq", progress=False)


def test_default_output_name(tiny_model, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    report = compress.quantize(tiny_model("gpt2"), None, RTNConfig(bits=4, group_size=-1), progress=False)
    assert report.output.name == "gpt2-default-rtn-w4gpc"


def test_unquantized_tensors_are_stored_in_half_precision(tiny_model, tmp_path):
    src = tiny_model("llama")
    compress.quantize(src, tmp_path / "auto", RTNConfig(bits=4, group_size=32), progress=False)
    state = load_file(str(tmp_path / "auto" / "model.safetensors"))
    assert state["model.embed_tokens.weight"].dtype == torch.float16
    assert state["model.layers.0.self_attn.q_proj.scales"].dtype == torch.float16
    assert json.loads((tmp_path / "auto" / "config.json").read_text())["torch_dtype"] == "float16"
    compress.quantize(src, tmp_path / "fp32", RTNConfig(bits=4, group_size=32, dtype="float32"), progress=False)
    assert load_file(str(tmp_path / "fp32" / "model.safetensors"))["model.embed_tokens.weight"].dtype == torch.float32
    with pytest.raises(CompressError, match="--dtype"):
        RTNConfig(dtype="int8")
