"""Process memory: hand freed memory back to the system between large steps."""

from __future__ import annotations

import ctypes
import gc


def release_free_memory(full: bool = True) -> None:
    """Collect garbage (all generations, or with ``full=False`` the two young ones) and return the
    allocator's free memory to the system (glibc malloc_trim).

    glibc keeps freed heap memory for reuse, so after a large tensor is freed the process still holds
    it; trimming keeps the resident set close to what is really in use, which matters both for memory
    measurements and for streaming a model larger than memory one block at a time.
    """
    if full:
        gc.collect()
    else:
        gc.collect(1)
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to trim
        pass
