"""The demo classification task built from the built-in corpus: size, classes, a fixed split by file."""

import csv
import random
from collections import Counter

from compress.calib_data import demo_task


def _read(path):
    with open(path, encoding="utf-8", newline="") as f:
        return list(csv.DictReader(f))


def test_demo_task_files_are_balanced_and_disjoint():
    paths = demo_task.ensure_demo_task()
    assert paths["train"].parent == demo_task.task_dir()
    assert str(paths["train"]).startswith(str(demo_task.cache_dir()))
    train, test = _read(paths["train"]), _read(paths["test"])
    classes = set(demo_task.AREAS)
    assert len(classes) >= 5 and len(train) + len(test) >= 2000
    assert set(Counter(r["label"] for r in train)) == classes == set(Counter(r["label"] for r in test))
    assert min(Counter(r["label"] for r in test).values()) >= 50
    assert not {r["text"] for r in train} & {r["text"] for r in test}
    assert all(len(r["text"].split()) <= demo_task.MAX_WORDS for r in train + test)
    unlabeled = _read(paths["unlabeled"])
    assert len(unlabeled) > 1000 and set(unlabeled[0]) == {"text"}
    assert not {r["text"] for r in unlabeled} & ({r["text"] for r in train} | {r["text"] for r in test})


def _records(seed):
    rng = random.Random(seed)
    recs = []
    for f in range(40):
        source = f"stdlib:email/module{f}.py" if f % 2 else f"torch:nn/module{f}.py"
        for d in range(rng.randint(1, 6)):
            recs.append({"text": f"docstring {d} of file {f} explains what the code does", "source": source})
    recs.append({"text": "a docstring from an area that has no label at all here", "source": "stdlib:json/x.py"})
    return recs


def test_split_is_by_file_and_independent_of_record_order():
    records = _records(0)
    first = demo_task.build_examples(records)
    shuffled = records[:]
    random.Random(1).shuffle(shuffled)
    assert demo_task.build_examples(shuffled) == first
    file_of = lambda text: text.split(" of file ")[1]  # noqa: E731
    assert not {file_of(e["text"]) for e in first["train"]} & {file_of(e["text"]) for e in first["test"]}
    assert {e["label"] for e in first["train"]} == {"internet", "neural-nets"}
    # the transfer set comes from training-side files only
    assert not {file_of(e["text"]) for e in first["unlabeled"]} & {file_of(e["text"]) for e in first["test"]}
    for label in ("internet", "neural-nets"):
        total = sum(1 for split in first.values() for e in split if e["label"] == label)
        held = sum(1 for e in first["test"] if e["label"] == label)
        assert 0.2 <= held / total <= 0.45  # about a quarter, in whole files
