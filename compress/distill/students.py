"""Students: derived from the teacher (fewer blocks, optionally narrower), or loaded from a folder.

Deriving a student (DistilBERT's recipe, generalised):

1. Choose the teacher blocks to keep: ``k`` evenly spaced from the first to the last (12 -> 6 keeps
   [0, 2, 4, 7, 9, 11], as DistilBERT does), or listed indices.
2. Rewrite a copy of the teacher's config: the block count, every per-block list (``layer_types``), and
   for a narrower student the hidden size (with the head count shrunk so the head size stays the
   teacher's, and the key/value head count in proportion) and the feed-forward size.
3. Build the student class from that config and copy the teacher's tensors: block i of the student
   takes block ``kept[i]`` of the teacher; everything else (embeddings, final norm, heads) is copied
   by name. A narrower tensor takes the leading slice of the teacher's along each narrowed dimension,
   which keeps whole attention heads (the first heads) and the first feed-forward units.

The student is an ordinary transformers model of the teacher's class: ``save_pretrained`` writes a
folder that stock ``from_pretrained`` loads. Structure is found generically (``models.find_blocks``),
so this works for every architecture the rest of compress handles.
"""

from __future__ import annotations

import copy
import json
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..config import StudentConfig
from ..errors import CompressError
from ..models import find_blocks

_INTERMEDIATE_KEYS = ("intermediate_size", "n_inner", "ffn_dim", "encoder_ffn_dim")


def evenly_spaced(n: int, k: int) -> list[int]:
    """``k`` of ``n`` block indices, evenly spaced and including the first and the last (k >= 2).

    Index i is round(i * (n - 1) / (k - 1)) with halves rounded up: 12 -> 6 gives [0, 2, 4, 7, 9, 11]
    (DistilBERT's choice), 6 -> 3 gives [0, 3, 5]. k = 1 keeps block 0.
    """
    if not 1 <= k <= n:
        raise CompressError(f"cannot keep {k} of {n} layers; choose between 1 and {n}")
    if k == 1:
        return [0]
    return [int(i * (n - 1) / (k - 1) + 0.5) for i in range(k)]


def block_count(config) -> int:
    """Number of repeated blocks a config declares."""
    n = getattr(config, "num_hidden_layers", None)
    if not isinstance(n, int):
        raise CompressError(f"the {type(config).__name__} has no num_hidden_layers, so no student can be derived from it")
    return n


def _head_dim(config) -> int:
    explicit = getattr(config, "head_dim", None)
    if isinstance(explicit, int) and explicit > 0:
        return explicit
    return config.hidden_size // config.num_attention_heads


def student_config(teacher_config, kept: list[int], hidden_size: int | None = None,
                   intermediate_size: int | None = None):
    """A copy of the teacher's config rewritten for a student with blocks ``kept`` and the given widths."""
    n = block_count(teacher_config)
    cfg = copy.deepcopy(teacher_config)
    cfg.num_hidden_layers = len(kept)
    for name, value in list(vars(cfg).items()):
        # per-block settings (layer_types, sliding-window flags ...) follow the kept blocks
        if isinstance(value, (list, tuple)) and len(value) == n and "layer" in name:
            setattr(cfg, name, type(value)(value[i] for i in kept))
    if hidden_size is not None and hidden_size != teacher_config.hidden_size:
        teacher_hidden = teacher_config.hidden_size
        if hidden_size > teacher_hidden:
            raise CompressError(f"a student cannot be wider than its teacher (hidden size {hidden_size} > {teacher_hidden})")
        head_dim = _head_dim(teacher_config)
        heads = teacher_config.num_attention_heads
        if hidden_size % head_dim:
            raise CompressError(f"student hidden size {hidden_size} must be a multiple of the teacher's head size {head_dim}")
        new_heads = hidden_size // head_dim
        if isinstance(getattr(teacher_config, "head_dim", None), int):
            cfg.head_dim = head_dim
        kv = getattr(teacher_config, "num_key_value_heads", None)
        if isinstance(kv, int) and kv != heads:
            if (kv * new_heads) % heads:
                raise CompressError(f"student hidden size {hidden_size} gives {new_heads} heads, which cannot share the "
                                    f"teacher's {kv} key/value heads evenly; choose a multiple of {head_dim * heads // kv}")
            cfg.num_key_value_heads = kv * new_heads // heads
        elif isinstance(kv, int):
            cfg.num_key_value_heads = new_heads
        cfg.hidden_size = hidden_size
        cfg.num_attention_heads = new_heads
        proj = getattr(teacher_config, "word_embed_proj_dim", None)  # OPT projects embeddings when they differ
        if proj == teacher_hidden:
            cfg.word_embed_proj_dim = hidden_size
    if intermediate_size is not None:
        key = next((k for k in _INTERMEDIATE_KEYS if hasattr(teacher_config, k)), None)
        if key is None:
            raise CompressError(f"the {type(teacher_config).__name__} has no feed-forward size to narrow")
        current = getattr(teacher_config, key) or 4 * teacher_config.hidden_size  # GPT-2's n_inner=None means 4x
        if intermediate_size > current:
            raise CompressError(f"a student cannot be wider than its teacher (feed-forward size {intermediate_size} > {current})")
        setattr(cfg, key, intermediate_size)
    return cfg


