"""``torchrun --nproc-per-node 2 -m qgalore_fx pretrain``: the main job sharded with FSDP2 over two gloo processes.

One run directory written once (rank 0), the validation loss over all windows, and distributed checkpoints: a run
whose processes are SIGKILLed inside the save of step 4 (the DCP files written, not yet recorded as the latest)
resumes from step 2 and ends with exactly the numbers, weights and optimizer state of a run that never stopped; on
4 processes it resumes too (DCP reshards), agreeing up to the order of sums.
"""

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
from test_cli import write_corpus

from qgalore_fx.app import cli

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("no_stray_log_handlers")]

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORKER = os.path.join(ROOT, "tests", "pretrain_worker.py")
TIMINGS = ("tokens_per_s", "elapsed_s")  # wall-clock figures in metrics.jsonl; everything else must match
# tiny: every projected layer splits into whole INT8 blocks and 8-bit moment blocks on 2 ranks
RUN = ["--preset", "tiny", "--batch-size", "4", "--seq-len", "32", "--vocab-size", "300", "--eval-batches", "1",
       "--device", "cpu", "--threads", "1", "--steps", "6", "--eval-every", "3", "--log-every", "2",
       "--save-every", "2"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("pretrain-distributed")
    env = dict(os.environ, QGALORE_FX_REFERENCE="1", OMP_NUM_THREADS="1", QGALORE_FX_CACHE=str(tmp / "cache"),
               PYTHONPATH=os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]))
    return {"tmp": tmp, "env": env, "corpus": str(write_corpus(tmp / "corpus"))}


def torchrun(setup, *args, script=("-m", "qgalore_fx"), processes=2, **popen):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(processes), *script, *args]
    return subprocess.Popen(cmd, env=setup["env"], cwd=setup["tmp"], text=True, **popen)


def run_to_end(setup, *args, processes=2):
    proc = torchrun(setup, *args, processes=processes, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-4000:]
    return out


@pytest.fixture(scope="module")
def straight(setup):
    run_dir = setup["tmp"] / "straight"
    out = run_to_end(setup, "pretrain", *RUN, "--corpus", setup["corpus"], "--run-dir", str(run_dir))
    return run_dir, out


def metrics(run_dir):
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(line).items() if k not in TIMINGS} for line in lines]


def summary(run_dir):
    return json.loads((run_dir / "summary.json").read_text())


