"""The prose corpus: English paragraphs made on this machine from the GNU manuals in its info directory.

Nothing is downloaded and no text is committed. Every ``NAME.info[-N][.gz|.bz2|.xz]`` file under the
info folders (``$COMPRESS_INFO_DIR`` if set, else ``$INFOPATH`` and /usr/share/info, /usr/local/share/info)
is read; the parts of a split manual (find.info-1.gz, find.info-2.gz) belong to the manual ``find``.
Only filled prose paragraphs are kept: node headers, menus, index and license nodes, headings,
examples, tables, definition lines and footnote markers are dropped, wrapped lines are joined, and a
paragraph seen before is skipped. Cross references keep their words (``*Note Foo::`` becomes ``See Foo``).

Each record is one info node, its paragraphs separated by blank lines: ``{"text", "source", "split"}``
with the manual's name as source. The split is fixed by manual: the manuals in HELDOUT_MANUALS are held
out, every other manual is train, whatever else is installed and in whatever order the files are listed.
On a Debian 12 machine with 20 manuals that is 0.45 M characters (107k SmolLM2 tokens) held out and
1.66 M characters (397k tokens) of training text, built in about 2 s.
"""

from __future__ import annotations

import bz2
import gzip
import hashlib
import json
import lzma
import os
import re
from pathlib import Path

from ..errors import CompressError
from .corpus import cache_dir, make_cache_folder, write_cached

BUILDER_VERSION = 1
# diffutils, findutils, grep and sed are Essential Debian packages, so their manuals are on most machines that have any
HELDOUT_MANUALS = ("diffutils", "find", "grep", "sed")
DEFAULT_INFO_DIRS = ("/usr/share/info", "/usr/local/share/info")
_MIN_WORDS = 8
_MIN_LETTERS = 0.8  # letters and spaces, as a fraction of a paragraph's characters
_FILLED = 50  # every line of a filled paragraph but its last is at least this long (makeinfo fills to 72)

_INFO_FILE = re.compile(r"^(?P<manual>.+?)\.info(?:-\d+)?(?:\.gz|\.bz2|\.xz)?$")
_OPENERS = {".gz": gzip.open, ".bz2": bz2.open, ".xz": lzma.open}
_SKIP_NODES = re.compile(r"index$|^(gnu )?(free documentation|general public|lesser general public) license$|"
                         r"^copying|^gnu fdl$|^fdl$", re.IGNORECASE)
_UNDERLINE = re.compile(r"^\s*([=\-*.])\1{2,}\s*$")
_MENU_LINE = re.compile(r"^\* [^:]+::|^\* [^:]+:\s+\S.*\.")
_DEFINITION = re.compile(r"^\s*-- [\w ]+: ")
_BULLET = re.compile(r"^\s*(?:•|\*|-|\d+\.)\s+(?=\S)")
_CODE_STARTS = ("#", "$ ", "/*", "//", "% ", "> ")
_FOOTNOTE = re.compile(r"\(\d{1,2}\)")
_XREF_LABELLED = re.compile(r"\*([Nn])ote\s+([^:]+?):\s+(?:\([^)]*\))?[^.,:]*?[^.,:\s]\s*([.,])")
_XREF_PLAIN = re.compile(r"\*([Nn])ote\s+(?:\([^)]*\))?([^:]+?)::")


def info_dirs() -> list[Path]:
    """Folders searched for info files, first match of a manual's name wins (as the ``info`` reader does).

    ``$COMPRESS_INFO_DIR`` (colon-separated) replaces the search; ``$INFOPATH`` comes before the system
    folders, and is used alone unless it ends with a colon, as the ``info`` reader treats it.
    """
    if os.environ.get("COMPRESS_INFO_DIR"):
        return [Path(p).expanduser() for p in os.environ["COMPRESS_INFO_DIR"].split(os.pathsep) if p]
    infopath = os.environ.get("INFOPATH", "")
    dirs = [p for p in infopath.split(os.pathsep) if p]
    if not infopath or infopath.endswith(os.pathsep):
        dirs += list(DEFAULT_INFO_DIRS)
    return [Path(p).expanduser() for p in dict.fromkeys(dirs)]


