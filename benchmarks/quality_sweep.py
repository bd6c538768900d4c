"""Quality at each method's best learning rate: an lr sweep at one seed, then that lr at more seeds.

Run (the table of BENCHMARKS.md's "Model comparison")::

    .venv/bin/python benchmarks/quality_sweep.py --preset tiny --steps 600 --batch-size 4 --threads 1 \\
        --seeds 0,1,2 --lrs adamw=5e-4,1e-3,2e-3 --lrs adamw8bit=5e-4,1e-3,2e-3 \\
        --lrs qgalore=5e-3,1e-2,2e-2 --lrs galore-torch=5e-3,1e-2,2e-2

Each run is one ``compare.py`` worker (its own subprocess, ``qgalore_fx.app.train.train``, the same
model, data and schedule as ``compare.py``), so a method here is exactly what it is there.

Stage 1: every lr of a method's grid at the first seed. The chosen lr is the one with the lowest final
validation perplexity (a run that diverges counts as infinite). If it is the smallest or the largest
value of the grid, the grid is extended one geometric step past that edge (the ratio of the two values
at that edge) and the new value is run, up to ``--max-extend`` times per method; a choice that is still
at an edge after that is marked in the table. Stage 2: the chosen lr at every other seed, seed by
seed across the methods (so an interrupted invocation leaves every method with as many seeds as
possible).

For the projected methods (``qgalore``, ``galore``, ``galore-torch``) the swept lr is the projected
group's; the parameters that are not projected (embeddings, norms, head) keep ``train.py``'s
``rest_lr`` default, AdamW's default peak (1e-3), in every run.

Output: a markdown table on stdout (method, the grid with each value's perplexity at the first seed, the
chosen lr, the perplexity mean ± sample sd over the seeds and each seed's value, weights + states +
projections, median step time) and ``benchmarks/results/quality-<preset>-s<steps>-b<batch>.json``,
rewritten after every run. ``--resume`` reads that file and skips the runs it already holds with the
same settings, so an interrupted sweep continues where it stopped.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import pathlib
import statistics
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
MiB = 2**20


# =========================================================================== choosing the lr
def best_lr(ppl_by_lr: dict[float, float]) -> tuple[float, str | None]:
    """The lr with the lowest perplexity, and which edge of the grid it sits on.

    Returns ``(lr, edge)`` with ``edge`` ``"low"`` (the smallest lr tried), ``"high"`` (the largest)
    or ``None`` (inside the grid). A non-finite perplexity (a diverged run) loses to every finite one.
    A grid of fewer than three values has no inside: its best is always at an edge.
    """
    if not ppl_by_lr:
        raise ValueError("best_lr: no runs to choose from")
    grid = sorted(ppl_by_lr)

    def key(lr):
        ppl = ppl_by_lr[lr]
        return (0, ppl) if math.isfinite(ppl) else (1, 0.0)

    lr = min(grid, key=key)
    edge = "low" if lr == grid[0] else "high" if lr == grid[-1] else None
    return lr, edge


def extend_grid(grid: list[float], edge: str) -> float:
    """The next lr past ``edge`` of ``grid``: one geometric step, the ratio of the two values at that edge."""
    g = sorted(grid)
    if len(g) < 2:
        raise ValueError("extend_grid: needs at least two values to know the step")
    if edge == "low":
        return g[0] * g[0] / g[1]
    if edge == "high":
        return g[-1] * g[-1] / g[-2]
    raise ValueError(f"extend_grid: edge must be 'low' or 'high'; got {edge!r}")


def mean_sd(values: list[float]) -> tuple[float, float | None]:
    """Mean and sample standard deviation (n - 1); the sd is None for a single value."""
    if not values:
        raise ValueError("mean_sd: no values")
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else None)


def parse_lrs(items: list[str]) -> dict[str, list[float]]:
    """``["adamw=5e-4,1e-3", "qgalore=1e-2,2e-2"]`` -> ``{"adamw": [5e-4, 1e-3], "qgalore": [0.01, 0.02]}``."""
    grids: dict[str, list[float]] = {}
    for item in items:
        name, sep, values = item.partition("=")
        if not sep or not values:
            raise ValueError(f"--lrs: expected METHOD=LR,LR,...; got {item!r}")
        lrs = [float(v) for v in values.split(",") if v.strip()]
        if any(not (math.isfinite(v) and v > 0) for v in lrs) or len(set(lrs)) != len(lrs):
            raise ValueError(f"--lrs {name.strip()}: learning rates must be distinct positive numbers; got {values!r}")
        grids[name.strip()] = sorted(lrs)
    return grids


# =========================================================================== runs
def _run_key(method: str, lr: float, seed: int) -> str:
    return f"{method}|{lr:.6g}|{seed}"


def _summary(r: dict, method: str, lr: float, seed: int) -> dict:
    """What the table and the JSON keep of a compare.py worker's result (no per-step records)."""
    h = r["history"]
    evals = [x for x in h if "val_loss" in x]
    return {
        "method": method, "lr": lr, "seed": seed, "rest_lr": r.get("rest_lr"),
        "val_ppl": r["val_ppl"], "val_loss": r["val_loss"], "val_tokens": r["val_tokens"],
        "final_train_loss": r["final_train_loss"], "n_params": r["n_params"],
        "persistent_bytes": r["memory"]["persistent_bytes"],
        "median_step_s": r["time"]["median_step_s"], "median_step_cpu_s": r["time"]["median_step_cpu_s"],
        "subprocess_wall_s": r["time"]["subprocess_wall_s"],
        "refresh_count": (r["refresh"] or {}).get("refresh_count"),
        "eval_curve": {"step": [x["step"] for x in evals], "val_loss": [x["val_loss"] for x in evals]},
        "loss_every_10": [x["loss"] for x in h if x["step"] % 10 == 0],
    }


