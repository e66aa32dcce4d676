"""Our Q4_K/Q5_K/Q6_K encoders, decoded by the gguf package's own dequantizer."""

import numpy as np
import pytest

gguf = pytest.importorskip("gguf", reason="the gguf package is needed for GGUF export (pip install 'compress[gguf]')")

from compress.gguf.kquants import ENCODERS, TYPE_SIZE  # noqa: E402

# relative RMS error of a Gaussian matrix after a round trip; the legacy type with the same bits
# (gguf's own encoder) is the yardstick each k-quant must beat
YARDSTICK = {"Q4_K": "Q4_1", "Q5_K": "Q5_1", "Q6_K": "Q8_0"}
BOUND = {"Q4_K": 0.08, "Q5_K": 0.04, "Q6_K": 0.02}


def rel_rmse(x, y):
    return float(np.sqrt(((x - y) ** 2).mean() / (x ** 2).mean()))


@pytest.mark.parametrize("name", sorted(ENCODERS))
def test_round_trip_through_gguf_dequantizer(name):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((8, 512)).astype(np.float32) * np.linspace(0.1, 3, 512, dtype=np.float32)
    raw = ENCODERS[name](x)
    assert raw.dtype == np.uint8 and raw.shape == (8, 2 * TYPE_SIZE[name])
    y = gguf.quants.dequantize(raw, gguf.GGMLQuantizationType[name])
    assert y.shape == x.shape
    err = rel_rmse(x, y)
    assert err < BOUND[name], err
    if name != "Q6_K":  # Q6_K has fewer bits than Q8_0
        legacy = gguf.GGMLQuantizationType[YARDSTICK[name]]
        assert err < rel_rmse(x, gguf.quants.dequantize(gguf.quants.quantize(x, legacy), legacy))


@pytest.mark.parametrize("name", sorted(ENCODERS))
def test_edge_values(name):
    """Zero blocks decode to zero, constant and one-sided blocks stay close, nothing is NaN."""
    x = np.zeros((4, 256), dtype=np.float32)
    x[1] = 0.5
    x[2] = -np.linspace(0, 2, 256)
    x[3, ::7] = 100.0  # a few outliers among zeros
    y = gguf.quants.dequantize(ENCODERS[name](x), gguf.GGMLQuantizationType[name])
    assert np.isfinite(y).all()
    assert np.array_equal(y[0], x[0])
    assert np.abs(y[1] - 0.5).max() < 0.02
    assert rel_rmse(x[2], y[2]) < 0.05
    assert np.abs(y[3] - x[3]).max() < 2.0


@pytest.mark.parametrize("name", sorted(ENCODERS))
def test_importance_lowers_weighted_error(name):
    """Weighting some columns heavily makes the fit favour them (the importance-matrix mechanism)."""
    rng = np.random.default_rng(1)
    x = rng.standard_normal((16, 256)).astype(np.float32)
    importance = np.ones(256, dtype=np.float32)
    importance[::8] = 50.0
    qtype = gguf.GGMLQuantizationType[name]
    plain = gguf.quants.dequantize(ENCODERS[name](x), qtype)
    steered = gguf.quants.dequantize(ENCODERS[name](x, importance), qtype)
    weighted = lambda y: float((importance * (y - x) ** 2).sum())  # noqa: E731
    assert weighted(steered) < weighted(plain)


def test_rows_must_fill_super_blocks():
    with pytest.raises(ValueError, match="multiple of 256"):
        ENCODERS["Q4_K"](np.zeros((2, 100), dtype=np.float32))
