"""Steady-state step time of two revisions of qgalore_fx, measured in the same run.

    python benchmarks/bench_commits.py BEFORE [AFTER] [--repeats 3] [--threads 1] [--timer time.process_time]

Each revision is checked out into a temporary ``git worktree`` and its own
``benchmarks/bench_step.py`` (one training step: forward, backward, ``step``,
``zero_grad``, 20 timed rounds after 3 warm-up rounds, the tests' tiny LLaMA)
runs with that worktree first on ``PYTHONPATH``, so each revision times its
own code with its own benchmark. The revisions alternate (BEFORE, AFTER,
BEFORE, ...) ``--repeats`` times so that drifting machine load hits both
alike; the table gives, per method, the median over the repeats of each
session's median, and AFTER / BEFORE. ``AFTER`` defaults to the working
tree's ``HEAD``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _worktree(rev: str, parent: Path) -> Path:
    path = parent / rev.replace("/", "_")
    subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(path), rev], check=True,
                   capture_output=True)
    return path


# An editable install of qgalore_fx adds an import hook; drop it in the child so that each worktree imports its own
# code (checked below; the child also runs inside the worktree, which ``python -c`` puts first on sys.path).
_UNHOOK = ("import sys; sys.meta_path[:] = [f for f in sys.meta_path "
           "if not getattr(f, '__module__', '').startswith('__editable__')]; ")


def _session(tree: Path, threads: int, out: Path, timer: str) -> dict:
    env = {**os.environ, "PYTHONPATH": str(tree), "OMP_NUM_THREADS": str(threads), "TRITON_INTERPRET": "1"}
    args = ["-q", "-p", "no:cacheprovider", "-p", "no:logging", str(tree / "benchmarks" / "bench_step.py"),
            "--benchmark-enable", f"--benchmark-json={out}", "-o", "addopts=", f"--benchmark-timer={timer}"]
    cmd = [sys.executable, "-c", _UNHOOK + f"import pytest; sys.exit(pytest.main({args!r}))"]
    probe = subprocess.run([sys.executable, "-c", _UNHOOK + "import qgalore_fx; print(qgalore_fx.__file__)"],
                           env=env, cwd=tree, capture_output=True, text=True, check=True).stdout.strip()
    if not probe.startswith(str(tree)):
        raise RuntimeError(f"{tree}: imported qgalore_fx from {probe}, not from the worktree")
    subprocess.run(cmd, env=env, cwd=tree, check=True, capture_output=True)
    data = json.loads(out.read_text())
    return {b["extra_info"]["method"]: b["stats"]["median"] for b in data["benchmarks"]}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("before")
    ap.add_argument("after", nargs="?", default="HEAD")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--timer", default="time.perf_counter",
                    help="pytest-benchmark timer: time.perf_counter (wall) or time.process_time (CPU time of the "
                         "process, far less sensitive to other jobs on a shared machine)")
    args = ap.parse_args(argv)
    revs = {}
    for rev in (args.before, args.after):
        revs[rev] = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", rev], check=True,
                                   capture_output=True, text=True).stdout.strip()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        trees = {rev: _worktree(rev, tmp) for rev in (args.before, args.after)}
        try:
            medians = {rev: {} for rev in trees}
            for i in range(args.repeats):
                for rev, tree in trees.items():
                    for method, median in _session(tree, args.threads, tmp / f"{revs[rev]}-{i}.json", args.timer).items():
                        medians[rev].setdefault(method, []).append(median)
        finally:
            for tree in trees.values():
                subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(tree)],
                               capture_output=True)
    before, after = (medians[r] for r in (args.before, args.after))
    print(f"step time ({args.timer}), median of {args.repeats} alternating sessions (each the median of 20 steps), "
          f"{args.threads} thread(s)")
    print(f"| method | {revs[args.before]} ms | {revs[args.after]} ms | after / before |")
    print("|---|---:|---:|---:|")
    for method in before:
        if method not in after:
            continue
        b, a = statistics.median(before[method]), statistics.median(after[method])
        print(f"| {method} | {b * 1e3:.2f} | {a * 1e3:.2f} | {a / b:.3f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
