"""The prose corpus from GNU info manuals: cleaning, the split by manual, caching, and a missing info folder."""

import gzip
import json
import os
from pathlib import Path

import pytest
from compress.calib_data import prose

from compress.data import calibration, load_texts, paragraphs
from compress.errors import CompressError

SYSTEM_INFO = Path("/usr/share/info")

# one node as makeinfo writes it: heading, wrapped prose, an example, a table, a menu and a footnote
NODE = """\
2.1 Overview
============

   A stream editor is used to perform basic text transformations on an
input stream, and it works by making only one pass over the input, so
it is efficient(1).  See *note Execution Cycle:: for the details.

     sed -n '45p' file.txt
     sed 's/hello/world/g' < input.txt > output.txt

‘-n’
‘--quiet’
     By default, the editor prints out the pattern space at the end of
     each cycle through the script (*note How it works: Cycle.).

Short fragment here.

   • A list item that is long enough to count as a sentence of prose in
     the manual.

‘\\w’      Matches any word character, which is a letter or a digit.
‘\\W’      Matches any character that is not a word character at all.

* Menu:

* Overview::                 A brief overview of how the editor is run here.
* Options::                  Every command line option the editor accepts.

   ---------- Footnotes ----------

   (1) Only one pass is made, whatever the number of input files that are
given on the command line.
"""

PROSE = [
    ("A stream editor is used to perform basic text transformations on an input stream, and it works by making "
     "only one pass over the input, so it is efficient. See Execution Cycle for the details."),
    ("By default, the editor prints out the pattern space at the end of each cycle through the script "
     "(see How it works)."),
    "A list item that is long enough to count as a sentence of prose in the manual.",
    "Only one pass is made, whatever the number of input files that are given on the command line.",
]


def info_file(manual: str, nodes: dict[str, str], part: str = "") -> str:
    """An info file's text: the makeinfo preamble, then each node behind its \\x1f separator and header."""
    text = f"This is {manual}.info, produced by makeinfo version 6.8 from {manual}.texi.\n\n"
    for name, body in nodes.items():
        text += f"\x1f\nFile: {manual}.info{part},  Node: {name},  Next: Other,  Up: Top\n\n{body}\n"
    return text + "\x1f\nTag Table:\nNode: Top\x7f100\n\x1f\nEnd Tag Table\n"


def paragraph(manual: str, i: int) -> str:
    return (f"Paragraph number {i} of the {manual} manual explains one more thing about the program in plain\n"
            f"words, so that every paragraph of this test corpus is prose of about two lines.\n")


def write_manuals(folder: Path) -> Path:
    """A small info folder: sed (held out), alpha (train), and beta split into two parts plus its index file."""
    folder.mkdir(parents=True, exist_ok=True)

    def write(name: str, text: str) -> None:
        with gzip.open(folder / name, "wt", encoding="utf-8") as f:
            f.write(text)

    index = "Concept Index\n*************\n\n\x00\x08[index\x00\x08]\n* Menu:\n\n* pattern space:  Overview.  (line 6)\n"
    write("sed.info.gz", info_file("sed", {"Overview": NODE, "Concept Index": index}))
    write("alpha.info.gz", info_file("alpha", {f"N{i}": paragraph("alpha", i) for i in range(30)}))
    write("beta.info.gz", "This is beta.info.\n\x1f\nIndirect:\nbeta.info-1: 100\nbeta.info-2: 2000\n")
    write("beta.info-1.gz", info_file("beta", {f"A{i}": paragraph("beta", i) for i in range(20)}, "-1"))
    write("beta.info-2.gz", info_file("beta", {"GNU Free Documentation License": NODE.upper(),
                                               "Last": paragraph("beta", 99)}, "-2"))
    (folder / "dir").write_text("the info directory node\n")
    return folder


@pytest.fixture
def manuals(tmp_path, monkeypatch):
    monkeypatch.setenv("COMPRESS_INFO_DIR", str(write_manuals(tmp_path / "info")))
    monkeypatch.setenv("COMPRESS_CACHE", str(tmp_path / "cache"))
    return tmp_path / "info"


def test_cleaning_keeps_prose_and_drops_structure():
    assert prose.clean_node(NODE) == PROSE


def test_index_license_and_tag_table_nodes_are_dropped(manuals):
    records = prose.load_records()
    text = "\n\n".join(r["text"] for r in records)
    assert "pattern space:" not in text and "(line 6)" not in text
    assert "A STREAM EDITOR" not in text  # the license node of beta
    assert [r["text"] for r in records if r["source"] == "sed"] == ["\n\n".join(PROSE)]


def test_split_is_fixed_by_manual_and_parts_join_their_manual(manuals, monkeypatch):
    records = prose.load_records()
    assert {r["source"] for r in records} == {"sed", "alpha", "beta"}  # beta.info-1, -2 belong to beta
    assert all(r["split"] == ("heldout" if r["source"] in prose.HELDOUT_MANUALS else "train") for r in records)
    beta = [r["text"] for r in records if r["source"] == "beta"]
    assert beta[0].startswith("Paragraph number 0 of the beta") and "number 99 of the beta" in beta[-1]
    # another set of manuals on another machine changes nothing about sed's side or text
    (manuals / "alpha.info.gz").unlink()
    (manuals / "beta.info-2.gz").rename(manuals / "beta.info-3.gz")
    again = prose.load_records()
    assert [r for r in again if r["source"] == "sed"] == [r for r in records if r["source"] == "sed"]
    assert load_texts("prose", "heldout") == ["\n\n".join(PROSE)]
    assert len(load_texts("prose", "train")) == 21


