"""Training runs shared by tests/test_checkpoint.py and the subprocesses it starts.

The tests import the builders below; run as a script this file is the other process::

    python tests/resume_worker.py resume --ckpt DIR --steps N --out OUT.json --final DIR2 --threads T [--wait S]
        build a fresh tiny HF LLaMA run, wait up to S seconds for DIR to appear (so the test can
        start this process while it trains the first half), load DIR, train N more steps, write
        the losses to OUT.json and the final state to the checkpoint DIR2.
    python tests/resume_worker.py loop --ckpt DIR --max-steps M --threads T
        resume from DIR if it holds a checkpoint (else start fresh), then train and save to
        DIR after every step, printing one JSON line per completed save, until step M.
        The kill test SIGKILLs it while it saves.

Both runs draw their data from the *global* torch and Python RNGs (seeded once at the start
of a fresh run), so a resumed run only matches a straight one if the checkpoint restored
the RNG states; stochastic rounding stays on, so it also has to restore the layers'
rounding counters.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time

import torch
import torch.nn as nn

import qgalore_fx
from qgalore_fx.checkpoint import CheckpointNotFoundError, load_checkpoint, save_checkpoint

VOCAB = 128


def lr_lambda(step: int) -> float:
    return 1.0 / (1.0 + 0.1 * step)


def seed_everything(seed: int = 0) -> None:
    torch.manual_seed(seed)
    random.seed(seed)


# ----------------------------------------------------------------------------- tiny HF LLaMA (resume test)
def build_llama(rank: int = 8):
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from conftest import tiny_llama

    model = qgalore_fx.transform(tiny_llama(vocab=VOCAB), rank=rank, update_interval=3)
    opt = qgalore_fx.optimizer(model, lr=1e-2)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda)
    return model, opt, sched


def llama_step(model, opt, sched) -> float:
    """One training step on a batch drawn from the global RNGs (length from `random`, ids from torch)."""
    length = random.choice([12, 16])
    ids = torch.randint(0, VOCAB, (2, length))
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    sched.step()
    return loss.item()


# ----------------------------------------------------------------------------- plain blocks model (kill test)
class Blocks(nn.Module):
    """Embedding, residual MLP blocks in an nn.ModuleList (traced regions), LayerNorm, head."""

    def __init__(self, vocab: int = 256, dim: int = 64, hidden: int = 256, depth: int = 3):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim)) for _ in range(depth))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, vocab)

    def forward(self, ids):
        h = self.embed(ids)
        for block in self.blocks:
            h = h + block(h)
        return self.head(self.norm(h))


def build_blocks():
    torch.manual_seed(0)
    model = qgalore_fx.transform(Blocks(), rank=8, update_interval=3)
    opt = qgalore_fx.optimizer(model, lr=1e-2)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda)
    return model, opt, sched


def blocks_step(model, opt, sched) -> float:
    ids = torch.randint(0, 256, (4, random.choice([8, 12])))
    logits = model(ids[:, :-1])
    loss = nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    sched.step()
    return loss.item()


# ----------------------------------------------------------------------------- the subprocess
def _resume(args) -> None:
    model, opt, sched = build_llama()
    deadline = time.monotonic() + args.wait
    while not os.path.isdir(args.ckpt) and time.monotonic() < deadline:  # saves appear atomically (a rename)
        time.sleep(0.05)
    extra = load_checkpoint(args.ckpt, model, opt, sched)
    losses = [llama_step(model, opt, sched) for _ in range(args.steps)]
    save_checkpoint(args.final, model, opt, sched, step=extra["step"] + args.steps)
    with open(args.out, "w") as f:
        json.dump({"start": extra["step"], "losses": losses}, f)


def _loop(args) -> None:
    model, opt, sched = build_blocks()
    seed_everything(0)
    step = 0
    try:
        step = load_checkpoint(args.ckpt, model, opt, sched)["step"]
    except CheckpointNotFoundError:
        pass
    print(json.dumps({"resumed": step}), flush=True)
    while step < args.max_steps:
        blocks_step(model, opt, sched)
        step += 1
        t0 = time.perf_counter()
        save_checkpoint(args.ckpt, model, opt, sched, step=step)
        print(json.dumps({"saved": step, "seconds": time.perf_counter() - t0}), flush=True)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="mode", required=True)
    resume = sub.add_parser("resume")
    resume.add_argument("--ckpt", required=True)
    resume.add_argument("--steps", type=int, required=True)
    resume.add_argument("--out", required=True)
    resume.add_argument("--final", required=True)
    resume.add_argument("--wait", type=float, default=0.0, help="seconds to wait for --ckpt to appear")
    loop = sub.add_parser("loop")
    loop.add_argument("--ckpt", required=True)
    loop.add_argument("--max-steps", type=int, required=True)
    for p in (resume, loop):
        p.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    {"resume": _resume, "loop": _loop}[args.mode](args)


if __name__ == "__main__":
    main()
