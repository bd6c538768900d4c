"""The smallest complete Q-GaLore training loop: a LLaMA built from a config, random tokens, any scheduler.

    python examples/plain_loop.py [--steps 50] [--compile]

Nothing here is specific to qgalore_fx except the two lines marked (1) and (2).
"""

import argparse

import torch
import transformers

import qgalore_fx


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--rank", type=int, default=32)
    ap.add_argument("--compile", action="store_true", help="run the model under torch.compile")
    args = ap.parse_args()
    torch.manual_seed(0)
    config = transformers.LlamaConfig(hidden_size=128, intermediate_size=344, num_hidden_layers=2,
                                      num_attention_heads=4, vocab_size=512, tie_word_embeddings=False)
    model = transformers.LlamaForCausalLM(config)
    model = qgalore_fx.transform(model, rank=args.rank, update_interval=20)       # (1)
    opt = qgalore_fx.optimizer(model, lr=1e-2)                                   # (2)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=args.steps)
    print(qgalore_fx.explain(model))
    step_fn = torch.compile(model) if args.compile else model
    model.train()
    # a learnable toy language: each token is followed by (token * 7 + 3) mod 512
    for step in range(args.steps):
        start = torch.randint(0, 512, (8, 1))
        ids = torch.cat([start] + [start * 0] * 31, dim=1)
        for t in range(1, 32):
            ids[:, t] = (ids[:, t - 1] * 7 + 3) % 512
        loss = step_fn(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        sched.step()
        if step % 10 == 0 or step == args.steps - 1:
            print(f"step {step:4d}  loss {loss.item():.3f}  lr {sched.get_last_lr()[0]:.2e}")
    print("skipped updates:", opt.skipped_updates)


if __name__ == "__main__":
    main()
