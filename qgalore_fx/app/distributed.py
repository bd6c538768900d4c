"""How ``qgalore-fx pretrain`` runs: in one process, or sharded over the processes ``torchrun`` starts.

The training loop (:mod:`qgalore_fx.app.loop`, driven by :mod:`qgalore_fx.app.train`) asks a *job* everything that
depends on the number of processes:

==========================  ==========================================  ==============================================
                            :class:`Local` (one process)                :class:`Sharded` (``torchrun``, WORLD_SIZE > 1)
==========================  ==========================================  ==============================================
``shard(model)``            the model as it is                          ``fully_shard`` per decoder block, then the root
                                                                        (FSDP2; after ``transform``, before the
                                                                        optimizer)
``local(batch)``            the whole batch                             this rank's rows of the global batch
``mean(loss)``              the loss                                    its mean over ranks (one scalar all-reduce)
``total(sums)``             the sums                                    their sums over ranks
``save`` / ``load``         ``qgalore_fx.save_checkpoint`` into         ``torch.distributed.checkpoint`` into a new
                            ``RUN_DIR/checkpoint``                      ``RUN_DIR/dcp/step-NNNNNN`` per save
``is_main``                 True                                        rank 0: the one that logs and writes files
==========================  ==========================================  ==============================================

Every rank draws the same global batch (the batch-order generator is seeded alike) and trains on its slice; FSDP2
and the projected layers average the gradients over ranks, so W ranks follow one process on the whole batch.

Distributed checkpoints
-----------------------
A save writes ``get_state_dict(model, optimizer)`` with ``dcp.save`` into a directory of its own,
``RUN_DIR/dcp/step-000100``. Once every rank has finished writing (a barrier), rank 0 adds ``progress.json`` (the
scheduler, the batch-order generator, the step, the metrics so far: what is not a tensor of the model or the
optimizer) and then records the directory in ``RUN_DIR/dcp/latest`` by writing a temporary file and renaming it
over the old one, which is atomic; only then does it delete the older directories. A process killed at any point
of a save therefore leaves ``latest`` naming the previous complete checkpoint. ``load`` reads the directory
``latest`` names: ``dcp.load`` into ``get_state_dict``'s dicts, ``set_state_dict``, the scheduler and the progress.
DCP reshards, so a run may resume on another number of ranks (the numbers then agree up to the order of sums). The
global RNG states are not saved: after the seeded initial model the run draws nothing from them (the batch order
has its own generator, stochastic rounding is seeded from the optimizer's counters), and on the same number of ranks
a resumed run ends bit for bit where an uninterrupted one does (tests/test_pretrain_distributed.py).
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import pathlib
import shutil
from typing import Callable, Iterator, TypeVar

import torch

from qgalore_fx.app import data as data_lib

__all__ = ["DCP_DIR", "Local", "Sharded", "env_world_size", "job", "sharding_problem"]

T = TypeVar("T")

DCP_DIR = "dcp"  # RUN_DIR/dcp/step-NNNNNN/ (DCP files + progress.json) and RUN_DIR/dcp/latest
LATEST = "latest"
PROGRESS = "progress.json"
CHECKPOINT_DIR = "checkpoint"  # one process: RUN_DIR/checkpoint (qgalore_fx.save_checkpoint)
IGNORE = -100  # cross_entropy's ignore_index: a label that scores nothing


def sharding_problem(method: str, batch_size: int, world_size: int) -> tuple[str, str] | None:
    """Why a run of ``method`` with the global ``batch_size`` cannot be sharded over ``world_size`` processes:
    ``(the TrainConfig field at fault, the reason)``, or None."""
    if world_size == 1:
        return None
    if batch_size % world_size:
        return "batch_size", (f"the global batch of {batch_size} sequences does not divide among the {world_size} "
                              "processes, each of which trains on an equal slice of it")
    if method == "adamw8bit":
        return "method", ("adamw8bit runs in one process only: bitsandbytes' 8-bit AdamW does not step FSDP2's "
                          "sharded parameters (run it without torchrun, or train with adamw)")
    return None


def env_world_size() -> int:
    """The number of processes ``torchrun`` started (``WORLD_SIZE``), 1 without it."""
    try:
        return max(1, int(os.environ.get("WORLD_SIZE", "1")))
    except ValueError:
        raise ValueError(f"WORLD_SIZE={os.environ['WORLD_SIZE']!r} is not a number of processes") from None


@contextlib.contextmanager
def job(device: str) -> Iterator[Local | Sharded]:
    """The job of this process on ``device`` (a resolved device name).

    Under ``torchrun`` with more than one process this joins the process group (gloo on CPU, nccl on CUDA, each
    rank on its ``LOCAL_RANK``'s GPU) and leaves it at the end; a process group the caller already set up is
    used as it is and left to the caller. Otherwise the job is :class:`Local`.
    """
    import torch.distributed as dist

    joined = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
    if env_world_size() == 1 and not joined:
        yield Local()
        return
    if not dist.is_available():
        raise ValueError("this torch is built without torch.distributed: run one process (without torchrun)")
    cuda = torch.device(device).type == "cuda"
    if cuda and torch.device(device).index is None:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    if not joined:
        dist.init_process_group("nccl" if cuda else "gloo")
    try:
        yield Sharded(torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu"))
    finally:
        if not joined:
            dist.destroy_process_group()


class Local:
    """One process: the loop as it runs on a single machine, checkpoints by ``qgalore_fx.save_checkpoint``."""

    rank, world_size, is_main = 0, 1, True

    def describe(self) -> dict:
        return {}

    def check(self, config) -> None:
        pass

    def shard(self, model: torch.nn.Module) -> torch.nn.Module:
        return model

    def local(self, batch: data_lib.Batch) -> data_lib.Batch:
        return batch

    def mean(self, value: torch.Tensor) -> torch.Tensor:
        return value

    def total(self, sums: torch.Tensor) -> torch.Tensor:
        return sums

    def from_main(self, fn: Callable[[], T]) -> T:
        return fn()

    def main_first(self, fn: Callable[[], T]) -> T:
        return fn()

    def has_checkpoint(self, run_dir: pathlib.Path) -> bool:
        """Whether ``run_dir`` holds a checkpoint to resume from; ValueError if only a sharded run's."""
        if (run_dir / CHECKPOINT_DIR).exists() or any(run_dir.glob(CHECKPOINT_DIR + ".old-*")):
            return True
        if (run_dir / DCP_DIR / LATEST).exists():
            raise ValueError(f"{run_dir} was trained on several processes (it has {DCP_DIR}/, distributed "
                             "checkpoints): resume it under torchrun")
        return False

    def save(self, run_dir: pathlib.Path, model, optimizer, scheduler, extra: dict) -> pathlib.Path:
        import qgalore_fx

        return pathlib.Path(qgalore_fx.save_checkpoint(run_dir / CHECKPOINT_DIR, model, optimizer,
                                                       scheduler=scheduler, **extra))

    def load(self, run_dir: pathlib.Path, model, optimizer, scheduler) -> tuple[dict, str]:
        import qgalore_fx

        path = run_dir / CHECKPOINT_DIR
        return qgalore_fx.load_checkpoint(path, model, optimizer, scheduler), f"checkpoint {path}"


class Sharded:
    """One of the ``world_size`` ranks of a process group: FSDP2 and distributed checkpoints (module docstring)."""

    def __init__(self, device: torch.device):
        import torch.distributed as dist

        self.dist = dist
        self.device = device
        self.rank, self.world_size = dist.get_rank(), dist.get_world_size()
        self.is_main = self.rank == 0
        self.latest: str | None = None  # the checkpoint this job loaded or saved last (what dcp/latest names)

    def describe(self) -> dict:
        return {"distributed": {"world_size": self.world_size, "backend": self.dist.get_backend()}}

    def check(self, config) -> None:
        """Raise ValueError when ``config`` (a ``TrainConfig``) cannot run on these ranks."""
        problem = sharding_problem(config.method, config.batch_size, self.world_size)
        if problem:
            field, why = problem
            raise ValueError(f"{field}={getattr(config, field)!r}: {why}")

    def shard(self, model: torch.nn.Module) -> torch.nn.Module:
        from torch.distributed.fsdp import fully_shard

        for block in model.model.layers:
            fully_shard(block)
        fully_shard(model)
        return model

    def local(self, batch: data_lib.Batch) -> data_lib.Batch:
        """This rank's rows (``tensor_split``: equal parts when the rows divide). A rank left without rows (the
        last validation batch can be short) gets one window whose labels score nothing, since FSDP2 needs every
        rank in every forward."""
        rows = [t.tensor_split(self.world_size)[self.rank] for t in batch]
        if not rows[0].shape[0]:
            rows = [batch.input_ids[:1], torch.full_like(batch.labels[:1], IGNORE)]
        return data_lib.Batch(*rows)

    def mean(self, value: torch.Tensor) -> torch.Tensor:
        out = value.detach().clone()
        self.dist.all_reduce(out)
        return out / self.world_size

    def total(self, sums: torch.Tensor) -> torch.Tensor:
        out = sums.to(self.device)
        self.dist.all_reduce(out)
        return out.cpu()

    def barrier(self) -> None:
        self.dist.barrier()

    def from_main(self, fn: Callable[[], T]) -> T:
        """``fn()`` run on rank 0, its result (or its exception) on every rank."""
        box: list = [None, None]
        if self.is_main:
            try:
                box[0] = fn()
            except Exception as e:  # every rank raises it, none waits for a result that never comes
                box[1] = e
        self.dist.broadcast_object_list(box, src=0)
        if box[1] is not None:
            raise box[1]
        return box[0]

    def main_first(self, fn: Callable[[], T]) -> T:
        """``fn()`` on every rank, rank 0 first (it fills a cache the others then read)."""
        result = self.from_main(fn)
        return result if self.is_main else fn()

    # ------------------------------------------------------------------------------------------ checkpoints
    def has_checkpoint(self, run_dir: pathlib.Path) -> bool:
        """Whether ``run_dir`` holds a distributed checkpoint; ValueError if only a one-process run's."""
        if (run_dir / DCP_DIR / LATEST).exists():
            return True
        if (run_dir / CHECKPOINT_DIR).exists():
            raise ValueError(f"{run_dir} was trained in one process (it has {CHECKPOINT_DIR}/, not {DCP_DIR}/): "
                             "resume it without torchrun")
        return False

    def save(self, run_dir: pathlib.Path, model, optimizer, scheduler, extra: dict) -> pathlib.Path:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict

        root = run_dir / DCP_DIR
        path = root / f"step-{extra['step']:06d}"
        # The step of the checkpoint loaded is saved again only by a run resumed at its last step, which trains
        # nothing: its tensors are those on disk, and only progress.json changes (atomically).
        if path.name != self.latest:
            if self.is_main:
                root.mkdir(exist_ok=True)
                shutil.rmtree(path, ignore_errors=True)  # left by a save that was killed: never recorded as latest
            self.barrier()
            model_sd, optim_sd = get_state_dict(model, optimizer)
            dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=path)
            self.barrier()  # complete on every rank
        self.latest = path.name
        if self.is_main:
            progress = _encode(extra) | {"scheduler": scheduler.state_dict(), "world_size": self.world_size}
            _write_atomic(path / PROGRESS, json.dumps(progress))
            _write_atomic(root / LATEST, path.name + "\n")
            for old in root.glob("step-*"):
                if old != path:
                    shutil.rmtree(old, ignore_errors=True)
        return path

    def load(self, run_dir: pathlib.Path, model, optimizer, scheduler) -> tuple[dict, str]:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

        root = run_dir / DCP_DIR
        name = (root / LATEST).read_text().strip()
        path = root / name
        where = f"checkpoint {path}"
        if not (name.startswith("step-") and (path / PROGRESS).is_file() and (path / ".metadata").is_file()):
            raise ValueError(f"{root / LATEST} names {name!r}, which is not a complete distributed checkpoint "
                             f"of {root} (a step-NNNNNN directory with .metadata and {PROGRESS})")
        try:
            progress = json.loads((path / PROGRESS).read_text())
            extra = _decode(progress)
        except (ValueError, TypeError, KeyError) as e:
            raise ValueError(f"{where}: {PROGRESS} is not a progress record ({type(e).__name__}: {e})") from None
        model_sd, optim_sd = get_state_dict(model, optimizer)
        state = {"model": model_sd, "optim": optim_sd}
        dcp.load(state, checkpoint_id=path)
        set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
        scheduler.load_state_dict(progress["scheduler"])
        self.latest = name
        return extra, where


# ---------------------------------------------------------------------------------------------- progress.json
def _encode(extra: dict) -> dict:
    """``extra`` as JSON: a tensor (the batch-order generator's state, the loss since the last record) becomes
    ``{"tensor": base64 of its bytes, "dtype", "shape"}``; everything else is JSON already."""
    out = {}
    for k, v in extra.items():
        if isinstance(v, torch.Tensor):
            t = v.detach().cpu().contiguous()
            v = {"tensor": base64.b64encode(t.numpy().tobytes()).decode(), "dtype": str(t.dtype).removeprefix(
                "torch."), "shape": list(t.shape)}
        out[k] = v
    return out


def _decode(progress: dict) -> dict:
    out = {}
    for k, v in progress.items():
        if k in ("scheduler", "world_size"):
            continue
        if isinstance(v, dict) and set(v) == {"tensor", "dtype", "shape"}:
            raw = bytearray(base64.b64decode(v["tensor"]))
            v = torch.frombuffer(raw, dtype=getattr(torch, v["dtype"])).reshape(v["shape"]).clone()
        out[k] = v
    return out


def _write_atomic(path: pathlib.Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
