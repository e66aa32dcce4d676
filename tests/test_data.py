"""Built-in corpus, user files, cached Hugging Face datasets, and deterministic calibration sampling."""

import json
import shutil

import pytest
import torch

from compress.calib_data import corpus
from compress.data import calibration, load_labeled, load_texts, paragraphs, special_affixes, token_stream, windows
from compress.errors import CompressError
from compress.models import load_tokenizer


@pytest.fixture(scope="module")
def bert_tok(minilm):
    return load_tokenizer(minilm)


def test_builtin_corpus_has_a_fixed_disjoint_split():
    train, held = load_texts("builtin", "train"), load_texts("builtin", "heldout")
    assert len(train) > 5000 and len(held) > 500
    assert not set(train) & set(held)
    assert sum(map(len, train)) > 3_000_000  # enough prose to train the reference LM on
    # the split is a property of the source file's name, not of order or machine
    assert corpus.is_heldout("stdlib:json/decoder.py") == corpus.is_heldout("stdlib:json/decoder.py")
    records = [json.loads(line) for line in corpus.ensure_corpus().open()]
    assert all(r["split"] == ("heldout" if corpus.is_heldout(r["source"]) else "train") for r in records[:2000])


def test_corpus_cleaning_drops_code_and_markup():
    doc = "Summary line that explains what the function does in words.\n\n>>> f(1)\n2\n\n-----\n\nShort."
    assert corpus.clean_docstring(doc) == "Summary line that explains what the function does in words."


def test_txt_jsonl_csv(tmp_path):
    (tmp_path / "a.txt").write_text("first document\nsecond line\n\nsecond document\n")
    assert load_texts(str(tmp_path / "a.txt")) == ["first document\nsecond line", "second document"]
    (tmp_path / "a.jsonl").write_text(json.dumps({"body": "x y"}) + "\n\n" + json.dumps({"body": "z"}) + "\n")
    assert load_texts(str(tmp_path / "a.jsonl"), text_field="body") == ["x y", "z"]
    (tmp_path / "a.csv").write_text("id,content\n1,hello there\n2,\"with, comma\"\n")
    assert load_texts(str(tmp_path / "a.csv"), text_field="content") == ["hello there", "with, comma"]


@pytest.mark.parametrize("name,content,match", [
    ("empty.txt", "", "holds no text"),
    ("blank.txt", "\n\n   \n", "holds no text"),
    ("bad.jsonl", "{not json\n", "not valid JSON"),
    ("nofield.jsonl", json.dumps({"other": 1}) + "\n", "no field 'text'"),
    ("nocol.csv", "a,b\n1,2\n", "no column 'text'"),
    ("data.parquet", "x", "unknown type"),
])
def test_bad_files(tmp_path, name, content, match):
    (tmp_path / name).write_text(content)
    with pytest.raises(CompressError, match=match):
        load_texts(str(tmp_path / name))


def test_missing_file(tmp_path):
    with pytest.raises(CompressError, match="does not exist"):
        load_texts(str(tmp_path / "nope.txt"))


def test_labeled_file(tmp_path):
    (tmp_path / "l.csv").write_text("text,label\ngood,pos\nbad,neg\n")
    assert load_labeled(tmp_path / "l.csv") == (["good", "bad"], ["pos", "neg"])
    (tmp_path / "nolabel.csv").write_text("text\nx\n")
    with pytest.raises(CompressError, match="no column 'label'"):
        load_labeled(tmp_path / "nolabel.csv")


def test_calibration_is_deterministic_by_seed(bert_tok):
    a = calibration(bert_tok, "builtin", nsamples=8, seqlen=64, seed=1)
    b = calibration(bert_tok, "builtin", nsamples=8, seqlen=64, seed=1)
    c = calibration(bert_tok, "builtin", nsamples=8, seqlen=64, seed=2)
    assert a.shape == (8, 64) and torch.equal(a, b) and not torch.equal(a, c)
    # BERT windows carry [CLS] ... [SEP] like the model's training inputs
    assert (a[:, 0] == bert_tok.cls_token_id).all() and (a[:, -1] == bert_tok.sep_token_id).all()


