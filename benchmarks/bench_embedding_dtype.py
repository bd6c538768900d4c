"""Quality of the embedding and head stored in bf16 (stochastic rounding) against fp32: one pre-training run each.

    python benchmarks/bench_embedding_dtype.py --steps 300 --threads 1

Each variant runs ``qgalore_fx.app.train.train`` (the loop behind ``qgalore-fx pretrain``) with the
``tiny`` preset and ``compare.py``'s set-up (300 steps of 8 x 128 tokens, rank 64, interval 30, seed 0), its
optimizer built by ``qgalore_fx.optimizer(model, ..., rest_in_backward=True)``; variant ``bf16`` stores
``model.get_input_embeddings()`` and ``get_output_embeddings()`` in bf16 first. The tiny preset's embedding
(8192 x 256) is below ``qgalore_fx.fused_rest.FUSED_MIN_NUMEL``, so this script lowers that threshold to route
both weights through the row-chunked backward update, as LLaMA-7B's 32000 x 4096 ones are by default.
Printed: final validation perplexity per variant; the default optimizer (``rest_in_backward=False``, fp32)
is ``compare.py``'s ``qgalore`` row.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--variants", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16"])
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    import qgalore_fx
    from qgalore_fx import fused_rest
    from qgalore_fx.app import train as train_mod
    from qgalore_fx.app import data as data_lib

    fused_rest.FUSED_MIN_NUMEL = 1
    corpus = data_lib.prepare_corpus(None, 8192)
    rows = []
    for variant in args.variants:
        def build_optimizer(model, config, shard=None, variant=variant):
            model = qgalore_fx.transform(model, **config.transform_kwargs())
            if shard is not None:
                model = shard(model)
            if variant == "bf16":
                model.get_input_embeddings().to(torch.bfloat16)
                model.get_output_embeddings().to(torch.bfloat16)
            opt = qgalore_fx.optimizer(model, lr=config.lr, weight_decay=config.weight_decay,
                                       betas=tuple(config.betas), rest_lr=config.rest_lr, rest_in_backward=True)
            assert len(opt._fused_modules) == 2
            return model, opt

        cfg = train_mod.TrainConfig(preset="tiny", method="qgalore", steps=args.steps, batch_size=8, seq_len=128,
                                    lr=train_mod.DEFAULT_LR["qgalore"], update_interval=30, seed=0,
                                    threads=args.threads, eval_every=max(1, args.steps // 6), vocab_size=8192,
                                    run_dir=str(Path(tempfile.mkdtemp()) / variant))
        original = train_mod.build_optimizer
        train_mod.build_optimizer = build_optimizer
        t0 = time.perf_counter()
        try:
            result = train_mod.train(cfg, corpus=corpus, verbose=False)
        finally:
            train_mod.build_optimizer = original
        row = {"variant": variant, "val_ppl": round(result.val_ppl, 2), "seconds": round(time.perf_counter() - t0)}
        print(json.dumps(row), flush=True)
        rows.append(row)
    if args.out:
        Path(args.out).write_text(json.dumps({"command": "python benchmarks/bench_embedding_dtype.py "
                                              + " ".join(argv if argv is not None else sys.argv[1:]),
                                              "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
