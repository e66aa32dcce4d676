"""The evaluation harness: metrics, measurements, per-kind evaluation and the side-by-side report."""
