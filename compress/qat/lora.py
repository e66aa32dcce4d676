"""Adapter recovery: LoRA adapters trained on a frozen quantized model to repair its quantization error.

A model quantized by compress (GPTQ-format int from ``--method rtn|gptq``, or bitsandbytes-layout NF4)
is loaded as it is, peft wraps its quantized layers with :class:`~compress.qat.lora_layer.QuantLoraLayer`
(low-rank A and B beside the packed weight), and only A and B train, on the next-token loss of any text
source of compress.data (labeled examples for a sequence classifier, whose float head stays frozen)
or, with a teacher, on the float model's softened predictions (distillation through
:func:`compress.distill.distill`, the trainer every training path of compress shares).

The result is either the adapters on their own (peft's ``adapter_config.json`` and
``adapter_model.safetensors`` plus ``recovery.json`` naming the base they belong to; load them with
:func:`load_with_adapters`), or a merged checkpoint: the base dequantized, the LoRA update added, and the
sum quantized again in the base's own format, so ``compress.load``, the harness and GGUF export read it
like any other quantized folder (see compress/qat/lora_merge.py).

    from compress.qat import LoraRecoveryConfig, recover_model
    report = recover_model("llm-rtn-w4g128", "llm-rtn-w4g128-lora", LoraRecoveryConfig(steps=200))
"""

from __future__ import annotations

import hashlib
import json
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import torch
from torch import nn

from .. import __version__
from ..config import DistillConfig, JSONConfig, _check_regexes
from ..errors import CompressError
from ..models import LoadedModel, read_config_dict, resolve_model_path

RECOVERY_FILE = "recovery.json"  # next to the adapters: which base they belong to and how they were trained
MERGED_FILE = "adapter_recovery.json"  # in a merged folder: where it came from
ADAPTER_KINDS = {"causal": "causal", "masked": "mlm", "classifier": "classify"}  # model kind -> training task


@dataclass
class LoraRecoveryConfig(JSONConfig):
    """How LoRA adapters are trained on a quantized base.

    Args:
        rank: r, the inner width of each adapter (A is [r, in], B is [out, r]).
        alpha: LoRA alpha; the update is scaled by alpha / rank.
        dropout: dropout on the adapters' input during training (0 turns it off).
        target_modules: regular expressions (re.search on the module's dotted name) choosing which
            quantized layers get adapters; empty: every quantized layer. Full-precision layers never do.
        steps: optimizer steps.
        learning_rate: peak AdamW learning rate (linear warm-up, then linear decay to 0).
        batch_size: token windows per step; max_length: tokens per window.
        grad_accum: forward passes accumulated per optimizer step.
        warmup_ratio: fraction of the steps spent warming the learning rate up.
        weight_decay: AdamW weight decay on the adapters.
        max_samples: use at most this many training windows (None: all).
        distill: learn from a float teacher's softened predictions (needs ``teacher`` in recover_model)
            instead of the next-token labels alone.
        temperature: softening of both distributions for the distillation term (scaled by T^2).
        kd_weight: with distill, the weight in [0, 1] of the teacher term; 1 - kd_weight goes to the
            next-token cross-entropy.
        seed: seeds adapter initialisation, data order and dropout.
        logging_steps: log the loss every this many steps.
        text_field: column / field holding the text in .jsonl / .csv data files.
    """

    FLAGS: ClassVar[dict[str, str]] = {"alpha": "--lora-alpha", "dropout": "--lora-dropout", "kd_weight": "--kd-weight"}

    rank: int = 16
    alpha: float = 32.0
    dropout: float = 0.0
    target_modules: list[str] = field(default_factory=list)
    steps: int = 200
    learning_rate: float = 1e-3
    batch_size: int = 8
    max_length: int = 256
    grad_accum: int = 1
    warmup_ratio: float = 0.05
    weight_decay: float = 0.0
    max_samples: int | None = None
    distill: bool = False
    temperature: float = 1.0
    kd_weight: float = 1.0
    seed: int = 0
    logging_steps: int = 10
    text_field: str = "text"

    def __post_init__(self):
        super().__post_init__()
        if not isinstance(self.rank, int) or self.rank < 1:
            raise CompressError(f"--lora-rank must be a positive integer, got {self.rank}")
        if not self.alpha > 0:
            raise CompressError(f"--lora-alpha must be positive, got {self.alpha}")
        if not 0 <= self.dropout < 1:
            raise CompressError(f"--lora-dropout must be in [0, 1), got {self.dropout}")
        if isinstance(self.target_modules, str):
            self.target_modules = [self.target_modules]
        _check_regexes(self.target_modules, "--lora-targets")
        if not self.temperature > 0:
            raise CompressError(f"--temperature must be greater than 0, got {self.temperature}")
        if not 0 <= self.kd_weight <= 1:
            raise CompressError(f"--kd-weight must be in [0, 1], got {self.kd_weight}")
        self.training_config()  # steps, learning rate, batch size, lengths: checked once, by the trainer's config

    def training_config(self, task: str = "causal") -> DistillConfig:
        """The DistillConfig the shared trainer runs (no checkpoints, no evaluation pass)."""
        return DistillConfig(
            task=task, steps=self.steps, batch_size=self.batch_size, grad_accum=self.grad_accum,
            learning_rate=self.learning_rate, weight_decay=self.weight_decay, warmup_ratio=self.warmup_ratio,
            max_length=self.max_length, max_samples=self.max_samples, seed=self.seed,
            logging_steps=self.logging_steps, save_steps=self.steps + 1, evaluate=False,
            temperature=self.temperature, alpha=self.kd_weight if self.distill else 0.0)


