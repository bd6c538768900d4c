"""Crash-safe training checkpoints: ``save_checkpoint`` / ``load_checkpoint``.

    save_checkpoint("ckpt", model, opt, sched, step=1000, data_position=123456)
    extra = load_checkpoint("ckpt", model, opt, sched)   # -> {"step": 1000, "data_position": 123456}

A checkpoint is a directory holding everything a run needs to continue
bit-for-bit: the model's state dict (INT8 codes and scales of the projected
layers, every other parameter and persistent buffer), the optimizer's state
dict (for :class:`~qgalore_fx.optim.QGaLoreOptimizer` this includes every
projected layer's INT4 projection, 8-bit moments, refresh schedule and step
count, which is also what seeds stochastic rounding), the scheduler's state,
the RNG states, the model's qgalore_fx config and any JSON-safe ``extra``
values. Nothing is pickled, and loading never unpickles: tensors live in
safetensors files and everything else in JSON.

Layout (format version 1)
-------------------------
``model.safetensors``
    ``model.state_dict()`` under its own key names, so any safetensors reader
    can open it. Tensors that alias another entry (tied weights) are stored
    once and listed under ``model.aliases`` in the metadata.
``state.safetensors``
    every other tensor, under dotted keys: ``optimizer.state.14.adam.m``,
    ``rng.torch_cpu``, ``rng.cuda.0``, ``scheduler.…``, ``extra.…``.
``checkpoint.json``
    written last; its presence marks the checkpoint complete. It holds the
    format version, the sha256 and byte size of both tensor files, the
    model's keys with dtypes and shapes, the qgalore_fx config, and one
    *description* per nested object (optimizer, scheduler, RNG, extra). A
    description is plain JSON with tagged containers so that loading rebuilds
    the exact structure: a leaf is a JSON number, string, bool or null;
    ``{"tensor": key}`` is a tensor of ``state.safetensors``; ``{"list": [...]}``
    and ``{"tuple": [...]}`` keep lists and tuples apart; ``{"dict": [[k, v], ...]}``
    keeps key order and key types (JSON keeps ``14`` and ``"14"`` apart inside a
    list, so int keys come back as ints); ``{"float": "nan" | "inf" | "-inf"}``
    stores non-finite floats in standard JSON. The file also carries
    ``self_sha256``, a hash of its own canonical form, so a flipped byte in the
    metadata is caught too.

Atomic replacement
------------------
``save_checkpoint(path, ...)`` writes everything into ``<path>.tmp-<pid>``
next to the target (same parent, so renames never cross a file system),
fsyncs every file and the directory, then swaps: ``path -> <path>.old-<pid>``,
``<path>.tmp-<pid> -> path``, fsync of the parent, removal of the old copy.
A crash (power loss, SIGKILL) at any point therefore leaves either the
previous complete checkpoint at ``path`` or the new one — or, in the instant
between the two renames, no ``path`` but a complete ``<path>.old-<pid>``,
which ``load_checkpoint`` finds and loads (with a warning). Leftover
``.tmp-*``/``.old-*`` siblings are removed by the next successful save. One
writer per path at a time is assumed (e.g. rank 0 only under DDP).
``save_checkpoint`` refuses to replace a directory that is not a qgalore_fx
checkpoint.

Validation before anything changes
----------------------------------
``load_checkpoint`` reads and checks the whole checkpoint before it touches
the model, optimizer or scheduler: the metadata must parse and hash to its own
``self_sha256``, the format version must be known, both tensor files must have
the recorded size and sha256 and parse as safetensors, the qgalore_fx config
must equal the model's field by field, the model's state-dict keys, shapes and
dtypes must match, and the optimizer's parameter layout and projected layers
(names and low-rank shapes) must match. Errors are :class:`CheckpointError`
subclasses (``ValueError``) naming the file, field or first few parameters
that differ. The checkpoint on disk is only ever read. The optimizer is then
loaded first and rolled back to its previous state if the model load fails.
"""

from __future__ import annotations

