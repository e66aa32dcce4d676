"""The tensors of a model folder as float32 numpy arrays, one at a time, without importing torch.

GGUF export needs nothing from torch but the weights, and importing torch costs about two seconds and
200 MB of resident memory, more than converting a small model takes. Safetensors files are read here
through their header and a memory map of each tensor's bytes (safetensors' own numpy loader has no
bfloat16, and copies). Each map is dropped with the array, so pages read do not accumulate over a
large model. Folders with only PyTorch ``.bin`` weights go through :class:`compress.checkpoint.CheckpointReader`
(torch is needed to unpickle them anyway).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from ..errors import CompressError
from ..files import safetensors_header

FLOAT_TYPES = ("F64", "F32", "F16", "BF16")
_NUMPY = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": np.uint16, "I64": np.int64,
          "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_}


class NumpyTensors:
    """keys(), info(name) -> (is_float, shape) and get(name) -> float32 array, over a folder's safetensors."""

    def __init__(self, folder: Path, files: list[Path]):
        self.folder = folder
        self._entries: dict[str, tuple[Path, int, dict]] = {}
        for f in files:
            try:
                header = safetensors_header(f)
                with open(f, "rb") as fh:
                    start = 8 + int.from_bytes(fh.read(8), "little")
            except (OSError, ValueError, UnicodeDecodeError) as e:
                raise CompressError(f"safetensors file {f} cannot be read ({e}); it may be truncated or corrupt") from None
            size = f.stat().st_size
            for name, entry in header.items():
                if not isinstance(entry, dict) or "data_offsets" not in entry:
                    raise CompressError(f"safetensors file {f} has a malformed entry for {name}")
                if start + entry["data_offsets"][1] > size:
                    raise CompressError(f"safetensors file {f} is truncated: tensor {name} ends past the end of the file")
                self._entries[name] = (f, start, entry)

    def __enter__(self) -> NumpyTensors:
        return self

    def __exit__(self, *exc) -> None:
        self._entries = {}

    def keys(self) -> list[str]:
        return list(self._entries)

    def info(self, name: str) -> tuple[bool, tuple[int, ...]]:
        """(whether the tensor holds floating-point values, its shape), from the header alone."""
        _, _, entry = self._entries[name]
        return entry["dtype"] in FLOAT_TYPES, tuple(entry["shape"])

    def get(self, name: str) -> np.ndarray:
        """Tensor ``name`` as a float32 array (a view of the file when it is stored as float32)."""
        path, start, entry = self._entries[name]
        dtype = entry["dtype"]
        if dtype not in _NUMPY:
            raise CompressError(f"tensor {name} has dtype {dtype}, which GGUF export cannot read")
        begin, end = entry["data_offsets"]
        shape = tuple(entry["shape"])
        if end == begin:
            return np.zeros(shape, dtype=np.float32)
        raw = np.memmap(path, dtype=_NUMPY[dtype], mode="r", offset=start + begin, shape=shape)
        if dtype == "BF16":  # bfloat16 is the upper half of a float32
            return (raw.astype(np.uint32) << 16).view(np.float32)
        return np.asarray(raw) if dtype == "F32" else raw.astype(np.float32)


class TorchTensors:
    """The same interface over :class:`~compress.checkpoint.CheckpointReader` (PyTorch .bin weights)."""

    def __init__(self, folder: Path):
        from ..checkpoint import CheckpointReader

        self.folder = folder
        self._reader = CheckpointReader(folder)

    def __enter__(self) -> TorchTensors:
        return self

    def __exit__(self, *exc) -> None:
        self._reader.close()

    def keys(self) -> list[str]:
        return self._reader.keys()

    def info(self, name: str) -> tuple[bool, tuple[int, ...]]:
        dtype, shape = self._reader.info(name)
        return dtype.is_floating_point, shape

    def get(self, name: str) -> np.ndarray:
        return self._reader.get(name).float().numpy()


def open_tensors(folder: Path) -> NumpyTensors | TorchTensors:
    """A reader over the weights of ``folder``: safetensors (sharded or not) without torch, else .bin."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise CompressError(f"{index} is not a valid safetensors index ({e})") from None
        files = sorted({folder / name for name in weight_map.values()})
        missing = [p.name for p in files if not p.is_file()]
        if missing:
            raise CompressError(f"shard {missing[0]} listed in {index.name} is missing from {folder}")
        return NumpyTensors(folder, files)
    files = sorted(folder.glob("*.safetensors"))
    if files:
        return NumpyTensors(folder, files)
    return TorchTensors(folder)
