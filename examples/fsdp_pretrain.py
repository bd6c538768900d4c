"""Sharded Q-GaLore with FSDP2 in your own loop: launch with torchrun.

    torchrun --nproc-per-node 2 examples/fsdp_pretrain.py [--steps 20] [--checkpoint DIR]

The order is transform -> ``fully_shard`` each decoder block, then the root -> ``qgalore_fx.optimizer``. Every rank
draws the same global batch and trains on its slice; FSDP2 all-gathers the INT8 weights for forward and backward and
each rank updates its rows (README.md, "Sharded training (FSDP2) and distributed checkpoints"). At the end the
model and optimizer are saved with torch.distributed.checkpoint, loaded into a freshly built sharded model, and the
two evaluate alike. Uses gloo on CPU and nccl on GPU. The data is synthetic: each sequence counts up from a random
token, so the loss falls well below log(vocab) within a few steps.
"""

import argparse
import os
import shutil
import tempfile

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import transformers
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
from torch.distributed.fsdp import fully_shard

import qgalore_fx

VOCAB = 512


def build(device):
    """A tiny LLaMA, transformed, sharded, with its optimizer. Every projected weight's rows split into whole
    256-element INT8 blocks on 1, 2 or 4 ranks."""
    torch.manual_seed(0)  # the same initial model on every rank
    config = transformers.LlamaConfig(hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                                      num_attention_heads=4, vocab_size=VOCAB, tie_word_embeddings=False)
    model = qgalore_fx.transform(transformers.LlamaForCausalLM(config).to(device), rank=32, update_interval=10)
    model.train()
    for block in model.model.layers:
        fully_shard(block)
    fully_shard(model)
    return model, qgalore_fx.optimizer(model, lr=1e-2)


def global_batch(gen, batch_size, seq_len):
    """Sequences that count up (mod VOCAB) from a random start: the same on every rank (same generator)."""
    starts = torch.randint(0, VOCAB, (batch_size, 1), generator=gen)
    return (starts + torch.arange(seq_len)) % VOCAB


def mine(batch):
    return batch.tensor_split(dist.get_world_size())[dist.get_rank()]


def eval_loss(model, ids):
    """The loss over the whole batch: each rank its slice, averaged over ranks."""
    with torch.no_grad():
        loss = model(input_ids=mine(ids), labels=mine(ids)).loss.detach().reshape(1)
    dist.all_reduce(loss)
    return float(loss) / dist.get_world_size()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--batch-size", type=int, default=8, help="global, divided among the processes")
    ap.add_argument("--checkpoint", default=None, help="DCP directory (default: a temporary one)")
    args = ap.parse_args()
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    assert args.batch_size % world == 0, f"--batch-size {args.batch_size} must divide among {world} processes"
    device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")

    model, opt = build(device)
    gen = torch.Generator().manual_seed(1)
    for step in range(args.steps):
        ids = mine(global_batch(gen, args.batch_size, 64)).to(device)
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        if rank == 0 and (step % 5 == 0 or step == args.steps - 1):
            print(f"step {step:3d}  loss on rank 0's slice {loss.item():.3f}")

    held_out = global_batch(torch.Generator().manual_seed(99), args.batch_size, 64).to(device)
    before = eval_loss(model, held_out)
    path = args.checkpoint or (tempfile.mkdtemp(prefix="fsdp-ckpt-") if rank == 0 else None)  # rank 0 names it
    box = [path]
    dist.broadcast_object_list(box)  # one directory for all ranks
    path = box[0]
    model_sd, optim_sd = get_state_dict(model, opt)
    dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=path)

    fresh, fresh_opt = build(device)  # as a resumed job would: transform -> fully_shard -> optimizer -> load
    model_sd, optim_sd = get_state_dict(fresh, fresh_opt)
    state = {"model": model_sd, "optim": optim_sd}
    dcp.load(state, checkpoint_id=path)
    set_state_dict(fresh, fresh_opt, model_state_dict=state["model"], optim_state_dict=state["optim"])
    after = eval_loss(fresh, held_out)
    if rank == 0:
        print(f"{world} processes; held-out loss {before:.4f} before the save, {after:.4f} after loading "
              f"the checkpoint into a fresh model")
        codes = model.model.layers[0].mlp.gate_proj.weight_codes
        print(f"rank 0 holds {tuple(codes.to_local().shape)} of the {tuple(codes.shape)} INT8 gate_proj codes")
    dist.barrier()
    if rank == 0 and args.checkpoint is None:
        shutil.rmtree(path)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
