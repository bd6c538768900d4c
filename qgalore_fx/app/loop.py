"""The step loop that ``qgalore-fx pretrain`` and ``qgalore-fx finetune`` both drive, and what their runs share.

:mod:`qgalore_fx.app.train` and :mod:`qgalore_fx.app.finetune` differ in where the model and the data come from,
which baselines they run and how they evaluate; everything from the first step to the last checkpoint is here:

- :func:`train_steps`: forward, ``backward``, ``optimizer.step``, ``zero_grad``, scheduler step; a record in
  ``metrics.jsonl`` every ``log_every`` steps (the mean training loss since the previous record, the learning
  rate, throughput), an evaluation every ``eval_every`` steps and at the last one, a checkpoint every
  ``save_every`` steps. The caller passes its evaluation and its checkpoint writer in.
- :class:`Progress`: where a run stands, what a checkpoint adds to the model, optimizer and scheduler states, and
  what a resumed run continues from.
- the loss (token-mean cross entropy of the logits against labels that are already shifted, see
  :mod:`qgalore_fx.app.data`), the learning-rate schedule, the run directory and its files.

A non-finite training loss stops the run with ``FloatingPointError`` naming the first step it appeared at. The
check costs no host synchronization per step: the step is kept in a device tensor and read with the window's loss,
at each record and before each checkpoint, so a checkpoint never holds the state after such a step. (Projected
layers skip a non-finite update by themselves; the baselines' weights may take up to ``log_every - 1`` such steps
before the run stops, and are then not saved.)
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import pathlib
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from qgalore_fx.app import data as data_lib
from qgalore_fx.app import distributed as distributed_lib

__all__ = [
    "DEVICE_TYPES",
    "MetricsLog",
    "Progress",
    "cosine_with_warmup",
    "device_problem",
    "evaluate",
    "is_device_name",
    "is_number",
    "load",
    "loss",
    "make_run_dir",
    "plot",
    "refreshes",
    "require",
    "require_int",
    "save",
    "train_steps",
    "write_json",
    "write_lines",
]

# --------------------------------------------------------------------------- configuration checks


def require(ok: bool, name: str, what: str, value) -> None:
    """Raise ``ValueError("NAME must be WHAT; got VALUE")`` unless ``ok``."""
    if not ok:
        raise ValueError(f"{name} must be {what}; got {value!r}")


def require_int(config, name: str, low: int, what: str, optional: bool = False, high: int | None = None) -> None:
    """``config.NAME`` is an int in ``[low, high]`` (or None when ``optional``)."""
    value = getattr(config, name)
    if value is None and optional:
        return
    ok = isinstance(value, int) and not isinstance(value, bool) and value >= low and (high is None or value <= high)
    require(ok, name, what, value)


def is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


DEVICE_TYPES = ("cpu", "cuda")  # what the training loop runs on; "meta", "mps", ... are refused


def is_device_name(device) -> bool:
    """``device`` is "auto" or names a device type the loop runs on (not whether this machine has it)."""
    if device == "auto":
        return True
    try:
        d = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        return False
    return d.type in DEVICE_TYPES and (d.type == "cuda" or d.index is None)


def device_problem(device: str) -> str | None:
    """Why this machine cannot train on ``device`` (a resolved device name), or None."""
    d = torch.device(device)
    if d.type == "cuda":
        if not torch.cuda.is_available():
            return "CUDA is not available on this machine"
        count = torch.cuda.device_count()
        if d.index is not None and d.index >= count:
            return f"this machine has {count} CUDA device(s), cuda:0 to cuda:{count - 1}"
    return None


def cosine_with_warmup(steps: int, warmup: int, min_lr_ratio: float) -> Callable[[int], float]:
    """LR multiplier for ``LambdaLR``: linear warmup to 1, then cosine down to ``min_lr_ratio``.

    Step ``s`` (0-based, the number of ``scheduler.step()`` calls so far) gets
    ``(s + 1) / warmup`` during warmup, so the first step already trains.
    """

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, steps - warmup))
        return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return factor


# --------------------------------------------------------------------------- loss and evaluation


def _autocast(config):
    if config.autocast == "bf16":
        return torch.autocast(torch.device(config.device).type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _logits(output) -> torch.Tensor:
    if isinstance(output, torch.Tensor):
        return output
    logits = getattr(output, "logits", None)
    return logits if logits is not None else output[0]


def loss(model, batch: data_lib.Batch, config, reduction: str = "mean") -> torch.Tensor:
    """Cross entropy of ``model``'s logits for ``batch`` (labels already shifted), on ``config.device`` with
    ``config.autocast``; fp32 whatever the autocast.

    The key/value cache stays the model's default, except under activation checkpointing, which turns it off
    (with a warning when asked for it): without a cache and an attention mask, transformers checks
    ``position_ids`` for packed sequences, a host synchronization per forward."""
    x = batch.input_ids.to(config.device, non_blocking=True)
    y = batch.labels.to(config.device, non_blocking=True)
    no_cache = {"use_cache": False} if getattr(model, "is_activation_checkpointing", False) else {}
    with _autocast(config):
        logits = _logits(model(input_ids=x, **no_cache))
    return F.cross_entropy(logits.float().flatten(0, 1), y.flatten(), reduction=reduction)


@torch.no_grad()
def evaluate(model, batches: Iterable[data_lib.Batch], config, job=None) -> tuple[float, int]:
    """Token-mean loss over ``batches`` and the number of tokens scored (labels ``IGNORE`` score nothing).

    ``job`` (:mod:`qgalore_fx.app.distributed`): each rank scores its rows of every batch and the sums are added over
    ranks, so every rank returns the loss over all of them.
    """
    job = job or distributed_lib.Local()
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for batch in batches:
        batch = job.local(batch)
        total += float(loss(model, batch, config, reduction="sum"))
        count += int((batch.labels != distributed_lib.IGNORE).sum())
    total, count = job.total(torch.tensor([total, count], dtype=torch.float64)).tolist()
    model.train(was_training)
    return total / count, int(count)


def refreshes(optimizer) -> tuple[int | None, float | None]:
    """Subspace refreshes over all projected layers, and the seconds they took (None, None: no such layers)."""
    layer_stats = getattr(optimizer, "layer_stats", None)
    if layer_stats is None:
        return None, None
    stats = layer_stats().values()
    return sum(s["refresh_count"] for s in stats), sum(s["refresh_seconds"] for s in stats)


# --------------------------------------------------------------------------- where a run stands


_TIMES = ("window_seconds", "train_seconds", "elapsed_seconds", "refresh_seconds")


@dataclass
class Progress:
    """Where a run stands: what a checkpoint adds to the model, optimizer, scheduler and batch-order states."""

    step: int = 0
    history: list[dict] = field(default_factory=list)  # the metrics.jsonl records so far
    window_loss: torch.Tensor = field(default_factory=lambda: torch.zeros(()))  # training loss summed since the last record
    window_steps: int = 0
    window_seconds: float = 0.0
    train_seconds: float = 0.0  # in the training steps (not evaluations or checkpoints)
    step_seconds: list[float] = field(default_factory=list)  # each step's
    elapsed_seconds: float = 0.0  # since the run started, up to ``started`` (the time of earlier processes)
    refresh_seconds: float = 0.0  # refresh time measured before the last resume (the layers count since then)
    resumed_at: list[int] = field(default_factory=list)
    started: float = field(default_factory=time.perf_counter, repr=False)  # when this process started the run

    def elapsed(self) -> float:
        return self.elapsed_seconds + time.perf_counter() - self.started

    def final_train_loss(self) -> float:
        return next((r["loss"] for r in reversed(self.history) if "loss" in r), math.nan)

    def extra(self, optimizer) -> dict:
        """What a checkpoint of this progress holds besides the model, optimizer and scheduler."""
        _, layer_seconds = refreshes(optimizer)
        return dict(
            step=self.step, history=self.history, window_loss=self.window_loss.detach().clone(),
            window_steps=self.window_steps, window_seconds=self.window_seconds, train_seconds=self.train_seconds,
            step_seconds=self.step_seconds, elapsed_seconds=self.elapsed(),
            refresh_seconds=self.refresh_seconds + (layer_seconds or 0.0), resumed_at=self.resumed_at)

    @classmethod
    def from_extra(cls, extra: dict, where: str, steps: int, started: float) -> Progress:
        """The progress a checkpoint's ``extra`` records, checked (``ValueError`` naming ``where``), as resumed."""
        step = extra.get("step")
        if not (isinstance(step, int) and 1 <= step <= steps):  # at ``steps``: only the summary is missing
            raise ValueError(f"{where}: step must be in [1, {steps}], got {step!r}")
        history, window_loss = extra.get("history"), extra.get("window_loss")
        if not (isinstance(history, list) and all(isinstance(r, dict) and isinstance(r.get("step"), int)
                                                  and r["step"] <= step for r in history)):
            raise ValueError(f"{where}: history must be the list of metrics records up to step {step}")
        if not (isinstance(window_loss, torch.Tensor) and window_loss.dim() == 0 and window_loss.is_floating_point()):
            raise ValueError(f"{where}: window_loss must be a 0-d float tensor, got {window_loss!r}")
        # A checkpoint of pre-training has no step_seconds before this loop, one of fine-tuning no window_seconds
        # or elapsed_seconds: they start from zero.
        numbers = {k: extra.get(k, 0.0) if k in ("window_seconds", "elapsed_seconds") else extra.get(k)
                   for k in ("window_steps", *_TIMES)}
        step_seconds = extra.get("step_seconds", [])
        if not all(_count(v) for v in [*numbers.values(), *step_seconds]) or not isinstance(
                numbers["window_steps"], int) or not isinstance(step_seconds, list):
            raise ValueError(f"{where}: {numbers} and step_seconds must be finite numbers >= 0 (window_steps an int)")
        resumed_at = extra.get("resumed_at")
        if not (isinstance(resumed_at, list) and all(isinstance(s, int) for s in resumed_at)):
            raise ValueError(f"{where}: resumed_at must be a list of steps, got {resumed_at!r}")
        return cls(step=step, history=history, window_loss=window_loss, window_steps=numbers["window_steps"],
                   step_seconds=[float(s) for s in step_seconds], resumed_at=[*resumed_at, step], started=started,
                   **{k: float(numbers[k]) for k in _TIMES})


