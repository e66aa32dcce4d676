"""The demo classification task: docstrings of the built-in corpus labeled by the library area they document.

Made on this machine from text that is always installed (the built-in corpus: docstrings of the Python
standard library, torch and numpy), never downloaded and never committed. Each example is one
docstring (its paragraphs joined, at most its first MAX_WORDS words); its label is the area of the source file it comes from, for example
``stdlib:email/...`` -> ``internet`` or ``torch:nn/...`` -> ``neural-nets``.

The split is by source file, so docstrings of one file never appear on both sides: within each area,
files are ordered by a hash of their name and the first ones go to the held-out split until it holds
a quarter of the area's examples. Each area then keeps at most TRAIN_PER_CLASS training and
TEST_PER_CLASS held-out examples, chosen by a hash of their text. Everything is a function of the corpus
alone, so the same corpus always gives the same files.

The training-side docstrings that the caps leave out (at most UNLABELED_PER_CLASS per area, never one
from a held-out file) form unlabeled.csv: text without labels, a transfer set on which a teacher's
predictions can be distilled (the hard-label baseline cannot use it).

Files (``cache_dir()/demo-task-<corpus key>-v<version>/``): train.csv and test.csv with the columns
``text`` and ``label``, unlabeled.csv with the column ``text``.
"""

from __future__ import annotations

import csv
import hashlib
import json
from collections import defaultdict
from pathlib import Path

from .corpus import cache_dir, corpus_key, ensure_corpus, write_cached

BUILDER_VERSION = 2
HELDOUT_FRACTION = 0.25
TRAIN_PER_CLASS = 300
TEST_PER_CLASS = 100
UNLABELED_PER_CLASS = 300
MIN_WORDS = 6
MAX_WORDS = 96  # longer docstrings keep their beginning: about 128 BERT tokens, so examples fit one training window

# label -> source prefixes ("library:path") whose docstrings belong to it
AREAS: dict[str, tuple[str, ...]] = {
    "distributed": ("torch:distributed/", "torch:multiprocessing/", "stdlib:multiprocessing/"),
    "gui": ("stdlib:tkinter/", "stdlib:turtle.py"),
    "internet": ("stdlib:email/", "stdlib:http/", "stdlib:urllib/", "stdlib:mailbox.py", "stdlib:imaplib.py",
                 "stdlib:smtplib.py", "stdlib:nntplib.py", "stdlib:xmlrpc/", "stdlib:wsgiref/", "stdlib:ftplib.py",
                 "stdlib:poplib.py"),
    "neural-nets": ("torch:nn/", "torch:optim/"),
    "arrays": ("numpy:lib/", "numpy:_core/", "numpy:ma/", "numpy:polynomial/", "numpy:linalg/", "numpy:fft/",
               "numpy:random/"),
    "packaging": ("stdlib:distutils/", "numpy:distutils/", "stdlib:importlib/", "stdlib:pkgutil.py",
                  "stdlib:zipimport.py"),
    "graphs": ("torch:fx/", "torch:export/", "torch:_export/", "torch:onnx/", "torch:jit/"),
    "debugging": ("stdlib:unittest/", "stdlib:doctest.py", "stdlib:pdb.py", "stdlib:bdb.py", "stdlib:trace.py",
                  "stdlib:traceback.py", "stdlib:logging/"),
}


def _hash(text: str) -> int:
    return int(hashlib.sha1(text.encode()).hexdigest()[:12], 16)


def area_of(source: str) -> str | None:
    """The label of a corpus source ("stdlib:email/message.py" -> "internet"), or None if it has none."""
    for label, prefixes in AREAS.items():
        if source.startswith(prefixes):
            return label
    return None


def build_examples(records: list[dict]) -> dict[str, list[dict]]:
    """{"train": [...], "test": [...], "unlabeled": [...]} of {"text", "label"} from corpus records
    ({"text", "source"}); unlabeled examples keep their label here for checks, the file drops it."""
    by_area: dict[str, dict[str, list[str]]] = defaultdict(lambda: defaultdict(list))
    for rec in records:
        label = area_of(rec["source"])
        words = rec["text"].split()
        if label is None or len(words) < MIN_WORDS:
            continue
        text = " ".join(words[:MAX_WORDS])
        by_area[label][rec["source"]].append(text)
    out: dict[str, list[dict]] = {"train": [], "test": [], "unlabeled": []}
    for label in AREAS:
        files = by_area.get(label, {})
        total = sum(len(v) for v in files.values())
        test, train = [], []
        for source in sorted(files, key=lambda s: _hash("demo-task:" + s)):
            (test if len(test) < HELDOUT_FRACTION * total else train).extend(files[source])
        seen_test = set(test)
        train = [t for t in train if t not in seen_test]  # cut to MAX_WORDS, two docstrings can coincide
        ranked = sorted(set(train), key=_hash)
        for split, chosen in (("train", ranked[:TRAIN_PER_CLASS]), ("test", sorted(set(test), key=_hash)[:TEST_PER_CLASS]),
                              ("unlabeled", ranked[TRAIN_PER_CLASS:TRAIN_PER_CLASS + UNLABELED_PER_CLASS])):
            out[split] += [{"text": t, "label": label} for t in chosen]
    for split in out:  # interleave the classes in a fixed order that does not depend on the label order
        out[split].sort(key=lambda ex: _hash(ex["label"] + "|" + ex["text"]))
    return out


def task_dir() -> Path:
    return cache_dir() / f"demo-task-{corpus_key()}-v{BUILDER_VERSION}"


def ensure_demo_task() -> dict[str, Path]:
    """Paths of the demo task's train.csv, test.csv and unlabeled.csv, built first if needed (seconds, once)."""
    folder = task_dir()
    paths = {"train": folder / "train.csv", "test": folder / "test.csv", "unlabeled": folder / "unlabeled.csv"}
    if all(p.is_file() for p in paths.values()):
        return paths
    with open(ensure_corpus(), encoding="utf-8") as f:
        records = [json.loads(line) for line in f]
    examples = build_examples(records)
    for split, path in paths.items():
        def write(tmp: Path, split=split) -> None:
            with open(tmp, "w", encoding="utf-8", newline="") as f:
                fields = ["text"] if split == "unlabeled" else ["text", "label"]
                writer = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
                writer.writeheader()
                writer.writerows(examples[split])

        write_cached(path, write)
    return paths


def main() -> None:  # pragma: no cover - convenience entry: python -m compress.calib_data.demo_task
    paths = ensure_demo_task()
    for split, path in paths.items():
        with open(path, encoding="utf-8", newline="") as f:
            rows = list(csv.DictReader(f))
        counts = defaultdict(int)
        for row in rows:
            counts[row.get("label", "unlabeled")] += 1
        print(f"{path}: {len(rows)} examples; " + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())))


if __name__ == "__main__":  # pragma: no cover
    main()
