"""The CPU int4 kernel (compress_kernels.cpu) against the pure-torch reference.

Error bounds: max |y - ref| / max |ref| against a float64 reference: 1e-5 in float32 (the kernel computes
in float32 whatever the input dtype), 2e-3 in float16, 1e-2 in bfloat16 (the rounding of the output).
"""

import pytest
import torch

from compress_kernels import dispatch, reference
from kernel_layers import gptq_layer, rel_error

BOUNDS = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}

# (K, N, group, act_order, sym, zero_offset): K and N off any tile multiple, shuffled g_idx, both conventions
LAYOUTS = [
    (200, 72, 32, True, False, 1),
    (256, 40, 64, False, True, 0),
    (100, 24, -1, False, False, 1),
    (96, 50, 24, True, False, 0),   # groups that start inside a packed word
    (130, 17, 128, False, False, 1),  # a partial last group and a partial last word
]


def _reference(x, layer):
    return reference.gptq_matmul(x.double(), **{**layer, "scales": layer["scales"].double(),
                                                 "bias": None if layer["bias"] is None else layer["bias"].double()})


@pytest.mark.parametrize("layout", LAYOUTS, ids=lambda l: "k{}n{}g{}{}{}v{}".format(
    l[0], l[1], l[2], "-act" if l[3] else "", "-sym" if l[4] else "-asym", 2 - l[5]))
@pytest.mark.parametrize("m", [1, 3, 16, 33, 128])
def test_cpu_int4_matches_reference(layout, m):
    k, n, group, act, sym, zo = layout
    layer = gptq_layer(k, n, group, act_order=act, sym=sym, zero_offset=zo, bias=m % 2 == 1, seed=m)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(m))
    ref = _reference(x, layer)
    cache = {}
    for dtype, bound in BOUNDS.items():
        y = dispatch.gptq_matmul(x.to(dtype), **layer, force="cpu_int4", cache=cache)
        assert y.dtype == dtype and y.shape == (m, n)
        assert rel_error(y, ref) < bound, (dtype, rel_error(y, ref))


def test_cpu_int4_keeps_leading_dims_and_is_chosen_by_default():
    layer = gptq_layer(64, 32, 32, act_order=True)
    x = torch.randn(2, 3, 64)
    assert dispatch.choose_backend(x, **layer) == "cpu_int4"
    y = dispatch.gptq_matmul(x, **layer)
    assert y.shape == (2, 3, 32)
    assert rel_error(y, _reference(x, layer)) < 1e-5


def test_quant_linear_converts_once_and_again_after_a_change():
    from compress.quant.linear import QuantLinear

    layer = gptq_layer(128, 48, 32, act_order=True)
    module = QuantLinear.from_tensors({k: layer[k] for k in ("qweight", "qzeros", "scales", "g_idx", "bias")}, 4, 32)
    x = torch.randn(5, 128)
    y1 = module(x)
    prepared = module._kernel_cache["cpu_int4"][1]
    module(x)
    assert module._kernel_cache["cpu_int4"][1] is prepared  # not converted again
    assert rel_error(y1, torch.nn.functional.linear(x, module.dequantize(), module.bias.float())) < 1e-5
    with torch.no_grad():
        module.scales.mul_(2)  # an in-place change bumps the tensor's version: the cached form is stale
    y2 = module(x)
    assert module._kernel_cache["cpu_int4"][1] is not prepared
    assert rel_error(y2, torch.nn.functional.linear(x, module.dequantize(), module.bias.float())) < 1e-5


def test_benchmark_layers_are_valid_gptq_layers():
    from compress_kernels import bench

    layer = bench.random_gptq(48, 256, group=64)
    x = torch.randn(2, 256)
    assert rel_error(dispatch.gptq_matmul(x, **layer, force="cpu_int4"), _reference(x, layer)) < 1e-5