def _count(value) -> bool:
    return is_number(value) and math.isfinite(value) and value >= 0


def save(job, run_dir: pathlib.Path, model, optimizer, scheduler, generator: torch.Generator, progress: Progress,
         identity: dict) -> pathlib.Path:
    """Write a checkpoint through ``job`` (:mod:`qgalore_fx.app.distributed`): the run's objects, ``progress``, the
    batch-order generator and ``identity`` (what a resume must find unchanged: the configuration, the data)."""
    extra = progress.extra(optimizer) | {"batch_generator": generator.get_state()} | identity
    return job.save(run_dir, model, optimizer, scheduler, extra)


def load(job, run_dir: pathlib.Path, model, optimizer, scheduler, generator: torch.Generator, steps: int,
         identity: dict, started: float) -> Progress:
    """Load the run's checkpoint into the run's objects (inverse of :func:`save`); the progress it records."""
    extra, where = job.load(run_dir, model, optimizer, scheduler)
    for key, value in identity.items():
        if extra.get(key) != value:
            raise ValueError(f"{where} was written by another run than {run_dir}/config.json: its {key} differs "
                             "(the configuration, the corpus and the tokenizer must be those the run started with)")
    try:
        generator.set_state(extra["batch_generator"])
    except (KeyError, RuntimeError, TypeError) as e:
        raise ValueError(f"{where}: batch_generator is not a torch.Generator state ({e})") from None
    return Progress.from_extra(extra, where, steps, started)


