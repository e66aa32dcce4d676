"""Training data for distillation: labeled files, cached Hugging Face datasets, LM windows, masking, checks."""

import pytest
import torch

import tiny
from compress.distill.data import (check_classes, classification_data, embedding_data, label_ids, lm_data,
                                   read_labeled)
from compress.errors import CompressError
from compress.models import load


@pytest.fixture(scope="module")
def bert(tmp_path_factory):
    return load(tiny.build("bert", tmp_path_factory.mktemp("b") / "bert", "masked"))


def test_cached_dataset_with_class_names(tmp_path, bert):
    datasets = pytest.importorskip("datasets", reason="datasets is a test dependency")
    features = datasets.Features({"sentence": datasets.Value("string"),
                                  "label": datasets.ClassLabel(names=["neg", "neu", "pos"])})
    split = lambda n: datasets.Dataset.from_dict(  # noqa: E731
        {"sentence": [f"the quick fox number {i}" for i in range(n)], "label": [i % 3 for i in range(n)]}, features=features)
    datasets.DatasetDict({"train": split(12), "test": split(6)}).save_to_disk(str(tmp_path / "ds"))
    source = f"hf:{tmp_path / 'ds'}"
    data = classification_data(bert.tokenizer, source, {"neg": 0, "neu": 1, "pos": 2}, 3, 16, text_field="sentence")
    assert len(data.train) == 12 and len(data.eval) == 6 and data.labels == ["neg", "neu", "pos"]
    assert [ex["labels"] for ex in data.train.examples[:4]] == [0, 1, 2, 0]
    # the teacher's ids decide, not the dataset's: a teacher that orders the classes differently gets its own ids
    swapped = classification_data(bert.tokenizer, source, {"pos": 0, "neu": 1, "neg": 2}, 3, 16, text_field="sentence")
    assert [ex["labels"] for ex in swapped.train.examples[:3]] == [2, 1, 0]
    batch = data.collator([data.train[0], data.train[5]])
    assert batch["input_ids"].shape[0] == 2 and batch["labels"].tolist() == [0, 2]
    with pytest.raises(CompressError, match="no column 'text'"):
        read_labeled(source)
    with pytest.raises(CompressError, match="never downloads"):
        read_labeled("hf:acme/not-cached")


def test_labeled_file_checks(tmp_path):
    (tmp_path / "one.csv").write_text("text,label\na b,x\nc d,x\n")
    with pytest.raises(CompressError, match="single class"):
        check_classes(read_labeled(str(tmp_path / "one.csv"))[1], "one.csv")
    (tmp_path / "nolabel.jsonl").write_text('{"text": "a"}\n')
    with pytest.raises(CompressError, match="no field 'label'"):
        read_labeled(str(tmp_path / "nolabel.jsonl"))
    assert read_labeled(str(tmp_path / "one.csv"), "test") is None  # a file has no held-out split of its own
    with pytest.raises(CompressError, match="label 'maybe' in f.csv is not one of the model's labels \\(neg, pos\\)"):
        label_ids(["neg", "maybe"], {"neg": 0, "pos": 1}, 2, "f.csv")
    assert label_ids(["1", "0"], {"LABEL_0": 0, "LABEL_1": 1}, 2, "f.csv") == [1, 0]  # unnamed classes take ids


def test_mlm_windows_and_masking(tmp_path, bert):
    (tmp_path / "t.txt").write_text("\n\n".join(tiny._TEXT[:30]))
    data = lm_data("mlm", bert.tokenizer, str(tmp_path / "t.txt"), 24, mlm_probability=0.3, max_samples=10)
    assert len(data.train) == 10 and all(len(ex["input_ids"]) == 24 for ex in data.train.examples)
    torch.manual_seed(0)
    batch = data.collator([data.train[i] for i in range(10)])
    original = torch.tensor([ex["input_ids"] for ex in data.train.examples])
    chosen = batch["labels"] != -100
    assert 0.15 < chosen.float().mean() < 0.45
    assert torch.equal(batch["labels"][chosen], original[chosen])  # labels are the original tokens
    assert (batch["input_ids"][chosen] == bert.tokenizer.mask_token_id).float().mean() > 0.6  # 80% become [MASK]
    assert torch.equal(batch["input_ids"][~chosen], original[~chosen])
    special = torch.isin(original, torch.tensor(bert.tokenizer.all_special_ids))
    assert not (chosen & special).any()


def test_causal_windows(tmp_path, tiny_model):
    llama = load(tiny_model("llama"))
    (tmp_path / "t.txt").write_text("\n\n".join(tiny._TEXT[:30]))
    data = lm_data("causal", llama.tokenizer, str(tmp_path / "t.txt"), 16)
    batch = data.collator([data.train[0], data.train[1]])
    assert batch["input_ids"].shape == (2, 16) and torch.equal(batch["labels"], batch["input_ids"])
    with pytest.raises(CompressError, match="fewer than one window"):
        (tmp_path / "short.txt").write_text("a few words")
        lm_data("causal", llama.tokenizer, str(tmp_path / "short.txt"), 64)


def test_embedding_paragraphs(tmp_path, bert):
    (tmp_path / "t.txt").write_text("\n\n".join(tiny._TEXT[:6]))
    data = embedding_data(bert.tokenizer, str(tmp_path / "t.txt"), 12)
    assert len(data.train) == 6 and max(len(ex["input_ids"]) for ex in data.train.examples) <= 12
    (tmp_path / "one.txt").write_text(tiny._TEXT[0])
    with pytest.raises(CompressError, match="fewer than 2 paragraphs"):
        embedding_data(bert.tokenizer, str(tmp_path / "one.txt"), 12)


def test_transfer_texts_are_unlabeled_examples(tmp_path, bert):
    (tmp_path / "train.csv").write_text("text,label\nthe quick fox,neg\nthe model folder,pos\n")
    (tmp_path / "more.txt").write_text("weights and scales\n\ninteger codes in a folder\n\nthe lazy dog")
    data = classification_data(bert.tokenizer, str(tmp_path / "train.csv"), {"neg": 0, "pos": 1}, 2, 16,
                               transfer=str(tmp_path / "more.txt"))
    assert [ex["labels"] for ex in data.train.examples] == [0, 1, -100, -100, -100]
    assert data.counts == {"neg": 1, "pos": 1, "(unlabeled)": 3}
    assert data.collator(data.train.examples)["labels"].tolist() == [0, 1, -100, -100, -100]
