"""Pruning: unstructured and N:M masks (magnitude, Wanda, SparseGPT), compressed sparse storage,
schedules (one-shot, cubic, iterative) and retraining with the masks fixed.

Entry points (import them from their modules; nothing here imports torch-heavy code):

- compress.prune.pipeline.prune(model, out, PruneConfig): one-shot, file to file.
- compress.prune.schedule.run_schedule(model, out, PruneConfig, schedule=..., options=RetrainOptions):
  with retraining, gradual or iterative.
- compress.prune.sparse_format: the bitmask + values storage that compress.load reads back.
"""
