"""Folder in, folder out: the entry points behind `compress distill` and `compress finetune`.

:func:`distill_model` loads a teacher folder, builds or loads the student, prepares the data, trains
with :func:`compress.distill.trainer.distill` and writes the student as a model folder that transformers
(and, for embedding students, sentence-transformers) load. :func:`finetune_model` turns a base model
into a sequence classifier on labeled text, the usual way to make a classification teacher.

Every check on the inputs runs before training starts, so a bad input writes nothing. Checkpoints go to
``<out>.checkpoints`` (or ``checkpoints=``) while training runs; they are removed after a successful run
unless ``keep_checkpoints``. The output folder is built in a temporary sibling and renamed into place.
Under ``accelerate launch`` every process runs this; only the main process writes the output.
"""

from __future__ import annotations

import dataclasses
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .. import __version__
from ..config import DistillConfig, FinetuneConfig, StudentConfig
from ..errors import CompressError
from ..outputs import checkpoints_in, remove_checkpoints
from ..models import DEFAULT_MODEL_NAME, default_model_path, detect_kind, load, read_config_dict, resolve_model_path
from .data import TaskData, check_classes, classification_data, embedding_data, lm_data, read_labeled

TASK_KINDS = {"classify": "classifier", "mlm": "masked", "causal": "causal", "embed": "embedding"}
_KIND_WORDS = {"classifier": "a sequence classifier", "masked": "a masked LM", "causal": "a causal LM",
               "embedding": "a sentence-embedding model"}
# sentence-transformers files that make a folder an embedding model (weights-free, read by compress and sentence-transformers)
_ST_FILES = ("modules.json", "sentence_bert_config.json", "config_sentence_transformers.json")


@dataclass
class TrainReport:
    """What a distillation or fine-tuning run did."""

    source: Path
    output: Path
    task: str
    student: str
    seconds: float
    examples: int
    metrics: dict = field(default_factory=dict)
    eval_file: Path | None = None
    main_process: bool = True

    def summary(self) -> str:
        m = self.metrics
        parts = [f"mean training loss {m['train_loss']:.4f}" if "train_loss" in m else None,
                 f"held-out accuracy {m['eval_accuracy']:.4f}" if "eval_accuracy" in m else None]
        extra = "; ".join(p for p in parts if p)
        return (f"trained {self.student} on {self.examples} {self.task} examples in {self.seconds:.0f} s"
                f"{' (' + extra + ')' if extra else ''} -> {self.output}")


def _name(path: Path) -> str:
    try:
        return DEFAULT_MODEL_NAME if path == default_model_path() else path.name
    except CompressError:
        return path.name


def _library_bars(progress: bool) -> None:
    """transformers' own loading and saving bars follow the run's progress setting."""
    from transformers.utils import logging as hf_logging

    (hf_logging.enable_progress_bar if progress else hf_logging.disable_progress_bar)()


def _prepare_paths(out, checkpoints, overwrite: bool, resume: bool, inputs=()) -> tuple[Path, Path]:
    """The output and checkpoint folders, checked (compress.outputs) before anything is loaded."""
    from ..outputs import check_checkpoints, check_output

    if out is None:
        raise CompressError("--out is required: the folder the trained model is written to")
    out = check_output(out, inputs=inputs, overwrite=overwrite)
    ckdir = check_checkpoints(checkpoints or out.with_name(out.name + ".checkpoints"), out=out, inputs=inputs)
    has_checkpoints = ckdir.is_dir() and any(p.name.startswith("checkpoint-") for p in ckdir.iterdir())
    if resume and not has_checkpoints:
        raise CompressError(f"there is no checkpoint to resume from in {ckdir}")
    if has_checkpoints and not resume:
        raise CompressError(f"checkpoint folder {ckdir} holds an earlier run; pass --resume to continue it, or remove it")
    return out, ckdir


