"""qgalore_fx.checkpoint: exact resume across processes, crash safety, validation of bad checkpoints."""

import contextlib
import glob
import hashlib
import json
import math
import os
import random
import shutil
import signal
import subprocess
import sys
import time
import warnings

import numpy as np
import pytest
import torch
import torch.nn as nn
from resume_worker import Blocks, blocks_step, build_blocks, build_llama, llama_step, seed_everything

import qgalore_fx
from qgalore_fx.checkpoint import (
    MARKER,
    METADATA,
    MODEL_FILE,
    STATE_FILE,
    CheckpointCorruptError,
    CheckpointError,
    CheckpointMismatchError,
    CheckpointNotFoundError,
    CheckpointVersionError,
    CheckpointWriteError,
    load_checkpoint,
    read_checkpoint,
    save_checkpoint,
)

WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "resume_worker.py")
TIMING_KEYS = ("refresh_seconds",)  # wall-clock measurements, not training state


# ----------------------------------------------------------------------------- helpers
def assert_same(a, b, where="state"):
    """Exact equality of nested structures: same container types, key types, tensor dtypes and bits."""
    assert type(a) is type(b), f"{where}: {type(a).__name__} != {type(b).__name__}"
    if isinstance(a, torch.Tensor):
        assert (a.dtype, a.shape) == (b.dtype, b.shape), f"{where}: {a.dtype}{list(a.shape)}, {b.dtype}{list(b.shape)}"
        assert torch.equal(a, b), f"{where}: tensors differ"
    elif isinstance(a, dict):
        assert list(a) == list(b), f"{where}: keys {list(a)[:5]} != {list(b)[:5]}"
        for k in a:
            if k not in TIMING_KEYS:
                assert_same(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), f"{where}: length {len(a)} != {len(b)}"
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{where}.{i}")
    elif isinstance(a, float) and math.isnan(a):
        assert math.isnan(b), where
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


def snapshot(model, opt=None):
    """Deep, independent copies of the model's and optimizer's state dicts."""
    model_state = {k: v.clone() for k, v in model.state_dict().items()}  # a plain dict, like dict(state_dict())
    opt_state = None if opt is None else _clone(opt.state_dict())
    return model_state, opt_state