def manual_files() -> dict[str, list[Path]]:
    """Manual name -> its info files (one, or the parts of a split manual), sorted by name."""
    manuals: dict[str, list[Path]] = {}
    for folder in info_dirs():
        try:
            entries = sorted(folder.iterdir())
        except OSError:
            continue
        found: dict[str, list[Path]] = {}
        for path in entries:
            match = _INFO_FILE.match(path.name)
            if match and path.is_file():
                found.setdefault(match["manual"], []).append(path)
        for manual, paths in found.items():
            manuals.setdefault(manual, paths)  # an earlier folder shadows a later one
    return dict(sorted(manuals.items()))


def _missing_error() -> CompressError:
    where = ", ".join(str(d) for d in info_dirs()) or "no folder"
    return CompressError(f"the prose corpus is built from GNU info manuals but {where} holds none (*.info.gz); "
                         "point COMPRESS_INFO_DIR at a folder of them, or use builtin or a text file instead of prose")


def corpus_key(manuals: dict[str, list[Path]]) -> str:
    """Identifies the corpus content: builder version, held-out list, and every info file's name, size and mtime."""
    parts = [f"b{BUILDER_VERSION}", ",".join(HELDOUT_MANUALS)]
    for paths in manuals.values():
        for path in paths:
            info = path.stat()
            parts.append(f"{path}:{info.st_size}:{info.st_mtime_ns}")
    return hashlib.sha1("\n".join(parts).encode()).hexdigest()[:12]


def read_info(path: Path) -> str:
    """The text of one info file, decompressed (undecodable bytes replaced)."""
    opener = _OPENERS.get(path.suffix, open)
    try:
        with opener(path, "rb") as f:
            return f.read().decode("utf-8", errors="replace")
    except (OSError, EOFError, lzma.LZMAError) as e:
        raise CompressError(f"info file {path} cannot be read ({e}); remove it, or point COMPRESS_INFO_DIR at a "
                            "folder of readable manuals") from None


def nodes(text: str):
    """(node name, body) of each node of an info file; the preamble, tag tables and indirect tables are skipped."""
    for chunk in text.split("\x1f")[1:]:
        header, _, body = chunk.lstrip("\n").partition("\n")
        match = re.search(r"Node:\s*([^,\t]+)", header)
        if header.startswith("File:") and match:
            yield match[1].strip(), body


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip(" "))


def _letters(text: str) -> float:
    return sum(ch.isalpha() or ch == " " for ch in text) / max(len(text), 1)


def _items(lines: list[str]) -> list[list[str]]:
    """Split a block into its paragraphs: a list bullet starts one, and a table or definition term (a line
    indented less than the description below it) ends one and is dropped."""
    items: list[list[str]] = [[]]
    for i, line in enumerate(lines):
        bullet = _BULLET.match(line)
        if bullet:  # a list item: its text continues at the bullet's text column
            items.append([" " * len(bullet[0]) + line[len(bullet[0]):]])
        elif _DEFINITION.match(line) or (i + 1 < len(lines) and _indent(line) < _indent(lines[i + 1])):
            items.append([])
        else:
            items[-1].append(line)
    return [item for item in items if item]


def _xref(match: re.Match) -> str:
    """A cross reference as a printed manual words it: @xref ``*Note X::`` is "See X", @pxref ``(*note X::)``
    is "(see X", and @ref ``*note X::`` after the author's own "see" is just "X"."""
    title = match[2].strip()
    if match.lastindex == 3 and not (match[3] == "." and match.string[match.end():match.end() + 1] == ")"):
        title += match[3]  # the node name's terminator, unless it only closes the reference before ")"
    if match[1] == "N":
        return f"See {title}"
    before = match.string[:match.start()]
    return f"see {title}" if before.endswith("(") else title


def _paragraph(lines: list[str], footnotes: bool) -> str | None:
    """The joined text of one paragraph's lines, or None when they are not prose."""
    base = _indent(lines[-1]) if len(lines) > 1 else _indent(lines[0])
    if len(lines) > 1 and (_indent(lines[0]) not in (base, base + 3) or any(_indent(x) != base for x in lines[1:])):
        return None  # ragged indentation: code, an example or a table
    if any(x.lstrip().startswith(_CODE_STARTS) or "⊣" in x or "⇒" in x for x in lines):
        return None  # a comment, a prompt, or an example's result marker
    if any(len(x) < _FILLED for x in lines[:-1]) or any(re.search(r"\S {3,}\S", x) for x in lines):
        return None  # not filled, or columns
    text = " ".join(x.strip() for x in lines)
    if footnotes:
        text = _FOOTNOTE.sub("", text).strip()
    text = _XREF_PLAIN.sub(_xref, text)
    text = _XREF_LABELLED.sub(_xref, text)
    text = re.sub(r"\s+", " ", text).strip()
    if len(text.split()) < _MIN_WORDS or _letters(text) < _MIN_LETTERS:
        return None
    if base > 0 and len(lines) < 3 and not re.search(r"[.!?:][’”\"')]*$", text):
        return None  # short indented text that does not end a sentence is an example more often than prose
    return text


