"""Cost and quality of the three ways to compute a projection, at the LLaMA presets' shapes.

Run as a script (prints markdown tables; about 2 minutes on the 2-core CPU)::

    .venv/bin/python benchmarks/bench_projection.py                     # MLP shapes of 60M..1B
    .venv/bin/python benchmarks/bench_projection.py --quick             # two small shapes, seconds
    .venv/bin/python benchmarks/bench_projection.py --wall --threads 2  # wall time, 2 threads

or under pytest-benchmark (small shapes only)::

    .venv/bin/pytest benchmarks/bench_projection.py --benchmark-enable

What is measured, per shape ``[m, n]`` and rank ``r`` (GaLore side: right when m >= n):

* time: median (and min) of 3 calls of :func:`qgalore_fx.projection.compute_projection`
  (and of ``torch.svd_lowrank`` as an outside baseline), the repetitions interleaved across
  methods so that load from other processes hits them alike; ``speedup`` is against
  ``full`` in the same run. By default the clock is this process's CPU time with one
  intra-op thread: on a machine shared with other jobs it is the figure they disturb least
  (two OpenMP threads competing for busy cores spin-wait, and wall times then swing by 3x
  between identical calls). ``--wall`` and ``--threads`` measure wall time instead;
* ``energy``: the captured gradient energy ``||project(G, P)||² / ||G||²`` divided by the
  same for the full-SVD ``P`` (1.0 = as good as the exact top-r subspace; Eckart-Young
  makes it <= 1);
* ``cos²``: :func:`subspace_similarity` to the full-SVD subspace (mean squared cosine of the
  principal angles; 1.0 = the same subspace). With a slowly decaying spectrum the singular
  values around index r are nearly equal, so the exact top-r subspace is ill-determined at
  its edge and cos² sits below 1 even where the energy is within 0.1% of optimal.

The gradient has singular values ``(i + 1) ** -0.5`` (:func:`synthetic_gradient`,
``decay=0.5``): a slowly decaying spectrum, the harder case for sketching (with ``decay=1``
every method at its defaults is within 0.1% of the optimal energy). The warm start ("subspace") is measured
as in training: ``P_prev`` is the exact projection of the previous gradient ``G_prev``, and
``G = G_prev + eps * D * ||G_prev|| / ||D||`` with ``D`` another gradient of the same
spectrum; ``eps = 0.2`` ("slow") and ``eps = 1.0`` ("fast") give the subspace drifts shown
in the ``cos² to P_prev`` column of the stale rows (similarity of ``P_prev`` to the new exact
subspace; for the other rows it is what the lazy-refresh policy would record). "INT4 prev"
round-trips ``P_prev`` through 4-bit asymmetric block quantization (block 256), the way the
stored projection reaches the refresh.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from qgalore_fx.projection import (
    captured_energy,
    compute_projection,
    projection_side,
    subspace_similarity,
    synthetic_gradient,
)

# (name, m, n, rank): m x n is the MLP up/gate projection of each preset (intermediate x
# hidden); the down projection is its transpose and uses the left side with the same cost.
PRESET_SHAPES = [
    ("LLaMA-60M", 1376, 512, 128),
    ("LLaMA-130M", 2048, 768, 256),
    ("LLaMA-350M", 2736, 1024, 256),
    ("LLaMA-1B", 5461, 2048, 512),
]
QUICK_SHAPES = [
    ("small", 384, 128, 32),
    ("small-left", 128, 384, 32),
]
DECAY = 0.5
DRIFTS = {"slow": 0.2, "fast": 1.0}
REPEATS = 3
CHAIN_REFRESHES = 10


def drifted(G: torch.Tensor, eps: float, generator: torch.Generator, decay: float = DECAY) -> torch.Tensor:
    """``G + eps * D * ||G|| / ||D||`` for a fresh gradient-like ``D`` of the same spectrum."""
    D = synthetic_gradient(G.shape[0], G.shape[1], decay=decay, generator=generator)
    return G + eps * D * (G.norm() / D.norm())


def int4_roundtrip(P: torch.Tensor, block: int = 256) -> torch.Tensor:
    """Dequantize(quantize(P)) with 4-bit asymmetric min-max codes per block of ``block`` elements."""
    flat = P.reshape(-1)
    pad = (-flat.numel()) % block
    x = torch.cat([flat, flat.new_zeros(pad)]).reshape(-1, block)
    lo = x.amin(dim=1, keepdim=True)
    scale = ((x.amax(dim=1, keepdim=True) - lo) / 15).clamp_min(1e-12)
    codes = torch.round((x - lo) / scale).clamp(0, 15)
    return (codes * scale + lo).reshape(-1)[: flat.numel()].reshape(P.shape)


def _svd_lowrank(G: torch.Tensor, rank: int, side: str) -> torch.Tensor:
    U, _, V = torch.svd_lowrank(G, q=rank + 10, niter=2)
    return V[:, :rank].T if side == "right" else U[:, :rank]


@dataclass
class Case:
    label: str
    G: torch.Tensor  # the gradient the projection is for
    fn: Optional[Callable[[], torch.Tensor]]  # returns a projection of G; None: not timed
    P: Optional[torch.Tensor] = None  # filled by measure(), or given for untimed rows


def cases(m: int, n: int, rank: int, seed: int = 0) -> tuple[list[Case], torch.Tensor]:
    """The rows measured for one shape, and the previous projection P_prev they start from."""
    gen = torch.Generator().manual_seed(seed)
    side = projection_side(m, n)
    G_prev = synthetic_gradient(m, n, decay=DECAY, generator=gen)
    P_prev = compute_projection(G_prev, rank, side, "full")
    G_slow, G_fast = (drifted(G_prev, eps, gen) for eps in (DRIFTS["slow"], DRIFTS["fast"]))
    P_prev_int4 = int4_roundtrip(P_prev)
    sketch = torch.Generator()

    def method(G: torch.Tensor, name: str, prev: Optional[torch.Tensor] = None, **kw) -> Callable[[], torch.Tensor]:
        return lambda: compute_projection(G, rank, side, name, prev=prev, generator=sketch.manual_seed(1), **kw)

    return [
        Case("full (torch.linalg.svd)", G_slow, method(G_slow, "full")),
        Case("torch.svd_lowrank q=r+10 niter=2", G_slow, lambda: _svd_lowrank(G_slow, rank, side)),
        Case("randomized (default niter=3)", G_slow, method(G_slow, "randomized")),
        Case("randomized niter=2", G_slow, method(G_slow, "randomized", niter=2)),
        Case("subspace niter=1, slow drift", G_slow, method(G_slow, "subspace", P_prev, niter=1)),
        Case("**subspace (default niter=2)**, slow drift", G_slow, method(G_slow, "subspace", P_prev)),
        Case("subspace (default), slow drift, INT4 prev", G_slow, method(G_slow, "subspace", P_prev_int4)),
        Case("no refresh (stale P_prev), slow drift", G_slow, None, P_prev),
        Case("subspace niter=1, fast drift", G_fast, method(G_fast, "subspace", P_prev, niter=1)),
        Case("**subspace (default niter=2)**, fast drift", G_fast, method(G_fast, "subspace", P_prev)),
        Case("randomized (default niter=3), fast drift", G_fast, method(G_fast, "randomized")),
        Case("no refresh (stale P_prev), fast drift", G_fast, None, P_prev),
    ], P_prev


TABLE_HEADER = [
    "| model | shape (side) | r | method | {clock} ms, median (min) | speedup vs full "
    "| energy vs full | cos² to full | cos² to P_prev |",
    "|---|---|---|---|---:|---:|---:|---:|---:|",
]


def measure(
    name: str, m: int, n: int, rank: int, repeats: int = REPEATS, clock: Callable[[], float] = time.process_time
) -> list[str]:
    """Table rows for one shape."""
    side = projection_side(m, n)
    rows, P_prev = cases(m, n, rank)
    times: list[list[float]] = [[] for _ in rows]
    for _ in range(repeats):  # interleaved repetitions
        for case, ts in zip(rows, times):
            if case.fn is not None:
                t0 = clock()
                case.P = case.fn()
                ts.append(clock() - t0)
    # exact projection of each distinct G (the first row is the full SVD of its G)
    exact = {id(rows[0].G): rows[0].P}
    for case in rows:
        if id(case.G) not in exact:
            exact[id(case.G)] = compute_projection(case.G, rank, side, "full")
    t_full = statistics.median(times[0])
    lines = []
    for case, ts in zip(rows, times):
        P_exact = exact[id(case.G)]
        if ts:
            t = statistics.median(ts)
            timing = f"{t * 1e3:.0f} ({min(ts) * 1e3:.0f}) | {t_full / t:.1f}×"
        else:
            timing = "— | —"
        energy = captured_energy(case.G, case.P, side) / captured_energy(case.G, P_exact, side)
        lines.append(
            f"| {name} | {m}×{n} ({side}) | {rank} | {case.label} | {timing} | {energy:.4f} "
            f"| {subspace_similarity(case.P, P_exact, side):.3f} | {subspace_similarity(case.P, P_prev, side):.3f} |"
        )
    return lines


def chained(m: int, n: int, rank: int, refreshes: int = CHAIN_REFRESHES, seed: int = 0) -> list[str]:
    """Quality after ``refreshes`` refreshes in a row, each warm-started from the last result.

    ``G_t = normalize(G_{t-1} + eps * D_t * ||G_{t-1}|| / ||D_t||)``. A warm start carries its
    own error into the next refresh; this shows whether that error stays bounded. The last
    column is what the lazy policy would record at the last refresh, next to the exact value.
    """
    side = projection_side(m, n)
    lines = [
        f"| drift | method | energy vs full, refresh 1 | energy vs full, refresh {refreshes} "
        f"| recorded cos² to prev (exact) at refresh {refreshes} |",
        "|---|---|---:|---:|---:|",
    ]
    variants = {
        "subspace niter=1": dict(method="subspace", niter=1),
        "**subspace (default niter=2)**": dict(method="subspace"),
        "randomized (default niter=3)": dict(method="randomized"),
    }
    for drift, eps in DRIFTS.items():
        gen = torch.Generator().manual_seed(seed)
        G = synthetic_gradient(m, n, decay=DECAY, generator=gen)
        P_exact = compute_projection(G, rank, side, "full")
        P = {label: P_exact for label in variants}
        first: dict[str, float] = {}
        for t in range(refreshes):
            G = drifted(G, eps, gen)
            G = G / G.norm()
            P_exact_new = compute_projection(G, rank, side, "full")
            e_exact = captured_energy(G, P_exact_new, side)
            exact_sim = subspace_similarity(P_exact_new, P_exact, side)
            new = {
                label: compute_projection(G, rank, side, prev=P[label], generator=gen, **kw)
                for label, kw in variants.items()
            }
            if t == 0:
                first = {label: captured_energy(G, Q, side) / e_exact for label, Q in new.items()}
            if t == refreshes - 1:
                for label, Q in new.items():
                    lines.append(
                        f"| {drift} | {label} | {first[label]:.4f} | {captured_energy(G, Q, side) / e_exact:.4f} "
                        f"| {subspace_similarity(Q, P[label], side):.3f} ({exact_sim:.3f}) |"
                    )
            P, P_exact = new, P_exact_new
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="two small shapes only (seconds)")
    parser.add_argument(
        "--rank-1b", type=int, default=None, help="also run LLaMA-1B at this rank (the official script uses 1024)"
    )
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1)")
    parser.add_argument("--wall", action="store_true", help="time wall-clock instead of this process's CPU time")
    args = parser.parse_args()
    shapes = QUICK_SHAPES if args.quick else list(PRESET_SHAPES)
    if args.rank_1b is not None and not args.quick:
        shapes.append(("LLaMA-1B", 5461, 2048, args.rank_1b))
    torch.set_num_threads(args.threads)
    load_before = os.getloadavg()[0]
    t0 = time.perf_counter()
    clock = time.perf_counter if args.wall else time.process_time
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, {'wall' if args.wall else 'CPU'} time, "
        f"spectrum decay {DECAY}, median of {REPEATS}\n"
    )
    print("\n".join(TABLE_HEADER).format(clock="wall" if args.wall else "CPU"), flush=True)
    for shape in shapes:
        print("\n".join(measure(*shape, clock=clock)), flush=True)
    name, m, n, rank = shapes[0]
    print(f"\nChained refreshes, {name} {m}×{n}, r={rank}:\n")
    print("\n".join(chained(m, n, rank)))
    load_after = os.getloadavg()[0]
    print(f"\nwall {time.perf_counter() - t0:.0f} s; 1-min load average before {load_before:.2f}, after {load_after:.2f}")


# -- pytest-benchmark (small shapes, so it stays quick) ----------------------------------

try:
    import pytest
except ImportError:  # pragma: no cover - the script does not need pytest
    pytest = None

if pytest is not None:

    @pytest.mark.parametrize("method", ["full", "randomized", "subspace"])
    @pytest.mark.parametrize("shape", [(1376, 512, 128), (512, 1376, 128)], ids=["1376x512", "512x1376"])
    def test_compute_projection_speed(benchmark, method, shape):
        m, n, rank = shape
        gen = torch.Generator().manual_seed(0)
        side = projection_side(m, n)
        G_prev = synthetic_gradient(m, n, decay=DECAY, generator=gen)
        G = drifted(G_prev, DRIFTS["slow"], gen)
        prev = compute_projection(G_prev, rank, side, "full") if method == "subspace" else None
        sketch = torch.Generator()
        P = benchmark(lambda: compute_projection(G, rank, side, method, prev=prev, generator=sketch.manual_seed(1)))
        P_exact = compute_projection(G, rank, side, "full")
        assert captured_energy(G, P, side) >= 0.97 * captured_energy(G, P_exact, side)


if __name__ == "__main__":
    main()
