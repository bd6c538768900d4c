"""Crash-safe training checkpoints: ``save_checkpoint`` / ``load_checkpoint``.

    save_checkpoint("ckpt", model, opt, sched, step=1000, data_position=123456)
    extra = load_checkpoint("ckpt", model, opt, sched)   # -> {"step": 1000, "data_position": 123456}

A checkpoint is a directory (safetensors files and a checksummed JSON manifest; nothing is pickled) holding
everything a run needs to continue bit-for-bit. It is written atomically and validated in full before loading
changes anything. Public names: :func:`save_checkpoint`, :func:`load_checkpoint`, :func:`read_checkpoint`,
:data:`FORMAT_VERSION` and the :class:`CheckpointError` family. See docs/checkpoints.md.
"""

from __future__ import annotations

import errno
import glob
import hashlib
import json
import math
import os
import random
import re
import secrets
import shutil
import stat
import time
import warnings
from dataclasses import dataclass
from functools import partial
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
import torch.nn as nn
from safetensors import SafetensorError
from safetensors.torch import load_file as _st_load_file
from safetensors.torch import save_file as _st_save_file

from qgalore_fx.kernels.adam8bit import BLOCK_SIZE as ADAM_BLOCK_SIZE
from qgalore_fx.kernels.adam8bit import MIN_8BIT_SIZE as ADAM_MIN_8BIT_SIZE
from qgalore_fx.kernels.adam8bit import AdamState
from qgalore_fx.kernels.quant import MAX_SCALE, all_finite
from qgalore_fx.lowrank import check_control
from qgalore_fx.optim import QGaLoreOptimizer, _check_hparams
from qgalore_fx.rewrite import config_of, projected_layers

__all__ = [
    "FORMAT_VERSION",
    "CheckpointError",
    "CheckpointCorruptError",
    "CheckpointMismatchError",
    "CheckpointNotFoundError",
    "CheckpointVersionError",
    "CheckpointWriteError",
    "load_checkpoint",
    "read_checkpoint",
    "save_checkpoint",
]

FORMAT = "qgalore_fx.checkpoint"
FORMAT_VERSION = 1
METADATA = "checkpoint.json"
MODEL_FILE = "model.safetensors"
STATE_FILE = "state.safetensors"
MARKER = "qgalore_fx.marker"  # written first into every directory save_checkpoint creates
_OWN_FILES = {METADATA, MODEL_FILE, STATE_FILE, MARKER}
_ID = r"\d+-[0-9a-f]{16}"  # <pid>-<random>: the identity of one saved directory, in its marker and its siblings' names
_SIBLING_RE = re.compile(rf"\.(tmp|old)-({_ID})")
_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
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


class CheckpointWriteError(CheckpointError, OSError):
    """A save that failed (disk full, no permission, ...): its partial copy is removed, the previous checkpoint kept.

    An ``OSError`` too, with the ``errno`` of the failure (``errno.ENOSPC``, ``errno.EACCES``, ...).
    """

    def __init__(self, code: int, message: str):
        super().__init__(message)
        self.errno, self.strerror = code, message

    def __str__(self) -> str:
        return self.strerror


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


_MAX_DEPTH = 64  # nesting a description may have; deeper is damage (and would exhaust the stack)


def _decode(desc: Any, tensors: Dict[str, torch.Tensor], where: str, depth: int = 0) -> Any:
    """Rebuild what :meth:`_Encoder.encode` described; ``where`` names the entry in errors (``optimizer.state.6``)."""
    if depth > _MAX_DEPTH:
        raise CheckpointCorruptError(f"{where}: nested more than {_MAX_DEPTH} levels deep in {METADATA}")
    if desc is None or isinstance(desc, (bool, str, int, float)):
        return desc
    if isinstance(desc, dict) and len(desc) == 1:
        ((tag, value),) = desc.items()
        if tag == "tensor" and isinstance(value, str):
            if value not in tensors:
                raise CheckpointCorruptError(f"{where}: tensor {value!r} is missing from {STATE_FILE}")
            return tensors[value]
        if tag == "float" and value in ("nan", "inf", "-inf"):
            return float(value)
        if tag in ("list", "tuple") and isinstance(value, list):
            items = [_decode(v, tensors, f"{where}.{i}", depth + 1) for i, v in enumerate(value)]
            return items if tag == "list" else tuple(items)
        if tag == "dict" and isinstance(value, list) and all(
                isinstance(i, list) and len(i) == 2 and (i[0] is None or isinstance(i[0], (str, int, float)))
                for i in value):
            out = {}
            for k, v in value:
                if k in out:
                    raise CheckpointCorruptError(f"{where}: key {k!r} appears twice in {METADATA}")
                out[k] = _decode(v, tensors, f"{where}.{k}", depth + 1)
            return out
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


def _set_rng_state(rng: dict) -> None:
    torch.set_rng_state(rng["torch_cpu"])
    if rng["cuda"] is not None and torch.cuda.is_available():
        states, count = rng["cuda"], torch.cuda.device_count()
        if len(states) != count:
            warnings.warn(f"checkpoint has CUDA RNG states for {len(states)} devices, this process sees {count}; "
                          f"restoring the first {min(len(states), count)}")
        for i, s in enumerate(states[:count]):
            torch.cuda.set_rng_state(s, i)
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
    with os.fdopen(_open_regular(path), "rb") as f:
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


def _open_regular(path: str) -> int:
    """A read-only fd of ``path``, which must be a regular file, not a symlink: nothing outside a checkpoint is read."""
    try:
        mode = os.lstat(path).st_mode
        if stat.S_ISLNK(mode):
            raise CheckpointCorruptError(f"{path} is a symbolic link; a checkpoint holds regular files only (links "
                                         "out of a checkpoint are never followed)")
        if not stat.S_ISREG(mode):
            raise CheckpointCorruptError(f"{path} is not a regular file")
        return os.open(path, os.O_RDONLY | _NOFOLLOW)
    except FileNotFoundError:
        raise CheckpointCorruptError(f"{path} is missing") from None
    except OSError as e:
        raise CheckpointCorruptError(f"{path} cannot be read: {e.strerror or e}") from None


def _canonical(meta: dict) -> bytes:
    return json.dumps(meta, sort_keys=True, separators=(",", ":"), allow_nan=False).encode()


