"""The harness's report: one row per model, printed as an aligned table, Markdown, JSON or a plot."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

MB = 1e6


@dataclass
class ModelResult:
    """Everything measured for one model. Sizes in bytes, times in the units their names say."""

    name: str
    path: str
    kind: str
    quantization: str
    weights_bytes: int
    folder_bytes: int
    bits_per_weight: float | None
    params: int
    peak_bytes: int | None
    latency: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0


def _num(fmt: str) -> Callable[[Any], str]:
    return lambda v: "-" if v is None else format(v, fmt)


# header, how to read the value from a result, how to print it
COLUMNS: list[tuple[str, Callable[[ModelResult], Any], Callable[[Any], str]]] = [
    ("model", lambda r: r.name, str),
    ("quant", lambda r: r.quantization, str),
    ("size MB", lambda r: r.weights_bytes / MB, _num(".1f")),
    ("bits/w", lambda r: r.bits_per_weight, _num(".3f")),
    ("params M", lambda r: r.params / 1e6, _num(".2f")),
    ("peak MB", lambda r: None if r.peak_bytes is None else r.peak_bytes / MB, _num(".0f")),
    ("prefill ms", lambda r: r.latency.get("prefill_ms"), _num(".1f")),
    ("decode tok/s", lambda r: r.latency.get("decode_tok_s"), _num(".1f")),
    ("batch ms", lambda r: r.latency.get("batch_ms"), _num(".1f")),
    ("ppl", lambda r: r.metrics.get("perplexity"), _num(".3f")),
    ("mlm ppl", lambda r: r.metrics.get("mlm_perplexity"), _num(".3f")),
    ("mlm acc", lambda r: r.metrics.get("mlm_accuracy"), _num(".4f")),
    ("accuracy", lambda r: r.metrics.get("accuracy"), _num(".4f")),
    ("agree", lambda r: r.metrics.get("agreement"), _num(".4f")),
    ("cosine", lambda r: r.metrics.get("cosine"), _num(".4f")),
    ("top1 agree", lambda r: r.metrics.get("retrieval_agreement"), _num(".4f")),
    ("recall@1", lambda r: r.metrics.get("recall_at_1"), _num(".4f")),
    ("KL", lambda r: r.metrics.get("kl"), _num(".5f")),
]

# the accuracy figure plotted against size, per kind, and whether lower is better
PRIMARY = {"causal": ("perplexity", True), "masked": ("mlm_perplexity", True),
           "embedding": ("cosine", False), "classifier": ("accuracy", False)}


@dataclass
class Report:
    """Side-by-side results; the first model is the reference for KL, cosine and agreement."""

    results: list[ModelResult]
    device: str
    config: dict[str, Any] = field(default_factory=dict)

    def _columns(self):
        return [c for c in COLUMNS if any(c[1](r) is not None for r in self.results)]

    def rows(self) -> list[list[str]]:
        cols = self._columns()
        return [[h for h, _, _ in cols]] + [[fmt(get(r)) for _, get, fmt in cols] for r in self.results]

    def table(self) -> str:
        """An aligned plain-text table (text columns left-aligned, numbers right-aligned)."""
        rows = self.rows()
        widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
        lines = []
        for n, row in enumerate(rows):
            cells = [c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))]
            lines.append("  ".join(cells).rstrip())
            if n == 0:
                lines.append("  ".join("-" * w for w in widths))
        lines.append(self.footnote())
        return "\n".join(lines)

    def footnote(self) -> str:
        notes = []
        for r in self.results:
            if "batch" in r.latency:
                notes.append(f"batch ms: one forward pass of {r.latency['batch']} tokens")
                break
        for r in self.results:
            if "prefill_tokens" in r.latency:
                notes.append(f"prefill: {r.latency['prefill_tokens']} tokens at batch 1")
                break
        for r in self.results:
            by_kernel = r.latency.get("decode_tok_s_by_kernel")
            if by_kernel:
                notes.append(f"{r.name} decode tok/s by kernel: " + ", ".join(f"{k} {v:.1f}" for k, v in by_kernel.items()))
        notes.append(f"device {self.device}; KL, cosine and agreement are against the first row")
        return "(" + "; ".join(notes) + ")"

    def markdown(self) -> str:
        rows = self.rows()
        out = ["| " + " | ".join(rows[0]) + " |", "|" + "|".join("---" for _ in rows[0]) + "|"]
        out += ["| " + " | ".join(row) + " |" for row in rows[1:]]
        return "\n".join(out)

    def to_dict(self) -> dict:
        return {"device": self.device, "config": self.config, "results": [asdict(r) for r in self.results]}

    def write_json(self, path: str | Path) -> None:
        """The results as JSON, with compress's output marker (so a later --json may replace the file)."""
        from ..outputs import REPORT_KEY, output_marker

        data = {**self.to_dict(), REPORT_KEY: output_marker("eval")}
        Path(path).write_text(json.dumps(data, indent=2, default=str) + "\n")

    def plot(self, path: str | Path) -> None:
        """Accuracy against size on disk, one labelled point per model, saved as PNG, PDF or SVG (by suffix)."""
        import matplotlib

        matplotlib.use("Agg", force=True)
        import matplotlib.pyplot as plt

        kind = self.results[0].kind
        key, lower_better = PRIMARY[kind]
        if kind == "embedding":  # the reference has no cosine to itself: it is 1 by definition
            points = [(r.weights_bytes / MB, 1.0 if i == 0 else r.metrics.get(key), r.name) for i, r in enumerate(self.results)]
        else:
            points = [(r.weights_bytes / MB, r.metrics.get(key), r.name) for r in self.results]
        points = [p for p in points if p[1] is not None]
        fig, ax = plt.subplots(figsize=(7, 4.5))
        ax.scatter([p[0] for p in points], [p[1] for p in points])
        for x, y, label in points:
            ax.annotate(label, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
        ax.set_xlabel("weights on disk (MB)")
        ax.set_ylabel(f"{key} ({'lower' if lower_better else 'higher'} is better)")
        ax.set_title(f"accuracy against size ({kind} models)")
        ax.grid(alpha=0.3)
        fig.tight_layout()
        from .. import __version__
        from ..outputs import PLOT_MARK

        fig.savefig(path, dpi=120, metadata={"Creator": f"{PLOT_MARK} {__version__}"})
        plt.close(fig)