def _choice_mark(edge: str | None, transfer: str | None) -> str:
    """How the table and the log qualify a chosen lr: carried over from another sweep, or still at a grid edge."""
    if transfer:
        return " (transferred)"
    return f" ({edge} edge)" if edge else ""


def markdown_table(doc: dict) -> str:
    seeds = doc["settings"]["seeds"]
    lines = [
        f"| method | lr tried: val ppl (seed {seeds[0]}) | chosen lr | val ppl mean ± sd | per seed "
        f"({', '.join(map(str, seeds))}) | weights+states+proj MiB | median step s |",
        "|---|---|---:|---:|---|---:|---:|",
    ]
    runs = doc["runs"]
    for method in doc["settings"]["methods"]:
        first = {r["lr"]: r["val_ppl"] for r in runs.values() if r["method"] == method and r["seed"] == seeds[0]}
        if not first:
            continue
        lr, edge = best_lr(first)
        tried = ", ".join(f"{x:g}: {first[x]:.1f}" for x in sorted(first))
        chosen = [runs[_run_key(method, lr, s)] for s in seeds if _run_key(method, lr, s) in runs]
        mean, sd = mean_sd([r["val_ppl"] for r in chosen])
        per_seed = ", ".join(f"{r['val_ppl']:.1f}" for r in chosen)
        rest = chosen[0]["rest_lr"]
        cells = [
            method, tried, f"{lr:g}" + _choice_mark(edge, doc["settings"].get("transfer")) + (f" / rest {rest:g}" if rest else ""),
            f"{mean:.1f} ± {sd:.1f} (n={len(chosen)})" if sd is not None else f"{mean:.1f} (n=1)",
            per_seed, f"{chosen[0]['persistent_bytes'] / MiB:.1f}",
            f"{statistics.median(r['median_step_s'] for r in chosen):.2f}",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--lrs", action="append", required=True, metavar="METHOD=LR,LR,...",
                   help="a method of compare.py and its lr grid (the projected group's for projected methods); "
                        "repeat per method; at least three values each")
    p.add_argument("--seeds", default="0,1,2", help="comma list; the first one sweeps the lr (default: 0,1,2)")
    p.add_argument("--max-extend", type=int, default=2,
                   help="grid extensions per method when the best lr is at an edge (default: 2)")
    p.add_argument("--preset", default="tiny")
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=None)
    p.add_argument("--threads", type=int, default=None, help="as compare.py --threads (use 1 on a shared CPU)")
    p.add_argument("--rank", type=int, default=None)
    p.add_argument("--vocab-size", type=int, default=8192)
    p.add_argument("--update-interval", type=int, default=None, help="default: steps // 10, as compare.py")
    p.add_argument("--eval-every", type=int, default=None, help="default: steps // 6, as compare.py")
    p.add_argument("--eval-batches", type=int, default=8)
    p.add_argument("--out", default=None, help="results JSON (default: benchmarks/results/quality-<preset>-s<steps>-b<batch>.json)")
    p.add_argument("--resume", action="store_true", help="skip the runs the results JSON already holds")
    p.add_argument("--transfer", default=None, metavar="WHERE",
                   help="no sweep at this size: one lr per method, chosen by the sweep named here (e.g. a results "
                        "JSON of a smaller preset); the table marks each lr as transferred")
    args = p.parse_args(argv)
    args.grids = parse_lrs(args.lrs)
    args.seed_list = [int(s) for s in args.seeds.split(",") if s.strip()]
    if not args.seed_list:
        p.error("--seeds: give at least one seed")
    if args.transfer:
        several = [m for m, g in args.grids.items() if len(g) != 1]
        if several:
            p.error(f"--lrs with --transfer: give exactly one learning rate for {', '.join(several)}")
        args.max_extend = 0
    short = [m for m, g in args.grids.items() if len(g) < 3]
    if short and not args.transfer:
        p.error(f"--lrs: give at least three learning rates for {', '.join(short)}")
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
    import compare

    return compare.schedule_defaults(args)


