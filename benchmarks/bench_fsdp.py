"""FSDP2 on W CPU processes (gloo): per-rank memory and bytes on the wire of Q-GaLore against FSDP2 + AdamW.

    python benchmarks/bench_fsdp.py --preset 60m --world 2 --steps 3
    python benchmarks/bench_fsdp.py --preset 350m --world 2 --steps 2 --methods qgalore adamw single

Methods, each its own set of processes, the same LLaMA preset (:mod:`qgalore_fx.app.presets`), activation
checkpointing, the global batch ``--batch-size`` x ``--seq-len`` split over the ranks, every block and the root
wrapped in ``fully_shard``:

- ``qgalore``: ``transform(model, rank=preset's rank)`` (built on ``meta``, materialized into INT8), then
  ``fully_shard``, then ``qgalore_fx.optimizer`` with every default;
- ``adamw``: the fp32 model under ``fully_shard`` with ``MixedPrecisionPolicy(param_dtype=bfloat16,
  reduce_dtype=float32)`` (bf16 all-gathers, fp32 gradient reduce-scatters) and ``torch.optim.AdamW``;
- ``single``: Q-GaLore in one process on the whole batch (the baseline of the per-rank figures).

Reported per rank: peak RSS (VmHWM) while building and sharding and, separately, while training (the peak is
reset between the phases through ``/proc/self/clear_refs``), weights + states from ``memory_report`` (local
shards) or the parameters and AdamW state tensors, and the bytes this rank's collectives moved per step — every
``all_gather_single`` (output size), ``reduce_scatter_single`` (input size), ``all_reduce`` and ``broadcast`` —
counted by wrapping those ``torch.distributed`` functions, and of those what the projected layers reduce
themselves (``opt.comm_bytes``: R's reduce-scatter, and G's all-reduce at a refresh); the first step (every
layer's first refresh) apart from the last.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

GiB = 2**30


def _count_collectives(counter: Counter) -> None:
    import torch.distributed as dist

    def wrap(name, which):
        fn = getattr(dist, name)

        def counted(*args, **kwargs):
            t = args[which] if len(args) > which else kwargs.get(("output_tensor", "input", "tensor")[min(which, 2)])
            counter[name] += t.numel() * t.element_size()
            return fn(*args, **kwargs)

        setattr(dist, name, counted)

    wrap("all_gather_single", 0)   # output: what arrives
    wrap("reduce_scatter_single", 1)  # input: what is reduced
    wrap("all_reduce", 0)
    wrap("broadcast", 0)


def _reset_peak() -> None:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def child(args) -> None:
    import torch
    import torch.distributed as dist

    import qgalore_fx
    from qgalore_fx.app.presets import build_model, get_preset
    from qgalore_fx.memory import process_memory, set_cpu_mmap_threshold

    torch.set_num_threads(args.threads)
    set_cpu_mmap_threshold()
    world = 1 if args.method == "single" else args.world
    rank = args.rank
    if world > 1:
        dist.init_process_group("gloo", init_method=f"file://{args.init}", rank=rank, world_size=world)
    counter: Counter = Counter()
    _count_collectives(counter)
    preset = get_preset(args.preset)
    torch.manual_seed(0)
    t0 = time.perf_counter()
    if args.method == "adamw":
        model = build_model(preset, seq_len=args.seq_len)
    else:
        model = qgalore_fx.transform(build_model(preset, device="meta", seq_len=args.seq_len), rank=preset.rank)
    model.gradient_checkpointing_enable()
    model.train()
    if world > 1:
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        kw = {}
        if args.method == "adamw":
            kw["mp_policy"] = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        for block in model.model.layers:
            fully_shard(block, **kw)
        fully_shard(model, **kw)
    if args.method == "adamw":
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    else:
        opt = qgalore_fx.optimizer(model, lr=1e-3)
    build_peak = process_memory("VmHWM")
    build_s = time.perf_counter() - t0
    _reset_peak()
    gen = torch.Generator().manual_seed(1)
    per = args.batch_size // world
    steps, wire = [], []
    own = getattr(opt, "comm_bytes", None)  # what qgalore_fx's layers reduce themselves (R, G at refreshes)
    for _ in range(args.steps):
        ids = torch.randint(0, preset.vocab_size, (args.batch_size, args.seq_len), generator=gen)
        ids = ids[rank * per:(rank + 1) * per]
        counter.clear()
        t = time.perf_counter()
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
        steps.append(time.perf_counter() - t)
        if own is not None:
            counter["of which projected layers"] = opt.comm_bytes - own
            own = opt.comm_bytes
        wire.append(dict(counter))
    if args.method == "adamw":
        from qgalore_fx.sharding import local

        held = sum(local(p).numel() * p.element_size() for p in model.parameters())
        held += sum(local(t).numel() * t.element_size() for s in opt.state.values() for t in s.values()
                    if isinstance(t, torch.Tensor))
    else:
        held = qgalore_fx.memory_report(model, opt).weights_and_states
    out = {"method": args.method, "rank": rank, "world": world, "build_peak_rss": build_peak,
           "train_peak_rss": process_memory("VmHWM"), "weights_and_states": held, "build_s": build_s,
           "first_step_s": steps[0], "median_step_s": statistics.median(steps[1:]) if len(steps) > 1 else None,
           "wire_first": wire[0], "wire_steady": wire[-1]}
    Path(args.out).write_text(json.dumps(out))
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()


def run(args, method: str) -> list:
    world = 1 if method == "single" else args.world
    with tempfile.TemporaryDirectory() as tmp:
        procs = []
        for r in range(world):
            cmd = [sys.executable, __file__, "--child", "--method", method, "--rank", str(r), "--world",
                   str(args.world), "--init", os.path.join(tmp, "init"), "--out", os.path.join(tmp, f"{r}.json"),
                   "--preset", args.preset, "--steps", str(args.steps), "--batch-size", str(args.batch_size),
                   "--seq-len", str(args.seq_len), "--threads", str(args.threads)]
            procs.append(subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True))
        for p in procs:
            _, err = p.communicate()
            if p.returncode:
                raise SystemExit(f"{method} failed:\n{err[-3000:]}")
        return [json.loads(Path(tmp, f"{r}.json").read_text()) for r in range(world)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="60m")
    ap.add_argument("--world", type=int, default=2)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--methods", nargs="+", default=["single", "qgalore", "adamw"])
    ap.add_argument("--json", help="also write the results here")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--method", help=argparse.SUPPRESS)
    ap.add_argument("--rank", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--init", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(args)
    print(f"# {platform.processor() or platform.machine()}, {os.cpu_count()} cores; preset {args.preset}, "
          f"world {args.world}, batch {args.batch_size}x{args.seq_len}, {args.threads} thread(s) per rank")
    results = {}
    for method in args.methods:
        results[method] = run(args, method)
        for r in results[method]:
            steady = sum(v for k, v in r["wire_steady"].items() if not k.startswith("of which"))
            first = sum(v for k, v in r["wire_first"].items() if not k.startswith("of which"))
            print(f"{method:8s} rank {r['rank']}/{r['world']}: build peak {r['build_peak_rss'] / GiB:6.2f} GiB, "
                  f"train peak {r['train_peak_rss'] / GiB:6.2f} GiB, weights+states "
                  f"{r['weights_and_states'] / GiB:6.3f} GiB, wire/step {steady / 2**20:9.1f} MiB "
                  f"(first step {first / 2**20:9.1f} MiB) {r['wire_steady']}, "
                  f"step {r['median_step_s'] or r['first_step_s']:.2f} s", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
