"""Same model, data, steps and seed, trained by each method: quality, memory, speed, refreshes.

Run (defaults: the ``tiny`` preset, see ``--help``)::

    .venv/bin/python benchmarks/compare.py
    .venv/bin/python benchmarks/compare.py --threads 1 --methods adamw,qgalore --steps 100

Methods (``--methods``, comma separated; default: all of them, ``galore-torch`` only when
the ``galore_torch`` package is importable):

================  ==========================================================================
``adamw``         ``torch.optim.AdamW`` on every parameter; fp32 on CPU, bf16 autocast on GPU
``adamw8bit``     ``bitsandbytes.optim.AdamW8bit`` on every parameter
``galore``        qgalore_fx in its exact-GaLore mode (``train.py``'s ``galore`` method):
                  ``weight_bits=32``, ``proj_bits=32``, ``proj_method="full"`` (SVD),
                  ``adaptive=False``, ``optim_bits=32``, ``stochastic_round=False``
``qgalore``       qgalore_fx with its defaults (INT8 weights, INT4 projections, 8-bit Adam,
                  stochastic rounding, layer-adaptive lazy refresh)
``qgalore-nosr``  as ``qgalore`` with ``stochastic_round=False``
``qgalore-fixed`` as ``qgalore`` with ``adaptive=False`` (fixed refresh interval)
``galore-torch``  the external ``galore_torch.GaLoreAdamW`` (``pip install galore-torch``) on
                  the un-transformed fp32 model, projecting the same linears (every
                  ``nn.Linear`` inside ``model.model.layers``) with the same rank, interval
                  and scale; runs through the same ``train()`` loop
================  ==========================================================================

Every method runs through ``qgalore_fx.app.train.train`` (the loop behind ``qgalore-fx
pretrain``) in its own subprocess, so that each one's peak RSS is its own. The learning
rates are ``train.py``'s per-method defaults (``DEFAULT_LR``, and for the projected methods
``rest_lr`` for the parameters that are not projected); the two Q-GaLore ablations get
Q-GaLore's, ``galore-torch`` gets ``galore``'s (projected group) and ``DEFAULT_LR["adamw"]``
(the rest, as ``rest_lr`` defaults to). All are printed and stored. One invocation is one
seed at one lr per method, so its perplexities do not rank the methods; ``quality_sweep.py``
runs this file's worker over an lr grid per method and several seeds, and its table does.

Per method it reports:

- final validation perplexity (``train()``'s final evaluation over the whole validation
  split) and the last step's training loss;
- persistent state: weights + optimizer states + projections, from
  ``qgalore_fx.memory.memory_report(model, optimizer)`` on the trained model (real tensor
  sizes; for ``galore-torch`` the projector matrices, which live in Python objects in the
  optimizer state, are added from their tensor sizes);
- peak memory: ``torch.cuda.max_memory_allocated`` on GPU; on CPU the subprocess's peak RSS
  (``ru_maxrss``) and that peak minus the RSS just before training (after the imports,
  bitsandbytes and galore_torch included, and the corpus were loaded);
- step time: the median over steps 2..N of ``train()``'s own per-step timer
  (forward + backward + ``step`` + ``zero_grad`` + scheduler, logged every step), its ratio
  to AdamW's median in the same invocation, and the median *process CPU time* per step (all
  threads), measured between consecutive batch fetches, evaluation steps excluded. On a
  shared CPU the wall figure moves with other jobs; the CPU figure much less;
- subspace refreshes: the sum over projected layers of ``refresh_count`` and
  ``refresh_seconds`` from ``optimizer.layer_stats()`` (the first projection counts as a
  refresh); for ``galore-torch`` its SVD calls, timed by wrapping its projector.

Outputs: ``benchmarks/results/compare-<preset>.json`` (everything, with the per-step
histories), ``benchmarks/results/compare-<preset>.png`` (training loss, 10-step moving
average, and validation loss against step for every method) and a markdown table on stdout.

Instrumentation: ``train()`` returns neither the optimizer nor per-step CPU times, so the
worker wraps two module attributes for the duration of its own run: ``train.build_optimizer``
(to keep the model and optimizer it built, and to build ``galore-torch``'s optimizer) and
``qgalore_fx.app.data.random_batches`` (to stamp the process CPU clock at each batch fetch).
Neither changes what is computed.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import pathlib
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"

# name -> (train.py method, TrainConfig overrides, lr taken from DEFAULT_LR of this method)
METHODS: dict[str, tuple[str, dict, str]] = {
    "adamw": ("adamw", {}, "adamw"),
    "adamw8bit": ("adamw8bit", {}, "adamw8bit"),
    "galore": ("galore", {}, "galore"),
    "qgalore": ("qgalore", {}, "qgalore"),
    "qgalore-nosr": ("qgalore", {"stochastic_round": False}, "qgalore"),
    "qgalore-fixed": ("qgalore", {"adaptive": False}, "qgalore"),
    "qgalore-long": ("qgalore", {"proj_side": "long"}, "qgalore"),
    "qgalore-lean": ("qgalore", {"lean": True}, "qgalore"),
    # The external GaLore: train.py's loop with method "adamw" whose optimizer the worker
    # replaces by galore_torch.GaLoreAdamW; lr as for our "galore".
    "galore-torch": ("adamw", {}, "galore"),
}
LABELS = {
    "adamw": "AdamW (fp32 on CPU)",
    "adamw8bit": "8-bit AdamW (bnb)",
    "galore": "GaLore (fp32 W and P, full SVD, fp32 Adam)",
    "qgalore": "Q-GaLore (defaults)",
    "qgalore-nosr": "Q-GaLore, no SR",
    "qgalore-fixed": "Q-GaLore, fixed interval",
    "qgalore-long": "Q-GaLore, proj_side='long'",
    "qgalore-lean": "Q-GaLore, lean=True",
    "galore-torch": "galore-torch GaLoreAdamW (fp32)",
}
MiB = 2**20


def galore_torch_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("galore_torch") is not None


# =========================================================================== worker
def _rss_now() -> int:
    """Resident set size of this process now (bytes), from /proc; 0 where unavailable."""
    from qgalore_fx.memory import process_memory

    return process_memory("VmRSS") or 0


def _galore_torch_optimizer(model, cfg, rank: int, interval: int, scale: float, rest_lr: float):
    """``galore_torch.GaLoreAdamW`` with the projected linears in a GaLore param group.

    As ``train.py`` does for ``galore``/``qgalore``, the projected group gets ``cfg.lr`` and the
    rest (embeddings, norms, head) ``rest_lr``; LambdaLR scales each group's own lr.
    """
    import torch
    from galore_torch import GaLoreAdamW

    galore_params = [
        m.weight for name, m in model.named_modules()
        if isinstance(m, torch.nn.Linear) and name.startswith("model.layers.")
    ]
    ids = {id(p) for p in galore_params}
    regular = [p for p in model.parameters() if id(p) not in ids]
    groups = [
        {"params": regular, "lr": rest_lr},
        # GaLoreAdamW's API: a group carrying "rank" is projected; update_proj_gap is the
        # refresh interval, scale the alpha of the projected-back update, proj_type "std"
        # projects on the smaller side (as qgalore_fx does).
        {"params": galore_params, "rank": rank, "update_proj_gap": interval, "scale": scale,
         "proj_type": "std"},
    ]

    class CheckpointableGaLoreAdamW(GaLoreAdamW):
        """GaLoreAdamW whose ``state_dict`` holds its projectors as plain values.

        ``train()`` saves the final checkpoint with ``qgalore_fx.save_checkpoint``, which stores
        tensors, numbers and containers only; GaLoreAdamW keeps a ``GaLoreProjector`` object in
        each projected parameter's state. The update itself is GaLoreAdamW's, unchanged.
        """

        def state_dict(self):
            sd = super().state_dict()
            state = {}
            for key, entry in sd["state"].items():
                entry = dict(entry)
                proj = entry.get("projector")
                if proj is not None:
                    entry["projector"] = {"rank": proj.rank, "update_proj_gap": proj.update_proj_gap,
                                          "scale": proj.scale, "proj_type": proj.proj_type,
                                          "ortho_matrix": proj.ortho_matrix}
                state[key] = entry
            return {**sd, "state": state}

    return CheckpointableGaLoreAdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps,
                                     weight_decay=cfg.weight_decay, no_deprecation_warning=True)


def run_worker(spec: dict) -> dict:
    """Train one method as described by ``spec`` and return its measurements."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import resource

    import torch

    import qgalore_fx.app.data as data_lib
    import qgalore_fx.app.train as train_mod
    from qgalore_fx.memory import memory_report

    name = spec["name"]
    external = name == "galore-torch"
    cfg = train_mod.TrainConfig(**spec["config"])
    corpus = data_lib.prepare_corpus(cfg.corpus, cfg.vocab_size, cfg.cache_dir)

    captured: dict = {}
    original_build = train_mod.build_optimizer
    original_batches = data_lib.random_batches
    cpu_marks: list[float] = []
    svd_calls: list[float] = []

    def build_optimizer(model, config, shard=None):
        if external:
            model, optimizer = model, _galore_torch_optimizer(
                model, config, spec["rank"], spec["update_interval"], spec["scale"], spec["rest_lr"])
        else:
            model, optimizer = original_build(model, config, shard=shard)
        captured.update(model=model, optimizer=optimizer)
        return model, optimizer

    def random_batches(*args, **kwargs):
        for batch in original_batches(*args, **kwargs):
            cpu_marks.append(time.process_time())
            yield batch

    if external:
        from galore_torch.galore_projector import GaLoreProjector

        original_svd = GaLoreProjector.get_orthogonal_matrix

        def timed_svd(self, *args, **kwargs):
            t0 = time.perf_counter()
            try:
                return original_svd(self, *args, **kwargs)
            finally:
                svd_calls.append(time.perf_counter() - t0)

        GaLoreProjector.get_orthogonal_matrix = timed_svd

    # Import every optional library a method may load lazily (bitsandbytes for adamw8bit, galore_torch)
    # before the baseline, so that "peak RSS over pre-train RSS" measures training, not imports.
    import bitsandbytes  # noqa: F401

    if galore_torch_available():
        import galore_torch  # noqa: F401

    rss_before = _rss_now()
    maxrss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    cpu0, wall0 = time.process_time(), time.perf_counter()
    train_mod.build_optimizer = build_optimizer
    data_lib.random_batches = random_batches
    try:
        result = train_mod.train(cfg, corpus=corpus, verbose=True)
    finally:
        train_mod.build_optimizer = original_build
        data_lib.random_batches = original_batches
    cpu_total, wall_total = time.process_time() - cpu0, time.perf_counter() - wall0
    peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

    rcfg = result.config
    tokens_per_step = rcfg.batch_size * rcfg.seq_len
    # train() logs every step (log_every=1): each record's tokens_per_s is one step's timer.
    step_wall = [tokens_per_step / r["tokens_per_s"] for r in result.history]
    eval_steps = {r["step"] for r in result.history if "val_loss" in r}
    # CPU time of step k = mark(k+1) - mark(k): the whole step plus logging; steps that
    # also evaluated are left out, and the last step has no following mark.
    step_cpu = [cpu_marks[k] - cpu_marks[k - 1] for k in range(1, len(cpu_marks))
                if k not in eval_steps]  # cpu_marks[k-1] is step k's fetch
    steady_wall = step_wall[1:] or step_wall
    steady_cpu = step_cpu[1:] or step_cpu

    model, optimizer = captured["model"], captured["optimizer"]
    report = memory_report(model, optimizer)
    projections_extra = 0
    refresh = None
    if hasattr(optimizer, "layer_stats"):
        stats = optimizer.layer_stats()
        refresh = {
            "layers": len(stats),
            "refresh_count": sum(s["refresh_count"] for s in stats.values()),
            "refresh_seconds": sum(s["refresh_seconds"] for s in stats.values()),
            "final_intervals": sorted({s["interval"] for s in stats.values()}),
            "per_layer": stats,
        }
    if external:
        projectors = [s["projector"] for s in optimizer.state.values() if "projector" in s]
        for proj in projectors:
            mats = proj.ortho_matrix if isinstance(proj.ortho_matrix, (list, tuple)) else [proj.ortho_matrix]
            projections_extra += sum(m.numel() * m.element_size() for m in mats if m is not None)
        refresh = {
            "layers": len(projectors),
            "refresh_count": len(svd_calls),
            "refresh_seconds": sum(svd_calls),
            "final_intervals": [spec["update_interval"]],
        }
    persistent = report.weights_and_states + projections_extra
    out = {
        "name": name,
        "label": LABELS[name],
        "optimizer": ("galore_torch.GaLoreAdamW (state_dict made checkpointable)" if external
                      else type(optimizer).__module__ + "." + type(optimizer).__qualname__),
        "config": rcfg.to_json() | {"preset": str(spec["config"]["preset"])},
        "lr": rcfg.lr,
        # lr of the parameters that are not projected, where it differs (train.py's rest_lr)
        "rest_lr": (spec["rest_lr"] if external
                    else optimizer.param_groups[-1].get("initial_lr") if len(optimizer.param_groups) > 1
                    else None),
        "n_params": result.n_params,
        "vocab_size": result.vocab_size,
        "val_ppl": result.val_ppl,
        "val_loss": result.val_loss,
        "val_tokens": result.val_tokens,
        "final_train_loss": result.final_train_loss,
        "unigram_ppl": result.unigram_ppl,
        "memory": {
            "persistent_bytes": persistent,
            "weights_bytes": report.weights,
            "optimizer_state_bytes": report.optimizer_states,
            "projection_bytes": report.projections + projections_extra,
            "weight_storage": report.weight_storage,
            "projection_storage": report.projection_storage if not external else "fp32",
            "report": report.to_dict(),
            "peak_rss_bytes": peak_rss,
            "rss_before_train_bytes": rss_before,
            "maxrss_before_train_bytes": maxrss_before,
            "peak_rss_over_pretrain_bytes": peak_rss - rss_before,
            "cuda_max_allocated_bytes": (torch.cuda.max_memory_allocated()
                                         if torch.cuda.is_available() else None),
        },
        "time": {
            "median_step_s": statistics.median(steady_wall),
            "mean_step_s": statistics.fmean(step_wall),
            "p10_step_s": _quantile(steady_wall, 0.1),
            "p90_step_s": _quantile(steady_wall, 0.9),
            "median_step_cpu_s": statistics.median(steady_cpu) if steady_cpu else None,
            "train_seconds": result.train_seconds,
            "run_wall_s": wall_total,
            "run_cpu_s": cpu_total,
            "threads": rcfg.threads,
            "step_wall_s": step_wall,
            "step_cpu_s": step_cpu,
        },
        "refresh": refresh,
        "history": [{k: r[k] for k in ("step", "loss", "val_loss", "val_ppl", "lr") if k in r}
                    for r in result.history],
    }
    return out


