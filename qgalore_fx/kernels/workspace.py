"""Per-thread scratch buffers for the chunked kernels' temporaries.

The chunked paths (the dequant-matmul's fp32 rows, the write-back's ΔW rows) each need a few MiB
of fp32 per chunk, a dozen to hundreds of chunks per layer and step. Allocated fresh, every one of them is a new
mapping faulted in page by page wherever the CPU allocator serves large blocks with ``mmap``
(:mod:`qgalore_fx.host_allocator`), and a hole in the heap where it does not. Reusing them took one LLaMA-7B
decoder layer's step under the 1 MiB threshold from 10.11 to 9.16 s on two cores (``benchmarks/bench_layer_step.py``,
BENCHMARKS.md).

A workspace is kept per thread (a buffer is used only inside one call, on the thread that runs it) and per
slot, device and dtype. It grows to the largest request seen and stays: each slot is bounded by its caller's
chunk size (``MATMUL_CHUNK``, ``WRITE_CHUNK`` elements), so both together are about 20 MiB (8 MiB more for a
model computing in bf16: the dequantized rows rounded to 16 bits).
Callers must finish with a buffer before they ask for the same slot again.
"""

from __future__ import annotations

import threading

import torch

__all__ = ["workspace", "workspace_bytes"]

_LOCAL = threading.local()


def workspace(slot: str, numel: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A flat buffer of ``numel`` elements (uninitialized) that this thread reuses from call to call."""
    cache = getattr(_LOCAL, "buffers", None)
    if cache is None:
        cache = _LOCAL.buffers = {}
    key = (slot, torch.device(device), dtype)
    buf = cache.get(key)
    if buf is None or buf.numel() < numel:
        cache[key] = None  # free the smaller buffer before the larger one is allocated
        cache[key] = buf = torch.empty(numel, dtype=dtype, device=device)
    return buf[:numel]


def workspace_bytes() -> int:
    """Bytes this thread's workspaces hold."""
    cache = getattr(_LOCAL, "buffers", None) or {}
    return sum(b.numel() * b.element_size() for b in cache.values() if b is not None)
