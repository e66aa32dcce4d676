"""Triton kernels (compress_kernels.triton) against the pure-torch reference, in Triton's CPU interpreter.

Shapes are small (the interpreter runs on numpy) and deliberately off the tile sizes (32 there); the
split-K path runs for every K >= 64. Error bounds, max |y - ref| / max |ref| against a float64
reference: 1e-5 in float32, 2e-3 in float16, 1e-2 in bfloat16. The interpreter has no bfloat16
arithmetic, so bfloat16 tiles go through float32 dots there: on CPU this checks bfloat16 loads,
stores and the one-row path; the bfloat16 tensor-core dot is exercised only on a GPU.
"""

import os

import pytest
import torch

if not torch.cuda.is_available():  # before triton is imported: it reads the switch once
    os.environ.setdefault("TRITON_INTERPRET", "1")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
pytest.importorskip("triton", reason="triton is not installed (pip install 'compress[triton]')")

from compress_kernels import dispatch, reference  # noqa: E402
from kernel_layers import gptq_layer, rel_error  # noqa: E402

def _on_device(layer: dict) -> dict:
    return {k: v.to(DEVICE) if isinstance(v, torch.Tensor) else v for k, v in layer.items()}


BOUNDS = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}


def _ref(x, layer):
    return reference.gptq_matmul(x.double(), **{**layer, "scales": layer["scales"].double(),
                                                 "bias": None if layer["bias"] is None else layer["bias"].double()})


LAYOUTS = [
    (200, 72, 32, True, False, 1),    # act-order, asymmetric, v1 zeros
    (130, 40, 64, False, True, 0),    # symmetric, v2 zeros, partial last group and word
    (96, 24, -1, False, False, 1),    # one group
    (96, 50, 24, True, False, 0),     # groups smaller than a tile: per-channel gather
]


@pytest.mark.parametrize("layout", LAYOUTS, ids=lambda l: "k{}n{}g{}{}{}v{}".format(
    l[0], l[1], l[2], "-act" if l[3] else "", "-sym" if l[4] else "-asym", 2 - l[5]))
@pytest.mark.parametrize("m", [1, 3, 16, 33, 128])
def test_triton_gptq_matches_reference(layout, m):
    k, n, group, act, sym, zo = layout
    layer = gptq_layer(k, n, group, act_order=act, sym=sym, zero_offset=zo, bias=m != 3, seed=m)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(m))
    ref = _ref(x, layer)
    cache = {}
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        y = dispatch.gptq_matmul(x.to(DEVICE, dtype), **_on_device(layer), force="triton", cache=cache).cpu()
        assert y.dtype == dtype and y.shape == (m, n)
        assert rel_error(y, ref) < BOUNDS[dtype], (dtype, rel_error(y, ref))


@pytest.mark.parametrize("bits", [2, 8])
def test_triton_other_bit_widths(bits):
    layer = gptq_layer(160, 40, 32, bits=bits, act_order=True)
    for m in (1, 20):
        x = torch.randn(m, 160)
        y = dispatch.gptq_matmul(x.to(DEVICE), **_on_device(layer), force="triton").cpu()
        assert rel_error(y, _ref(x, layer)) < 1e-5


def test_triton_dequantize_then_matmul_path(monkeypatch):
    from compress_kernels.triton import gptq

    monkeypatch.setattr(gptq, "DEQUANT_MIN_M", 64)
    layer = gptq_layer(200, 72, 32, act_order=True)
    x = torch.randn(70, 200).half()
    assert rel_error(dispatch.gptq_matmul(x.to(DEVICE), **_on_device(layer), force="triton").cpu(), _ref(x, layer)) < 2e-3
    w = gptq.prepare(**_on_device(layer))
    dense = reference.gptq_dequantize(layer["qweight"], layer["qzeros"], layer["scales"], layer["g_idx"], 4, 1,
                                      torch.float32)
    assert torch.equal(gptq.dequantize(w, torch.float32).cpu(), dense[:, w.perm.cpu()])  # exact: same float32 products


@pytest.mark.parametrize("double_quant", [True, False])
@pytest.mark.parametrize("m", [1, 3, 16, 33, 128])
def test_triton_nf4_matches_reference(m, double_quant):
    from compress.quant.nf4 import quantize_weight

    gen = torch.Generator().manual_seed(m)
    w = torch.randn(40, 192, generator=gen)  # K = 3 blocks of 64; N = 40 off the tile size
    result = quantize_weight(w, "nf4", 64, double_quant)
    nested = result.nested
    layer = dict(packed=result.packed, absmax=result.absmax, quant_map=result.quant_map, shape=(40, 192), blocksize=64,
                 nested_absmax=nested.absmax if nested else None, nested_quant_map=nested.quant_map if nested else None,
                 offset=nested.offset if nested else None, bias=torch.randn(40, generator=gen))
    x = torch.randn(m, 192, generator=gen)
    ref = reference.nf4_matmul(x.double(), **{**layer, "bias": layer["bias"].double()})
    for dtype in (torch.float32, torch.float16):
        y = dispatch.nf4_matmul(x.to(DEVICE, dtype), **_on_device(layer), force="triton").cpu()
        assert rel_error(y, ref) < BOUNDS[dtype], (dtype, rel_error(y, ref))


def test_triton_is_not_chosen_on_cpu_unless_forced():
    layer = gptq_layer(64, 32, 32)
    assert dispatch.choose_backend(torch.randn(1, 64), **layer) == "cpu_int4"
