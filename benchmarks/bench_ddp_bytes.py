"""Bytes the projected layers communicate per step under DDP: all-reduce of R (low rank) vs of G (full).

    python benchmarks/bench_ddp_bytes.py [--preset 60m] [--rank 128] [--steps 6] [--update-interval 3]

Launches 2 CPU processes (gloo) per mode, trains a few steps on random tokens and reads the optimizer's own
counter of bytes sent by projected layers (all-reduces + projection broadcasts). DDP's all-reduce of the
unprojected parameters' gradients (embeddings, norms, head) is the same in both modes and listed separately.
Prints a markdown table.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile

SHAPES = {
    "tiny": dict(hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=4),
    "60m": dict(hidden_size=512, intermediate_size=1376, num_hidden_layers=8, num_attention_heads=8),
}


def worker(rank: int, args) -> None:
    import torch
    import torch.distributed as dist
    import transformers

    import qgalore_fx

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{args.init}", rank=rank, world_size=2)
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=32000, max_position_embeddings=256, tie_word_embeddings=False,
                                   **SHAPES[args.preset])
    model = qgalore_fx.transform(transformers.LlamaForCausalLM(cfg), rank=args.rank,
                                 update_interval=args.update_interval, adaptive=False)
    model.train()
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    opt = qgalore_fx.optimizer(model, lr=1e-3, reduce=args.reduce)
    gen = torch.Generator().manual_seed(rank)
    per_step = []
    for _ in range(args.steps):
        ids = torch.randint(0, 32000, (2, 64), generator=gen)
        before = opt.comm_bytes
        ddp(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
        per_step.append(opt.comm_bytes - before)
    dense = sum(p.numel() * p.element_size() for p in model.parameters() if p.numel())
    if rank == 0:
        print(json.dumps(dict(comm=opt.comm_bytes, per_step=per_step, dense_grad_bytes=dense,
                              refreshes=sum(s["refresh_count"] for s in opt.layer_stats().values()),
                              layers=len(opt.layer_stats()))))
    dist.destroy_process_group()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="60m", choices=sorted(SHAPES))
    ap.add_argument("--rank", type=int, default=128)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--update-interval", type=int, default=3)
    ap.add_argument("--reduce", default="lowrank")
    ap.add_argument("--init")
    ap.add_argument("--_rank", type=int)
    args = ap.parse_args()
    if args._rank is not None:
        worker(args._rank, args)
        return
    rows = {}
    for mode in ("full", "lowrank"):
        init = os.path.join(tempfile.mkdtemp(), "init")
        base = [sys.executable, __file__, "--preset", args.preset, "--rank", str(args.rank), "--steps",
                str(args.steps), "--update-interval", str(args.update_interval), "--reduce", mode, "--init", init]
        procs = [subprocess.Popen(base + ["--_rank", str(r)], stdout=subprocess.PIPE, text=True) for r in range(2)]
        outs = [p.communicate()[0] for p in procs]
        assert all(p.returncode == 0 for p in procs)
        rows[mode] = json.loads(outs[0].strip().splitlines()[-1])
    full = rows["full"]["comm"] / args.steps
    print(f"LLaMA-{args.preset}, rank {args.rank}, 2 ranks (gloo), {args.steps} steps, refresh every "
          f"{args.update_interval} steps ({rows['lowrank']['refreshes'] // rows['lowrank']['layers']} refreshes "
          "per layer)\n")
    print("| projected-layer reduction | refresh step | other steps | mean over the run | mean ratio to full |")
    print("|---|---|---|---|---|")
    for mode in ("full", "lowrank"):
        steps = rows[mode]["per_step"]
        per = rows[mode]["comm"] / args.steps
        print(f"| {mode} | {max(steps) / 2**20:.2f} MiB | {min(steps) / 2**20:.2f} MiB | {per / 2**20:.2f} MiB | "
              f"{per / full:.3f}x |")
    print(f"\nDDP's own all-reduce of the unprojected parameters' gradients: "
          f"{rows['lowrank']['dense_grad_bytes'] / 2**20:.2f} MiB/step in both modes.")


if __name__ == "__main__":
    main()
