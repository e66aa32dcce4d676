"""Bit-exactness with the real bitsandbytes 0.50 on the CPU, and the round trip through transformers.

bitsandbytes is part of the ``test`` extra: when it is missing these tests fail (they never skip), so a
CI run without it cannot pass silently.
"""

import json

import pytest
import torch
from safetensors.torch import load_file

import compress
from compress.config import NF4Config
from compress.quant import nf4
from compress.quant.bnb_format import bnb_tensors
from compress.quant.nf4_linear import NF4Linear


@pytest.fixture(scope="module")
def bnb():
    try:
        import bitsandbytes
    except ImportError:
        pytest.fail("bitsandbytes is missing: it is part of the test extra (pip install -e '.[test]')")
    assert bitsandbytes.__version__.startswith("0.50."), f"these tests pin bitsandbytes 0.50, found {bitsandbytes.__version__}"
    return bitsandbytes


@pytest.fixture(autouse=True)
def eager_bitsandbytes():
    # bitsandbytes wraps its pure-torch fallbacks in torch.compile, which would spend seconds compiling
    # C++ per shape on the CPU; run them eagerly (the arithmetic is the same)
    with torch._dynamo.config.patch(disable=True):
        yield


def _reference_dequantize(bnb, packed, state):
    """bitsandbytes' own pure-torch dequantization (its default backend), whatever the CPU."""
    from bitsandbytes.backends.default.ops import _dequantize_4bit_compute

    absmax = state.absmax
    if state.nested:
        absmax = bnb.functional.dequantize_blockwise(state.absmax, state.state2) + state.offset
    return _dequantize_4bit_compute.__wrapped__(packed.reshape(-1), absmax, state.code, state.blocksize,
                                                state.shape, state.dtype)


def assert_same_as_bitsandbytes(bnb, w, quant_type, blocksize, double_quant):
    """Our quantization of w equals bitsandbytes' in every stored tensor, and dequantizes identically."""
    packed, state = bnb.functional.quantize_4bit(w, blocksize=blocksize, quant_type=quant_type,
                                                 compress_statistics=double_quant)
    ours = nf4.quantize_weight(w, quant_type, blocksize, double_quant)
    assert torch.equal(ours.packed, packed), "packed weight bytes"
    assert ours.absmax.dtype == state.absmax.dtype and torch.equal(ours.absmax, state.absmax), "absmax"
    assert torch.equal(ours.quant_map, state.code), "quant_map"
    if double_quant:
        assert torch.equal(ours.nested.absmax, state.state2.absmax), "nested absmax"
        assert torch.equal(ours.nested.quant_map, state.state2.code), "nested quant_map"
        assert ours.nested.offset.dtype == state.offset.dtype and torch.equal(ours.nested.offset, state.offset), "offset"
    else:
        assert ours.nested is None and not state.nested
    dense = ours.dequantize()
    assert torch.equal(dense, _reference_dequantize(bnb, packed, state)), "dequantized (bitsandbytes' torch path)"
    n, k = w.shape
    if k % blocksize == 0 or k % 16:
        # its C++ CPU kernel agrees too, except on AVX-512 CPUs for rows that end inside a block
        assert torch.equal(dense, bnb.functional.dequantize_4bit(packed, state)), "dequantized (bitsandbytes' CPU kernel)"
    return ours, packed, state


CASES = [  # (shape, quant_type, blocksize, double_quant, dtype): multiples and non-multiples of the block size
    ((64, 64), "nf4", 64, True, torch.float32),
    ((384, 1536), "nf4", 64, True, torch.float32),
    ((1536, 384), "fp4", 64, False, torch.float32),
    ((64, 80), "nf4", 64, True, torch.float32),  # rows end inside a block
    ((7, 33), "nf4", 32, True, torch.float32),  # odd element count: the last byte is padded
    ((7, 33), "fp4", 128, False, torch.float32),  # a single short block
    ((1, 1), "nf4", 64, True, torch.float32),
    ((300, 1000), "nf4", 128, True, torch.float32),  # 2344 blocks: ten nested blocks, the last one short
    ((257, 129), "fp4", 4096, True, torch.float32),
    ((96, 200), "nf4", 256, True, torch.float16),
    ((96, 200), "fp4", 32, True, torch.bfloat16),
    ((512, 512), "nf4", 2048, False, torch.bfloat16),
]


@pytest.mark.parametrize("shape, quant_type, blocksize, double_quant, dtype", CASES,
                         ids=[f"{s[0]}x{s[1]}-{q}-b{b}-{'dq' if d else 'nodq'}-{str(t)[6:]}" for s, q, b, d, t in CASES])
