"""One process of the FSDP2 tests (tests/test_fsdp.py).

    python tests/fsdp_worker.py --rank R --world W --init FILE --out DIR [options]

World size 1 without ``--fsdp`` trains the plain transformed model on the whole batch; with W ranks the model is
sharded with ``fully_shard`` (per block and the root, or ``--wrap root``) and each rank trains on its slice of the
same global batch. ``--save DIR`` writes a torch.distributed.checkpoint (model + optimizer) after the steps,
``--load DIR`` starts from one. Rank 0 writes ``result.json`` (losses, eval loss, per-rank bytes) and
``state.safetensors`` (the full model state, gathered), every rank ``rank{R}.json``.
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

GLOBAL_BATCH = 8


def build(args):
    options = dict(rank=16, update_interval=2 if args.sr else 100)
    if not args.sr:
        options["stochastic_round"] = False
    if args.lean:
        options["lean"] = True
    model = qgalore_fx.transform(tiny_llama(hidden=128, intermediate=256, vocab=256), **options)
    model.train()
    return model


def shard(model, args):
    from torch.distributed.fsdp import fully_shard

    if args.placement == "fsdp1":
        from torch.distributed.fsdp import FullyShardedDataParallel

        return FullyShardedDataParallel(model, use_orig_params=True)
    kw = dict(reshard_after_forward=not args.no_reshard)
    if args.placement == "shard1":
        from torch.distributed.tensor import Shard

        kw["shard_placement_fn"] = lambda p: Shard(1) if p.dim() == 2 and p.dtype == torch.int8 else Shard(0)
    if args.wrap == "block":
        for block in model.model.layers:
            fully_shard(block, **kw)
    fully_shard(model, **kw)
    if args.compile:  # each block compiled after sharding, as FSDP2 users do
        for block in model.model.layers:
            block.compile()


def batches(steps, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 256, (GLOBAL_BATCH, 16), generator=gen) for _ in range(steps)]


def mine(batch, rank, world):
    per = batch.shape[0] // world
    return batch[rank * per:(rank + 1) * per]


def global_loss(model, ids, rank, world):
    """The mean loss over the whole batch (each rank its slice, averaged)."""
    with torch.no_grad():
        loss = model(input_ids=mine(ids, rank, world), labels=mine(ids, rank, world)).loss.detach().reshape(1)
    if world > 1:
        dist.all_reduce(loss)
        loss /= world
    return float(loss)


def state_dicts(model, opt, full):
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    return get_state_dict(model, opt, options=StateDictOptions(full_state_dict=full, cpu_offload=full))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rank", type=int, required=True)
    ap.add_argument("--world", type=int, required=True)
    ap.add_argument("--init", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--sr", action="store_true", help="stochastic rounding on (the default of transform)")
    ap.add_argument("--fsdp", action="store_true")
    ap.add_argument("--wrap", choices=("block", "root"), default="block")
    ap.add_argument("--no-reshard", action="store_true")
    ap.add_argument("--placement", default="shard0")
    ap.add_argument("--compile", action="store_true")
    ap.add_argument("--lean", action="store_true", help="transform(..., lean=True): refused under FSDP2")
    ap.add_argument("--accum", type=int, default=1, help="micro-batches per step (accumulation_steps)")
    ap.add_argument("--save")
    ap.add_argument("--load")
    args = ap.parse_args()
    torch.set_num_threads(1)
    rank, world = args.rank, args.world
    distributed = args.fsdp or world > 1
    if distributed:
        dist.init_process_group("gloo", init_method=f"file://{args.init}", rank=rank, world_size=world)
    model = build(args)
    result = {}
    try:
        if args.fsdp:
            model = shard(model, args) or model
        opt = qgalore_fx.optimizer(model, lr=1e-2, accumulation_steps=args.accum)
    except ValueError as e:  # a set-up the library refuses: report the message
        result["error"] = str(e)
        with open(os.path.join(args.out, f"rank{rank}.json"), "w") as f:
            json.dump(result, f)
        return
    eval_ids = batches(1, seed=99)[0]
    if args.load:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import set_state_dict

        msd, osd = state_dicts(model, opt, full=False)
        sd = {"model": msd, "optim": osd}
        dcp.load(sd, checkpoint_id=args.load)
        set_state_dict(model, opt, model_state_dict=sd["model"], optim_state_dict=sd["optim"])
    result["eval_before"] = global_loss(model, eval_ids, rank, world)
    losses = []
    for ids in batches(args.steps, seed=1 if not args.load else 2):
        total = 0.0
        # micro-batch i is the same rows of the global batch whatever the world size, split over the ranks
        for micro in ids.chunk(args.accum):
            loss = model(input_ids=mine(micro, rank, world), labels=mine(micro, rank, world)).loss / args.accum
            loss.backward()
            total += float(loss.detach())
        opt.step()
        opt.zero_grad()
        losses.append(total)
    result["losses"] = losses
    result["eval_after"] = global_loss(model, eval_ids, rank, world)
    report = qgalore_fx.memory_report(model, opt)
    result["bytes"] = {k: getattr(report, k) for k in ("projected_weights", "weight_scales", "projections",
                                                          "lowrank_optimizer_state", "adamw_optimizer_state",
                                                          "unprojected_params", "accumulators")}
    result["comm_bytes"] = opt.comm_bytes
    if args.save:
        import torch.distributed.checkpoint as dcp

        msd, osd = state_dicts(model, opt, full=False)
        dcp.save({"model": msd, "optim": osd}, checkpoint_id=args.save)
    if distributed:
        msd, _ = state_dicts(model, opt, full=True)
    else:
        msd = model.state_dict()
    if rank == 0:
        save_file({k: v.contiguous() for k, v in msd.items() if isinstance(v, torch.Tensor)},
                  os.path.join(args.out, "state.safetensors"))
    with open(os.path.join(args.out, f"rank{rank}.json"), "w") as f:
        json.dump(result, f)
    if distributed:
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