def test_calibration_windows_are_distinct(bert_tok):
    blocks = calibration(bert_tok, "builtin", nsamples=32, seqlen=32, seed=0)
    assert len({tuple(r.tolist()) for r in blocks}) == 32


def test_too_short_calibration_file(tmp_path, bert_tok):
    (tmp_path / "short.txt").write_text("only a few words here\n")
    with pytest.raises(CompressError, match="enough for 0 samples"):
        calibration(bert_tok, str(tmp_path / "short.txt"), nsamples=4, seqlen=128)


def test_empty_calibration_file(tmp_path, bert_tok):
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(CompressError, match="holds no text"):
        calibration(bert_tok, str(tmp_path / "empty.txt"), nsamples=4, seqlen=128)


def test_windows_without_special_tokens(tiny_model):
    tok = load_tokenizer(tiny_model("gpt2"))
    assert special_affixes(tok) == ([], [])
    stream = token_stream(["one two three four five six seven"] * 4, tok)
    w = windows(stream, tok, 8)
    assert w.shape[1] == 8 and torch.equal(w.flatten(), stream[: w.numel()])


def test_paragraphs_filter_short_ones():
    assert paragraphs(["a b c\n\none two three four five six seven eight nine"], min_words=5) == [
        "one two three four five six seven eight nine"]


def _cache_dataset(cache, tmp_path):
    """Put 'acme/tiny' into a datasets cache the way a connected load_dataset leaves it."""
    datasets = pytest.importorskip("datasets", reason="datasets is a test dependency")
    src = tmp_path / "src"
    src.mkdir()
    datasets.Dataset.from_dict({"text": [f"train text number {i}" for i in range(20)]}).to_parquet(str(src / "train.parquet"))
    datasets.Dataset.from_dict({"text": ["held out text"] * 5}).to_parquet(str(src / "test.parquet"))
    datasets.load_dataset("parquet", data_files={"train": str(src / "train.parquet"), "test": str(src / "test.parquet")},
                          cache_dir=str(cache))
    built = next(p for p in cache.glob("parquet/*/*/*") if p.is_dir())
    dest = cache / "acme___tiny" / "default" / "0.0.0" / built.name
    shutil.copytree(built, dest)
    for f in dest.iterdir():
        if f.name.startswith("parquet-"):
            f.rename(dest / f.name.replace("parquet-", "tiny-"))


def test_cached_hf_dataset_by_name(tmp_path, monkeypatch):
    datasets = pytest.importorskip("datasets", reason="datasets is a test dependency")
    cache = tmp_path / "cache"
    _cache_dataset(cache, tmp_path)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", cache)
    texts = load_texts("hf:acme/tiny", split="train")
    assert texts[0] == "train text number 0" and len(texts) == 20
    assert load_texts("hf:acme/tiny", split="heldout") == ["held out text"] * 5
    with pytest.raises(CompressError, match="never downloads"):
        load_texts("hf:acme/not-cached")


def test_saved_dataset_folder(tmp_path):
    datasets = pytest.importorskip("datasets", reason="datasets is a test dependency")
    datasets.Dataset.from_dict({"body": ["a b c", "d e f"]}).save_to_disk(str(tmp_path / "ds"))
    assert load_texts(f"hf:{tmp_path / 'ds'}", text_field="body") == ["a b c", "d e f"]
    with pytest.raises(CompressError, match="no column 'text'"):
        load_texts(f"hf:{tmp_path / 'ds'}")


def test_read_bounded_reads_in_chunks_up_to_one_byte_past_the_cap():
    import io

    from compress.files import read_bounded

    assert read_bounded(io.BytesIO(b"x" * 100), 10, chunk=3) == b"x" * 11  # one byte more: too large
    assert read_bounded(io.BytesIO(b"x" * 5), 10, chunk=3) == b"x" * 5
    assert read_bounded(io.BytesIO(b""), 10) == b""
