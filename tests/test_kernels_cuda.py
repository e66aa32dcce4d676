"""The CUDA C++ int4 GEMV (compress_kernels.cuda): its sources compile with the local toolkit (this
catches build errors on machines without a GPU), its load-time form is right, and on a GPU it matches
the reference (relative error 2e-3 in float16, 1e-2 in bfloat16, against a float64 reference)."""

import os
import shutil
import subprocess
import sysconfig
from pathlib import Path

import pytest
import torch

from compress_kernels import dispatch, reference
from compress_kernels.cuda import gemv
from kernel_layers import gptq_layer, rel_error


def _nvcc() -> str | None:
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    candidates = [shutil.which("nvcc"), home and str(Path(home) / "bin" / "nvcc"), "/usr/local/cuda/bin/nvcc"]
    return next((c for c in candidates if c and Path(c).exists()), None)


@pytest.mark.skipif(_nvcc() is None, reason="no CUDA toolkit (nvcc) on this machine")
def test_gemv_kernel_compiles_with_nvcc(tmp_path):
    for arch in ("sm_80", "sm_90"):  # A100 and H100/H200
        cmd = [_nvcc(), "-std=c++17", "-O3", f"-arch={arch}", "-c", str(gemv.SOURCES[1]), "-o", str(tmp_path / f"{arch}.o")]
        done = subprocess.run(cmd, capture_output=True, text=True)
        assert done.returncode == 0, done.stderr
        assert (tmp_path / f"{arch}.o").stat().st_size > 0


@pytest.mark.skipif(shutil.which("c++") is None, reason="no C++ compiler")
def test_gemv_binding_compiles_against_torch_headers():
    from torch.utils.cpp_extension import include_paths

    cmd = ["c++", "-std=c++17", "-fsyntax-only", "-DTORCH_EXTENSION_NAME=compress_gemv_int4",
           f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}",
           *[f"-I{p}" for p in include_paths()], f"-I{sysconfig.get_paths()['include']}", str(gemv.SOURCES[0])]
    done = subprocess.run(cmd, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


def test_gemv_load_time_form_sorts_groups_and_refuses_what_it_cannot_read():
    layer = gptq_layer(200, 72, 32, act_order=True)
    w = gemv.prepare(**layer)
    assert w is not None and w.perm is not None and w.g_idx.numel() == 200
    assert bool((w.g_idx[1:] >= w.g_idx[:-1]).all())
    # the repacked codes with the sorted g_idx are the same weight with its columns in perm order
    dense = reference.gptq_dequantize(w.qweight, w.qzeros, w.scales, w.g_idx, 4, 1, torch.float32)
    expect = reference.gptq_dequantize(layer["qweight"], layer["qzeros"], layer["scales"], layer["g_idx"], 4, 1,
                                       torch.float32)
    assert torch.equal(dense, expect[:, w.perm])
    assert gemv.prepare(**gptq_layer(96, 50, 32)) is None      # N not a multiple of 4
    assert gemv.prepare(**gptq_layer(96, 48, 12)) is None      # groups end inside a packed word
    assert gemv.prepare(**gptq_layer(96, 48, 32, bits=8)) is None


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("layout", [(4096, 4096, 128, False), (1000, 344, 32, True), (96, 24, -1, False)])
def test_gemv_matches_reference_on_gpu(layout):
    k, n, group, act = layout
    layer = gptq_layer(k, n, group, act_order=act, sym=False)
    x = torch.randn(1, k)
    ref = reference.gptq_matmul(x.double(), **{**layer, "scales": layer["scales"].double(), "bias": layer["bias"].double()})
    on_gpu = {key: v.cuda() if isinstance(v, torch.Tensor) else v for key, v in layer.items()}
    for dtype, bound in ((torch.float16, 2e-3), (torch.bfloat16, 1e-2)):
        y = dispatch.gptq_matmul(x.to("cuda", dtype), **on_gpu, force="cuda")
        assert rel_error(y.cpu(), ref) < bound


def test_cuda_is_not_used_without_a_gpu():
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    assert not gemv.available()
