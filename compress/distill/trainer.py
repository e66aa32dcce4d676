"""Distillation on the Hugging Face Trainer: one Python entry point, :func:`distill`, for every student.

:class:`DistillTrainer` is a ``transformers.Trainer`` whose model is a :class:`DistillationModel` (the
student plus its projections). For each batch it runs the teacher in eval mode under ``no_grad`` and
hands its outputs to the model's forward, which returns the loss. The teacher is an attribute of the
trainer, not of the model, so ``accelerate launch`` can wrap the model with DDP, FSDP or DeepSpeed while
the frozen teacher stays whole on each device (a full copy per process, never sharded or synchronised).

Checkpoints (every ``save_steps``) are ordinary Trainer checkpoints: the student as a model folder that
``from_pretrained`` loads, the tokenizer, the projections (``distill_heads.safetensors``), optimizer,
scheduler, RNG and trainer state; ``resume=True`` continues from the newest one exactly where it stopped.

Any student works: a model derived here, one loaded from a folder, a pruned model whose masks a
callback keeps fixed, or a model with fake-quantized layers for quantization-aware training, as long as
it is called like a transformers model (``input_ids``, ``attention_mask``, ``output_hidden_states`` ...)
and returns ``logits`` (or a last hidden state for the embed task).
"""

from __future__ import annotations

import json
import os
import sys
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import Trainer, TrainerCallback, TrainingArguments
from transformers.trainer_callback import PrinterCallback, ProgressCallback

from ..config import DistillConfig, TrainingConfig
from ..errors import CompressError
from ..models import LoadedModel, Pooling, resolve_device
from .data import TaskData
from .objective import DistillationModel, Widths, check_layer_map, last_hidden
from .students import DerivedStudent, TokenMap, uniform_layer_map

HEADS_FILE = "distill_heads.safetensors"
STUDENT_FILE = "student.safetensors"  # students that are not transformers models


