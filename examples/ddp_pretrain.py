"""Data-parallel Q-GaLore with torch.distributed: launch with torchrun.

    torchrun --nproc_per_node 2 examples/ddp_pretrain.py [--steps 20]

The model is wrapped in DistributedDataParallel as usual. Projected layers average their *low-rank* gradient across
ranks inside backward (rank/min(m, n) of the bytes of the full gradient; the full gradient only on subspace
refreshes, whose projection rank 0 broadcasts), so every rank keeps identical INT8 weights. Uses gloo on CPU and
nccl on GPU.
"""

import argparse
import os

import torch
import torch.distributed as dist
import transformers

import qgalore_fx


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--rank", type=int, default=32)
    ap.add_argument("--batch-size", type=int, default=8, help="per process")
    args = ap.parse_args()
    cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if cuda else torch.device("cpu")
    torch.manual_seed(0)  # the same initial model on every rank
    config = transformers.LlamaConfig(hidden_size=128, intermediate_size=344, num_hidden_layers=2,
                                      num_attention_heads=4, vocab_size=512, tie_word_embeddings=False)
    model = qgalore_fx.transform(transformers.LlamaForCausalLM(config).to(device), rank=args.rank,
                                 update_interval=10)
    model.train()
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    opt = qgalore_fx.optimizer(model, lr=1e-2)  # picks up the default process group
    gen = torch.Generator().manual_seed(1000 + rank)  # each rank its own data
    for step in range(args.steps):
        ids = torch.randint(0, 512, (args.batch_size, 64), generator=gen).to(device)
        loss = ddp(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        if rank == 0 and (step % 5 == 0 or step == args.steps - 1):
            print(f"step {step:3d}  loss {loss.item():.3f}  low-rank bytes communicated {opt.comm_bytes:,}")
    codes = model.model.layers[0].mlp.gate_proj.weight_codes
    gathered = [torch.empty_like(codes) for _ in range(world)]
    dist.all_gather(gathered, codes)
    if rank == 0:
        print("INT8 weights identical on all ranks:", all(torch.equal(g, codes) for g in gathered))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