def _write_metadata(path: str, meta: dict) -> None:
    meta = dict(meta)
    meta["self_sha256"] = hashlib.sha256(_canonical(meta)).hexdigest()
    with open(path, "wb") as f:
        f.write(json.dumps(meta, separators=(",", ":"), allow_nan=False).encode())
        f.flush()
        os.fsync(f.fileno())


def _reject_constant(name: str):
    raise ValueError(f"{name} is not standard JSON (non-finite floats are stored as {{'float': ...}})")


#: The integers a checkpoint's metadata can hold: int64 counters, and uint64 generator seeds.
_INT_RANGE = (-2**63, 2**64)


def _parse_float(text: str) -> float:
    """A JSON float of the metadata: one that overflows (``1e999``) is damage, not infinity."""
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"the number {text[:40]} is out of range (it overflows a float)")
    return value


def _parse_int(text: str) -> int:
    """A JSON integer of the metadata, within :data:`_INT_RANGE` (its length is checked before it is converted)."""
    low, high = _INT_RANGE
    value = int(text) if len(text) <= 21 else None
    if value is None or not low <= value < high:
        raise ValueError(f"the integer {text[:40]}{'…' if len(text) > 40 else ''} is out of range "
                         f"[-2**63, 2**64)")
    return value


def _read_metadata(ckpt_dir: str) -> dict:
    path = os.path.join(ckpt_dir, METADATA)
    if not os.path.lexists(path):
        raise CheckpointCorruptError(
            f"{path} is missing: {ckpt_dir} is not a complete qgalore_fx checkpoint ({METADATA} is written last, "
            "so a save that did not finish leaves none)")
    try:
        with os.fdopen(_open_regular(path), "rb") as f:
            meta = json.loads(f.read().decode(), parse_constant=_reject_constant, parse_float=_parse_float,
                              parse_int=_parse_int)
    except (UnicodeDecodeError, ValueError, RecursionError) as e:  # JSONDecodeError is a ValueError
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
    digest, size = _sha256(path)  # a regular file (not a link), read once
    if size != record["bytes"]:
        how = "truncated" if size < record["bytes"] else "longer than written"
        raise CheckpointCorruptError(f"{path} is {how}: {size} bytes, the checkpoint recorded {record['bytes']}")
    if digest != record["sha256"]:
        raise CheckpointCorruptError(f"{path} is damaged: sha256 {digest[:16]}… does not match the recorded "
                                     f"{record['sha256'][:16]}…")
    try:
        return _st_load_file(path)
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointCorruptError(f"{path} is not a readable safetensors file: {e}") from None


def _new_id() -> str:
    return f"{os.getpid()}-{secrets.token_hex(8)}"


def _read_marker(directory: str) -> Optional[str]:
    """The identity recorded in ``directory``'s marker; None if there is no valid marker (or it is a link)."""
    try:
        fd = os.open(os.path.join(directory, MARKER), os.O_RDONLY | _NOFOLLOW)
    except OSError:
        return None
    try:
        with os.fdopen(fd, "rb") as f:
            data = json.loads(f.read(4096).decode())
    except (OSError, ValueError):
        return None
    ident = data.get("id") if isinstance(data, dict) and data.get("format") == FORMAT else None
    return ident if isinstance(ident, str) and re.fullmatch(_ID, ident) else None


def _write_marker(directory: str, ident: str) -> None:
    path = os.path.join(directory, MARKER)
    if os.path.lexists(path):
        os.remove(path)  # a damaged marker, or a link: replaced, never followed
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _NOFOLLOW, 0o666)
    with os.fdopen(fd, "wb") as f:
        f.write(json.dumps({"format": FORMAT, "id": ident,
                            "note": "written by qgalore_fx.save_checkpoint, which removes a copy named "
                                    "<checkpoint>.tmp-<id> or .old-<id> next to the checkpoint"}).encode())
        f.flush()
        os.fsync(f.fileno())


def _own_siblings(path: str) -> List[Tuple[str, str]]:
    """``(kind, sibling)`` for each ``<path>.tmp-<id>`` / ``<path>.old-<id>`` that save_checkpoint created
    (docs/checkpoints.md, "Atomic replacement": a marked directory, or an empty ``.tmp-<id>``)."""
    out = []
    for sibling in sorted(glob.glob(glob.escape(path) + ".*-*")):
        m = _SIBLING_RE.fullmatch(sibling[len(path):])
        if not m or os.path.islink(sibling) or not os.path.isdir(sibling):
            continue
        try:
            empty = not os.listdir(sibling)
        except OSError:
            continue
        if _read_marker(sibling) == m.group(2) or (m.group(1) == "tmp" and empty):
            out.append((m.group(1), sibling))
    return out


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


def _write_error(path: str, e: BaseException, existed: bool) -> CheckpointWriteError:
    """``e`` (an OSError, or safetensors' error wrapping one) as a CheckpointWriteError naming the checkpoint."""
    code = getattr(e, "errno", None)
    if code is None:  # safetensors: "... IoError(Os { code: 28, kind: StorageFull, ... })"
        m = re.search(r"code: (\d+)", str(e))
        code = int(m.group(1)) if m else errno.EIO
    reason = getattr(e, "strerror", None) or str(e)
    where = f" ({e.filename})" if getattr(e, "filename", None) else ""
    kept = f"the previous checkpoint at {path} is intact" if existed else "nothing was left behind"
    return CheckpointWriteError(code, f"could not save the checkpoint {path}: {reason}{where}; {kept}")


# =========================================================================== save
def _refuse_sharded(model: nn.Module, what: str) -> None:
    from qgalore_fx.sharding import is_dtensor

    if any(is_dtensor(p) for p in model.parameters()):
        raise ValueError(f"{what} writes one process's full state; this model is sharded with FSDP2 "
                         "(fully_shard). Use torch.distributed.checkpoint: get_state_dict(model, opt) + dcp.save, "
                         "and dcp.load + set_state_dict (README, \"Sharded training (FSDP2)\")")