class DistillTrainer(Trainer):
    """A Trainer whose loss comes from a frozen teacher and a :class:`DistillationModel`.

    Args (besides the Trainer's own):
        teacher: the frozen teacher (None trains on hard targets alone).
        teacher_pooling: pooling of the teacher's token states (embed task).
        token_map: a vocabulary map when the student's vocabulary differs from the teacher's.
    """

    def __init__(self, *args, teacher: nn.Module | None = None, teacher_pooling: Pooling | None = None,
                 token_map: TokenMap | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.teacher = teacher
        self.teacher_pooling = teacher_pooling or Pooling("mean", False)
        self.lookup = None
        if teacher is not None:
            teacher.eval()
            teacher.requires_grad_(False)
            teacher.to(self.args.device)
        if token_map is not None:
            self.lookup = token_map.lookup.to(self.args.device)
        self._parts: dict[str, list[torch.Tensor]] = defaultdict(list)

    # ---- the loss --------------------------------------------------------------------------------

    @torch.no_grad()
    def teacher_signals(self, inputs: dict[str, torch.Tensor]) -> dict[str, Any]:
        """The teacher's outputs for a batch: logits (or a pooled embedding), hidden states, attentions."""
        cfg: DistillConfig = self.model_config
        ids = inputs["input_ids"]
        if self.lookup is not None:
            ids = self.lookup[ids]
        kwargs = {"input_ids": ids}
        for key in ("attention_mask", "token_type_ids"):
            if inputs.get(key) is not None:
                kwargs[key] = inputs[key]
        if cfg.hidden_weight > 0 or cfg.cosine_weight > 0:
            kwargs["output_hidden_states"] = True
        if cfg.attn_weight > 0:
            kwargs["output_attentions"] = True
        self.teacher.eval()  # whatever a callback did, the teacher never trains (no dropout)
        out = self.teacher(**kwargs)
        signals: dict[str, Any] = {}
        if cfg.task == "embed":
            mask = inputs.get("attention_mask")
            mask = mask if mask is not None else torch.ones_like(ids)
            signals["embedding"] = self.teacher_pooling(last_hidden(out), mask)
        else:
            signals["logits"] = out.logits
        if kwargs.get("output_hidden_states"):
            signals["hidden_states"] = out.hidden_states
        if kwargs.get("output_attentions"):
            signals["attentions"] = out.attentions
        return signals

    @property
    def model_config(self) -> DistillConfig:
        return self.accelerator.unwrap_model(self.model).distill_config

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        teacher = self.teacher_signals(inputs) if self.teacher is not None else None
        outputs = model(**inputs, teacher=teacher)
        if model.training:
            for k, v in self.accelerator.unwrap_model(model).last_parts.items():
                self._parts[k].append(v)
        return (outputs["loss"], outputs) if return_outputs else outputs["loss"]

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """Adds the mean of each unweighted loss term since the last log (soft, hard, hidden, attn, cos)."""
        if "loss" in logs and self._parts:
            for k, values in self._parts.items():
                logs[f"loss_{k}"] = round(float(torch.stack(values).float().mean()), 4)
            self._parts.clear()
        super().log(logs, start_time)

    # ---- saving and resuming ----------------------------------------------------------------------

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        """Save the student alone, as a model folder (the projections go with checkpoints only)."""
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        if not self.args.should_save:
            return
        os.makedirs(output_dir, exist_ok=True)
        wrapper = self.accelerator.unwrap_model(self.model)
        if state_dict is not None and not state_dict:
            # DeepSpeed ZeRO-3 without stage3_gather_16bit_weights_on_model_save hands over nothing to save
            return
        if state_dict is None:
            state_dict = wrapper.state_dict()
        student_state = {k[len("student."):]: v for k, v in state_dict.items() if k.startswith("student.")}
        if not student_state:  # a state dict of the bare student
            student_state = state_dict
        save_student(wrapper.student, output_dir, student_state)
        if self.processing_class is not None:
            self.processing_class.save_pretrained(output_dir)
        torch.save(self.args, os.path.join(output_dir, "training_args.bin"))

    def _save_optimizer_and_scheduler(self, output_dir: str) -> None:
        # the projections are written with the optimizer, before trainer_state.json marks the checkpoint complete
        super()._save_optimizer_and_scheduler(output_dir)
        wrapper = self.accelerator.unwrap_model(self.model)
        if len(wrapper.heads) and self.args.should_save and not self.is_fsdp_enabled:
            from safetensors.torch import save_file

            state = {k: v.detach().cpu().contiguous() for k, v in wrapper.heads.state_dict().items()}
            save_file(state, os.path.join(output_dir, HEADS_FILE))

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: nn.Module | None = None) -> None:
        if self.is_fsdp_enabled:  # FSDP checkpoints hold the whole wrapper in FSDP's own format
            return super()._load_from_checkpoint(resume_from_checkpoint, model)
        wrapper = self.accelerator.unwrap_model(model if model is not None else self.model)
        load_student_state(wrapper.student, Path(resume_from_checkpoint))
        heads = Path(resume_from_checkpoint) / HEADS_FILE
        if len(wrapper.heads):
            if not heads.is_file():
                raise CompressError(f"checkpoint {resume_from_checkpoint} has no {HEADS_FILE} for the distillation projections")
            from safetensors.torch import load_file

            wrapper.heads.load_state_dict(load_file(str(heads), device="cpu"))


def save_student(student: nn.Module, folder: str | os.PathLike, state_dict: dict | None = None) -> None:
    """Write a student into ``folder``: save_pretrained for transformers models, else student.safetensors."""
    from transformers import PreTrainedModel

    if isinstance(student, PreTrainedModel):
        student.save_pretrained(folder, state_dict=state_dict)
        return
    from safetensors.torch import save_file

    state = state_dict if state_dict is not None else student.state_dict()
    # cloning separates tied tensors, which safetensors refuses to store twice
    save_file({k: v.detach().cpu().contiguous().clone() for k, v in state.items()}, str(Path(folder) / STUDENT_FILE))


def load_student_state(student: nn.Module, folder: Path) -> None:
    """Load weights written by :func:`save_student` back into ``student`` (tied weights re-tied)."""
    from safetensors.torch import load_file

    files = [folder / STUDENT_FILE] if (folder / STUDENT_FILE).is_file() else sorted(folder.glob("model*.safetensors"))
    if not files:
        raise CompressError(f"checkpoint {folder} has no student weights")
    state = {}
    for f in files:
        state.update(load_file(str(f), device="cpu"))
    result = student.load_state_dict(state, strict=False)
    tied = set()
    if hasattr(student, "tie_weights"):
        student.tie_weights()
        ptrs = defaultdict(list)
        for name, p in student.named_parameters(remove_duplicate=False):
            ptrs[p.data_ptr()].append(name)
        tied = {n for names in ptrs.values() if len(names) > 1 for n in names}
    missing = [k for k in result.missing_keys if k not in tied]
    if missing:
        raise CompressError(f"checkpoint {folder} lacks the student tensor {missing[0]} ({len(missing)} missing)")


