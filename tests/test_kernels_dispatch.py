"""compress_kernels.dispatch: choice of backend, forcing it, the one-time fallback warning."""

import warnings

import pytest
import torch

from compress_kernels import dispatch
from kernel_layers import gptq_layer, rel_error


def test_registry_order_and_reference_last():
    assert dispatch.available_backends() == ["cuda", "triton", "cpu_int4", "reference"]
    assert dispatch.available_nf4_backends()[-1] == "reference"


def test_environment_variable_and_context_force_a_backend(monkeypatch):
    layer = gptq_layer(64, 32, 32)
    x = torch.randn(1, 64)
    monkeypatch.setenv(dispatch.ENV_VAR, "reference")
    assert dispatch.choose_backend(x, **layer) == "reference"
    with dispatch.forced("cpu_int4"):
        assert dispatch.choose_backend(x, **layer) == "cpu_int4"
    monkeypatch.setenv(dispatch.ENV_VAR, "nonsense")
    with pytest.raises(ValueError, match="not a known kernel"):
        dispatch.gptq_matmul(x, **layer)


def test_forcing_a_backend_that_cannot_run_the_layer_says_so():
    layer = gptq_layer(64, 32, 32, bits=3)
    with pytest.raises(ValueError, match="does not support"):
        dispatch.gptq_matmul(torch.randn(1, 64), **layer, force="cpu_int4")
    with pytest.raises(ValueError, match="does not support"):  # the CUDA GEMV needs a GPU
        dispatch.gptq_matmul(torch.randn(1, 64), **gptq_layer(64, 32, 32), force="cuda")


def test_fallback_to_reference_warns_once(monkeypatch):
    monkeypatch.setattr(dispatch, "_warned", set())
    layer = gptq_layer(64, 32, 32, bits=3)
    x = torch.randn(2, 64)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        y = dispatch.gptq_matmul(x, **layer)
        dispatch.gptq_matmul(x, **layer)
    assert len([w for w in caught if issubclass(w.category, RuntimeWarning)]) == 1
    assert "reference" in str(caught[0].message)
    from compress_kernels import reference

    assert rel_error(y, reference.gptq_matmul(x, **layer)) == 0


def test_lenient_forcing_leaves_what_the_backend_cannot_run_to_the_automatic_choice():
    layer = gptq_layer(64, 32, 32, bits=3)
    x = torch.randn(2, 64)
    with dispatch.forced("cpu_int4", strict=False):
        assert dispatch.choose_backend(x, **layer) == "reference"
        assert dispatch.choose_backend(x, **gptq_layer(64, 32, 32)) == "cpu_int4"
    with dispatch.forced("cpu_int4"), pytest.raises(ValueError, match="does not support"):
        dispatch.choose_backend(x, **layer)


def test_build_folders_per_source_and_stale_locks(tmp_path, monkeypatch):
    """Each version of the sources builds in its own folder; a lock left by a killed build is removed."""
    import os
    import time

    from compress_kernels.build import STALE_LOCK_SECONDS, build_directory

    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "ext"))
    a, b = tmp_path / "a.cpp", tmp_path / "b.cpp"
    a.write_text("int f() { return 1; }\n")
    b.write_text("int f() { return 2; }\n")
    fa, fb = build_directory("k", [str(a)], {}), build_directory("k", [str(b)], {})
    assert fa != fb and fa.parent == fb.parent == tmp_path / "ext" / "compress"
    assert build_directory("k", [str(a)], {"extra_cflags": ["-O3"]}) != fa
    lock = fa / "lock"
    lock.touch()
    build_directory("k", [str(a)], {})
    assert lock.exists()  # a build may be running: wait for it
    old = time.time() - STALE_LOCK_SECONDS - 60
    os.utime(lock, (old, old))
    build_directory("k", [str(a)], {})
    assert not lock.exists()


def test_layers_made_in_inference_mode_run_with_a_cache():
    """A model loaded inside torch.inference_mode has tensors without a version counter."""
    with torch.inference_mode():
        layer = gptq_layer(64, 32, 32)
        x = torch.randn(2, 64)
        cache = {}
        first = dispatch.gptq_matmul(x, **layer, cache=cache)
        again = dispatch.gptq_matmul(x, **layer, cache=cache)
    assert torch.equal(first, again)