def _precheck_labeled(source: str, labeled: str | None, text_field: str, label_field: str) -> None:
    """Read the labeled files once before any model is loaded, so column and class errors come first."""
    texts, labels = read_labeled(source, "train", text_field, label_field)
    check_classes(labels, source)
    if labeled is not None:
        from ..data import load_labeled

        load_labeled(labeled, text_field, label_field)


def _st_side_files(src: Path, dst: Path) -> None:
    """Copy the sentence-transformers description (modules, pooling, normalisation) of an embedding model."""
    import json

    for name in _ST_FILES:
        if (src / name).is_file():
            shutil.copy2(src / name, dst / name)
    if (src / "modules.json").is_file():
        for module in json.loads((src / "modules.json").read_text()):
            sub = module.get("path") or ""
            if sub and (src / sub).is_dir() and not (dst / sub).exists():
                shutil.copytree(src / sub, dst / sub, ignore=shutil.ignore_patterns("*.safetensors", "*.bin", "*.pt"))


def _publish(result, ckdir: Path, out: Path, overwrite: bool, side_files_from: Path | None, info: dict,
             info_name: str, inputs=(), command: str = "distill") -> None:
    """Save the trained student into ``out`` (every process takes part in gathering; the main one writes)."""
    from ..outputs import atomic_output
    from .trainer import write_run_info

    staging = ckdir / "final"
    result.save(staging)
    if not result.trainer.args.should_save:
        return
    if not any(staging.glob("*.safetensors")) and not any(staging.glob("*.bin")):
        raise CompressError("the trained student could not be gathered for saving; under DeepSpeed ZeRO-3 launch with "
                            "--zero3_save_16bit_model true")
    with atomic_output(out, overwrite=overwrite, inputs=inputs, command=command) as tmp:
        for item in staging.iterdir():
            shutil.move(str(item), tmp / item.name)
        if side_files_from is not None:
            _st_side_files(side_files_from, tmp)
        write_run_info(tmp / info_name, info)
    shutil.rmtree(staging, ignore_errors=True)


def _task_data(task: str, tokenizer, config, source: str, label2id=None, num_labels=None, labeled=None,
               text_field="text", label_field="label", transfer=None) -> TaskData:
    if task == "classify":
        return classification_data(tokenizer, source, label2id, num_labels, config.max_length, eval_source=labeled,
                                   text_field=text_field, label_field=label_field, max_samples=config.max_samples,
                                   transfer=transfer)
    if task in ("mlm", "causal"):
        return lm_data(task, tokenizer, source, config.max_length, getattr(config, "mlm_probability", 0.15),
                       text_field, config.max_samples)
    return embedding_data(tokenizer, source, config.max_length, text_field, config.max_samples)


