"""load_checkpoint validates every entry before it writes anything.

Each test takes a real checkpoint of a small run, damages one entry at a time in a way the checksums
cannot see (the tensor files are rewritten and ``checkpoint.json`` is re-signed, as a buggy or hostile
writer would), loads it into a live run, and asserts a ``CheckpointError`` naming the entry and that
the live model, optimizer, scheduler and RNG states are bit-identical to before.
"""

import copy
import hashlib
import json
import os
import random
import re
import shutil

import numpy as np
import pytest
import torch
from resume_worker import Blocks, blocks_step, lr_lambda, seed_everything
from safetensors.torch import load_file, save_file

import qgalore_fx
from qgalore_fx.checkpoint import METADATA, MODEL_FILE, STATE_FILE, CheckpointError, load_checkpoint, save_checkpoint


def build_qgalore():
    torch.manual_seed(0)
    model = qgalore_fx.transform(Blocks(depth=1), rank=8, update_interval=3)
    opt = qgalore_fx.optimizer(model, lr=1e-2)
    return model, opt, torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda)


def build_torch():
    torch.manual_seed(0)
    model = Blocks(dim=16, hidden=32, depth=1)  # blocks_step draws ids < 256
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    return model, opt, torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda)


def train(run, steps, seed):
    seed_everything(seed)
    for _ in range(steps):
        blocks_step(*run)


