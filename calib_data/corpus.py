"""The built-in corpus: English prose made on this machine from docstrings that are always installed.

Nothing is downloaded and no text is committed: the corpus is extracted with ``ast`` (no module is
imported) from the docstrings of the Python standard library and of two packages compress depends on
(torch and numpy), cleaned, de-duplicated, and cached as JSON lines.

Each record is one docstring: ``{"text", "source", "split"}``. The split is fixed by a hash of the
source file's name (about 10% held out), so it does not depend on file order, on the machine, or on
which other files exist; the same file always lands on the same side.
"""

from __future__ import annotations

import ast
import hashlib
import importlib.metadata
import importlib.util
import json
import os
import re
import sys
import sysconfig
from pathlib import Path

from ..errors import CompressError

BUILDER_VERSION = 1
HELDOUT_PERCENT = 10
PACKAGES = ("torch", "numpy")
_SKIP_DIRS = {"test", "tests", "testing", "idlelib", "turtledemo", "site-packages", "dist-packages", "__pycache__",
              "_vendor", "vendored", "third_party", "_dynamo", "_inductor"}
_MIN_CHARS = 40


def cache_dir() -> Path:
    """Where compress caches built data: $COMPRESS_CACHE, else $XDG_CACHE_HOME/compress, else ~/.cache/compress."""
    if os.environ.get("COMPRESS_CACHE"):
        return Path(os.environ["COMPRESS_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "compress"


def write_cached(path: Path, write) -> None:
    """Create ``path`` in the cache through a temporary sibling: ``write(tmp)`` fills it, a rename publishes it.

    A cache folder that cannot be made or written (COMPRESS_CACHE naming a file, a read-only folder) is
    one CompressError sentence; an interrupted write leaves no temporary behind.
    """
    make_cache_folder(path.parent)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        write(tmp)
        os.replace(tmp, path)
    except OSError as e:
        raise _cache_error(path.parent, e) from None
    finally:
        if tmp.exists():
            tmp.unlink()


def make_cache_folder(folder: Path) -> None:
    """Create a cache folder, or say in one sentence why it cannot be (before any slow build starts)."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise _cache_error(folder, e) from None


def _cache_error(folder: Path, e: OSError) -> CompressError:
    return CompressError(f"cannot write compress's data cache {folder} ({e.strerror or e}); point COMPRESS_CACHE "
                         "at a writable folder")


def sources() -> list[tuple[str, Path]]:
    """(label, root folder) of every source tree, standard library first."""
    roots = [("stdlib", Path(sysconfig.get_paths()["stdlib"]))]
    for pkg in PACKAGES:
        spec = importlib.util.find_spec(pkg)
        if spec is not None and spec.origin:
            roots.append((pkg, Path(spec.origin).parent))
    return roots


def corpus_key() -> str:
    """Identifies the corpus content: builder version, Python version and the packages' versions."""
    parts = [f"b{BUILDER_VERSION}", f"py{sys.version_info.major}.{sys.version_info.minor}.{sys.version_info.micro}"]
    for pkg in PACKAGES:
        try:
            parts.append(f"{pkg}{importlib.metadata.version(pkg)}")
        except importlib.metadata.PackageNotFoundError:
            continue
    return hashlib.sha1("-".join(parts).encode()).hexdigest()[:12]


def corpus_path() -> Path:
    return cache_dir() / f"corpus-{corpus_key()}.jsonl"


def is_heldout(source: str) -> bool:
    """Whether a source file belongs to the held-out split (fixed by its name's hash)."""
    return int(hashlib.sha1(source.encode()).hexdigest()[:8], 16) % 100 < HELDOUT_PERCENT


def clean_docstring(doc: str) -> str:
    """Prose paragraphs of a docstring: code examples and markup-only lines dropped, lines joined."""
    paragraphs = []
    for block in re.split(r"\n\s*\n", doc):
        lines = [line.strip() for line in block.strip().splitlines()]
        if not lines or any(line.startswith((">>>", "...", "$ ", "%")) for line in lines):
            continue
        if all(re.fullmatch(r"[-=~^*+#`:.\s]*", line) for line in lines):
            continue
        text = " ".join(line for line in lines if line)
        letters = sum(ch.isalpha() or ch == " " for ch in text)
        if len(text) < _MIN_CHARS or letters < 0.75 * len(text):
            continue
        paragraphs.append(text)
    return "\n\n".join(paragraphs)


def _docstrings(path: Path):
    try:
        tree = ast.parse(path.read_text(encoding="utf-8"))
    except (SyntaxError, UnicodeDecodeError, ValueError, OSError):
        return
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            doc = ast.get_docstring(node)
            if doc:
                yield doc


def build_records() -> list[dict]:
    """Extract, clean and de-duplicate docstrings from every source, in a fixed order."""
    seen: set[str] = set()
    records = []
    for label, root in sources():
        for path in sorted(root.rglob("*.py")):
            rel = path.relative_to(root)
            if _SKIP_DIRS.intersection(rel.parts[:-1]):
                continue
            source = f"{label}:{rel.as_posix()}"
            split = "heldout" if is_heldout(source) else "train"
            for doc in _docstrings(path):
                text = clean_docstring(doc)
                digest = hashlib.sha1(text.encode()).digest()
                if not text or digest in seen:
                    continue
                seen.add(digest)
                records.append({"text": text, "source": source, "split": split})
    return records


def ensure_corpus() -> Path:
    """Path of the cached corpus, building it first if needed (about 15 s on two cores, once)."""
    path = corpus_path()
    if path.is_file():
        return path
    make_cache_folder(path.parent)
    records = build_records()

    def write(tmp: Path) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            for rec in records:
                f.write(json.dumps(rec, ensure_ascii=False) + "\n")

    write_cached(path, write)
    return path


def load_corpus(split: str = "train") -> list[str]:
    """Documents (one docstring each, paragraphs separated by blank lines) of ``split``: train or heldout."""
    if split not in ("train", "heldout"):
        raise ValueError(f"split must be 'train' or 'heldout', got {split!r}")
    out = []
    with open(ensure_corpus(), encoding="utf-8") as f:
        for line in f:
            rec = json.loads(line)
            if rec["split"] == split:
                out.append(rec["text"])
    return out


def main() -> None:  # pragma: no cover - convenience entry: python -m compress.calib_data.corpus
    path = ensure_corpus()
    train, held = load_corpus("train"), load_corpus("heldout")
    print(f"{path}: {len(train)} train documents ({sum(map(len, train)) / 1e6:.2f} M chars), "
          f"{len(held)} held-out ({sum(map(len, held)) / 1e6:.2f} M chars)")


if __name__ == "__main__":  # pragma: no cover
    main()
