"""Pruning algorithms as pure functions: masks, N:M, global threshold, Wanda, SparseGPT, the cubic schedule,
the bitmask storage, and GPTQ with a fixed mask."""

import pytest
import torch

from compress.errors import CompressError
from compress.prune import sparse_format
from compress.prune.sparsegpt import sparsegpt_prune
from compress.prune.unstructured import (LayerSparsity, PruneConfig, cubic_sparsity, global_threshold, magnitude_mask,
                                         nm_mask, parse_pattern, parse_prune_overrides, topk_mask)
from compress.prune.wanda import wanda_prune
from compress.quant.gptq import accumulate_hessian, make_hessian, prepare_hessian, quantize_weight
from compress.quant.primitives import QuantSpec


def test_topk_mask_prunes_the_smallest_fraction():
    w = torch.randn(16, 40, generator=torch.Generator().manual_seed(0))
    mask = magnitude_mask(w, LayerSparsity(0.3))
    assert (~mask).sum() == round(0.3 * w.numel())
    assert w.abs()[~mask].max() <= w.abs()[mask].min()
    per_row = topk_mask(w.abs(), 0.25, per_row=True)
    assert ((~per_row).sum(1) == 10).all()


@pytest.mark.parametrize("n,m", [(2, 4), (4, 8)])
def test_nm_mask_keeps_n_of_every_m(n, m):
    w = torch.randn(8, 32, generator=torch.Generator().manual_seed(1))
    mask = nm_mask(w.abs(), n, m)
    groups = mask.reshape(8, -1, m)
    assert (groups.sum(-1) == n).all()
    kept_min = torch.where(groups, w.abs().reshape(8, -1, m), torch.inf).amin(-1)
    pruned_max = torch.where(~groups, w.abs().reshape(8, -1, m), -torch.inf).amax(-1)
    assert (kept_min >= pruned_max).all()
    with pytest.raises(CompressError, match="divisible by"):
        nm_mask(torch.randn(4, 30), n, m)


def test_existing_zeros_are_pruned_first():
    w = torch.tensor([[0.0, 0.0, 5.0, 6.0, 0.1, 0.2, 7.0, 8.0]])
    scores = torch.ones_like(w)  # every score equal: only the zeros decide
    assert nm_mask(scores, 2, 4, weight=w)[0, :2].logical_not().all()


def test_global_threshold_spans_layers():
    small, big = torch.full((4, 4), 0.1), torch.full((4, 4), 1.0)
    t = global_threshold([small.abs(), big.abs()], 0.5)
    assert (small.abs() <= t).all() and (big.abs() > t).all()


def test_cubic_schedule_rises_from_zero_to_the_target():
    values = [cubic_sparsity(t, 10, 0.8) for t in range(11)]
    assert values[0] == 0 and values[-1] == pytest.approx(0.8)
    assert all(b >= a for a, b in zip(values, values[1:]))
    assert values[2] - values[1] > values[9] - values[8]  # fast at first, slow at the end


