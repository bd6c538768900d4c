"""Which implementation of a kernel runs: a fast path, or the pure-torch reference.

Every kernel of qgalore_fx has a pure-torch reference, the checked definition (the tests compare every fast
path against it). The fast paths are

* functions compiled once with ``torch.compile(fullgraph=True, dynamic=True)`` (inductor: C++ on the CPU,
  Triton on CUDA; one compilation serves every number of blocks) — the 8-bit Adam step of
  :mod:`qgalore_fx.kernels.adam8bit` and the INT8 write-back of :mod:`qgalore_fx.kernels.writeback`;
* the Triton kernels registered as the custom ops' CUDA implementations (``quant_triton.py``,
  ``int8_matmul.py``);
* C++ for the CPU where inductor's code is slow (:class:`NativeKernel`, built once per machine by
  ``torch.utils.cpp_extension``): the 8-bit Adam step (``adam8bit_cpu.cpp``) and the INT8 write-back
  (``writeback_cpu.cpp``) in AVX2, each bit-identical to its compiled version. With both, a training step on
  such a CPU never imports inductor.

Setting the environment variable ``QGALORE_FX_REFERENCE=1`` (any value but ``""`` and ``"0"``) makes every
call use the references, on every device: the way out when a fast path fails on a new machine (no C++
compiler for inductor, a GPU Triton does not support), and the way to check a result against the
definition. It is read at each call, so it can be set or cleared in a running process.

A fast path that cannot be compiled (``torch.compile`` raises on the first call, e.g. without a working C++
compiler; a C++ extension fails to build) warns once and falls back for the rest of the process (a C++ kernel to
its compiled version, a compiled one to the reference). Inside a region that
``torch.compile`` is tracing, the reference code runs: the outer compilation fuses it anyway.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Callable, Optional

import torch

__all__ = ["AVX2_CFLAGS", "CPU_HAS_AVX2", "ENV_REFERENCE", "CompiledKernel", "NativeKernel", "reference_forced"]

ENV_REFERENCE = "QGALORE_FX_REFERENCE"


#: Whether this CPU runs the AVX2 C++ kernels (``adam8bit_cpu.cpp``, ``writeback_cpu.cpp``), and the flags they
#: are built with: no fused multiply-adds, so every product is rounded as torch rounds it.
CPU_HAS_AVX2 = torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512")
AVX2_CFLAGS = ("-O3", "-mavx2", "-ffp-contract=off")


def reference_forced() -> bool:
    """True when ``QGALORE_FX_REFERENCE`` asks for the pure-torch references everywhere."""
    return os.environ.get(ENV_REFERENCE, "") not in ("", "0")


class CompiledKernel:
    """``fn`` compiled on first use with ``torch.compile(fullgraph=True, dynamic=dynamic)``.

    ``kernel(*args)`` returns ``(True, result)``, or ``(False, None)`` — run the reference instead — when the
    references are forced, when a ``torch.compile`` trace is in progress, or after compilation failed once (a
    warning says why). ``dynamic=True`` (what the library's kernels use) compiles once for every size of the
    leading dimension; with ``dynamic=False`` each new input shape compiles once more.
    """

    def __init__(self, fn: Callable, name: str, dynamic: bool = False):
        self.fn = fn
        self.name = name
        self.dynamic = dynamic
        self._compiled: Optional[Callable] = None
        self.failed: Optional[str] = None

    def available(self) -> bool:
        return self.failed is None and not reference_forced() and not torch.compiler.is_compiling()

    def __call__(self, *args):
        if not self.available():
            return False, None
        if self._compiled is None:
            self._compiled = torch.compile(self.fn, fullgraph=True, dynamic=self.dynamic)
        try:
            return True, self._compiled(*args)
        except Exception as e:  # noqa: BLE001  (any compiler failure: fall back to the reference, loudly)
            self.failed = f"{type(e).__name__}: {e}"
            warnings.warn(f"qgalore_fx: compiling the fast path {self.name!r} failed ({self.failed.splitlines()[0]}); "
                          f"using the pure-torch reference from now on (set {ENV_REFERENCE}=1 to skip the attempt)",
                          RuntimeWarning, stacklevel=2)
            return False, None


class NativeKernel:
    """The function ``entry`` of the C++ file ``source`` (beside this module), built on first use by
    ``torch.utils.cpp_extension.load`` with ``cflags`` (cached per machine under ``TORCH_EXTENSIONS_DIR``; about 40 s
    the first time).

    ``kernel(*args)`` returns ``(True, result)``, or ``(False, None)`` — run another implementation instead — when
    the references are forced, when a ``torch.compile`` trace is in progress, or after the build failed once (a
    warning says why).
    """

    def __init__(self, source: str, entry: str, name: str, cflags: tuple = ("-O3",)):
        self.source = Path(__file__).with_name(source)
        self.entry = entry
        self.name = name
        self.cflags = tuple(cflags)
        self._fn: Optional[Callable] = None
        self.failed: Optional[str] = None

    def available(self) -> bool:
        return self.failed is None and not reference_forced() and not torch.compiler.is_compiling()

    def _load(self) -> Callable:
        import hashlib

        from torch.utils.cpp_extension import load

        # the name carries a digest of the source and the headers beside it: torch's build cache rebuilds on a
        # change of the source only, and the kernels share cpu_kernels.h
        digest = hashlib.sha256()
        for path in [self.source, *sorted(self.source.parent.glob("*.h"))]:
            digest.update(path.read_bytes())
        module = load(name=f"qgalore_fx_{self.source.stem}_{digest.hexdigest()[:10]}", sources=[str(self.source)],
                      extra_cflags=list(self.cflags), extra_include_paths=[str(self.source.parent)], verbose=False)
        return getattr(module, self.entry)

    def __call__(self, *args):
        if not self.available():
            return False, None
        if self._fn is None:
            try:
                self._fn = self._load()
            except Exception as e:  # noqa: BLE001  (no compiler, no ninja, a failed build: fall back, loudly)
                self.failed = f"{type(e).__name__}: {e}"
                warnings.warn(f"qgalore_fx: building the C++ kernel {self.name!r} failed ({self.failed.splitlines()[0]}); "
                              "using its compiled or reference version from now on", RuntimeWarning, stacklevel=2)
                return False, None
        return True, self._fn(*args)