def test_duplicate_paragraphs_are_kept_once(manuals):
    with gzip.open(manuals / "gamma.info.gz", "wt", encoding="utf-8") as f:
        f.write(info_file("gamma", {"Copy": NODE, "Same": paragraph("alpha", 3)}))
    records = prose.load_records()
    assert not [r for r in records if r["source"] == "gamma"]  # both nodes repeat earlier paragraphs


def test_cache_is_reused_until_an_info_file_changes(manuals, monkeypatch):
    first = prose.ensure_corpus()
    built = first.stat().st_mtime_ns

    def no_rebuild(_):
        raise AssertionError("the cached corpus should have been read")

    monkeypatch.setattr(prose, "build_records", no_rebuild)
    assert prose.ensure_corpus() == first and first.stat().st_mtime_ns == built
    with gzip.open(manuals / "alpha.info.gz", "at", encoding="utf-8") as f:
        f.write(info_file("alpha", {"More": paragraph("alpha", 77)}))
    with pytest.raises(AssertionError, match="cached corpus"):
        prose.ensure_corpus()  # a changed file means another key, so another build
    assert first.name.startswith("prose-") and first.parent == Path(os.environ["COMPRESS_CACHE"])


def test_documents_split_into_paragraphs_and_calibration_windows(manuals, minilm):
    from compress.models import load_tokenizer

    docs = load_texts("prose", "train")
    paras = paragraphs(docs)
    assert len(paras) == 51 and all("\n" not in p for p in paras)
    blocks = calibration(load_tokenizer(minilm), "prose", nsamples=4, seqlen=32, seed=0)
    assert tuple(blocks.shape) == (4, 32)


def test_no_info_manuals_is_one_sentence(tmp_path, monkeypatch, capsys, tiny_model):
    from compress.cli import main

    (tmp_path / "empty").mkdir()
    monkeypatch.setenv("COMPRESS_INFO_DIR", str(tmp_path / "empty"))
    monkeypatch.setenv("COMPRESS_CACHE", str(tmp_path / "cache"))
    with pytest.raises(CompressError, match="use builtin or a text file instead of prose"):
        load_texts("prose")
    out, llama = tmp_path / "out", tiny_model("llama")
    capsys.readouterr()
    code = main(["quantize", "--model", str(llama), "--calib", "prose", "--nsamples", "2",
                 "--seqlen", "16", "--out", str(out), "--no-eval", "--device", "cpu"])
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert code == 2 and len(err) == 1 and str(tmp_path / "empty") in err[0], err
    assert not out.exists()


def test_a_corrupt_info_file_is_one_sentence(manuals):
    (manuals / "broken.info.gz").write_bytes(b"\x1f\x8b not really gzip")
    with pytest.raises(CompressError, match=r"info file .*broken.info.gz cannot be read"):
        load_texts("prose")


def test_info_folders_follow_infopath(tmp_path, monkeypatch):
    monkeypatch.delenv("COMPRESS_INFO_DIR", raising=False)
    monkeypatch.setenv("INFOPATH", f"{tmp_path}/a:{tmp_path}/b")
    assert prose.info_dirs() == [tmp_path / "a", tmp_path / "b"]
    monkeypatch.setenv("INFOPATH", f"{tmp_path}/a:")  # a trailing colon appends the system folders
    assert prose.info_dirs() == [tmp_path / "a", *map(Path, prose.DEFAULT_INFO_DIRS)]
    # a manual in an earlier folder shadows the same manual in a later one
    write_manuals(tmp_path / "a")
    write_manuals(tmp_path / "b")
    monkeypatch.setenv("INFOPATH", f"{tmp_path}/a:{tmp_path}/b")
    assert all(p.parent == tmp_path / "a" for paths in prose.manual_files().values() for p in paths)


@pytest.mark.skipif(not any(SYSTEM_INFO.glob(f"{m}.info*") for m in prose.HELDOUT_MANUALS),
                    reason=f"no held-out GNU manual ({', '.join(prose.HELDOUT_MANUALS)}) in {SYSTEM_INFO}")
def test_real_info_manuals_give_a_disjoint_held_out_side(monkeypatch):
    monkeypatch.delenv("COMPRESS_INFO_DIR", raising=False)
    monkeypatch.delenv("INFOPATH", raising=False)
    records = [json.loads(line) for line in prose.ensure_corpus().open(encoding="utf-8")]
    held = {r["text"] for r in records if r["split"] == "heldout"}
    train = {r["text"] for r in records if r["split"] == "train"}
    assert held and train and not held & train
    assert {r["source"] for r in records if r["split"] == "heldout"} <= set(prose.HELDOUT_MANUALS)
    held_paras = {p for t in held for p in t.split("\n\n")}
    assert not held_paras & {p for t in train for p in t.split("\n\n")}