class LogLines(TrainerCallback):
    """One line per log on stderr (the main process only): step, loss and its terms, learning rate."""

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or not logs:
            return
        from tqdm.auto import tqdm

        shown = []
        for key, value in logs.items():
            if key in ("total_flos", "epoch") or key.endswith(("_runtime", "_per_second")):
                continue
            shown.append(f"{key} {value:.4g}" if isinstance(value, float) else f"{key} {value}")
        epoch = f" epoch {logs['epoch']:.2f}" if isinstance(logs.get("epoch"), (int, float)) else ""
        tqdm.write(f"step {state.global_step}/{state.max_steps}{epoch}: " + ", ".join(shown), file=sys.stderr)


class QuietProgress(ProgressCallback):
    """transformers' progress bars without their dict printouts (LogLines reports the logs)."""

    def on_log(self, args, state, control, logs=None, **kwargs):
        return


# --------------------------------------------------------------------------------------------------
# The entry point


@dataclass
class DistillResult:
    """What :func:`distill` returns.

    Attributes:
        student: the trained student (unwrapped, on the training device).
        trainer: the DistillTrainer, for saving (``save(folder)``) or further evaluation.
        metrics: the Trainer's training metrics (train_loss, train_runtime, ...) and the last evaluation.
        layer_map: the hidden-state pairs that were used.
    """

    student: nn.Module
    trainer: DistillTrainer
    metrics: dict[str, float] = field(default_factory=dict)
    layer_map: list[list[int]] = field(default_factory=list)

    def save(self, folder: str | os.PathLike) -> None:
        """Save the student (and tokenizer) with the trainer; call it on every process of a distributed run.

        Under FSDP the student is gathered into one full state dict first (whatever state-dict type the
        checkpoints use), so the folder is an ordinary model folder.
        """
        plugin = getattr(self.trainer.accelerator.state, "fsdp_plugin", None)
        if plugin is not None and "FULL_STATE_DICT" not in str(plugin.state_dict_type):
            plugin.set_state_dict_type("FULL_STATE_DICT")
        self.trainer.save_model(str(folder))
        if self.trainer.args.should_save:
            args_file = Path(folder) / "training_args.bin"
            if args_file.exists():
                args_file.unlink()


def training_arguments(config: TrainingConfig, output_dir: str | os.PathLike, *, device: torch.device,
                       has_eval: bool, classify: bool, progress: bool, unused_parameters: bool = False) -> TrainingArguments:
    """The TrainingArguments a config describes (launch-time settings such as DDP come from accelerate)."""
    if config.precision == "fp16" and device.type != "cuda":
        raise CompressError("fp16 mixed precision needs a CUDA GPU; use --precision bf16 or fp32 on the CPU")
    evaluate = has_eval and config.evaluate
    return TrainingArguments(
        output_dir=str(output_dir),
        per_device_train_batch_size=config.batch_size,
        per_device_eval_batch_size=config.batch_size,
        gradient_accumulation_steps=config.grad_accum,
        num_train_epochs=config.epochs,
        max_steps=config.steps if config.steps is not None else -1,
        learning_rate=config.learning_rate,
        weight_decay=config.weight_decay,
        warmup_steps=float(config.warmup_ratio),
        lr_scheduler_type="linear",
        logging_steps=config.logging_steps,
        save_strategy="steps",
        save_steps=config.save_steps,
        save_total_limit=config.save_total_limit,
        eval_strategy="epoch" if evaluate else "no",
        prediction_loss_only=not classify,
        seed=config.seed,
        data_seed=config.seed,
        bf16=config.precision == "bf16",
        fp16=config.precision == "fp16",
        use_cpu=device.type == "cpu",
        report_to="none",
        disable_tqdm=not progress,
        remove_unused_columns=False,
        dataloader_num_workers=0,
        train_sampling_strategy="group_by_length" if classify else "random",
        # DDP must look for parameters without gradients only when there are some (an encoder's pooler
        # in the embed task); the search costs a graph traversal per step
        ddp_find_unused_parameters=unused_parameters,
    )


