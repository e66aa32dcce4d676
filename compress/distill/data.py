"""Training data for distillation and fine-tuning: tokenized examples plus the collator that batches them.

Sources (``--data``):

- classify: a labeled .csv / .tsv / .jsonl file (``--text-field`` / ``--label-field`` columns), ``demo``
  (the demo task of calib_data/demo_task.py: train.csv for training, test.csv held out), or
  ``hf:NAME[:CONFIG]`` / ``hf:/saved/folder`` for a Hugging Face dataset already on this machine (its
  train split; test or validation held out).
- mlm, causal: any text source of compress.data (``builtin``, ``prose``, a .txt / .jsonl / .csv file, ``hf:...``),
  cut into windows of exactly ``max_length`` tokens. The held-out split of the source gives the
  evaluation windows.
- embed: the same text sources, as paragraphs of at least 8 words truncated to ``max_length`` tokens.

Every check on the data (missing columns, a single class, labels the teacher does not know) happens
here, before any model is trained or anything is written.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from ..data import CORPORA, load_labeled, load_texts, paragraphs, token_stream, windows
from ..errors import CompressError
from .losses import IGNORE_INDEX

EVAL_LIMIT = 512  # held-out examples evaluated during training (mlm / causal / embed)


class ExampleDataset(torch.utils.data.Dataset):
    """A list of feature dicts (``input_ids`` lists and, for classification, an integer ``labels``)."""

    def __init__(self, examples: list[dict[str, Any]]):
        self.examples = examples

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return self.examples[i]


@dataclass
class TaskData:
    """Everything the trainer needs to iterate over a task's examples.

    Attributes:
        task: classify, mlm, causal or embed.
        train, eval: datasets of tokenized examples (eval may be None).
        collator: turns a list of examples into a batch of padded tensors.
        labels: class names in id order (classify).
        eval_file: a labeled file of the held-out split, for the harness's accuracy (classify).
        source: where the examples came from, for messages.
    """

    task: str
    train: ExampleDataset
    eval: ExampleDataset | None
    collator: Callable
    labels: list[str] | None = None
    eval_file: Path | None = None
    source: str = ""
    counts: dict[str, int] = field(default_factory=dict)

    def describe(self) -> str:
        held = f", {len(self.eval)} held out" if self.eval is not None else ""
        classes = f" in {len(self.labels)} classes" if self.labels else ""
        return f"{self.task} data from {self.source}: {len(self.train)} training examples{classes}{held}"


# --------------------------------------------------------------------------------------------------
# Labeled text


def demo_files() -> dict[str, Path]:
    """train.csv and test.csv of the demo task (built on first use)."""
    from ..calib_data.demo_task import ensure_demo_task

    return ensure_demo_task()


def read_labeled(source: str, split: str = "train", text_field: str = "text",
                 label_field: str = "label") -> tuple[list[str], list[str]] | None:
    """(texts, labels as strings) of a labeled source's split; None when the source has no such split.

    ``split`` is train or test; a file has only a train split (hold data out with a second file).
    """
    if source == "demo":
        return load_labeled(demo_files()["train" if split == "train" else "test"], "text", "label")
    if source.startswith("hf:"):
        return _read_hf_labeled(source[3:], split, text_field, label_field)
    if split != "train":
        return None
    return load_labeled(source, text_field, label_field)


def _read_hf_labeled(spec: str, split: str, text_field: str, label_field: str):
    from ..data import _offline

    try:
        import datasets
    except ImportError:
        raise CompressError("hf: data sources need the datasets package: pip install 'compress[datasets]'") from None
    names = ("train",) if split == "train" else ("test", "validation")
    with _offline():
        try:
            if Path(spec).expanduser().is_dir():
                loaded = datasets.load_from_disk(str(Path(spec).expanduser()))
                if not isinstance(loaded, datasets.DatasetDict):
                    loaded = datasets.DatasetDict({"train": loaded})
            else:
                name, _, cfg = spec.partition(":")
                loaded = datasets.load_dataset(name, cfg or None)
        except Exception as e:  # datasets raises many types for a dataset that is not cached
            raise CompressError(f"dataset '{spec}' is not in the local Hugging Face cache and compress never downloads "
                                f"({type(e).__name__}); load it once on a connected machine or pass a local file") from None
    ds = next((loaded[n] for n in names if n in loaded), None)
    if ds is None:
        if split == "train":
            raise CompressError(f"dataset '{spec}' has no train split (splits: {', '.join(loaded)})")
        return None
    for column in (text_field, label_field):
        if column not in ds.column_names:
            raise CompressError(f"dataset '{spec}' has no column '{column}' (columns: {', '.join(ds.column_names)})")
    feature = ds.features[label_field]
    raw = ds[label_field]
    names_of = getattr(feature, "names", None)
    labels = [names_of[v] if names_of and isinstance(v, int) else str(v) for v in raw]
    return [str(t) for t in ds[text_field]], labels


def check_classes(labels: list[str], source: str) -> list[str]:
    """The sorted distinct labels; a CompressError when there are fewer than two."""
    classes = sorted(Counter(labels))
    if len(classes) < 2:
        raise CompressError(f"labeled data {source} has a single class ('{classes[0]}'); a classifier needs at least two")
    return classes


def label_ids(labels: list[str], label2id: dict[str, int], num_labels: int, source: str) -> list[int]:
    """Class ids of string labels by a model's label2id (or as integer ids in range when the names are generic)."""
    ids = []
    for label in labels:
        if label in label2id:
            ids.append(label2id[label])
        elif label.lstrip("-").isdigit() and 0 <= int(label) < num_labels and not _named(label2id):
            ids.append(int(label))
        else:
            known = ", ".join(sorted(label2id)) if _named(label2id) else f"0 to {num_labels - 1}"
            raise CompressError(f"label '{label}' in {source} is not one of the model's labels ({known})")
    return ids


