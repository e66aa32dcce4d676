"""Folder in, folder out: quantization-aware training behind ``compress qat``.

The model is loaded in float32, its block Linears are swapped for fake-quant layers, it is trained with
the distillation trainer (plain training on the task's own loss, or distillation from the unquantized
model with ``distill``) and converted to the packed format. The task follows the model's kind: causal
LM on text windows, masked LM, sequence classification on labeled data, or embedding models, which
learn the float model's embeddings (always distilled).
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .. import __version__
from ..config import DistillConfig
from ..errors import CompressError
from ..outputs import checkpoints_in, remove_checkpoints
from ..models import detect_kind, load, read_config_dict, resolve_model_path
from .config import QATConfig

KIND_TASK = {"classifier": "classify", "masked": "mlm", "causal": "causal", "embedding": "embed"}


@dataclass
class QATReport:
    """What a quantization-aware training run did."""

    source: Path
    output: Path
    config: dict
    task: str
    distilled: bool
    seconds: float
    examples: int
    layers: int
    metrics: dict = field(default_factory=dict)
    eval_file: Path | None = None
    enabled_at: int | None = None
    frozen_at: int | None = None

    def summary(self) -> str:
        loss = f", mean training loss {self.metrics['train_loss']:.4f}" if "train_loss" in self.metrics else ""
        how = "distilled from the float model" if self.distilled else "on the task loss"
        frozen = f", ranges frozen at step {self.frozen_at}" if self.frozen_at is not None else ""
        return (f"quantization-aware training of {self.layers} layers ({self.config['label']}) {how} on "
                f"{self.examples} {self.task} examples in {self.seconds:.0f} s{loss}{frozen} -> {self.output}")


def train_config(kind: str, train: DistillConfig | None, distill: bool) -> DistillConfig:
    """The DistillConfig for the model's kind: alpha 0 (task loss only) unless distilling."""
    task = KIND_TASK[kind]
    fields = dataclasses.asdict(train) if train is not None else {}
    fields["task"] = task
    if not distill and task != "embed":
        fields.update(alpha=0.0, hidden_weight=0.0, attn_weight=0.0, cosine_weight=0.0)
    elif task != "embed" and fields.get("alpha", 0.5) == 0:
        fields["alpha"] = 0.5
    return DistillConfig(**fields)


def qat_model(model_path, out, config: QATConfig, *, train: DistillConfig | None = None, data: str | None = None,
              distill: bool = False, labeled: str | None = None, text_field: str = "text", label_field: str = "label",
              transfer: str | None = None, blocks: str | None = None, checkpoints=None, keep_checkpoints: bool = False,
              overwrite: bool = False, device: str = "auto", trust_remote_code: bool = False,
              progress: bool = True) -> QATReport:
    """Train the model folder ``model_path`` with fake quantization and write the packed result to ``out``.

    Args:
        config: what is simulated and written (QATConfig).
        train: steps, batch size, learning rate, sequence length, and the distillation loss weights when
            ``distill`` (its task is set from the model's kind).
        data: training data (builtin, a text/.jsonl/.csv file, demo, hf:NAME); labeled for classifiers.
        distill: learn from the unquantized model's outputs (temperature-scaled KL plus the task loss).
        labeled: held-out labeled data for a classifier's accuracy during training.
        transfer: classifiers, with ``distill``: unlabeled texts (demo, or any text source) that only the
            distillation term learns from, as a transfer set.
        checkpoints: the checkpoint folder (default ``<out>.checkpoints``), removed after a successful
            run unless ``keep_checkpoints`` (only what compress wrote there; see compress.outputs).
    """
    from ..distill.pipeline import _library_bars, _prepare_paths, _task_data
    from ..distill.trainer import distill as run_training
    from .core import QATCallback, convert, fake_layers, prepare

    start = time.perf_counter()
    _library_bars(progress)
    if data is None or not str(data).strip():
        raise CompressError("--data is required: the text (or labeled examples) the model trains on")
    source = resolve_model_path(model_path)
    out, ckdir = _prepare_paths(out, checkpoints, overwrite, False, [source, data, labeled, transfer])
    config_dict = read_config_dict(source)
    if config_dict.get("quantization_config"):
        raise CompressError(f"model {source.name} is already quantized; quantization-aware training starts from a "
                            f"full-precision model (for adapters on a quantized model use --lora)")
    kind = detect_kind(source, config_dict)
    tcfg = train_config(kind, train, distill)
    if transfer is not None and (tcfg.task != "classify" or not tcfg.needs_teacher):
        raise CompressError("--transfer-data adds unlabeled texts for a classifier distilled from its float model: "
                            "it needs a classifier and --distill")
    if tcfg.task == "classify":
        from ..distill.pipeline import _precheck_labeled

        _precheck_labeled(data, labeled, text_field, label_field)
    torch.manual_seed(tcfg.seed)
    student = load(source, kind=kind, device="cpu", dtype=torch.float32, trust_remote_code=trust_remote_code)
    teacher = None
    if tcfg.needs_teacher:
        teacher = load(source, kind=kind, device="cpu", dtype=torch.float32, trust_remote_code=trust_remote_code)
    model = prepare(student.model.train(), config, blocks=blocks)
    label2id = num_labels = None
    if kind == "classifier":
        label2id = {str(k): int(v) for k, v in (model.config.label2id or {}).items()}
        num_labels = model.config.num_labels
    task_data = _task_data(tcfg.task, student.tokenizer, tcfg, data, label2id, num_labels, labeled, text_field,
                           label_field, transfer)
    callback = QATCallback(config)
    with checkpoints_in(ckdir):
        result = run_training(teacher, model, task_data, tcfg, output_dir=ckdir, tokenizer=student.tokenizer,
                              teacher_pooling=student.pooling, student_pooling=student.pooling, callbacks=[callback],
                              device=device, progress=progress)
    model = model.to("cpu").eval()
    info = {"compress_version": __version__, "source": str(source), "data": data, "distill": bool(tcfg.needs_teacher),
            "qat": config.to_dict(), "training": tcfg.to_dict(), "metrics": result.metrics}
    convert(model, out, source=source, overwrite=overwrite, info=info)
    if not keep_checkpoints:
        remove_checkpoints(ckdir)
    return QATReport(source=source, output=out, config={**config.to_dict(), "label": config.label}, task=tcfg.task,
                     distilled=tcfg.needs_teacher, seconds=time.perf_counter() - start, examples=len(task_data.train),
                     layers=len(fake_layers(model)), metrics=result.metrics, eval_file=task_data.eval_file,
                     enabled_at=callback.enabled_at, frozen_at=callback.frozen_at)