def test_random_weights_bit_exact(bnb, shape, quant_type, blocksize, double_quant, dtype):
    g = torch.Generator().manual_seed(sum(shape) + blocksize)
    w = (torch.randn(shape, generator=g) * torch.logspace(-3, 1, shape[1])).to(dtype)
    w[0, : min(shape[1], 40)] = 0  # an all-zero block
    assert_same_as_bitsandbytes(bnb, w, quant_type, blocksize, double_quant)


def test_minilm_weights_bit_exact(bnb, minilm):
    state = load_file(str(minilm / "model.safetensors"))
    names = [k for k, v in state.items() if k.endswith(".weight") and v.dim() == 2 and "embeddings" not in k]
    assert len(names) == 37  # 36 Linear layers in the blocks, and the pooler
    for i, name in enumerate(names):
        quant_type, blocksize = ("nf4", 64) if i % 2 == 0 else ("fp4", 128)
        assert_same_as_bitsandbytes(bnb, state[name], quant_type, blocksize, double_quant=i % 3 != 0)


def test_code_tables_are_bitsandbytes_tables(bnb):
    assert torch.equal(nf4.code_table("nf4"), bnb.functional.get_4bit_type("nf4", device="cpu"))
    assert torch.equal(nf4.code_table("fp4"), bnb.functional.get_4bit_type("fp4", device="cpu"))
    assert torch.equal(nf4.dynamic_map(), bnb.functional.create_dynamic_map(signed=True))


def test_nested_8bit_codes_follow_the_cpu_kernel(bnb):
    # centred block maxima spread over many decades exercise every part of the 65536-bin lookup
    g = torch.Generator().manual_seed(5)
    x = torch.randn(300_000, generator=g) * torch.logspace(-6, 2, 300_000)
    codes, state = bnb.functional.quantize_blockwise(x, blocksize=256)
    ours, absmax = nf4.quantize_blockwise_8bit(x, nf4.dynamic_map(), 256)
    assert torch.equal(ours, codes) and torch.equal(absmax, state.absmax)


@pytest.mark.parametrize("double_quant", [True, False])
def test_state_dict_is_the_one_linear4bit_saves(bnb, double_quant):
    w, b = torch.randn(96, 160, generator=torch.Generator().manual_seed(6)), torch.randn(96)
    layer = bnb.nn.Linear4bit(160, 96, bias=True, quant_type="nf4", compress_statistics=double_quant)
    layer.weight = bnb.nn.Params4bit(w, requires_grad=False, quant_type="nf4", compress_statistics=double_quant,
                                     blocksize=64)._quantize("cpu")
    layer.bias = torch.nn.Parameter(b, requires_grad=False)
    theirs = layer.state_dict()
    ours = bnb_tensors(nf4.quantize_weight(w, "nf4", 64, double_quant), b)
    assert set(ours) == set(theirs)
    for key, value in theirs.items():
        assert ours[key].dtype == value.dtype and torch.equal(ours[key], value), key
    qs = f"weight.quant_state.bitsandbytes__nf4"
    assert bytes(ours[qs].tolist()) == bytes(theirs[qs].tolist()), "the quant_state JSON, byte for byte"


def _portable_path(model, bnb):
    """Make every Linear4bit use bitsandbytes' generic CPU path (dequantize in float32, then matmul), the
    one CPUs without AVX-512-BF16 take; with it, bitsandbytes repacks weights for a bfloat16 kernel."""
    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False
    return model


def _sentences(tokenizer):
    texts = ["Return the number of items in a container.", "Quantization maps weights onto a few codes with a scale."]
    return tokenizer(texts, padding=True, return_tensors="pt")


@pytest.mark.parametrize("config", [NF4Config(), NF4Config(quant_type="fp4", double_quant=False, blocksize=128, dtype="float32")],
                         ids=["nf4-b64-dq-float16", "fp4-b128-float32"])
