"""compress: make transformer models smaller and faster, and prove it.

The public API is re-exported here lazily, so ``import compress`` stays cheap: it imports torch but
not transformers, triton, bitsandbytes or llama_cpp, and never initializes CUDA.
"""

from __future__ import annotations

__version__ = "0.1.0"

_EXPORTS = {
    "CompressError": ("compress.errors", "CompressError"),
    "load": ("compress.models", "load"),
    "LoadedModel": ("compress.models", "LoadedModel"),
    "quantize": ("compress.quant.apply", "quantize"),
    "QuantizeReport": ("compress.quant.apply", "QuantizeReport"),
    "RTNConfig": ("compress.config", "RTNConfig"),
    "NF4Config": ("compress.config", "NF4Config"),
    "EvalConfig": ("compress.config", "EvalConfig"),
    "evaluate": ("compress.eval.harness", "compare"),
    "compare": ("compress.eval.harness", "compare"),
    "QuantLinear": ("compress.quant.linear", "QuantLinear"),
    "DistillConfig": ("compress.config", "DistillConfig"),
    "FinetuneConfig": ("compress.config", "FinetuneConfig"),
    "StudentConfig": ("compress.config", "StudentConfig"),
    "distill_model": ("compress.distill.pipeline", "distill_model"),
    "finetune_model": ("compress.distill.pipeline", "finetune_model"),
    "NF4Linear": ("compress.quant.nf4_linear", "NF4Linear"),
    "export_gguf": ("compress.gguf.writer", "export_gguf"),
}

__all__ = sorted(_EXPORTS) + ["__version__"]


def __getattr__(name: str):
    if name in _EXPORTS:
        import importlib

        module, attr = _EXPORTS[name]
        value = getattr(importlib.import_module(module), attr)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'compress' has no attribute {name!r}")


def __dir__():
    return __all__