def distill_model(teacher_path, out, config: DistillConfig, *, data: str = "builtin", student_path=None,
                  student: StudentConfig | None = None, labeled: str | None = None, text_field: str = "text",
                  label_field: str = "label", transfer: str | None = None, checkpoints=None, resume: bool = False,
                  keep_checkpoints: bool = False, overwrite: bool = False, device: str = "auto",
                  trust_remote_code: bool = False, progress: bool = True) -> TrainReport:
    """Distill the teacher folder into a student and write it to ``out``.

    Args:
        teacher_path: a local model folder (None: the embedded all-MiniLM-L6-v2, an embedding model).
        out: the output folder.
        config: a DistillConfig; its task must suit the teacher (classify: a sequence classifier, mlm: a
            masked LM, causal: a causal LM, embed: a sentence-embedding model).
        data: the training data source (see compress.distill.data).
        student_path: a student folder of the same kind; otherwise the student is derived from the
            teacher by ``student`` (default: half of the teacher's layers).
        labeled: a held-out labeled file (classify; the demo task brings its own).
        transfer: unlabeled text the student learns from through the teacher's predictions alone
            (classify; ``demo`` is the demo task's unlabeled.csv).
        checkpoints: the checkpoint folder (default ``<out>.checkpoints``).
        resume: continue from the newest checkpoint there.
    """
    from .students import check_vocabularies, derive_student
    from .trainer import distill

    start = time.perf_counter()
    _library_bars(progress)
    if transfer is not None and config.task != "classify":
        raise CompressError("--transfer-data is for --task classify; the other tasks train on unlabeled text already")
    if transfer is not None and config.alpha == 0:
        raise CompressError("--transfer-data needs the teacher's predictions: use an --alpha above 0")
    teacher_dir = resolve_model_path(teacher_path)
    inputs = [teacher_dir, student_path, data, labeled, transfer]
    out, ckdir = _prepare_paths(out, checkpoints, overwrite, resume, inputs)
    kind = detect_kind(teacher_dir, read_config_dict(teacher_dir))
    wanted = TASK_KINDS[config.task]
    if kind != wanted:
        hint = "; make one with compress finetune" if wanted == "classifier" else ""
        raise CompressError(f"teacher {teacher_dir.name} is {_KIND_WORDS[kind]}, but --task {config.task} needs "
                            f"{_KIND_WORDS[wanted]}{hint}")
    if student_path is not None and student is not None and student != StudentConfig():
        raise CompressError("give either --student PATH or the options that derive a student (--student-layers ...), not both")
    if config.task == "classify":
        _precheck_labeled(data, labeled, text_field, label_field)
        if transfer is not None:
            from .data import read_transfer

            read_transfer(transfer, text_field)
    student_dir = None
    if student_path is not None:
        student_dir = resolve_model_path(student_path)
        s_kind = detect_kind(student_dir, read_config_dict(student_dir))
        if s_kind != kind:
            raise CompressError(f"student {student_dir.name} is {_KIND_WORDS[s_kind]} but the teacher is {_KIND_WORDS[kind]}")
    torch.manual_seed(config.seed)
    teacher = load(teacher_dir, kind=kind, device="cpu", dtype=torch.float32, trust_remote_code=trust_remote_code)
    token_map = None
    if student_dir is not None:
        loaded = load(student_dir, kind=kind, device="cpu", dtype=torch.float32, trust_remote_code=trust_remote_code)
        if loaded.quantization:
            raise CompressError(f"student {student_dir.name} is quantized; distill into a full-precision student")
        token_map = check_vocabularies(loaded.tokenizer, teacher.tokenizer, config.vocab_map, config.task)
        if kind == "classifier" and _label_names(loaded.config) != _label_names(teacher.config):
            raise CompressError(f"student {student_dir.name} has labels {_label_names(loaded.config)} but the teacher "
                                f"{_label_names(teacher.config)}; they must classify into the same labels")
        student_model, tokenizer, pooling = loaded.model.train(), loaded.tokenizer, loaded.pooling
        described = f"student {student_dir.name}"
        side_from = student_dir if kind == "embedding" else None
        origin = {"student": str(student_dir)}
    else:
        spec = student or StudentConfig()
        student_model = derive_student(teacher.model, spec)
        tokenizer, pooling = teacher.tokenizer, teacher.pooling
        n = teacher.config.num_hidden_layers
        described = f"a {len(student_model.kept)}-of-{n}-layer student {student_model.kept}"
        side_from = teacher_dir if kind == "embedding" else None
        origin = {"student_layers": student_model.kept, "student": dataclasses.asdict(spec)}
    label2id = {str(k): int(v) for k, v in (teacher.config.label2id or {}).items()} if kind == "classifier" else None
    task_data = _task_data(config.task, tokenizer, config, data, label2id,
                           teacher.config.num_labels if kind == "classifier" else None, labeled, text_field, label_field,
                           transfer)
    if kind == "embedding" and student_dir is None and pooling is None:
        pooling = teacher.pooling
    with checkpoints_in(ckdir):
        result = distill(teacher, student_model, task_data, config, output_dir=ckdir, tokenizer=tokenizer,
                         teacher_pooling=teacher.pooling, student_pooling=pooling, token_map=token_map,
                         resume=resume or None, device=device, progress=progress)
    info = {"compress_version": __version__, "teacher": str(teacher_dir), "data": data, "transfer_data": transfer,
            "task": config.task,
            "config": config.to_dict(), "layer_map": result.layer_map, "metrics": result.metrics, **origin}
    _publish(result, ckdir, out, overwrite, side_from, info, "distill_config.json", inputs)
    main = result.trainer.args.should_save
    if main and not keep_checkpoints:
        remove_checkpoints(ckdir)
    return TrainReport(source=teacher_dir, output=out, task=config.task, student=described,
                       seconds=time.perf_counter() - start, examples=len(task_data.train), metrics=result.metrics,
                       eval_file=task_data.eval_file, main_process=main)


