"""DistributedDataParallel on CPU (gloo): 2 ranks == 1 process on the combined batch; ranks stay identical."""

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

WORKER = os.path.join(os.path.dirname(__file__), "ddp_worker.py")


def run(tmp_path, world, *flags):
    tag = f"w{world}" + "".join(flags)
    out = tmp_path / tag
    out.mkdir()
    procs = [subprocess.Popen([sys.executable, WORKER, "--rank", str(r), "--world", str(world),
                               "--init", str(tmp_path / f"init-{tag}"), "--out", str(out), *flags],
                              stderr=subprocess.PIPE, text=True) for r in range(world)]
    for p in procs:
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, err[-3000:]
    states = [load_file(out / f"rank{r}.safetensors") for r in range(world)]
    comm = [json.loads((out / f"rank{r}.json").read_text())["comm_bytes"] for r in range(world)]
    return states, comm


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ddp")
    return {
        "single": run(tmp, 1, "--fp32"),
        "lowrank": run(tmp, 2, "--fp32"),
        "full": run(tmp, 2, "--fp32", "--reduce", "full"),
        "int8": run(tmp, 2),
    }


def assert_identical(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.mark.parametrize("name", ["lowrank", "full", "int8"])
def test_ranks_hold_identical_weights(runs, name):
    states, comm = runs[name]
    assert_identical(states[0], states[1])
    assert comm[0] == comm[1] > 0


@pytest.mark.parametrize("name", ["lowrank", "full"])
def test_two_ranks_match_one_process_on_the_combined_batch(runs, name):
    (single,), _ = runs["single"]
    ranks, _ = runs[name]
    assert single.keys() == ranks[0].keys()
    for k in single:
        torch.testing.assert_close(ranks[0][k].float(), single[k].float(), atol=2e-5, rtol=1e-4, msg=k)


def test_lowrank_all_reduce_sends_fewer_bytes(runs):
    _, comm_low = runs["lowrank"]
    _, comm_full = runs["full"]
    assert comm_low[0] < 0.6 * comm_full[0]
