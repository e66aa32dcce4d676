"""Importance-weighted Q4_0/Q5_0 encoders, decoded by the gguf package's own dequantizer."""

import numpy as np
import pytest

gguf = pytest.importorskip("gguf", reason="the gguf package is needed for GGUF export (pip install 'compress[gguf]')")

import tiny  # noqa: E402
from compress.gguf.legacy import ENCODERS  # noqa: E402
from compress.gguf.writer import export_gguf  # noqa: E402


def errors(name, x, importance):
    """Importance-weighted squared error of our encoding and of gguf's reference rounding."""
    qtype = gguf.GGMLQuantizationType[name]
    ours = gguf.quants.dequantize(ENCODERS[name](x, importance), qtype)
    reference = gguf.quants.dequantize(gguf.quants.quantize(x, qtype), qtype)
    return float(((ours - x) ** 2 * importance).sum()), float(((reference - x) ** 2 * importance).sum())


@pytest.mark.parametrize("name", sorted(ENCODERS))
def test_layout_matches_gguf(name):
    """Same byte count as gguf's encoder, and all-zero or constant blocks come back exactly."""
    x = np.zeros((3, 96), dtype=np.float32)
    x[1] = 0.25
    x[2, :32] = np.linspace(-1, 1, 32)
    raw = ENCODERS[name](x, np.ones(96, dtype=np.float32))
    assert raw.dtype == np.uint8 and raw.shape == gguf.quants.quantize(x, gguf.GGMLQuantizationType[name]).shape
    y = gguf.quants.dequantize(raw, gguf.GGMLQuantizationType[name])
    np.testing.assert_array_equal(y[0], 0)
    np.testing.assert_allclose(y[1], 0.25, rtol=1e-3)
    assert np.abs(y[2] - x[2]).max() < (0.15 if name == "Q4_0" else 0.07)


@pytest.mark.parametrize("name", sorted(ENCODERS))
def test_importance_lowers_weighted_error(name):
    """The scale search beats the reference rounding in plain error, and more so where importance is high."""
    rng = np.random.default_rng(0)
    x = (rng.standard_normal((64, 576)) * 0.05).astype(np.float32)
    flat = np.ones(576, dtype=np.float32)
    ours, reference = errors(name, x, flat)
    assert ours < 0.95 * reference
    peaked = flat.copy()
    peaked[:40] = 100.0
    ours_peaked, reference_peaked = errors(name, x, peaked)
    assert ours_peaked / reference_peaked < ours / reference


def test_export_weights_fallback_blocks(tmp_path):
    """q4_k_m rows too short for k-quant blocks fall back to Q5_0; an importance vector now changes them."""
    import gguf as g

    src = tiny.build("llama", tmp_path / "m")
    plain = export_gguf(src, tmp_path / "plain.gguf", "q4_k_m")
    name = "blk.0.attn_q.weight"
    assert {t.name: t.ggml_type for t in plain.tensors}[name] == "Q5_0"
    importance = np.ones(64, dtype=np.float32)
    importance[:8] = 50.0
    export_gguf(src, tmp_path / "imatrix.gguf", "q4_k_m", importance={name: importance})
    data = {p: {t.name: bytes(t.data) for t in g.GGUFReader(str(tmp_path / p)).tensors} for p in ("plain.gguf", "imatrix.gguf")}
    assert data["plain.gguf"][name] != data["imatrix.gguf"][name]
    assert data["plain.gguf"]["blk.0.attn_k.weight"] == data["imatrix.gguf"]["blk.0.attn_k.weight"]
