"""Steady-state training-step time: Q-GaLore against AdamW, AdamW8bit and GaLore, eager and compiled.

Run (all cases; each preset/threads pair is one block measured in the same process, AdamW first)::

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_speed.py --presets tiny 60m --threads 1 2 \
        --modes eager compiled --json benchmarks/results/speed.json

A subset: ``--presets 60m --threads 1 --modes eager --methods adamw qgalore``. ``--profile`` adds a
per-component table (torch.profiler) of the Q-GaLore step.

Methods (one optimizer step = forward + backward + ``step`` + ``zero_grad``):

- ``adamw``: ``torch.optim.AdamW`` on every parameter, fp32 (torch's default implementation);
- ``adamw8bit``: ``bitsandbytes.optim.AdamW8bit`` on every parameter;
- ``galore``: ``galore_torch.GaLoreAdamW`` with the transformer blocks' linear weights projected at the same
  rank, scale 0.25, refresh gap 200 (the others plain AdamW inside it);
- ``qgalore``: ``qgalore_fx.transform(model, rank=...)`` + ``qgalore_fx.optimizer`` with every default.

Models are LLaMA presets (:mod:`qgalore_fx.app.presets`) built from a config: ``tiny`` (hidden 256, 4 layers,
vocabulary 8192 here) and ``60m`` (hidden 512, intermediate 1376, 8 layers, vocabulary 32000), batch 4 x the
preset's sequence length (256 for 60m, 128 for tiny), at the preset's rank. Warm-up steps include every
projection's first refresh and the compilation; the timed steps are all between refreshes. ``compiled`` wraps
the model in ``torch.compile(fullgraph=True)`` (inductor); the optimizer step stays eager for every method
(qgalore_fx's projected layers update inside the compiled backward).

Within a block (preset, threads) the timed steps of every case (method x mode) are interleaved round by round,
so that every case sees the same load on a shared machine. Printed: the median step time per case, its ratio
to ``adamw`` in the same mode of the same block, a compiled case's ratio to its eager one, and the spread.
``--compiled-methods adamw qgalore`` limits the compiled cases (each compiled model holds its own copy).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import time
from datetime import datetime, timezone

import torch
import torch.nn.functional as F

from qgalore_fx.app.presets import build_model, get_preset

METHODS = ("adamw", "adamw8bit", "galore", "qgalore")
# qgalore with QGALORE_FX_REFERENCE=1 set around each of its steps: the pure-torch references instead of the fast
# paths (qgalore_fx.kernels.fastpath), interleaved with the other cases. Opt-in: --methods ... qgalore_reference
EXTRA_METHODS = ("qgalore_reference",)
VOCAB = {"tiny": 8192}  # presets that take the tokenizer's vocabulary
BATCH = 4
LR = 1e-3


def make_model(preset: str):
    torch.manual_seed(0)
    return build_model(preset, vocab_size=VOCAB.get(preset)).train()


def make_batch(model, seq_len: int):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, (BATCH, seq_len + 1), generator=g)
    return ids[:, :-1], ids[:, 1:]


def _block_linear_weights(model):
    return [m.weight for name, m in model.named_modules()
            if isinstance(m, torch.nn.Linear) and ".layers." in f".{name}"]


def make_optimizer(method: str, model, rank: int):
    """``(model, optimizer)`` for ``method``; the model is transformed for ``qgalore``."""
    if method == "adamw":
        return model, torch.optim.AdamW(model.parameters(), lr=LR)
    if method == "adamw8bit":
        import bitsandbytes as bnb

        return model, bnb.optim.AdamW8bit(model.parameters(), lr=LR)
    if method == "galore":
        from galore_torch import GaLoreAdamW

        projected = _block_linear_weights(model)
        ids = {id(p) for p in projected}
        rest = [p for p in model.parameters() if id(p) not in ids]
        groups = [{"params": rest},
                  {"params": projected, "rank": rank, "update_proj_gap": 200, "scale": 0.25, "proj_type": "std"}]
        return model, GaLoreAdamW(groups, lr=LR, no_deprecation_warning=True)
    if method in ("qgalore", "qgalore_reference"):
        import qgalore_fx

        model = qgalore_fx.transform(model, rank=rank)
        return model, qgalore_fx.optimizer(model, lr=LR)
    raise ValueError(f"method must be one of {METHODS}, got {method!r}")


def make_step(model, opt, x, y, compiled: bool, reference: bool = False):
    run = torch.compile(model, fullgraph=True) if compiled else model

    def step():
        if reference:
            with _references_forced():
                return plain_step()
        return plain_step()

    def plain_step():
        logits = run(input_ids=x).logits
        loss = F.cross_entropy(logits.float().flatten(0, 1), y.flatten())
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.detach()

    return step


@contextlib.contextmanager
def _references_forced():
    from qgalore_fx.kernels.fastpath import ENV_REFERENCE

    before = os.environ.get(ENV_REFERENCE)
    os.environ[ENV_REFERENCE] = "1"
    try:
        yield
    finally:
        if before is None:
            del os.environ[ENV_REFERENCE]
        else:
            os.environ[ENV_REFERENCE] = before


def build_case(preset: str, method: str, compiled: bool):
    p = get_preset(preset)
    model, opt = make_optimizer(method, make_model(preset), p.rank)
    x, y = make_batch(model, p.seq_len)
    return model, opt, make_step(model, opt, x, y, compiled, reference=method == "qgalore_reference")


def time_block(preset: str, cases_wanted, steps: int, warmup: int) -> tuple[dict, dict]:
    """Median step time per ``(method, mode)`` case, the cases' steps interleaved round by round.

    On a machine shared with other jobs the load changes from second to second; interleaving exposes every case
    to the same load, so the ratios (against AdamW, and compiled against eager) hold even when the absolute times
    drift.
    """
    cases, warm = {}, {}
    for key in cases_wanted:
        method, mode = key
        t0 = time.perf_counter()
        cases[key] = build_case(preset, method, mode == "compiled")
        for _ in range(warmup):
            cases[key][2]()
        warm[key] = time.perf_counter() - t0
    times = {key: [] for key in cases}
    for _ in range(steps):
        for key, (_, _, step) in cases.items():
            t0 = time.perf_counter()
            loss = step()
            times[key].append(time.perf_counter() - t0)
            if not torch.isfinite(loss):
                raise RuntimeError(f"{preset}/{key}: non-finite loss {float(loss)}")
    for (method, mode), (_, opt, _) in cases.items():
        if method.startswith("qgalore"):  # every timed step was a steady-state one
            counts = {s["refresh_count"] for s in opt.layer_stats().values()}
            assert counts == {1}, counts
    out = {key: {"median_s": statistics.median(t), "min_s": min(t), "max_s": max(t), "warmup_s": warm[key],
                 "steps": steps} for key, t in times.items()}
    return out, cases


# ------------------------------------------------------------------------------------------ profile
_COMPONENTS = {
    "forward matmuls (int8_matmul)": ("qgalore_fx::int8_matmul",),
    "backward input-grad matmuls (int8_matmul_t)": ("qgalore_fx::int8_matmul_t",),
    "per-layer update (lowrank_update_)": ("qgalore_fx::lowrank_update_",),
    "rest-group 8-bit AdamW (optimizer.step)": ("rest_step",),
    "forward total": ("forward",),
    "backward total": ("backward",),
}


def profile_step(model, opt, x, y, compiled: bool):
    """Per-component CPU time of one steady-state Q-GaLore step (exclusive of profiler overhead: indicative)."""
    from torch.profiler import ProfilerActivity, profile, record_function

    run = torch.compile(model, fullgraph=True) if compiled else model
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        t0 = time.perf_counter()
        with record_function("forward"):
            logits = run(input_ids=x).logits
            loss = F.cross_entropy(logits.float().flatten(0, 1), y.flatten())
        with record_function("backward"):
            loss.backward()
        with record_function("rest_step"):
            opt.step()
        opt.zero_grad(set_to_none=True)
        total = time.perf_counter() - t0
    totals: dict[str, float] = {}
    counts: dict[str, int] = {}
    for e in prof.key_averages():
        totals[e.key] = e.cpu_time_total / 1e6
        counts[e.key] = e.count
    rows = {"step (wall, profiled)": (total, 1)}
    for label, keys in _COMPONENTS.items():
        rows[label] = (sum(totals.get(k, 0.0) for k in keys), sum(counts.get(k, 0) for k in keys))
    return rows


# ------------------------------------------------------------------------------------------ main
def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--presets", nargs="+", default=["tiny", "60m"])
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS + EXTRA_METHODS)
    ap.add_argument("--modes", nargs="+", default=["eager", "compiled"], choices=["eager", "compiled"])
    ap.add_argument("--compiled-methods", nargs="+", default=None, choices=METHODS + EXTRA_METHODS,
                    help="methods to run compiled as well (default: all of --methods)")
    ap.add_argument("--threads", nargs="+", type=int, default=[1, 2])
    ap.add_argument("--steps", type=int, default=5, help="timed steps per case (median reported)")
    ap.add_argument("--warmup", type=int, default=3, help="untimed steps first (refresh, compilation)")
    ap.add_argument("--profile", action="store_true", help="per-component table of the Q-GaLore step")
    ap.add_argument("--json", default=None, help="write the figures here")
    args = ap.parse_args(argv)
    methods = ["adamw"] + [m for m in args.methods if m != "adamw"]  # the ratios' baseline runs first
    out = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "torch": torch.__version__,
           "machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads "
                      f"available", "args": vars(args), "cases": [], "profiles": []}
    compiled_methods = args.compiled_methods or methods
    wanted = [(m, "eager") for m in methods if "eager" in args.modes]
    wanted += [(m, "compiled") for m in methods if "compiled" in args.modes and m in compiled_methods]
    for preset in args.presets:
        for threads in args.threads:
            torch.set_num_threads(threads)
            torch._dynamo.reset()
            results, cases = time_block(preset, wanted, args.steps, args.warmup)
            for (method, mode), r in results.items():
                base = results.get(("adamw", mode), results.get(("adamw", "eager")))["median_s"]
                eager = results.get((method, "eager"))
                r.update(preset=preset, threads=threads, mode=mode, method=method, ratio_to_adamw=r["median_s"] / base,
                         ratio_to_eager=None if eager is None else r["median_s"] / eager["median_s"])
                out["cases"].append(r)
                vs_eager = "" if mode == "eager" or eager is None else f", {r['ratio_to_eager']:.3f}x its eager"
                print(f"{preset:5s} threads={threads} {mode:8s} {method:10s} median {r['median_s']:.3f} s "
                      f"({r['ratio_to_adamw']:.3f}x adamw {mode}{vs_eager})  min {r['min_s']:.3f}  "
                      f"max {r['max_s']:.3f}  warm-up {r['warmup_s']:.1f} s", flush=True)
            if args.profile:
                for (method, mode), (model, opt, _) in cases.items():
                    if method != "qgalore":  # the fast paths' profile
                        continue
                    p = get_preset(preset)
                    x, y = make_batch(model, p.seq_len)
                    rows = profile_step(model, opt, x, y, mode == "compiled")
                    out["profiles"].append({"preset": preset, "threads": threads, "mode": mode,
                                            "rows": {k: v[0] for k, v in rows.items()}})
                    print(f"  profile of one qgalore step, {mode}:")
                    for label, (sec, n) in rows.items():
                        print(f"    {label:45s} {sec:7.3f} s  ({n} calls)", flush=True)
            del cases
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)
    return out


if __name__ == "__main__":
    main()