# --------------------------------------------------------------------------------------------------
# Attaching adapters


def quantized_layers(model: nn.Module) -> dict[str, nn.Module]:
    """The QuantModule layers of a model (QuantLinear, NF4Linear), by dotted name."""
    from ..quant.linear import QuantModule

    return {name: m for name, m in model.named_modules() if isinstance(m, QuantModule)}


def lora_targets(model: nn.Module, config: LoraRecoveryConfig) -> list[str]:
    """Names of the quantized layers that get adapters; CompressError when there are none."""
    layers = quantized_layers(model)
    if not layers:
        raise CompressError("the model is not quantized (it has no QuantLinear or NF4Linear layer); adapter recovery "
                            "trains on a quantized base: quantize it first with compress quantize")
    names = [n for n in layers if not config.target_modules or any(re.search(p, n) for p in config.target_modules)]
    if not names:
        raise CompressError(f"no quantized layer matches --lora-targets {' '.join(config.target_modules)} "
                            f"(quantized layers are named like {next(iter(layers))})")
    return names


def require_peft() -> None:
    """CompressError when peft, which adapter recovery builds on, is not installed."""
    import importlib.util

    if importlib.util.find_spec("peft") is None:
        raise CompressError("adapter recovery needs the peft package: pip install 'compress[lora]'")


def peft_config(model: nn.Module, config: LoraRecoveryConfig, task: str = "causal"):
    """The peft LoraConfig for ``model`` with our quantized layer type registered."""
    from peft import LoraConfig

    lora = LoraConfig(r=config.rank, lora_alpha=config.alpha, lora_dropout=config.dropout,
                      target_modules=lora_targets(model, config), bias="none",
                      task_type="CAUSAL_LM" if task == "causal" else None)
    _register(lora)
    return lora


def _register(lora_config) -> None:
    """Map our QuantModule to its LoRA layer (peft's custom-module hook; it is not saved with the config)."""
    from ..quant.linear import QuantModule
    from .lora_layer import QuantLoraLayer

    lora_config._register_custom_module({QuantModule: QuantLoraLayer})


class _DeviceAnchor:
    """peft places new adapter weights next to the replaced layer's ``weight``/``qweight`` or first
    parameter; NF4Linear has only buffers, so its packed codes stand in while peft wraps it."""

    def __init__(self, model: nn.Module):
        self.layers = [m for m in quantized_layers(model).values() if not hasattr(m, "qweight")]

    def __enter__(self):
        for m in self.layers:
            m.__dict__["qweight"] = m.packed
        return self

    def __exit__(self, *exc):
        for m in self.layers:
            m.__dict__.pop("qweight", None)


def attach_lora(model: nn.Module | LoadedModel, config: LoraRecoveryConfig | None = None):
    """Wrap the quantized layers of a loaded model with trainable LoRA adapters (peft).

    Args:
        model: a quantized model (``compress.load(folder)`` or its ``.model``); it is modified in place.
        config: rank, alpha, dropout and which layers (default: every quantized layer).

    Returns:
        The peft model. Only the adapters' A and B require gradients; the packed weights are buffers
        and every float parameter (embeddings, norms, heads) is frozen.

    Raises:
        CompressError: when the model has no quantized layer, or no quantized layer matches the targets.
    """
    require_peft()
    from peft import get_peft_model

    config = config or LoraRecoveryConfig()
    kind = "causal"
    if isinstance(model, LoadedModel):
        kind, model = model.kind, model.model
    task = ADAPTER_KINDS.get(kind, kind)
    lora = peft_config(model, config, task)
    torch.manual_seed(config.seed)  # A's initialisation
    with _DeviceAnchor(model):
        peft_model = get_peft_model(model, lora)
    for name, p in peft_model.named_parameters():
        p.requires_grad_("lora_" in name)
    return peft_model


