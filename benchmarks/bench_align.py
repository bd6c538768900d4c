"""Which alignment of a refreshed projection trains best: per-vector sign, Procrustes, or none.

    .venv/bin/python benchmarks/bench_align.py sign          # then procrustes, none (one run each)

One ``qgalore-fx pretrain`` job per call, with ``benchmarks/compare.py``'s set-up (``tiny`` preset, vocabulary
8192, 300 steps of 8 x 128 tokens, rank 64, refresh interval 30, lr 1e-2 / rest 1e-3, seed 0, one thread) and
every Q-GaLore default except ``align`` (``QGaLoreConfig.align``). Prints the final validation perplexity and
the refresh count; the run directory is ``/tmp/bench-align-<align>``.
"""

import sys

import torch

from qgalore_fx.app.train import TrainConfig, train

align = sys.argv[1] if len(sys.argv) > 1 else "sign"
torch.set_num_threads(1)
cfg = TrainConfig(preset="tiny", method="qgalore", steps=300, batch_size=8, lr=0.01, seed=0, threads=1,
                  update_interval=30, eval_every=50, eval_batches=8, log_every=1, vocab_size=8192, rank=64,
                  align=align, run_dir=f"/tmp/bench-align-{align}")
result = train(cfg, verbose=False)
summary = result.to_json()
print(f"align={align}: val ppl {summary['val_ppl']:.2f}, refreshes {summary.get('refreshes')}")