def _slice_to(tensor: torch.Tensor, shape: torch.Size, name: str) -> torch.Tensor:
    if tuple(tensor.shape) == tuple(shape):
        return tensor
    if tensor.dim() != len(shape) or any(s > t for s, t in zip(shape, tensor.shape)):
        raise CompressError(f"cannot initialise student tensor {name} {tuple(shape)} from the teacher's {tuple(tensor.shape)}")
    return tensor[tuple(slice(0, s) for s in shape)]


@dataclass
class DerivedStudent:
    """A student built from its teacher.

    Attributes:
        model: the student (the teacher's class, in training mode, float32 unless the teacher was not).
        kept: the teacher block behind each student block.
        layer_map: default [student hidden state, teacher hidden state] pairs for the hidden-state loss:
            embeddings to embeddings, then student block i to teacher block kept[i].
    """

    model: nn.Module
    kept: list[int]
    layer_map: list[list[int]]


def derive_student(teacher: nn.Module, spec: StudentConfig) -> DerivedStudent:
    """Build a student from ``teacher`` (a transformers model) by keeping blocks and slicing widths.

    Raises CompressError for indices out of range, widths larger than the teacher's, or a quantized teacher.
    """
    from accelerate import init_empty_weights

    from ..quant.linear import QuantModule

    if any(isinstance(m, QuantModule) for m in teacher.modules()):
        raise CompressError("cannot derive a student from a quantized teacher; use the full-precision model")
    config = teacher.config
    n = block_count(config)
    if spec.layer_indices is not None:
        kept = list(spec.layer_indices)
        if kept[-1] >= n:
            raise CompressError(f"layer index {kept[-1]} is out of range: the teacher has {n} layers (0 to {n - 1})")
    else:
        kept = evenly_spaced(n, spec.layers if spec.layers is not None else max(1, n // 2))
    cfg = student_config(config, kept, spec.hidden_size, spec.intermediate_size)
    blocks_name, blocks = find_blocks(teacher)
    if len(blocks) != n:
        raise CompressError(f"the teacher's config says {n} layers but its block list {blocks_name} has {len(blocks)}")
    with init_empty_weights(include_buffers=False):
        student = type(teacher)._from_config(cfg)
    pattern = re.compile(rf"^{re.escape(blocks_name)}\.(\d+)\.(.+)$")
    source = teacher.state_dict()
    state = {}
    for name, tensor in student.state_dict(keep_vars=True).items():
        match = pattern.match(name)
        key = f"{blocks_name}.{kept[int(match.group(1))]}.{match.group(2)}" if match else name
        if key not in source:
            if tensor.device.type == "meta":
                raise CompressError(f"the teacher has no tensor {key} to initialise the student's {name}")
            continue  # a buffer the student computed itself
        state[name] = _slice_to(source[key], tensor.shape, name).detach().clone()
    student.load_state_dict(state, strict=False, assign=True)
    if hasattr(student, "tie_weights"):
        student.tie_weights()
    left = [n for n, t in [*student.named_parameters(), *student.named_buffers()] if t.device.type == "meta"]
    if left:
        raise CompressError(f"student tensor {left[0]} could not be initialised from the teacher")
    student.train()
    layer_map = [[0, 0]] + [[i + 1, k + 1] for i, k in enumerate(kept)]
    return DerivedStudent(model=student, kept=kept, layer_map=layer_map)


def uniform_layer_map(student_layers: int, teacher_layers: int) -> list[list[int]]:
    """Hidden-state pairs for unrelated models: embeddings to embeddings, student block i (1-based) to
    teacher block round(i * n_t / n_s), so the last blocks meet (TinyBERT's uniform mapping)."""
    pairs = [[0, 0]]
    for i in range(1, student_layers + 1):
        pairs.append([i, int(i * teacher_layers / student_layers + 0.5)])
    return pairs


# --------------------------------------------------------------------------------------------------
# Vocabularies


@dataclass
class TokenMap:
    """How a student vocabulary maps onto the teacher's (only when they differ).

    Attributes:
        lookup: int64 [V_s]: the teacher id of each student id (the teacher's unknown token where the
            mapping has no entry), used to feed the teacher the student's tokenization.
        student_ids, teacher_ids: int64 [M]: the mapped pairs; token-level soft losses compare the
            student's logits at student_ids with the teacher's at teacher_ids.
    """

    lookup: torch.Tensor
    student_ids: torch.Tensor
    teacher_ids: torch.Tensor


def _vocab(tokenizer) -> dict[str, int]:
    return dict(tokenizer.get_vocab())


def same_vocabulary(student_tok, teacher_tok) -> bool:
    """True when both tokenizers give every token the same id."""
    return _vocab(student_tok) == _vocab(teacher_tok)


_SPECIAL_ROLES = ("pad_token", "unk_token", "cls_token", "sep_token", "mask_token", "bos_token", "eos_token")


def read_token_map(path: str | Path, student_tok, teacher_tok) -> TokenMap:
    """Read a JSON object {student token: teacher token} into a TokenMap.

    Special tokens are paired by role (the student's [MASK] with the teacher's mask token, and so on)
    unless the file says otherwise. Raises CompressError for a missing or malformed file, or tokens that
    are not in the vocabularies.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise CompressError(f"vocabulary map {path} does not exist")
    try:
        mapping = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CompressError(f"vocabulary map {path} is not valid JSON ({e})") from None
    if not isinstance(mapping, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in mapping.items()):
        raise CompressError(f"vocabulary map {path} must be a JSON object of student token -> teacher token strings")
    sv, tv = _vocab(student_tok), _vocab(teacher_tok)
    for role in _SPECIAL_ROLES:
        s, t = getattr(student_tok, role, None), getattr(teacher_tok, role, None)
        if isinstance(s, str) and isinstance(t, str) and s in sv and t in tv:
            mapping.setdefault(s, t)
    pairs = {}
    for s, t in mapping.items():
        if s not in sv:
            raise CompressError(f"vocabulary map {path}: '{s}' is not a student token")
        if t not in tv:
            raise CompressError(f"vocabulary map {path}: '{t}' is not a teacher token")
        pairs[sv[s]] = tv[t]
    unk = teacher_tok.unk_token_id if teacher_tok.unk_token_id is not None else 0
    size = max(max(sv.values()) + 1, len(student_tok))
    lookup = torch.full((size,), unk, dtype=torch.long)
    ids = sorted(pairs)
    lookup[ids] = torch.tensor([pairs[i] for i in ids], dtype=torch.long)
    return TokenMap(lookup=lookup, student_ids=torch.tensor(ids, dtype=torch.long),
                    teacher_ids=torch.tensor([pairs[i] for i in ids], dtype=torch.long))


def check_vocabularies(student_tok, teacher_tok, vocab_map: str | None, task: str) -> TokenMap | None:
    """None when the vocabularies agree; a TokenMap from ``vocab_map`` when they differ; else a CompressError."""
    if same_vocabulary(student_tok, teacher_tok):
        return None
    if vocab_map is None:
        raise CompressError(
            f"the student's vocabulary ({len(student_tok)} tokens) differs from the teacher's ({len(teacher_tok)}); "
            "pass --vocab-map FILE.json mapping student tokens to teacher tokens, or use a student with the teacher's tokenizer"
        )
    return read_token_map(vocab_map, student_tok, teacher_tok)