def main(argv=None) -> int:
    args = parse_args(argv)
    import compare

    unknown = [m for m in args.grids if m not in compare.METHODS]
    if unknown:
        raise SystemExit(f"--lrs: unknown method {', '.join(unknown)}; choose from {', '.join(compare.METHODS)}")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import qgalore_fx.app.data as data_lib
    from qgalore_fx.app import presets

    preset = presets.get_preset(args.preset)
    args.rank = args.rank or preset.rank
    corpus = data_lib.prepare_corpus(None, args.vocab_size)  # builds the cache the workers load
    settings = {"preset": preset.name, "steps": args.steps, "batch_size": args.batch_size,
                "seq_len": args.seq_len or preset.seq_len, "seeds": args.seed_list, "rank": args.rank,
                "update_interval": args.update_interval, "vocab_size": corpus.vocab_size,
                "threads": args.threads, "eval_every": args.eval_every, "eval_batches": args.eval_batches,
                "methods": list(args.grids), "grids": args.grids, "max_extend": args.max_extend,
                "rest_lr": "train.py's default for projected methods (DEFAULT_LR['adamw']), not swept"}
    if args.transfer:
        settings["transfer"] = args.transfer
    out = pathlib.Path(args.out or RESULTS / f"quality-{preset.name}-s{args.steps}-b{args.batch_size}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    runs: dict[str, dict] = {}
    command = " ".join([pathlib.Path(sys.executable).name, "benchmarks/quality_sweep.py"] + sys.argv[1:])
    started = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    invocations = [{"command": command, "started": started}]
    if args.resume and out.exists():
        old = json.loads(out.read_text())
        same = {k: v for k, v in old["settings"].items() if k not in ("methods", "grids", "seeds", "max_extend")}
        mine = {k: v for k, v in settings.items() if k not in ("methods", "grids", "seeds", "max_extend")}
        if same != mine:
            raise SystemExit(f"--resume: {out} was run with other settings: {same} vs {mine}")
        runs = old["runs"]
        invocations = old.get("invocations", [{"command": old["command"], "started": old["started"]}]) + invocations
    doc = {"command": command, "started": invocations[0]["started"], "invocations": invocations,
           "machine": compare.machine_info(), "settings": settings, "runs": runs}

    def save():
        doc["updated"] = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
        doc["table_markdown"] = markdown_table(doc)
        out.write_text(json.dumps(compare._rounded(doc), indent=1, default=str) + "\n")

    def run(tmp: pathlib.Path, method: str, lr: float, seed: int) -> dict:
        key = _run_key(method, lr, seed)
        if key in runs:
            return runs[key]
        args.seed = seed
        spec = compare.method_specs(args, [method])[0]
        spec["config"]["lr"] = lr
        spec["rank"] = args.rank
        spec["name"] = method
        workdir = tmp / f"{method}-lr{lr:g}-s{seed}"
        workdir.mkdir()
        print(f"[{time.strftime('%H:%M:%S')}] {method} lr {lr:g} seed {seed} ...", flush=True)
        r = compare.run_one(spec, workdir, workdir)
        runs[key] = _summary(r, method, lr, seed)
        print(f"[{time.strftime('%H:%M:%S')}] {method} lr {lr:g} seed {seed}: val ppl {r['val_ppl']:.2f}, "
              f"median step {r['time']['median_step_s']:.2f} s, subprocess {r['time']['subprocess_wall_s']:.0f} s",
              flush=True)
        save()
        return runs[key]

    print(f"quality sweep: preset {preset.name}, {args.steps} steps, batch {args.batch_size} x seq "
          f"{settings['seq_len']}, seeds {args.seed_list}, grids {args.grids}, threads {args.threads}", flush=True)
    first, rest_seeds = args.seed_list[0], args.seed_list[1:]
    chosen: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="qgalore-quality-") as tmp_name:
        tmp = pathlib.Path(tmp_name)
        for method, grid in args.grids.items():  # stage 1: the lr at the first seed
            grid = list(grid)
            for lr in grid:
                run(tmp, method, lr, first)
            for extensions in range(args.max_extend + 1):
                lr, edge = best_lr({x: runs[_run_key(method, x, first)]["val_ppl"] for x in grid})
                if edge is None or extensions == args.max_extend:
                    break
                new = extend_grid(grid, edge)
                grid = sorted(grid + [new])
                run(tmp, method, new, first)
            chosen[method] = lr
            print(f"{method}: chosen lr {lr:g}" + _choice_mark(edge, args.transfer), flush=True)
        for seed in rest_seeds:  # stage 2: the chosen lr at the other seeds
            for method, lr in chosen.items():
                run(tmp, method, lr, seed)
    save()
    print()
    print(doc["table_markdown"])
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