# --------------------------------------------------------------------------- the loop


class _FirstNonFinite:
    """The first step whose training loss is not finite, and that loss (step 0: none yet), kept on the loss's
    device so that watching every step costs no host synchronization."""

    def __init__(self, device: torch.device):
        self.step = torch.zeros((), dtype=torch.int64, device=device)
        self.loss = torch.zeros((), device=device)

    def watch(self, loss: torch.Tensor, step: int) -> None:
        first = (self.step == 0) & ~torch.isfinite(loss)
        self.step = torch.where(first, step, self.step)
        self.loss = torch.where(first, loss.float(), self.loss)


def train_steps(model, optimizer, scheduler, batches: Iterator[data_lib.Batch], progress: Progress, config, *,
                evaluate: Callable[[bool], tuple[float, int]], save: Callable[[Progress], object],
                metrics: MetricsLog, times: tuple[str, ...], desc: str, verbose: bool, job=None) -> None:
    """Train from ``progress.step + 1`` to ``config.steps``, updating ``progress``.

    ``config`` gives ``steps``, ``log_every``, ``eval_every``, ``save_every``, ``batch_size``, ``seq_len``,
    ``device``, ``autocast``, ``lr`` and ``warmup``. ``evaluate(last)`` returns ``(val_loss, val_tokens)``, ``last``
    telling whether it is the evaluation of the last step. ``save(progress)`` writes a checkpoint (every
    ``save_every`` steps before the last; the caller saves the last). Each record in ``metrics`` has ``step``,
    ``loss``, ``lr``, ``tokens_per_s`` (since the previous record) and the wall-clock figures named in ``times``:
    ``"elapsed_s"`` (since the run started), ``"step_s"`` (the last step's). ``job``: the process's share of a
    sharded run (:mod:`qgalore_fx.app.distributed`); the recorded loss is the mean over its ranks.
    """
    from tqdm import tqdm

    job = job or distributed_lib.Local()
    device = torch.device(config.device)
    tokens_per_step = config.batch_size * config.seq_len
    progress.window_loss = progress.window_loss.to(device)
    non_finite = _FirstNonFinite(device)
    bar = tqdm(range(progress.step + 1, config.steps + 1), desc=desc, disable=not verbose, dynamic_ncols=True,
               file=sys.stderr, initial=progress.step, total=config.steps)
    try:
        for step in bar:
            t0 = time.perf_counter()
            lr = scheduler.get_last_lr()[0]
            step_loss = loss(model, job.local(next(batches)), config)
            batch_loss = job.mean(step_loss.detach())  # over the whole global batch
            non_finite.watch(batch_loss, step)
            step_loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            scheduler.step()
            progress.window_loss += batch_loss
            if device.type == "cuda":  # the step times below are the GPU's, not the launches'
                torch.cuda.synchronize(device)
            dt = time.perf_counter() - t0
            progress.step = step
            progress.window_steps += 1
            progress.window_seconds += dt
            progress.train_seconds += dt
            progress.step_seconds.append(dt)

            last = step == config.steps
            do_eval = last or (config.eval_every and step % config.eval_every == 0)
            do_save = config.save_every and step % config.save_every == 0 and not last
            if last or do_eval or step % config.log_every == 0:
                record = _record(progress, non_finite, config, lr, tokens_per_step, times)
                if do_eval:
                    val_loss, val_tokens = evaluate(last)
                    record.update(val_loss=val_loss, val_ppl=math.exp(val_loss), val_tokens=val_tokens)
                progress.history.append(record)
                metrics.append(record)
                bar.set_postfix(_postfix(record), refresh=False)
            elif do_save:
                _check(progress, non_finite, config)
            if do_save:
                save(progress)
    finally:
        bar.close()


