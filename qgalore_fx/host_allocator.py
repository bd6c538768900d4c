"""The CPU heap: giving freed memory back to the OS where the library has just freed a lot of it.

glibc's malloc serves blocks under its mmap threshold from the heap and raises that threshold (up to 32 MiB)
each time a mapped block is freed, so a build on ``meta`` that quantizes layer after layer leaves its freed fp32
weights as resident holes between the INT8 codes. :func:`release_free_memory` (``malloc_trim``) hands such holes
back; the library calls it while building on ``meta``. :func:`set_cpu_mmap_threshold` removes the holes
everywhere but makes every large allocation fault its pages in again, BLAS buffers included, so only an
application sets it. Measurements: docs/host-memory.md. Both are no-ops (returning False) where they do not
apply: not Linux, or not glibc.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys
from typing import Optional

__all__ = ["CPU_MMAP_THRESHOLD", "free_heap_bytes", "release_free_memory", "set_cpu_mmap_threshold"]

#: The threshold :func:`set_cpu_mmap_threshold` sets by default: 1 MiB.
CPU_MMAP_THRESHOLD = 1 << 20
#: :func:`release_free_memory` trims only when the heap holds at least this many free bytes: below it the
#: call would return little and the pages it returns would be faulted in again by the next allocations.
RELEASE_MIN_BYTES = 64 << 20

_M_MMAP_THRESHOLD = -3


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                      "fsmblks", "uordblks", "fordblks", "keepcost")]


_LIBC: Optional[ctypes.CDLL] = None
_TRIMMED_FREE = 0  # free heap bytes right after the last trim (their pages are already back with the OS)
_LOADED = False


def _libc() -> Optional[ctypes.CDLL]:
    """glibc, or None where this is not Linux with glibc (``malloc_trim`` is glibc's own)."""
    global _LIBC, _LOADED
    if not _LOADED:
        _LOADED = True
        if sys.platform.startswith("linux"):
            try:
                libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
                if hasattr(libc, "malloc_trim") and hasattr(libc, "mallopt"):
                    if hasattr(libc, "mallinfo2"):
                        libc.mallinfo2.restype = _MallInfo2
                    _LIBC = libc
            except OSError:
                _LIBC = None
    return _LIBC


def free_heap_bytes() -> Optional[int]:
    """Bytes malloc holds free in its heaps (``mallinfo2().fordblks``, all arenas); None where unknown."""
    libc = _libc()
    if libc is None or not hasattr(libc, "mallinfo2"):
        return None
    return int(libc.mallinfo2().fordblks)


def release_free_memory(min_bytes: int = RELEASE_MIN_BYTES) -> bool:
    """``malloc_trim(0)``, when the heap holds at least ``min_bytes`` more free than it did after the last trim
    (always, where that is unknown): the free pages of every arena go back to the OS. Returns whether it trimmed.

    A trimmed hole still counts as free in the heap, so the last trim's free figure is the baseline; holes
    reused since then are resident again, so the baseline never exceeds what is free now."""
    global _TRIMMED_FREE
    libc = _libc()
    if libc is None:
        return False
    free = free_heap_bytes()
    if free is not None:
        _TRIMMED_FREE = min(_TRIMMED_FREE, free)
        if free - _TRIMMED_FREE < min_bytes:
            return False
    libc.malloc_trim(0)
    if free is not None:
        _TRIMMED_FREE = free
    return True


def set_cpu_mmap_threshold(nbytes: int = CPU_MMAP_THRESHOLD) -> bool:
    """Serve CPU allocations of ``nbytes`` or more from their own ``mmap``, returned to the OS when freed.

    A process-wide setting (``mallopt(M_MMAP_THRESHOLD)``, the same as ``MALLOC_MMAP_THRESHOLD_``) that also
    stops glibc from raising the threshold. The application calls it; the library never does on its own
    (module docstring). Returns False where it does not apply (not Linux/glibc).
    """
    if isinstance(nbytes, bool) or not isinstance(nbytes, int) or not 0 < nbytes <= 32 << 20:
        raise ValueError(f"nbytes must be an int in (0, 32 MiB] (glibc's limit), got {nbytes!r}")
    libc = _libc()
    if libc is None:
        return False
    return bool(libc.mallopt(_M_MMAP_THRESHOLD, nbytes))