# --------------------------------------------------------------------------------------------------
# Base identity


def base_fingerprint(folder: Path) -> str:
    """A cheap identity of a model folder: config.json and, per weight file, its size, head and tail."""
    digest = hashlib.sha256((folder / "config.json").read_bytes())
    for f in sorted(folder.glob("*.safetensors")):
        size = f.stat().st_size
        digest.update(f"{f.name}:{size}".encode())
        with open(f, "rb") as fh:
            digest.update(fh.read(1 << 20))
            if size > 2 << 20:
                fh.seek(size - (1 << 20))
                digest.update(fh.read())
    return digest.hexdigest()[:16]


def check_quantized_folder(folder: Path) -> dict:
    """The folder's quantization_config; CompressError when the model is not quantized."""
    quant = read_config_dict(folder).get("quantization_config")
    if not quant:
        raise CompressError(f"model {folder.name} is not quantized; adapter recovery trains adapters on a quantized base, "
                            "so quantize it first (compress quantize --method rtn, gptq or nf4)")
    return quant


def load_with_adapters(adapter_dir: str | Path, *, base: str | Path | None = None, device: str = "cpu",
                       dtype: torch.dtype | None = None) -> LoadedModel:
    """Rebuild base + adapters from a folder written by :func:`recover_model` (``merge=False``).

    Args:
        adapter_dir: the adapter folder (adapter_config.json, adapter_model.safetensors, recovery.json).
        base: the quantized base folder, when it has moved since training (default: the one recorded).
        device, dtype: as for ``compress.load``.

    Returns:
        A LoadedModel whose ``.model`` is the peft model in eval mode (base frozen, adapters active) and
        whose tokenizer, kind and quantization are the base's.
    """
    require_peft()
    from peft import LoraConfig, PeftModel

    from ..models import load

    adapter_dir = Path(adapter_dir).expanduser().absolute()
    info = adapter_info(adapter_dir)
    base_dir = Path(base).expanduser().absolute() if base is not None else Path(info["base"])
    if not (base_dir / "config.json").is_file():
        raise CompressError(f"the adapters' base model {base_dir} is not there; pass base=PATH to its new place")
    check_quantized_folder(base_dir)
    if base_fingerprint(base_dir) != info.get("base_fingerprint"):
        raise CompressError(f"model {base_dir.name} is not the quantized base these adapters were trained on "
                            f"({info['base']})")
    loaded = load(base_dir, device=device, dtype=dtype)
    lora = LoraConfig.from_pretrained(str(adapter_dir))
    _register(lora)
    with _DeviceAnchor(loaded.model):
        loaded.model = PeftModel.from_pretrained(loaded.model, str(adapter_dir), config=lora).eval()
    loaded.extra["adapters"] = str(adapter_dir)
    return loaded


# --------------------------------------------------------------------------------------------------
# Folder in, folder out


@dataclass
class RecoveryReport:
    """What :func:`recover_model` did."""

    source: Path
    output: Path
    merged: bool
    layers: int  # quantized layers with adapters
    trainable: int  # adapter parameters
    seconds: float
    teacher: Path | None = None
    requantized: dict | None = None  # the config the merged model was quantized with
    metrics: dict = field(default_factory=dict)
    model: nn.Module | None = None  # the trained peft model (adapters kept apart, CPU, eval mode); None after a merge
    eval_file: Path | None = None  # the held-out labeled file of a classifier's data, when it has one
    task: str = "causal"  # what the adapters trained on: causal, mlm or classify

    def summary(self) -> str:
        own = {"classify": "label loss", "mlm": "masked-token loss"}.get(self.task, "next-token loss")
        how = f"distilled from {self.teacher.name}" if self.teacher else own
        loss = self.metrics.get("train_loss")
        loss_text = f", mean training loss {loss:.4f}" if isinstance(loss, float) else ""
        kept = (f"merged and re-quantized ({self.requantized.get('method', '?')})" if self.merged
                else "adapters saved")
        return (f"trained LoRA adapters on {self.layers} quantized layers of {self.source.name} ({self.trainable} "
                f"parameters, {how}{loss_text}) in {self.seconds:.0f} s; {kept} -> {self.output}")


