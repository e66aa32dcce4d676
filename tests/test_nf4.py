"""NF4 / FP4 blockwise quantization without bitsandbytes: the tables, the layout by hand, error bounds,
double quantization, the runtime layer, save / load / run on tiny models, bits per weight, bad input.

Bit-exactness against the real bitsandbytes lives in test_nf4_bitsandbytes.py.
"""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

import compress
from compress.config import NF4Config
from compress.errors import CompressError
from compress.quant import nf4
from compress.quant.nf4_linear import NF4Linear
from compress_kernels import dispatch

REFERENCE_NF4 = [-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
                 -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
                 0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
                 0.7229568362236023, 1.0]


def test_code_tables_are_the_published_ones():
    assert nf4.code_table("nf4").tolist() == torch.tensor(REFERENCE_NF4, dtype=torch.float32).tolist()
    fp4 = nf4.code_table("fp4")
    assert fp4[3] == 1.0 and fp4[11] == -1.0 and fp4[1] == torch.tensor(0.0625 / 12, dtype=torch.float32)
    assert torch.signbit(fp4[8]) and fp4[8] == 0  # negative zero, as in the bit patterns
    dyn = nf4.dynamic_map()
    assert dyn.numel() == 256 and torch.all(dyn[1:] > dyn[:-1]), "sorted, no duplicates"
    assert dyn[-1] == 1.0 and 0.0 in dyn.tolist() and -1.0 < dyn[0] < -0.99


def test_layout_by_hand():
    # three values at block size 32: one short block, an odd count padded with the code of 0
    packed, absmax = nf4.quantize_4bit(torch.tensor([-2.0, 0.0, 2.0]), blocksize=32, quant_type="nf4")
    assert absmax.tolist() == [2.0]
    assert packed.shape == (2, 1) and packed.dtype == torch.uint8
    assert packed.flatten().tolist() == [0x07, 0xF7]  # codes 0, 7 | 15, pad 7: first element in the high nibble
    packed, _ = nf4.quantize_4bit(torch.tensor([-2.0, 0.0, 2.0, 0.0]), blocksize=32, quant_type="fp4")
    assert packed.flatten().tolist() == [0xB0, 0x30]  # fp4: -1 is code 11, +1 code 3, 0 code 0


def test_short_last_block_keeps_its_own_scale():
    w = torch.cat([torch.full((64,), 0.5), torch.tensor([3.0, -1.0, 0.25, 0.0, 1.5, -3.0])]).view(5, 14)
    result = nf4.quantize_weight(w, blocksize=64, double_quant=False)
    assert result.absmax.tolist() == [0.5, 3.0]
    assert result.packed.numel() == 35
    table = torch.tensor(REFERENCE_NF4)
    nearest = [float(table[(table - v / 3.0).abs().argmin()]) * 3.0 for v in w.flatten()[64:].tolist()]
    assert result.dequantize().flatten()[64:].tolist() == pytest.approx(nearest, abs=1e-6)
    assert result.dequantize().flatten()[:64].tolist() == [0.5] * 64


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("blocksize", [32, 64, 4096])
def test_error_within_half_the_widest_gap(quant_type, blocksize):
    w = torch.randn(37, 129, generator=torch.Generator().manual_seed(1))  # 4773 values: neither blocks nor bytes fill
    result = nf4.quantize_weight(w, quant_type, blocksize, double_quant=False)
    table = nf4.code_table(quant_type).sort().values
    half_gap = float((table[1:] - table[:-1]).max()) / 2
    scale = result.absmax.repeat_interleave(blocksize)[: w.numel()].view_as(w)
    assert torch.all((result.dequantize() - w).abs() <= scale * half_gap + 1e-6)
    assert result.dequantize().shape == w.shape and result.dequantize().dtype == torch.float32


