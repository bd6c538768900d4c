"""``qgalore-fx pretrain --save-every / --resume``: a run SIGKILLed after a checkpoint and resumed ends with
exactly the numbers of a run that never stopped."""

import dataclasses
import json
import os
import signal
import subprocess
import sys

import pytest
from test_checkpoint import assert_same
from test_cli import SMALL_RUN, write_corpus

from qgalore_fx.app import cli
from qgalore_fx.app import train as train_lib
from qgalore_fx.checkpoint import read_checkpoint

WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "pretrain_worker.py")
TIMINGS = ("tokens_per_s", "elapsed_s")  # wall-clock figures in metrics.jsonl; everything else must match


pytestmark = pytest.mark.usefixtures("one_thread", "no_stray_log_handlers")  # conftest.py


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("QGALORE_FX_CACHE", str(tmp_path / "cache"))  # the worker process inherits it
    return tmp_path / "cache"


@pytest.fixture
def corpus_dir(tmp_path):
    return write_corpus(tmp_path / "corpus")


def pretrain_args(corpus_dir, run_dir, *extra):
    # rank 8 with a refresh every 4 steps: several refreshes (and adaptive intervals) before and after the kill
    return ["pretrain", *SMALL_RUN, "--steps", "20", "--eval-every", "10", "--log-every", "3", "--threads", "1",
            "--rank", "8", "--update-interval", "4", "--corpus", str(corpus_dir), "--run-dir", str(run_dir), *extra]


def metrics(run_dir):
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(line).items() if k not in TIMINGS} for line in lines]


def summary(run_dir):
    return json.loads((run_dir / "summary.json").read_text())


def test_a_killed_run_resumes_to_the_numbers_of_an_uninterrupted_one(corpus_dir, cache, tmp_path, capsys):
    straight, stopped = tmp_path / "straight", tmp_path / "stopped"
    assert cli.main(pretrain_args(corpus_dir, straight)) == 0

    log = (tmp_path / "worker.log").open("w")
    proc = subprocess.Popen([sys.executable, WORKER, "13", *pretrain_args(corpus_dir, stopped, "--save-every", "5")],
                            stdout=subprocess.PIPE, stderr=log, text=True)
    try:
        line = proc.stdout.readline()  # steps 1..12 are done, the checkpoint of step 10 is the last one
        assert line.startswith("paused before step 13 "), (tmp_path / "worker.log").read_text()[-3000:]
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        log.close()
    assert proc.returncode == -signal.SIGKILL
    assert not (stopped / "summary.json").exists()
    assert [r["step"] for r in metrics(stopped)] == [3, 6, 9, 10, 12]  # it logged past its checkpoint
    assert read_checkpoint(stopped / "checkpoint")["extra"]["step"] == 10

    capsys.readouterr()
    assert cli.main(["pretrain", "--resume", str(stopped)]) == 0
    assert "final validation perplexity" in capsys.readouterr().out

    a, b = summary(straight), summary(stopped)
    assert b["val_ppl"] == a["val_ppl"] and b["final_train_loss"] == a["final_train_loss"]  # exact, not approx
    assert b["refreshes"] == a["refreshes"] > 0 and b["refresh_seconds"] > 0
    assert (a["resumed_at"], b["resumed_at"]) == ([], [10])
    assert metrics(stopped) == metrics(straight)  # every record: loss, lr, validation (step 12 logged once)
    final_a, final_b = read_checkpoint(straight / "checkpoint"), read_checkpoint(stopped / "checkpoint")
    assert_same(final_b["model"], final_a["model"], "final model")  # INT8 codes, projections, moments, counters
    assert_same(final_b["optimizer"], final_a["optimizer"], "final optimizer")
    assert final_b["extra"]["batch_generator"].equal(final_a["extra"]["batch_generator"])


