"""The transients behind the LLaMA-7B memory figures, one operation at a time, before and after.

    python benchmarks/bench_transients.py --threads 1

Each case runs an operation at LLaMA-7B shapes and reports the peak resident-set increase while it runs
(``VmRSS`` sampled every 0.5 ms by a thread, glibc's mmap threshold at 1 MiB so freed blocks leave the resident
set) and its wall time, for the way the library did it before and the way it does it now:

- finiteness of a 32000 x 2048 fp32 gradient: ``torch.isfinite(g).all()`` vs ``qgalore_fx.kernels.all_finite``;
- ``x @ dequant(W)ᵀ`` for an 11008 x 4096 INT8 weight and 256 tokens: the reference (whole fp32 weight) vs the
  op's default kernel (row chunks of ``MATMUL_CHUNK``);
- 8-bit Adam's direction for an 11008 x 1024 R: one call vs ``lowrank._adam_direction`` (``ADAM_CHUNK``);
- a first refresh at rank 1024 from 256 tokens of an 11008 x 4096 layer: randomized on the formed G vs
  through ``projection.FactoredGradient``.

Each case runs once to warm up (compilation, thread pools), then once measured.
"""

from __future__ import annotations

import argparse
import sys
import threading
import time

import torch


def measure(fn):
    from qgalore_fx.memory import process_memory

    peak, stop = [0], threading.Event()

    def sample():
        while not stop.is_set():
            peak[0] = max(peak[0], process_memory("VmRSS"))
            time.sleep(0.0005)

    fn()  # warm-up
    base = process_memory("VmRSS")
    peak[0] = base
    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    t0 = time.perf_counter()
    out = fn()
    seconds = time.perf_counter() - t0
    stop.set()
    thread.join()
    del out
    return (peak[0] - base) / 2**20, seconds


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    from qgalore_fx import lowrank
    from qgalore_fx import projection as proj
    from qgalore_fx.kernels import all_finite
    from qgalore_fx.kernels.adam8bit import AdamState, adam_direction_masked_
    from qgalore_fx.kernels.int8_matmul import int8_matmul_reference
    from qgalore_fx.memory import set_cpu_mmap_threshold

    set_cpu_mmap_threshold(1 << 20)
    gen = torch.Generator().manual_seed(0)
    grad = torch.randn(32000, 2048, generator=gen)
    codes = torch.randint(-127, 128, (11008, 4096), generator=gen, dtype=torch.int8)
    scales = torch.rand(11008 * 4096 // 256, generator=gen)
    x = torch.randn(256, 4096, generator=gen)
    R = torch.randn(11008, 1024, generator=gen)
    adam = AdamState.zeros(R.shape, bits=8)
    t, one = torch.ones((), dtype=torch.int64), torch.ones((), dtype=torch.bool)
    g2 = torch.randn(256, 11008, generator=gen)

    def refresh(factored):
        G = proj.FactoredGradient(g2, x) if factored else g2.T @ x
        return proj.compute_projection(G, 1024, "right", method="randomized", generator=torch.Generator().manual_seed(1))

    cases = [
        ("finite check, 32000 x 2048 fp32", lambda: torch.isfinite(grad).all(), lambda: all_finite(grad)),
        ("x @ dequant(W)^T, 11008 x 4096, 256 tokens", lambda: int8_matmul_reference(x, codes, scales, 256),
         lambda: torch.ops.qgalore_fx.int8_matmul(x, codes, scales, 256)),
        ("8-bit Adam direction, R 11008 x 1024", lambda: adam_direction_masked_(R, adam, t, 0.9, 0.999, 1e-8, one),
         lambda: lowrank._adam_direction(R, adam, t, 0.9, 0.999, 1e-8, one)),
        ("first refresh, 11008 x 4096, rank 1024, 256 tokens", lambda: refresh(False), lambda: refresh(True)),
    ]
    print(f"{args.threads} thread(s); peak RSS increase while the operation runs (sampled VmRSS) and wall time")
    print("| operation | before: MiB | before: s | now: MiB | now: s |\n|---|---:|---:|---:|---:|")
    for name, before, now in cases:
        (mb0, s0), (mb1, s1) = measure(before), measure(now)
        print(f"| {name} | {mb0:.0f} | {s0:.2f} | {mb1:.0f} | {s1:.2f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
