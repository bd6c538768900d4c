"""Lazy refresh on a real run: how many subspace refreshes, how long they take, at what perplexity.

Run one configuration at a time (each is a ``qgalore-fx pretrain`` run)::

    .venv/bin/python benchmarks/bench_refresh.py --steps 300 --update-interval 10 --threads 1 --seed 0
    .venv/bin/python benchmarks/bench_refresh.py --steps 300 --update-interval 10 --threads 1 --seed 0 --no-adaptive
    .venv/bin/python benchmarks/bench_refresh.py --steps 300 --update-interval 10 --threads 1 --seed 0 --rule official
    .venv/bin/python benchmarks/bench_refresh.py ... --record   # also log similarity measures at every refresh
    .venv/bin/python benchmarks/bench_refresh.py --summarize benchmarks/results/refresh-<name>-measures.json

Each run is :func:`qgalore_fx.app.train.train` — the loop behind ``qgalore-fx pretrain`` — with the
``tiny`` preset and that command's defaults (``--eval-every 0``: one evaluation, over the whole validation
split, at the end). ``train()`` does not return its optimizer, so ``train.build_optimizer`` is wrapped to
keep it; afterwards ``optimizer.layer_stats()`` gives each projected layer's ``refresh_count`` (the first
projection counts) and ``refresh_seconds``. Output: one JSON object on stdout and in
``benchmarks/results/refresh-<name>.json`` (refreshes, refresh seconds, val ppl, the final interval of every
layer, wall time).

``--rule official`` replaces the library's lazy-refresh decision, for this run only, by the official
Q-GaLore code's (VITA-Group/Q-GaLore ``GaLoreProjector``, see docs/projection-and-refresh.md):
the *signed* cosine of the top singular vector of the new and the previous SVD (taken before qgalore_fx
aligns the basis), a window of the last ``queue_size`` values, and a doubling at every refresh at which the
window is full and its mean is at least ``--cos-threshold`` (default 0.4 there); the window is never
cleared. The refresh clock stays qgalore_fx's (a fixed distance after the last refresh).

``--record`` logs, at every refresh after a layer's first, the candidate similarity measures between the
previous and the new projection (``MEASURES`` below) to ``benchmarks/results/refresh-<name>-measures.json``;
the calibration in BENCHMARKS.md ("Calibrating the lazy refresh") is computed from such a record of a
fixed-interval run.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import platform
import shutil
import statistics
import sys
import time
from unittest import mock

import torch

import qgalore_fx.app.train as train_lib
from qgalore_fx import lowrank
from qgalore_fx import projection as proj
from qgalore_fx.config import OPTIM_BITS

ROOT = pathlib.Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"

MEASURES = {
    "energy_ratio": "||G P_old^T||^2 / ||G P_new^T||^2: how much of the current gradient the old projection "
                    "still captures, relative to the new one",
    "weighted": "energy-weighted mean squared cosine of the principal angles (weighted_similarity)",
    "weighted_chance": "the same, chance-adjusted: (s - r/d) / (1 - r/d)",
    "cos2": "mean squared cosine of the principal angles (subspace_similarity)",
    "cos2_chance": "the same, chance-adjusted: (s - r/d) / (1 - r/d)",
    "top1_signed": "official: signed cosine of the top singular vectors of consecutive SVDs",
    "top1_abs": "|top1_signed|",
}


class _OfficialPolicy(proj.LazyRefreshPolicy):
    """The official code's decision: window mean >= threshold doubles the interval; the window is never cleared."""

    def record_refresh(self, step, similarity):
        step = int(step)
        self.last_refresh_step = step
        self.refresh_count += 1
        self.last_similarity = None if similarity is None else abs(similarity)  # stored in [0, 1] by control
        if similarity is None:
            return False
        self.queue.append(similarity)
        del self.queue[:-self.queue_size]
        if len(self.queue) == self.queue_size and statistics.fmean(self.queue) >= self.cos_threshold:
            self.interval *= 2
            return True
        return False


def energy_ratio(G: torch.Tensor, P_old: torch.Tensor, P_new: torch.Tensor, side: str) -> float:
    """||project(G, Q_old)||² / ||project(G, Q_new)||² over orthonormalized bases, clamped to [0, 1]."""
    energies = []
    for P in (P_old, P_new):
        B = P.double().T if side == "right" else P.double()
        Q = torch.linalg.qr(B, mode="reduced").Q
        energies.append(float((G.double() @ Q if side == "right" else Q.T @ G.double()).square().sum()))
    return 1.0 if energies[1] <= 0 else min(max(energies[0] / energies[1], 0.0), 1.0)