def test_double_quantization_keeps_the_scales():
    w = torch.randn(512, 384, generator=torch.Generator().manual_seed(2)) * torch.linspace(0.1, 3, 384)
    plain = nf4.quantize_weight(w, double_quant=False)
    dq = nf4.quantize_weight(w, double_quant=True)
    assert torch.equal(plain.packed, dq.packed), "double quantization changes only how the scales are stored"
    assert dq.absmax.dtype == torch.uint8 and dq.nested.absmax.numel() == -(-plain.absmax.numel() // 256)
    assert dq.nested.offset == plain.absmax.mean()
    # each scale is off by at most half the widest gap of the dynamic map (plus one bin of the kernel's
    # 65536-bin lookup), relative to its nested block's maximum
    dyn = nf4.dynamic_map()
    half_gap = float((dyn[1:] - dyn[:-1]).max()) / 2
    bound = dq.nested.absmax.repeat_interleave(256)[: plain.absmax.numel()] * (half_gap + 2 / 65535)
    assert torch.all((dq.block_absmax() - plain.absmax).abs() <= bound)
    from compress.quant.primitives import sqnr_db

    assert sqnr_db(w, dq.dequantize()) > 18 and abs(sqnr_db(w, dq.dequantize()) - sqnr_db(w, plain.dequantize())) < 0.5


def test_input_dtype_is_kept_for_dequantization():
    w = torch.randn(16, 64, generator=torch.Generator().manual_seed(3))
    for dtype in (torch.float16, torch.bfloat16):
        r = nf4.quantize_weight(w.to(dtype))
        assert r.dtype == dtype and r.dequantize().dtype == dtype
        assert torch.equal(r.packed, nf4.quantize_weight(w.to(dtype).float()).packed)


@pytest.mark.parametrize("blocksize", [16, 100, 8192, 0])
def test_bad_blocksize_is_refused(blocksize):
    with pytest.raises(CompressError, match=f"--blocksize {blocksize} is not supported; choose a power of two from 32 to 4096"):
        NF4Config(blocksize=blocksize)


def test_config_validation_and_json_round_trip():
    cfg = NF4Config(quant_type="fp4", double_quant=False, blocksize=128, compute_dtype="bfloat16", skip=["o_proj"])
    assert NF4Config.from_json(cfg.to_json()) == cfg and cfg.label == "fp4-b128"
    assert NF4Config().label == "nf4-b64-dq"
    with pytest.raises(CompressError, match="--quant-type int4"):
        NF4Config(quant_type="int4")
    with pytest.raises(CompressError, match="--compute-dtype float64"):
        NF4Config(compute_dtype="float64")
    with pytest.raises(CompressError, match="has no option 'bits'"):
        NF4Config.from_dict({"bits": 4})
    assert cfg.spec_for("layers.0.self_attn.o_proj") is None and cfg.spec_for("layers.0.mlp.up_proj").blocksize == 128


def test_nf4_linear_is_the_dense_layer_of_its_dequantized_weight():
    g = torch.Generator().manual_seed(4)
    w, b, x = torch.randn(48, 80, generator=g), torch.randn(48, generator=g), torch.randn(3, 5, 80, generator=g)
    layer = NF4Linear.from_weight(w, b, blocksize=32)
    assert layer.num_weights == 48 * 80 and dispatch.available_nf4_backends()[-1] == "reference"
    assert torch.equal(layer(x), torch.nn.functional.linear(x, layer.dequantize(), b))
    bf16 = NF4Linear(layer.result(), b, compute_dtype=torch.bfloat16)
    y = bf16(x)
    assert y.dtype == torch.float32, "the output comes back in the input's dtype"
    expected = torch.nn.functional.linear(x.bfloat16(), layer.dequantize().bfloat16(), b.bfloat16()).float()
    assert torch.equal(y, expected)
    half = NF4Linear(layer.result(), b.clone()).half()
    assert half.quant_map.dtype == torch.float32 and half.nested_absmax.dtype == torch.float32
    assert torch.equal(half.dequantize(), layer.dequantize()), "casting the module does not touch the stored tables"


def _dense_with(src, quantized):
    """The full-precision model with every NF4Linear's weight replaced by its dequantized weight."""
    dense = compress.load(src)
    for name, module in quantized.model.named_modules():
        if isinstance(module, NF4Linear):
            target = dense.model.get_submodule(name)
            w = module.dequantize(torch.float32)
            target.weight.data = w.t().contiguous() if type(target).__name__ == "Conv1D" else w
    return dense


def _out(loaded, ids):
    out = loaded.model(input_ids=ids)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


@pytest.mark.parametrize("arch", ["llama", "gpt2", "bert"])
def test_quantize_save_load_run(tiny_model, tmp_path, hash_tree, arch):
    src = tiny_model(arch)
    before = hash_tree(src)
    # float32 throughout, so the quantized model must be exactly the dense one with dequantized weights
    report = compress.quantize(src, tmp_path / "q", NF4Config(blocksize=32, dtype="float32"), progress=False)
    assert hash_tree(src) == before, "the input folder must never change"
    qcfg = json.loads((tmp_path / "q" / "config.json").read_text())["quantization_config"]
    assert qcfg["quant_method"] == "bitsandbytes" and qcfg["bnb_4bit_use_double_quant"] is True
    assert not (tmp_path / "q" / "quantize_config.json").exists()
    quant = compress.load(tmp_path / "q")
    layers = [m for m in quant.model.modules() if isinstance(m, NF4Linear)]
    assert len(layers) == len(report.layers) > 0
    ids = torch.randint(5, quant.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(_out(quant, ids), _out(_dense_with(src, quant), ids))


def test_output_dtype_is_the_model_dtype(tiny_model, tmp_path):
    src = tiny_model("llama")
    compress.quantize(src, tmp_path / "q", NF4Config(), progress=False)  # auto: float16 for a float32 model
    state = load_file(str(tmp_path / "q" / "model.safetensors"))
    original = load_file(str(src / "model.safetensors"))
    assert state["model.embed_tokens.weight"].dtype == torch.float16 and state["lm_head.weight"].dtype == torch.float16
    assert json.loads((tmp_path / "q" / "config.json").read_text())["torch_dtype"] == "float16"
    key = "model.layers.0.mlp.up_proj.weight"
    state_json = json.loads(bytes(state[key + ".quant_state.bitsandbytes__nf4"].tolist()))
    assert state_json["dtype"] == "float16", "weights are cast to the model dtype before quantization"
    assert torch.equal(state[key], nf4.quantize_weight(original[key].half()).packed)
    layer = compress.load(tmp_path / "q").model.get_submodule("model.layers.0.mlp.up_proj")
    assert layer.dequantize().dtype == torch.float16 and layer(torch.ones(1, 64)).dtype == torch.float32


def test_skip_list_tells_transformers_what_stays_dense(tiny_model, tmp_path):
    report = compress.quantize(tiny_model("llama"), tmp_path / "q", NF4Config(skip=[r"self_attn\.o_proj"]), progress=False)
    qcfg = json.loads((tmp_path / "q" / "config.json").read_text())["quantization_config"]
    assert qcfg["llm_int8_skip_modules"] == ["layers.0.self_attn.o_proj", "layers.1.self_attn.o_proj", "lm_head"]
    assert len(report.skipped) == 2
    quant = compress.load(tmp_path / "q")
    assert isinstance(quant.model.get_submodule("model.layers.0.self_attn.o_proj"), torch.nn.Linear)
    assert isinstance(quant.model.lm_head, torch.nn.Linear)


def test_layers_bitsandbytes_cpu_kernels_mishandle_are_quantized_and_named(tiny_model, tmp_path):
    # hidden 64, intermediate 80: down_proj has in_features 80 (not a multiple of 64), gate/up out_features 80
    report = compress.quantize(tiny_model("llama"), tmp_path / "q", NF4Config(), progress=False)
    limited = dict(report.bnb_cpu_limited)
    assert set(limited) == {f"model.layers.{i}.mlp.{p}" for i in range(2) for p in ("gate_proj", "up_proj", "down_proj")}
    assert limited["model.layers.0.mlp.down_proj"] == ["in_features 80 is not a multiple of the block size 64"]
    assert limited["model.layers.0.mlp.up_proj"] == ["out_features 80 is not a multiple of 32"]
    assert "bitsandbytes 0.50's CPU kernels mishandle 6 layers" in report.summary()
    assert len(report.layers) == 14, "they are quantized all the same, as bitsandbytes quantizes them"


@pytest.mark.parametrize("double_quant, expected", [(False, 4.5), (True, 4 + 8 / 64 + 32 / (64 * 256))])
def test_bits_per_weight_read_from_the_files(minilm, tmp_path, double_quant, expected):
    from compress.eval.harness import describe_quantization
    from compress.eval.measure import bits_per_weight

    compress.quantize(minilm, tmp_path / "q", NF4Config(double_quant=double_quant), progress=False)
    loaded = compress.load(tmp_path / "q")
    assert bits_per_weight(loaded) == pytest.approx(expected)
    assert describe_quantization(loaded.quantization) == ("nf4 b64 dq" if double_quant else "nf4 b64")
    assert (tmp_path / "q" / "modules.json").is_file() and loaded.kind == "embedding"


def test_missing_quant_state_key_is_refused(tiny_model, tmp_path):
    out = tmp_path / "q"
    compress.quantize(tiny_model("llama"), out, NF4Config(), progress=False)
    state = load_file(str(out / "model.safetensors"))
    del state["model.layers.1.mlp.up_proj.weight.quant_state.bitsandbytes__nf4"]
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(CompressError, match=r"layer model\.layers\.1\.mlp\.up_proj .* no model\.layers\.1\.mlp\.up_proj\.weight\.quant_state\.bitsandbytes__nf4"):
        compress.load(out)
    state = load_file(str(out / "model.safetensors"))
    del state["model.layers.0.mlp.up_proj.weight.nested_absmax"]
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(CompressError, match="nested_absmax"):
        compress.load(out)