def test_bitmask_storage_round_trips_exactly():
    g = torch.Generator().manual_seed(2)
    for shape in [(5, 13), (16, 64), (1, 7)]:
        w = torch.randn(*shape, generator=g).to(torch.float16)
        w[torch.rand(shape, generator=g) < 0.6] = 0
        parts = sparse_format.encode(w)
        assert parts["_bitmask"].shape == (shape[0], -(-shape[1] // 8))
        assert torch.equal(sparse_format.decode(parts["_bitmask"], parts["_values"], parts["_shape"]), w)
    dense = torch.randn(64, 64)
    assert not sparse_format.worth_compressing(dense)
    dense[:, ::2] = 0
    assert sparse_format.worth_compressing(dense)


def test_config_refuses_bad_values():
    for kwargs, fragment in [(dict(sparsity=1.0), "outside [0, 1)"), (dict(sparsity=-0.1), "outside [0, 1)"),
                             (dict(pattern="4:2"), "between 1 and M-1"), (dict(pattern="2-4"), "N:M"),
                             (dict(pattern="2:4", sparsity=0.3), "drop --sparsity"),
                             (dict(method="wanda", scope="global"), "magnitude only"),
                             (dict(method="random"), "unknown pruning method"),
                             (dict(overrides={"q_proj": {"bits": 4}}), "sparsity:S or pattern:N:M")]:
        with pytest.raises(CompressError, match=fragment.replace("[", r"\[").replace(")", r"\)")):
            PruneConfig(**kwargs)
    with pytest.raises(CompressError, match="REGEX=sparsity"):
        parse_prune_overrides(["q_proj"])
    cfg = PruneConfig(skip=["down"], overrides=parse_prune_overrides(["q_proj=sparsity:0.25", "k_proj=pattern:4:8"]))
    assert cfg.sparsity_for("x.mlp.down_proj") is None
    assert cfg.sparsity_for("x.q_proj") == LayerSparsity(0.25)
    assert cfg.sparsity_for("x.k_proj").pattern == (4, 8)
    assert cfg.sparsity_for("x.v_proj") == LayerSparsity(0.5)
    assert parse_pattern("2:4") == (2, 4)


def _inputs(k=32, n=512, seed=3):
    """Correlated input channels of very different sizes, as real activations have."""
    g = torch.Generator().manual_seed(seed)
    scale = torch.linspace(0.05, 3.0, k)
    mixing = torch.eye(k) + 0.5 * torch.randn(k, k, generator=g)
    return (torch.randn(n, k, generator=g) @ mixing) * scale


def test_wanda_prunes_weights_on_quiet_inputs():
    x = torch.randn(512, 32, generator=torch.Generator().manual_seed(3)) * torch.linspace(0.05, 3.0, 32)
    w = torch.ones(4, 32)  # equal magnitudes: only the activations tell the weights apart
    pruned, mask = wanda_prune(w, x.pow(2).sum(0), LayerSparsity(0.5))
    assert (~mask[:, :16]).all() and mask[:, 16:].all()
    assert torch.equal(pruned, w * mask)


@pytest.mark.parametrize("spec", [LayerSparsity(0.5), LayerSparsity(0.5, (2, 4))])
def test_wanda_output_error_is_below_magnitude_with_uneven_inputs(spec):
    g = torch.Generator().manual_seed(5)
    x = torch.randn(2048, 64, generator=g) * torch.rand(64, generator=g).pow(3).mul(8).add(0.1)
    w = torch.randn(32, 64, generator=g)
    errors = {}
    for name, mask in (("wanda", wanda_prune(w, x.pow(2).sum(0), spec)[1]),
                       ("magnitude", magnitude_mask(w, spec))):
        errors[name] = float(((w * ~mask) @ x.T).pow(2).sum() / (w @ x.T).pow(2).sum())
    assert errors["wanda"] < 0.6 * errors["magnitude"]


@pytest.mark.parametrize("spec", [LayerSparsity(0.5), LayerSparsity(0.5, (2, 4))])
def test_sparsegpt_reconstructs_better_than_magnitude(spec):
    x = _inputs()
    w = torch.randn(24, 32, generator=torch.Generator().manual_seed(4))
    h = make_hessian(32)
    accumulate_hessian(h, 0, x)
    result = sparsegpt_prune(w, prepare_hessian(h), spec, block_size=16)
    assert ((result.weight == 0) == ~result.mask).all()
    assert (~result.mask).sum() == w.numel() // 2
    if spec.pattern:
        assert (result.mask.reshape(24, -1, 4).sum(-1) == 2).all()
    magnitude = w * magnitude_mask(w, spec)
    err = lambda v: (x @ (w - v).t()).pow(2).sum()  # noqa: E731
    assert err(result.weight) < 0.8 * err(magnitude)


def test_gptq_with_a_mask_keeps_pruned_weights_zero():
    x = _inputs(k=64, seed=1)
    w = torch.randn(64, 64, generator=torch.Generator().manual_seed(5))
    mask = magnitude_mask(w, LayerSparsity(0.5, (2, 4)))
    h = make_hessian(64)
    accumulate_hessian(h, 0, x)
    spec = QuantSpec(4, 32, True)
    kept = quantize_weight(w * mask, h, spec, mask=mask).dequantize()
    assert (kept[~mask] == 0).all()
    free = quantize_weight(w * mask, h, spec).dequantize()
    assert (free[~mask] != 0).any()  # without the mask GPTQ's updates push a few pruned weights off zero