def _clone(obj):
    if isinstance(obj, torch.Tensor):
        return obj.clone()
    if isinstance(obj, dict):
        return {k: _clone(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_clone(v) for v in obj)
    return obj


def tree_digest(root) -> dict:
    """sha256 of every file under root (and the names of the entries next to it)."""
    out = {}
    for dirpath, _, files in os.walk(root):
        for f in files:
            p = os.path.join(dirpath, f)
            with open(p, "rb") as fh:
                out[os.path.relpath(p, root)] = hashlib.sha256(fh.read()).hexdigest()
    return out


def siblings(path) -> list:
    return sorted(glob.glob(glob.escape(str(path)) + ".tmp-*") + glob.glob(glob.escape(str(path)) + ".old-*"))


def trained_blocks(steps=2):
    model, opt, sched = build_blocks()
    seed_everything(0)
    for _ in range(steps):
        blocks_step(model, opt, sched)
    return model, opt, sched


# ----------------------------------------------------------------------------- round trip
def test_round_trip_restores_model_optimizer_scheduler_rng_and_extra(tmp_path):
    model, opt, sched = trained_blocks(steps=4)  # crosses a subspace refresh (update_interval=3)
    np.random.seed(3)
    extra = {
        "step": 4,
        "data_position": 123456789012,
        "pair": (1, 2.5),
        "nested": {"list": [1, (2, 3), None], 7: "int key", "7": "str key", "none": None, "flag": False},
        "floats": [float("nan"), float("inf"), -float("inf"), 0.1],
        "name": "run-a",
        "tensor": torch.arange(5, dtype=torch.int16),
    }
    save_checkpoint(tmp_path / "ckpt", model, opt, sched, **extra)
    expected_model, expected_opt = snapshot(model, opt)
    expected_sched = sched.state_dict()
    draws = (torch.rand(4), random.random(), np.random.rand())

    fresh, fresh_opt, fresh_sched = build_blocks()  # re-seeds the global RNG: draws would differ
    got = load_checkpoint(tmp_path / "ckpt", fresh, fresh_opt, fresh_sched)

    assert_same(got, extra, "extra")  # tuples stay tuples, int keys stay ints, NaN/inf survive
    assert_same(dict(fresh.state_dict()), expected_model, "model")
    assert_same(fresh_opt.state_dict(), expected_opt, "optimizer")
    assert fresh_sched.state_dict() == expected_sched
    assert fresh_opt.param_groups[0]["lr"] == opt.param_groups[0]["lr"]
    assert torch.equal(torch.rand(4), draws[0]) and random.random() == draws[1] and np.random.rand() == draws[2]
    for (_, a), (_, b) in zip(qgalore_fx.projected_layers(model), qgalore_fx.projected_layers(fresh)):
        assert a.stats() == {**b.stats(), "refresh_seconds": a.stats()["refresh_seconds"]}
        assert b.optimizer_link.get() is fresh_opt
        assert torch.equal(b.hparams, a.hparams)  # the restored group's values reached the layer
    # and the restored run takes the same next step as the original
    state = torch.get_rng_state(), random.getstate()
    loss_a = blocks_step(model, opt, sched)
    torch.set_rng_state(state[0]), random.setstate(state[1])
    loss_b = blocks_step(fresh, fresh_opt, fresh_sched)
    assert loss_a == loss_b
    assert_same(dict(fresh.state_dict()), dict(model.state_dict()), "model after one more step")


def test_layout_is_safetensors_and_json_only(tmp_path):
    model, opt, sched = trained_blocks(steps=1)
    path = save_checkpoint(tmp_path / "ckpt", model, opt, sched, step=1)
    assert sorted(os.listdir(path)) == sorted([METADATA, MODEL_FILE, STATE_FILE, MARKER])
    assert siblings(path) == []
    from safetensors.torch import load_file

    stored = load_file(os.path.join(path, MODEL_FILE))  # any safetensors reader sees the model under its own names
    assert stored["blocks.0.0.weight_codes"].dtype == torch.int8
    assert torch.equal(stored["blocks.0.0.weight_codes"], model.get_submodule("blocks.0.0").weight_codes)
    state_keys = load_file(os.path.join(path, STATE_FILE)).keys()
    assert "rng.torch_cpu" in state_keys
    layer = model.get_submodule("blocks.0.0")
    assert torch.equal(stored["blocks.0.0.exp_avg"], layer.exp_avg)  # the layer's moments are the model's state
    assert stored["blocks.0.0._extra_state"].dtype == torch.float64  # its host-side refresh schedule
    assert any(k.startswith("optimizer.state.") for k in state_keys)
    with open(os.path.join(path, METADATA)) as f:
        meta = json.load(f)  # strict JSON parses it
    assert meta["format_version"] == 1 and meta["config"] == qgalore_fx.rewrite.config_of(model).to_dict()
    assert meta["files"][MODEL_FILE]["bytes"] == os.path.getsize(os.path.join(path, MODEL_FILE))


def test_plain_model_with_tied_weights_and_a_torch_optimizer(tmp_path):
    def build():
        torch.manual_seed(0)
        net = Blocks(vocab=64, dim=16, hidden=32, depth=1)
        net.head.weight = net.embed.weight
        return net, torch.optim.AdamW(net.parameters(), lr=1e-2)

    net, opt = build()
    for _ in range(2):
        ids = torch.randint(0, 64, (2, 6))
        nn.functional.cross_entropy(net(ids).flatten(0, 1), ids.flatten()).backward()
        opt.step()
        opt.zero_grad()
    save_checkpoint(tmp_path / "ckpt", net, opt)
    meta = read_checkpoint(tmp_path / "ckpt")["metadata"]
    assert meta["model"]["aliases"] == {"head.weight": "embed.weight"}  # stored once
    assert meta["config"] is None
    fresh, fresh_opt = build()
    torch.nn.init.zeros_(fresh.embed.weight)
    load_checkpoint(tmp_path / "ckpt", fresh, fresh_opt)
    assert fresh.head.weight is fresh.embed.weight
    assert_same(dict(fresh.state_dict()), dict(net.state_dict()), "model")
    assert_same(fresh_opt.state_dict(), opt.state_dict(), "optimizer")


def test_scheduler_entries_that_cannot_be_stored_are_skipped(tmp_path):
    class Warmup:  # a callable object: LambdaLR puts its __dict__ in the state dict
        def __init__(self):
            self.fn = lambda s: min(1.0, (s + 1) / 10)

        def __call__(self, s):
            return self.fn(s)

    model, opt, _ = build_blocks()
    sched = torch.optim.lr_scheduler.LambdaLR(opt, Warmup())
    opt.step()
    sched.step()
    save_checkpoint(tmp_path / "ckpt", model, opt, sched)
    assert read_checkpoint(tmp_path / "ckpt")["metadata"]["scheduler"]["skipped"] == ["lr_lambdas"]
    model2, opt2, _ = build_blocks()
    sched2 = torch.optim.lr_scheduler.LambdaLR(opt2, Warmup())
    load_checkpoint(tmp_path / "ckpt", model2, opt2, sched2)
    assert sched2.last_epoch == 1 and sched2.get_last_lr() == sched.get_last_lr()


def test_bad_extra_fails_before_touching_disk(tmp_path):
    model, opt, sched = trained_blocks(steps=1)
    save_checkpoint(tmp_path / "ckpt", model, opt, sched, step=1)
    before = tree_digest(tmp_path)
    with pytest.raises(TypeError, match="extra.*'extra.loader'"):
        save_checkpoint(tmp_path / "ckpt", model, opt, sched, step=2, loader=object())
    assert tree_digest(tmp_path) == before and siblings(tmp_path / "ckpt") == []


def test_save_refuses_to_replace_a_directory_that_is_not_a_checkpoint(tmp_path):
    model, opt, sched = trained_blocks(steps=0)
    target = tmp_path / "mine"
    target.mkdir()
    (target / "notes.txt").write_text("keep me")
    with pytest.raises(CheckpointError, match="not a qgalore_fx checkpoint directory"):
        save_checkpoint(target, model, opt, sched)
    assert (target / "notes.txt").read_text() == "keep me" and siblings(target) == []


def test_missing_checkpoint_is_a_clear_error(tmp_path):
    model, opt, sched = build_blocks()
    with pytest.raises(CheckpointNotFoundError, match="no checkpoint at"):
        load_checkpoint(tmp_path / "nothing", model, opt, sched)
    with pytest.raises(FileNotFoundError):  # also a FileNotFoundError, for callers that catch that
        load_checkpoint(tmp_path / "nothing", model)


# ----------------------------------------------------------------------------- exact resume in a new process
def test_resume_in_a_new_process_is_bit_identical(tmp_path):
    """2N steps in this process vs N here + N in a fresh process: same losses, same bits.

    Data come from the global torch/Python RNGs and stochastic rounding is on, so this only
    passes if the checkpoint restores RNG states, SR counters, projections, moments, the
    refresh schedule and the LR schedule. The subprocess is started first so that its imports
    overlap with the training here; it waits for the half-way checkpoint to appear.
    """
    n = 5
    half, final, out = tmp_path / "half", tmp_path / "final", tmp_path / "out.json"
    worker = subprocess.Popen(
        [sys.executable, WORKER, "resume", "--ckpt", str(half), "--steps", str(n), "--out", str(out),
         "--final", str(final), "--threads", str(torch.get_num_threads()), "--wait", "300"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        model, opt, sched = build_llama()
        seed_everything(0)
        losses = []
        for step in range(2 * n):
            if step == n:  # saving only reads the run's state, so this run stays a straight one
                before = torch.get_rng_state(), random.getstate(), snapshot(model, opt)
                save_checkpoint(half, model, opt, sched, step=n)
                assert torch.equal(before[0], torch.get_rng_state()) and before[1] == random.getstate()
                assert_same(snapshot(model, opt), before[2], "state after save")
            losses.append(llama_step(model, opt, sched))
        log, _ = worker.communicate(timeout=300)
    finally:
        if worker.poll() is None:
            worker.kill()
            worker.wait()
    assert worker.returncode == 0, log
    with open(out) as f:
        resumed = json.load(f)
    assert resumed["start"] == n
    assert losses[n:] == resumed["losses"], (losses, resumed["losses"])  # exact float equality

    ckpt = read_checkpoint(final)
    assert ckpt["extra"] == {"step": 2 * n}
    assert_same(ckpt["model"], dict(model.state_dict()), "model")  # INT8 codes, scales, every other tensor
    assert_same(ckpt["optimizer"], opt.state_dict(), "optimizer")  # moments, projections, SR step counters
    assert ckpt["scheduler"] == sched.state_dict()
    steps = {layer.stats()["step"] for _, layer in qgalore_fx.projected_layers(model)}
    assert steps == {2 * n}


# ----------------------------------------------------------------------------- crash safety
class SimulatedCrash(BaseException):
    """Not an Exception: save_checkpoint's error cleanup does not run, as in a real crash."""


@contextlib.contextmanager
def crash_at(k, only=None):
    """Count file-system steps of a save (mkdir, fsync, rename, rmtree, remove); die at step k (of those named
    ``only``, if given)."""
    targets = [(os, "mkdir"), (os, "fsync"), (os, "rename"), (os, "remove"), (shutil, "rmtree")]
    originals = {(mod, name): getattr(mod, name) for mod, name in targets}
    calls = []

    def wrap(mod, name):
        def op(*args, **kwargs):
            calls.append(name)
            if (len(calls) if only is None else calls.count(only)) - 1 == k and name == (only or name):
                raise SimulatedCrash(name)
            return originals[(mod, name)](*args, **kwargs)
        return op

    for mod, name in targets:
        setattr(mod, name, wrap(mod, name))
    try:
        yield calls
    finally:
        for (mod, name), fn in originals.items():
            setattr(mod, name, fn)


def test_a_crash_at_any_step_of_a_save_leaves_the_old_or_the_new_checkpoint(tmp_path):
    model, opt, sched = trained_blocks(steps=1)
    path, pristine = tmp_path / "ckpt", tmp_path / "pristine"
    save_checkpoint(path, model, opt, sched, step=1)
    shutil.copytree(path, pristine)
    old_state, _ = snapshot(model)
    blocks_step(model, opt, sched)
    new_state, _ = snapshot(model)

    with crash_at(-1) as calls:  # a full save, counting its steps
        save_checkpoint(path, model, opt, sched, step=2)
    assert {"fsync", "rename", "rmtree"} <= set(calls)
    outcomes, recovered = set(), 0
    for k in range(len(calls)):
        shutil.rmtree(path, ignore_errors=True)
        shutil.copytree(pristine, path)
        with crash_at(k), pytest.raises(SimulatedCrash):
            save_checkpoint(path, model, opt, sched, step=2)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            ckpt = read_checkpoint(path)
        if not path.is_dir():  # died between the two renames: the previous checkpoint is found and used
            recovered += 1
            assert any("interrupted" in str(w.message) for w in caught)
        step = ckpt["extra"]["step"]
        assert_same(ckpt["model"], old_state if step == 1 else new_state, f"crash at {calls[k]} #{k}")
        outcomes.add(step)
        # the next save cleans up whatever the crash left
        save_checkpoint(path, model, opt, sched, step=2)
        assert siblings(path) == [] and read_checkpoint(path)["extra"]["step"] == 2
    assert outcomes == {1, 2} and recovered >= 1


def _read_json_lines(text):
    return [json.loads(line) for line in text.splitlines() if line.strip()]


class BlocksReference:
    """A straight in-process run of the loop worker's training, advanced on demand, with its own RNG states."""

    def __init__(self):
        self.model, self.opt, self.sched = build_blocks()
        seed_everything(0)
        self.rng = torch.get_rng_state(), random.getstate()
        self.step = 0

    def advance_to(self, step):
        assert step >= self.step
        outer = torch.get_rng_state(), random.getstate()
        torch.set_rng_state(self.rng[0])
        random.setstate(self.rng[1])
        while self.step < step:
            blocks_step(self.model, self.opt, self.sched)
            self.step += 1
        self.rng = torch.get_rng_state(), random.getstate()
        torch.set_rng_state(outer[0])
        random.setstate(outer[1])


def test_sigkill_while_saving_leaves_a_loadable_checkpoint_and_training_resumes(tmp_path):
    path = tmp_path / "ckpt"
    timing = random.Random(20261123)  # fixed seed for the kill moments
    reference = BlocksReference()
    threads = str(torch.get_num_threads())
    loaded, mid_save_kills, rounds = 0, 0, 0
    while rounds < 3 or (mid_save_kills == 0 and rounds < 6):
        rounds += 1
        proc = subprocess.Popen([sys.executable, WORKER, "loop", "--ckpt", str(path), "--max-steps", "500",
                                 "--threads", threads], stdout=subprocess.PIPE, text=True)
        try:
            first = json.loads(proc.stdout.readline())
            assert first == {"resumed": loaded}  # training resumed from the checkpoint loaded below
            seconds = [json.loads(proc.stdout.readline())["seconds"] for _ in range(2)]
            deadline = time.monotonic() + 30
            while not glob.glob(glob.escape(str(path)) + ".tmp-*") and time.monotonic() < deadline:
                time.sleep(0.0005)
            time.sleep(timing.uniform(0.0, 0.6 * min(seconds)))  # somewhere inside this save, most likely
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=30)
            rest = _read_json_lines(proc.stdout.read())
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        assert proc.returncode == -signal.SIGKILL
        last_saved = max([loaded + 2] + [line["saved"] for line in rest])
        if siblings(path) or not path.is_dir():
            mid_save_kills += 1

        model, opt, sched = build_blocks()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the recovery warning, when killed between the renames
            extra = load_checkpoint(path, model, opt, sched)
        # the last save that finished, or the one killed after its swap but before it printed
        assert extra["step"] in (last_saved, last_saved + 1)
        reference.advance_to(extra["step"])
        assert_same(dict(model.state_dict()), dict(reference.model.state_dict()), f"model at step {extra['step']}")
        assert_same(opt.state_dict(), reference.opt.state_dict(), f"optimizer at step {extra['step']}")
        loaded = extra["step"]
    assert mid_save_kills >= 1, "no kill landed inside a save; the timing assumptions of this test are off"


# ----------------------------------------------------------------------------- damaged and mismatched checkpoints
def _flip(path, offset_fraction=0.5):
    data = bytearray(path.read_bytes())
    i = int(len(data) * offset_fraction)
    data[i] ^= 0xFF
    path.write_bytes(bytes(data))


def _truncate(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _rewrite_metadata(ckpt, change):
    """Edit checkpoint.json and re-sign it, as a writer of another version/format would."""
    meta_path = ckpt / METADATA
    meta = json.loads(meta_path.read_text())
    meta.pop("self_sha256")
    change(meta)
    canonical = json.dumps(meta, sort_keys=True, separators=(",", ":"), allow_nan=False).encode()
    meta["self_sha256"] = hashlib.sha256(canonical).hexdigest()
    meta_path.write_text(json.dumps(meta))


def _garbage_tensors_with_valid_checksum(ckpt):
    target = ckpt / MODEL_FILE
    target.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not a header}..")
    data = target.read_bytes()
    _rewrite_metadata(ckpt, lambda m: m["files"].update(
        {MODEL_FILE: {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}}))


def _edit_metadata(c):
    text = (c / METADATA).read_text()
    assert '"rank":8' in text
    (c / METADATA).write_text(text.replace('"rank":8', '"rank":9'))


CORRUPTIONS = {  # name: (damage, error class, message)
    "truncated model tensors": (lambda c: _truncate(c / MODEL_FILE), CheckpointCorruptError,
                                "model.safetensors is truncated"),
    "truncated state tensors": (lambda c: _truncate(c / STATE_FILE), CheckpointCorruptError,
                                "state.safetensors is truncated"),
    "flipped byte in model tensors": (lambda c: _flip(c / MODEL_FILE), CheckpointCorruptError,
                                      "model.safetensors is damaged: sha256"),
    "flipped byte in optimizer tensors": (lambda c: _flip(c / STATE_FILE, 0.9), CheckpointCorruptError,
                                          "state.safetensors is damaged: sha256"),
    "deleted metadata": (lambda c: (c / METADATA).unlink(), CheckpointCorruptError, "checkpoint.json is missing"),
    "truncated metadata": (lambda c: _truncate(c / METADATA), CheckpointCorruptError, "not valid JSON"),
    "edited metadata": (_edit_metadata, CheckpointCorruptError, "does not match its own checksum"),
    "deleted tensors file": (lambda c: (c / STATE_FILE).unlink(), CheckpointCorruptError,
                             "state.safetensors is missing"),
    "bad safetensors header": (_garbage_tensors_with_valid_checksum, CheckpointCorruptError,
                               "not a readable safetensors"),
    "newer format version": (lambda c: _rewrite_metadata(c, lambda m: m.update(format_version=2)),
                             CheckpointVersionError, "format version 2"),
}


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    """Built once: a checkpoint at step 2, and one of a different run (step 1, other data) to load targets from."""
    root = tmp_path_factory.mktemp("pristine")
    state = random.getstate()
    model, opt, sched = trained_blocks(steps=2)
    save_checkpoint(root / "ckpt", model, opt, sched, step=2)
    seed_everything(5)
    blocks_step(model, opt, sched)
    save_checkpoint(root / "target", model, opt, sched, step=3)
    random.setstate(state)
    return root


@pytest.fixture
def saved(pristine, tmp_path):
    """A fresh copy of the step-2 checkpoint, and a live run in another state to load it into."""
    shutil.copytree(pristine / "ckpt", tmp_path / "ckpt")
    target = build_blocks()
    load_checkpoint(pristine / "target", *target)
    return tmp_path / "ckpt", target


def _assert_load_fails_cleanly(path, target, error, match):
    model, opt, sched = target
    before_model, before_opt = snapshot(model, opt)
    before_sched, before_rng = sched.state_dict(), torch.get_rng_state()
    before_disk = tree_digest(path) if path.is_dir() else None
    with pytest.raises(error, match=match) as info:
        load_checkpoint(path, model, opt, sched)
    assert isinstance(info.value, CheckpointError) and isinstance(info.value, ValueError)
    assert_same(dict(model.state_dict()), before_model, "model after a failed load")
    assert_same(opt.state_dict(), before_opt, "optimizer after a failed load")
    assert sched.state_dict() == before_sched and torch.equal(torch.get_rng_state(), before_rng)
    if before_disk is not None:
        assert tree_digest(path) == before_disk  # a failed load never writes
    return info.value


@pytest.mark.parametrize("name", list(CORRUPTIONS))
def test_damaged_checkpoint_is_rejected_and_nothing_changes(saved, name):
    path, target = saved
    corrupt, error, match = CORRUPTIONS[name]
    corrupt(path)
    _assert_load_fails_cleanly(path, target, error, match)


def _fresh_run(rank=8, **blocks):
    """A transformed Blocks model with its optimizer and scheduler, as the saved run built them."""
    torch.manual_seed(0)
    model = qgalore_fx.transform(Blocks(**blocks), rank=rank, update_interval=3)
    opt = qgalore_fx.optimizer(model, lr=1e-2)
    return model, opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)


def test_checkpoint_of_another_rank_is_rejected(saved):
    path, _ = saved
    _assert_load_fails_cleanly(path, _fresh_run(rank=4), CheckpointMismatchError, r"rank: checkpoint 8, model 4")


def test_checkpoint_of_other_layer_shapes_is_rejected_naming_them(saved):
    path, _ = saved
    err = _assert_load_fails_cleanly(path, _fresh_run(hidden=128), CheckpointMismatchError, "shape mismatch")
    assert "blocks.0.0.weight_codes (checkpoint [256, 64], model [128, 64])" in str(err)


def test_checkpoint_of_other_parameter_names_is_rejected(saved):
    path, _ = saved
    _assert_load_fails_cleanly(path, _fresh_run(depth=4), CheckpointMismatchError,
                               r"missing from the checkpoint: blocks\.3\.0\.weight_codes, blocks\.3\.0\.weight_scales, "
                               r"blocks\.3\.0\.bias, blocks\.3\.0\.anchor")


def test_untransformed_model_and_missing_optimizer_state_are_rejected(saved, tmp_path):
    path, (model, opt, sched) = saved
    torch.manual_seed(0)
    plain = Blocks()
    with pytest.raises(CheckpointMismatchError, match="this model is not transformed"):
        load_checkpoint(path, plain)
    save_checkpoint(tmp_path / "weights_only", *trained_blocks(steps=1)[:1])
    _assert_load_fails_cleanly(tmp_path / "weights_only", (model, opt, sched), CheckpointMismatchError,
                               "has no optimizer state")


def test_accumulation_steps_that_differ_are_refused_naming_them(saved):
    path, _ = saved
    torch.manual_seed(0)
    model = qgalore_fx.transform(Blocks(), rank=8, update_interval=3)
    opt = qgalore_fx.optimizer(model, lr=1e-2, accumulation_steps=2)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    _assert_load_fails_cleanly(path, (model, opt, sched), CheckpointMismatchError,
                               r"saved with accumulation_steps=1, this optimizer has 2")
    assert opt.accumulation_steps == 2


# ----------------------------------------------------------------------------- directory hygiene
def test_only_marked_siblings_are_removed_or_loaded(tmp_path):
    """A user's backups named like the library's temporaries are never deleted, nor loaded in place of the path."""
    model, opt, sched = trained_blocks(steps=1)
    path = tmp_path / "run"
    save_checkpoint(path, model, opt, sched, step=1)
    backup = tmp_path / "run.old-1"
    shutil.copytree(path, backup)  # a copy of a real checkpoint, under a name the old code treated as its own
    notes = tmp_path / "run.tmp-2"
    notes.mkdir()
    (notes / "notes.txt").write_text("keep me")
    forged = tmp_path / f"run.old-{os.getpid()}-0123456789abcdef"  # our name pattern, but no marker with that id
    shutil.copytree(path, forged)
    before = {p.name: tree_digest(p) for p in (backup, notes, forged)}

    save_checkpoint(path, model, opt, sched, step=2)
    assert {p.name: tree_digest(p) for p in (backup, notes, forged)} == before
    shutil.rmtree(path)
    with pytest.raises(CheckpointNotFoundError, match=r"never loaded or removed automatically") as info:
        load_checkpoint(path, *build_blocks())
    assert "run.old-1" in str(info.value)
    assert {p.name: tree_digest(p) for p in (backup, notes, forged)} == before


def test_stale_temporaries_are_removed_before_the_next_copy_is_written(tmp_path):
    model, opt, sched = trained_blocks(steps=1)
    path = tmp_path / "ckpt"
    save_checkpoint(path, model, opt, sched, step=1)
    for _ in range(3):  # three saves that die after writing their model file
        with crash_at(2, only="fsync"), pytest.raises(SimulatedCrash):  # marker, model file, state file
            save_checkpoint(path, model, opt, sched, step=2)
        stale = glob.glob(str(path) + ".tmp-*")
        assert len(stale) == 1 and os.path.isfile(os.path.join(stale[0], MODEL_FILE))  # they do not pile up
    empty = f"{path}.tmp-{os.getpid()}-{'0' * 16}"  # a save that died right after creating its directory
    os.mkdir(empty)

    seen_at_mkdir = []
    real_mkdir = os.mkdir

    def mkdir(p, *args, **kwargs):
        if ".tmp-" in os.fspath(p):
            seen_at_mkdir.append(sorted(glob.glob(str(path) + ".tmp-*")))
        return real_mkdir(p, *args, **kwargs)

    os.mkdir = mkdir
    try:
        save_checkpoint(path, model, opt, sched, step=2)
    finally:
        os.mkdir = real_mkdir
    assert seen_at_mkdir == [[]]  # the crashed copies were gone before the new one was created
    assert siblings(path) == [] and read_checkpoint(path)["extra"]["step"] == 2


def test_a_checkpoint_from_before_markers_is_recovered_after_a_crash_between_the_renames(tmp_path):
    model, opt, sched = trained_blocks(steps=1)
    path = tmp_path / "ckpt"
    save_checkpoint(path, model, opt, sched, step=1)
    (path / MARKER).unlink()  # as written by an older qgalore_fx
    real_rename, renames = os.rename, []

    def rename(src, dst):
        renames.append((src, dst))
        if len(renames) == 2:  # path -> old happened; tmp -> path never does
            raise SimulatedCrash("rename")
        return real_rename(src, dst)

    os.rename = rename
    try:
        with pytest.raises(SimulatedCrash):
            save_checkpoint(path, model, opt, sched, step=2)
    finally:
        os.rename = real_rename
    assert not path.exists()
    with pytest.warns(UserWarning, match="interrupted between its two renames"):
        assert read_checkpoint(path)["extra"]["step"] == 1
    save_checkpoint(path, model, opt, sched, step=2)
    assert siblings(path) == [] and read_checkpoint(path)["extra"]["step"] == 2


def test_symlinks_inside_a_checkpoint_are_never_followed(tmp_path):
    model, opt, sched = trained_blocks(steps=1)
    path = tmp_path / "ckpt"
    save_checkpoint(path, model, opt, sched, step=1)
    outside = tmp_path / "outside"
    outside.mkdir()
    for name in (STATE_FILE, METADATA):
        victim = tmp_path / f"linked-{name}"
        shutil.copytree(path, victim)
        shutil.move(str(victim / name), str(outside / name))
        os.symlink(outside / name, victim / name)  # same bytes, reached through a link out of the checkpoint
        _assert_load_fails_cleanly(victim, build_blocks(), CheckpointCorruptError,
                                   f"{name} is a symbolic link")
        # replacing that checkpoint removes the link, not what it points to
        kept = tree_digest(outside)
        save_checkpoint(victim, model, opt, sched, step=2)
        assert tree_digest(outside) == kept and not (victim / name).is_symlink()
        assert read_checkpoint(victim)["extra"]["step"] == 2


def _no_space(*args, **kwargs):
    from safetensors import SafetensorError

    raise SafetensorError('Error while serializing: IoError(Os { code: 28, kind: StorageFull, '
                          'message: "No space left on device" })')


@pytest.mark.parametrize("failure", ["disk full in safetensors", "disk full at fsync", "permission denied"])
def test_file_system_errors_are_checkpoint_errors_naming_the_path(tmp_path, monkeypatch, failure):
    import errno

    from qgalore_fx import checkpoint as ckpt_mod

    model, opt, sched = trained_blocks(steps=1)
    path = tmp_path / "ckpt"
    save_checkpoint(path, model, opt, sched, step=1)
    before = tree_digest(tmp_path)
    if failure == "disk full in safetensors":
        monkeypatch.setattr(ckpt_mod, "_st_save_file", _no_space)
        code = errno.ENOSPC
    elif failure == "disk full at fsync":
        real_fsync = os.fsync

        def fsync(fd):
            if fsync.calls == 2:
                raise OSError(errno.ENOSPC, "No space left on device")
            fsync.calls += 1
            return real_fsync(fd)

        fsync.calls = 0
        monkeypatch.setattr(os, "fsync", fsync)
        code = errno.ENOSPC
    else:
        def mkdir(p, *args, **kwargs):
            raise PermissionError(errno.EACCES, "Permission denied", str(p))

        monkeypatch.setattr(os, "mkdir", mkdir)
        code = errno.EACCES
    with pytest.raises(CheckpointWriteError) as info:
        save_checkpoint(path, model, opt, sched, step=2)
    monkeypatch.undo()
    err = info.value
    assert isinstance(err, CheckpointError) and isinstance(err, OSError) and err.errno == code
    assert f"could not save the checkpoint {path}" in str(err) and "previous checkpoint" in str(err)
    assert tree_digest(tmp_path) == before and siblings(path) == []  # the previous checkpoint, nothing else
    assert read_checkpoint(path)["extra"]["step"] == 1


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root ignores directory permissions")
def test_a_read_only_directory_is_a_checkpoint_error_and_keeps_the_previous_checkpoint(tmp_path):
    model, opt, sched = trained_blocks(steps=1)
    parent = tmp_path / "ro"
    save_checkpoint(parent / "ckpt", model, opt, sched, step=1)
    before = tree_digest(parent)
    parent.chmod(0o555)
    try:
        with pytest.raises(CheckpointWriteError, match=f"could not save the checkpoint {parent / 'ckpt'}"):
            save_checkpoint(parent / "ckpt", model, opt, sched, step=2)
    finally:
        parent.chmod(0o755)
    assert tree_digest(parent) == before