def clean_node(body: str) -> list[str]:
    """Prose paragraphs of one info node's body, in order."""
    footnotes = "---------- Footnotes ----------" in body
    out = []
    for block in re.split(r"\n[ \t]*\n", body):
        keep: list[str] = []
        for line in (x.rstrip() for x in block.split("\n")):
            if not line.strip() or "---------- Footnotes ----------" in line:
                continue
            if _UNDERLINE.match(line):  # a heading is the line above an underline
                if keep:
                    keep.pop()
                continue
            keep.append(line)
        if any(_MENU_LINE.match(line) or "\x00" in line or "\x08" in line for line in keep):
            continue  # a menu, or an index marker
        for item in _items(keep):
            text = _paragraph(item, footnotes)
            if text:
                out.append(text)
    return out


def manual_nodes(paths: list[Path]):
    """(node name, paragraphs) of a manual's files in reading order (find.info, find.info-1, find.info-2)."""
    def part(path: Path) -> int:
        match = re.search(r"\.info-(\d+)", path.name)
        return int(match[1]) if match else 0

    for path in sorted(paths, key=part):
        for name, body in nodes(read_info(path)):
            if not _SKIP_NODES.search(name.strip()):
                yield name, clean_node(body)


def build_records(manuals: dict[str, list[Path]]) -> list[dict]:
    """One record per info node with prose; held-out manuals first, so de-duplication never moves a
    paragraph they share with a train manual out of the held-out side into train."""
    seen: set[bytes] = set()
    records = []
    order = sorted(manuals, key=lambda m: (m not in HELDOUT_MANUALS, m))
    for manual in order:
        split = "heldout" if manual in HELDOUT_MANUALS else "train"
        for _, paras in manual_nodes(manuals[manual]):
            kept = []
            for text in paras:
                digest = hashlib.sha1(text.encode()).digest()
                if digest not in seen:
                    seen.add(digest)
                    kept.append(text)
            if kept:
                records.append({"text": "\n\n".join(kept), "source": manual, "split": split})
    return records


def ensure_corpus() -> Path:
    """Path of the cached prose corpus, building it first if needed (a few seconds, once per set of manuals)."""
    manuals = manual_files()
    if not manuals:
        raise _missing_error()
    path = cache_dir() / f"prose-{corpus_key(manuals)}.jsonl"
    if path.is_file():
        return path
    make_cache_folder(path.parent)
    records = build_records(manuals)
    if not records:
        raise _missing_error()

    def write(tmp: Path) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            f.writelines(json.dumps(rec, ensure_ascii=False) + "\n" for rec in records)

    write_cached(path, write)
    return path


def load_records() -> list[dict]:
    """Every record of the prose corpus (building it first if needed)."""
    with open(ensure_corpus(), encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def load_corpus(split: str = "train") -> list[str]:
    """Documents (one info node each, paragraphs separated by blank lines) of ``split``: train or heldout."""
    if split not in ("train", "heldout"):
        raise ValueError(f"split must be 'train' or 'heldout', got {split!r}")
    texts = [rec["text"] for rec in load_records() if rec["split"] == split]
    if not texts:
        raise CompressError(f"the prose corpus has no {split} manual on this machine (held out: "
                            f"{', '.join(HELDOUT_MANUALS)}); use builtin or a text file instead of prose")
    return texts


def main() -> None:  # pragma: no cover - convenience entry: python -m compress.calib_data.prose
    records = load_records()
    by_manual: dict[str, list[int]] = {}
    for rec in records:
        count = by_manual.setdefault(f"{rec['split']:8} {rec['source']}", [0, 0])
        count[0] += 1
        count[1] += len(rec["text"])
    for name, (docs, chars) in sorted(by_manual.items()):
        print(f"{name:32} {docs:5} nodes {chars / 1e3:9.1f} k chars")
    print(ensure_corpus())


if __name__ == "__main__":  # pragma: no cover
    main()
