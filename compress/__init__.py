"""compress: make transformer models smaller and faster, and prove it.

The public API is re-exported here lazily, so ``import compress`` stays cheap: it imports torch but
not transformers, triton, bitsandbytes or llama_cpp, and never initializes CUDA.
"""

from __future__ import annotations

import logging

from .lazy import lazy_exports

__version__ = "0.1.0"

# transformers' Trainer imports bitsandbytes (directly, and through peft) when it is installed; its CPU
# backend then logs a warning about an optional kernel package compress never uses, which would be the
# one stray line on stderr of every training command
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)

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


__getattr__ = lazy_exports(__name__, _EXPORTS)


def __dir__():
    return __all__