import glob
import hashlib
import json
import math
import os
import random
import re
import shutil
import time
import warnings
from typing import Any, Dict, List, Optional, Tuple

import torch
import torch.nn as nn
from safetensors import SafetensorError
from safetensors.torch import load_file as _st_load_file
from safetensors.torch import save_file as _st_save_file

from qgalore_fx.lowrank import check_control
from qgalore_fx.rewrite import config_of, projected_layers

__all__ = [
    "FORMAT_VERSION",
    "CheckpointError",
    "CheckpointCorruptError",
    "CheckpointMismatchError",
    "CheckpointNotFoundError",
    "CheckpointVersionError",
    "load_checkpoint",
    "read_checkpoint",
    "save_checkpoint",
]

FORMAT = "qgalore_fx.checkpoint"
FORMAT_VERSION = 1
METADATA = "checkpoint.json"
MODEL_FILE = "model.safetensors"
STATE_FILE = "state.safetensors"
_OWN_FILES = {METADATA, MODEL_FILE, STATE_FILE}
_SIBLING_RE = re.compile(r"\.(tmp|old)-\d+$")
_SHOW = 5  # how many mismatching names an error lists


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded into this model/optimizer; nothing was modified."""


class CheckpointNotFoundError(CheckpointError, FileNotFoundError):
    """No checkpoint (complete or recoverable) at the path."""


class CheckpointCorruptError(CheckpointError):
    """A missing, truncated or damaged file (size, sha256, JSON or safetensors header)."""


class CheckpointVersionError(CheckpointError):
    """A checkpoint written in a format version this qgalore_fx does not read."""


class CheckpointMismatchError(CheckpointError):
    """A checkpoint of a different model, config, optimizer or scheduler."""


# =========================================================================== nested structure <-> JSON + tensors
class _Encoder:
    """Flattens nested Python/tensor structures into a JSON description plus a flat tensor dict."""

    def __init__(self) -> None:
        self.tensors: Dict[str, torch.Tensor] = {}
        self._storages: set = set()

    def _key(self, key: str) -> str:
        if key not in self.tensors:
            return key
        n = 1
        while f"{key}~{n}" in self.tensors:
            n += 1
        return f"{key}~{n}"

    def add_tensor(self, key: str, t: torch.Tensor) -> str:
        key = self._key(key)
        self.tensors[key] = _safetensors_ready(t, self._storages)
        return key

    def encode(self, obj: Any, key: str) -> Any:
        if isinstance(obj, torch.Tensor):
            return {"tensor": self.add_tensor(key, obj)}
        if obj is None or isinstance(obj, (bool, str, int)):
            return obj
        if isinstance(obj, float):
            if math.isfinite(obj):
                return obj
            return {"float": "nan" if math.isnan(obj) else ("inf" if obj > 0 else "-inf")}
        if type(obj) is tuple:
            return {"tuple": [self.encode(v, f"{key}.{i}") for i, v in enumerate(obj)]}
        if type(obj) is list:
            return {"list": [self.encode(v, f"{key}.{i}") for i, v in enumerate(obj)]}
        if isinstance(obj, dict):
            items = []
            for k, v in obj.items():
                if not (k is None or isinstance(k, (str, int, bool)) or (isinstance(k, float) and math.isfinite(k))):
                    raise TypeError(f"cannot store the dict key {k!r} ({type(k).__name__}) at {key!r} in a "
                                    "checkpoint: keys must be str, int, bool, finite float or None")
                items.append([k, self.encode(v, f"{key}.{k}")])
            return {"dict": items}
        raise TypeError(f"cannot store a {type(obj).__name__} at {key!r} in a checkpoint: only tensors, "
                        "numbers, strings, bools, None, lists, tuples and dicts are stored (nothing is pickled)")


def _decode(desc: Any, tensors: Dict[str, torch.Tensor], where: str) -> Any:
    if desc is None or isinstance(desc, (bool, str, int, float)):
        return desc
    if isinstance(desc, dict) and len(desc) == 1:
        ((tag, value),) = desc.items()
        if tag == "tensor":
            if value not in tensors:
                raise CheckpointCorruptError(f"{where}: tensor {value!r} is missing from {STATE_FILE}")
            return tensors[value]
        if tag == "float" and value in ("nan", "inf", "-inf"):
            return float(value)
        if tag in ("list", "tuple") and isinstance(value, list):
            items = [_decode(v, tensors, where) for v in value]
            return items if tag == "list" else tuple(items)
        if tag == "dict" and isinstance(value, list) and all(isinstance(i, list) and len(i) == 2 for i in value):
            return {k: _decode(v, tensors, where) for k, v in value}
    raise CheckpointCorruptError(f"{where}: unrecognized structure description {str(desc)[:80]!r} in {METADATA}")


def _safetensors_ready(t: torch.Tensor, storages: set) -> torch.Tensor:
    """A detached, contiguous CPU tensor that shares storage with nothing already stored."""
    t = t.detach()
    if t.numel() == 0:
        return torch.empty(t.shape, dtype=t.dtype)
    ptr = (t.device.type, t.device.index, t.untyped_storage().data_ptr())
    if ptr in storages:
        t = t.clone()
    storages.add(ptr)
    return t.cpu().contiguous()


def _flatten_model_state(state: Dict[str, torch.Tensor]) -> Tuple[Dict[str, torch.Tensor], Dict[str, str]]:
    """(tensors, aliases): entries that are the same view of the same storage (tied weights) are stored once."""
    tensors: Dict[str, torch.Tensor] = {}
    aliases: Dict[str, str] = {}
    seen: Dict[tuple, str] = {}
    storages: set = set()
    for key, t in state.items():
        if t.numel():
            sig = (t.device.type, t.device.index, t.untyped_storage().data_ptr(), t.storage_offset(),
                   tuple(t.shape), tuple(t.stride()), t.dtype)
            if sig in seen:
                aliases[key] = seen[sig]
                continue
            seen[sig] = key
        tensors[key] = _safetensors_ready(t, storages)
    return tensors, aliases


# =========================================================================== RNG
def _rng_state(enc: _Encoder) -> dict:
    out = {"torch_cpu": enc.encode(torch.get_rng_state(), "rng.torch_cpu"), "cuda": None, "python": None,
           "numpy": None}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        out["cuda"] = enc.encode(list(torch.cuda.get_rng_state_all()), "rng.cuda")
    out["python"] = enc.encode(random.getstate(), "rng.python")
    try:
        import numpy as np
    except ImportError:  # numpy is optional
        pass
    else:
        name, keys, pos, has_gauss, cached = np.random.get_state(legacy=True)
        out["numpy"] = enc.encode([name, [int(k) for k in keys], int(pos), int(has_gauss), float(cached)],
                                  "rng.numpy")
    return out


def _decode_rng(rng: Any, tensors: dict) -> dict:
    if not isinstance(rng, dict) or "torch_cpu" not in rng:
        raise CheckpointCorruptError(f"{METADATA}: the 'rng' entry is missing or malformed")
    out = {k: _decode(rng.get(k), tensors, f"rng.{k}") for k in ("torch_cpu", "cuda", "python", "numpy")}
    if not isinstance(out["torch_cpu"], torch.Tensor) or out["torch_cpu"].dtype != torch.uint8:
        raise CheckpointCorruptError(f"{METADATA}: rng.torch_cpu is not a uint8 tensor")
    return out


def _set_rng_state(rng: dict) -> None:
    torch.set_rng_state(rng["torch_cpu"])
    if rng["cuda"] is not None and torch.cuda.is_available():
        states, count = rng["cuda"], torch.cuda.device_count()
        if len(states) != count:
            warnings.warn(f"checkpoint has CUDA RNG states for {len(states)} devices, this process sees {count}; "
                          f"restoring the first {min(len(states), count)}")
        for i, s in enumerate(states[:count]):
            torch.cuda.set_rng_state(s, i)
    if rng["python"] is not None:
        random.setstate(rng["python"])
    if rng["numpy"] is not None:
        try:
            import numpy as np
        except ImportError:
            return
        name, keys, pos, has_gauss, cached = rng["numpy"]
        np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))


# =========================================================================== files
def _fsync_dir(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # platforms without directory fds
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _fsync_file(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _sha256(path: str) -> Tuple[str, int]:
    h = hashlib.sha256()
    size = 0
    with open(path, "rb") as f:
        while True:
            chunk = f.read(1 << 23)
            if not chunk:
                break
            h.update(chunk)
            size += len(chunk)
    return h.hexdigest(), size


def _umask() -> Optional[int]:
    """The process umask, read without changing it (Linux); None where it cannot be read."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    return None