def _check(progress: Progress, non_finite: _FirstNonFinite, config) -> float:
    """The window's summed training loss (one read from the device); FloatingPointError if a step's was not finite."""
    window, step, value = torch.stack([progress.window_loss.double(), non_finite.step.double(),
                                       non_finite.loss.double()]).tolist()
    if step:
        raise FloatingPointError(f"training loss is {value} at step {int(step)}; lower --lr (now {config.lr:g}) "
                                 f"or raise --warmup (now {config.warmup})")
    return window


def _record(progress: Progress, non_finite: _FirstNonFinite, config, lr: float, tokens_per_step: int,
            times: tuple[str, ...]) -> dict:
    """The record closing the window of steps since the previous one; the window starts again."""
    window = _check(progress, non_finite, config)
    record = {"step": progress.step, "loss": window / progress.window_steps, "lr": lr,
              "tokens_per_s": progress.window_steps * tokens_per_step / progress.window_seconds
              if progress.window_seconds else None}
    figures = {"elapsed_s": progress.elapsed, "step_s": lambda: progress.step_seconds[-1]}
    record.update({name: figures[name]() for name in times})
    progress.window_loss.zero_()
    progress.window_steps, progress.window_seconds = 0, 0.0
    return record


def _postfix(record: dict) -> dict:
    postfix = {"loss": f"{record['loss']:.3f}", "lr": f"{record['lr']:.2e}"}
    if record["tokens_per_s"] is not None:
        postfix["tok/s"] = f"{record['tokens_per_s']:.0f}"
    if "val_ppl" in record:
        postfix["val_ppl"] = f"{record['val_ppl']:.1f}"
    return postfix