def test_transformers_loads_our_output(bnb, minilm, tmp_path, config):
    from transformers import AutoModel

    out = tmp_path / "q"
    compress.quantize(minilm, out, config, progress=False)
    dtype = torch.float32 if config.dtype == "float32" else torch.float16  # auto: float16 for MiniLM
    ours = compress.load(out, dtype=dtype)
    batch = _sentences(ours.tokenizer)
    theirs = AutoModel.from_pretrained(str(out), device_map="cpu").eval()  # in the stored dtype
    assert theirs.dtype == dtype
    quantized = [n for n, m in theirs.named_modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert len(quantized) == 36 and isinstance(theirs.pooler.dense, torch.nn.Linear), "llm_int8_skip_modules is honoured"
    for name in quantized:  # (before a forward pass, which may repack the weights for the CPU)
        param = theirs.get_submodule(name).weight
        assert torch.equal(_reference_dequantize(bnb, param.data, param.quant_state), ours.model.get_submodule(name).dequantize())
    with torch.no_grad():
        expected = ours.model(**batch).last_hidden_state
        exact = _portable_path(theirs, bnb)(**batch).last_hidden_state
        for module in theirs.modules():  # back to bitsandbytes' own CPU choice (a bfloat16 kernel on AVX-512-BF16)
            if isinstance(module, bnb.nn.Linear4bit):
                module.support_avx512bf16_for_cpu = bnb.functional.has_avx512bf16()
        fast = theirs(**batch).last_hidden_state
    assert torch.equal(exact, expected), "identical outputs on bitsandbytes' float32 path"
    assert torch.nn.functional.cosine_similarity(fast.flatten().float(), expected.flatten().float(), dim=0) > 0.999


def test_we_load_what_transformers_saved(bnb, minilm, tmp_path):
    from transformers import AutoModel, BitsAndBytesConfig

    saved = tmp_path / "hf-nf4"
    hf = AutoModel.from_pretrained(str(minilm), device_map="cpu", quantization_config=BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True))
    hf.save_pretrained(str(saved))
    ours = compress.load(saved)
    layers = [m for m in ours.model.modules() if isinstance(m, NF4Linear)]
    assert len(layers) == 37, "transformers also quantizes the pooler; every 4-bit layer is read"
    batch = _sentences(ours.tokenizer)
    with torch.no_grad():
        assert torch.equal(ours.model(**batch).last_hidden_state, _portable_path(hf.eval(), bnb)(**batch).last_hidden_state)


def test_our_folder_is_the_one_transformers_saves(bnb, minilm, tmp_path):
    """transformers loading MiniLM in float16 and quantizing it saves, tensor for tensor, what we write
    with --dtype float16 (except the pooler, which it quantizes and we keep dense)."""
    from transformers import AutoModel, BitsAndBytesConfig

    hf = AutoModel.from_pretrained(str(minilm), device_map="cpu", dtype=torch.float16, quantization_config=BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True))
    hf.save_pretrained(str(tmp_path / "hf"))
    compress.quantize(minilm, tmp_path / "ours", NF4Config(dtype="float16"), progress=False)
    theirs, ours = load_file(str(tmp_path / "hf" / "model.safetensors")), load_file(str(tmp_path / "ours" / "model.safetensors"))
    theirs = {k: v for k, v in theirs.items() if not k.startswith("pooler.")}
    ours = {k: v for k, v in ours.items() if not k.startswith("pooler.")}
    # we copy every tensor of the input; transformers drops the position_ids buffer it does not persist
    assert set(ours) - set(theirs) == {"embeddings.position_ids"} and set(theirs) <= set(ours) and len(theirs) > 250
    for key, value in theirs.items():
        assert ours[key].dtype == value.dtype and torch.equal(ours[key], value), key


def test_we_load_what_bitsandbytes_saved(bnb, tiny_model, tmp_path):
    """A tiny Llama whose Linear layers bitsandbytes quantized itself (fp4, block size 128), saved as a state dict."""
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM

    src = tiny_model("llama")
    model = AutoModelForCausalLM.from_pretrained(str(src))
    state, expected = {}, {}
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and ".layers." in name:
            layer = bnb.nn.Linear4bit(module.in_features, module.out_features, bias=False, quant_type="fp4")
            layer.weight = bnb.nn.Params4bit(module.weight.data, requires_grad=False, quant_type="fp4",
                                             compress_statistics=False, blocksize=128)._quantize("cpu")
            state.update({f"{name}.{k}": v for k, v in layer.state_dict().items()})
            expected[name] = _reference_dequantize(bnb, layer.weight.data, layer.weight.quant_state)
    for key, value in model.state_dict().items():
        if key.rpartition(".")[0] not in expected:
            state[key] = value
    out = tmp_path / "bnb-fp4"
    out.mkdir()
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    cfg = json.loads((src / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "bitsandbytes", "load_in_4bit": True, "bnb_4bit_quant_type": "fp4"}
    (out / "config.json").write_text(json.dumps(cfg))
    for f in src.glob("tokenizer*"):
        (out / f.name).write_bytes(f.read_bytes())
    loaded = compress.load(out)
    for name, dense in expected.items():
        layer = loaded.model.get_submodule(name)
        assert isinstance(layer, NF4Linear) and layer.blocksize == 128 and layer.quant_type == "fp4"
        assert torch.equal(layer.dequantize(), dense), name