def _accuracy(eval_pred) -> dict[str, float]:
    logits, labels = eval_pred.predictions, eval_pred.label_ids
    if isinstance(logits, tuple):
        logits = logits[0]
    return {"accuracy": float((logits.argmax(-1) == labels).mean())}


def _set_eager(models: list[nn.Module]) -> list[tuple[nn.Module, str]]:
    """Switch models to eager attention (the only kind that returns attention maps); returns what to restore."""
    changed = []
    for m in models:
        current = getattr(getattr(m, "config", None), "_attn_implementation", None)
        if current is not None and current != "eager" and hasattr(m, "set_attn_implementation"):
            m.set_attn_implementation("eager")
            changed.append((m, current))
    return changed


@torch.no_grad()
def probe(teacher: nn.Module | None, student: nn.Module, data: TaskData, config: DistillConfig,
          teacher_pooling: Pooling | None, token_map: TokenMap | None) -> Widths:
    """Run both models on two training examples to learn their widths and check they fit the task."""
    batch = data.collator([data.train[i] for i in range(min(2, len(data.train)))])
    inputs = {k: v for k, v in batch.items() if k in ("input_ids", "attention_mask", "token_type_ids")}

    def run(model, ids_lookup=None):
        device = next(model.parameters()).device
        feed = {k: v.to(device) for k, v in inputs.items()}
        if ids_lookup is not None:
            feed["input_ids"] = ids_lookup.to(device)[feed["input_ids"]]
        was_training = model.training
        model.eval()
        try:
            out = model(**feed, output_hidden_states=True)
        except TypeError as e:
            raise CompressError(f"{type(model).__name__} cannot be called like a transformers model ({e})") from None
        finally:
            model.train(was_training)
        states = getattr(out, "hidden_states", None) or [last_hidden(out)]
        if data.task == "embed":
            width = last_hidden(out).shape[-1]
        else:
            if getattr(out, "logits", None) is None:
                raise CompressError(f"{type(model).__name__} returns no logits, so it cannot be a {data.task} model")
            width = out.logits.shape[-1]
        return [s.shape[-1] for s in states], width

    s_states, s_out = run(student)
    if teacher is None:
        return Widths(s_states, s_states, s_out, s_out)
    t_states, t_out = run(teacher, token_map.lookup if token_map is not None else None)
    if data.task == "classify" and s_out != t_out:
        raise CompressError(f"the student has {s_out} classes but the teacher {t_out}; they must classify into the same labels")
    return Widths(s_states, t_states, s_out, t_out)


