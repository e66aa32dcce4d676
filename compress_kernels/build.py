"""Extensions compiled on first use with torch's extension loader, built once per process.

Each build goes to its own folder under torch's extension root, named by a hash of the sources and the
build options, so two checkouts (or two versions) of the kernels never rebuild over each other. torch
guards a build with a lock file and waits for it forever; a build whose process was killed leaves that
file behind, so a lock older than STALE_LOCK_SECONDS is treated as abandoned and removed.
"""

from __future__ import annotations

import hashlib
import os
import threading
import time
import warnings
from pathlib import Path

STALE_LOCK_SECONDS = 20 * 60


def build_directory(name: str, sources: list[str], options: dict) -> Path:
    """<torch extension root>/compress/<name>-<hash>, created; a stale lock inside is removed.

    The hash covers the sources, the build options, and the Python and torch versions.
    """
    import sys

    import torch
    from torch.utils.cpp_extension import get_default_build_root

    digest = hashlib.sha256(repr((sorted(options.items()), sys.version_info[:2], torch.__version__)).encode())
    for src in sources:
        digest.update(Path(src).read_bytes())
    root = Path(os.environ.get("TORCH_EXTENSIONS_DIR") or get_default_build_root())
    folder = root / "compress" / f"{name}-{digest.hexdigest()[:12]}"
    folder.mkdir(parents=True, exist_ok=True)
    lock = folder / "lock"
    try:
        if time.time() - lock.stat().st_mtime > STALE_LOCK_SECONDS:
            lock.unlink()
    except FileNotFoundError:
        pass
    return folder


class LazyExtension:
    """A torch C++/CUDA extension built on the first ``get()``; a failed build is remembered, warned
    about once, and reported by every later ``get()`` as a RuntimeError (the dispatcher then moves on)."""

    def __init__(self, name: str, sources: list[str], what: str, fallback: str, **load_kwargs):
        self.name, self.sources, self.what, self.fallback = name, sources, what, fallback
        self.load_kwargs = load_kwargs
        self._lock = threading.Lock()
        self._module = None
        self._failed: str | None = None

    def get(self):
        """The compiled module (cached by torch under TORCH_EXTENSIONS_DIR between processes)."""
        with self._lock:
            if self._module is None and self._failed is None:
                try:
                    from torch.utils.cpp_extension import load

                    folder = build_directory(self.name, self.sources, self.load_kwargs)
                    self._module = load(name=self.name, sources=self.sources, verbose=False,
                                        build_directory=str(folder), **self.load_kwargs)
                except Exception as exc:  # no compiler or toolkit, or a build error
                    self._failed = (str(exc).strip().splitlines() or [type(exc).__name__])[-1]
                    warnings.warn(f"the {self.what} could not be built ({self._failed}); using {self.fallback}",
                                  RuntimeWarning, stacklevel=3)
            if self._module is None:
                raise RuntimeError(f"the {self.what} is unavailable: {self._failed}")
            return self._module

    def available(self) -> bool:
        """Whether it builds and loads here; the first call pays the build."""
        try:
            self.get()
            return True
        except RuntimeError:
            return False
