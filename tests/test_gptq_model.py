"""GPTQ end to end: calibrate, quantize block by block, save, load back; checked with an independent reader."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

import compress
from compress.config import GPTQConfig, RTNConfig
from compress.errors import CompressError
from compress.quant.linear import QuantLinear
from test_formats import spec_dequantize

FAST = dict(nsamples=8, seqlen=32, calib_batch_size=4)


@torch.no_grad()
def _outputs(loaded, ids):
    out = loaded.model(input_ids=ids)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2", "gpt2", "opt", "bert"])
def test_gptq_quantize_load_run(tiny_model, tmp_path, hash_tree, arch):
    src = tiny_model(arch)
    before = hash_tree(src)
    report = compress.quantize(src, tmp_path / "q", GPTQConfig(bits=4, group_size=32, **FAST), progress=False)
    assert hash_tree(src) == before
    assert all(layer.loss is not None and layer.loss >= 0 for layer in report.layers)
    cfg = json.loads((tmp_path / "q" / "config.json").read_text())["quantization_config"]
    assert cfg["quant_method"] == "gptq" and cfg["meta"]["method"] == "gptq" and cfg["true_sequential"]
    full, quant = compress.load(src), compress.load(tmp_path / "q")
    assert sum(isinstance(m, QuantLinear) for m in quant.model.modules()) == len(report.layers)
    ids = torch.randint(5, full.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    a, b = _outputs(full, ids), _outputs(quant, ids)
    assert torch.nn.functional.cosine_similarity(a.flatten(), b.flatten(), dim=0) > 0.95


@pytest.mark.parametrize("calib_dtype", ["float32", "bfloat16"])
def test_gptq_beats_rtn_in_kl(tiny_model, tmp_path, fast_eval, calib_dtype):
    """Both calibration precisions (whatever 'auto' picks on this CPU) beat round-to-nearest."""
    src = tiny_model("llama")
    compress.quantize(src, tmp_path / "rtn", RTNConfig(bits=3, group_size=32), progress=False)
    compress.quantize(src, tmp_path / "gptq", GPTQConfig(bits=3, group_size=32, nsamples=32, seqlen=64,
                                                         calib_dtype=calib_dtype), progress=False)
    meta = json.loads((tmp_path / "gptq" / "config.json").read_text())["quantization_config"]["meta"]
    assert meta["calib_dtype"] == calib_dtype
    report = compress.compare([src, tmp_path / "rtn", tmp_path / "gptq"], fast_eval, progress=False)
    assert report.results[2].metrics["kl"] < report.results[1].metrics["kl"]


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_act_order_checkpoint_read_by_an_independent_unpacker(tiny_model, tmp_path, arch):
    """Dequantize the saved files with a reader written from the format description, load the dense
    weights into stock transformers, and match compress.load's outputs."""
    from transformers import AutoModelForCausalLM

    src = tiny_model(arch)
    out = tmp_path / "q"
    compress.quantize(src, out, GPTQConfig(bits=3, group_size=32, act_order=True, sym=False, **FAST), progress=False)
    qcfg = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qcfg["desc_act"] is True and qcfg["bits"] == 3
    state = load_file(str(out / "model.safetensors"))
    dense = {}
    prefixes = {k[: -len(".qweight")] for k in state if k.endswith(".qweight")}
    for p in prefixes:
        t = {s: state[f"{p}.{s}"] for s in ("qweight", "qzeros", "scales", "g_idx")}
        assert not torch.equal(t["g_idx"].long(), torch.sort(t["g_idx"].long()).values) or arch == "gpt2"
        w = torch.tensor(spec_dequantize(t, 3), dtype=torch.float32)
        conv = arch == "gpt2"
        dense[f"{p}.weight"] = w.t().contiguous() if conv else w
        if f"{p}.bias" in state:
            dense[f"{p}.bias"] = state[f"{p}.bias"].float()
    for k, v in state.items():
        if not any(k.startswith(p + ".") for p in prefixes):
            dense[k] = v
    reference = AutoModelForCausalLM.from_pretrained(str(src), local_files_only=True).eval()
    missing, unexpected = reference.load_state_dict(dense, strict=False)
    assert not unexpected and all("lm_head" in m for m in missing)
    reference.tie_weights()
    ids = torch.randint(5, 250, (2, 12))
    with torch.no_grad():
        torch.testing.assert_close(compress.load(out).model(ids).logits, reference(ids).logits, rtol=1e-4, atol=1e-4)