def save_checkpoint(path, model: nn.Module, optimizer: Optional[torch.optim.Optimizer] = None,
                    scheduler: Optional[Any] = None, **extra) -> str:
    """Write a complete checkpoint to the directory ``path``, atomically; returns the absolute path.

    ``extra`` values (numbers, strings, bools, None, tensors, lists/tuples/dicts of those) come back from
    ``load_checkpoint``. What is stored and skipped: docs/checkpoints.md.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    _refuse_sharded(model, "save_checkpoint")
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

    # ---- write into <path>.tmp-<id> (marker first, metadata last, everything fsynced)
    existed = os.path.isdir(path)
    parent = os.path.dirname(path)
    ident = _new_id()
    tmp = f"{path}.tmp-{ident}"
    try:
        os.makedirs(parent, exist_ok=True)
        # earlier saves' unfinished copies go first, to free their space; their .old- siblings stay until the
        # swap below succeeds (after a crash between the two renames, one of them is the last checkpoint)
        for kind, stale in _own_siblings(path):
            if kind == "tmp":
                shutil.rmtree(stale, ignore_errors=True)
        os.mkdir(tmp)
    except OSError as e:
        raise _write_error(path, e, existed) from e
    try:
        _write_marker(tmp, ident)
        meta["files"] = {
            MODEL_FILE: _write_tensors(os.path.join(tmp, MODEL_FILE), model_tensors),
            STATE_FILE: _write_tensors(os.path.join(tmp, STATE_FILE), enc.tensors),
        }
        _write_metadata(os.path.join(tmp, METADATA), meta)
        _fsync_dir(tmp)
        # ---- swap: path -> <path>.old-<its id>, tmp -> path
        old = None
        if os.path.isdir(path):
            old_id = _read_marker(path)
            if old_id is None:  # saved before markers existed: give it one, so its .old- copy is recognized
                old_id = _new_id()
                _write_marker(path, old_id)
                _fsync_dir(path)
            old = f"{path}.old-{old_id}"
            if os.path.lexists(old):
                if ("old", old) not in _own_siblings(path):
                    raise CheckpointError(f"cannot retire {path} to {old}: something else is there")
                shutil.rmtree(old)  # a stale copy of this very checkpoint
            os.rename(path, old)
        try:
            os.rename(tmp, path)
        except Exception:
            if old is not None:
                os.rename(old, path)
            raise
    except Exception as e:  # an error (not a crash): leave nothing behind. A crash leaves tmp for the next save.
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, (OSError, SafetensorError)) and not isinstance(e, CheckpointError):
            raise _write_error(path, e, existed) from e
        raise
    _fsync_dir(parent)
    # ---- the new checkpoint is in place: every copy of ours next to it is stale
    for _, stale in ([("old", old)] if old else []) + _own_siblings(path):
        shutil.rmtree(stale, ignore_errors=True)
    _fsync_dir(parent)
    return path


# =========================================================================== read + validate
def _find_checkpoint(path: str) -> str:
    if os.path.isdir(path):
        return path
    if os.path.lexists(path):
        raise CheckpointNotFoundError(f"{path} is not a checkpoint directory")
    ours = _own_siblings(path)
    candidates = []
    for kind, old in ours:
        if kind != "old":
            continue
        try:
            meta = _read_metadata(old)
        except CheckpointError:
            continue
        created = meta.get("created_unix_ns")
        candidates.append((created if _is_int(created) else 0, old))
    if candidates:
        old = max(candidates)[1]
        warnings.warn(f"{path} is missing: a save was interrupted between its two renames; loading the previous "
                      f"complete checkpoint {old} (the next save_checkpoint({path!r}, ...) cleans it up)")
        return old
    pending = [p for kind, p in ours if kind == "tmp"]
    hint = f" ({len(pending)} unfinished save(s) such as {pending[0]} never completed)" if pending else ""
    others = sorted(set(glob.glob(glob.escape(path) + ".tmp-*") + glob.glob(glob.escape(path) + ".old-*"))
                    - {p for _, p in ours})
    if others:
        hint += (f"; {_names(others)} next to it were not written by save_checkpoint for this path and are never "
                 f"loaded or removed automatically (rename one to {path} to load it)")
    raise CheckpointNotFoundError(f"no checkpoint at {path}{hint}")


def read_checkpoint(path) -> dict:
    """Read and verify a checkpoint without a model: a dict with ``path`` (the directory read),
    ``model`` (the full state dict), ``optimizer`` / ``scheduler`` (state dicts or None),
    ``extra``, ``config`` (the qgalore_fx config as a dict, or None), ``rng`` (the saved RNG states)
    and ``metadata`` (the parsed ``checkpoint.json``).
    Raises :class:`CheckpointError` subclasses for missing, damaged, malformed or unknown-version checkpoints.
    """
    ckpt_dir = _find_checkpoint(os.path.abspath(os.fspath(path)))
    meta = _read_metadata(ckpt_dir)
    _check(meta, _METADATA, "", f"{ckpt_dir}/{METADATA}")
    model_tensors = _read_tensors(ckpt_dir, MODEL_FILE, meta["files"][MODEL_FILE])
    state_tensors = _read_tensors(ckpt_dir, STATE_FILE, meta["files"][STATE_FILE])

    listed = meta["model"]["tensors"]
    if set(listed) != set(model_tensors):
        raise CheckpointCorruptError(f"{ckpt_dir}/{MODEL_FILE} does not hold the tensors its metadata lists")
    for key, info in listed.items():
        t = model_tensors[key]
        if list(t.shape) != info["shape"] or _dtype_name(t.dtype) != info["dtype"]:
            raise CheckpointCorruptError(f"{ckpt_dir}/{MODEL_FILE}: {key!r} is {_dtype_name(t.dtype)}"
                                         f"{list(t.shape)}, its metadata says {info['dtype']}{info['shape']}")
    aliases = meta["model"]["aliases"]
    model_state = {key: model_tensors[aliases.get(key, key)] for key in _model_keys(meta)}

    out = {"path": ckpt_dir, "metadata": meta, "config": meta["config"], "model": model_state,
           "optimizer": None, "scheduler": None}
    if meta["optimizer"] is not None:
        out["optimizer"] = _decode(meta["optimizer"]["state"], state_tensors, "optimizer")
    if meta["scheduler"] is not None:
        out["scheduler"] = _decode(meta["scheduler"]["state"], state_tensors, "scheduler")
        if not isinstance(out["scheduler"], dict) or not all(isinstance(k, str) for k in out["scheduler"]):
            raise _invalid("scheduler", "a state dict with str keys", out["scheduler"], ckpt_dir)
    out["extra"] = _decode(meta["extra"], state_tensors, "extra")
    if not isinstance(out["extra"], dict):
        raise _invalid("extra", "a dict", out["extra"], ckpt_dir)
    out["rng"] = {k: _decode(v, state_tensors, f"rng.{k}") for k, v in meta["rng"].items()}
    _check(out["rng"], _RNG, "rng", ckpt_dir)
    return out


def _model_keys(meta: dict) -> List[str]:
    """Model state-dict keys in saved order (stored tensors, then aliases)."""
    return list(meta["model"]["tensors"]) + list(meta["model"]["aliases"])


def _names(items) -> str:
    items = list(items)
    text = ", ".join(map(str, items[:_SHOW]))
    return text + (f" and {len(items) - _SHOW} more" if len(items) > _SHOW else "")


# --------------------------------------------------------------------------- helpers of the checks
def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_real(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _first_line(e: BaseException) -> str:
    return str(e).splitlines()[0] if str(e) else type(e).__name__


def _show(value) -> str:
    if isinstance(value, torch.Tensor):
        return f"a {_dtype_name(value.dtype)} tensor of shape {list(value.shape)}"
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _invalid(entry: str, what: str, value, where: str = "checkpoint") -> CheckpointCorruptError:
    return CheckpointCorruptError(f"{where}: {entry} must be {what}, got {_show(value)}")


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


# =========================================================================== checking against a description
# What a checkpoint holds is described in one place (the next section) and checked by _check. A description is
#   a dict        exactly these entries, each holding what it describes; an Omittable one may be absent, and
#                 a ``...`` key admits any other entries;
#   a list        a list of as many items, each holding what it describes;
#   a tuple       everything it lists, in order (ANY, the empty tuple: anything);
#   a kind        a callable (value, entry, where) that raises the CheckpointError naming the entry.
# Entries are named by dotted paths (optimizer.param_groups.0.lr). docs/checkpoints.md lists what is checked.
_EXACT = 2**53  # counters are stored in float64 control slots too: beyond this they are not exact
_ABSENT = object()
ANY = ()


class ModelEntries(dict):
    """A dict description whose entries are named as model entries (``model entry 'blocks.0.0.step'``)."""


@dataclass(frozen=True)
class Omittable:
    """An entry that may be absent; where present, it holds what ``kind`` describes."""
    kind: Any


def _check(value, expected, entry: str, where: str) -> None:
    """Raise the error of the first way ``value`` is not what ``expected`` describes."""
    if isinstance(expected, Omittable):
        if value is not _ABSENT:
            _check(value, expected.kind, entry, where)
    elif isinstance(expected, tuple):
        for kind in expected:
            _check(value, kind, entry, where)
    elif isinstance(expected, dict):
        if not isinstance(value, dict):
            raise _invalid(entry, "a dict", value, where)
        for key, kind in expected.items():  # the entries first: a wrong one explains a wrong set of keys
            if key in value and key is not ...:
                name = f"model entry {key!r}" if isinstance(expected, ModelEntries) else f"{entry}.{key}".lstrip(".")
                _check(value[key], kind, name, where)
        missing = [repr(k) for k, kind in expected.items() if k is not ... and k not in value
                   and not isinstance(kind, Omittable)]
        unknown = [repr(k) for k in value if k not in expected and ... not in expected]
        if missing or unknown:
            raise CheckpointCorruptError(f"{where}: {entry} " + " and ".join(
                ([f"lacks {_names(missing)}"] if missing else []) + ([f"has unknown {_names(unknown)}"] if unknown else [])))
    elif isinstance(expected, list):
        if type(value) is not list or len(value) != len(expected):
            raise _invalid(entry, f"a list of {len(expected)} entries", value, where)
        for i, (item, kind) in enumerate(zip(value, expected)):
            _check(item, kind, f"{entry}.{i}", where)
    else:
        expected(value, entry, where)


def _at(tree: dict, path: str) -> Any:
    for key in path.split("."):
        if not isinstance(tree, dict) or key not in tree:
            return _ABSENT
        tree = tree[key]
    return tree


# --------------------------------------------------------------------------- kinds
@dataclass(frozen=True)
class OrNone:
    """None, or what ``kind`` describes."""
    kind: Any

    def __call__(self, value, entry: str, where: str) -> None:
        if value is not None:
            _check(value, self.kind, entry, where)


@dataclass(frozen=True)
class Each:
    """A list (or a dict, with ``of=dict``) whose every item (value) holds what ``kind`` describes."""
    kind: Any
    of: type = list

    def __call__(self, items, entry: str, where: str) -> None:
        if not isinstance(items, self.of):
            raise _invalid(entry, f"a {self.of.__name__}", items, where)
        for i, item in (items.items() if isinstance(items, dict) else enumerate(items)):
            _check(item, self.kind, f"{entry}.{i}", where)


@dataclass(frozen=True)
class Holds:
    """A value for which ``test`` is true; else the error says it must be ``what``."""
    test: Callable[[Any], bool]
    what: str

    def __call__(self, value, entry: str, where: str) -> None:
        if not self.test(value):
            raise _invalid(entry, self.what, value, where)


def IsA(cls: type) -> Holds:  # noqa: N802 - reads as a kind, like the classes above
    return Holds(lambda v: isinstance(v, cls) and not (cls is int and isinstance(v, bool)),
                 f"{'an' if cls.__name__[0] in 'aeiou' else 'a'} {cls.__name__}")


def _item(value):
    return value.item() if isinstance(value, torch.Tensor) and value.numel() == 1 else value


@dataclass(frozen=True)
class Count:
    """An int in [low, 2**53); with ``tensor``, a 0-d int64 tensor holding one."""
    low: int = 0
    tensor: bool = False

    def __call__(self, value, entry: str, where: str) -> None:
        if isinstance(value, torch.Tensor) or self.tensor:
            TensorOf(torch.int64, 0)(value, entry, where)
            value = int(value)
        if not _is_int(value) or not self.low <= value < _EXACT:
            raise _invalid(entry, f"an integer in [{self.low}, 2**53)", value, where)


COUNT_TENSOR = Count(tensor=True)


count_in_any_number = Holds(  # torch.optim keeps ``step`` in a float tensor
    lambda v: _is_real(n := _item(v)) and math.isfinite(n) and n == int(n) and 0 <= n < _EXACT,
    "an integer count in [0, 2**53)")


@dataclass(frozen=True)
class Finite:
    """A float: finite; a float tensor: every element finite, and within [low, high] where given."""
    low: Optional[float] = None
    high: Optional[float] = None

    def __call__(self, t, entry: str, where: str) -> None:
        if isinstance(t, float) and not math.isfinite(t):
            raise _invalid(entry, "a finite number", t, where)
        if not isinstance(t, torch.Tensor) or not t.is_floating_point() or t.numel() == 0:
            return
        if not bool(all_finite(t)):
            raise CheckpointCorruptError(f"{where}: {entry} holds non-finite values ({_show(t)})")
        if self.low is not None and bool((t < self.low).any()):
            raise CheckpointCorruptError(f"{where}: {entry} holds values below {self.low} (min {float(t.min())!r})")
        if self.high is not None and bool((t > self.high).any()):
            raise CheckpointCorruptError(f"{where}: {entry} holds values above {self.high} (max {float(t.max())!r})")


FINITE = Finite()


def no_nan(t, entry: str, where: str) -> None:
    if isinstance(t, torch.Tensor) and t.is_floating_point() and bool(torch.isnan(t).any()):
        raise CheckpointCorruptError(f"{where}: {entry} holds NaN")


non_negative = Holds(lambda v: all(_is_real(x) and math.isfinite(x) and x >= 0 for x in (
    v.flatten().tolist() if isinstance(v, torch.Tensor) else [v])), "a finite number >= 0")
betas_pair = Holds(lambda betas: all(_is_real(b) and 0.0 <= b < 1.0 for b in map(_item, betas)),
                   "a pair of numbers in [0, 1)")


def int8_codes(t, entry: str, where: str) -> None:
    if t.dtype == torch.int8 and t.numel() and int(t.min()) < -127:
        raise CheckpointCorruptError(f"{where}: {entry} holds the code -128; INT8 codes lie in [-127, 127]")


@dataclass(frozen=True)
class Int4Codes:
    """``numel`` packed INT4 codes: every real code's nibble in [1, 15] (code + 8), an odd count's padding 0."""
    numel: int

    def __call__(self, t, entry: str, where: str) -> None:
        size = (self.numel + 1) // 2
        if t.dtype != torch.uint8 or t.numel() != size:
            raise _invalid(entry, f"uint8[{size}] (INT4 codes of {self.numel} values)", t, where)
        nibbles = torch.stack([t & 0x0F, t >> 4], dim=1).reshape(-1).to(torch.int16)
        if bool((nibbles[:self.numel] == 0).any()) or bool((nibbles[self.numel:] != 0).any()):
            raise CheckpointCorruptError(f"{where}: {entry} holds INT4 codes outside [-7, 7]")


@dataclass(frozen=True)
class TensorOf:
    """A tensor of this dtype and number of dimensions."""
    dtype: torch.dtype
    dim: int
    note: str = ""

    def __call__(self, t, entry: str, where: str) -> None:
        if not isinstance(t, torch.Tensor) or t.dtype != self.dtype or t.dim() != self.dim:
            dims = f"{self.dim}-D" if self.dim else "0-d"
            raise _invalid(entry, f"a {dims} {_dtype_name(self.dtype)} tensor{self.note}", t, where)


@dataclass(frozen=True)
class Equal:
    """Exactly ``value``: same types, a one-element tensor by its item; ``what`` names it in the error."""
    value: Any
    what: str = ""

    def __call__(self, value, entry: str, where: str) -> None:
        got = _item(value)
        if not _identical(got, self.value):
            raise _invalid(entry, self.what or repr(self.value), got, where)


def _identical(a, b) -> bool:
    if type(a) is not type(b):
        return False
    return len(a) == len(b) and all(map(_identical, a, b)) if isinstance(a, (list, tuple)) else a == b


@dataclass(frozen=True)
class Like:
    """The kind of the live value it replaces: same scalar type, container type and length, dict keys, tensor
    dtype and shape; no NaN, and no inf where the live value is finite."""
    live: Any

    def __call__(self, saved, entry: str, where: str) -> None:
        live = self.live
        if isinstance(live, torch.Tensor):
            if not isinstance(saved, torch.Tensor) or saved.dtype != live.dtype or saved.shape != live.shape:
                raise _invalid(entry, _show(live), saved, where)
            no_nan(saved, entry, where)
        elif isinstance(live, bool) or live is None or isinstance(live, str):
            if type(saved) is not type(live):
                raise _invalid(entry, "None" if live is None else f"a {type(live).__name__}", saved, where)
        elif isinstance(live, int):
            IsA(int)(saved, entry, where)
        elif isinstance(live, float):
            if not _is_real(saved) or math.isnan(saved) or (math.isinf(saved) and math.isfinite(live)):
                raise _invalid(entry, "a finite number", saved, where)
        elif isinstance(live, (list, tuple)):
            if type(saved) is not type(live) or len(saved) != len(live):
                raise _invalid(entry, f"a {type(live).__name__} of {len(live)} entries", saved, where)
            for i, (s, v) in enumerate(zip(saved, live)):
                Like(v)(s, f"{entry}.{i}", where)
        elif isinstance(live, dict):
            _check(saved, {k: Like(v) for k, v in live.items()}, entry, where)
        elif type(saved) is not type(live):
            raise _invalid(entry, f"a {type(live).__name__}", saved, where)


# =========================================================================== what a checkpoint holds
_TENSOR_RECORD = Holds(lambda info: isinstance(info, dict) and info.get("dtype") in _DTYPE_NAMES and isinstance(
    info.get("shape"), list) and all(_is_int(d) and d >= 0 for d in info["shape"]),
    "{'dtype': a torch dtype name, 'shape': [non-negative ints]}")


def _aliases_stored(model: dict, entry: str, where: str) -> None:
    for key, target in model["aliases"].items():
        if not isinstance(target, str) or target not in model["tensors"]:
            raise CheckpointCorruptError(f"{where}: alias {key!r} points at {target!r}, which is not stored")


_FILE_RECORD = {"sha256": IsA(str), "bytes": Count(), ...: ANY}
#: checkpoint.json, as far as read_checkpoint reads it before decoding the tensors.
_METADATA = {
    "files": {MODEL_FILE: _FILE_RECORD, STATE_FILE: _FILE_RECORD, ...: ANY},
    "model": ({"tensors": Each(_TENSOR_RECORD, of=dict), "aliases": IsA(dict), ...: ANY}, _aliases_stored),
    "config": OrNone({"rank": IsA(int), ...: ANY}),
    "optimizer": OrNone({"class": IsA(str), "state": ANY, ...: ANY}),
    "scheduler": OrNone({"class": IsA(str), "state": ANY, "skipped": Omittable(Each(IsA(str))), ...: ANY}),
    "extra": ANY,
    "rng": {"torch_cpu": ANY, "cuda": ANY, "python": ANY, "numpy": ANY},
    ...: ANY,
}


def _loads(what: str, load: Callable, state, entry: str, where: str) -> None:
    """``load(state)`` succeeds: the state is tried on a scratch generator (the global ones stay untouched)."""
    try:
        load(state)
    except (RuntimeError, ValueError, TypeError, OverflowError) as e:
        raise _invalid(entry, f"{what} ({_first_line(e)})", state, where) from None


def _cuda_rng(states, entry: str, where: str) -> None:
    _check(states, Each(TensorOf(torch.uint8, 1)), entry, where)
    for i, s in enumerate(states[:torch.cuda.device_count()] if torch.cuda.is_available() else ()):
        _loads("a CUDA generator state", torch.Generator(device=f"cuda:{i}").set_state, s, f"{entry}.{i}", where)


def _numpy_rng(state, entry: str, where: str) -> None:
    """numpy's legacy ``[name, keys, pos, has_gauss, cached]``, range-checked and tried on a scratch RandomState."""
    if not (isinstance(state, list) and len(state) == 5 and state[0] == "MT19937"
            and isinstance(state[1], list) and len(state[1]) == 624
            and all(_is_int(k) and 0 <= k < 2**32 for k in state[1])
            and _is_int(state[2]) and 0 <= state[2] <= 624 and state[3] in (0, 1) and _is_int(state[3])
            and _is_real(state[4]) and math.isfinite(state[4])):
        raise _invalid(entry, "['MT19937', 624 ints in [0, 2**32), pos in [0, 624], has_gauss 0 or 1, a finite "
                       "cached gaussian]", state, where)
    try:
        import numpy as np
    except ImportError:  # numpy is optional: nothing to restore it into
        return
    _loads("a numpy RandomState state", lambda s: np.random.RandomState().set_state(
        (s[0], np.array(s[1], dtype=np.uint32), *s[2:])), state, entry, where)


