"""8-bit Adam moments on a real embedding-gradient stream, against fp32 Adam.

Run: ``.venv/bin/python benchmarks/bench_moments.py --threads 1``
(``--steps``, ``--seed``; ``--write-test-data`` also rewrites the test fixture
``tests/data/embedding_grads.pt``). Results: stdout and
``benchmarks/results/moments-embedding.json``.

It trains the ``tiny`` preset with ``qgalore-fx pretrain``'s own loop
(:func:`qgalore_fx.app.train.train`, default options) and records the gradient
of the token embedding ([8192, 256], one 256-element block per row) at every
step. The recorded stream is then replayed, from zero moments, through:

* ``fp32``: the torch reference with fp32 moments (= ``torch.optim.Adam``);
* ``8bit``: the torch reference with 8-bit moments, as ``qgalore_fx.optimizer``'s
  AdamW group runs it;
* ``8bit-no-floor``: the same with the zero-code floor of positive second
  moments switched off (the behaviour before it existed);
* ``bitsandbytes``: bitsandbytes' CPU optimizer kernel on the same 8-bit state
  (``tests/adam_peers.py``, ``backend="bitsandbytes"``).

Adam's direction does not depend on the parameter, so the replay compares the
directions N (moves in units of lr): the largest single-step move, and the
error of the total movement ``|ΣN - ΣN_fp32| / |ΣN_fp32|`` over the rows that
received a gradient.

``--write-test-data`` stores 16 rows of the stream for
``tests/test_moments.py``: the 8 rows where ``8bit-no-floor`` made its largest
moves and 8 other rows that received a gradient (seeded choice), in bf16
(the replay in the test uses those bf16 values, so the rounding does not
matter), sparsely: only the (step, row) pairs that are not all zero.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
from unittest import mock

import torch

import qgalore_fx.app.train as train_lib
from qgalore_fx.kernels import adam8bit as A

ROOT = pathlib.Path(__file__).resolve().parents[1]
TEST_DATA = ROOT / "tests" / "data" / "embedding_grads.pt"
sys.path.insert(0, str(ROOT / "tests"))
from adam_peers import adam_direction  # noqa: E402  (the library's reference and bitsandbytes' kernel)


def record_embedding_grads(steps: int, seed: int, threads: int) -> list[torch.Tensor]:
    """The token embedding's gradient at each step of a default tiny-preset Q-GaLore run (fp32, on the CPU)."""
    grads: list[torch.Tensor] = []
    build = train_lib.build_optimizer

    def build_and_hook(model, config, shard=None):
        model, optimizer = build(model, config, shard=shard)
        emb = model.get_input_embeddings().weight
        emb.register_post_accumulate_grad_hook(lambda p: grads.append(p.grad.detach().float().clone()))
        return model, optimizer

    cfg = train_lib.TrainConfig(preset="tiny", steps=steps, eval_every=0, threads=threads, seed=seed,
                                run_dir=str(ROOT / "runs" / f"bench-moments-{steps}-{seed}"))
    with mock.patch.object(train_lib, "build_optimizer", build_and_hook):
        import shutil

        shutil.rmtree(cfg.run_dir, ignore_errors=True)
        train_lib.train(cfg, verbose=False)
    return grads


def replay(grads, bits: int, backend: str = "torch", floor: bool = True) -> torch.Tensor:
    """The directions N of every step, [steps, *shape], from zero moments."""
    shape = grads[0].shape
    state = A.AdamState.zeros(shape, bits=bits)
    out = torch.empty((len(grads), *shape))
    patch = (mock.patch.object(A, "_floor_positive_codes", lambda codes, positive: codes) if not floor
             else mock.patch.object(A, "_floor_positive_codes", A._floor_positive_codes))
    with patch:
        for t, g in enumerate(grads, 1):
            out[t - 1] = adam_direction(g, state, t, backend=backend)
    return out


def compare(n: torch.Tensor, ref: torch.Tensor, rows: torch.Tensor) -> dict:
    total, total_ref = n.sum(0)[rows], ref.sum(0)[rows]
    return {
        "max_move_lr": float(n.abs().max()),
        "total_movement_error": float((total - total_ref).norm() / total_ref.norm()),
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--write-test-data", action="store_true")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    grads = record_embedding_grads(args.steps, args.seed, args.threads)
    touched = torch.stack([g.abs().amax(1) for g in grads]).amax(0) > 0  # rows that ever got a gradient
    runs = {
        "fp32": replay(grads, 32),
        "8bit": replay(grads, 8),
        "8bit-no-floor": replay(grads, 8, floor=False),
        "bitsandbytes": replay(grads, 8, backend="bitsandbytes"),
    }
    result = {name: compare(n, runs["fp32"], touched) for name, n in runs.items()}
    result["rows_with_gradient"] = int(touched.sum())
    result["steps"] = args.steps
    result["command"] = " ".join(["benchmarks/bench_moments.py", *(argv if argv is not None else sys.argv[1:])])
    print(json.dumps(result, indent=2))
    (ROOT / "benchmarks" / "results").mkdir(parents=True, exist_ok=True)
    (ROOT / "benchmarks" / "results" / "moments-embedding.json").write_text(json.dumps(result, indent=1) + "\n")

    if args.write_test_data:
        worst = runs["8bit-no-floor"].abs().amax((0, 2))
        worst[~touched] = -1
        bad = worst.topk(8).indices
        gen = torch.Generator().manual_seed(0)
        others = touched.nonzero().flatten()
        others = others[~torch.isin(others, bad)]
        others = others[torch.randperm(others.numel(), generator=gen)[:8]]
        rows = torch.cat([bad, others])
        stream = torch.stack([g[rows] for g in grads]).to(torch.bfloat16)  # [steps, 16, 256]
        nonzero = (stream != 0).any(-1)  # [steps, 16]
        TEST_DATA.parent.mkdir(parents=True, exist_ok=True)
        torch.save({
            "shape": torch.tensor(list(stream.shape)),
            "index": nonzero.nonzero().to(torch.int16),  # (step, row) pairs
            "values": stream[nonzero].clone(),  # [pairs, 256] bf16
            "rows": rows.to(torch.int32),
            "command": " ".join(["benchmarks/bench_moments.py", *(argv if argv is not None else sys.argv[1:])]),
        }, TEST_DATA)
        print(f"wrote {TEST_DATA} ({TEST_DATA.stat().st_size} bytes, {int(nonzero.sum())} non-zero rows of "
              f"{nonzero.numel()})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
