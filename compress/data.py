"""Calibration and evaluation text: the built-in corpus, user files, and cached Hugging Face datasets.

Sources, as the CLI's ``--calib`` / ``--data`` flags take them:

- ``builtin``: the built-in corpus (calib_data/corpus.py), train split for calibration and training,
  held-out split for evaluation.
- ``prose``: English prose from the GNU info manuals installed on this machine (calib_data/prose.py),
  split by manual the same way; closer to what language models are trained on than ``builtin``.
- a file: ``.txt`` (documents separated by blank lines), ``.jsonl`` (one JSON object per line, the
  text in ``text_field``), ``.csv`` / ``.tsv`` (the text in the column ``text_field``).
- ``hf:NAME[:CONFIG]``: a dataset already in the local Hugging Face cache (never downloaded), or
  ``hf:/path`` for a folder written by ``Dataset.save_to_disk``.

Sampling turns documents into ``nsamples x seqlen`` token blocks: the documents are tokenized and
joined with a separator token, cut into consecutive windows, and the windows drawn by a seeded
permutation, so the same seed always gives the same samples.
"""

from __future__ import annotations

import csv
import io
import json
import os
import random
import stat
from contextlib import contextmanager
from pathlib import Path

import torch

from .errors import CompressError
from .files import read_bounded

TEXT_SUFFIXES = (".txt", ".md", ".text")
JSONL_SUFFIXES = (".jsonl", ".json", ".ndjson")
CSV_SUFFIXES = (".csv", ".tsv")
# a data file is read whole into memory; corpora beyond this belong in a saved dataset (hf:/path), memory-mapped
MAX_DATA_BYTES = 2 * 1024**3


# corpora built on this machine, each with a fixed train / held-out split
CORPORA = ("builtin", "prose")


def load_texts(source: str = "builtin", split: str = "train", text_field: str = "text") -> list[str]:
    """Documents of ``source`` (see the module docstring); ``split`` applies to CORPORA and hf sources.

    Raises CompressError when the source is missing, unreadable or holds no text.
    """
    if source in CORPORA:
        from .calib_data import corpus, prose

        load_corpus = corpus.load_corpus if source == "builtin" else prose.load_corpus
        texts = load_corpus("heldout" if split in ("heldout", "test", "validation") else "train")
    elif source.startswith("hf:"):
        texts = _load_hf(source[3:], split, text_field)
    else:
        texts = _load_file(Path(source).expanduser(), text_field)
    texts = [t for t in texts if t and t.strip()]
    if not texts:
        raise CompressError(f"data source {source} holds no text")
    return texts


def check_data_file(path: Path, what: str = "data file") -> None:
    """Refuse a data path that is missing, a folder, not a regular file (a FIFO would block, /dev/zero
    never ends) or larger than MAX_DATA_BYTES, before it is opened."""
    try:
        info = os.stat(path)
    except FileNotFoundError:
        raise CompressError(f"{what} {path} does not exist") from None
    except OSError as e:
        raise CompressError(f"{what} {path} cannot be read ({e.strerror})") from None
    if stat.S_ISDIR(info.st_mode):
        raise CompressError(f"{what} {path} is a folder; pass a .txt, .jsonl or .csv file (or hf:{path} for a saved dataset)")
    if not stat.S_ISREG(info.st_mode):
        raise CompressError(f"{what} {path} is not a regular file (a pipe, device or socket); pass a .txt, .jsonl or .csv file")
    if info.st_size > MAX_DATA_BYTES:
        raise _too_big(path, what)


def _too_big(path: Path, what: str) -> CompressError:
    return CompressError(f"{what} {path} is larger than {MAX_DATA_BYTES // 1024**3} GiB; save a corpus that large as a "
                         "dataset (Dataset.save_to_disk) and pass hf:/path")


def read_data_text(path: Path, what: str = "data file") -> str:
    """The UTF-8 text of a data file that :func:`check_data_file` accepts.

    The read is non-blocking and bounded, so a file swapped for a pipe or growing meanwhile cannot hang
    or exhaust memory.
    """
    check_data_file(path, what)
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
        with os.fdopen(fd, "rb") as f:
            data = read_bounded(f, MAX_DATA_BYTES)
    except OSError as e:
        raise CompressError(f"{what} {path} cannot be read ({e.strerror})") from None
    if len(data) > MAX_DATA_BYTES:
        raise _too_big(path, what)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise CompressError(f"{what} {path} is not UTF-8 text") from None