#: The saved RNG states, each also tried on a scratch generator.
_RNG = {
    "torch_cpu": (TensorOf(torch.uint8, 1, " (torch.get_rng_state())"),
                  partial(_loads, "a CPU generator state", lambda s: torch.Generator().set_state(s))),
    "cuda": OrNone(_cuda_rng),
    "python": (Holds(lambda py: isinstance(py, tuple) and len(py) == 3 and py[0] == 3 and _is_int(py[0])
                     and isinstance(py[1], tuple) and len(py[1]) == 625 and all(_is_int(k) for k in py[1])
                     and (py[2] is None or (isinstance(py[2], float) and math.isfinite(py[2]))),
                     "(3, 625 ints, None or a finite float), the state of Python's random module"),
               partial(_loads, "the state of Python's random module", lambda s: random.Random().setstate(s))),
    "numpy": OrNone(_numpy_rng),
}


def _expected(meta: dict, model: nn.Module, optimizer, scheduler) -> List[Tuple[str, Any]]:
    """``(entry, description)`` for each part of a checkpoint that ``load_checkpoint`` restores, in checking order."""
    parts = [("config", partial(_same_config, model))]
    if isinstance(optimizer, QGaLoreOptimizer):  # first: it also decides the shape of the layers' accumulators
        parts.append(("optimizer.accumulation_steps", Omittable(partial(_accumulation, optimizer))))
    parts.append(("model", _model(model)))
    if optimizer is not None:
        parts += [("metadata.optimizer", partial(_saved, optimizer, "optimizer", "; call load_checkpoint without "
                                                                                  "optimizer= or save one")),
                  ("optimizer", _optimizer(optimizer))]
    if scheduler is not None:
        skipped = (meta["scheduler"] or {}).get("skipped", [])
        parts += [("metadata.scheduler", partial(_saved, scheduler, "scheduler", "")),
                  ("scheduler", {key: (Like(value), *_SCHEDULER.get(key, ANY))
                                 for key, value in scheduler.state_dict().items() if key not in skipped})]
    return parts