def is_adapter_folder(path) -> bool:
    """True for a folder of adapters written by :func:`recover_model` (peft files plus recovery.json)."""
    folder = Path(path).expanduser()
    return (folder / "adapter_config.json").is_file() and (folder / RECOVERY_FILE).is_file()


def adapter_info(folder) -> dict:
    """The recovery.json of an adapter folder (its base, how it was trained); CompressError when it is not one."""
    folder = Path(folder).expanduser().absolute()
    if not is_adapter_folder(folder):
        raise CompressError(f"{folder} is not an adapter folder written by adapter recovery (no adapter_config.json "
                            f"or {RECOVERY_FILE})")
    try:
        info = json.loads((folder / RECOVERY_FILE).read_text())
        str(info["base"])
    except (OSError, ValueError, KeyError, TypeError):
        raise CompressError(f"{folder / RECOVERY_FILE} is unreadable or names no base model") from None
    return info


def _data(loaded: LoadedModel, data: str, config: LoraRecoveryConfig, task: str, transfer: str | None = None):
    from ..distill.pipeline import _task_data

    label2id = num_labels = None
    if task == "classify":
        label2id = {str(k): int(v) for k, v in (loaded.model.config.label2id or {}).items()}
        num_labels = loaded.model.config.num_labels
    task_data = _task_data(task, loaded.tokenizer, config.training_config(task), data, label2id, num_labels,
                           text_field=config.text_field, transfer=transfer)
    if len(task_data.train) == 0:
        raise CompressError(f"data {data} gives no training window; give more text")
    return task_data


def _teacher(teacher, config: LoraRecoveryConfig, base: LoadedModel):
    if teacher is None:
        if config.distill:
            raise CompressError("distillation needs the float model as teacher: pass teacher=PATH (--teacher) or turn "
                                "distill off")
        return None
    if not config.distill:
        raise CompressError("a teacher is only used with distillation: set distill=True (--distill) or leave the "
                            "teacher out")
    from ..models import load

    folder = resolve_model_path(teacher)
    if read_config_dict(folder).get("quantization_config"):
        raise CompressError(f"teacher {folder.name} is quantized; distill from the full-precision model")
    loaded = load(folder, kind=base.kind, device="cpu", dtype=torch.float32)
    if len(loaded.tokenizer) != len(base.tokenizer) or loaded.tokenizer.get_vocab() != base.tokenizer.get_vocab():
        raise CompressError(f"teacher {folder.name} has another vocabulary than the quantized model; use the float "
                            "model it was quantized from")
    return loaded


