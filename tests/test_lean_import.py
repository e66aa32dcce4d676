"""Importing compress stays cheap: no optional backend, no transformers, no CUDA initialization."""

import subprocess
import sys

CHECK = """
import sys, torch
import compress, compress_kernels, compress_kernels.dispatch
heavy = [m for m in ("triton", "bitsandbytes", "llama_cpp", "transformers", "gguf", "datasets", "matplotlib")
         if m in sys.modules]
assert not heavy, heavy
assert not torch.cuda.is_initialized()
print("lean")
"""


def test_import_is_lean():
    proc = subprocess.run([sys.executable, "-c", CHECK], capture_output=True, text=True)
    assert proc.returncode == 0 and proc.stdout.strip() == "lean", proc.stderr


def test_public_api_resolves_lazily():
    import compress

    assert callable(compress.quantize) and callable(compress.load) and callable(compress.compare)
    assert set(compress.__all__) >= {"quantize", "load", "compare", "RTNConfig", "EvalConfig", "CompressError"}