# --------------------------------------------------------------------------- the run directory


def make_run_dir(run_dir: str, explicit: bool) -> pathlib.Path:
    """Create the run directory: ``run_dir`` itself when the user named it (refused if it holds a run already),
    else the first free one of ``run_dir``, ``run_dir-2``, ``run_dir-3``, ... (default names carry a timestamp)."""
    path = pathlib.Path(run_dir)
    if explicit:
        if (path / "metrics.jsonl").exists():
            raise FileExistsError(
                f"run_dir {path} already holds a run (metrics.jsonl); choose another directory, or "
                f"continue that run with --resume {path}"
            )
        path.mkdir(parents=True, exist_ok=True)
        return path
    for i in range(1, 1000):
        candidate = path if i == 1 else path.with_name(f"{path.name}-{i}")
        try:
            candidate.mkdir(parents=True)
            return candidate
        except FileExistsError:
            continue
    raise FileExistsError(f"could not create a fresh run directory next to {path}")


def write_json(path: pathlib.Path, obj) -> None:
    path.write_text(json.dumps(obj, indent=2, default=str) + "\n")


def write_lines(path: pathlib.Path, records: list[dict]) -> None:
    """``records`` as JSON lines, replacing ``path`` atomically."""
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


class MetricsLog:
    """``metrics.jsonl``: rewritten to ``history`` on opening (a killed run may have logged past its checkpoint),
    then one line per record. No file when not ``write``: the ranks other than 0 of a sharded run."""

    def __init__(self, path: pathlib.Path, history: list[dict], write: bool = True):
        self.file = None
        if write:
            write_lines(path, history)
            self.file = path.open("a")

    def append(self, record: dict) -> None:
        if self.file is not None:
            self.file.write(json.dumps(record) + "\n")
            self.file.flush()

    def close(self) -> None:
        if self.file is not None:
            self.file.close()

    def __enter__(self) -> MetricsLog:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def plot(path: pathlib.Path, history: list[dict], title: str, unigram_ppl: float | None = None) -> None:
    """Training loss and validation perplexity against step (a logarithmic perplexity axis with the unigram
    baseline, when given), without touching pyplot state."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(10, 4), layout="constrained")
    ax_loss, ax_ppl = fig.subplots(1, 2)
    train = [r for r in history if "loss" in r]
    ax_loss.plot([r["step"] for r in train], [r["loss"] for r in train], label="train loss")
    evals = [r for r in history if "val_loss" in r]
    if evals:
        ax_loss.plot([r["step"] for r in evals], [r["val_loss"] for r in evals], "o-", label="validation loss")
        ax_ppl.plot([r["step"] for r in evals], [r["val_ppl"] for r in evals], "o-", label="validation")
    if unigram_ppl is not None:
        ax_ppl.axhline(unigram_ppl, color="gray", linestyle="--", label=f"unigram baseline ({unigram_ppl:.0f})")
        ax_ppl.set(yscale="log")
    ax_loss.set(xlabel="step", ylabel="cross entropy (nats/token)")
    ax_ppl.set(xlabel="step", ylabel="perplexity")
    for ax in (ax_loss, ax_ppl):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(title)
    fig.savefig(path, dpi=110)