def _load_file(path: Path, text_field: str) -> list[str]:
    suffix = path.suffix.lower()
    if suffix not in (*JSONL_SUFFIXES, *CSV_SUFFIXES, *TEXT_SUFFIXES, ""):
        check_data_file(path)  # a missing file or a pipe is the first thing to say
        raise CompressError(f"data file {path} has an unknown type '{suffix}'; use .txt, .jsonl or .csv")
    if suffix in JSONL_SUFFIXES:
        return [str(rec[text_field]) for rec in _read_jsonl(path, text_field)]
    if suffix in CSV_SUFFIXES:
        return [row[text_field] for row in _read_csv(path, text_field)]
    text = read_data_text(path)
    return [block.strip() for block in text.split("\n\n") if block.strip()]


def _read_jsonl(path: Path, required: str, *more: str, what: str = "data file") -> list[dict]:
    text = read_data_text(path, what)
    if path.suffix.lower() == ".json" and text.lstrip().startswith("["):
        try:
            records = json.loads(text)
        except json.JSONDecodeError as e:
            raise CompressError(f"{path} is not valid JSON ({e})") from None
    else:
        records = []
        for i, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                raise CompressError(f"line {i} of {path} is not valid JSON") from None
    for i, rec in enumerate(records, 1):
        for name in (required, *more):
            if not isinstance(rec, dict) or name not in rec:
                raise CompressError(f"record {i} of {path} has no field '{name}'")
    return records


def _read_csv(path: Path, required: str, *more: str, what: str = "data file") -> list[dict]:
    text = read_data_text(path, what)
    reader = csv.DictReader(io.StringIO(text, newline=""), delimiter="\t" if path.suffix.lower() == ".tsv" else ",")
    columns = reader.fieldnames or []
    for name in (required, *more):
        if name not in columns:
            raise CompressError(f"{path} has no column '{name}' (columns: {', '.join(columns) or 'none'})")
    try:
        return list(reader)
    except csv.Error as e:
        raise CompressError(f"{path} is not valid CSV ({e})") from None


@contextmanager
def _offline():
    keys = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")
    old = {k: os.environ.get(k) for k in keys}
    os.environ.update({k: "1" for k in keys})
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _load_hf(spec: str, split: str, text_field: str) -> list[str]:
    try:
        import datasets
    except ImportError:
        raise CompressError("hf: data sources need the datasets package: pip install 'compress[datasets]'") from None
    split = {"heldout": "test"}.get(split, split)
    with _offline():
        try:
            if Path(spec).expanduser().is_dir():
                ds = datasets.load_from_disk(str(Path(spec).expanduser()))
                if isinstance(ds, datasets.DatasetDict):
                    ds = ds[split] if split in ds else ds[next(iter(ds))]
            else:
                name, _, cfg = spec.partition(":")
                ds = datasets.load_dataset(name, cfg or None, split=split)
        except Exception as e:  # datasets raises many types for a dataset that is not cached
            raise CompressError(
                f"dataset '{spec}' (split {split}) is not in the local Hugging Face cache and compress never downloads "
                f"({type(e).__name__}); load it once on a connected machine or pass a local file"
            ) from None
    if text_field not in ds.column_names:
        raise CompressError(f"dataset '{spec}' has no column '{text_field}' (columns: {', '.join(ds.column_names)})")
    return [str(t) for t in ds[text_field]]


def load_labeled(path: str | Path, text_field: str = "text", label_field: str = "label") -> tuple[list[str], list[str]]:
    """(texts, labels) of a labeled .csv / .tsv / .jsonl file; labels come back as strings."""
    path = Path(path).expanduser()
    suffix = path.suffix.lower()
    if suffix in CSV_SUFFIXES:
        rows = _read_csv(path, text_field, label_field, what="labeled file")
    elif suffix in JSONL_SUFFIXES:
        rows = _read_jsonl(path, text_field, label_field, what="labeled file")
    else:
        check_data_file(path, "labeled file")  # a missing file or a pipe is the first thing to say
        raise CompressError(f"labeled file {path} must be .csv, .tsv or .jsonl")
    if not rows:
        raise CompressError(f"labeled file {path} has no rows")
    return [str(r[text_field]) for r in rows], [str(r[label_field]) for r in rows]