def _named(label2id: dict[str, int]) -> bool:
    """Whether a label2id has real names (transformers fills in LABEL_0, LABEL_1 ... when there are none)."""
    return bool(label2id) and not all(k.startswith("LABEL_") for k in label2id)


def read_transfer(source: str, text_field: str = "text") -> list[str]:
    """Unlabeled texts of a transfer set: ``demo`` (the demo task's unlabeled.csv) or any text source."""
    if source == "demo":
        return load_texts(str(demo_files()["unlabeled"]), "train", "text")
    return load_texts(source, "train", text_field)


def classification_data(tokenizer, source: str, label2id: dict[str, int], num_labels: int, max_length: int,
                        eval_source: str | None = None, text_field: str = "text", label_field: str = "label",
                        max_samples: int | None = None, transfer: str | None = None) -> TaskData:
    """Tokenized labeled examples; the held-out split is the source's own (demo, hf) or ``eval_source``.

    ``transfer`` adds unlabeled texts (label -100): only the soft term learns from them, from the
    teacher's predictions, the way task-specific distillation uses a transfer set.
    """
    train = read_labeled(source, "train", text_field, label_field)
    check_classes(train[1], source)
    held = None
    eval_file = None
    if eval_source is not None:
        held = load_labeled(eval_source, text_field, label_field)
        eval_file = Path(eval_source)
    elif source != "demo":
        held = read_labeled(source, "test", text_field, label_field)
    else:
        held = read_labeled(source, "test")
        eval_file = demo_files()["test"]
    texts, labels = train
    if max_samples is not None:
        texts, labels = texts[:max_samples], labels[:max_samples]
    train_ids = label_ids(labels, label2id, num_labels, source)
    eval_ds = None
    if held is not None:
        eval_ds = _encode_labeled(tokenizer, held[0], label_ids(held[1], label2id, num_labels, eval_source or source), max_length)
    id2name = {v: k for k, v in label2id.items()}
    counts = dict(Counter(labels))
    if transfer is not None:
        extra = read_transfer(transfer, text_field)
        texts, train_ids = texts + extra, train_ids + [IGNORE_INDEX] * len(extra)
        counts["(unlabeled)"] = len(extra)
    return TaskData(task="classify", train=_encode_labeled(tokenizer, texts, train_ids, max_length), eval=eval_ds,
                    collator=ClassifyCollator(tokenizer), labels=[id2name.get(i, str(i)) for i in range(num_labels)],
                    eval_file=eval_file, source=source + (f" + {transfer} (unlabeled)" if transfer else ""),
                    counts=counts)


def _encode_labeled(tokenizer, texts: list[str], ids: list[int], max_length: int) -> ExampleDataset:
    enc = tokenizer(texts, truncation=True, max_length=max_length)
    keys = [k for k in ("input_ids", "attention_mask", "token_type_ids") if k in enc]
    return ExampleDataset([{**{k: enc[k][i] for k in keys}, "labels": ids[i]} for i in range(len(texts))])


