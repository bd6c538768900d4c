"""One decoder layer of a preset's shape, trained with the defaults: its step time against its matmul floor, with
glibc's allocator policy and with the 1 MiB mmap threshold, and where the time goes.

    python benchmarks/bench_layer_step.py                       # LLaMA-7B's layer, rank 1024, 1 x 256, 2 threads
    python benchmarks/bench_layer_step.py --preset 1b --rank 512 --batch-size 4 --profile

A LLaMA of ``--layers`` decoder layers at the preset's hidden and intermediate sizes, with a 128-token vocabulary
(the head and embedding are then negligible: what is timed is the layers'), goes through
``qgalore_fx.transform(model, rank)`` → ``gradient_checkpointing_enable()`` (unless ``--no-checkpointing``) →
``qgalore_fx.optimizer(model, lr=1e-3)``, every option at its default. Each allocator policy runs in its own
subprocess (the threshold is process-wide): ``--warmup`` steps (the first refresh and the compilations), then
``--steps`` timed steps, of which the median forward and backward are printed.

Beside them: the layers' matmul floor (``qgalore_fx.app.floor``'s count for the projected linears and attention,
without the head) divided by the GFLOP/s this process measures for a ``[T, h] @ [h, i]`` fp32 matmul, i.e. the
step time if every multiply ran at that rate and nothing else took time. ``--profile`` adds the ten costliest
operators of one more step (``torch.profiler``, self CPU time).

A whole model's steady step is about ``num_hidden_layers`` times this layer's plus the head's and the loss's; the
7B runs of ``benchmarks/bench_memory_timeline.py`` measure that.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time


def _matmul_gflops(tokens: int, hidden: int, inter: int) -> float:
    import torch

    a, b = torch.randn(tokens, hidden), torch.randn(hidden, inter)
    a @ b
    t0, n = time.perf_counter(), 5
    for _ in range(n):
        a @ b
    return 2 * tokens * hidden * inter * n / (time.perf_counter() - t0) / 1e9


def child(args) -> dict:
    import torch
    import transformers

    import qgalore_fx
    from qgalore_fx.app.floor import projected_shapes
    from qgalore_fx.app.presets import get_preset
    from qgalore_fx.memory import set_cpu_mmap_threshold

    torch.set_num_threads(args.threads)
    if args.allocator == "threshold":
        set_cpu_mmap_threshold()
    p = get_preset(args.preset)
    cfg = transformers.LlamaConfig(hidden_size=p.hidden_size, intermediate_size=p.intermediate_size,
                                   num_hidden_layers=args.layers, num_attention_heads=p.num_attention_heads,
                                   num_key_value_heads=p.kv_heads, vocab_size=128, max_position_embeddings=args.seq_len)
    torch.manual_seed(0)
    model = qgalore_fx.transform(transformers.LlamaForCausalLM(cfg), rank=args.rank)
    if args.checkpointing:
        model.gradient_checkpointing_enable()
    model.train()
    opt = qgalore_fx.optimizer(model, lr=1e-3)
    ids = torch.randint(0, 128, (args.batch_size, args.seq_len), generator=torch.Generator().manual_seed(0))

    def step():
        t0 = time.perf_counter()
        loss = model(input_ids=ids, labels=ids).loss
        t1 = time.perf_counter()
        loss.backward()
        opt.step()
        opt.zero_grad()
        return t1 - t0, time.perf_counter() - t1

    for _ in range(args.warmup):
        step()
    times = [step() for _ in range(args.steps)]
    top = []
    if args.profile:
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU]) as prof:
            step()
        events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)[:10]
        top = [(e.key[:60], e.self_cpu_time_total / 1e6, e.count) for e in events]
    # the floor of the layers (per qgalore_fx.app.floor: the projected linears and attention, no head)
    T = args.batch_size * args.seq_len
    passes = 4 if args.checkpointing else 3
    shapes = projected_shapes(p)[:7] * args.layers
    flops = sum(2 * m * n * T * (passes - 1) + 2 * min(args.rank, m, n) * T * (m + n)
                + 2 * m * n * min(args.rank, m, n) for m, n in shapes)
    flops += 4 * args.seq_len * p.hidden_size * T * passes * args.layers
    gflops = _matmul_gflops(T, p.hidden_size, p.intermediate_size)
    return {"allocator": args.allocator, "forward_s": statistics.median(t[0] for t in times),
            "backward_s": statistics.median(t[1] for t in times), "floor_s": flops / gflops / 1e9,
            "matmul_gflops": gflops, "top": top}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="7b")
    ap.add_argument("--rank", type=int, default=1024)
    ap.add_argument("--layers", type=int, default=1)
    ap.add_argument("--batch-size", type=int, default=1)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no-checkpointing", dest="checkpointing", action="store_false")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--allocators", nargs="+", choices=("glibc", "threshold"), default=["glibc", "threshold"])
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--out", help="write the rows as JSON here")
    ap.add_argument("--_child", dest="allocator", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.allocator:
        print(json.dumps(child(args)))
        return 0
    rows = []
    for allocator in args.allocators:
        cmd = [sys.executable, __file__, *(argv if argv is not None else sys.argv[1:]), "--_child", allocator]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
        rows.append(json.loads(out.strip().splitlines()[-1]))
    print(f"{args.preset} x {args.layers} layer(s), rank {args.rank}, {args.batch_size} x {args.seq_len}, "
          f"{args.threads} threads, checkpointing {'on' if args.checkpointing else 'off'}")
    print("| allocator | forward s | backward s | step s | floor s | step / floor | matmul GFLOP/s |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        step = r["forward_s"] + r["backward_s"]
        print(f"| {r['allocator']} | {r['forward_s']:.2f} | {r['backward_s']:.2f} | {step:.2f} | {r['floor_s']:.2f} | "
              f"{step / r['floor_s']:.2f} | {r['matmul_gflops']:.0f} |")
    for r in rows:
        if r["top"]:
            print(f"\n{r['allocator']}: self CPU time of one profiled step")
            for name, seconds, count in r["top"]:
                print(f"  {seconds:7.3f} s  {count:5d}x  {name}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"command": "python benchmarks/bench_layer_step.py " + " ".join(argv or sys.argv[1:]),
                       "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