def recover_model(quantized_dir: str | Path, out_dir: str | Path, config: LoraRecoveryConfig | None = None, *,
                  data: str = "builtin", teacher: str | Path | None = None, transfer: str | None = None,
                  merge: bool = False, requantize=None, device: str = "cpu", progress: bool = True,
                  overwrite: bool = False) -> RecoveryReport:
    """Train LoRA adapters on a quantized model folder and write the adapters, or the merged model.

    Args:
        quantized_dir: a folder quantized by compress (GPTQ-format int, or bitsandbytes-layout NF4).
        out_dir: where the result goes (built in a temporary sibling, renamed into place at the end).
        config: rank, targets, schedule, distillation (default LoraRecoveryConfig()).
        data: training text: ``builtin``, a .txt / .jsonl / .csv file, or ``hf:NAME`` (compress.data).
        teacher: the full-precision model folder the base was quantized from; used with
            ``config.distill`` (the adapters then learn the teacher's softened predictions).
        transfer: classifiers distilled from a teacher: unlabeled texts (``demo`` or any text source)
            added to the labeled data, learned from the teacher's predictions alone.
        merge: False writes the adapters (peft format plus recovery.json; load with
            :func:`load_with_adapters`). True merges them into the dequantized base and quantizes the
            result again (see :func:`merge_adapters` for ``requantize``), giving an ordinary quantized folder.
        device: where training runs (auto, cpu, cuda).
        progress: progress bars and one log line per ``logging_steps``.
        overwrite: replace an existing ``out_dir``.

    Raises:
        CompressError: an unquantized base, missing or too little data, a teacher without distill (or
            the reverse), an existing output without overwrite.
    """
    from ..distill.trainer import distill
    from ..outputs import atomic_output, check_output, scratch_folder
    from ..models import load

    start = time.perf_counter()
    require_peft()
    config = config or LoraRecoveryConfig()
    source = resolve_model_path(quantized_dir)
    out = check_output(out_dir, inputs=[source, teacher], overwrite=overwrite)
    quant = check_quantized_folder(source)
    base = load(source, device="cpu", dtype=torch.float32)
    task = ADAPTER_KINDS.get(base.kind)
    if task is None:
        raise CompressError(f"adapter recovery trains language models (causal or masked) and classifiers; "
                            f"{source.name} is an {base.kind} model")
    teacher_model = _teacher(teacher, config, base)
    if transfer is not None and (task != "classify" or teacher_model is None):
        raise CompressError("a transfer set adds unlabeled texts for a classifier distilled from its float model: "
                            "it needs a classifier base, distill=True and a teacher")
    if merge:  # a bad requantize choice must fail before training, not after it
        from .lora_merge import requantize_config

        requantize_config(base.model, quant, requantize, source)
    task_data = _data(base, data, config, task, transfer)
    tokenizer = base.tokenizer
    peft_model = attach_lora(base, config)
    trainable = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    from .lora_layer import QuantLoraLayer

    layers = sum(isinstance(m, QuantLoraLayer) for m in peft_model.modules())
    with scratch_folder(out) as work:
        result = distill(teacher_model, peft_model, task_data, config.training_config(task), output_dir=work,
                         tokenizer=tokenizer, device=device, progress=progress)
    peft_model = result.student.to("cpu").eval()
    info = {"compress_version": __version__, "base": str(source), "base_fingerprint": base_fingerprint(source),
            "base_quantization": quant, "kind": base.kind, "data": data, "transfer": transfer,
            "teacher": str(resolve_model_path(teacher)) if teacher is not None else None,
            "config": config.to_dict(), "metrics": result.metrics}
    requantized = None
    if merge:
        from .lora_merge import merge_loaded

        requantized = merge_loaded(peft_model, base, source, out, requantize, info, overwrite=overwrite,
                                   progress=progress)
    else:
        with atomic_output(out, overwrite=overwrite, inputs=[source, teacher], command="qat --lora") as tmp:
            peft_model.save_pretrained(str(tmp))
            (tmp / RECOVERY_FILE).write_text(json.dumps(info, indent=2, sort_keys=True, default=str) + "\n")
    return RecoveryReport(source=source, output=out, merged=merge, layers=layers, trainable=trainable,
                          seconds=time.perf_counter() - start,
                          teacher=resolve_model_path(teacher) if teacher is not None else None,
                          requantized=requantized, metrics=result.metrics, model=None if merge else peft_model,
                          eval_file=getattr(task_data, "eval_file", None), task=task)


def merge_adapters(adapter_dir: str | Path, out_dir: str | Path, requantize=None, *, base: str | Path | None = None,
                   overwrite: bool = False, progress: bool = True) -> dict:
    """Merge saved adapters into their base and quantize the sum again: an ordinary quantized folder.

    Each adapted layer's weight becomes ``dequantize(base) + B @ A * scaling`` (float32), every other
    quantized layer is dequantized as it is, and the float model is quantized again.

    Args:
        adapter_dir: a folder written by :func:`recover_model` with ``merge=False``.
        out_dir: the merged, quantized folder (built atomically).
        requantize: None (the base's own format: for a GPTQ-format int base GPTQ with the base's bits,
            group size and symmetry per layer, calibrated on the built-in corpus; for a bitsandbytes
            base its NF4 / FP4 settings), ``"rtn"`` (the same int settings, data-free, but it adds a
            second rounding error), ``"gptq"``, ``"nf4"``, or an RTNConfig / GPTQConfig / NF4Config
            used as given.
        base: the base folder, when it has moved since training.

    Returns:
        The re-quantization config as a dict (with its ``method``).
    """
    from .lora_merge import merge_loaded

    loaded = load_with_adapters(adapter_dir, base=base)
    info = json.loads((Path(adapter_dir) / RECOVERY_FILE).read_text())
    info["adapters"] = str(Path(adapter_dir).expanduser().absolute())
    return merge_loaded(loaded.model, loaded, loaded.path, Path(out_dir), requantize, info, overwrite=overwrite,
                        progress=progress)
