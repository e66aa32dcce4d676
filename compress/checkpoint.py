"""Checkpoint files: read tensors lazily and write sharded safetensors.

- :class:`CheckpointReader` opens a model folder's weights (model.safetensors, sharded safetensors with
  an index, or pytorch_model*.bin) and hands out one tensor at a time, so a caller can stream a model
  larger than memory.
- :class:`ShardWriter` writes tensors into shards of bounded size and the index file transformers
  expects when there is more than one.

Output folders are published by :func:`compress.outputs.atomic_output`.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Iterator

import torch

from .errors import CompressError
from .files import (  # noqa: F401  (re-exported)
    INDEX_NAMES,
    WEIGHT_SUFFIXES,
    copy_side_files,
    is_weight_file,
    safetensors_header,
)

DEFAULT_SHARD_BYTES = 2 * 1024**3

_SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}


class CheckpointReader:
    """Lazy access to the tensors of a model folder.

    Use as a context manager; ``keys()`` lists tensor names, ``get(name)`` loads one tensor,
    ``info(name)`` gives (dtype, shape) without loading it. Pruned weights stored as a bitmask plus
    their nonzero values (compress.prune.sparse_format) are listed and returned as the dense tensors.
    """

    RELEASE_EVERY = 256 * 1024**2  # bytes handed out before the files are unmapped again

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        self._since_release = 0
        self._where: dict[str, Path] = {}
        self._handles: dict[Path, object] = {}
        self._bin: dict[str, torch.Tensor] | None = None
        self._sparse: dict[str, tuple[str, str, str]] = {}
        files = sorted(self.folder.glob("*.safetensors"))
        if files:
            self._index_safetensors(files)
        else:
            bins = sorted(self.folder.glob("pytorch_model*.bin")) or sorted(self.folder.glob("*.bin"))
            if not bins:
                raise CompressError(f"model folder {self.folder} has no weights (no .safetensors or .bin file)")
            self._bin = {}
            for f in bins:
                try:
                    part = torch.load(f, map_location="cpu", weights_only=True, mmap=True)
                except Exception as e:  # torch raises several types for damaged zip archives
                    raise CompressError(f"weights file {f} cannot be read ({type(e).__name__}); it may be truncated") from None
                for k, v in part.items():
                    self._bin[k] = v
                    self._where[k] = f

    def _index_safetensors(self, files: list[Path]) -> None:
        from safetensors import safe_open

        index = self.folder / "model.safetensors.index.json"
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError) as e:
                raise CompressError(f"{index} is not a valid safetensors index ({e})") from None
            wanted = {self.folder / name for name in set(weight_map.values())}
            missing = [p.name for p in wanted if not p.is_file()]
            if missing:
                raise CompressError(f"shard {missing[0]} listed in {index.name} is missing from {self.folder}")
            files = sorted(wanted)
        for f in files:
            try:
                handle = safe_open(str(f), framework="pt")
                names = list(handle.keys())
            except Exception as e:  # SafetensorError is not importable in every version
                raise CompressError(f"safetensors file {f} cannot be read ({str(e).splitlines()[0]}); it may be truncated or corrupt") from None
            self._handles[f] = handle
            for k in names:
                self._where[k] = f
        self._index_sparse()

    def _index_sparse(self) -> None:
        # pruned weights stored as bitmask + values (compress.prune.sparse_format) read back as dense tensors
        if any(k.endswith("_bitmask") for k in self._where):
            from .prune.sparse_format import sparse_entries

            self._sparse = sparse_entries(self._where)
        dense_of = {triple[0]: key for key, triple in self._sparse.items()}
        parts = {p for triple in self._sparse.values() for p in triple}
        self._keys = [dense_of.get(k, k) for k in self._where if k not in parts or k in dense_of]

    def __enter__(self) -> "CheckpointReader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self._handles.clear()
        self._bin = None

    def release(self) -> None:
        """Unmap the safetensors files; they are reopened on the next access.

        Tensors come back as views of memory-mapped files, and every page read stays resident (and
        counted in the process's memory) while the file is mapped. ``get`` calls this every
        RELEASE_EVERY bytes and streaming readers after each block, so memory does not grow with the
        amount read. Tensors already handed out keep their own pages alive until they are freed.
        """
        self._handles.clear()
        self._since_release = 0

    def _handle(self, path: Path):
        handle = self._handles.get(path)
        if handle is None:
            from safetensors import safe_open

            handle = self._handles[path] = safe_open(str(path), framework="pt")
        return handle

    def keys(self) -> list[str]:
        return list(self._keys) if self._bin is None else list(self._where)

    def __contains__(self, key: str) -> bool:
        return key in self._sparse or key in self._where

    def files(self) -> list[Path]:
        return sorted(set(self._where.values()))

    def get(self, key: str) -> torch.Tensor:
        """Load tensor ``key`` (a CompressError if the file turns out to be damaged)."""
        if self._bin is not None:
            return self._bin[key]
        if key in self._sparse:
            from .prune.sparse_format import decode

            return decode(*(self.get(part) for part in self._sparse[key]))
        try:
            tensor = self._handle(self._where[key]).get_tensor(key)
            self._since_release += tensor.numel() * tensor.element_size()
            if self._since_release > self.RELEASE_EVERY:
                self.release()
            return tensor
        except KeyError:
            raise CompressError(f"the checkpoint has no tensor {key}") from None
        except Exception as e:
            raise CompressError(f"tensor {key} in {self._where[key].name} cannot be read ({str(e).splitlines()[0]})") from None

    def info(self, key: str) -> tuple[torch.dtype, tuple[int, ...]]:
        """(dtype, shape) of ``key`` without loading its data."""
        if self._bin is not None:
            t = self._bin[key]
            return t.dtype, tuple(t.shape)
        if key in self._sparse:
            bitmask, values, shape = self._sparse[key]
            return self.info(values)[0], tuple(int(x) for x in self.get(shape).tolist())
        sl = self._handle(self._where[key]).get_slice(key)
        return _SAFETENSORS_DTYPES.get(sl.get_dtype(), torch.float32), tuple(sl.get_shape())

    def items(self) -> Iterator[tuple[str, torch.Tensor]]:
        for key in self.keys():
            yield key, self.get(key)


def all_finite(tensor: torch.Tensor) -> bool:
    """Whether a tensor holds no NaN or Inf: one sum (NaN or Inf anywhere makes it NaN or Inf), and the
    elementwise test only when the sum is not finite (it may have overflowed); 5-10x faster than the
    elementwise test alone on large activations."""
    if not tensor.is_floating_point():
        return True
    return bool(torch.isfinite(tensor.sum())) or bool(torch.isfinite(tensor).all())


def check_finite(key: str, tensor: torch.Tensor) -> None:
    """CompressError when a floating-point tensor holds NaN or Inf."""
    if not all_finite(tensor):
        raise CompressError(f"tensor {key} contains NaN or Inf values; the model is damaged and cannot be quantized")


_DTYPE_CODES = {v: k for k, v in _SAFETENSORS_DTYPES.items()}


class ShardWriter:
    """Write tensors into safetensors shards of at most ``max_shard_bytes`` each, one tensor at a time.

    Each tensor's bytes go straight to a data file on disk; when a shard is complete its header (names,
    dtypes, shapes, offsets, as the safetensors format defines it) is written and the data appended, so
    memory holds one tensor whatever the model's size. ``close()`` names the shards
    model-0000i-of-0000n.safetensors (or model.safetensors when there is one) and writes
    model.safetensors.index.json for more than one.
    """

    def __init__(self, folder: str | Path, max_shard_bytes: int = DEFAULT_SHARD_BYTES, metadata: dict | None = None):
        self.folder = Path(folder)
        self.max_shard_bytes = max_shard_bytes
        self.metadata = {"format": "pt", **{k: str(v) for k, v in (metadata or {}).items()}}
        self._entries: dict[str, dict] = {}  # tensors of the open shard
        self._data = None  # the open shard's data file
        self._offset = 0
        self._shards: list[tuple[Path, list[str]]] = []
        self._names: set[str] = set()
        self.total_bytes = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        if name in self._names:
            raise CompressError(f"tensor {name} was written twice")
        tensor = tensor.detach().to("cpu").contiguous()
        if tensor.dtype not in _DTYPE_CODES:
            raise CompressError(f"tensor {name} has dtype {tensor.dtype}, which safetensors cannot store")
        nbytes = tensor.numel() * tensor.element_size()
        if self._entries and self._offset + nbytes > self.max_shard_bytes:
            self._finish_shard()
        if self._data is None:
            self._data = open(self.folder / f"shard-{len(self._shards):05d}.data.tmp", "wb")
        if nbytes:
            self._data.write(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
        self._entries[name] = {"dtype": _DTYPE_CODES[tensor.dtype], "shape": list(tensor.shape),
                               "data_offsets": [self._offset, self._offset + nbytes]}
        self._offset += nbytes
        self._names.add(name)
        self.total_bytes += nbytes

    def _finish_shard(self) -> None:
        if self._data is None:
            return
        data_path = Path(self._data.name)
        self._data.close()
        header = json.dumps({"__metadata__": self.metadata, **self._entries}, separators=(",", ":")).encode()
        header += b" " * (-len(header) % 8)  # the format aligns the data to 8 bytes
        path = self.folder / f"shard-{len(self._shards):05d}.tmp"
        with open(path, "wb") as out, open(data_path, "rb") as data:
            out.write(len(header).to_bytes(8, "little"))
            out.write(header)
            shutil.copyfileobj(data, out, length=16 * 1024 * 1024)
        data_path.unlink()
        self._shards.append((path, list(self._entries)))
        self._entries, self._data, self._offset = {}, None, 0

    def close(self) -> list[Path]:
        """Finish the last shard, rename the shards to their final names, write the index."""
        self._finish_shard()
        if not self._shards:
            raise CompressError("no tensors were written")
        n = len(self._shards)
        final, weight_map = [], {}
        for i, (tmp, names) in enumerate(self._shards):
            name = "model.safetensors" if n == 1 else f"model-{i + 1:05d}-of-{n:05d}.safetensors"
            target = self.folder / name
            os.replace(tmp, target)
            final.append(target)
            weight_map.update({k: name for k in names})
        if n > 1:
            index = {"metadata": {"total_size": self.total_bytes}, "weight_map": dict(sorted(weight_map.items()))}
            (self.folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
        return final


