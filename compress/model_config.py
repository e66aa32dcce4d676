"""A model folder's config.json, tokenizer and weights, checked against each other before any work.

- :func:`read_config_dict` parses config.json and checks it (:func:`check_config`): a JSON object with
  a model_type, whose sizes are positive integers of a possible geometry (the hidden size splits into
  the heads, the heads into the key/value heads) and whose numbers are finite.
- :func:`check_vocabulary`: the tokenizer has no more tokens than the model has embedding rows.
- :func:`check_weights`: every tensor a model skeleton expects is in the checkpoint, with the shape
  config.json implies and a floating-point dtype where the model computes in floating point
  (:func:`checkpoint_key_map` pairs the skeleton's names with the checkpoint's keys).
- :func:`check_tensors`: that comparison on plain shapes, which GGUF export uses with shapes it derives
  itself.

Every problem is a CompressError with one sentence naming the file, the field or tensor, and what was
expected. Nothing here imports torch or transformers (GGUF export runs without them).
"""

from __future__ import annotations

import json
import math
import os
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import CompressError
from .files import read_bounded

# sizes the project reads (GPT-2's and OPT's names too): positive integers when present
SIZES = ("hidden_size", "num_attention_heads", "num_key_value_heads", "num_hidden_layers", "intermediate_size",
         "vocab_size", "head_dim", "max_position_embeddings", "n_embd", "n_head", "n_layer", "n_inner", "n_positions",
         "n_ctx", "ffn_dim", "word_embed_proj_dim", "sliding_window")
# sizes a config may set to null, leaving the library's default (heads of the query, 4 x width, no window)
NULLABLE = ("num_key_value_heads", "head_dim", "n_inner", "sliding_window")
POSITIVE_NUMBERS = ("layer_norm_eps", "rms_norm_eps", "layer_norm_epsilon", "rope_theta")
FRACTIONS = ("hidden_dropout_prob", "attention_probs_dropout_prob", "attention_dropout", "resid_pdrop",
             "embd_pdrop", "attn_pdrop", "dropout", "activation_dropout", "classifier_dropout")
FLAGS = ("tie_word_embeddings", "attention_bias", "mlp_bias")
SECTIONS = ("quantization_config", "sparsity_config", "rope_scaling", "rope_parameters", "id2label", "label2id")
# the fields that fix a checkpoint's tensor shapes: two folders of one model agree on all of them
SHAPE_FIELDS = ("model_type", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                "intermediate_size", "vocab_size", "head_dim", "tie_word_embeddings")
# names of functions and variants: non-empty strings when present
NAMES = ("hidden_act", "hidden_activation", "activation_function", "position_embedding_type")
# far beyond any published model (the deepest have about 128 layers), yet small enough that building the
# skeleton, one module per layer, stays quick; sizes beyond 32-bit indexing are no model either
MAX_LAYERS = 4096
MAX_SIZE = 2**31 - 1
LAYER_COUNTS = ("num_hidden_layers", "n_layer")
MAX_JSON_BYTES = 256 * 1024**2  # config.json and tokenizer files; a larger one is not what it claims to be


def read_json_file(path: Path, what: str) -> Any:
    """The parsed JSON of a regular file of at most MAX_JSON_BYTES; one sentence for anything else."""
    try:
        info = os.stat(path)
    except OSError as e:
        raise CompressError(f"{what} {path} cannot be read ({e.strerror})") from None
    if not stat.S_ISREG(info.st_mode):
        raise CompressError(f"{what} {path} is not a regular file")
    if info.st_size > MAX_JSON_BYTES:
        raise CompressError(f"{what} {path} is {info.st_size / 1e6:.0f} MB, too large to be a JSON {what}")
    try:
        with open(path, "rb") as f:
            data = read_bounded(f, MAX_JSON_BYTES)
        if len(data) > MAX_JSON_BYTES:
            raise CompressError(f"{what} {path} grew past {MAX_JSON_BYTES // 1024**2} MB while it was read")
        return json.loads(data.decode("utf-8"))
    except UnicodeDecodeError:
        raise CompressError(f"{what} {path} is not UTF-8 text") from None
    except json.JSONDecodeError as e:
        raise CompressError(f"{what} {path} is not valid JSON ({e})") from None
    except OSError as e:
        raise CompressError(f"{what} {path} cannot be read ({e.strerror})") from None


def read_config_dict(folder: Path) -> dict[str, Any]:
    """The config.json of a model folder, checked by :func:`check_config`."""
    path = Path(folder) / "config.json"
    config = read_json_file(path, "config file")
    check_config(config, path)
    return config