class ClassifyCollator:
    """Pads a batch to its longest example (transformers' DataCollatorWithPadding); labels become [B]."""

    def __init__(self, tokenizer):
        from transformers import DataCollatorWithPadding

        self.inner = DataCollatorWithPadding(tokenizer, padding="longest", return_tensors="pt")

    def __call__(self, examples: list[dict]) -> dict[str, torch.Tensor]:
        return dict(self.inner(examples))


# --------------------------------------------------------------------------------------------------
# Unlabeled text


def _lm_windows(tokenizer, source: str, split: str, seqlen: int, text_field: str, limit: int | None) -> list[list[int]]:
    texts = load_texts(source, split, text_field)
    cap = None if limit is None else (limit + 1) * seqlen + 4096
    stream = token_stream(texts, tokenizer, max_tokens=cap)
    wins = windows(stream, tokenizer, seqlen)
    if wins.shape[0] == 0:
        raise CompressError(f"data {source} holds {stream.numel()} tokens, fewer than one window of {seqlen}; "
                            "give more text or lower --max-length")
    if limit is not None:
        wins = wins[:limit]
    return wins.tolist()


def _heldout_or_none(fn):
    try:
        return fn()
    except CompressError:
        return None


def lm_data(task: str, tokenizer, source: str, max_length: int, mlm_probability: float = 0.15,
            text_field: str = "text", max_samples: int | None = None) -> TaskData:
    """Windows of ``max_length`` tokens for masked (task mlm) or causal (task causal) LM distillation."""
    if task == "mlm" and tokenizer.mask_token_id is None:
        raise CompressError("the tokenizer has no mask token, so it cannot be used for the mlm task")
    train = _lm_windows(tokenizer, source, "train", max_length, text_field, max_samples)
    held = None
    if source in CORPORA or source.startswith("hf:"):
        held = _heldout_or_none(lambda: _lm_windows(tokenizer, source, "heldout", max_length, text_field, EVAL_LIMIT // 4))
    as_examples = lambda rows: ExampleDataset([{"input_ids": r, "attention_mask": [1] * len(r)} for r in rows])  # noqa: E731
    collator = MLMCollator(tokenizer, mlm_probability) if task == "mlm" else CausalCollator()
    return TaskData(task=task, train=as_examples(train), eval=as_examples(held) if held else None, collator=collator,
                    source=source)


class MLMCollator:
    """BERT masking (transformers' DataCollatorForLanguageModeling): ``mlm_probability`` of the ordinary
    tokens are chosen; 80% become [MASK], 10% a random token, 10% stay. labels are -100 except there.

    Masking draws from torch's global generator, which the Trainer seeds and saves in each checkpoint,
    so a resumed run masks exactly as an uninterrupted one."""

    def __init__(self, tokenizer, mlm_probability: float):
        from transformers import DataCollatorForLanguageModeling

        self.inner = DataCollatorForLanguageModeling(tokenizer, mlm=True, mlm_probability=mlm_probability,
                                                     return_tensors="pt")

    def __call__(self, examples: list[dict]) -> dict[str, torch.Tensor]:
        return dict(self.inner(examples))


class CausalCollator:
    """Stacks equal-length windows; labels are the inputs (the model shifts them)."""

    def __call__(self, examples: list[dict]) -> dict[str, torch.Tensor]:
        ids = torch.tensor([e["input_ids"] for e in examples], dtype=torch.long)
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}


def embedding_data(tokenizer, source: str, max_length: int, text_field: str = "text",
                   max_samples: int | None = None) -> TaskData:
    """Paragraphs (8 words or more) for sentence-embedding distillation, truncated to ``max_length`` tokens."""
    train = paragraphs(load_texts(source, "train", text_field), min_words=8)
    if max_samples is not None:
        train = train[:max_samples]
    if len(train) < 2:
        raise CompressError(f"data {source} has fewer than 2 paragraphs of 8 words or more; embedding distillation "
                            "compares the sentences of a batch with each other")
    held = None
    if source in CORPORA or source.startswith("hf:"):
        held = _heldout_or_none(lambda: paragraphs(load_texts(source, "heldout", text_field), min_words=8)[:EVAL_LIMIT])

    def encode(texts):
        enc = tokenizer(texts, truncation=True, max_length=max_length)
        keys = [k for k in ("input_ids", "attention_mask", "token_type_ids") if k in enc]
        return ExampleDataset([{k: enc[k][i] for k in keys} for i in range(len(texts))])

    return TaskData(task="embed", train=encode(train), eval=encode(held) if held else None,
                    collator=ClassifyCollator(tokenizer), source=source)
