"""Retraining a pruned model with its masks kept fixed: fine-tuning on data, or distillation from the unpruned model.

Both go through the distillation trainer (compress.distill.trainer.distill): fine-tuning is distillation
with alpha 0 and no teacher (the task's own loss: next-token or masked-LM cross-entropy, or the class
labels), distillation adds the temperature-softened KL to the unpruned model's outputs. A callback
multiplies every pruned weight by its mask after each optimizer step, so a pruned weight is exactly
zero at every step whatever the optimizer's momentum and weight decay would do. With ``masks=None``
(structurally pruned models, which are smaller rather than sparse) it is ordinary training.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from ..config import check_numbers
from ..errors import CompressError
from ..models import LoadedModel

TASK_OF_KIND = {"causal": "causal", "masked": "mlm", "classifier": "classify", "embedding": "embed"}


@dataclass
class RetrainOptions:
    """How a pruned model is retrained.

    Args:
        data: training text: builtin, a .txt/.jsonl/.csv file, hf:NAME, or for classifiers a labeled
            file or ``demo``.
        steps: optimizer steps.
        distill: learn from the unpruned model's outputs (KL at ``temperature``, weight ``alpha``) as well
            as from the data; embedding models can only be retrained this way.
        learning_rate, batch_size, max_length, seed: as for distillation.
        labeled: a labeled held-out file for classifiers whose data has no test split.
        text_field, label_field: columns of data files.
    """

    data: str | None = None
    steps: int = 100
    distill: bool = False
    learning_rate: float = 5e-5
    batch_size: int = 8
    max_length: int = 128
    temperature: float = 2.0
    alpha: float = 0.5
    seed: int = 0
    labeled: str | None = None
    text_field: str = "text"
    label_field: str = "label"
    extra: dict = field(default_factory=dict)

    def __post_init__(self):
        check_numbers(self)
        if not self.data:
            raise CompressError("retraining needs training data: pass --data SRC (builtin, a text file, or hf:NAME)")
        if self.steps < 1:
            raise CompressError(f"--steps must be at least 1, got {self.steps}")
        if not self.learning_rate > 0:
            raise CompressError(f"--lr must be positive, got {self.learning_rate}")
        if self.batch_size < 1:
            raise CompressError(f"--batch-size must be at least 1, got {self.batch_size}")
        if not self.temperature > 0:
            raise CompressError(f"the distillation temperature must be greater than 0, got {self.temperature}")
        if not 0 <= self.alpha <= 1:
            raise CompressError(f"the distillation weight alpha must be in [0, 1], got {self.alpha}")


def masks_from_zeros(model: nn.Module, names: list[str]) -> dict[str, torch.Tensor]:
    """Keep-masks (weight != 0) of the named Linear layers of ``model``: what retraining must preserve."""
    return {name: model.get_submodule(name).weight.detach() != 0 for name in names}


class MaskedWeights:
    """Holds each pruned layer's weight with its keep-mask and zeroes the pruned entries on demand."""

    def __init__(self, model: nn.Module, masks: dict[str, torch.Tensor]):
        self.pairs = []
        for name, mask in masks.items():
            weight = model.get_submodule(name).weight
            if tuple(mask.shape) != tuple(weight.shape):
                raise CompressError(f"the mask of {name} has shape {tuple(mask.shape)} but its weight {tuple(weight.shape)}")
            self.pairs.append((weight, mask))

    @torch.no_grad()
    def apply(self) -> None:
        for weight, mask in self.pairs:  # masks may change in place (gradual pruning): never cache a copy
            weight.mul_(mask.to(weight.device))


def mask_callback(masked: MaskedWeights, on_step: Callable[[int], None] | None = None):
    """A TrainerCallback that re-applies the masks after every optimizer step (and before the first).

    ``on_step(global_step)`` runs first at each step end: the gradual schedule uses it to tighten the masks.
    """
    from transformers import TrainerCallback

    class KeepMasks(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            if on_step is not None:
                on_step(0)
            masked.apply()

        def on_step_end(self, args, state, control, **kwargs):
            if on_step is not None:
                on_step(state.global_step)
            masked.apply()

    return KeepMasks()


def retrain(loaded: LoadedModel, options: RetrainOptions, *, masks: dict[str, torch.Tensor] | None = None,
            teacher: LoadedModel | None = None, steps: int | None = None, on_step: Callable[[int], None] | None = None,
            device: str = "auto", progress: bool = True) -> dict:
    """Train ``loaded.model`` in place on ``options.data`` for ``steps`` (default options.steps) steps.

    Args:
        masks: module name -> bool keep-mask [out, in] of each pruned layer; pruned weights stay exactly
            zero. None: no mask (a structurally pruned model).
        teacher: the unpruned model, for ``options.distill``.
        on_step: called with the global step before the masks are applied (gradual pruning).

    Returns the trainer's metrics (train_loss, ...).
    """
    from ..config import DistillConfig
    from ..distill.trainer import distill

    task = TASK_OF_KIND[loaded.kind]
    if task == "embed" and not options.distill:
        raise CompressError("an embedding model has no training loss of its own; retrain it with --distill")
    if options.distill and teacher is None:
        raise CompressError("--distill needs the unpruned model as the teacher")
    config = DistillConfig(task=task, alpha=options.alpha if options.distill else 0.0, temperature=options.temperature,
                           steps=steps or options.steps, batch_size=options.batch_size,
                           learning_rate=options.learning_rate, max_length=options.max_length, seed=options.seed,
                           save_steps=10**9, logging_steps=max(1, (steps or options.steps) // 5), evaluate=False,
                           warmup_ratio=0.0)
    data = task_data(loaded, task, options, config)
    masked = MaskedWeights(loaded.model, masks or {})
    loaded.model.train()
    with tempfile.TemporaryDirectory(prefix="compress-retrain-") as work:
        result = distill(teacher if options.distill else None, loaded.model, data, config, output_dir=Path(work),
                         tokenizer=loaded.tokenizer, teacher_pooling=getattr(teacher, "pooling", None) or loaded.pooling,
                         callbacks=[mask_callback(masked, on_step)], device=device, progress=progress)
    loaded.model.eval()
    masked.apply()
    return dict(result.metrics)


def task_data(loaded: LoadedModel, task: str, options: RetrainOptions, config):
    """The training examples of ``task`` from ``options.data``, tokenized with the model's tokenizer."""
    from ..distill.data import classification_data, embedding_data, lm_data

    tok = loaded.tokenizer
    if task in ("causal", "mlm"):
        if tok.pad_token is None:
            tok.pad_token = tok.eos_token
        # one pass over steps x batch windows: tokenizing more of the data than that buys nothing
        return lm_data(task, tok, options.data, options.max_length, text_field=options.text_field,
                       max_samples=config.steps * config.batch_size)
    if task == "classify":
        label2id = dict(loaded.model.config.label2id)
        return classification_data(tok, options.data, label2id, loaded.model.config.num_labels, options.max_length,
                                   eval_source=options.labeled, text_field=options.text_field,
                                   label_field=options.label_field)
    return embedding_data(tok, options.data, options.max_length, options.text_field)