def test_skip_and_override_with_gptq(tiny_model, tmp_path):
    cfg = GPTQConfig(bits=4, group_size=32, skip=[r"\.1\.mlp"], overrides={"o_proj": {"bits": 8}}, **FAST)
    report = compress.quantize(tiny_model("qwen2"), tmp_path / "q", cfg, progress=False)
    assert len(report.skipped) == 3
    model = compress.load(tmp_path / "q").model
    assert isinstance(model.model.layers[1].mlp.up_proj, torch.nn.Linear)
    assert model.model.layers[0].self_attn.o_proj.bits == 8


def test_more_samples_than_the_data_holds(tiny_model, tmp_path):
    data = tmp_path / "calib.txt"
    data.write_text("a short calibration text with only a few dozen tokens in it.\n" * 3)
    with pytest.raises(CompressError, match="enough for"):
        compress.quantize(tiny_model("llama"), tmp_path / "q", GPTQConfig(calib=str(data), nsamples=16, seqlen=64),
                          progress=False)
    assert not (tmp_path / "q").exists()


def test_seqlen_beyond_the_model_positions(tiny_model, tmp_path):
    with pytest.raises(CompressError, match="beyond the model's 256 positions"):
        compress.quantize(tiny_model("llama"), tmp_path / "q", GPTQConfig(seqlen=1024), progress=False)


def test_a_hessian_that_stays_singular(tiny_model, tmp_path):
    bad = tmp_path / "overflow"
    shutil.copytree(tiny_model("llama"), bad)
    state = load_file(str(bad / "model.safetensors"))
    # a norm scale of 1e20 sends q/k/v inputs of 1e20: their Hessian x x^T overflows float32
    state["model.layers.0.input_layernorm.weight"] *= 1e20
    save_file(state, str(bad / "model.safetensors"))
    with pytest.raises(CompressError, match="singular|NaN or Inf"):
        compress.quantize(bad, tmp_path / "q", GPTQConfig(**FAST), progress=False)
    assert not (tmp_path / "q").exists()


FLAT_MODEL = '''
import torch
from torch import nn
from transformers import PretrainedConfig, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutput


class FlatConfig(PretrainedConfig):
    model_type = "flat-mlp"

    def __init__(self, vocab_size=64, hidden_size=32, **kwargs):
        self.vocab_size, self.hidden_size = vocab_size, hidden_size
        super().__init__(**kwargs)


class FlatModel(PreTrainedModel):
    config_class = FlatConfig

    def __init__(self, config):
        super().__init__(config)
        self.embed = nn.Embedding(config.vocab_size, config.hidden_size)
        self.mlp = nn.Sequential(nn.Linear(config.hidden_size, config.hidden_size), nn.ReLU(),
                                 nn.Linear(config.hidden_size, config.hidden_size))
        self.head = nn.Linear(config.hidden_size, config.vocab_size)
        self.post_init()

    def forward(self, input_ids=None, **kwargs):
        return CausalLMOutput(logits=self.head(self.mlp(self.embed(input_ids))))
'''


def test_a_model_without_a_repeated_block_list(tmp_path):
    import importlib.util
    import sys

    folder = tmp_path / "flat"
    folder.mkdir()
    (folder / "modeling_flat.py").write_text(FLAT_MODEL)
    spec = importlib.util.spec_from_file_location("modeling_flat", folder / "modeling_flat.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["modeling_flat"] = module
    spec.loader.exec_module(module)
    model = module.FlatModel(module.FlatConfig())
    model.save_pretrained(str(folder))
    config = json.loads((folder / "config.json").read_text())
    config["auto_map"] = {"AutoConfig": "modeling_flat.FlatConfig", "AutoModelForCausalLM": "modeling_flat.FlatModel"}
    config["architectures"] = ["FlatModelForCausalLM"]
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(CompressError, match="repeated block list"):
        compress.quantize(folder, tmp_path / "q", RTNConfig(), trust_remote_code=True, progress=False)
    assert not (tmp_path / "q").exists()