def _positive_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def check_config(config: Any, where: str | Path = "config.json") -> None:
    """Refuse a config that no model can be built from, with one sentence naming the field.

    Checks the type of every field the project reads (sizes, norms' epsilons, dropouts, flags, the
    quantization and sparsity sections) and the geometry they imply. Fields that are absent keep the
    library's defaults and are not checked.
    """
    if not isinstance(config, dict):
        raise CompressError(f"{where} holds a JSON {type(config).__name__}, not an object of model settings")
    model_type = config.get("model_type")
    if not isinstance(model_type, str) or not model_type:
        raise CompressError(f"{where} has no model_type, so the architecture is unknown")
    for key in SIZES:
        if key not in config or (config[key] is None and key in NULLABLE):
            continue
        if not _positive_int(config[key]):
            raise CompressError(f"{where}: {key} must be a positive integer, not {config[key]!r}")
        limit = MAX_LAYERS if key in LAYER_COUNTS else MAX_SIZE
        if config[key] > limit:
            raise CompressError(f"{where}: {key} {config[key]} is larger than any model has (at most {limit})")
    for key in NAMES:
        if key in config and not (isinstance(config[key], str) and config[key].strip()):
            raise CompressError(f"{where}: {key} must name a function or variant, not {config[key]!r}")
    for key in POSITIVE_NUMBERS:
        if key in config and not (_number(config[key]) and config[key] > 0):
            raise CompressError(f"{where}: {key} must be a positive finite number, not {config[key]!r}")
    for key in FRACTIONS:
        if config.get(key) is not None and not (_number(config[key]) and 0 <= config[key] <= 1):
            raise CompressError(f"{where}: {key} must be a number in [0, 1], not {config[key]!r}")
    for key in FLAGS:
        if key in config and not isinstance(config[key], bool):
            raise CompressError(f"{where}: {key} must be true or false, not {config[key]!r}")
    for key in SECTIONS:
        if config.get(key) is not None and not isinstance(config[key], dict):
            raise CompressError(f"{where}: {key} must be an object, not {config[key]!r}")
    quant = config.get("quantization_config")
    if quant and not isinstance(quant.get("quant_method"), str):
        raise CompressError(f"{where}: quantization_config has no quant_method, so the weights' format is unknown")
    architectures = config.get("architectures")
    if architectures is not None and not (isinstance(architectures, list) and all(isinstance(a, str) for a in architectures)):
        raise CompressError(f"{where}: architectures must be a list of class names, not {architectures!r}")
    _check_geometry(config, where)


def _check_geometry(config: dict, where) -> None:
    """The sizes fit together: heads split the width (unless head_dim is given), groups split the heads."""
    for width, heads in (("hidden_size", "num_attention_heads"), ("n_embd", "n_head")):
        w, h = config.get(width), config.get(heads)
        if w and h and not config.get("head_dim") and w % h:
            raise CompressError(f"{where}: {width} {w} is not a multiple of {heads} {h}, so the heads cannot split it")
    heads, kv = config.get("num_attention_heads"), config.get("num_key_value_heads")
    if heads and kv and heads % kv:
        raise CompressError(f"{where}: num_attention_heads {heads} is not a multiple of num_key_value_heads {kv}")


def shape_differences(config: dict, other: dict) -> list[str]:
    """The SHAPE_FIELDS on which ``other`` differs from ``config``, as 'field X instead of Y' phrases."""
    out = []
    for key in SHAPE_FIELDS:
        if config.get(key) != other.get(key):
            out.append(f"{key} {other.get(key)!r} instead of {config.get(key)!r}")
    return out


# --------------------------------------------------------------------------------------------------
# Tokenizer against config


def tokenizer_size(folder: Path) -> int | None:
    """Tokens of the folder's tokenizer (1 + the largest id in tokenizer.json, or vocab.txt's lines); None if neither."""
    spec_file, vocab_file = Path(folder) / "tokenizer.json", Path(folder) / "vocab.txt"
    if spec_file.exists():
        spec = read_json_file(spec_file, "tokenizer file")
        model = spec.get("model") if isinstance(spec, dict) else None
        vocab = model.get("vocab") if isinstance(model, dict) else None
        if not isinstance(vocab, (dict, list)):
            raise CompressError(f"tokenizer file {spec_file} has no model vocabulary")
        ids = [v for v in vocab.values() if isinstance(v, int)] if isinstance(vocab, dict) else [len(vocab) - 1]
        ids += [t["id"] for t in spec.get("added_tokens") or [] if isinstance(t, dict) and isinstance(t.get("id"), int)]
        return max(ids) + 1 if ids else 0
    if vocab_file.exists():
        info = os.stat(vocab_file)
        if not stat.S_ISREG(info.st_mode) or info.st_size > MAX_JSON_BYTES:
            raise CompressError(f"tokenizer vocabulary {vocab_file} is not a regular file of sane size")
        with open(vocab_file, "rb") as f:
            return sum(1 for _ in f)
    return None