#: What a scheduler's entries hold beyond the kind of the live value.
_SCHEDULER = {"last_epoch": (Count(low=-1),), "_step_count": (Count(),), "base_lrs": (Each(non_negative),),
              "_last_lr": (Each(non_negative),)}


def _model(model: nn.Module):
    """The live state dict's entries, shapes and dtypes; parameters finite, other float entries free of NaN;
    projected layers' entries as :func:`_layer` says."""
    live = model.state_dict()
    params = {name for name, _ in model.named_parameters(remove_duplicate=False)}
    entries = ModelEntries((key, FINITE if key in params else no_nan) for key in live)
    for name, layer in projected_layers(model):
        entries.update((_join(name, key), kind) for key, kind in _layer(layer).items())
    return partial(_fits, model, live), entries


def _layer(layer) -> dict:
    """A projected layer's entries: finite; codes in range; scales, second moments and 8-bit absmax >= 0; counts."""
    out = {key: FINITE for key, t in layer.state_dict().items() if isinstance(t, torch.Tensor)}
    if layer.weight_bits == 8:
        out.update(weight_codes=int8_codes, weight_scales=Finite(0.0, float(MAX_SCALE[8])))
    spec = layer.spec
    if spec is not None:
        out["proj_codes"] = {4: Int4Codes(math.prod(spec.projection_shape)), 8: int8_codes}.get(spec.proj_bits, FINITE)
        if spec.proj_bits in MAX_SCALE:
            out["proj_scales"] = Finite(0.0, float(MAX_SCALE[spec.proj_bits]))
        second = ("exp_avg_absmax", "exp_avg_sq_absmax") if layer.exp_avg.dtype == torch.uint8 else ("exp_avg_sq",)
        out.update(dict.fromkeys(second, Finite(0.0)), step=COUNT_TENSOR, skipped=COUNT_TENSOR)
    return out


