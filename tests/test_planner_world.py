"""``plan_sharded`` / ``qgalore-fx memory --world-size``: one rank's bytes of an FSDP2 run.

The weights + states predicted on the meta device are checked against what ``memory_report`` counts on each of two
real gloo ranks (``tests/fsdp_worker.py``, the model and options of tests/test_fsdp.py); the CLI's figures for
LLaMA-2 70B on 8 ranks against the shapes' arithmetic.
"""

import io
import json
import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))
from conftest import tiny_llama  # noqa: E402
from test_fsdp import finish, launch  # noqa: E402

from qgalore_fx.app.planner import ShardingError, add_memory_arguments, plan_sharded, run_memory  # noqa: E402
from qgalore_fx.memory import GiB  # noqa: E402


def _run_cli(*argv):
    import argparse

    args = add_memory_arguments(argparse.ArgumentParser()).parse_args(list(argv))
    out = io.StringIO()
    return run_memory(args, out), out.getvalue()


@pytest.mark.slow
def test_weights_and_states_per_rank_match_a_two_rank_fsdp2_run(tmp_path):
    measured = finish(launch(tmp_path, "w2", 2, "--steps", "1"))["ranks"]
    # the worker's model and transform options (tests/fsdp_worker.py: build)
    config = tiny_llama(hidden=128, intermediate=256, vocab=256).config
    plan = plan_sharded(config, 2, rank=16, update_interval=100, stochastic_round=False, runtime=0)
    for r, result in enumerate(measured):
        b = result["bytes"]
        held = sum(b[k] for k in ("projected_weights", "weight_scales", "unprojected_params", "projections",
                                  "lowrank_optimizer_state", "adamw_optimizer_state", "accumulators"))
        assert plan.weights_and_states == pytest.approx(held, rel=0.05), (r, plan.to_dict(), b)
        assert plan.projections == b["projections"]  # replicated: the same bytes on every rank


def test_cli_plans_70b_on_8_ranks():
    rc, text = _run_cli("--world-size", "8", "--preset", "70b", "--json")
    assert rc == 0
    (row,) = json.loads(text)
    # INT8 codes + fp32 scales (one per 256 elements) of the projected layers, 1/8 each, and 1/8 of the fp32
    # embedding, head and norms: LLaMA-2 70B with grouped-query k/v projections [1024, 8192]
    h, i, L, V = 8192, 28672, 80, 32000
    projected = L * (2 * h * h + 2 * 1024 * h + 3 * i * h)
    unprojected = 2 * V * h + (2 * L + 1) * h
    assert row["weights"] == projected * (1 + 4 / 256) / 8 + unprojected * 4 / 8
    assert 8.0 * GiB < projected * (1 + 4 / 256) / 8 < 8.2 * GiB  # "70B INT8 weights / 8 ≈ 8.1 GiB"
    assert row["world_size"] == 8 and row["batch_size"] == 8  # one sequence per rank by default
    # states: 1/8 of the 8-bit moments of R (2 bytes per element of [m, r] or [r, n] plus absmax) and of the
    # AdamW group's; projections INT4 on every rank (half a byte per element of P plus scales)
    assert 1 * GiB < row["states"] < 4 * GiB
    assert 1.5 * GiB < row["projections"] < 2 * GiB
    # the transient peak adds FSDP2's gathered root group (fp32 embedding + head, 1.95 GiB) and two blocks
    blocks = 2 * projected / L * (1 + 4 / 256)
    assert row["gathered"] >= 2 * V * h * 4 + blocks
    assert row["transient"] > row["gathered"] and 15 * GiB < row["total"] < 30 * GiB
    rc, text = _run_cli("--world-size", "8", "--preset", "70b")
    assert "70b on 8 ranks (FSDP2), per rank" in text and "total per rank" in text


def test_a_preset_that_cannot_split_is_named_not_planned(capsys):
    with pytest.raises(ShardingError, match=r"mlp.gate_proj' \[5461, 2048\] cannot be sharded on 2 ranks"):
        plan_sharded("1b", 2, runtime=0)
    rc, _ = _run_cli("--world-size", "2", "--preset", "1b")
    assert rc == 2 and "cannot be sharded on 2 ranks" in capsys.readouterr().err


def test_per_rank_shares_shrink_with_the_world_size():
    one, four = (plan_sharded("60m", w, runtime=0) for w in (1, 4))
    assert four.projections == one.projections  # INT4 projections are replicated
    assert four.weights == pytest.approx(one.weights / 4, rel=0.01)
    assert four.states == pytest.approx(one.states / 4, rel=0.05)  # norms' small fp32 moments stay whole
    with pytest.raises(ValueError, match="must divide by world_size"):
        plan_sharded("60m", 4, batch_size=6, runtime=0)
