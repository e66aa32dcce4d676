"""Configuration dataclasses, one per method, validated on construction and round-tripped through JSON.

The CLI builds these from its flags and calls the same API a Python user calls, so every check lives
here once. Invalid values raise CompressError with one sentence that names the option.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from dataclasses import dataclass, field
from typing import Any, ClassVar

from .errors import CompressError
from .quant.nf4 import QUANT_TYPES, check_blocksize
from .quant.primitives import QuantSpec


def _check_regexes(patterns, option: str) -> None:
    for p in patterns:
        try:
            re.compile(p)
        except re.error as e:
            raise CompressError(f"{option} '{p}' is not a valid regular expression ({e})") from None


# options whose flag is not the field's name with dashes
_FLAG_NAMES = {"learning_rate": "--lr", "hidden_weight": "--hidden-loss", "attn_weight": "--attn-loss",
               "cosine_weight": "--cosine-loss"}


def check_numbers(config, flags: dict[str, str] | None = None) -> None:
    """Refuse NaN and infinity in every float field of a config dataclass, naming its flag.

    Range checks alone let them through (``inf > 0`` holds, NaN fails no ``<``), and a temperature of
    inf trains on a loss of 0. ``flags`` names fields whose flag differs from ``--field-name``.
    """
    names = {**_FLAG_NAMES, **(flags or {})}
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if isinstance(value, float) and not math.isfinite(value):
            flag = names.get(f.name, "--" + f.name.replace("_", "-"))
            raise CompressError(f"{flag} must be a finite number, got {value}")


class JSONConfig:
    """to_dict / from_dict / to_json / from_json for the dataclasses below, and their NaN / inf check.

    Subclasses call ``super().__post_init__()`` first; FLAGS names fields whose flag differs.
    """

    FLAGS: ClassVar[dict[str, str]] = {}

    def __post_init__(self):
        check_numbers(self, self.FLAGS)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict[str, Any]):
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise CompressError(f"{cls.__name__} has no option '{unknown[0]}'")
        return cls(**data)

    @classmethod
    def from_json(cls, text: str):
        return cls.from_dict(json.loads(text))


@dataclass
class WeightQuantConfig(JSONConfig):
    """Weight-only integer quantization into the GPTQ checkpoint layout.

    Args:
        bits: code width, 2, 3, 4 or 8.
        group_size: input columns per scale / zero point; -1 for one group per output row.
        sym: symmetric quantization (fixed zero point) instead of asymmetric.
        skip: regular expressions (re.search on the module's dotted name) of layers to keep in full
            precision. Embeddings and output heads are never quantized: only Linear layers inside the
            repeated blocks are candidates.
        overrides: regular expression -> {"bits": b, "group_size": g} for layers that need other
            settings (for example 8 bits for ``down_proj``). The first matching pattern wins.
        blocks: dotted name of the repeated block list, when structure discovery picks the wrong one.
        dtype: dtype of the tensors left unquantized (embeddings, norms, heads): 'auto' (float16,
            or bfloat16 when the checkpoint is bfloat16: what GPTQ kernels compute in), 'float16',
            'bfloat16' or 'float32'.
    """

    method: ClassVar[str] = "weight"

    bits: int = 4
    group_size: int = 128
    sym: bool = True
    skip: list[str] = field(default_factory=list)
    overrides: dict[str, dict[str, int]] = field(default_factory=dict)
    blocks: str | None = None
    dtype: str = "auto"

    def __post_init__(self):
        super().__post_init__()
        QuantSpec(self.bits, self.group_size, self.sym)
        if self.dtype not in ("auto", "float16", "bfloat16", "float32"):
            raise CompressError(f"--dtype {self.dtype} is not one of auto, float16, bfloat16, float32")
        _check_regexes(self.skip, "--skip")
        _check_regexes(self.overrides, "--override")
        for pattern, values in self.overrides.items():
            extra = set(values) - {"bits", "group_size"}
            if extra:
                raise CompressError(f"override '{pattern}' sets '{sorted(extra)[0]}'; only bits and group_size can be overridden")
            QuantSpec(values.get("bits", self.bits), values.get("group_size", self.group_size), self.sym)

    @property
    def spec(self) -> QuantSpec:
        return QuantSpec(self.bits, self.group_size, self.sym)

    def spec_for(self, name: str) -> QuantSpec | None:
        """The QuantSpec of layer ``name``, or None when ``skip`` excludes it."""
        if any(re.search(p, name) for p in self.skip):
            return None
        for pattern, values in self.overrides.items():
            if re.search(pattern, name):
                return QuantSpec(values.get("bits", self.bits), values.get("group_size", self.group_size), self.sym)
        return self.spec


@dataclass
class RTNConfig(WeightQuantConfig):
    """Round-to-nearest: data-free weight quantization, the baseline every other method must beat."""

    method: ClassVar[str] = "rtn"


@dataclass(frozen=True)
class NF4Spec:
    """How one layer is quantized to 4-bit blockwise codes (what NF4Config.spec_for returns)."""

    quant_type: str
    blocksize: int
    double_quant: bool


@dataclass
class NF4Config(JSONConfig):
    """4-bit blockwise quantization (NF4 or FP4) in the bitsandbytes layout that transformers loads.

    Data-free, like round-to-nearest: no calibration, the checkpoint is streamed tensor by tensor. The
    codes are bit-exact with bitsandbytes 0.50 on the CPU.

    Args:
        quant_type: 'nf4' (normal-float table, the QLoRA default) or 'fp4' (bitsandbytes' 4-bit float table).
        double_quant: also quantize the block maxima to 8 bits (about 4.127 instead of 4.5 bits per
            weight at block size 64).
        blocksize: weights per block sharing one maximum, a power of two from 32 to 4096.
        compute_dtype: dtype of the matmul at inference (float32, bfloat16 or float16); written to
            config.json as bnb_4bit_compute_dtype.
        skip: regular expressions (re.search on the module's dotted name) of layers to keep in full
            precision. Only Linear layers inside the repeated blocks are candidates.
        blocks: dotted name of the repeated block list, when structure discovery picks the wrong one.
        dtype: the model's dtype in the output, as for the other methods: 'auto' (float16, or bfloat16
            when the checkpoint is bfloat16), 'float16', 'bfloat16' or 'float32'. Unquantized tensors
            are stored in it and the weights are cast to it before quantization, so the folder is what
            transformers saves after loading the model in that dtype and quantizing it.
    """

    method: ClassVar[str] = "nf4"

    quant_type: str = "nf4"
    double_quant: bool = True
    blocksize: int = 64
    compute_dtype: str = "float32"
    skip: list[str] = field(default_factory=list)
    blocks: str | None = None
    dtype: str = "auto"

    def __post_init__(self):
        super().__post_init__()
        if self.dtype not in ("auto", "float16", "bfloat16", "float32"):
            raise CompressError(f"--dtype {self.dtype} is not one of auto, float16, bfloat16, float32")
        if self.quant_type not in QUANT_TYPES:
            raise CompressError(f"--quant-type {self.quant_type} is not supported; choose nf4 or fp4")
        check_blocksize(self.blocksize)
        if self.compute_dtype not in ("float32", "bfloat16", "float16"):
            raise CompressError(f"--compute-dtype {self.compute_dtype} is not supported; choose float32, bfloat16 or float16")
        if not isinstance(self.double_quant, bool):
            raise CompressError(f"double_quant must be true or false, got {self.double_quant!r}")
        _check_regexes(self.skip, "--skip")

    def spec_for(self, name: str) -> NF4Spec | None:
        """The NF4Spec of layer ``name``, or None when ``skip`` excludes it."""
        if any(re.search(p, name) for p in self.skip):
            return None
        return NF4Spec(self.quant_type, self.blocksize, self.double_quant)

    @property
    def label(self) -> str:
        """Short name used for default output folders and tables: 'nf4-b64-dq'."""
        return f"{self.quant_type}-b{self.blocksize}{'-dq' if self.double_quant else ''}"


@dataclass
class GPTQConfig(WeightQuantConfig):
    """GPTQ: quantize each layer column by column with a Hessian from calibration data.

    Args (beyond WeightQuantConfig's):
        act_order: quantize columns in order of decreasing Hessian diagonal (desc_act in the format).
        static_groups: with act_order, fix group parameters from the original weights so groups stay
            contiguous in column order (faster kernels).
        damp: fraction of the mean Hessian diagonal added to it (raised automatically if needed).
        block_size: columns per lazy-update block.
        mse: search each group's clipping range for the smallest error.
        true_sequential: solve the layers of a block in the order they run, each seeing its
            predecessors' quantized outputs.
        calib: calibration text: 'builtin', a .txt / .jsonl / .csv file, or 'hf:NAME'.
        nsamples, seqlen: calibration samples and their length in tokens (seqlen None: 2048 or the
            model's maximum, whichever is smaller).
        calib_batch_size: samples per forward pass.
        offload: keep calibration activations on disk instead of in memory.
        seed: seeds the choice of calibration samples.
        text_field: column / field holding the text in calibration files.
        calib_dtype: dtype of the calibration forwards' matrix products: 'auto' (float32 on the CPU,
            the checkpoint's half precision on a GPU), 'float32', 'bfloat16' (on the CPU under
            autocast over float32 activations: 1.5x faster with AMX, 7% worse in KL on SmolLM2) or
            'float16' (GPU only). Solves and Hessians are float32 whatever it is.
    """

    method: ClassVar[str] = "gptq"

    act_order: bool = False
    static_groups: bool = False
    damp: float = 0.01
    block_size: int = 128
    mse: bool = False
    true_sequential: bool = True
    calib: str = "builtin"
    nsamples: int = 128
    seqlen: int | None = None
    calib_batch_size: int = 8
    offload: bool = False
    seed: int = 0
    text_field: str = "text"
    calib_dtype: str = "auto"

    def __post_init__(self):
        super().__post_init__()
        if self.calib_dtype not in ("auto", "float32", "bfloat16", "float16"):
            raise CompressError(f"calibration dtype {self.calib_dtype} is not one of auto, float32, bfloat16, float16")
        if not 0 < self.damp <= 1:
            raise CompressError(f"--damp {self.damp} must lie in (0, 1]; 0.01 is usual")
        if self.nsamples < 1:
            raise CompressError(f"--nsamples must be at least 1, got {self.nsamples}")
        if self.seqlen is not None and self.seqlen < 2:
            raise CompressError(f"--seqlen must be at least 2 tokens, got {self.seqlen}")
        if self.block_size < 1 or self.calib_batch_size < 1:
            raise CompressError("the GPTQ block size and calibration batch size must be at least 1")


@dataclass
class EvalConfig(JSONConfig):
    """What the evaluation harness measures and how long it spends.

    Args:
        data: text for perplexity and embedding fidelity: 'builtin' (the held-out split of the built-in
            corpus), a .txt / .jsonl / .csv file, or 'hf:NAME' for a dataset in the local cache.
        labeled: a labeled .csv / .jsonl file (text and label columns) for classifier accuracy.
        text_field: column or field holding the text in data / labeled files.
        label_field: column or field holding the label in the labeled file.
        seqlen: window length for perplexity and prefill latency (capped at the model's positions).
        ppl_tokens: tokens scored for perplexity (causal and masked models).
        kl_tokens: positions whose full output distributions are compared for KL divergence.
        samples: texts embedded or classified for fidelity and agreement.
        batch_size, latency_seqlen: the encoder latency batch (32 x 128 tokens by default).
        decode_tokens: tokens generated to time decoding.
        repeats, warmup: timed runs (the median is reported) and untimed warm-up runs.
        latency: measure latency at all.
        device: where models run ('auto', 'cpu', 'cuda').
        seed: seeds masking and sampling, so runs are comparable.
    """

    data: str = "builtin"
    labeled: str | None = None
    text_field: str = "text"
    label_field: str = "label"
    seqlen: int = 512
    ppl_tokens: int = 8192
    kl_tokens: int = 2048
    samples: int = 256
    batch_size: int = 32
    latency_seqlen: int = 128
    decode_tokens: int = 32
    repeats: int = 5
    warmup: int = 1
    latency: bool = True
    device: str = "auto"
    seed: int = 0

    def __post_init__(self):
        super().__post_init__()
        for name in ("seqlen", "ppl_tokens", "samples", "batch_size", "latency_seqlen", "decode_tokens", "repeats"):
            if getattr(self, name) < 1:
                raise CompressError(f"evaluation option {name} must be at least 1, got {getattr(self, name)}")
        if self.seqlen < 2:
            raise CompressError("evaluation seqlen must be at least 2 tokens")
        if self.kl_tokens < 0 or self.warmup < 0:
            raise CompressError("evaluation options kl_tokens and warmup cannot be negative")


# --------------------------------------------------------------------------------------------------
# Training: distillation and fine-tuning

DISTILL_TASKS = ("classify", "mlm", "causal", "embed")
PRECISIONS = ("fp32", "bf16", "fp16")


@dataclass
class TrainingConfig(JSONConfig):
    """How long and how a model is trained; shared by distillation and fine-tuning.

    Args:
        epochs: passes over the training data (ignored when ``steps`` is set).
        steps: optimizer steps to take instead of whole epochs.
        batch_size: examples per device per forward pass.
        grad_accum: forward passes accumulated per optimizer step.
        learning_rate: peak AdamW learning rate (linear warm-up, then linear decay to 0).
        weight_decay: AdamW weight decay (not applied to biases and LayerNorm weights).
        warmup_ratio: fraction of the steps spent warming the learning rate up from 0.
        max_length: tokens per example (longer texts are truncated; LM windows have exactly this length).
        max_samples: use at most this many training examples (None: all of them).
        seed: seeds initialisation, shuffling, dropout and masking, so runs repeat exactly.
        precision: fp32, or bf16 / fp16 mixed precision (GPU only for fp16).
        save_steps: write a resumable checkpoint every this many optimizer steps.
        save_total_limit: checkpoints kept on disk (older ones are deleted).
        logging_steps: log the loss every this many steps.
        evaluate: evaluate on the held-out data (when there is any) at the end of each epoch.
    """

    epochs: float = 3.0
    steps: int | None = None
    batch_size: int = 32
    grad_accum: int = 1
    learning_rate: float = 5e-5
    weight_decay: float = 0.01
    warmup_ratio: float = 0.1
    max_length: int = 128
    max_samples: int | None = None
    seed: int = 0
    precision: str = "fp32"
    save_steps: int = 500
    save_total_limit: int = 2
    logging_steps: int = 10
    evaluate: bool = True

    def __post_init__(self):
        super().__post_init__()
        if self.steps is None and not self.epochs > 0:
            raise CompressError(f"--epochs must be positive, got {self.epochs}")
        if self.steps is not None and self.steps < 1:
            raise CompressError(f"--steps must be at least 1, got {self.steps}")
        for name in ("batch_size", "grad_accum", "save_steps", "save_total_limit", "logging_steps"):
            if getattr(self, name) < 1:
                raise CompressError(f"training option {name} must be at least 1, got {getattr(self, name)}")
        if not self.learning_rate > 0:
            raise CompressError(f"--lr must be positive, got {self.learning_rate}")
        if self.weight_decay < 0:
            raise CompressError(f"weight decay cannot be negative, got {self.weight_decay}")
        if not 0 <= self.warmup_ratio < 1:
            raise CompressError(f"warm-up ratio must be in [0, 1), got {self.warmup_ratio}")
        if self.max_length < 8:
            raise CompressError(f"--max-length must be at least 8 tokens, got {self.max_length}")
        if self.max_samples is not None and self.max_samples < 1:
            raise CompressError(f"--max-samples must be at least 1, got {self.max_samples}")
        if self.precision not in PRECISIONS:
            raise CompressError(f"precision '{self.precision}' is not one of {', '.join(PRECISIONS)}")


@dataclass
class DistillConfig(TrainingConfig):
    """Teacher-to-student distillation: which signals the student learns from, and how they are weighted.

    The loss is ``alpha * soft + (1 - alpha) * hard + hidden_weight * hidden + attn_weight * attention
    + cosine_weight * cosine`` (the terms are defined in compress/distill/losses.py):

    - classify: soft = T^2 KL between the temperature-softened class distributions, hard = cross-entropy
      with the labels.
    - mlm: the same at the masked positions only (as DistilBERT), hard = the masked-LM cross-entropy.
    - causal: the same at every real token, hard = the next-token cross-entropy.
    - embed: soft = KL between the teachers' and the students' in-batch similarity distributions
      softmax(cos / similarity_temperature); hard = MSE (or 1 - cosine, ``embed_loss``) between the
      student's sentence embedding (projected when widths differ) and the teacher's.

    Args:
        task: classify, mlm, causal or embed.
        temperature: T > 0 that softens both output distributions (soft term, scaled by T^2).
        alpha: weight in [0, 1] of the soft term; 1 - alpha goes to the hard term. alpha = 0 trains on
            the hard target alone (the teacher is then not run unless another term needs it).
        hidden_weight: weight of the hidden-state MSE over the layer map (0 turns it off).
        attn_weight: weight of the attention-map KL over the layer map (0 turns it off).
        cosine_weight: weight of the cosine loss between the last hidden states (0 turns it off).
        layer_map: [[student_state, teacher_state], ...] indices into the hidden-state tuples (0 is the
            embedding output, i the output of layer i). None: derived students map each kept layer to
            its source, other students map layers evenly.
        embed_loss: mse or cosine, the embed task's hard term.
        similarity_temperature: temperature of the in-batch similarity distributions (embed).
        mlm_probability: fraction of tokens masked for the mlm task (80% [MASK], 10% random, 10% kept).
        vocab_map: JSON file {student token: teacher token} for a student whose vocabulary differs
            from the teacher's.
    """

    task: str = "classify"
    temperature: float = 2.0
    alpha: float = 0.5
    hidden_weight: float = 0.0
    attn_weight: float = 0.0
    cosine_weight: float = 0.0
    layer_map: list[list[int]] | None = None
    embed_loss: str = "mse"
    similarity_temperature: float = 0.05
    mlm_probability: float = 0.15
    vocab_map: str | None = None

    def __post_init__(self):
        super().__post_init__()
        if self.task not in DISTILL_TASKS:
            raise CompressError(f"task '{self.task}' is not one of {', '.join(DISTILL_TASKS)}")
        if not self.temperature > 0:
            raise CompressError(f"--temperature must be greater than 0, got {self.temperature}")
        if not 0 <= self.alpha <= 1:
            raise CompressError(f"--alpha must be in [0, 1], got {self.alpha}")
        for name in ("hidden_weight", "attn_weight", "cosine_weight"):
            if getattr(self, name) < 0:
                raise CompressError(f"{name} cannot be negative, got {getattr(self, name)}")
        if self.embed_loss not in ("mse", "cosine"):
            raise CompressError(f"embed loss '{self.embed_loss}' is not one of mse, cosine")
        if not self.similarity_temperature > 0:
            raise CompressError(f"similarity temperature must be greater than 0, got {self.similarity_temperature}")
        if not 0 < self.mlm_probability < 1:
            raise CompressError(f"--mlm-probability must be in (0, 1), got {self.mlm_probability}")
        if self.layer_map is not None:
            pairs = [list(p) for p in self.layer_map]
            if not pairs or any(len(p) != 2 or any(not isinstance(i, int) or i < 0 for i in p) for p in pairs):
                raise CompressError("layer_map must be a non-empty list of [student_state, teacher_state] index pairs")
            self.layer_map = pairs

    @property
    def needs_teacher(self) -> bool:
        """Whether any term reads the teacher's outputs."""
        return self.alpha > 0 or self.hidden_weight > 0 or self.attn_weight > 0 or self.cosine_weight > 0 or self.task == "embed"


@dataclass
class FinetuneConfig(TrainingConfig):
    """Fine-tuning a base model into a sequence classifier on labeled text (cross-entropy on the labels).

    The defaults suit a small BERT-style encoder on a few thousand examples.
    """

    learning_rate: float = 1e-4
    epochs: float = 4.0


@dataclass
class StudentConfig(JSONConfig):
    """How a student is derived from its teacher (compress/distill/students.py).

    Args:
        layers: number of blocks to keep, evenly spaced from the first to the last (DistilBERT keeps
            [0, 2, 4, 7, 9, 11] of 12).
        layer_indices: the teacher blocks to keep, in increasing order (instead of ``layers``).
        hidden_size: a narrower residual width (None: the teacher's); the number of attention heads
            shrinks with it so the head size stays the teacher's.
        intermediate_size: a narrower feed-forward width (None: the teacher's).
    """

    layers: int | None = None
    layer_indices: list[int] | None = None
    hidden_size: int | None = None
    intermediate_size: int | None = None

    def __post_init__(self):
        super().__post_init__()
        if self.layers is not None and self.layer_indices is not None:
            raise CompressError("give either --student-layers K or --layer-indices, not both")
        if self.layers is not None and self.layers < 1:
            raise CompressError(f"--student-layers must be at least 1, got {self.layers}")
        if self.layer_indices is not None:
            idx = list(self.layer_indices)
            if not idx or any(not isinstance(i, int) or i < 0 for i in idx):
                raise CompressError("--layer-indices must be non-negative integers, for example 0,2,5")
            if any(b <= a for a, b in zip(idx, idx[1:])):
                raise CompressError(f"--layer-indices must be strictly increasing, got {','.join(map(str, idx))}")
            self.layer_indices = idx
        for name in ("hidden_size", "intermediate_size"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise CompressError(f"student {name} must be at least 1, got {value}")
