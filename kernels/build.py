"""Extensions compiled on first use with torch's extension loader, built once per process."""

from __future__ import annotations

import threading
import warnings


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

                    self._module = load(name=self.name, sources=self.sources, verbose=False, **self.load_kwargs)
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
