"""The lazy refresh against the fixed schedule on synthetic gradients with a known subspace.

Command::

    .venv/bin/python benchmarks/bench_lazy_refresh.py [--steps 1000] [--threads 1]

One projected 256x128 linear layer (``qgalore_fx.transform(..., rank=8, update_interval=10)``, driven by
``qgalore_fx.optimizer``) fed G_t = U·S·V_tᵀ + noise from ``tests/subspace_streams.py`` — the streams that
tests/test_lazy_refresh.py asserts on: ``steady`` (V_t fixed), ``rotate`` (V_t turns by 1.5 rad toward an
orthogonal subspace over the run) and ``jump`` (V_t jumps to an orthogonal subspace at step 400 and back at
step 700). Each stream runs with the adaptive schedule (the library's defaults) and the fixed one
(``adaptive=False``). Per run: refreshes (the first projection counts), their share of the fixed run's, the
final interval, the steps after each jump until the projection captures more than 80 % of the gradient's
energy again (``projection.captured_energy``), and the mean captured energy from step 50 on. Deterministic
(fixed seeds); no timing. Prints a markdown table.
"""

from __future__ import annotations

import argparse
import pathlib
import sys

import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "tests"))
from subspace_streams import BASE, JUMPS, STREAMS, run_stream, steps_to_catch  # noqa: E402

SCHEDULES = {"adaptive": {}, "fixed": {"adaptive": False}}
WARMUP = 50  # steps left out of the mean captured energy (the first projection and the rotation's start)


def measure(stream: str, steps: int, options: dict) -> dict:
    captured, layer = run_stream(stream, steps, **options)
    stats = layer.stats()
    catch = [steps_to_catch(captured, jump) for jump in JUMPS if jump < steps] if stream == "jump" else []
    tail = captured[WARMUP:]
    return {"refreshes": int(stats["refresh_count"]), "interval": int(stats["interval"]), "catch": catch,
            "mean": sum(tail) / len(tail), "min": min(tail)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=1000, help="steps per stream (default: 1000)")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default: 1)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    print(f"one 256x128 layer, rank 8, update_interval {BASE}, {args.steps} steps; "
          f"captured energy = share of ||G_t||^2 kept by the projection after step t\n")
    print("| stream | schedule | refreshes | × fixed | final interval | steps to > 80 % after the jumps "
          f"({', '.join(map(str, JUMPS))}) | mean captured from step {WARMUP} | min captured from step {WARMUP} |")
    print("|---|---|---:|---:|---:|---|---:|---:|")
    for stream in STREAMS:
        rows = {name: measure(stream, args.steps, options) for name, options in SCHEDULES.items()}
        for name, r in rows.items():
            catch = ", ".join("never" if c is None else str(c) for c in r["catch"]) or "-"
            ratio = r["refreshes"] / rows["fixed"]["refreshes"]
            print(f"| {stream} | {name} | {r['refreshes']} | {ratio:.2f} | {r['interval']} | {catch} "
                  f"| {r['mean']:.3f} | {r['min']:.3f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