def _write_tensors(path: str, tensors: Dict[str, torch.Tensor]) -> dict:
    _st_save_file(tensors, path, metadata={"format": "pt"})
    umask = _umask()
    if umask is not None:  # safetensors creates its files 0600; give them the permissions of the other files
        os.chmod(path, 0o666 & ~umask)
    _fsync_file(path)
    digest, size = _sha256(path)
    return {"sha256": digest, "bytes": size}


def _canonical(meta: dict) -> bytes:
    return json.dumps(meta, sort_keys=True, separators=(",", ":"), allow_nan=False).encode()


def _write_metadata(path: str, meta: dict) -> None:
    meta = dict(meta)
    meta["self_sha256"] = hashlib.sha256(_canonical(meta)).hexdigest()
    with open(path, "wb") as f:
        f.write(json.dumps(meta, separators=(",", ":"), allow_nan=False).encode())
        f.flush()
        os.fsync(f.fileno())


def _read_metadata(ckpt_dir: str) -> dict:
    path = os.path.join(ckpt_dir, METADATA)
    if not os.path.isfile(path):
        raise CheckpointCorruptError(
            f"{path} is missing: {ckpt_dir} is not a complete qgalore_fx checkpoint ({METADATA} is written last, "
            "so a save that did not finish leaves none)")
    try:
        with open(path, "rb") as f:
            meta = json.loads(f.read().decode())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointCorruptError(f"{path} is not valid JSON ({e}); the checkpoint metadata is damaged") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise CheckpointCorruptError(f"{path} is not qgalore_fx checkpoint metadata (format {FORMAT!r} expected)")
    claimed = meta.pop("self_sha256", None)
    if claimed != hashlib.sha256(_canonical(meta)).hexdigest():
        raise CheckpointCorruptError(f"{path}: the metadata does not match its own checksum (self_sha256); "
                                     "the file was modified or damaged")
    version = meta.get("format_version")
    if version != FORMAT_VERSION:
        raise CheckpointVersionError(
            f"{ckpt_dir} has checkpoint format version {version!r}; this qgalore_fx "
            f"({meta.get('qgalore_fx_version', '?')} wrote it) reads version {FORMAT_VERSION} only")
    return meta