def paragraphs(texts: list[str], min_words: int = 8) -> list[str]:
    """Paragraphs (blank-line separated) of ``texts`` with at least ``min_words`` words."""
    out = []
    for text in texts:
        out += [p.strip() for p in text.split("\n\n") if len(p.split()) >= min_words]
    return out


def separator_id(tokenizer) -> int | None:
    """Token placed between documents: EOS, else SEP, else none."""
    for attr in ("eos_token_id", "sep_token_id"):
        value = getattr(tokenizer, attr, None)
        if isinstance(value, int):
            return value
    return None


def token_stream(texts: list[str], tokenizer, max_tokens: int | None = None) -> torch.Tensor:
    """Documents tokenized without special tokens and joined by the separator token (int64 [T]).

    Stops once ``max_tokens`` are collected, so a small request does not tokenize a whole corpus.
    """
    sep = separator_id(tokenizer)
    ids: list[int] = []
    batch = 256
    for start in range(0, len(texts), batch):
        encoded = tokenizer(texts[start:start + batch], add_special_tokens=False)["input_ids"]
        for doc in encoded:
            ids += doc
            if sep is not None:
                ids.append(sep)
        if max_tokens is not None and len(ids) >= max_tokens:
            break
    return torch.tensor(ids[:max_tokens] if max_tokens else ids, dtype=torch.long)


def special_affixes(tokenizer) -> tuple[list[int], list[int]]:
    """The special tokens the tokenizer puts before and after a single text (BERT: [CLS] / [SEP]; Llama: <s> / none).

    Found by encoding one word with and without special tokens, which works for every tokenizer backend.
    """
    plain = tokenizer("hello", add_special_tokens=False)["input_ids"]
    full = tokenizer("hello", add_special_tokens=True)["input_ids"]
    for start in range(len(full) - len(plain) + 1):
        if full[start:start + len(plain)] == plain:
            return full[:start], full[start + len(plain):]
    return [], []


def windows(stream: torch.Tensor, tokenizer, seqlen: int) -> torch.Tensor:
    """Cut a token stream into consecutive model inputs of exactly ``seqlen`` tokens [W, seqlen].

    Each window gets the tokenizer's own special tokens (BERT: [CLS] ... [SEP]; Llama: <s> ...), so an
    encoder sees inputs shaped like its training data.
    """
    prefix, suffix = special_affixes(tokenizer)
    body = seqlen - len(prefix) - len(suffix)
    if body < 1:
        raise CompressError(f"sequence length {seqlen} leaves no room for text after the {len(prefix) + len(suffix)} special tokens")
    count = stream.numel() // body
    chunks = stream[: count * body].view(count, body)
    pre = torch.tensor(prefix, dtype=torch.long).expand(count, len(prefix))
    post = torch.tensor(suffix, dtype=torch.long).expand(count, len(suffix))
    return torch.cat([pre, chunks, post], dim=1)


def calibration(
    tokenizer,
    source: str = "builtin",
    nsamples: int = 128,
    seqlen: int = 512,
    seed: int = 0,
    split: str = "train",
    text_field: str = "text",
) -> torch.Tensor:
    """``nsamples`` token blocks of ``seqlen`` tokens [nsamples, seqlen], deterministic for a seed.

    Raises CompressError when the source holds fewer than nsamples windows of that length.
    """
    if nsamples < 1 or seqlen < 2:
        raise CompressError(f"calibration needs at least 1 sample of at least 2 tokens (got {nsamples} x {seqlen})")
    texts = load_texts(source, split, text_field)
    cap = None
    if len(texts) >= 2000:
        # a large source: tokenize a seeded random subset, a little more than needed (documents are ragged)
        random.Random(seed).shuffle(texts)
        cap = 2 * nsamples * seqlen + 4096
    stream = token_stream(texts, tokenizer, max_tokens=cap)
    blocks = windows(stream, tokenizer, seqlen)
    if blocks.shape[0] < nsamples:
        raise CompressError(
            f"calibration data {source} holds {stream.numel()} tokens, enough for {blocks.shape[0]} samples of "
            f"{seqlen} tokens but {nsamples} were requested; give more text, or lower --nsamples or --seqlen"
        )
    order = torch.randperm(blocks.shape[0], generator=torch.Generator().manual_seed(seed))
    return blocks[order[:nsamples]]
