"""The GPTQ solve as a pure function: exact special cases, error reduction, act-order, damping."""

import pytest
import torch

from compress.errors import CompressError
from compress.quant.gptq import accumulate_hessian, make_hessian, quantize_weight
from compress.quant.primitives import QuantSpec, quantize_groups


def correlated_inputs(k: int, n: int = 2048, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(k, k, generator=g) / k**0.5 + torch.eye(k)
    return (torch.randn(n, k, generator=g) @ mix) * (torch.rand(k, generator=g) * 3 + 0.1)


def hessian_of(x: torch.Tensor) -> torch.Tensor:
    h, n = make_hessian(x.shape[1]), 0
    for batch in x.split(300):  # uneven batches: the running mean must not depend on them
        n = accumulate_hessian(h, n, batch)
    return h


def output_error(w, wq, x):
    return float(((x @ w.t() - x @ wq.t()) ** 2).mean())


@pytest.mark.parametrize("k", [16, 576, 700])  # one block; three; four uneven (192-column blocks)
def test_hessian_is_the_running_mean_of_2xxT(k):
    x = torch.randn(1000, k)
    h = hessian_of(x)
    ref = 2 * x.t().double() @ x.double() / 1000
    torch.testing.assert_close(h.double(), ref, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(h, h.t(), rtol=1e-6, atol=1e-5)  # the mirrored blocks are the computed ones


def test_hand_made_hessian_on_a_small_layer():
    # nn.Linear(8, 6) with uncorrelated inputs: the inverse Hessian is diagonal, nothing is propagated,
    # so GPTQ must equal round-to-nearest exactly
    w = torch.randn(6, 8, generator=torch.Generator().manual_seed(1))
    h = torch.diag(torch.tensor([4.0, 1.0, 2.0, 0.5, 3.0, 1.5, 2.5, 1.0]))
    spec = QuantSpec(4, -1, True)
    gptq = quantize_weight(w, h, spec)
    rtn = quantize_groups(w, spec)
    assert torch.equal(gptq.q, rtn.q) and torch.equal(gptq.scales, rtn.scales)
    assert gptq.loss > 0


@pytest.mark.parametrize("spec", [QuantSpec(4, 128, True), QuantSpec(4, -1, True), QuantSpec(3, 128, False),
                                  QuantSpec(8, 32, True)])
def test_gptq_beats_rtn_on_correlated_inputs(spec):
    x = correlated_inputs(256)
    w = torch.randn(64, 256, generator=torch.Generator().manual_seed(2))
    h = hessian_of(x)
    rtn = output_error(w, quantize_groups(w, spec).dequantize(), x)
    gptq = output_error(w, quantize_weight(w, h, spec).dequantize(), x)
    act = output_error(w, quantize_weight(w, h, spec, act_order=True).dequantize(), x)
    assert gptq < 0.8 * rtn and act < gptq


def test_lazy_blocks_change_nothing():
    x = correlated_inputs(192)
    w = torch.randn(32, 192)
    h = hessian_of(x)
    spec = QuantSpec(4, 64, True)
    blocked = quantize_weight(w, h, spec, block_size=32)
    whole = quantize_weight(w, h, spec, block_size=192)
    assert (blocked.q != whole.q).float().mean() < 1e-3  # identical up to float rounding ties


def test_act_order_groups():
    x = correlated_inputs(128)
    w = torch.randn(16, 128)
    h = hessian_of(x)
    spec = QuantSpec(4, 32, True)
    r = quantize_weight(w, h, spec, act_order=True)
    perm = torch.argsort(torch.diag(h), descending=True)
    assert torch.equal(r.g_idx[perm].long(), torch.arange(128) // 32)  # groups are runs in the processing order
    assert not torch.equal(r.g_idx.long(), torch.arange(128) // 32)
    assert torch.bincount(r.g_idx.long()).tolist() == [32] * 4
    static = quantize_weight(w, h, spec, act_order=True, static_groups=True)
    assert torch.equal(static.g_idx.long(), torch.arange(128) // 32)


def test_dead_input_channels():
    x = correlated_inputs(64)
    x[:, 5] = 0
    w = torch.randn(8, 64)
    r = quantize_weight(w, hessian_of(x), QuantSpec(4, 32, False))
    deq = r.dequantize()
    assert torch.isfinite(deq).all() and deq[:, 5].abs().max() < 1e-6


def test_damping_is_raised_until_the_factorization_works():
    x = correlated_inputs(32, n=16)  # fewer samples than channels: H is singular
    h = hessian_of(x)
    h -= 0.05 * torch.diag(h).mean() * torch.eye(32)  # indefinite: damp 0.01 cannot fix it, 0.1 can
    from compress.quant.gptq import prepare_hessian

    assert prepare_hessian(h, damp=0.01).damp == pytest.approx(0.1)
    r = quantize_weight(torch.randn(8, 32), h, QuantSpec(4, -1, True), damp=0.01)
    assert torch.isfinite(r.dequantize()).all()


def test_singular_hessian_is_a_clear_error():
    h = torch.eye(16)
    h[3, 3] = float("nan")
    with pytest.raises(CompressError, match="stays singular"):
        quantize_weight(torch.randn(4, 16), h, QuantSpec(4, -1, True), name="layer.x")


def test_mse_clipping_lowers_weight_error():
    w = torch.randn(32, 128)
    w[:, 0] = 12.0  # an outlier column stretches every row's range
    h = torch.eye(128)
    plain = quantize_weight(w, h, QuantSpec(3, 128, True))
    mse = quantize_weight(w, h, QuantSpec(3, 128, True), mse=True)
    err = lambda r: float(((r.dequantize() - w)[:, 1:] ** 2).mean())
    assert err(mse) < err(plain)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_codes_scales_and_zeros_are_storable(bits):
    x = correlated_inputs(96)
    r = quantize_weight(torch.randn(40, 96), hessian_of(x), QuantSpec(bits, 32, False), act_order=True)
    assert int(r.q.max()) < 2**bits and int(r.zeros.min()) >= 1
    assert torch.equal(r.scales, r.scales.half().float())
