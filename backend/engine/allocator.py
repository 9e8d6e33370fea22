"""Memory the C library keeps: what the engine process gives back to the system.

glibc's malloc keeps freed blocks below its mmap threshold in its heaps for reuse; the engine
process sets the thresholds (process.ENGINE_ALLOCATOR_ENV) and trims its heaps at the moments
much has just been freed: after the load, after the grammar's vocabulary is built, and when the
decode loop goes idle.
"""

from __future__ import annotations

import ctypes


def give_back_free_memory() -> None:
    """Return the free memory glibc's heaps keep to the system (malloc_trim); nothing where the
    C library is another."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