def _quantile(xs: list[float], q: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, max(0, round(q * (len(s) - 1))))]


# =========================================================================== parent
def method_specs(args, names: list[str]) -> list[dict]:
    from qgalore_fx.app.train import DEFAULT_LR

    specs = []
    for name in names:
        method, overrides, lr_of = METHODS[name]
        config = dict(
            preset=args.preset, method=method, steps=args.steps, batch_size=args.batch_size,
            seq_len=args.seq_len, lr=getattr(args, "lr", None) or DEFAULT_LR[lr_of], seed=args.seed, threads=args.threads,
            update_interval=args.update_interval, eval_every=args.eval_every,
            eval_batches=args.eval_batches, log_every=1, vocab_size=args.vocab_size,
            rank=args.rank,
        ) | ({"eps": args.eps} if getattr(args, "eps", None) is not None else {}) | overrides
        specs.append(dict(name=name, config=config, rank=None, update_interval=args.update_interval,
                          scale=0.25, rest_lr=DEFAULT_LR["adamw"] if name == "galore-torch" else None))
    return specs


def run_one(spec: dict, workdir: pathlib.Path, log_dir: pathlib.Path) -> dict:
    spec_path = workdir / f"{spec['name']}.spec.json"
    out_path = workdir / f"{spec['name']}.out.json"
    spec = dict(spec)
    spec["config"] = dict(spec["config"], run_dir=str(workdir / f"run-{spec['name']}"))
    spec_path.write_text(json.dumps(spec))
    log_path = log_dir / f"compare-{spec['name']}.log"
    t0 = time.perf_counter()
    env = dict(os.environ)
    threads = spec["config"].get("threads")
    if threads:
        env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    with log_path.open("w") as log:
        proc = subprocess.run(
            [sys.executable, str(pathlib.Path(__file__).resolve()), "--_worker", str(spec_path),
             "--_out", str(out_path)],
            stdout=log, stderr=subprocess.STDOUT, cwd=str(ROOT), env=env,
        )
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        tail = log_path.read_text(errors="replace")[-3000:]
        raise RuntimeError(f"method {spec['name']} failed (exit {proc.returncode}); log {log_path}:\n{tail}")
    out = json.loads(out_path.read_text())
    out["time"]["subprocess_wall_s"] = wall
    shutil.rmtree(workdir / f"run-{spec['name']}", ignore_errors=True)
    return out


