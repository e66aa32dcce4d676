"""The tokenizer of a Hugging Face model folder as GGUF metadata (tokenizer.ggml.*).

Three kinds are written, read from the folder's tokenizer.json (the fast tokenizer's own description):

- byte-level BPE ("gpt2" in llama.cpp): tokens in the byte-to-unicode alphabet, merges, and a
  pre-tokenizer type. llama.cpp's converter recognises pre-tokenizers by hashing the token ids of a
  test string, so it refuses every tokenizer trained by its owner. We read the pre-tokenizer from the
  configuration instead (GPT-2's ByteLevel regex, or a Split regex followed by ByteLevel) and map it
  to the llama.cpp type that implements the same regex.
- SentencePiece ("llama"): BPE with byte fallback or Unigram, with scores and byte tokens <0xNN>.
- WordPiece ("bert"): tokens rewritten to llama.cpp's phantom-space form (a word start gets U+2581,
  a continuation loses its "##").

Special tokens (bos, eos, unk, pad, sep, cls, mask) and whether encoding adds bos/eos are what the
transformers tokenizer reports, so they agree with what the model was trained with. For tokenizer
classes that add nothing to tokenizer.json's own behaviour (the generic fast tokenizer, BERT, GPT-2,
Qwen2) they are read from the folder's JSON files and the `tokenizers` library directly, which gives
the same answer without importing transformers (seconds and hundreds of MB, more than exporting a
small model takes); any other class is asked through transformers' AutoTokenizer.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import CompressError

# token types (gguf.TokenType), kept here so this module needs gguf only when writing
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6

GPT2_REGEX = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
# Split regexes as tokenizer.json files spell them -> the llama.cpp pre-tokenizer that implements them
SPLIT_REGEXES = {
    GPT2_REGEX: "gpt-2",
    r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)": "gpt-2",
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+": "llama-bpe",
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+": "qwen2",
}
SUPPORTED = "byte-level BPE (GPT-2, Llama 3 or Qwen2 pre-tokenization), SentencePiece (BPE or Unigram) and WordPiece"


@dataclass
class Vocab:
    """What llama.cpp needs to tokenize: one entry per id in ``tokens``, ``types`` and ``scores``."""

    model: str  # "gpt2", "llama" or "bert"
    pre: str  # pre-tokenizer type
    tokens: list[str]
    types: list[int]
    scores: list[float] | None = None
    merges: list[str] | None = None
    special: dict[str, int] = field(default_factory=dict)  # bos/eos/unk/pad/sep/cls/mask -> id
    add_bos: bool = False
    add_eos: bool = False
    add_sep: bool = False
    add_space_prefix: bool | None = None
    chat_template: str | None = None  # Jinja; without it llama.cpp falls back to the llama-2 chat format

    def write(self, writer) -> None:
        """Add the tokenizer.ggml.* keys to a gguf.GGUFWriter."""
        writer.add_tokenizer_model(self.model)
        writer.add_tokenizer_pre(self.pre)
        writer.add_token_list(self.tokens)
        writer.add_token_types(self.types)
        if self.scores is not None:
            writer.add_token_scores(self.scores)
        if self.merges is not None:
            writer.add_token_merges(self.merges)
        adders = {"bos": writer.add_bos_token_id, "eos": writer.add_eos_token_id, "unk": writer.add_unk_token_id,
                  "pad": writer.add_pad_token_id, "sep": writer.add_sep_token_id, "mask": writer.add_mask_token_id}
        for name, token_id in self.special.items():
            if name == "cls":
                continue  # llama.cpp has no separate classifier token: WordPiece models carry it as bos
            adders[name](token_id)
        writer.add_add_bos_token(self.add_bos)
        writer.add_add_eos_token(self.add_eos)
        if self.add_sep:
            writer.add_add_sep_token(True)
        if self.add_space_prefix is not None:
            writer.add_add_space_prefix(self.add_space_prefix)
        if self.chat_template is not None:
            writer.add_chat_template(self.chat_template)


def read_vocab(folder: str | Path, vocab_size: int | None = None) -> Vocab:
    """The tokenizer of ``folder`` as a :class:`Vocab`; a CompressError when it is missing or unsupported.

    ``vocab_size`` (the model's embedding rows) pads the token list with unused entries when the
    model has more rows than the tokenizer has tokens.
    """
    folder = Path(folder)
    path = folder / "tokenizer.json"
    if not path.is_file():
        raise CompressError(f"{folder} has no tokenizer.json; GGUF export needs the model's fast tokenizer "
                            f"({SUPPORTED}) saved with it")
    try:
        spec = json.loads(path.read_text(encoding="utf-8"))
        kind = spec["model"]["type"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise CompressError(f"{path} is not a valid tokenizer file ({e})") from None
    if kind == "WordPiece":
        vocab = _wordpiece(spec)
    elif kind == "BPE" and spec["model"].get("byte_fallback"):
        vocab = _sentencepiece_bpe(spec)
    elif kind == "BPE":
        vocab = _byte_level_bpe(spec)
    elif kind == "Unigram":
        vocab = _unigram(spec)
    else:
        raise CompressError(f"tokenizer model type {kind} cannot be exported to GGUF; supported: {SUPPORTED}")
    _add_special(vocab, spec, folder)
    vocab.chat_template = read_chat_template(folder)
    if vocab_size is not None and vocab_size < len(vocab.tokens):
        raise CompressError(f"the tokenizer has {len(vocab.tokens)} tokens but the model only {vocab_size} embedding rows; "
                            f"llama.cpp needs one row per token")
    if vocab_size is not None and vocab_size > len(vocab.tokens):
        for i in range(len(vocab.tokens), vocab_size):
            vocab.tokens.append(f"[PAD{i}]")
            vocab.types.append(UNUSED)
            if vocab.scores is not None:
                vocab.scores.append(-10000.0)
    return vocab


def _load_hf(folder: Path):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(folder))
    except Exception as e:  # transformers raises many types for unreadable tokenizers
        raise CompressError(f"the tokenizer in {folder} cannot be loaded ({type(e).__name__}: {str(e).splitlines()[0][:120]})") from None


def _ordered(vocab: dict[str, int], added: list[dict]) -> tuple[list[str], list[int]]:
    """Token strings by id (holes filled with unused entries) and their types; added tokens marked."""
    by_id = {i: t for t, i in vocab.items()}
    for a in added:
        by_id[a["id"]] = a["content"]
    n = max(by_id) + 1 if by_id else 0
    tokens = [by_id.get(i, f"[PAD{i}]") for i in range(n)]
    types = [NORMAL if i in by_id else UNUSED for i in range(n)]
    for a in added:
        types[a["id"]] = CONTROL if a.get("special") else USER_DEFINED
    return tokens, types


def bpe_pre_type(pre_tokenizer: dict | None) -> str:
    """The llama.cpp pre-tokenizer type for a byte-level BPE tokenizer's pre_tokenizer configuration."""
    if pre_tokenizer is None:
        raise CompressError("the byte-level BPE tokenizer has no pre-tokenizer; llama.cpp cannot reproduce its splits")
    steps = pre_tokenizer["pretokenizers"] if pre_tokenizer.get("type") == "Sequence" else [pre_tokenizer]
    byte_level = [s for s in steps if s.get("type") == "ByteLevel"]
    splits = [s for s in steps if s.get("type") == "Split"]
    others = [s["type"] for s in steps if s.get("type") not in ("ByteLevel", "Split", "Digits")]
    if len(byte_level) != 1 or others or byte_level[0].get("add_prefix_space"):
        described = ", ".join(s.get("type", "?") + (" with add_prefix_space" if s.get("add_prefix_space") else "") for s in steps)
        raise CompressError(f"the BPE pre-tokenizer ({described}) has no llama.cpp equivalent; supported: "
                            f"ByteLevel with GPT-2 splitting, or a GPT-2, Llama 3 or Qwen2 Split regex before ByteLevel")
    digits = [s for s in steps if s.get("type") == "Digits"]
    if not splits:
        if not byte_level[0].get("use_regex", True):
            raise CompressError("the BPE pre-tokenizer is ByteLevel without a splitting regex, which llama.cpp does not implement")
        if not digits:
            return "gpt-2"
        # every digit its own piece, then GPT-2's regex (SmolLM): llama.cpp's "smollm" runs exactly these two
        if len(digits) == 1 and digits[0].get("individual_digits") and steps.index(digits[0]) < steps.index(byte_level[0]):
            return "smollm"
        raise CompressError("the BPE pre-tokenizer's Digits step keeps runs of digits together, which llama.cpp "
                            "does not implement; supported: Digits with individual_digits before ByteLevel")
    if len(splits) != 1 or any(s.get("type") == "Digits" for s in steps):
        raise CompressError("the BPE pre-tokenizer combines several splitting steps, which llama.cpp does not implement")
    pattern = splits[0].get("pattern", {})
    regex = pattern.get("Regex", pattern.get("String"))
    if regex not in SPLIT_REGEXES:
        raise CompressError(f"the BPE pre-tokenizer's split regex {regex!r} matches no llama.cpp pre-tokenizer; "
                            f"supported: GPT-2, Llama 3 and Qwen2 regexes")
    return SPLIT_REGEXES[regex]


def _merges(model: dict) -> list[str]:
    return [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]


def _byte_level_bpe(spec: dict) -> Vocab:
    normalizer = spec.get("normalizer")
    if normalizer is not None and normalizer.get("type") not in ("NFC",):
        raise CompressError(f"the BPE tokenizer's normalizer {normalizer.get('type')} has no llama.cpp equivalent")
    pre = bpe_pre_type(spec.get("pre_tokenizer"))
    tokens, types = _ordered(spec["model"]["vocab"], spec.get("added_tokens", []))
    return Vocab("gpt2", pre, tokens, types, merges=_merges(spec["model"]))


def _sentencepiece_bpe(spec: dict) -> Vocab:
    tokens, types = _ordered(spec["model"]["vocab"], spec.get("added_tokens", []))
    rank = {}
    for k, merge in enumerate(_merges(spec["model"])):
        rank.setdefault(merge.replace(" ", ""), k)
    # llama.cpp merges the pair whose result scores highest: earlier merges score higher
    scores = [-float(rank.get(t, 0)) if types[i] == NORMAL else 0.0 for i, t in enumerate(tokens)]
    for i, t in enumerate(tokens):
        if types[i] == NORMAL and len(t) == 6 and t.startswith("<0x") and t.endswith(">"):
            types[i] = BYTE
    unk = spec["model"].get("unk_token")
    if unk in spec["model"]["vocab"]:
        types[spec["model"]["vocab"][unk]] = UNKNOWN
    return Vocab("llama", "default", tokens, types, scores=scores, add_space_prefix=_prepends_space(spec))


def _unigram(spec: dict) -> Vocab:
    pieces = spec["model"]["vocab"]
    tokens = [p[0] for p in pieces]
    scores = [float(p[1]) for p in pieces]
    types = [BYTE if len(t) == 6 and t.startswith("<0x") and t.endswith(">") else NORMAL for t in tokens]
    if spec["model"].get("unk_id") is not None:
        types[spec["model"]["unk_id"]] = UNKNOWN
    for a in spec.get("added_tokens", []):
        if a["id"] < len(tokens):
            types[a["id"]] = CONTROL if a.get("special") else USER_DEFINED
    return Vocab("llama", "default", tokens, types, scores=scores, add_space_prefix=_prepends_space(spec))


def _prepends_space(spec: dict) -> bool:
    """Whether the SentencePiece normalizer or pre-tokenizer puts U+2581 before the first word."""
    text = json.dumps([spec.get("normalizer"), spec.get("pre_tokenizer")])
    return '"Prepend"' in text or '"prepend_scheme": "always"' in text or '"prepend_scheme": "first"' in text \
        or '"add_prefix_space": true' in text


def _wordpiece(spec: dict) -> Vocab:
    tokens, types = _ordered(spec["model"]["vocab"], spec.get("added_tokens", []))
    prefix = spec["model"].get("continuing_subword_prefix", "##")

    def phantom(token: str, kind: int) -> str:
        if kind == CONTROL:
            return token
        return token[len(prefix):] if token.startswith(prefix) else "\u2581" + token

    return Vocab("bert", "default", [phantom(t, k) for t, k in zip(tokens, types)], types)


# tokenizer classes whose special tokens and templates are exactly what their files say
PLAIN_CLASSES = {"PreTrainedTokenizerFast", "TokenizersBackend", "BertTokenizer", "BertTokenizerFast",
                 "GPT2Tokenizer", "GPT2TokenizerFast", "Qwen2Tokenizer", "Qwen2TokenizerFast"}
SPECIAL_NAMES = ("bos", "eos", "unk", "pad", "sep", "cls", "mask")


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    except json.JSONDecodeError as e:
        raise CompressError(f"{path} is not valid JSON ({e})") from None
    return data if isinstance(data, dict) else {}


def read_chat_template(folder: Path) -> str | None:
    """The folder's chat template: chat_template.jinja, else tokenizer_config.json's chat_template (a string,
    or the one named "default" in a list of named templates); None when it has none."""
    path = folder / "chat_template.jinja"
    if path.is_file():
        try:
            return path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise CompressError(f"cannot read the chat template {path} ({e})") from None
    template = _read_json(folder / "tokenizer_config.json").get("chat_template")
    if isinstance(template, list):
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    return template if isinstance(template, str) and template else None


def special_from_files(folder: Path, spec: dict) -> tuple[dict[str, int], bool, bool] | None:
    """(special token ids, adds bos, adds eos) from the folder's files, or None when transformers must be asked.

    Token strings come from tokenizer_config.json (then special_tokens_map.json), ids from
    tokenizer.json's added tokens and vocabulary; whether encoding adds bos/eos from running the
    tokenizer.json post-processor on one word with and without special tokens.
    """
    config = _read_json(folder / "tokenizer_config.json")
    if config.get("tokenizer_class") not in PLAIN_CLASSES or "add_bos_token" in config or "add_eos_token" in config:
        return None
    mapped = _read_json(folder / "special_tokens_map.json")
    added = {a["content"]: a["id"] for a in spec.get("added_tokens", [])}
    model = spec["model"]
    pieces = model["vocab"]
    lookup = {p[0]: i for i, p in enumerate(pieces)} if isinstance(pieces, list) else pieces
    special = {}
    for name in SPECIAL_NAMES:
        value = config.get(f"{name}_token", mapped.get(f"{name}_token"))
        if isinstance(value, dict):
            value = value.get("content")
        if isinstance(value, str):
            token_id = added.get(value, lookup.get(value))
            if isinstance(token_id, int):
                special[name] = token_id
    from tokenizers import Tokenizer

    tok = Tokenizer.from_str(json.dumps(spec))
    ids, plain = tok.encode("a", add_special_tokens=True).ids, tok.encode("a", add_special_tokens=False).ids
    grew = len(ids) > len(plain)
    return special, grew and ids[0] == special.get("bos", -1), grew and ids[-1] == special.get("eos", -1)


def _add_special(vocab: Vocab, spec: dict, folder: Path) -> None:
    lean = special_from_files(folder, spec)
    if lean is None:
        special, add_bos, add_eos = _special_from_transformers(folder)
    else:
        special, add_bos, add_eos = lean
    vocab.special = {k: v for k, v in special.items() if 0 <= v < len(vocab.tokens)}
    if vocab.model == "bert":
        # llama.cpp frames a WordPiece sequence as bos ... sep: the classifier token is its bos
        if "cls" in vocab.special:
            vocab.special["bos"] = vocab.special["cls"]
        vocab.add_bos, vocab.add_sep = "cls" in vocab.special, "sep" in vocab.special
        return
    vocab.add_bos, vocab.add_eos = add_bos, add_eos


def _special_from_transformers(folder: Path) -> tuple[dict[str, int], bool, bool]:
    """What :func:`special_from_files` reads, as transformers' own tokenizer reports it."""
    hf = _load_hf(folder)
    special = {}
    for name in SPECIAL_NAMES:
        token_id = getattr(hf, f"{name}_token_id", None)
        if isinstance(token_id, int):
            special[name] = token_id
    ids = hf("a", add_special_tokens=True)["input_ids"]
    plain = hf("a", add_special_tokens=False)["input_ids"]
    grew = len(ids) > len(plain)
    return special, grew and ids[0] == special.get("bos", -1), grew and ids[-1] == special.get("eos", -1)