def _read_tensors(ckpt_dir: str, name: str, record: Any) -> Dict[str, torch.Tensor]:
    path = os.path.join(ckpt_dir, name)
    if not isinstance(record, dict) or "sha256" not in record or "bytes" not in record:
        raise CheckpointCorruptError(f"{ckpt_dir}/{METADATA} has no checksum record for {name}")
    if not os.path.isfile(path):
        raise CheckpointCorruptError(f"{path} is missing")
    size = os.path.getsize(path)
    if size != record["bytes"]:
        how = "truncated" if size < record["bytes"] else "longer than written"
        raise CheckpointCorruptError(f"{path} is {how}: {size} bytes, the checkpoint recorded {record['bytes']}")
    digest, _ = _sha256(path)
    if digest != record["sha256"]:
        raise CheckpointCorruptError(f"{path} is damaged: sha256 {digest[:16]}… does not match the recorded "
                                     f"{record['sha256'][:16]}…")
    try:
        return _st_load_file(path)
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointCorruptError(f"{path} is not a readable safetensors file: {e}") from None


def _remove(path: str) -> None:
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path)
    elif os.path.lexists(path):
        os.remove(path)


def _siblings(path: str) -> List[str]:
    """``<path>.tmp-<pid>`` and ``<path>.old-<pid>`` entries next to ``path``."""
    return [p for p in glob.glob(glob.escape(path) + ".*-*") if _SIBLING_RE.search(p[len(path):])]


