"""Time of one training step (forward + backward + ``step`` + ``zero_grad``) per method, eager.

Run: ``.venv/bin/pytest benchmarks/bench_step.py --benchmark-enable``
(add ``--benchmark-json=out.json`` to keep the figures; on a CPU shared with other
jobs, ``OMP_NUM_THREADS=1`` gives far steadier numbers, see BENCHMARKS.md).

The model is the tests' ``tiny_llama()`` (tests/conftest.py: a 2-layer HF LLaMA,
hidden 64, intermediate 160, vocabulary 128, built from a config), on a fixed
batch of 4 x 64 random tokens; the optimizer comes from
``qgalore_fx.app.train.build_optimizer`` so each method is exactly the one
``qgalore-fx pretrain`` and ``benchmarks/compare.py`` run:

- ``adamw``: ``torch.optim.AdamW`` on every parameter (fp32);
- ``adamw8bit``: ``bitsandbytes.optim.AdamW8bit``;
- ``galore``: qgalore_fx with GaLore's switches (bf16 weights and projections, 32-bit
  Adam, no stochastic rounding, fixed interval);
- ``qgalore``: qgalore_fx with its defaults (the update runs inside backward).

Rank 16, refresh interval 200: the warm-up rounds contain the first projection
(an SVD per layer) and the timed rounds none, so this is the steady-state step
between refreshes; ``benchmarks/compare.py`` reports refresh counts and times
over a whole run. ``extra_info["ratio_to_adamw"]`` is the median against the
``adamw`` case of the same session (run the module whole, adamw first).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from qgalore_fx.app.train import TrainConfig, build_optimizer

_spec = importlib.util.spec_from_file_location(
    "_bench_step_conftest", Path(__file__).resolve().parents[1] / "tests" / "conftest.py"
)
_conftest = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_conftest)
tiny_llama = _conftest.tiny_llama

METHODS = ["adamw", "adamw8bit", "galore", "qgalore"]  # adamw first: the others' ratio refers to it
RANK = 16
BATCH, SEQ = 4, 64
_MEDIANS: dict[str, float] = {}


def _setup(method: str):
    torch.manual_seed(0)
    model = tiny_llama().train()
    cfg = TrainConfig(method=method, rank=RANK, update_interval=200).resolved()
    model, opt = build_optimizer(model, cfg)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, (BATCH, SEQ + 1), generator=g)
    return model, opt, ids[:, :-1], ids[:, 1:]


@pytest.mark.parametrize("method", METHODS)
def test_train_step(benchmark, method):
    model, opt, x, y = _setup(method)
    losses = []

    def step():
        logits = model(input_ids=x).logits
        loss = F.cross_entropy(logits.float().flatten(0, 1), y.flatten())
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.detach())

    benchmark.pedantic(step, rounds=20, iterations=1, warmup_rounds=3)
    assert losses and all(torch.isfinite(v) for v in losses)
    params = sum(p.numel() for p in tiny_llama().parameters())
    benchmark.extra_info.update(method=method, rank=RANK, batch=BATCH, seq_len=SEQ, params=params,
                                torch_threads=torch.get_num_threads())
    stats = getattr(benchmark, "stats", None)
    median = getattr(getattr(stats, "stats", None), "median", None)
    if median is None:  # --benchmark-disable: the function ran once, untimed
        return
    _MEDIANS[method] = median
    base = _MEDIANS.get("adamw")
    benchmark.extra_info["ratio_to_adamw"] = None if base is None else median / base
    if hasattr(opt, "layer_stats"):
        stats = opt.layer_stats()
        benchmark.extra_info["refreshes"] = sum(s["refresh_count"] for s in stats.values())
