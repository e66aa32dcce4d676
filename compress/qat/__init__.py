"""Quantization-aware training: fake-quant layers for any training loop, then the same packed formats.

- fake.py: FakeQuantLinear (int 2/3/4/8 per-group with straight-through rounding, optionally
  learnable LSQ scales; NF4 blockwise exactly as the NF4 quantizer rounds) and per-token int8
  activation fake-quant.
- core.py: ``prepare(model, QATConfig)`` swaps the block Linears, ``QATCallback`` (Hugging Face
  Trainer: fake-quant on after warm-up, ranges frozen near the end), ``convert(model, out)`` writes a
  GPTQ-format or bitsandbytes-layout NF4 checkpoint the existing loaders, kernels and GGUF export read.
- pipeline.py: folder in, folder out (``qat_model``), behind ``compress qat``.
- lora.py: adapter recovery: LoRA adapters (peft) trained on a frozen NF4 or int4 model, saved on
  their own or merged and re-quantized.

The names below resolve lazily, so importing this package does not import transformers::

    from compress.qat import prepare, convert, QATCallback
"""

from __future__ import annotations

from ..lazy import lazy_exports

_EXPORTS = {
    "FakeQuantLinear": "fake", "ActivationFakeQuant": "fake",
    "prepare": "core", "convert": "core", "QATCallback": "core", "set_fake_quant": "core", "freeze_ranges": "core",
    "qat_model": "pipeline", "QATReport": "pipeline",
    "attach_lora": "lora", "recover_model": "lora", "merge_adapters": "lora", "LoraRecoveryConfig": "lora",
}

__all__ = sorted(_EXPORTS)


__getattr__ = lazy_exports(__name__, {name: (f"{__name__}.{module}", name) for name, module in _EXPORTS.items()})