def _label_names(config) -> dict[str, int]:
    return {str(k): int(v) for k, v in (getattr(config, "label2id", None) or {}).items()}


def finetune_model(base_path, out, config: FinetuneConfig, *, data: str, labeled: str | None = None,
                   text_field: str = "text", label_field: str = "label", checkpoints=None, resume: bool = False,
                   keep_checkpoints: bool = False, overwrite: bool = False, device: str = "auto",
                   trust_remote_code: bool = False, progress: bool = True) -> TrainReport:
    """Fine-tune a base model folder into a sequence classifier on labeled text and write it to ``out``.

    The classes are the distinct labels of the training data (sorted); the classification head is new
    (seeded by ``config.seed``) and the whole model is trained with cross-entropy.
    """
    import transformers

    from ..models import check_folder, load_tokenizer
    from .trainer import distill

    start = time.perf_counter()
    _library_bars(progress)
    base_dir = resolve_model_path(base_path)
    inputs = [base_dir, data, labeled]
    out, ckdir = _prepare_paths(out, checkpoints, overwrite, resume, inputs)
    _precheck_labeled(data, labeled, text_field, label_field)
    classes = check_classes(read_labeled(data, "train", text_field, label_field)[1], data)
    # config, tokenizer and checkpoint header first: from_pretrained below would re-initialise mismatched weights
    check_folder(base_dir, trust_remote_code)
    if read_config_dict(base_dir).get("quantization_config"):
        raise CompressError(f"model {base_dir.name} is quantized; fine-tune a full-precision model")
    tokenizer = load_tokenizer(base_dir, trust_remote_code)
    transformers.set_seed(config.seed)
    label2id = {c: i for i, c in enumerate(classes)}
    try:
        model = transformers.AutoModelForSequenceClassification.from_pretrained(
            str(base_dir), num_labels=len(classes), id2label={i: c for c, i in label2id.items()}, label2id=label2id,
            ignore_mismatched_sizes=True, local_files_only=True, trust_remote_code=trust_remote_code, dtype=torch.float32)
    except (ValueError, OSError) as e:
        raise CompressError(f"cannot build a sequence classifier from {base_dir.name}: {str(e).splitlines()[0]}") from None
    if tokenizer.pad_token is None:  # decoder tokenizers often have none; the classifier finds the last real token by it
        tokenizer.pad_token = tokenizer.eos_token
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    model.train()
    train_config = DistillConfig(task="classify", alpha=0.0, **{f.name: getattr(config, f.name)
                                                               for f in dataclasses.fields(FinetuneConfig)})
    task_data = _task_data("classify", tokenizer, train_config, data, label2id, len(classes), labeled, text_field, label_field)
    with checkpoints_in(ckdir):
        result = distill(None, model, task_data, train_config, output_dir=ckdir, tokenizer=tokenizer,
                         resume=resume or None, device=device, progress=progress)
    info = {"compress_version": __version__, "base_model": str(base_dir), "data": data, "task": "finetune",
            "labels": classes, "config": config.to_dict(), "metrics": result.metrics}
    _publish(result, ckdir, out, overwrite, None, info, "finetune_config.json", inputs, "finetune")
    main = result.trainer.args.should_save
    if main and not keep_checkpoints:
        remove_checkpoints(ckdir)
    return TrainReport(source=base_dir, output=out, task="classify", student=f"{_name(base_dir)} with a {len(classes)}-class head",
                       seconds=time.perf_counter() - start, examples=len(task_data.train), metrics=result.metrics,
                       eval_file=task_data.eval_file, main_process=main)