def distill(teacher: nn.Module | LoadedModel | None, student: nn.Module | DerivedStudent, data: TaskData,
            config: DistillConfig, *,
            output_dir: str | os.PathLike, tokenizer=None, teacher_pooling: Pooling | None = None,
            student_pooling: Pooling | None = None, token_map: TokenMap | None = None,
            resume: bool | str | None = None, callbacks: list[TrainerCallback] | None = None,
            device: str = "auto", progress: bool = True) -> DistillResult:
    """Train ``student`` to imitate ``teacher`` on ``data``; returns the trained student and its trainer.

    Args:
        teacher: the frozen teacher (a LoadedModel or a module); None only when the config needs no
            teacher (alpha 0 and no other term), which is plain training on the hard labels.
        student: any module called like a transformers model; it is trained in place. A DerivedStudent
            (students.derive_student) also supplies its layer map when the config has none.
        data: tokenized examples and their collator (compress.distill.data).
        config: the DistillConfig (task, temperature, alpha, term weights, layer map, schedule).
        output_dir: where checkpoints go (checkpoint-<step> folders).
        tokenizer: saved with every checkpoint (default: the teacher's, when it is a LoadedModel).
        teacher_pooling, student_pooling: sentence pooling for the embed task (default: the
            teacher's own pooling for both).
        token_map: for a student whose vocabulary differs (students.check_vocabularies).
        resume: True to continue from the newest checkpoint in output_dir, or a checkpoint folder.
        callbacks: extra TrainerCallbacks (for example one that re-applies pruning masks after each step).
        device: auto, cpu or cuda (ignored under accelerate launch, which assigns each process a device).
        progress: show progress bars.
    """
    derived_map = None
    if isinstance(student, DerivedStudent):
        student, derived_map = student.model, student.layer_map
    if isinstance(teacher, LoadedModel):
        teacher_pooling = teacher_pooling or teacher.pooling
        tokenizer = tokenizer if tokenizer is not None else teacher.tokenizer
        teacher = teacher.model
    if teacher is None and config.needs_teacher:
        raise CompressError("this distillation config needs a teacher (alpha > 0, an auxiliary loss, or the embed task)")
    if config.task != data.task:
        raise CompressError(f"the config's task is {config.task} but the data is for {data.task}")
    if len(data.train) == 0:
        raise CompressError("the training data is empty")
    dev = resolve_device(device)
    restore = _set_eager([m for m in (teacher, student) if m is not None]) if config.attn_weight > 0 else []
    try:
        widths = probe(teacher if config.needs_teacher else None, student, data, config, teacher_pooling, token_map)
        layer_map = config.layer_map or derived_map or uniform_layer_map(len(widths.student_states) - 1, len(widths.teacher_states) - 1)
        if config.hidden_weight > 0 or config.attn_weight > 0:
            check_layer_map(layer_map, widths)
        model = DistillationModel(student, config, widths, layer_map, student_pooling or teacher_pooling,
                                  (token_map.student_ids, token_map.teacher_ids) if token_map is not None else None)
        args = training_arguments(config, output_dir, device=dev, has_eval=data.eval is not None,
                                  classify=data.task == "classify", progress=progress,
                                  unused_parameters=data.task == "embed")
        trainer = DistillTrainer(model=model, args=args, train_dataset=data.train, eval_dataset=data.eval,
                                 data_collator=data.collator, processing_class=tokenizer,
                                 compute_metrics=_accuracy if data.task == "classify" else None,
                                 teacher=teacher if config.needs_teacher else None, teacher_pooling=teacher_pooling,
                                 token_map=token_map, callbacks=list(callbacks or []))
        trainer.remove_callback(PrinterCallback)
        if progress:
            trainer.remove_callback(ProgressCallback)
            trainer.add_callback(QuietProgress)
        trainer.add_callback(LogLines)
        if resume is True:
            from transformers.trainer_utils import get_last_checkpoint

            if not Path(output_dir).is_dir() or get_last_checkpoint(str(output_dir)) is None:
                raise CompressError(f"there is no checkpoint to resume from in {output_dir}")
            check_resumable(Path(get_last_checkpoint(str(output_dir))))
        elif resume:
            check_resumable(Path(resume))
        output = trainer.train(resume_from_checkpoint=resume or None)
        metrics = dict(output.metrics)
        for entry in trainer.state.log_history:
            metrics.update({k: v for k, v in entry.items() if k.startswith("eval_")})
    finally:
        for m, impl in restore:
            m.set_attn_implementation(impl)
    trainer.accelerator.wait_for_everyone()
    return DistillResult(student=trainer.accelerator.unwrap_model(trainer.model).student, trainer=trainer,
                         metrics=metrics, layer_map=layer_map)


def check_resumable(checkpoint: Path) -> None:
    """Unpickle a checkpoint's optimizer, scheduler and RNG states as the Trainer will (weights_only,
    numpy allowed), so a file that holds other objects, or is damaged, is one sentence before training
    starts instead of torch's advice on trusting it. Tensors are memory-mapped, not read."""
    from transformers.trainer_pt_utils import safe_globals

    for path in sorted([*checkpoint.glob("*.pt"), *checkpoint.glob("*.pth")]):
        try:
            with safe_globals():
                state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except Exception as e:  # noqa: BLE001  (UnpicklingError for objects other than tensors; several types for damage)
            unsafe = "weights_only" in str(e) or "global" in str(e)
            wanted = "it holds objects other than tensors" if unsafe else type(e).__name__
        else:
            what, keys = next((v for name, v in _STATE_KEYS.items() if path.name.startswith(name)), ("a training state", ()))
            wanted = None if isinstance(state, dict) and all(k in state for k in keys) else f"it is not {what}"
        if wanted:
            raise CompressError(f"checkpoint file {path} cannot be trusted or read ({wanted}); resume from another "
                                "checkpoint or start again without --resume")


# what Trainer reads from each pickled state when it resumes
_STATE_KEYS = {"optimizer": ("an optimizer state", ("state", "param_groups")),
               "rng_state": ("an RNG state", ("python", "numpy", "cpu")), "scheduler": ("a scheduler state", ())}


def write_run_info(path: Path, info: dict) -> None:
    """A JSON record of how a model was made (teacher or base, layers kept, config, final metrics)."""
    path.write_text(json.dumps(info, indent=2, sort_keys=True, default=str) + "\n")