# ----------------------------------------------------------------------------- a checkpoint, rewritten and re-signed
class Checkpoint:
    """The parts of a saved checkpoint, to change and write back with valid checksums."""

    def __init__(self, path):
        self.meta = json.loads((path / METADATA).read_text())
        self.meta.pop("self_sha256")
        self.model = load_file(path / MODEL_FILE)
        self.state = load_file(path / STATE_FILE)

    def copy(self):
        other = copy.copy(self)
        other.meta = copy.deepcopy(self.meta)
        other.model, other.state = dict(self.model), dict(self.state)
        return other

    def write(self, path):
        path.mkdir()
        meta = self.meta
        meta["model"]["tensors"] = {k: {"dtype": str(t.dtype).replace("torch.", ""), "shape": list(t.shape)}
                                    for k, t in self.model.items()}
        meta["files"] = {}
        for name, tensors in ((MODEL_FILE, self.model), (STATE_FILE, self.state)):
            save_file({k: t.contiguous() for k, t in tensors.items()}, str(path / name), metadata={"format": "pt"})
            data = (path / name).read_bytes()
            meta["files"][name] = {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
        canonical = json.dumps(meta, sort_keys=True, separators=(",", ":"), allow_nan=False).encode()
        (path / METADATA).write_text(json.dumps({**meta, "self_sha256": hashlib.sha256(canonical).hexdigest()}))


# ----------------------------------------------------------------------------- the mutations
OTHER_DTYPE = {torch.float32: torch.float64, torch.float64: torch.float32, torch.bfloat16: torch.float32,
               torch.int64: torch.int32, torch.int8: torch.int16, torch.uint8: torch.int8}


def tensor_mutations(key, t):
    """(label, new tensor): a wrong shape, a wrong dtype, and values no such entry can hold."""
    yield "shape", torch.zeros(t.numel() + 1, dtype=t.dtype)
    yield "dtype", t.to(OTHER_DTYPE[t.dtype])
    if t.numel() == 0:
        return
    bad = []
    if t.is_floating_point():
        bad = [float("nan"), float("inf")]
    elif t.dtype == torch.int64:  # steps, counters, AdamState shape/bits/block_size
        bad = [-7, 2**60]
    elif t.dtype == torch.int8:  # INT8 weight codes: [-127, 127]
        bad = [-128]
    elif key.endswith("proj_codes"):  # packed INT4: a zero nibble is code -8
        bad = [0]
    # other uint8 tensors (8-bit Adam codes, the torch RNG state) have no invalid byte values
    for value in bad:
        changed = t.clone()
        changed.view(-1)[0] = value
        yield f"value {value}", changed


def nodes(desc, path=()):
    """Every node of a structure description in checkpoint.json, as (path, node); long lists by their ends."""
    yield path, desc
    if isinstance(desc, dict) and len(desc) == 1:
        ((tag, value),) = desc.items()
        if tag in ("list", "tuple"):
            keep = range(len(value)) if len(value) <= 4 else (0, len(value) - 1)
            for i in keep:
                yield from nodes(value[i], path + (tag, i))
        elif tag == "dict":
            for i, (_, v) in enumerate(value):
                yield from nodes(v, path + (tag, i, 1))


def replace(root, path, new):
    if not path:
        return new
    node = root
    for step in path[:-1]:
        node = node[step]
    node[path[-1]] = new
    return root


def description_mutations(desc, path, where):
    """(label, new node) for one node: wrong types, out-of-range numbers, broken containers."""
    number = (isinstance(desc, (int, float)) and not isinstance(desc, bool)) or \
        (isinstance(desc, dict) and "float" in desc)
    if number:
        yield from [("'abc'", "abc"), ("None", None), ("NaN", {"float": "nan"})]
        if not where.endswith("rng.numpy.4"):  # numpy's cached gaussian may be any finite float
            yield "-7", -7
        if isinstance(desc, int):
            yield "2**70", 2**70
    elif isinstance(desc, bool):
        yield from [("'abc'", "abc"), ("7", 7)]
    elif isinstance(desc, str):
        yield from [("'abc'", "abc"), ("7", 7), ("None", None)]
    elif desc is None:
        yield from [("'abc'", "abc"), ("7", 7), ("a dict", {"dict": []})]
    elif isinstance(desc, dict) and "tensor" in desc:
        yield from [("'abc'", "abc"), ("7", 7), ("a missing tensor", {"tensor": "no.such.tensor"})]
    elif isinstance(desc, dict) and ("list" in desc or "tuple" in desc):
        tag = "list" if "list" in desc else "tuple"
        items = desc[tag]
        if items:
            yield "last item dropped", {tag: items[:-1]}
            yield "an item appended", {tag: items + [items[-1]]}
        yield f"{tag} stored as {'tuple' if tag == 'list' else 'list'}", {("tuple" if tag == "list" else "list"): items}
    elif isinstance(desc, dict) and "dict" in desc:
        items = desc["dict"]
        if items and where != "optimizer.state":  # a parameter without state is valid (it never had a gradient)
            yield "first key dropped", {"dict": items[1:]}
        yield "an unknown key added", {"dict": items + [["zz_unknown", 1]]}
        yield "not a dict", {"list": []}


def entry_name(desc_root, path, prefix):
    """Dotted name of a node (``optimizer.param_groups.0.lr``), as the loader's messages spell it."""
    parts, node, i = [prefix], desc_root, 0
    while i < len(path):
        tag = path[i]
        if tag == "dict":  # ("dict", item, 1)
            key, node = node["dict"][path[i + 1]]
            parts.append(str(key))
            i += 3
        else:  # ("list" | "tuple", index)
            node = node[tag][path[i + 1]]
            parts.append(str(path[i + 1]))
            i += 2
    return ".".join(parts)


def kind(name: str) -> str:
    """Entries that differ only by an index are one kind: ``blocks.*.*.weight_codes``, ``optimizer.state.*.step``."""
    return re.sub(r"(?<=\.)\d+(?=\.|$)", "*", name)


def all_mutations(ckpt):
    """(label, checkpoint) for the first entry of every kind in ``ckpt`` and every way it can be damaged."""
    seen = set()

    def first(name):
        new = kind(name) not in seen
        seen.add(kind(name))
        return new

    for file, tensors in (("model", ckpt.model), ("state", ckpt.state)):
        for key, t in tensors.items():
            if not first(f"{file}:{key}"):
                continue
            for label, new in tensor_mutations(key, t):
                bad = ckpt.copy()
                getattr(bad, file)[key] = new
                yield f"{file} tensor {key}: {label}", bad
    for section in ("optimizer", "scheduler", "rng"):
        root_path = (section, "state") if section != "rng" else (section,)
        root = ckpt.meta
        for step in root_path:
            root = root[step]
        for path, node in list(nodes(root)):
            where = entry_name(root, path, section)
            if not first(where):
                continue
            for label, new in description_mutations(node, path, where):
                bad = ckpt.copy()
                target = bad.meta
                for step in root_path[:-1]:
                    target = target[step]
                target[root_path[-1]] = replace(target[root_path[-1]], path, copy.deepcopy(new))
                yield f"{where}: {label}", bad
    for label, change in [
        ("config.rank", lambda m: m["config"].update(rank=4)),
        ("config", lambda m: m.update(config="abc")),
        ("model.aliases", lambda m: m["model"]["aliases"].update({"x": "no.such.tensor"})),
        ("optimizer.class", lambda m: m["optimizer"].update({"class": "SGD"})),
        ("scheduler.class", lambda m: m["scheduler"].update({"class": "StepLR"})),
        ("scheduler.skipped", lambda m: m["scheduler"].update(skipped="abc")),
        ("scheduler.skipped names a stored entry", lambda m: m["scheduler"].update(skipped=["base_lrs"])),
        ("rng", lambda m: m.update(rng="abc")),
        ("deep nesting", lambda m: m["scheduler"].update(state=_nested(200))),
    ]:
        if label.startswith("config") and ckpt.meta["config"] is None:
            continue
        bad = ckpt.copy()
        change(bad.meta)
        yield f"metadata {label}", bad


def _nested(depth):
    node = 1
    for _ in range(depth):
        node = {"list": [node]}
    return node


# ----------------------------------------------------------------------------- the live state, bit for bit
def live_digest(model, opt, sched, timing=True) -> str:
    """sha256 of the live state; ``timing=False`` leaves out the layers' wall-clock telemetry."""
    h = hashlib.sha256()

    def feed(obj):
        if isinstance(obj, torch.Tensor):
            t = obj.detach().cpu().contiguous().reshape(-1)
            h.update(f"{t.dtype}{list(obj.shape)}".encode())
            h.update(t.view(torch.uint8).numpy().tobytes() if t.dtype != torch.bool else t.numpy().tobytes())
        elif isinstance(obj, np.ndarray):
            h.update(obj.tobytes())
        elif isinstance(obj, dict):
            h.update(f"dict{len(obj)}".encode())
            for k, v in obj.items():
                h.update(repr(k).encode())
                feed(v)
        elif isinstance(obj, (list, tuple)):
            h.update(f"{type(obj).__name__}{len(obj)}".encode())
            for v in obj:
                feed(v)
        else:
            h.update(repr(obj).encode())

    feed(model.state_dict())
    feed(dict(model.named_buffers()))  # also the non-persistent ones: the layers' hparams
    if timing:
        feed([layer.control for _, layer in qgalore_fx.projected_layers(model)])  # incl. the slots not saved
    feed(opt.state_dict())
    feed([{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups])
    feed(sched.state_dict())
    feed([torch.get_rng_state(), random.getstate(), np.random.get_state()])
    return h.hexdigest()


@pytest.mark.parametrize("build, target_steps", [(build_qgalore, 1), (build_torch, 1), (build_torch, 0)],
                         ids=["qgalore", "torch-adamw", "torch-adamw-into-a-fresh-optimizer"])
def test_every_damaged_entry_is_rejected_before_anything_changes(build, target_steps, tmp_path):
    """``target_steps=0``: the live optimizer has no state yet (a resume), so there is no live entry to compare with."""
    run = build()
    train(run, steps=4, seed=0)  # crosses a subspace refresh (update_interval=3)
    save_checkpoint(tmp_path / "ckpt", *run, step=4)
    pristine = Checkpoint(tmp_path / "ckpt")

    # the rewriting itself keeps a checkpoint valid: the unchanged copy loads
    pristine.copy().write(tmp_path / "unchanged")
    probe = build()
    assert load_checkpoint(tmp_path / "unchanged", *probe) == {"step": 4}
    assert live_digest(*probe, timing=False) == live_digest(*run, timing=False)

    target = build()  # a live run in another state, which every failed load must leave as it is
    train(target, steps=target_steps, seed=5)
    np.random.seed(11)
    before = live_digest(*target)

    accepted, leaked, wrong_error, cases = [], [], [], 0
    for i, (label, bad) in enumerate(all_mutations(pristine)):
        cases += 1
        path = tmp_path / f"m{i}"
        bad.write(path)
        try:
            load_checkpoint(path, *target)
        except CheckpointError:
            pass
        except Exception as e:  # noqa: BLE001 - any other exception type is a finding, reported below
            wrong_error.append(f"{label}: {type(e).__name__}: {e}")
        else:
            accepted.append(label)
        if live_digest(*target) != before:
            leaked.append(label)
            target = build()  # restore a known state so one leak does not hide the others
            train(target, steps=target_steps, seed=5)
            np.random.seed(11)
            before = live_digest(*target)
        shutil.rmtree(path)
    assert not accepted, f"{len(accepted)} damaged checkpoints loaded: {accepted[:30]}"
    assert not wrong_error, f"not a CheckpointError: {wrong_error[:10]}"
    assert not leaked, f"a failed load changed the live state: {leaked[:10]}"
    assert cases > 100


def test_the_error_names_the_entry(tmp_path):
    run = build_qgalore()
    train(run, steps=2, seed=0)
    save_checkpoint(tmp_path / "ckpt", *run)
    pristine = Checkpoint(tmp_path / "ckpt")
    scale_key = next(k for k in pristine.model if k.endswith("weight_scales"))
    cases = {
        "scheduler.last_epoch must be an int, got 'abc'":
            lambda c: _set_desc(c.meta["scheduler"]["state"], "last_epoch", "abc"),
        "scheduler.base_lrs.0 must be a finite number":
            lambda c: _set_desc(c.meta["scheduler"]["state"], "base_lrs", {"list": [{"float": "nan"}, 0.01]}),
        "optimizer.param_groups.0.lr must be a finite number, got 'abc'":
            lambda c: _set_group(c, "lr", "abc"),
        "optimizer.param_groups.0.lr must be a finite number >= 0, got -0.5":
            lambda c: _set_group(c, "lr", -0.5),
        "optimizer.param_groups.0.betas must be a pair of numbers in [0, 1)":
            lambda c: _set_group(c, "betas", {"tuple": [5, -1]}),
        f"model entry '{scale_key}' holds non-finite values":
            lambda c: c.model[scale_key].view(-1).__setitem__(0, float("nan")),
        "rng.torch_cpu must be a CPU generator state":
            lambda c: c.state.update({"rng.torch_cpu": torch.zeros(7, dtype=torch.uint8)}),
    }
    target = build_qgalore()
    for i, (message, change) in enumerate(cases.items()):
        bad = pristine.copy()
        bad.model = {k: t.clone() for k, t in bad.model.items()}
        change(bad)
        bad.write(tmp_path / f"m{i}")
        with pytest.raises(CheckpointError) as info:
            load_checkpoint(tmp_path / f"m{i}", *target)
        assert message in str(info.value), (message, str(info.value))


def _set_desc(desc, key, value):
    for item in desc["dict"]:
        if item[0] == key:
            item[1] = value
            return
    raise KeyError(key)


def _set_group(ckpt, key, value):
    groups = next(v for k, v in ckpt.meta["optimizer"]["state"]["dict"] if k == "param_groups")
    _set_desc(groups["list"][0], key, value)


def test_layer_step_beyond_exact_integers_is_rejected(tmp_path):
    run = build_qgalore()
    train(run, steps=1, seed=0)
    save_checkpoint(tmp_path / "ckpt", *run)
    bad = Checkpoint(tmp_path / "ckpt")
    key = next(k for k in bad.model if k.endswith(".step"))
    bad.model[key] = torch.tensor(2**53, dtype=torch.int64)
    bad.write(tmp_path / "bad")
    with pytest.raises(CheckpointError, match=rf"model entry '{key}' must be an integer in \[0, 2\*\*53\)"):
        load_checkpoint(tmp_path / "bad", *build_qgalore())


@pytest.mark.parametrize("number", ["1e999", "-1e999", "1" * 30, "-" + "9" * 25, "1" + "0" * 5000])
@pytest.mark.parametrize("where", ["format_version", "a scheduler value"])
def test_metadata_numbers_out_of_range_are_a_checkpoint_error_naming_the_file(tmp_path, number, where):
    from qgalore_fx.checkpoint import CheckpointCorruptError, read_checkpoint

    run = build_qgalore()
    train(run, steps=1, seed=0)
    save_checkpoint(tmp_path / "ckpt", *run)
    path = tmp_path / "ckpt" / METADATA
    text = path.read_text()
    if where == "format_version":
        text, count = re.subn(r'"format_version":\s*1\b', f'"format_version":{number}', text)
    else:
        text, count = re.subn(r'\["last_epoch",\s*1\]', f'["last_epoch",{number}]', text)
    assert count == 1
    path.write_text(text)  # the number itself breaks the file: there is no valid signature to give it
    target = build_qgalore()
    before = live_digest(*target)
    for read in (lambda: load_checkpoint(tmp_path / "ckpt", *target), lambda: read_checkpoint(tmp_path / "ckpt")):
        with pytest.raises(CheckpointCorruptError, match=re.escape(str(path))) as info:
            read()
        assert "out of range" in str(info.value)
    assert live_digest(*target) == before