def _check_replaceable(path: str) -> None:
    if not os.path.lexists(path):
        return
    if not os.path.isdir(path) or os.path.islink(path):
        raise CheckpointError(f"cannot save a checkpoint to {path}: it exists and is not a directory")
    entries = set(os.listdir(path))
    if entries and (METADATA not in entries or not entries <= _OWN_FILES):
        raise CheckpointError(
            f"refusing to replace {path}: it is not a qgalore_fx checkpoint directory (it holds "
            f"{sorted(entries - _OWN_FILES)[:_SHOW] or sorted(entries)[:_SHOW]}); choose another path")


# =========================================================================== save
def save_checkpoint(path, model: nn.Module, optimizer: Optional[torch.optim.Optimizer] = None,
                    scheduler: Optional[Any] = None, **extra) -> str:
    """Write a complete checkpoint to the directory ``path``, atomically; returns the absolute path.

    ``extra`` values (step, data position, ...) must be numbers, strings, bools, None, tensors, or
    lists/tuples/dicts of those; ``load_checkpoint`` returns them. Scheduler entries that are not
    storable (e.g. a callable object's attributes) are skipped and keep the loading scheduler's
    values. Projected layers' optimizer state (projections, moments, refresh schedule) is part
    of the optimizer's state dict: a checkpoint saved without the optimizer holds weights only.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    path = os.path.abspath(os.fspath(path))
    _check_replaceable(path)

    # ---- everything is gathered in memory first, so a bad value fails before any file is touched
    config = config_of(model)
    model_tensors, aliases = _flatten_model_state(model.state_dict())
    enc = _Encoder()
    meta: Dict[str, Any] = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "qgalore_fx_version": _version(),
        "torch_version": torch.__version__,
        "created_unix_ns": time.time_ns(),
        "config": None if config is None else config.to_dict(),
        "model": {
            "tensors": {k: {"dtype": _dtype_name(t.dtype), "shape": list(t.shape)} for k, t in model_tensors.items()},
            "aliases": aliases,
        },
        "optimizer": None,
        "scheduler": None,
    }
    if optimizer is not None:
        meta["optimizer"] = {"class": type(optimizer).__name__,
                             "state": enc.encode(optimizer.state_dict(), "optimizer")}
    if scheduler is not None:
        state, skipped = {}, []
        for k, v in scheduler.state_dict().items():
            probe = _Encoder()
            try:
                probe.encode(v, "scheduler")
            except TypeError:
                skipped.append(k)
                continue
            state[k] = v
        meta["scheduler"] = {"class": type(scheduler).__name__, "state": enc.encode(state, "scheduler"),
                             "skipped": skipped}
    try:
        meta["extra"] = enc.encode(dict(extra), "extra")
    except TypeError as e:
        raise TypeError(f"save_checkpoint extra values must be JSON-safe or tensors: {e}") from None
    meta["rng"] = _rng_state(enc)

    # ---- write into <path>.tmp-<pid>, metadata last, everything fsynced
    parent = os.path.dirname(path)
    os.makedirs(parent, exist_ok=True)
    pid = os.getpid()
    tmp = f"{path}.tmp-{pid}"
    _remove(tmp)
    os.mkdir(tmp)
    try:
        meta["files"] = {
            MODEL_FILE: _write_tensors(os.path.join(tmp, MODEL_FILE), model_tensors),
            STATE_FILE: _write_tensors(os.path.join(tmp, STATE_FILE), enc.tensors),
        }
        _write_metadata(os.path.join(tmp, METADATA), meta)
        _fsync_dir(tmp)
    except Exception:  # an error (not a crash): leave nothing behind. A crash leaves tmp for the next save to remove.
        shutil.rmtree(tmp, ignore_errors=True)
        raise

    # ---- swap: path -> old, tmp -> path, drop old
    old = None
    if os.path.isdir(path):
        old = f"{path}.old-{pid}"
        _remove(old)
        os.rename(path, old)
    try:
        os.rename(tmp, path)
    except Exception:
        if old is not None:
            os.rename(old, path)
        raise
    _fsync_dir(parent)
    for stale in ([old] if old else []) + _siblings(path):
        shutil.rmtree(stale, ignore_errors=True)
    _fsync_dir(parent)
    return path


# =========================================================================== read + validate
def _find_checkpoint(path: str) -> str:
    if os.path.isdir(path):
        return path
    if os.path.lexists(path):
        raise CheckpointNotFoundError(f"{path} is not a checkpoint directory")
    candidates = []
    for old in (p for p in _siblings(path) if ".old-" in p[len(path):]):
        try:
            meta = _read_metadata(old)
        except CheckpointError:
            continue
        candidates.append((meta.get("created_unix_ns", 0), old))
    if candidates:
        old = max(candidates)[1]
        warnings.warn(f"{path} is missing: a save was interrupted between its two renames; loading the previous "
                      f"complete checkpoint {old} (the next save_checkpoint({path!r}, ...) cleans it up)")
        return old
    pending = [p for p in _siblings(path) if ".tmp-" in p[len(path):]]
    hint = f" ({len(pending)} unfinished save(s) such as {pending[0]} never completed)" if pending else ""
    raise CheckpointNotFoundError(f"no checkpoint at {path}{hint}")


def read_checkpoint(path) -> dict:
    """Read and verify a checkpoint without a model: a dict with ``path`` (the directory read),
    ``model`` (the full state dict), ``optimizer`` / ``scheduler`` (state dicts or None),
    ``extra``, ``config`` (the qgalore_fx config as a dict, or None), ``rng`` (the saved RNG states)
    and ``metadata`` (the parsed ``checkpoint.json``).
    Raises :class:`CheckpointError` subclasses for missing, damaged or unknown-version checkpoints.
    """
    ckpt_dir = _find_checkpoint(os.path.abspath(os.fspath(path)))
    meta = _read_metadata(ckpt_dir)
    for key in ("files", "model", "config", "optimizer", "scheduler", "extra", "rng"):
        if key not in meta:
            raise CheckpointCorruptError(f"{ckpt_dir}/{METADATA} has no {key!r} entry")
    model_tensors = _read_tensors(ckpt_dir, MODEL_FILE, meta["files"].get(MODEL_FILE))
    state_tensors = _read_tensors(ckpt_dir, STATE_FILE, meta["files"].get(STATE_FILE))

    listed = meta["model"]["tensors"]
    if set(listed) != set(model_tensors):
        raise CheckpointCorruptError(f"{ckpt_dir}/{MODEL_FILE} does not hold the tensors its metadata lists")
    for key, info in listed.items():
        t = model_tensors[key]
        if list(t.shape) != info["shape"] or _dtype_name(t.dtype) != info["dtype"]:
            raise CheckpointCorruptError(f"{ckpt_dir}/{MODEL_FILE}: {key!r} is {_dtype_name(t.dtype)}"
                                         f"{list(t.shape)}, its metadata says {info['dtype']}{info['shape']}")
    model_state = {}
    aliases = meta["model"]["aliases"]
    for key in _model_keys(meta):
        model_state[key] = model_tensors[aliases.get(key, key)]

    out = {"path": ckpt_dir, "metadata": meta, "config": meta["config"], "model": model_state,
           "optimizer": None, "scheduler": None}
    if meta["optimizer"] is not None:
        out["optimizer"] = _decode(meta["optimizer"]["state"], state_tensors, "optimizer")
    if meta["scheduler"] is not None:
        out["scheduler"] = _decode(meta["scheduler"]["state"], state_tensors, "scheduler")
    out["extra"] = _decode(meta["extra"], state_tensors, "extra")
    out["rng"] = _decode_rng(meta["rng"], state_tensors)
    return out


def _model_keys(meta: dict) -> List[str]:
    """Model state-dict keys in saved order (stored tensors, then aliases)."""
    aliases = meta["model"]["aliases"]
    for key, target in aliases.items():
        if target not in meta["model"]["tensors"]:
            raise CheckpointCorruptError(f"{METADATA}: alias {key!r} points at {target!r}, which is not stored")
    return list(meta["model"]["tensors"]) + list(aliases)


def _names(items) -> str:
    items = list(items)
    text = ", ".join(map(str, items[:_SHOW]))
    return text + (f" and {len(items) - _SHOW} more" if len(items) > _SHOW else "")


def _check_config(saved: Optional[dict], model: nn.Module, where: str) -> None:
    config = config_of(model)
    current = None if config is None else config.to_dict()
    if saved is None and current is None:
        return
    if current is None:
        raise CheckpointMismatchError(
            f"{where} was saved from a model transformed by qgalore_fx (rank={saved.get('rank')}), but this model "
            "is not transformed: call qgalore_fx.transform(model, ...) with the same options first")
    if saved is None:
        raise CheckpointMismatchError(f"{where} was saved from a model not transformed by qgalore_fx, but this "
                                      f"model is (rank={current['rank']}); load it into the untransformed model")
    diff = [f"{k}: checkpoint {saved.get(k)!r}, model {current.get(k)!r}"
            for k in sorted(set(saved) | set(current)) if saved.get(k) != current.get(k)]
    if diff:
        raise CheckpointMismatchError(f"{where} was saved with a different qgalore_fx config: {_names(diff)}")


def _check_model_state(saved: Dict[str, torch.Tensor], model: nn.Module, where: str) -> None:
    current = model.state_dict()
    missing = [k for k in current if k not in saved]
    unexpected = [k for k in saved if k not in current]
    problems = []
    if missing:
        problems.append(f"missing from the checkpoint: {_names(missing)}")
    if unexpected:
        problems.append(f"not in the model: {_names(unexpected)}")
    shapes = [f"{k} (checkpoint {list(saved[k].shape)}, model {list(current[k].shape)})"
              for k in current if k in saved and saved[k].shape != current[k].shape]
    if shapes:
        problems.append(f"shape mismatch: {_names(shapes)}")
    dtypes = [f"{k} (checkpoint {_dtype_name(saved[k].dtype)}, model {_dtype_name(current[k].dtype)})"
              for k in current if k in saved and saved[k].shape == current[k].shape
              and saved[k].dtype != current[k].dtype]
    if dtypes:
        problems.append(f"dtype mismatch: {_names(dtypes)}")
    if not problems:
        for name, layer in projected_layers(model):
            if layer.spec is not None:
                try:
                    check_control(saved[f"{name}._extra_state"], layer.spec, name)
                except ValueError as e:
                    problems.append(str(e))
    if problems:
        raise CheckpointMismatchError(f"{where} does not fit this model's parameters and buffers — "
                                      + "; ".join(problems))


def _check_optimizer_state(saved_meta: Optional[dict], state: Optional[dict], optimizer, where: str) -> None:
    if saved_meta is None:
        raise CheckpointMismatchError(f"{where} has no optimizer state (it was saved with optimizer=None); "
                                      "call load_checkpoint without optimizer= or save one")
    if saved_meta["class"] != type(optimizer).__name__:
        raise CheckpointMismatchError(f"{where} holds the state of a {saved_meta['class']}, not of a "
                                      f"{type(optimizer).__name__}")
    if not isinstance(state, dict) or not isinstance(state.get("param_groups"), list):
        raise CheckpointCorruptError(f"{where}: the optimizer state has no param_groups")
    saved_sizes = [len(g.get("params", [])) for g in state["param_groups"]]
    sizes = [len(g["params"]) for g in optimizer.param_groups]
    if saved_sizes != sizes:
        raise CheckpointMismatchError(f"{where}: optimizer parameter groups differ — checkpoint has groups of "
                                      f"{saved_sizes} parameters, this optimizer {sizes}")
    if "qgalore_layers" in state:
        raise CheckpointMismatchError(f"{where} keeps the projected layers' state in the optimizer (an older "
                                      "layout); this version keeps it in the model's state dict")
    params = [p for g in optimizer.param_groups for p in g["params"]]
    bad = []
    for index, s in (state.get("state") or {}).items():
        if not isinstance(index, int) or not 0 <= index < len(params):
            raise CheckpointMismatchError(f"{where}: optimizer state refers to parameter {index!r}, "
                                          f"the optimizer has {len(params)}")
        shape = s.get("adam", {}).get("shape") if isinstance(s, dict) else None
        if isinstance(shape, torch.Tensor) and tuple(int(x) for x in shape.tolist()) != tuple(params[index].shape):
            bad.append(f"{getattr(optimizer, '_param_names', {}).get(id(params[index]), index)} (checkpoint "
                       f"{shape.tolist()}, model {list(params[index].shape)})")
    if bad:
        raise CheckpointMismatchError(f"{where}: AdamW state shapes differ: {_names(bad)}")


# =========================================================================== load
def load_checkpoint(path, model: nn.Module, optimizer: Optional[torch.optim.Optimizer] = None,
                    scheduler: Optional[Any] = None) -> dict:
    """Restore ``model`` (and ``optimizer``, ``scheduler``, RNG states) from ``path``; returns the ``extra`` dict.

    Everything is verified before anything is modified; see the module docstring. ``model`` must be
    built and transformed exactly as when saving; ``optimizer``/``scheduler`` created the same way.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    ckpt = read_checkpoint(path)
    where = f"checkpoint {ckpt['path']}"
    meta = ckpt["metadata"]
    _check_config(ckpt["config"], model, where)
    _check_model_state(ckpt["model"], model, where)
    if optimizer is not None:
        _check_optimizer_state(meta["optimizer"], ckpt["optimizer"], optimizer, where)
    scheduler_state = None
    if scheduler is not None:
        if meta["scheduler"] is None:
            raise CheckpointMismatchError(f"{where} has no scheduler state (it was saved with scheduler=None)")
        if meta["scheduler"]["class"] != type(scheduler).__name__:
            raise CheckpointMismatchError(f"{where} holds the state of a {meta['scheduler']['class']}, not of a "
                                          f"{type(scheduler).__name__}")
        scheduler_state = scheduler.state_dict()
        scheduler_state.update(ckpt["scheduler"])

    # ---- apply: optimizer first (it can be rolled back), then model, scheduler, RNG
    previous = None
    if optimizer is not None:
        previous = optimizer.state_dict()  # load_state_dict replaces state objects, so these stay the old values
        try:
            optimizer.load_state_dict(ckpt["optimizer"])
        except Exception as e:
            _rollback(optimizer, previous)
            raise CheckpointMismatchError(f"{where}: the optimizer state does not load: {e}") from e
    try:
        model.load_state_dict(ckpt["model"], strict=True)
    except Exception as e:
        if optimizer is not None:
            _rollback(optimizer, previous)
        raise CheckpointMismatchError(f"{where}: the model state does not load: {e}") from e
    if scheduler is not None:
        scheduler.load_state_dict(scheduler_state)
    _set_rng_state(ckpt["rng"])
    return dict(ckpt["extra"])


def _rollback(optimizer, previous: dict) -> None:
    try:
        optimizer.load_state_dict(previous)
    except Exception as e:  # pragma: no cover - restoring its own state dict should not fail
        warnings.warn(f"could not restore the optimizer's previous state after a failed load: {e}")


# =========================================================================== helpers
def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def _version() -> str:
    from qgalore_fx import __version__

    return __version__
