"""One process of the DDP test (tests/test_ddp.py) and of examples/ddp_pretrain.py-style runs.

    python tests/ddp_worker.py --rank R --world W --init FILE --out DIR [--fp32] [--reduce lowrank|full]

World size 1 trains on the whole batch without DDP; W > 1 wraps the model in DistributedDataParallel (gloo) and
gives each rank its slice. Writes the final model state (safetensors) and the optimizer's communicated bytes.
"""

import argparse
import json
import os
import sys

import torch
import torch.distributed as dist
from safetensors.torch import save_file

sys.path.insert(0, os.path.dirname(__file__))
from conftest import tiny_llama  # noqa: E402

import qgalore_fx  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rank", type=int, required=True)
    ap.add_argument("--world", type=int, required=True)
    ap.add_argument("--init", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--fp32", action="store_true")
    ap.add_argument("--reduce", default="lowrank")
    ap.add_argument("--lean", action="store_true", help="transform(..., lean=True)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    options = dict(rank=8, update_interval=2)
    if args.fp32:
        options.update(weight_bits=32, optim_bits=32, proj_bits=16, stochastic_round=False, proj_method="full")
    if args.lean:
        options["lean"] = True
    model = qgalore_fx.transform(tiny_llama(), **options)
    model.train()
    wrapped = model
    if args.world > 1:
        dist.init_process_group("gloo", init_method=f"file://{args.init}", rank=args.rank, world_size=args.world)
        wrapped = torch.nn.parallel.DistributedDataParallel(model)
    opt = qgalore_fx.optimizer(model, lr=1e-2, reduce=args.reduce)
    gen = torch.Generator().manual_seed(1)
    for _ in range(args.steps):
        batch = torch.randint(0, 128, (4, 16), generator=gen)
        per = batch.shape[0] // args.world
        ids = batch[args.rank * per:(args.rank + 1) * per]
        wrapped(input_ids=ids, labels=ids).loss.backward()
        # what gradients exist between backward and step: the projected layers' must be their 1-element anchors
        # only (DDP's reducer writes its bucket back into .grad; a full-size gradient there would undo the method)
        grads = {n: p.grad.numel() for n, p in model.named_parameters() if p.grad is not None}
        opt.step()
        opt.zero_grad()
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(state, os.path.join(args.out, f"rank{args.rank}.safetensors"))
    with open(os.path.join(args.out, f"rank{args.rank}.json"), "w") as f:
        json.dump({"comm_bytes": opt.comm_bytes, "grads": grads,
                   "projected": [n for n, _ in qgalore_fx.projected_layers(model)]}, f)
    if args.world > 1:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
