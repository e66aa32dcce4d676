"""The GPTQ v1 checkpoint layout, checked against a reader written from the format description."""

import numpy as np
import pytest
import torch

from compress.quant.formats import GPTQFormat, gptq_quantization_config, gptq_tensors, vllm_refusals
from compress.quant.linear import QuantLinear
from compress.quant.primitives import QuantSpec, quantize_groups


def spec_unpack(words: np.ndarray, bits: int, n: int, axis: int) -> np.ndarray:
    """Unpack int32 words along ``axis`` following REFERENCES.md section 1, one code at a time."""
    w = np.moveaxis(words, axis, 0).astype(np.int64) & 0xFFFFFFFF
    out = np.zeros((n,) + w.shape[1:], dtype=np.int64)
    for i in range(n):
        bit = i * bits
        word, off = bit // 32, bit % 32
        value = w[word] >> off
        if off + bits > 32:
            value |= w[word + 1] << (32 - off)
        out[i] = value & ((1 << bits) - 1)
    return np.moveaxis(out, 0, axis)


def spec_dequantize(t: dict, bits: int) -> np.ndarray:
    """W[:, i] = scales[g_idx[i]] * (q[i] - (stored_zero + 1)[g_idx[i]]), as v1 readers do."""
    k, n = t["g_idx"].shape[0], t["scales"].shape[1]
    q = spec_unpack(t["qweight"].numpy(), bits, k, 0)
    z = spec_unpack(t["qzeros"].numpy(), bits, n, 1) + 1
    g = t["g_idx"].numpy()
    s = t["scales"].numpy().astype(np.float64)
    return (s[g] * (q - z[g])).T  # [N, K]


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("sym", [True, False])
@pytest.mark.parametrize("shape,group", [((48, 96), 32), ((80, 100), 64), ((33, 64), -1)])
def test_written_tensors_match_the_specification(bits, sym, shape, group):
    w = torch.randn(*shape, generator=torch.Generator().manual_seed(bits))
    result = quantize_groups(w, QuantSpec(bits, group, sym))
    t = gptq_tensors(result, bias=torch.randn(shape[0]))
    n, k = shape
    groups = 1 if group == -1 else -(-k // group)
    assert t["qweight"].dtype == torch.int32 and t["qzeros"].dtype == torch.int32
    assert t["scales"].dtype == torch.float16 and t["scales"].shape == (groups, n)
    assert t["g_idx"].dtype == torch.int32 and t["g_idx"].shape == (k,)
    assert t["bias"].dtype == torch.float16
    expected = result.dequantize().double().numpy()
    np.testing.assert_allclose(spec_dequantize(t, bits), expected, rtol=0, atol=1e-6)


def test_v1_stores_zero_minus_one():
    result = quantize_groups(torch.randn(8, 32), QuantSpec(4, 32, True))
    t = gptq_tensors(result)
    assert (spec_unpack(t["qzeros"].numpy(), 4, 8, 1) == 7).all()  # real zero 8
    t2 = gptq_tensors(result, checkpoint_format="gptq_v2")
    assert (spec_unpack(t2["qzeros"].numpy(), 4, 8, 1) == 8).all()


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_quant_linear_matches_dense(bits):
    w = torch.randn(40, 72, generator=torch.Generator().manual_seed(1))
    bias = torch.randn(40)
    result = quantize_groups(w, QuantSpec(bits, 32, False))
    layer = QuantLinear.from_result(result, bias)
    x = torch.randn(3, 5, 72)
    dense = torch.nn.functional.linear(x, result.dequantize(), bias.half().float())
    torch.testing.assert_close(layer(x), dense, rtol=1e-5, atol=1e-5)


def test_quantization_config_fields():
    cfg = gptq_quantization_config(QuantSpec(3, 64, False), method="rtn", skip=["lm_head"],
                                   overrides={r"down_proj": {"bits": 8}})
    for key in ("quant_method", "bits", "group_size", "desc_act", "sym", "damp_percent", "static_groups",
                "true_sequential", "checkpoint_format"):
        assert key in cfg
    assert cfg["quant_method"] == "gptq" and cfg["checkpoint_format"] == "gptq"
    fmt = GPTQFormat.from_config(cfg)
    assert fmt.layer_spec("model.layers.0.mlp.down_proj") == (8, 64)
    assert fmt.layer_spec("model.layers.0.mlp.up_proj") == (3, 64)
    assert fmt.zero_offset == 1


def test_vllm_refusals():
    assert vllm_refusals("a", 4096, 4096, QuantSpec(4, 128, True)) == []
    reasons = vllm_refusals("a", 100, 80, QuantSpec(3, 64, True))
    assert any("group size" in r for r in reasons) and any("out_features" in r for r in reasons)