def _top_vector(G: torch.Tensor, side: str) -> torch.Tensor:
    U, _, Vh = torch.linalg.svd(G.double(), full_matrices=False)
    return Vh[0] if side == "right" else U[:, 0]


def _instrument(rule: str, record: list | None) -> list:
    """Patches that swap the refresh decision (``rule="official"``) and/or log measures (``record``) for a run."""
    original_refresh = lowrank._refresh
    original_policy = lowrank._policy
    top_prev: dict[str, torch.Tensor] = {}
    history: dict[str, list] = {}  # each layer's last 5 projections (record: measures at lags 2 and 4)
    current: dict[str, float | None] = {}

    def refresh(state, G, c, spec, group):
        prev = None
        if c["refresh_count"]:
            prev = lowrank.projection_matrix(state["proj_codes"], state["proj_scales"], spec).clone()
        if rule == "official" or record is not None:
            top, old = _top_vector(G, spec.side), top_prev.get(spec.name)
            current["signed"] = None if old is None else float(top @ old)  # unit vectors
            top_prev[spec.name] = top
        original_refresh(state, G, c, spec, group)
        new = lowrank.projection_matrix(state["proj_codes"], state["proj_scales"], spec).clone()
        older = history.setdefault(spec.name, [])
        older.append(new)
        del older[:-5]
        if record is not None and prev is not None:
            lags = {f"energy_ratio@{k}": energy_ratio(G, older[-1 - k], new, spec.side)
                    for k in (2, 4) if len(older) > k}
            lags.update({f"cos2_chance@{k}": proj.subspace_similarity(new, older[-1 - k], spec.side,
                                                                      chance_adjusted=True)
                         for k in (2, 4) if len(older) > k})
            lags.update({f"weighted_chance@{k}": proj.weighted_similarity(G, new, older[-1 - k], spec.side,
                                                                          chance_adjusted=True)
                         for k in (2, 4) if len(older) > k})
            record.append(lags)
            record[-1].update({
                "layer": spec.name, "attempt": int(c["calls"]),
                "energy_ratio": energy_ratio(G, prev, new, spec.side),
                "weighted": proj.weighted_similarity(G, new, prev, spec.side),
                "weighted_chance": proj.weighted_similarity(G, new, prev, spec.side, chance_adjusted=True),
                "cos2": proj.subspace_similarity(new, prev, spec.side),
                "cos2_chance": proj.subspace_similarity(new, prev, spec.side, chance_adjusted=True),
                "top1_signed": current["signed"],
                "top1_abs": abs(current["signed"]),
                "interval": int(state["control"][lowrank.INTERVAL]),
            })

    def official_similarity(G, P_new, P_old, spec):
        return current["signed"]

    def official_policy(spec, c):
        p = original_policy(spec, c)
        official = _OfficialPolicy(update_interval=spec.update_interval, cos_threshold=spec.cos_threshold,
                                   queue_size=spec.queue_size, adaptive=spec.adaptive)
        for k in ("interval", "last_refresh_step", "refresh_count", "last_similarity", "queue"):
            setattr(official, k, getattr(p, k))
        return official

    patches = [mock.patch.object(lowrank, "_refresh", refresh)] if rule == "official" or record is not None else []
    if rule == "official":
        patches += [mock.patch.object(lowrank, "_refresh_similarity", official_similarity),
                    mock.patch.object(lowrank, "_policy", official_policy)]
    return patches