def check_vocabulary(folder: Path, config: dict) -> None:
    """Refuse a tokenizer whose ids reach past the model's vocab_size (they would index past the embedding)."""
    vocab = config.get("vocab_size")
    if not vocab:
        return
    size = tokenizer_size(folder)
    if size is not None and size > vocab:
        raise CompressError(f"the tokenizer of {folder} has {size} tokens but config.json's vocab_size is {vocab}; "
                            "the tokenizer does not belong to this model")


# --------------------------------------------------------------------------------------------------
# Weights against config


@dataclass(frozen=True)
class Expected:
    """What a model needs of one checkpoint tensor."""

    shape: tuple[int, ...]
    floating: bool | None = True  # True: floating point; False: integers (ids, packed codes); None: either
    required: bool = True  # tied weights and buffers the model makes itself may be left out


def _shape(shape) -> str:
    return str(tuple(int(d) for d in shape))


def check_tensors(expected: dict[str, Expected], stored: dict[str, tuple[str, str, bool, tuple]], folder) -> None:
    """Compare what a model needs with what a checkpoint holds, from headers alone.

    ``expected`` maps each tensor's name to an :class:`Expected`; ``stored`` maps the same names to
    (checkpoint key, dtype name, is floating point, shape) for those the checkpoint holds. The first
    problem is raised: a missing tensor, a shape other than config.json implies, or a dtype of the
    wrong family (integer weights, float codes).
    """
    missing = [name for name, want in expected.items() if want.required and name not in stored]
    if missing:
        more = f" ({len(missing)} tensors are missing in all)" if len(missing) > 1 else ""
        raise CompressError(f"the checkpoint in {folder} has no tensor {missing[0]} of shape "
                            f"{_shape(expected[missing[0]].shape)}, which config.json implies{more}; it is incomplete")
    for name, (key, dtype, is_float, shape) in stored.items():
        want = expected.get(name)
        if want is None:
            continue
        if tuple(shape) != tuple(want.shape):
            raise CompressError(f"checkpoint tensor {key} has shape {_shape(shape)} but config.json implies "
                                f"{_shape(want.shape)}; the weights do not belong to this config")
        if want.floating is not None and want.floating != is_float:
            family = "floating-point weights" if want.floating else "integers"
            raise CompressError(f"checkpoint tensor {key} holds {dtype} values but the model needs {family} there")


def checkpoint_key_map(model, keys) -> dict[str, str]:
    """Map each state-dict name of ``model`` to the checkpoint key that holds it."""
    keys = set(keys)
    prefix = getattr(model, "base_model_prefix", "") or ""
    out = {}
    for name in model.state_dict(keep_vars=True):
        candidates = [name]
        if prefix:
            if name.startswith(prefix + "."):
                candidates.append(name[len(prefix) + 1:])
            else:
                candidates.append(f"{prefix}.{name}")
        for cand in candidates:
            if cand in keys:
                out[name] = cand
                break
    return out


def check_weights(model, reader, key_of: dict[str, str]) -> None:
    """Compare every tensor of ``model`` (a skeleton, parameters on the meta device) with the checkpoint header.

    ``key_of`` maps the model's state-dict names to checkpoint keys (checkpoint_key_map). Tensors
    still on the meta device must be in the checkpoint; tied weights (``all_tied_weights_keys``) and
    buffers the model made itself may be absent. A Linear stored quantized in a full-precision
    skeleton (GPTQ's ``qweight``, bitsandbytes' quant_state companions) is left to its format's loader.
    """
    keys = reader.keys()
    tied = set(getattr(model, "all_tied_weights_keys", None) or {})
    # weights stored quantized: GPTQ's <layer>.qweight, bitsandbytes' <layer>.weight with <layer>.weight.* companions
    gptq = checkpoint_key_map(model, [k[: -len("qweight")] + "weight" for k in keys if k.endswith(".qweight")])
    packed = {k[: k.index(".weight.") + len(".weight")] for k in keys if ".weight." in k}
    expected, stored = {}, {}
    for name, tensor in model.state_dict(keep_vars=True).items():
        key = key_of.get(name)
        if key in packed or (key is None and name in gptq):
            continue
        made = tensor.device.type != "meta"  # a buffer the model computes itself: any dtype, may be absent
        expected[name] = Expected(tuple(tensor.shape), None if made else tensor.is_floating_point(),
                                  required=not made and name not in tied)
        if key is not None:
            dtype, shape = reader.info(key)
            stored[name] = (key, str(dtype).removeprefix("torch."), dtype.is_floating_point, tuple(shape))
    check_tensors(expected, stored, reader.folder)