@pytest.fixture
def finished_run(corpus_dir, cache, tmp_path):
    run_dir = tmp_path / "run"
    assert cli.main(["pretrain", *SMALL_RUN, "--baseline", "adamw", "--steps", "4", "--save-every", "2",
                     "--eval-every", "0", "--threads", "1", "--corpus", str(corpus_dir),
                     "--run-dir", str(run_dir)]) == 0
    return run_dir


@pytest.mark.parametrize("flags, message", [
    (["--lr", "5e-3"], "--lr 0.005 (the run recorded lr=0.001)"),
    (["--steps", "8"], "--steps 8 (the run recorded steps=4)"),
    (["--baseline", "galore"], "--baseline galore (the run recorded method='adamw')"),
    (["--seed", "1", "--batch-size", "2"], "--batch-size 2 (the run recorded batch_size=4); --seed 1"),
    (["--steps", "400"], "--steps 400 (the run recorded steps=4)"),  # the default value, given explicitly
    (["--run-dir", "elsewhere"], "--run-dir elsewhere (the run is"),
])
def test_resume_refuses_options_that_differ_from_the_recorded_ones(finished_run, flags, message, capsys,
                                                                    monkeypatch):
    monkeypatch.setattr(cli, "train", lambda *a, **k: pytest.fail("must not start training"))
    with pytest.raises(SystemExit) as exc:
        cli.main(["pretrain", "--resume", str(finished_run), *flags])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "usage: qgalore-fx pretrain" in err and "continues the run with the configuration it recorded" in err
    assert message in err


def test_resume_accepts_repeated_values_and_a_new_save_interval(finished_run, monkeypatch):
    calls = []
    monkeypatch.setattr(cli, "train", lambda config, **kwargs: calls.append((config, kwargs)))
    assert cli.main(["pretrain", "--resume", str(finished_run), "--steps", "4", "--baseline", "adamw",
                     "--device", "auto", "--save-every", "1"]) == 0
    (config, kwargs), = calls
    assert kwargs == {"resume": True} and config.save_every == 1
    assert dataclasses.replace(config, save_every=2) == train_lib.recorded_config(finished_run)


def test_resume_errors_exit_2_with_the_reason(finished_run, tmp_path, capsys):
    def error(argv):
        with pytest.raises(SystemExit) as exc:
            cli.main(argv)
        assert exc.value.code == 2
        return capsys.readouterr().err

    assert "is a finished run (it has summary.json): nothing to resume" in error(
        ["pretrain", "--resume", str(finished_run)])
    assert "has no config.json" in error(["pretrain", "--resume", str(tmp_path / "nothing")])
    fresh = tmp_path / "never-saved"  # stopped before its first checkpoint
    fresh.mkdir()
    (fresh / "config.json").write_text((finished_run / "config.json").read_text())
    assert "has no checkpoint to resume from" in error(["pretrain", "--resume", str(fresh)])
    (fresh / "config.json").write_text("{not json")
    assert "does not hold a training configuration" in error(["pretrain", "--resume", str(fresh)])


def test_a_run_killed_after_its_last_checkpoint_only_writes_its_summary(finished_run, capsys):
    first = summary(finished_run)
    (finished_run / "summary.json").unlink()
    assert cli.main(["pretrain", "--resume", str(finished_run)]) == 0
    again = summary(finished_run)
    assert again["val_ppl"] == first["val_ppl"] and again["final_train_loss"] == first["final_train_loss"]
    assert again["resumed_at"] == [4] and [r["step"] for r in metrics(finished_run)] == [4]


@pytest.mark.parametrize("method", ["qgalore", "galore", "adamw"])
def test_the_recorded_configuration_round_trips(method, tmp_path):
    config = train_lib.TrainConfig(method=method, preset="nano", steps=7, rank=8, seed=3,
                                   run_dir=str(tmp_path)).resolved()
    recorded = {"train": config.to_json() | {"preset": "nano"}}
    (tmp_path / "config.json").write_text(json.dumps(recorded))
    again = train_lib.recorded_config(tmp_path)
    assert again.resolved().to_json() == config.to_json()
    if method != "adamw":  # adamw records no transform options (they do not apply)
        assert again == config
