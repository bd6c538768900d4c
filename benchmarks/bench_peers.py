"""Side by side at one shape: peak memory and step time of Q-GaLore and its peers, each in its own process.

    python benchmarks/bench_peers.py --preset 1b --steps 4 --threads 2
    python benchmarks/bench_peers.py --preset 7b --steps 3 --threads 2 --methods adamw adamw8bit galore
    python benchmarks/bench_peers.py --steps 4 --case 60m:4:1:off --case 1b:1:2:on --case 1b:4:2:on

Methods (``bench_speed.make_optimizer``, the same definitions as the step-time benchmark):

- ``adamw``: ``torch.optim.AdamW`` on every parameter, fp32 weights;
- ``adamw8bit``: ``bitsandbytes.optim.AdamW8bit``, fp32 weights (``--peer-dtype bf16`` for bf16 weights);
- ``galore``: ``galore_torch.GaLoreAdamW`` (block linears projected at the preset's rank, scale 0.25, gap 200);
- ``qgalore``: ``qgalore_fx.transform(model, rank)`` + ``qgalore_fx.optimizer`` with every default (at 60m and
  up that updates the embedding and head inside backward);
- ``qgalore-lowmem``: as ``qgalore``, with ``rest_in_backward=True`` and the embedding and head stored bf16
  (the LLaMA-7B set-up of BENCHMARKS.md).

Every method trains the same LLaMA (:mod:`qgalore_fx.app.presets`) with activation checkpointing (unless
``--checkpointing off``), batch ``--batch-size`` x ``--seq-len`` random tokens, ``--threads`` threads, glibc's mmap threshold at 1 MiB
(``qgalore_fx.memory.set_cpu_mmap_threshold``, so freed tensors leave the resident set in every process;
``--allocator glibc`` keeps glibc's own policy, whose large allocations need no page faults). The
peers build the fp32 model directly; Q-GaLore builds on ``meta`` and materializes straight into INT8, as its
users do. Each child runs under ``resource.setrlimit(RLIMIT_DATA, --cap-gib)``: an allocation past the cap
fails inside the child (reported with the phase it failed in) instead of swapping or waking the OOM killer.

Reported per method: peak RSS (``ru_maxrss``), weights + optimizer states (``memory_report`` for Q-GaLore;
parameters + optimizer state tensors for the peers, galore-torch's projectors included), the median time of
the steps after the first and the first step's time. The first step is the warm-up: it holds every
projection's first refresh (Q-GaLore's and galore-torch's, an SVD per projected matrix) and the allocator's
growth; the steps after it refresh nothing (both refresh every 200 steps or later), so their median is the
steady state, and a refresh's cost, spread over its interval, is about (first - median) / 200 per step.

``--case PRESET:BATCH:THREADS:CKPT`` (repeatable) runs every method at each of several shapes in one invocation
(``CKPT``: ``on`` or ``off``), one table per case, the floor of :mod:`qgalore_fx.app.floor` beside each
measured ratio.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

GiB = 2**30
METHODS = ("adamw", "adamw8bit", "galore", "qgalore", "qgalore-lowmem")
#: The method of qgalore_fx.app.floor whose matmuls each one does (8-bit AdamW's are AdamW's).
FLOOR_OF = {"adamw": "adamw", "adamw8bit": "adamw", "galore": "galore-torch", "qgalore": "qgalore",
            "qgalore-lowmem": "qgalore"}


def _state_bytes(opt) -> int:
    import torch

    seen, total = set(), 0

    def add(t):
        nonlocal total
        if isinstance(t, torch.Tensor) and id(t) not in seen:
            seen.add(id(t))
            total += t.numel() * t.element_size()
        elif isinstance(t, dict):
            for v in t.values():
                add(v)
        elif isinstance(t, (list, tuple)):
            for v in t:
                add(v)
        elif hasattr(t, "__dict__") and not isinstance(t, type):  # galore-torch's projector objects
            for v in vars(t).values():
                add(v)

    for state in opt.state.values():
        add(state)
    return total


def worker(args) -> dict:
    import torch
    import transformers

    from qgalore_fx.app.presets import get_preset, llama_config
    from qgalore_fx.memory import memory_report, set_cpu_mmap_threshold

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from bench_speed import make_optimizer

    if args.allocator == "threshold":
        set_cpu_mmap_threshold(1 << 20)
    torch.set_num_threads(args.threads)
    preset = get_preset(args.preset)
    config = llama_config(preset.name, vocab_size=None if preset.vocab_size else 8192)
    result = {"method": args.worker, "phase": "build"}
    times = []
    try:
        t0 = time.perf_counter()
        torch.manual_seed(0)
        if args.worker.startswith("qgalore"):
            import qgalore_fx

            with torch.device("meta"):
                model = transformers.LlamaForCausalLM(config)
            model = qgalore_fx.transform(model, rank=preset.rank)
            lowmem = args.worker == "qgalore-lowmem"
            if lowmem:
                model.get_input_embeddings().to(torch.bfloat16)
                model.get_output_embeddings().to(torch.bfloat16)
            opt = qgalore_fx.optimizer(model, lr=1e-3, rest_in_backward=True if lowmem else None)
        else:
            dtype = torch.bfloat16 if args.peer_dtype == "bf16" else torch.float32
            torch.set_default_dtype(dtype)  # built in its dtype: a bf16 model never exists in fp32
            try:
                model = transformers.LlamaForCausalLM(config)
            finally:
                torch.set_default_dtype(torch.float32)
            model, opt = make_optimizer(args.worker, model, preset.rank)
        if args.checkpointing == "on":
            model.gradient_checkpointing_enable()
        model.train()
        result["build_seconds"] = round(time.perf_counter() - t0, 1)
        g = torch.Generator().manual_seed(0)
        for step in range(args.steps):
            result["phase"] = f"step {step}"
            ids = torch.randint(0, config.vocab_size, (args.batch_size, args.seq_len), generator=g)
            t0 = time.perf_counter()
            loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            times.append(time.perf_counter() - t0)
            print(f"  {args.worker} step {step}: loss {loss.item():.4f}, {times[-1]:.1f} s", flush=True)
        result["phase"] = "done"
        if args.worker.startswith("qgalore"):
            result["weights_and_states_bytes"] = memory_report(model, opt).weights_and_states
        else:
            params = sum(p.numel() * p.element_size() for p in model.parameters())
            result["weights_and_states_bytes"] = params + _state_bytes(opt)
    except (MemoryError, RuntimeError) as e:  # the cap: torch reports a failed allocation as a RuntimeError
        text = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        result["error"] = f"{type(e).__name__}: {text}"
    result["step_seconds"] = [round(t, 2) for t in times]
    if len(times) > 1:
        result["median_step_seconds"] = round(statistics.median(times[1:]), 2)
    if times:
        result["first_step_seconds"] = round(times[0], 2)
    result["peak_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return result


def _parse_case(text: str) -> tuple:
    parts = text.split(":")
    if len(parts) != 4 or not parts[1].isdigit() or not parts[2].isdigit() or parts[3] not in ("on", "off"):
        raise SystemExit(f"--case {text!r}: expected PRESET:BATCH:THREADS:CKPT, e.g. 60m:4:1:off")
    return parts[0], int(parts[1]), int(parts[2]), parts[3]


def _print_case(case: dict, args) -> None:
    from qgalore_fx.app.floor import step_floor

    rows = case["rows"]
    print(f"\n{case['preset']}, batch {case['batch_size']} x {case['seq_len']}, {case['threads']} thread(s), "
          f"activation checkpointing {case['checkpointing']}, RLIMIT_DATA {args.cap_gib:g} GiB per process, "
          f"peers' weights {args.peer_dtype}, allocator {args.allocator}, {args.steps} steps (median of the steps "
          "after the first)")
    floor = step_floor(case["preset"], case["batch_size"], case["seq_len"], checkpointing=case["checkpointing"] == "on")
    median = {r["method"]: r.get("median_step_seconds") for r in rows}
    print(f"matmul floor (qgalore_fx.app.floor, rank {floor.rank}): Q-GaLore {floor.ratio('qgalore'):.3f}x AdamW, "
          f"galore-torch {floor.ratio('galore-torch'):.3f}x AdamW")
    print("| method | peak RSS GiB | weights + states GiB | median step s | first step s | x AdamW (median) "
          "| matmul floor x AdamW | x galore-torch (median) | result |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---|")
    for r in rows:
        def fmt(key, scale=1.0):
            return f"{r[key] / scale:.2f}" if key in r else "-"

        def ratio(base):
            return f"{r['median_step_seconds'] / median[base]:.2f}" if median.get(base) and "median_step_seconds" in r else "-"
        result = r.get("error", "ok")
        if "error" in r and "phase" in r:
            result = f"failed in {r['phase']}: {r['error']}"
        r["floor_ratio"] = floor.ratio(FLOOR_OF[r["method"]])
        print(f"| {r['method']} | {fmt('peak_rss_bytes', GiB)} | {fmt('weights_and_states_bytes', GiB)} | "
              f"{fmt('median_step_seconds')} | {fmt('first_step_seconds')} | {ratio('adamw')} | "
              f"{r['floor_ratio']:.3f} | {ratio('galore')} | {result} |")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="1b")
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--batch-size", type=int, default=1)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--checkpointing", choices=("on", "off"), default="on", help="activation checkpointing")
    ap.add_argument("--case", action="append", default=None, metavar="PRESET:BATCH:THREADS:CKPT",
                    help="a shape to run every method at (e.g. 60m:4:1:off), repeatable; default: one case from "
                         "--preset, --batch-size, --threads and --checkpointing")
    ap.add_argument("--cap-gib", type=float, default=21.0, help="RLIMIT_DATA of each child (GiB)")
    ap.add_argument("--allocator", choices=("threshold", "glibc"), default="threshold",
                    help="threshold: glibc's mmap threshold fixed at 1 MiB in every child (freed tensors leave the "
                         "resident set, large allocations fault their pages in again); glibc: its own policy "
                         "(docs/host-memory.md)")
    ap.add_argument("--peer-dtype", choices=("fp32", "bf16"), default="fp32", help="the peers' weight dtype")
    ap.add_argument("--out", default=None, help="JSON file for every figure")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        cap = int(args.cap_gib * GiB)
        resource.setrlimit(resource.RLIMIT_DATA, (cap, cap))
        print("RESULT " + json.dumps(worker(args)), flush=True)
        return 0
    cases = [_parse_case(text) for text in args.case] if args.case else [
        (args.preset, args.batch_size, args.threads, args.checkpointing)]
    report = []
    for preset, batch, threads, ckpt in cases:
        rows = []
        for method in args.methods:
            print(f"[{time.strftime('%H:%M:%S')}] {preset} {batch}x{args.seq_len} {threads} thread(s) "
                  f"checkpointing {ckpt}: {method} ...", flush=True)
            cmd = [sys.executable, __file__, "--worker", method, "--preset", preset, "--batch-size", str(batch),
                   "--seq-len", str(args.seq_len), "--threads", str(threads), "--checkpointing", ckpt,
                   "--steps", str(args.steps), "--cap-gib", str(args.cap_gib), "--peer-dtype", args.peer_dtype,
                   "--allocator", args.allocator]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            sys.stdout.write("".join(line + "\n" for line in proc.stdout.splitlines()
                                     if not line.startswith("RESULT ")))
            found = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
            if found:
                row = json.loads(found[-1][len("RESULT "):])
            else:  # killed, or failed outside the guarded part
                tail = (proc.stderr.strip().splitlines() or ["(no output)"])[-1][:200]
                row = {"method": method, "error": f"exit {proc.returncode}: {tail}"}
            rows.append(row)
        report.append({"preset": preset, "batch_size": batch, "seq_len": args.seq_len, "threads": threads,
                       "checkpointing": ckpt, "rows": rows})
    for case in report:
        _print_case(case, args)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps({
            "command": "python benchmarks/bench_peers.py " + " ".join(argv if argv is not None else sys.argv[1:]),
            "machine": {"cpu_count": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform()},
            "allocator": args.allocator,
            "cases": report}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
