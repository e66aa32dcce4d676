"""GGUF export for llama.cpp: architecture mapping, tokenizer metadata, k-quant encoders, the streaming writer.

``export_gguf(model_folder, "out.gguf", "q4_k_m")`` is the entry point; ``compress export gguf`` calls it.
The way back, a GGUF file read into a model folder (``compress import``, ``--model FILE.gguf``), is
:mod:`compress.gguf.importer`.
Heavy libraries (gguf, numpy encoders, llama_cpp) are imported inside functions.
"""

from __future__ import annotations


def export_gguf(*args, **kwargs):
    """See :func:`compress.gguf.writer.export_gguf`."""
    from .writer import export_gguf as run

    return run(*args, **kwargs)


__all__ = ["export_gguf"]
