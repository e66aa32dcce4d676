"""Distillation: temperature-scaled teacher-to-student training on the Hugging Face Trainer.

- losses.py: the loss terms as pure functions (soft targets with T^2, hidden-state MSE, attention KL,
  cosine, in-batch similarity KD).
- students.py: students derived from their teacher (kept layers, narrower widths), vocabulary checks.
- data.py: tokenized examples and collators for the four tasks (classify, mlm, causal, embed).
- objective.py: the student plus its projections, whose forward computes the loss.
- trainer.py: DistillTrainer (a transformers Trainer) and ``distill(teacher, student, data, config)``,
  the entry point pruning and quantization-aware training reuse.
- pipeline.py: folder in, folder out (``distill_model``, ``finetune_model``), behind the CLI.

The names below resolve lazily, so importing this package does not import transformers::

    from compress.distill import distill, derive_student, classification_data
"""

from __future__ import annotations

from ..lazy import lazy_exports

_EXPORTS = {
    "distill": "trainer", "DistillTrainer": "trainer", "DistillResult": "trainer", "save_student": "trainer",
    "load_student_state": "trainer", "DistillationModel": "objective", "derive_student": "students",
    "DerivedStudent": "students", "evenly_spaced": "students", "check_vocabularies": "students",
    "TaskData": "data", "classification_data": "data", "lm_data": "data", "embedding_data": "data",
    "distill_model": "pipeline", "finetune_model": "pipeline", "TrainReport": "pipeline",
}

__all__ = sorted(_EXPORTS)


__getattr__ = lazy_exports(__name__, {name: (f"{__name__}.{module}", name) for name, module in _EXPORTS.items()})
