"""Per-batch activations of a calibration run, and the nested values (tensors, tuples, dicts) they are.

``ActivationStore`` keeps one value per calibration batch in memory or, with a folder, in files (the
calibration runner's ``--offload``); the helpers move, copy and compare such values whatever their
nesting.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import torch


class ActivationStore:
    """A list of per-batch values (tensors, or tuples / dicts of them) kept in memory or in files."""

    def __init__(self, folder: Path | None = None):
        self.folder = folder
        self._items: list[Any] = []
        if folder is not None:
            folder.mkdir(parents=True, exist_ok=True)

    def append(self, value: Any) -> None:
        value = to_cpu(value)
        if self.folder is None:
            self._items.append(value)
        else:
            path = self.folder / f"{len(self._items):06d}.pt"
            torch.save(value, path)
            self._items.append(path)

    def __len__(self) -> int:
        return len(self._items)

    def __getitem__(self, i: int) -> Any:
        item = self._items[i]
        return torch.load(item, weights_only=False) if self.folder is not None else item

    def clear(self) -> None:
        if self.folder is not None:
            shutil.rmtree(self.folder, ignore_errors=True)
        self._items = []


def to_cpu(value):
    """``value`` with every tensor detached and on the CPU."""
    if isinstance(value, torch.Tensor):
        return value.detach().to("cpu")
    if isinstance(value, (tuple, list)):
        return type(value)(to_cpu(v) for v in value)
    if isinstance(value, dict):
        return {k: to_cpu(v) for k, v in value.items()}
    return value


def copy_values(value):
    """``value`` with every tensor cloned."""
    if isinstance(value, torch.Tensor):
        return value.clone()
    if isinstance(value, (tuple, list)):
        return type(value)(copy_values(v) for v in value)
    if isinstance(value, dict):
        return {k: copy_values(v) for k, v in value.items()}
    return value


def to_device(value, device):
    """``value`` with every tensor on ``device``."""
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, (tuple, list)):
        return type(value)(to_device(v, device) for v in value)
    if isinstance(value, dict):
        return {k: to_device(v, device) for k, v in value.items()}
    return value


def same_values(a, b) -> bool:
    """Whether two values are equal, tensors by shape, dtype and contents."""
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        return a.shape == b.shape and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, (tuple, list)) and isinstance(b, (tuple, list)):
        return len(a) == len(b) and all(same_values(x, y) for x, y in zip(a, b))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(same_values(a[k], b[k]) for k in a)
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return False
    return a == b
