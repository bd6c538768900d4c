"""The pre-training loop behind ``qgalore-fx pretrain`` and the benchmarks.

``train(TrainConfig(...))`` builds a LLaMA of a preset (:mod:`qgalore_fx.app.presets`)
on a tokenized corpus (:mod:`qgalore_fx.app.data`), trains it with one of four methods
and writes a run directory:

==============  ===========================================================
``qgalore``     ``qgalore_fx.transform`` with the configured switches, then
                ``qgalore_fx.optimizer`` (the method this library implements)
``galore``      the same transform in its exact-GaLore mode: fp32 weights and
                projections, projections from a full SVD at a fixed
                refresh interval, 32-bit Adam, no stochastic rounding
``adamw``       ``torch.optim.AdamW`` on every parameter (full precision)
``adamw8bit``   ``bitsandbytes.optim.AdamW8bit`` on every parameter
==============  ===========================================================

The loop is the plain one users write (forward, ``backward``, ``step``,
``zero_grad``, scheduler step), with a cosine schedule after a linear warmup; it is
:func:`qgalore_fx.app.loop.train_steps`, which ``qgalore-fx finetune`` drives too.
The loss is the token-mean cross entropy computed from the logits, because
the batches' labels are already shifted (see :mod:`qgalore_fx.app.data`).
No gradient clipping: with the fused Q-GaLore backward each layer is updated
before the global norm would be known, and the baselines are run the same way
so the comparison stays fair.

Run directory (default ``runs/<YYYYmmdd-HHMMSS>-<method>``):

- ``config.json``: the resolved configuration, model shape, corpus and versions;
- ``metrics.jsonl``: one JSON object per logged step (``step``, ``loss`` = mean
  training loss since the previous record, ``lr`` = the first parameter group's
  (the projected layers' for qgalore/galore), ``tokens_per_s``,
  ``elapsed_s``, and ``val_loss``/``val_ppl``/``val_tokens`` at evaluations);
- ``loss.png``: training loss and validation perplexity against step;
- ``summary.json``: final figures (``refreshes``/``refresh_seconds``: subspace
  refreshes over all projected layers and the time they took), and the memory report;
- ``tokenizer.json``: a copy of the tokenizer the model was trained with;
- ``checkpoint/``: the run's state, written by ``qgalore_fx.save_checkpoint``
  atomically every ``save_every`` steps and at the last step: model, optimizer,
  scheduler and RNG states, plus the batch-order generator's state, the step, the
  metrics so far and the training loss accumulated since the last record;
- ``dcp/`` instead of ``checkpoint/`` under ``torchrun``: ``step-NNNNNN/`` directories of
  torch.distributed.checkpoint and ``latest``, the name of the last complete one.

Sharded
-------
Under ``torchrun`` (WORLD_SIZE > 1) the same loop runs sharded with FSDP2 on every
process, each on its slice of the global ``batch_size``; rank 0 logs and writes the
files above (:mod:`qgalore_fx.app.distributed` holds everything that differs).

Resuming
--------
``train(recorded_config(run_dir), resume=True)`` (``qgalore-fx pretrain --resume
RUN_DIR``) rebuilds the run from its ``config.json``, loads ``checkpoint/`` (under
``torchrun``: the DCP checkpoint ``dcp/latest`` names), rewrites
``metrics.jsonl`` to the records the checkpoint holds, and continues. Every number a
run produces (weights, losses, ``val_ppl``, ``final_train_loss``) is then the same,
bit for bit, as in a run that was never interrupted; only timings differ
(``train_seconds`` and ``refresh_seconds`` add the time measured before the
checkpoint, ``elapsed_s`` continues from it).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import pathlib
import platform
import resource
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from qgalore_fx.app import data as data_lib
from qgalore_fx.app import distributed as distributed_lib
from qgalore_fx.app import loop
from qgalore_fx.app import presets as presets_lib
from qgalore_fx.app.loop import cosine_with_warmup, device_problem, is_device_name, is_number, require, require_int
from qgalore_fx.app.options import AUTOCAST_MODES, transform_options, with_transform_options
from qgalore_fx.config import QGaLoreConfig, cli_fields

__all__ = [
    "DEFAULT_LR",
    "GALORE_OPTIONS",
    "METHODS",
    "TrainConfig",
    "TrainResult",
    "build_optimizer",
    "cosine_with_warmup",
    "device_problem",
    "evaluate",
    "is_device_name",
    "recorded_config",
    "train",
]

logger = logging.getLogger(__name__)

METHODS = ("qgalore", "galore", "adamw", "adamw8bit")
PROJECTED_METHODS = ("qgalore", "galore")

# Peak learning rates used when ``TrainConfig.lr`` is None. AdamW's comes from a sweep
# of the default run (tiny preset, BBC News, vocab 8192, 16x128 and 8x128 tokens per
# step, same token budget): validation perplexity after 614k tokens was 1e-3: 288,
# 7e-4: 312, 1.5e-3: 319, 3e-3: 410 at batch 8, and 1e-3: 415, 3e-3: 512, 1.2e-2: 871
# at batch 16. The projected methods keep GaLore's ratio to AdamW (1e-2 vs 1e-3 at
# 60M): the projected update is multiplied by ``scale`` (0.25), so 1e-2 moves those
# weights 2.5x as fast as AdamW's peak; the parameters that are not projected get
# ``rest_lr`` (default: AdamW's peak).
DEFAULT_LR = {"qgalore": 1e-2, "galore": 1e-2, "adamw": 1e-3, "adamw8bit": 1e-3}

# The settings that turn the library's Q-GaLore into GaLore itself: the algorithm of GaLore's
# paper and of galore-torch's GaLoreAdamW (fp32 weights, P from a full SVD of the gradient every
# ``update_interval`` steps, fp32 Adam on R, no stochastic rounding). With these settings and no
# refresh the library matches GaLoreAdamW within 1e-5 relative over 50 steps
# (tests/test_galore_mode.py); across a refresh the only difference is the documented sign/rotation
# alignment of the new projection (qgalore_fx.projection). The 16-bit storage variants GaLore is
# often run with on GPUs stay reachable as Q-GaLore ablations (--weight-bits 16 --proj-bits 16 ...).
GALORE_SETTINGS = dict(
    weight_bits=32, proj_bits=32, adaptive=False, optim_bits=32, stochastic_round=False, proj_method="full",
    eps_placement="galore",
)
# The transform options GaLore keeps settable (its subspace); the others are fixed above or
# do not apply (the refresh policy: cos_threshold, queue_size).
GALORE_OPTIONS = ("rank", "update_interval", "scale", "fused")

_CHOICES = {
    "autocast": AUTOCAST_MODES,
}


@dataclass(frozen=True)
@with_transform_options
class TrainConfig:
    """Everything a run depends on. ``None`` means "derive it" (see :meth:`resolved`)."""

    preset: str | presets_lib.Preset = "tiny"
    method: str = "qgalore"
    # Default run: 400 steps of 8 x 128 tokens (410k tokens, a third of an epoch of
    # BBC News), a few minutes on two CPU cores; batch 8 reached a lower perplexity than
    # batch 16 for the same tokens and time in the sweep above.
    steps: int = 400
    batch_size: int = 8
    seq_len: int | None = None  # None: the preset's
    lr: float | None = None  # None: DEFAULT_LR[method]
    # qgalore/galore: peak lr of the parameters that are not projected (embeddings,
    # norms, output head), which the library trains with plain AdamW. None: the
    # AdamW default, since those parameters see no projection or ``scale``.
    rest_lr: float | None = None
    warmup: int | None = None  # None: 10% of steps
    min_lr_ratio: float = 0.1  # the cosine ends at lr * min_lr_ratio
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8  # Adam's eps, every method's (torch AdamW's default)
    seed: int = 0
    device: str = "auto"  # "auto": cuda when available, else cpu
    threads: int | None = None  # intra-op CPU threads; None: torch's current setting
    autocast: str = "auto"  # "auto": bf16 autocast on cuda, none on cpu
    # Q-GaLore switches (DESIGN.md section 2): rank, update_interval, cos_threshold, queue_size,
    # adaptive, weight_bits, proj_bits, stochastic_round, optim_bits, fused, scale, proj_method.
    # They are the QGaLoreConfig fields marked for the command line, added after the fields below
    # by @with_transform_options with the library's defaults (the paper's); rank None: the preset's.
    # Evaluation and logging.
    eval_every: int = 100  # 0: only the final evaluation
    eval_batches: int = 8  # batches per periodic evaluation; the final one uses all
    log_every: int = 10
    # Data and output.
    corpus: str | None = None  # None: the bundled BBC News corpus
    vocab_size: int = 8192
    cache_dir: str | None = None  # None: $QGALORE_FX_CACHE or ~/.cache/qgalore_fx
    run_dir: str | None = None  # None: runs/<timestamp>-<method>
    save_every: int = 0  # steps between checkpoints in run_dir/checkpoint; 0: only at the last step

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):  # numpy scalars (np.int64(8), np.float32(0.25)) are numbers too
            value = getattr(self, f.name)
            if f.name == "betas" and isinstance(value, (tuple, list)):
                object.__setattr__(self, f.name, tuple(_plain(b) for b in value))
            elif _plain(value) is not value:
                object.__setattr__(self, f.name, _plain(value))
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {', '.join(METHODS)}; got {self.method!r}")
        presets_lib.get_preset(self.preset)  # raises with the list of names
        for name, allowed in _CHOICES.items():
            value = getattr(self, name)
            if value not in allowed:
                raise ValueError(
                    f"{name} must be one of {', '.join(map(str, allowed))}; got {value!r}"
                )
        require(is_device_name(self.device), "device", "'auto', 'cpu', 'cuda' or 'cuda:N'", self.device)
        for name in ("steps", "batch_size", "log_every", "eval_batches"):
            require_int(self, name, 1, "a positive integer")
        for name in ("seq_len", "threads"):
            require_int(self, name, 1, "a positive integer", optional=True)
        require_int(self, "warmup", 0, f"an integer in [0, steps={self.steps}]", optional=True,
                     high=self.steps)
        require_int(self, "eval_every", 0, "a non-negative integer")
        require_int(self, "save_every", 0, "a non-negative integer")
        require_int(self, "seed", 0, "an integer in [0, 2**63)", high=2**63 - 1)
        require_int(self, "vocab_size", data_lib.MIN_VOCAB_SIZE, f"an integer >= {data_lib.MIN_VOCAB_SIZE}")
        for name in ("lr", "rest_lr"):
            value = getattr(self, name)
            require(value is None or (is_number(value) and math.isfinite(value) and value > 0), name,
                     "a positive finite number", value)
        require(self.rest_lr is None or self.method in PROJECTED_METHODS, "rest_lr",
                 "None unless method is 'qgalore' or 'galore'", self.rest_lr)
        require(is_number(self.min_lr_ratio) and 0.0 <= self.min_lr_ratio <= 1.0, "min_lr_ratio",
                 "a number in [0, 1]", self.min_lr_ratio)
        require(is_number(self.weight_decay) and 0.0 <= self.weight_decay < math.inf, "weight_decay",
                 "a finite non-negative number", self.weight_decay)
        require(is_number(self.eps) and math.isfinite(self.eps) and self.eps > 0, "eps",
                 "a positive finite number", self.eps)
        require(isinstance(self.betas, tuple) and len(self.betas) == 2
                 and all(is_number(b) and 0.0 <= b < 1.0 for b in self.betas), "betas",
                 "two numbers in [0, 1)", self.betas)
        self.qgalore_config()  # the transform options, validated by the library's config

    def qgalore_config(self) -> QGaLoreConfig:
        """The ``QGaLoreConfig`` of these switches (rank None: the preset's).

        Raises the config's ``ValueError``/``TypeError``, naming the option, on an invalid value.
        """
        options = transform_options(self)
        if options["rank"] is None:
            options["rank"] = presets_lib.get_preset(self.preset).rank
        return QGaLoreConfig(**options)

    def resolved(self) -> TrainConfig:
        """A copy with every derived value filled in (the run records this one)."""
        p = presets_lib.get_preset(self.preset)
        device = self.device
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        changes = dict(
            seq_len=self.seq_len or p.seq_len,
            lr=self.lr if self.lr is not None else DEFAULT_LR[self.method],
            rest_lr=(self.rest_lr if self.rest_lr is not None else DEFAULT_LR["adamw"])
            if self.method in PROJECTED_METHODS else None,
            warmup=self.warmup if self.warmup is not None else self.steps // 10,
            rank=self.rank or p.rank,
            device=device,
            threads=self.threads or torch.get_num_threads(),
            autocast=self.autocast if self.autocast != "auto"
            else ("bf16" if torch.device(device).type == "cuda" else "off"),
            run_dir=self.run_dir or _default_run_dir(self.method),
        )
        if self.method == "galore":
            changes.update(GALORE_SETTINGS)
        return dataclasses.replace(self, **changes)

    def transform_kwargs(self) -> dict | None:
        """The keyword arguments of ``qgalore_fx.transform`` for this run (None: no transform)."""
        if self.method not in PROJECTED_METHODS:
            return None
        if self.method == "galore":
            return {name: getattr(self, name) for name in GALORE_OPTIONS} | GALORE_SETTINGS
        return transform_options(self)

    def to_json(self) -> dict:
        """JSON-ready view: the Q-GaLore switches appear only where they apply."""
        d = dataclasses.asdict(self)
        d["betas"] = list(self.betas)
        for f in cli_fields():
            d.pop(f.name)
        d["transform"] = self.transform_kwargs()
        return d

    @classmethod
    def from_json(cls, d: dict, preset: dict | None = None) -> TrainConfig:
        """Inverse of :meth:`to_json` (``preset``: the preset's fields, for a preset that is not a named one)."""
        d = dict(d)
        transform = d.pop("transform", None) or {}
        names = {f.name for f in dataclasses.fields(cls)}
        options = {f.name for f in cli_fields()}
        unknown = sorted((set(d) - names) | (set(transform) - options))
        if unknown:
            raise ValueError(f"unknown training options {unknown}; this qgalore_fx knows {sorted(names)}")
        name = d.get("preset")
        if preset is not None and (name not in presets_lib.PRESETS
                                   or dataclasses.asdict(presets_lib.PRESETS[name]) != preset):
            d["preset"] = presets_lib.Preset(**preset)
        if isinstance(d.get("betas"), list):
            d["betas"] = tuple(d["betas"])
        return cls(**d, **transform)


def _plain(value):
    """A numpy scalar as the Python number (or bool) it holds; anything else unchanged."""
    if type(value).__module__ == "numpy" and getattr(value, "shape", None) == () and hasattr(value, "item"):
        return value.item()
    return value


def _default_run_dir(method: str) -> str:
    return str(pathlib.Path("runs") / f"{time.strftime('%Y%m%d-%H%M%S')}-{method}")


def recorded_config(run_dir: str | os.PathLike) -> TrainConfig:
    """The resolved configuration a run recorded in ``run_dir/config.json``, with ``run_dir`` set to
    ``run_dir`` (the directory may have moved since). Raises ``FileNotFoundError``/``ValueError``."""
    path = pathlib.Path(run_dir)
    config_path = path / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(f"{path} is not a run directory: it has no config.json")
    try:
        recorded = json.loads(config_path.read_text())
        config = TrainConfig.from_json(recorded["train"], recorded.get("preset"))
    except (ValueError, TypeError, KeyError) as e:  # JSONDecodeError is a ValueError
        raise ValueError(f"{config_path} does not hold a training configuration this qgalore_fx can run: "
                         f"{type(e).__name__}: {e}") from None
    return dataclasses.replace(config, run_dir=str(path))


# Options a resumed run may change: they do not change what is computed.
RESUME_MAY_CHANGE = ("run_dir", "save_every")


# --------------------------------------------------------------------------- pieces


def build_optimizer(model: torch.nn.Module, config: TrainConfig,
                    shard: Callable[[torch.nn.Module], torch.nn.Module] | None = None):
    """Return ``(model, optimizer)`` for ``config.method`` (the model may be transformed).

    ``config`` must be :meth:`TrainConfig.resolved`. ``shard`` (e.g. FSDP2's ``fully_shard`` per block and
    the root) is applied after the transform and before the optimizer is built.
    """
    lr, wd, betas, eps = config.lr, config.weight_decay, tuple(config.betas), config.eps
    shard = shard or (lambda m: m)
    if config.method == "adamw":
        model = shard(model)
        return model, torch.optim.AdamW(model.parameters(), lr=lr, betas=betas, eps=eps, weight_decay=wd)
    if config.method == "adamw8bit":
        import bitsandbytes as bnb

        model = shard(model)
        return model, bnb.optim.AdamW8bit(model.parameters(), lr=lr, betas=betas, eps=eps, weight_decay=wd)
    import qgalore_fx

    model = shard(qgalore_fx.transform(model, **config.transform_kwargs()))
    # LambdaLR scales each group's own initial lr: projected layers from lr, the rest from rest_lr.
    optimizer = qgalore_fx.optimizer(model, lr=lr, weight_decay=wd, betas=betas, eps=eps, rest_lr=config.rest_lr)
    return model, optimizer


@torch.no_grad()
def evaluate(
    model, val_ids: torch.Tensor, config: TrainConfig, max_batches: int | None = None, job=None
) -> tuple[float, int]:
    """Token-mean validation loss over the fixed windows (the first ``max_batches`` batches of them; None: all),
    and the number of tokens scored. ``job``: every rank returns the loss over all windows (:func:`loop.evaluate`).
    """
    batches = data_lib.validation_batches(val_ids, config.batch_size, config.seq_len, max_batches)
    return loop.evaluate(model, batches, config, job)



def _format_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB"):
        if abs(n) < 1024:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return f"{n:.2f} GiB"


def _memory_report(model, optimizer) -> tuple[str, dict]:
    """The library's memory report (real tensor bytes per component) plus the process's peak RSS."""
    import qgalore_fx

    report = qgalore_fx.memory_report(model, optimizer)
    peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB
    text = f"{report}\npeak resident memory of this process: {_format_bytes(peak_rss)}"
    return text, {**report.to_dict(), "peak_rss_bytes": peak_rss}


# --------------------------------------------------------------------------- train


@dataclass
class TrainResult:
    """What a run produced; ``summary()`` is the text printed at the end."""

    run_dir: pathlib.Path
    config: TrainConfig  # resolved
    vocab_size: int
    n_params: int
    steps: int
    tokens: int
    train_seconds: float
    total_seconds: float
    final_train_loss: float
    val_loss: float
    val_ppl: float
    val_tokens: int
    unigram_ppl: float
    checkpoint: pathlib.Path
    memory_text: str
    memory: dict
    history: list[dict] = field(repr=False, default_factory=list)
    refreshes: int | None = None  # subspace refreshes over all projected layers (None: no projected layers)
    refresh_seconds: float | None = None  # their wall-clock time, summed over layers (and over resumes)
    resumed_at: list[int] = field(default_factory=list)  # the steps this run was resumed from
    world_size: int = 1  # processes that trained it (torchrun); the memory figures are rank 0's

    def to_json(self) -> dict:
        return {
            "run_dir": str(self.run_dir),
            "method": self.config.method,
            "preset": presets_lib.get_preset(self.config.preset).name,
            "vocab_size": self.vocab_size,
            "n_params": self.n_params,
            "steps": self.steps,
            "tokens": self.tokens,
            "train_seconds": self.train_seconds,
            "total_seconds": self.total_seconds,
            "tokens_per_s": self.tokens / self.train_seconds if self.train_seconds else None,
            "final_train_loss": self.final_train_loss,
            "val_loss": self.val_loss,
            "val_ppl": self.val_ppl,
            "val_tokens": self.val_tokens,
            "unigram_ppl": self.unigram_ppl,
            "refreshes": self.refreshes,
            "refresh_seconds": self.refresh_seconds,
            "resumed_at": self.resumed_at,
            "world_size": self.world_size,
            "checkpoint": str(self.checkpoint),
            "memory": self.memory,
        }

    def summary(self) -> str:
        c = self.config
        ranks = f", rank 0 of {self.world_size} processes" if self.world_size > 1 else ""
        return "\n".join([
            f"memory ({c.method}{ranks}):",
            self.memory_text,
            f"final validation perplexity: {self.val_ppl:.2f} "
            f"(loss {self.val_loss:.4f} nats/token over {self.val_tokens} tokens)",
            f"unigram baseline perplexity: {self.unigram_ppl:.2f} "
            f"(same tokenizer, vocab {self.vocab_size}, add-one smoothed training counts)",
            f"trained {self.steps} steps, {self.tokens} tokens in {self.train_seconds:.1f} s "
            f"({self.tokens / max(self.train_seconds, 1e-9):.0f} tokens/s); "
            f"total {self.total_seconds:.1f} s",
            f"run directory: {self.run_dir}",
        ])


def train(
    config: TrainConfig,
    *,
    corpus: data_lib.TokenizedCorpus | None = None,
    verbose: bool = True,
    resume: bool = False,
) -> TrainResult:
    """Run one pre-training job and write its run directory.

    ``corpus`` reuses an already prepared corpus (benchmarks running several
    methods on the same data); otherwise ``config.corpus`` is prepared (cached).
    With ``verbose`` a progress bar runs and the summary is printed at the end.
    With ``resume``, ``config.run_dir`` holds a run with a checkpoint and ``config``
    is its recorded configuration (:func:`recorded_config`; only ``save_every`` may
    differ): the run continues from the checkpoint, see the module docstring.
    """
    threads_before = torch.get_num_threads()
    device = config.resolved().device
    problem = device_problem(device)
    if problem:
        raise ValueError(f"device {device!r}: {problem}")
    try:
        with distributed_lib.job(device) as job:
            return _train(config, corpus, verbose, resume, job)
    finally:
        torch.set_num_threads(threads_before)


def _train(config: TrainConfig, corpus: data_lib.TokenizedCorpus | None, verbose: bool, resume: bool, job):
    """The run; ``job`` (:mod:`qgalore_fx.app.distributed`) says what this process trains on and writes."""
    t_start = time.perf_counter()
    explicit_run_dir = config.run_dir is not None
    cfg = config.resolved()
    job.check(cfg)
    verbose = verbose and job.is_main
    device = torch.device(cfg.device)
    if resume:
        run_dir = _check_resumable(cfg, job)
    if corpus is None:  # rank 0 first: it trains and caches the tokenizer the others load
        corpus = job.main_first(lambda: data_lib.prepare_corpus(cfg.corpus, cfg.vocab_size, cfg.cache_dir))
    if not resume:
        run_dir = job.from_main(lambda: loop.make_run_dir(cfg.run_dir, explicit_run_dir))
    cfg = dataclasses.replace(cfg, run_dir=str(run_dir))

    torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    preset = presets_lib.get_preset(cfg.preset)
    model = presets_lib.build_model(preset, corpus.vocab_size, device=device, seq_len=cfg.seq_len)
    # the library's allocator rule for every method (qgalore_fx.optimizer applies the same one): the 1 MiB mmap
    # threshold for a model holding 4 GiB or more on the CPU, glibc's own policy below that, where the threshold
    # made every method's step about 30 % slower (docs/host-memory.md)
    from qgalore_fx.host_allocator import auto_mmap_threshold

    auto_mmap_threshold(model, None)
    n_params = sum(p.numel() for p in model.parameters())
    model_config = model.config.to_dict()
    model.train()
    model, optimizer = build_optimizer(model, cfg, shard=job.shard)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, loop.cosine_with_warmup(cfg.steps, cfg.warmup, cfg.min_lr_ratio)
    )
    generator = torch.Generator().manual_seed(cfg.seed)
    batches = data_lib.random_batches(corpus.train_ids, cfg.batch_size, cfg.seq_len, generator)
    val_targets = data_lib.validation_windows(corpus.val_ids, cfg.seq_len)[:, 1:]
    unigram_ppl = data_lib.unigram_perplexity(corpus.train_ids, val_targets, corpus.vocab_size)

    import qgalore_fx

    identity = {"train_config": _recorded_train(cfg), "corpus_fingerprint": corpus.fingerprint}
    progress = loop.Progress(started=t_start)
    if resume:
        progress = loop.load(job, run_dir, model, optimizer, scheduler, generator, cfg.steps, identity, t_start)
    elif job.is_main:
        loop.write_json(run_dir / "config.json", {
            "train": cfg.to_json() | {"preset": preset.name},
            "preset": dataclasses.asdict(preset),
            "model": {"n_params": n_params,
                      **{k: model_config.get(k) for k in (
                          "vocab_size", "hidden_size", "intermediate_size", "num_attention_heads",
                          "num_hidden_layers", "max_position_embeddings")}},
            "data": corpus.describe() | {"unigram_ppl": unigram_ppl},
            "optimizer": type(optimizer).__module__ + "." + type(optimizer).__qualname__,
            "versions": _versions(qgalore_fx.__version__),
        } | job.describe())
        shutil.copyfile(corpus.tokenizer_path, run_dir / "tokenizer.json")
    if verbose:
        logger.info("run %s: %s, %s (%.2fM parameters), %d train tokens, vocab %d, "
                    "%d CPU threads%s%s", run_dir, cfg.method, preset.name,
                    n_params / 1e6, corpus.train_ids.numel(), corpus.vocab_size, cfg.threads,
                    f" per process, {job.world_size} processes" if job.world_size > 1 else "",
                    f"; resumed at step {progress.step}" if resume else "")

    def save(progress: loop.Progress) -> pathlib.Path:
        return loop.save(job, run_dir, model, optimizer, scheduler, generator, progress, identity)

    def evaluate_at(last: bool) -> tuple[float, int]:  # the last evaluation scores every window
        return evaluate(model, corpus.val_ids, cfg, None if last else cfg.eval_batches, job)

    # metrics.jsonl holds exactly the checkpoint's records (a killed run may have logged later steps)
    with loop.MetricsLog(run_dir / "metrics.jsonl", progress.history, write=job.is_main) as metrics:
        loop.train_steps(model, optimizer, scheduler, batches, progress, cfg, evaluate=evaluate_at, save=save,
                         metrics=metrics, times=("elapsed_s",), desc=f"pretrain {cfg.method}", verbose=verbose,
                         job=job)

    final = progress.history[-1]
    if job.is_main:
        loop.plot(run_dir / "loss.png", progress.history,
                  f"{cfg.method}, preset {preset.name}, vocab {corpus.vocab_size}", unigram_ppl)
    checkpoint = save(progress)
    refreshes, refresh_seconds = loop.refreshes(optimizer)
    memory_text, memory = _memory_report(model, optimizer)
    tokens_per_step = cfg.batch_size * cfg.seq_len
    result = TrainResult(
        run_dir=run_dir,
        config=cfg,
        vocab_size=corpus.vocab_size,
        n_params=n_params,
        steps=cfg.steps,
        tokens=cfg.steps * tokens_per_step,
        train_seconds=progress.train_seconds,
        total_seconds=progress.elapsed(),
        final_train_loss=progress.final_train_loss(),
        val_loss=final["val_loss"],
        val_ppl=final["val_ppl"],
        val_tokens=final["val_tokens"],
        unigram_ppl=unigram_ppl,
        checkpoint=checkpoint,
        memory_text=memory_text,
        memory=memory,
        history=progress.history,
        refreshes=refreshes,
        refresh_seconds=None if refresh_seconds is None else progress.refresh_seconds + refresh_seconds,
        resumed_at=progress.resumed_at,
        world_size=job.world_size,
    )
    if job.is_main:
        loop.write_json(run_dir / "summary.json", result.to_json())
    if verbose:
        print(result.summary())
    return result


# --------------------------------------------------------------------------- checkpoints and resume


def _recorded_train(cfg: TrainConfig) -> dict:
    """What must match for a checkpoint to continue ``cfg``: its configuration, less what a resume may change."""
    d = cfg.to_json()
    for name in RESUME_MAY_CHANGE:
        d.pop(name)
    d["preset"] = presets_lib.get_preset(cfg.preset).name
    return d


def _check_resumable(cfg: TrainConfig, job) -> pathlib.Path:
    """The run directory of ``cfg`` (resolved), after checking it holds an unfinished run with a checkpoint."""
    if cfg.run_dir is None:
        raise ValueError("resume=True needs config.run_dir, the directory of the run to continue")
    run_dir = pathlib.Path(cfg.run_dir)
    recorded = recorded_config(run_dir).resolved()
    ours, theirs = _recorded_train(cfg), _recorded_train(recorded)
    diff = [f"{k}: {ours.get(k)!r} (the run recorded {theirs.get(k)!r})"
            for k in sorted(set(ours) | set(theirs)) if ours.get(k) != theirs.get(k)]
    if diff:
        raise ValueError(f"cannot resume {run_dir} with another configuration: {'; '.join(diff)}")
    if (run_dir / "summary.json").exists():
        raise ValueError(f"{run_dir} is a finished run (it has summary.json): nothing to resume")
    if not job.has_checkpoint(run_dir):
        raise FileNotFoundError(
            f"{run_dir} has no checkpoint to resume from (it was stopped before its first save; "
            f"save_every={recorded.save_every}): start the run again")
    return run_dir


def _versions(qgalore_fx_version: str) -> dict:
    import tokenizers
    import transformers

    return {
        "qgalore_fx": qgalore_fx_version,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "tokenizers": tokenizers.__version__,
        "python": platform.python_version(),
    }