def final_state(run_dir):
    """The final distributed checkpoint, gathered into one process: model and optimizer tensors by key."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    name = (run_dir / "dcp" / "latest").read_text().strip()
    out = run_dir / "final.pt"
    dcp_to_torch_save(run_dir / "dcp" / name, out)
    flat = {}

    def walk(prefix, value):
        if isinstance(value, dict):
            for k, v in value.items():
                walk(f"{prefix}.{k}", v)
        elif isinstance(value, torch.Tensor):
            flat[prefix] = value

    walk("", torch.load(out, weights_only=False))
    return flat


def test_two_processes_write_one_run_directory(straight):
    run_dir, out = straight
    s = summary(run_dir)
    assert s["world_size"] == 2 and math.isfinite(s["val_ppl"]) and s["val_ppl"] < s["unigram_ppl"] * 5
    assert s["val_tokens"] == 2368  # every validation window once, scored by one rank or the other
    assert [r["step"] for r in metrics(run_dir)] == [2, 3, 4, 6]  # one line per record: rank 0 alone writes
    assert out.count("final validation perplexity") == 1 and "rank 0 of 2 processes" in out
    config = json.loads((run_dir / "config.json").read_text())
    assert config["distributed"] == {"world_size": 2, "backend": "gloo"}
    assert config["train"]["batch_size"] == 4  # the global batch
    assert (run_dir / "loss.png").read_bytes()[:4] == b"\x89PNG"
    assert not (run_dir / "checkpoint").exists()
    assert (run_dir / "dcp" / "latest").read_text() == "step-000006\n"
    assert sorted(p.name for p in (run_dir / "dcp").iterdir()) == ["latest", "step-000006"]  # older ones pruned


@pytest.fixture(scope="module")
def killed(setup):
    """A 2-process run SIGKILLed inside the save of step 4: the DCP files are written on every rank, the run has
    not recorded them as the latest. Tests resume copies of it."""
    stopped = setup["tmp"] / "killed"
    log = (setup["tmp"] / "killed.log").open("w")
    proc = torchrun(setup, "save:4", "pretrain", *RUN, "--corpus", setup["corpus"], "--run-dir", str(stopped),
                    script=(WORKER,), stdout=subprocess.PIPE, stderr=log, start_new_session=True)
    workers = []
    try:
        for _ in range(2):
            line = proc.stdout.readline()
            assert line.startswith("paused before step 5 (pid "), (setup["tmp"] / "killed.log").read_text()[-4000:]
            workers.append(int(line.rsplit(" ", 1)[1].rstrip(")\n")))
    finally:
        for pid in workers:  # torchrun starts each worker in a session of its own
            os.kill(pid, signal.SIGKILL)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=60)
        log.close()
    for pid in workers:  # reaped by init once the agent is gone
        for _ in range(100):
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                break
            time.sleep(0.1)
    assert not (stopped / "summary.json").exists()
    assert (stopped / "dcp" / "latest").read_text() == "step-000002\n"
    assert (stopped / "dcp" / "step-000004" / ".metadata").is_file()  # complete on disk, never recorded
    assert [r["step"] for r in metrics(stopped)] == [2, 3, 4]  # it logged past its checkpoint
    return stopped


def test_a_run_killed_inside_a_save_resumes_to_the_numbers_of_an_uninterrupted_one(setup, straight, killed, capsys):
    straight_dir, stopped = straight[0], setup["tmp"] / "resumed"
    shutil.copytree(killed, stopped)
    with pytest.raises(SystemExit) as exc:  # one process cannot continue a sharded run
        cli.main(["pretrain", "--resume", str(stopped)])
    assert exc.value.code == 2 and "resume it under torchrun" in capsys.readouterr().err

    out = run_to_end(setup, "pretrain", "--resume", str(stopped))
    assert "final validation perplexity" in out
    a, b = summary(straight_dir), summary(stopped)
    assert b["val_ppl"] == a["val_ppl"] and b["final_train_loss"] == a["final_train_loss"]  # exact, not approx
    assert (a["resumed_at"], b["resumed_at"]) == ([], [2])
    assert metrics(stopped) == metrics(straight_dir)  # every record: loss, lr, validation
    assert sorted(p.name for p in (stopped / "dcp").iterdir()) == ["latest", "step-000006"]
    final_a, final_b = final_state(straight_dir), final_state(stopped)
    assert final_a.keys() == final_b.keys() and len(final_a) > 100
    different = [k for k in final_a if not torch.equal(final_a[k], final_b[k])]
    assert not different, different[:5]  # INT8 codes, projections, 8-bit moments, AdamW states: bit for bit

    # killed after its last checkpoint: the resumed run trains nothing, keeps that checkpoint, writes its summary
    (stopped / "summary.json").unlink()
    run_to_end(setup, "pretrain", "--resume", str(stopped))
    again = summary(stopped)
    assert again["val_ppl"] == a["val_ppl"] and again["resumed_at"] == [2, 6]
    assert metrics(stopped) == metrics(straight_dir)
    assert (stopped / "dcp" / "latest").read_text() == "step-000006\n"
    kept = final_state(stopped)
    assert kept.keys() == final_a.keys() and all(torch.equal(kept[k], final_a[k]) for k in final_a)


@pytest.mark.parametrize("flags, message", [
    (["--batch-size", "5"], "--batch-size 5 with 2 processes (torchrun, WORLD_SIZE=2): the global batch of 5"),
    (["--baseline", "adamw8bit"], "--baseline adamw8bit with 2 processes"),
])
def test_what_cannot_be_sharded_exits_2_naming_the_option(flags, message, monkeypatch, capsys):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setattr(cli, "train", lambda *a, **k: pytest.fail("must not start training"))
    with pytest.raises(SystemExit) as exc:
        cli.main(["pretrain", "--preset", "tiny", "--device", "cpu", *flags])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "usage: qgalore-fx pretrain" in err and message in err


def test_a_killed_run_resumes_on_another_number_of_processes(setup, straight, killed):
    """DCP reshards the step-2 checkpoint of 2 ranks onto 4; the run then agrees with the 2-rank one up to the
    order of sums."""
    straight_dir, stopped = straight[0], setup["tmp"] / "resumed-on-4"
    shutil.copytree(killed, stopped)
    run_to_end(setup, "pretrain", "--resume", str(stopped), processes=4)
    a, b = summary(straight_dir), summary(stopped)
    assert (b["world_size"], b["resumed_at"]) == (4, [2])
    assert b["val_ppl"] == pytest.approx(a["val_ppl"], rel=1e-3)
    for x, y in zip(metrics(straight_dir), metrics(stopped), strict=True):
        assert x["step"] == y["step"] and x["lr"] == y["lr"] and y["loss"] == pytest.approx(x["loss"], rel=1e-3)