def _optimizer(optimizer):
    """The live optimizer's parameter groups and per-parameter state (:func:`_adamw_state`, :func:`_torch_state`)."""
    live = optimizer.state_dict()
    params = [p for g in optimizer.param_groups for p in g["params"]]
    qgalore = isinstance(optimizer, QGaLoreOptimizer)
    groups = (partial(_group_sizes, live), [_group(g, qgalore) for g in live["param_groups"]])
    anchors = len(optimizer.param_groups[0]["params"]) if qgalore else 0  # projected layers': a mirror of their step
    shaped = type(optimizer).__name__ in _PARAM_SHAPED_STATE

    def state(i: int, first: dict):
        if i < anchors:
            return {"step": COUNT_TENSOR}
        if qgalore:
            return _adamw_state(params[i], optimizer.optim_bits)
        own = live["state"].get(i)
        return _torch_state(params[i], own or first, bool(own), shaped)

    per_parameter = PerParameter(params, getattr(optimizer, "_param_names", {}), state)
    if not qgalore:
        return {"param_groups": groups, "state": per_parameter}
    return _not_an_older_layout, {"param_groups": groups, "state": per_parameter, "skipped_steps": COUNT_TENSOR,
                                  "accumulation_steps": partial(_accumulation, optimizer)}


#: What a param group's hyperparameters hold wherever an optimizer has them, beyond the kind of the live value.
_HYPERPARAMETERS = {**dict.fromkeys(("lr", "initial_lr", "weight_decay", "eps", "momentum", "dampening", "lr_decay",
                                     "alpha"), (non_negative,)), "betas": (betas_pair,)}