def summarize(path: pathlib.Path) -> str:
    """Markdown table of each recorded measure's percentiles, and how often it reaches 0.4 and 0.7."""
    records = json.loads(path.read_text())["records"]
    keys = [k for k in ("weighted_chance", "weighted_chance@2", "weighted_chance@4", "weighted", "cos2_chance",
                        "cos2_chance@2", "cos2_chance@4", "cos2", "energy_ratio", "top1_signed", "top1_abs")
            if any(k in r for r in records)]
    rows = ["| measure | n | p5 | p25 | p50 | p75 | p95 | share >= 0.4 | share >= 0.7 |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for k in keys:
        v = sorted(r[k] for r in records if k in r)
        pct = [v[round(p * (len(v) - 1))] for p in (0.05, 0.25, 0.5, 0.75, 0.95)]
        share = [sum(x >= t for x in v) / len(v) for t in (0.4, 0.7)]
        rows.append(f"| `{k}` | {len(v)} | " + " | ".join(f"{x:.2f}" for x in pct)
                    + f" | {share[0]:.0%} | {share[1]:.0%} |")
    by_type: dict[str, list] = {}
    for r in records:
        by_type.setdefault(r["layer"].rsplit(".", 1)[-1], []).append(r)
    rows += ["", "| layer type | weighted_chance p50 before step 60 | p50 from step 60 | share >= 0.4 |",
             "|---|---:|---:|---:|"]
    for t, rs in sorted(by_type.items()):
        early = sorted(r["weighted_chance"] for r in rs if r["attempt"] < 60)
        late = sorted(r["weighted_chance"] for r in rs if r["attempt"] >= 60)
        share = sum(r["weighted_chance"] >= 0.4 for r in rs) / len(rs)
        rows.append(f"| {t} | {statistics.median(early):.2f} | {statistics.median(late):.2f} | {share:.0%} |")
    return "\n".join(rows)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--update-interval", type=int, default=10)
    parser.add_argument("--cos-threshold", type=float, default=None)
    parser.add_argument("--queue-size", type=int, default=None)
    parser.add_argument("--no-adaptive", action="store_true")
    parser.add_argument("--rule", choices=("library", "official"), default="library")
    parser.add_argument("--record", action="store_true")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--rest-optim-bits", type=int, choices=OPTIM_BITS, default=None,
                        help="moments of the AdamW group (embeddings, norms, head); default: the transform's")
    parser.add_argument("--name", default=None)
    parser.add_argument("--summarize", type=pathlib.Path, default=None,
                        help="print the percentile table of a --record file and exit")
    args = parser.parse_args(argv)
    if args.summarize is not None:
        print(summarize(args.summarize))
        return 0

    options = dict(update_interval=args.update_interval, adaptive=not args.no_adaptive)
    if args.cos_threshold is not None:
        options["cos_threshold"] = args.cos_threshold
    elif args.rule == "official":
        options["cos_threshold"] = 0.4
    if args.queue_size is not None:
        options["queue_size"] = args.queue_size
    name = args.name or "-".join([args.preset, f"s{args.steps}", f"i{args.update_interval}",
                                  "fixed" if args.no_adaptive else args.rule, f"seed{args.seed}"])
    run_dir = ROOT / "runs" / f"bench-refresh-{name}"
    shutil.rmtree(run_dir, ignore_errors=True)
    cfg = train_lib.TrainConfig(preset=args.preset, steps=args.steps, eval_every=0, threads=args.threads,
                                seed=args.seed, run_dir=str(run_dir), **options)
    kept = {}
    build = train_lib.build_optimizer

    def build_and_keep(model, config, shard=None):
        if args.rest_optim_bits is None:
            model, optimizer = build(model, config, shard=shard)
        else:
            import functools

            import qgalore_fx

            with mock.patch.object(qgalore_fx, "optimizer",
                                   functools.partial(qgalore_fx.optimizer, optim_bits=args.rest_optim_bits)):
                model, optimizer = build(model, config, shard=shard)
        kept["optimizer"] = optimizer
        return model, optimizer

    record = [] if args.record else None
    t0 = time.perf_counter()
    with mock.patch.object(train_lib, "build_optimizer", build_and_keep):
        patches = _instrument(args.rule, record)
        for p in patches:
            p.start()
        try:
            result = train_lib.train(cfg, verbose=False)
        finally:
            for p in reversed(patches):
                p.stop()
    stats = kept["optimizer"].layer_stats()
    out = {
        "name": name,
        "command": " ".join(["benchmarks/bench_refresh.py", *(argv if argv is not None else sys.argv[1:])]),
        "preset": args.preset, "steps": args.steps, "seed": args.seed, "rule": args.rule,
        "transform": {k: v for k, v in (cfg.resolved().transform_kwargs() or {}).items()
                      if k in ("update_interval", "adaptive", "cos_threshold", "queue_size", "rank")},
        "rest_optim_bits": kept["optimizer"].optim_bits,
        "refreshes": sum(s["refresh_count"] for s in stats.values()),
        "refresh_seconds": sum(s["refresh_seconds"] for s in stats.values()),
        "layers": len(stats),
        "val_ppl": result.val_ppl,
        "val_loss": result.val_loss,
        "train_seconds": result.train_seconds,
        "wall_seconds": time.perf_counter() - t0,
        "final_intervals": sorted(s["interval"] for s in stats.values()),
        "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
        "torch": torch.__version__,
        "date": time.strftime("%Y-%m-%d"),
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"refresh-{name}.json").write_text(json.dumps(out, indent=1) + "\n")
    if record is not None:
        rounded = [{k: round(v, 5) if isinstance(v, float) else v for k, v in r.items()} for r in record]
        (RESULTS / f"refresh-{name}-measures.json").write_text(json.dumps(
            {"command": out["command"], "measures": MEASURES, "records": rounded}, separators=(",", ":")) + "\n")
    print(json.dumps({k: v for k, v in out.items() if k != "final_intervals"}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