def _fmt_mib(b) -> str:
    return "-" if b is None else f"{b / MiB:.1f}"


def markdown_table(results: list[dict], on_cuda: bool) -> str:
    base = next((r for r in results if r["name"] == "adamw"), None)
    peak_head = "peak CUDA alloc MiB" if on_cuda else "peak RSS MiB (Δ over pre-train)"
    lines = [
        f"| method | peak lr (projected / rest) | val ppl | train loss (last step) | weights+states+proj MiB | {peak_head} | "
        "median step s (wall) | × AdamW (wall) | median step CPU s | × AdamW (CPU) | refreshes | refresh s |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        t, m, rf = r["time"], r["memory"], r["refresh"]
        if on_cuda:
            peak = _fmt_mib(m["cuda_max_allocated_bytes"])
        else:
            peak = f"{m['peak_rss_bytes'] / MiB:.0f} ({m['peak_rss_over_pretrain_bytes'] / MiB:+.0f})"
        ratio_w = t["median_step_s"] / base["time"]["median_step_s"] if base else None
        ratio_c = (t["median_step_cpu_s"] / base["time"]["median_step_cpu_s"]
                   if base and t["median_step_cpu_s"] and base["time"]["median_step_cpu_s"] else None)
        cpu = t["median_step_cpu_s"]
        cells = [
            r["name"], f"{r['lr']:g}" + (f" / {r['rest_lr']:g}" if r.get("rest_lr") else ""), f"{r['val_ppl']:.1f}", f"{r['final_train_loss']:.3f}",
            _fmt_mib(m["persistent_bytes"]), peak, f"{t['median_step_s']:.2f}",
            "-" if ratio_w is None else f"{ratio_w:.2f}",
            "-" if cpu is None else f"{cpu:.2f}",
            "-" if ratio_c is None else f"{ratio_c:.2f}",
            "-" if rf is None else str(rf["refresh_count"]),
            "-" if rf is None else f"{rf['refresh_seconds']:.1f}",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(results: list[dict], path: pathlib.Path, title: str, window: int = 10) -> None:
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    fig = Figure(figsize=(9, 5), dpi=100, layout="constrained")
    ax_train, ax_val = fig.subplots(1, 2)
    styles = {"adamw": "-", "adamw8bit": "-", "galore": "-", "qgalore": "-", "galore-torch": ":",
              "qgalore-nosr": "--", "qgalore-fixed": (0, (1, 2)), "qgalore-lean": (0, (3, 1, 1, 1)), "qgalore-long": "-."}
    zoom = []
    for r in results:
        steps = [h["step"] for h in r["history"]]
        loss = [h["loss"] for h in r["history"]]
        smooth = [statistics.fmean(loss[max(0, i - window + 1): i + 1]) for i in range(len(loss))]
        ls = styles.get(r["name"], "-")
        (line,) = ax_train.plot(steps, smooth, lw=1.2, ls=ls, label=r["name"])
        zoom += [v for st, v in zip(steps, smooth) if st >= 0.15 * steps[-1]]
        ev = [h for h in r["history"] if "val_loss" in h]
        ax_val.plot([h["step"] for h in ev], [h["val_loss"] for h in ev], marker="o", ms=3, lw=1.2, ls=ls,
                    color=line.get_color(), label=f"{r['name']} ({r['val_ppl']:.0f})")
    if zoom:  # the first steps fall from ln(vocab); show the part where the methods differ
        ax_train.set_ylim(min(zoom) - 0.05, max(zoom) + 0.05)
    ax_train.set(xlabel="step", ylabel="cross entropy (nats/token)",
                 title=f"training loss ({window}-step moving average)")
    ax_val.set(xlabel="step", ylabel="cross entropy (nats/token)",
               title="validation loss (legend: final perplexity)")
    for ax in (ax_train, ax_val):
        ax.grid(alpha=0.3)
    ax_val.legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.savefig(path, dpi=100)


def _history_columns(history: list[dict]) -> dict:
    """Per-step records as columns (``val_*`` only at the evaluated steps): a much smaller JSON."""
    evals = [h for h in history if "val_loss" in h]
    return {"step": [h["step"] for h in history], "loss": [h["loss"] for h in history],
            "lr": [h.get("lr") for h in history], "eval_step": [h["step"] for h in evals],
            "val_loss": [h["val_loss"] for h in evals], "val_ppl": [h["val_ppl"] for h in evals]}


def _history_rows(history) -> list[dict]:
    if isinstance(history, list):
        return history
    rows = {step: {"step": step, "loss": loss, "lr": lr}
            for step, loss, lr in zip(history["step"], history["loss"], history["lr"])}
    for step, vl, vp in zip(history["eval_step"], history["val_loss"], history["val_ppl"]):
        rows[step].update(val_loss=vl, val_ppl=vp)
    return list(rows.values())


def _rounded(obj, digits: int = 6):
    """``obj`` with every float rounded to ``digits`` significant digits (JSON size)."""
    if isinstance(obj, float):
        return obj if not math.isfinite(obj) or obj == 0 else float(f"{obj:.{digits}g}")
    if isinstance(obj, dict):
        return {k: _rounded(v, digits) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_rounded(v, digits) for v in obj]
    return obj


def write_outputs(doc: dict, out_dir: pathlib.Path) -> tuple[pathlib.Path, pathlib.Path]:
    """Write ``compare-<preset>.json`` (compact: columns, 6 significant digits) and the PNG."""
    s = doc["settings"]
    results = [dict(r, history=_history_rows(r["history"])) for r in doc["results"]]
    png_path = out_dir / f"compare-{s['preset']}.png"
    plot(results, png_path, f"qgalore_fx compare: {s['preset']}, {s['steps']} steps, batch {s['batch_size']}, "
         f"seq {s['seq_len']}, vocab {s['vocab_size']}, seed {s['seed']}")
    compact = dict(doc, results=[dict(r, history=_history_columns(r["history"])) for r in results])
    json_path = out_dir / f"compare-{s['preset']}.json"
    json_path.write_text(json.dumps(_rounded(compact), default=str, separators=(",", ":")) + "\n")
    return json_path, png_path


def machine_info() -> dict:
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info = {"cpu": cpu, "cpu_count": os.cpu_count(), "python": platform.python_version(),
            "torch": torch.__version__, "cuda": torch.cuda.get_device_name(0)
            if torch.cuda.is_available() else None}
    try:
        info["loadavg_at_start"] = os.getloadavg()
    except OSError:
        pass
    for pkg in ("bitsandbytes", "transformers", "galore_torch"):
        try:
            from importlib.metadata import version

            info[pkg] = version(pkg.replace("_", "-"))
        except Exception:  # noqa: BLE001 - not installed
            info[pkg] = None
    return info


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="tiny", help="model preset (default: tiny)")
    p.add_argument("--steps", type=int, default=300, help="training steps per method (default: 300)")
    p.add_argument("--batch-size", type=int, default=8, help="sequences per step (default: 8)")
    p.add_argument("--seq-len", type=int, default=None, help="tokens per sequence (default: the preset's)")
    p.add_argument("--methods", default=None,
                   help=f"comma list from {', '.join(METHODS)} (default: all; galore-torch only if importable)")
    p.add_argument("--seed", type=int, default=0, help="model init and batch order seed (default: 0)")
    p.add_argument("--update-interval", type=int, default=None,
                   help="initial subspace refresh interval of the projected methods (default: steps // 10, "
                        "i.e. about 10 refreshes per layer at a fixed interval, so the adaptive policy - "
                        "which needs 6 agreeing refreshes to double - can act within the run)")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads per worker: torch intra-op threads, and OMP_NUM_THREADS/MKL_NUM_THREADS "
                        "of the worker (bitsandbytes' CPU kernels use OpenMP) (default: torch's). On a CPU "
                        "shared with other jobs use 1: a 2-thread OpenMP region waits for a descheduled thread "
                        "and elementwise ops became 10-30x slower in our measurements")
    p.add_argument("--rank", type=int, default=None, help="projection rank (default: the preset's)")
    p.add_argument("--lr", type=float, default=None,
                   help="peak lr of every method (the projected group's for projected methods; default: each "
                        "method's DEFAULT_LR)")
    p.add_argument("--eps", type=float, default=None, help="Adam's eps for every method (default: TrainConfig's, 1e-8)")
    p.add_argument("--vocab-size", type=int, default=8192, help="tokenizer vocabulary (default: 8192)")
    p.add_argument("--eval-every", type=int, default=None,
                   help="steps between periodic validations on --eval-batches batches (default: steps // 6)")
    p.add_argument("--eval-batches", type=int, default=8, help="batches per periodic validation (default: 8)")
    p.add_argument("--out-dir", default=str(RESULTS), help="where the JSON and PNG go")
    p.add_argument("--_worker", help=argparse.SUPPRESS)
    p.add_argument("--_out", help=argparse.SUPPRESS)
    return schedule_defaults(p.parse_args(argv))