# torch.optim classes whose per-parameter state tensors are 0-d (step) or shaped like the parameter.
_PARAM_SHAPED_STATE = {"Adam", "AdamW", "SGD", "RMSprop", "Adagrad", "Adamax", "NAdam", "RAdam", "ASGD", "Rprop"}


def _group(live: dict, qgalore: bool):
    """A param group: this optimizer's parameter indices and settings of the live kinds. torch.optim fills in the
    flags an older version did not save, so another optimizer's group may lack those (not the hyperparameters)."""
    out = {"params": Equal(live["params"], f"{_show(live['params'])} (this optimizer's layout)")}
    for key, value in live.items():
        if key != "params":
            kind = (Like(value), *_HYPERPARAMETERS.get(key, ANY))
            out[key] = kind if qgalore or key in _HYPERPARAMETERS else Omittable(kind)
    if not qgalore:
        return out
    out["name"] = (Like(live["name"]), Equal(live["name"]))
    return out, _valid_hparams


def _adamw_state(p: torch.Tensor, optim_bits: int) -> dict:
    """A parameter's state in the QGaLoreOptimizer's AdamW group: its step and AdamState, flattened."""
    bits = 32 if optim_bits == 8 and p.numel() < ADAM_MIN_8BIT_SIZE else optim_bits  # AdamState.zeros' rule
    moments = {"m": FINITE, "v": Finite(0.0)}
    if bits == 8:
        moments = {"m": ANY, "v": ANY, "absmax_m": Finite(0.0), "absmax_v": Finite(0.0)}
    adam = {"shape": (TensorOf(torch.int64, 1), partial(_shape_of, p)),
            "bits": (TensorOf(torch.int64, 0), Equal(bits, f"{bits} (this optimizer's moments for {list(p.shape)})")),
            "block_size": (TensorOf(torch.int64, 0), Equal(ADAM_BLOCK_SIZE, str(ADAM_BLOCK_SIZE))),
            **moments}
    return {"step": COUNT_TENSOR, "adam": (adam, partial(_adam_moments, p.shape, bits))}


def _torch_state(p: torch.Tensor, ref: dict, live: bool, shaped: bool) -> dict:
    """A parameter's state in another optimizer: the entries of ``ref`` (its live state, else the first saved one)
    with their kinds; tensors finite, ``step`` a count; with ``shaped``, moments of the parameter's shape and dtype."""
    out = {}
    for key, value in ref.items():
        like = Like(value) if live else partial(_resembles, value, key)
        if key == "step":
            out[key] = (like, count_in_any_number)
        else:
            out[key] = ((partial(_of_param, p),) if shaped else ()) + (like, FINITE)
    return out


# --------------------------------------------------------------------------- kinds that compare with live objects
def _same_config(model: nn.Module, saved: Optional[dict], entry: str, where: str) -> None:
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
            for k in sorted(set(saved) | set(current), key=str) if saved.get(k) != current.get(k)]
    if diff:
        raise CheckpointMismatchError(f"{where} was saved with a different qgalore_fx config: {_names(diff)}")


def _fits(model: nn.Module, current: dict, saved: Dict[str, torch.Tensor], entry: str, where: str) -> None:
    """The live state dict's keys, shapes and dtypes, and each layer's update schedule: else another model's."""
    problems = []
    missing = [k for k in current if k not in saved]
    unexpected = [k for k in saved if k not in current]
    if missing:
        problems.append(f"missing from the checkpoint: {_names(missing)}")
    if unexpected:
        problems.append(f"not in the model: {_names(unexpected)}")
    both = [k for k in current if k in saved]
    shapes = [k for k in both if saved[k].shape != current[k].shape]
    if shapes:
        problems.append("shape mismatch: " + _names(
            f"{k} (checkpoint {list(saved[k].shape)}, model {list(current[k].shape)})" for k in shapes))
        if all(k.endswith(".accum") for k in shapes):
            problems.append("(only the projected layers' accumulators differ: the checkpoint was saved with another "
                            "accumulation_steps or fused setting; build the optimizer as the saved run did)")
    dtypes = [f"{k} (checkpoint {_dtype_name(saved[k].dtype)}, model {_dtype_name(current[k].dtype)})"
              for k in both if k not in shapes and saved[k].dtype != current[k].dtype]
    if dtypes:
        problems.append(f"dtype mismatch: {_names(dtypes)}")
    for name, layer in projected_layers(model):
        if layer.spec is not None and not problems:
            try:
                check_control(saved[_join(name, "_extra_state")], layer.spec, name)
            except ValueError as e:
                problems.append(str(e))
    if problems:
        raise CheckpointMismatchError(f"{where} does not fit this model's parameters and buffers — "
                                      + "; ".join(problems))


def _saved(live, what: str, hint: str, meta: Optional[dict], entry: str, where: str) -> None:
    """The metadata of a saved optimizer or scheduler: one of ``live``'s class."""
    if meta is None:
        raise CheckpointMismatchError(f"{where} has no {what} state (it was saved with {what}=None){hint}")
    if meta["class"] != type(live).__name__:
        raise CheckpointMismatchError(f"{where} holds the state of a {meta['class']}, not of a "
                                      f"{type(live).__name__}")


def _accumulation(optimizer, value, entry: str, where: str) -> None:
    """The QGaLoreOptimizer's ``accumulation_steps`` (loading never changes it)."""
    if not _is_int(value) or value < 1:
        raise _invalid(entry, "an int >= 1", value, where)
    if value != optimizer.accumulation_steps:
        raise CheckpointMismatchError(
            f"{where} was saved with accumulation_steps={value}, this optimizer has {optimizer.accumulation_steps}: "
            f"build the optimizer with accumulation_steps={value} to resume this run")


