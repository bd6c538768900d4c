"""The CPU heap: giving freed memory back to the OS where the library has just freed a lot of it.

glibc's malloc serves blocks under its mmap threshold from the heap and raises that threshold (up to 32 MiB)
each time a mapped block is freed, so a build on ``meta`` that quantizes layer after layer leaves its freed fp32
weights as resident holes between the INT8 codes. :func:`release_free_memory` (``malloc_trim``) hands such holes
back; the library calls it while building on ``meta``. :func:`set_cpu_mmap_threshold` removes the holes
everywhere but makes every large allocation fault its pages in again, BLAS buffers included: at LLaMA-7B that
is the cheaper of the two (2.4 GiB lower and faster than glibc's policy), at 60M the dearer (the step 20-40 %
slower). So :func:`qgalore_fx.optimizer` sets it only for a model whose tensors on the CPU hold at least
:data:`AUTO_THRESHOLD_BYTES` (``optimizer(mmap_threshold=None)``, :func:`auto_mmap_threshold`), and an
application may set it itself. Measurements: docs/host-memory.md. Both are no-ops (returning False) where they
do not apply: not Linux, or not glibc.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys
import warnings
from typing import Optional

__all__ = ["AUTO_THRESHOLD_BYTES", "CPU_MMAP_THRESHOLD", "auto_mmap_threshold", "free_heap_bytes",
           "release_free_memory", "set_cpu_mmap_threshold"]

#: The threshold :func:`set_cpu_mmap_threshold` sets by default: 1 MiB.
CPU_MMAP_THRESHOLD = 1 << 20
#: ``optimizer(mmap_threshold=None)`` sets the threshold for a model whose parameters and buffers on the CPU hold
#: at least this many bytes: LLaMA-7B at rank 1024 holds 11.4 GB (measured: the threshold lowers its peak by
#: 2.4 GiB and shortens its step), the 60M preset 0.2 GB (measured: the threshold makes its step 20-40 % slower);
#: sizes between were not measured, so only models of several GB take it.
AUTO_THRESHOLD_BYTES = 4 << 30
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
    stops glibc from raising the threshold. The application calls it, or :func:`qgalore_fx.optimizer` for a
    large model on the CPU (module docstring). Returns False where it does not apply (not Linux/glibc).
    """
    if isinstance(nbytes, bool) or not isinstance(nbytes, int) or not 0 < nbytes <= 32 << 20:
        raise ValueError(f"nbytes must be an int in (0, 32 MiB] (glibc's limit), got {nbytes!r}")
    libc = _libc()
    if libc is None:
        return False
    return bool(libc.mallopt(_M_MMAP_THRESHOLD, nbytes))


def _cpu_bytes(model) -> int:
    """Bytes of ``model``'s parameters and buffers on the CPU, each storage counted once."""
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        t = t.to_local() if hasattr(t, "to_local") else t  # FSDP2's DTensors: this rank's shard
        if t.device.type != "cpu":
            continue
        key = t.untyped_storage().data_ptr()
        if key not in seen:
            seen.add(key)
            total += t.untyped_storage().nbytes()
    return total


def check_mmap_threshold(mmap_threshold) -> None:
    if mmap_threshold is not None and not isinstance(mmap_threshold, bool):
        raise TypeError(f"mmap_threshold must be None (by the model's size), True or False, got {mmap_threshold!r}")


_AUTO_SET = False  # the threshold was set by the library: said once per process

#: ``QGALORE_FX_MMAP_THRESHOLD=0`` keeps the library from ever setting the threshold on its own (the build and
#: ``optimizer(mmap_threshold=None)``); an explicit ``optimizer(mmap_threshold=True)`` still does.
ENV_MMAP_THRESHOLD = "QGALORE_FX_MMAP_THRESHOLD"


def _auto(held: int, what: str) -> bool:
    """Set the threshold when ``held`` bytes reach :data:`AUTO_THRESHOLD_BYTES` (and the environment allows)."""
    global _AUTO_SET
    if held < AUTO_THRESHOLD_BYTES or os.environ.get(ENV_MMAP_THRESHOLD, "") in ("0", "off", "false"):
        return False
    if not set_cpu_mmap_threshold():
        return False
    if not _AUTO_SET:
        _AUTO_SET = True
        warnings.warn(f"qgalore_fx: {what} holds {held / 2**30:.1f} GiB on the CPU, so freed blocks of "
                      f"{CPU_MMAP_THRESHOLD >> 20} MiB and more now go back to the OS at once (glibc's mmap "
                      f"threshold, process-wide; docs/host-memory.md); {ENV_MMAP_THRESHOLD}=0 keeps glibc's own "
                      "policy", stacklevel=4)
    return True


def auto_mmap_threshold(model, mmap_threshold: Optional[bool]) -> bool:
    """``optimizer(mmap_threshold=...)``: True sets the 1 MiB threshold, False leaves the allocator as it is, None
    sets it when ``model``'s tensors on the CPU hold :data:`AUTO_THRESHOLD_BYTES` or more (and says so once).
    Returns whether this call set it."""
    check_mmap_threshold(mmap_threshold)
    if mmap_threshold is None:
        return _auto(_cpu_bytes(model), "the model")
    return mmap_threshold and set_cpu_mmap_threshold()


def auto_mmap_threshold_for_build(model) -> bool:
    """Before a build on ``meta`` materializes ``model`` on the CPU: the threshold is set from the start when the
    model will hold :data:`AUTO_THRESHOLD_BYTES` or more (each parameter element keeps at least one byte, the INT8
    code), so the build's freed fp32 weights never become heap holes that a later step faults in again (LLaMA-7B:
    built under glibc's policy and switched at ``optimizer()``, the step peaked 0.30 GiB higher)."""
    return _auto(sum(p.numel() for p in model.parameters()), "the model being built")