def schedule_defaults(args):
    """Fill ``update_interval`` (10 refreshes per run) and ``eval_every`` (6 evaluations) left unset."""
    if args.update_interval is None:
        args.update_interval = max(1, args.steps // 10)
    if args.eval_every is None:
        args.eval_every = max(1, args.steps // 6)
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args._worker:
        spec = json.loads(pathlib.Path(args._worker).read_text())
        out = run_worker(spec)
        pathlib.Path(args._out).write_text(json.dumps(out, default=str))
        return 0

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.methods:
        names = [n.strip() for n in args.methods.split(",") if n.strip()]
        unknown = [n for n in names if n not in METHODS]
        if unknown:
            raise SystemExit(f"--methods: unknown {', '.join(unknown)}; choose from {', '.join(METHODS)}")
        if "galore-torch" in names and not galore_torch_available():
            raise SystemExit("--methods galore-torch needs the galore_torch package: pip install galore-torch")
    else:
        names = [n for n in METHODS if n != "galore-torch" or galore_torch_available()]

    import qgalore_fx.app.data as data_lib
    from qgalore_fx.app import presets

    preset = presets.get_preset(args.preset)
    args.rank = args.rank or preset.rank
    corpus = data_lib.prepare_corpus(None, args.vocab_size)  # builds the cache the workers load
    specs = method_specs(args, names)
    for s in specs:
        s["rank"] = args.rank
    started = datetime.datetime.now().astimezone()
    info = machine_info()
    print(f"compare: preset {preset.name}, {args.steps} steps, batch {args.batch_size} x seq "
          f"{args.seq_len or preset.seq_len}, seed {args.seed}, vocab {corpus.vocab_size}, rank {args.rank}, "
          f"update interval {args.update_interval}, threads {args.threads or 'default'}", flush=True)
    print("peak learning rates (train.py DEFAULT_LR; the ablations use qgalore's, galore-torch galore's; the "
          "parameters that are not projected get train.py's rest_lr, printed per method when done): "
          + ", ".join(f"{s['name']}={s['config']['lr']:g}" for s in specs), flush=True)

    out_dir = pathlib.Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    results = []
    with tempfile.TemporaryDirectory(prefix="qgalore-compare-") as tmp:
        workdir = pathlib.Path(tmp)
        for spec in specs:
            print(f"[{time.strftime('%H:%M:%S')}] {spec['name']} ...", flush=True)
            r = run_one(spec, workdir, workdir)
            results.append(r)
            print(f"[{time.strftime('%H:%M:%S')}] {spec['name']}: lr {r['lr']:g}, rest lr {r['rest_lr']}, "
                  f"val ppl {r['val_ppl']:.2f}, median step "
                  f"{r['time']['median_step_s']:.2f} s (CPU {r['time']['median_step_cpu_s'] or float('nan'):.2f}"
                  f" s), subprocess {r['time']['subprocess_wall_s']:.0f} s", flush=True)

    on_cuda = info["cuda"] is not None
    table = markdown_table(results, on_cuda)
    finished = datetime.datetime.now().astimezone()
    doc = {
        "command": " ".join([pathlib.Path(sys.executable).name, "benchmarks/compare.py"] + sys.argv[1:]),
        "started": started.isoformat(timespec="seconds"),
        "finished": finished.isoformat(timespec="seconds"),
        "machine": info | {"loadavg_at_end": os.getloadavg()},
        "settings": {"preset": preset.name, "steps": args.steps, "batch_size": args.batch_size,
                     "seq_len": args.seq_len or preset.seq_len, "seed": args.seed,
                     "update_interval": args.update_interval, "rank": args.rank,
                     "vocab_size": corpus.vocab_size, "threads": args.threads,
                     "eval_every": args.eval_every, "eval_batches": args.eval_batches,
                     "corpus": corpus.describe()},
        "table_markdown": table,
        "results": results,
    }
    json_path, png_path = write_outputs(doc, out_dir)
    print()
    print(table)
    print(f"\nwrote {json_path} and {png_path} ({(finished - started).total_seconds():.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