def _not_an_older_layout(state, entry: str, where: str) -> None:
    if isinstance(state, dict) and "qgalore_layers" in state:
        raise CheckpointMismatchError(f"{where} keeps the projected layers' state in the optimizer (an older "
                                      "layout); this version keeps it in the model's state dict")


def _group_sizes(live: dict, groups, entry: str, where: str) -> None:
    sizes = [len(g["params"]) for g in live["param_groups"]]
    saved = [len(g["params"]) if isinstance(g, dict) and isinstance(g.get("params"), list) else None
             for g in groups] if isinstance(groups, list) else sizes
    if saved != sizes:
        raise CheckpointMismatchError(f"{where}: optimizer parameter groups differ — checkpoint has groups of "
                                      f"{saved} parameters, this optimizer {sizes}")


def _valid_hparams(group: dict, entry: str, where: str) -> None:
    try:
        _check_hparams(group["lr"], group["betas"], group["eps"], group["weight_decay"])
    except ValueError as e:
        raise CheckpointCorruptError(f"{where}: {entry}: {e}") from None


class _OtherShape(Exception):
    """Raised inside :class:`PerParameter`: this entry is the state of a parameter of another shape."""


@dataclass(frozen=True)
class PerParameter:
    """``optimizer.state``: parameter index -> the state ``kind_of(index, first saved state)`` describes, for the
    parameters that have one. States of parameters of other shapes are a CheckpointMismatchError naming them all."""
    params: list
    names: dict
    kind_of: Callable[[int, Any], Any]

    def __call__(self, state, entry: str, where: str) -> None:
        if not isinstance(state, dict):
            raise _invalid(entry, "a dict", state, where)
        other = []
        for index, s in state.items():
            if not _is_int(index) or not 0 <= index < len(self.params):
                raise _invalid(f"an {entry} key", f"a parameter index in [0, {len(self.params)})", index, where)
            if not isinstance(s, dict):
                raise _invalid(f"{entry}.{index}", "a dict", s, where)
            try:
                _check(s, self.kind_of(index, next(iter(state.values()))), f"{entry}.{index}", where)
            except _OtherShape as e:
                p = self.params[index]
                other.append(f"{self.names.get(id(p), index)} (checkpoint {e.args[0]}, model {list(p.shape)})")
        if other:
            raise CheckpointMismatchError(f"{where}: optimizer state shapes differ: {_names(other)}")


def _shape_of(p: torch.Tensor, shape: torch.Tensor, entry: str, where: str) -> None:
    if shape.tolist() != list(p.shape):
        raise _OtherShape(shape.tolist())


def _of_param(p: torch.Tensor, t, entry: str, where: str) -> None:
    """A tensor with dimensions has the parameter's shape (else it is another parameter's state) and dtype."""
    if isinstance(t, torch.Tensor) and t.dim():
        if t.shape != p.shape:
            raise _OtherShape(list(t.shape))
        if t.dtype != p.dtype:
            raise _invalid(entry, f"a {_dtype_name(p.dtype)} tensor (the parameter's dtype)", t, where)


def _resembles(ref, key, value, entry: str, where: str) -> None:
    """The kind of the other parameters' ``key``: a tensor of its dtype (0-d or not), else a value of its type."""
    if isinstance(ref, torch.Tensor):
        same = isinstance(value, torch.Tensor) and value.dtype == ref.dtype and (value.dim() == 0) == (ref.dim() == 0)
    else:
        same = type(value) is type(ref)
    if not same:
        raise _invalid(entry, f"like {_show(ref)} (the other parameters' {key!r})", value, where)


def _adam_moments(shape: torch.Size, bits: int, adam: dict, entry: str, where: str) -> None:
    """Moments of AdamState's dtypes and shapes for this parameter, checked without copying them."""
    try:
        AdamState(shape=shape, bits=bits, block_size=ADAM_BLOCK_SIZE, m=adam["m"], v=adam["v"],
                  absmax_m=adam.get("absmax_m"), absmax_v=adam.get("absmax_v"))
    except (ValueError, TypeError) as e:
        raise CheckpointCorruptError(f"{where}: {entry}: {e}") from None


# =========================================================================== load
def load_checkpoint(path, model: nn.Module, optimizer: Optional[torch.optim.Optimizer] = None,
                    scheduler: Optional[Any] = None) -> dict:
    """Restore ``model`` (and ``optimizer``, ``scheduler``, RNG states) from ``path``; returns the ``extra`` dict.

    Every entry is verified before anything is modified (docs/checkpoints.md). ``model`` must be
    built and transformed exactly as when saving; ``optimizer``/``scheduler`` created the same way.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    _refuse_sharded(model, "load_checkpoint")
    ckpt = read_checkpoint(path)
    where = f"checkpoint {ckpt['path']}"
    for entry, expected in _expected(ckpt["metadata"], model, optimizer, scheduler):  # everything, first
        _check(_at(ckpt, entry), expected, entry, where)
    scheduler_state = None if scheduler is None else {**scheduler.state_dict(), **ckpt["scheduler"]}

    # ---- then apply. Nothing below is expected to fail: an error here is a bug of the checks above.
    step = "the model"
    try:
        model.load_state_dict(ckpt["model"], strict=True)
        if optimizer is not None:
            step = "the optimizer"
            optimizer.load_state_dict(ckpt["optimizer"])
        if scheduler is not None:
            step = "the scheduler"
            scheduler.load_state_dict(scheduler_state)
        step = "the RNG states"
        _set_rng_state(ckpt["rng"])
    except Exception as e:
        raise CheckpointError(f"{where} passed validation but {step} failed to load ({type(e).__name__}: {e}); "
                              "the live state may be partially overwritten: rebuild it before retrying") from e
    return dict(ckpt["extra"])


# =========================================================================== helpers
def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


_DTYPE_NAMES = {_dtype_name(d) for d in (
    torch.float64, torch.float32, torch.float16, torch.bfloat16, torch.int64, torch.int32, torch.int16, torch.int8,
    torch.uint8, torch.bool, getattr(torch, "float8_e4m3fn", torch.float32), getattr(torch, "float8_e5m2",
                                                                                       torch.float32))}


def _version() -> str:
    from qgalore_fx import __version__

    return __version__
