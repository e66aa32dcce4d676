"""Distillation: temperature-scaled teacher-to-student training on the Hugging Face Trainer.

- losses.py: the loss terms as pure functions (soft targets with T^2, hidden-state MSE, attention KL,
  cosine, in-batch similarity KD).
- students.py: students derived from their teacher (kept layers, narrower widths), vocabulary checks.
- data.py: tokenized examples and collators for the four tasks (classify, mlm, causal, embed).
- objective.py: the student plus its projections, whose forward computes the loss.
- trainer.py: DistillTrainer (a transformers Trainer) and ``distill(teacher, student, data, config)``,
  the entry point pruning and quantization-aware training reuse.
- pipeline.py: folder in, folder out (``distill_model``, ``finetune_model``), behind the CLI.

Importing this package is cheap; the submodules import transformers.
"""
