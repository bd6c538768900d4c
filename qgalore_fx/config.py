"""`QGaLoreConfig`: every knob of the transform, validated once.

`transform(model, rank=256, **options)` builds one of these; passing
`config=QGaLoreConfig(...)` works too. The defaults are the Q-GaLore paper's
(DESIGN.md §2). Every piece of the method can be switched off on its own,
because ablations flip exactly these:

=====================  ==============  =========================================
option                 allowed         meaning
=====================  ==============  =========================================
rank                   int >= 1        rank r of the gradient projection
update_interval        1 .. 2**53-1    steps between subspace refreshes (start)
cos_threshold          0 <= t <= 1     similarity that counts as "stable"
queue_size             1 .. 4096       stable refreshes needed to double interval
adaptive               bool            layer-adaptive lazy refresh on/off
weight_bits            8, 16, 32       INT8 codes, bf16 or fp32 weight storage
proj_bits              4, 8, 16, 32    INT4 (packed), INT8, bf16 or fp32 proj.
stochastic_round       bool            SR on the INT8 write-back
optim_bits             8, 32           8-bit block-wise or fp32 Adam moments
lean                   bool            factored second moment, no first moment
fused                  bool            update inside backward (else at step())
scale                  0 < s <= 1000   alpha, the back-projection scale
block_size             even, 2..2**20  quantization block of weights
proj_block_size        even, 2..2**20  quantization block of projections
proj_method            see below       how a refreshed subspace is computed
align                  see below       aligning a refreshed projection with the old
eps_placement          "adam", "galore"  where Adam's eps enters (see below)
proj_side              "short", "long"   the side of each weight P spans (see below)
include_lm_head        bool            also project the output head
target_modules         regex list      fully-qualified names to project
filter_fn              callable        `filter_fn(module, fqn) -> bool`
trace                  bool            capture regions with torch.fx
seed                   0 .. MAX_SEED   seeds stochastic rounding and sketches
=====================  ==============  =========================================

The upper bounds come from where the values are kept: every counter and
schedule value of a layer lives in its float64 host ``control`` tensor, exact
up to 2**53, which also holds the similarity queue (:data:`MAX_QUEUE_SIZE`).
All of them are checked here, so ``transform`` fails before it touches the
model; so is whether ``rank`` fits a given layer (:meth:`QGaLoreConfig.check_fits`,
which the transform asks for every layer it projects).
"""

from __future__ import annotations

import dataclasses
import numbers
import re
from typing import Callable, Optional, Sequence

import torch.nn as nn

# The allowed values of the options with a fixed set of them, declared here only: the field metadata, the
# validation below, qgalore_fx.projection, the kernels and the command lines all use these tuples
# (tests/test_layout.py checks that none is written out a second time).
WEIGHT_BITS = (8, 16, 32)  # INT8 codes, bf16, fp32
PROJ_BITS = (4, 8, 16, 32)  # INT4 (packed), INT8, bf16, fp32
OPTIM_BITS = (8, 32)  # 8-bit block-wise or fp32 Adam moments (qgalore_fx.kernels.adam8bit.AdamState.bits)
PROJ_METHODS = ("subspace", "randomized", "full")  # qgalore_fx.projection.compute_projection's methods
ALIGN_METHODS = ("sign", "procrustes", "none")  # qgalore_fx.projection.align_projection's methods
# Where the low-rank Adam adds eps. "adam": N = m̂ / (sqrt(v̂) + eps), torch.optim.Adam's and bitsandbytes' 8-bit
# kernel's placement, which Q-GaLore's official optimizer inherits from bitsandbytes. "galore": eps is added to
# sqrt(v) before bias correction, N = m̂ / (sqrt(v̂) + eps / sqrt(1 - beta2^t)), as galore-torch's GaLoreAdamW
# (and transformers' old AdamW) computes it; the exact-GaLore settings use it.
EPS_PLACEMENTS = ("adam", "galore")
# Which side of an m x n weight the projection P spans. "short": min(m, n), GaLore's rule (P is the smaller
# matrix, R = the low-rank gradient and its Adam moments are max(m, n) x r). "long": max(m, n), so R and the
# moments are r x min(m, n). At a refresh both give the same rank-r truncation of G (U_r U_rᵀ G = G V_r V_rᵀ);
# between refreshes R has fewer free coordinates. With 8-bit moments (2 bytes per element of R) and an INT4 P
# (half a byte) "long" keeps 1.5 r |m - n| bytes less per layer (docs/projection-and-refresh.md).
PROJ_SIDES = ("short", "long")

FilterFn = Callable[[nn.Module, str], bool]


#: Each layer seeds its stream with ``seed * SEED_STRIDE + index`` (``index``: the layer's place in the model).
SEED_STRIDE = 1_000_003
#: Largest ``seed``: every layer's stream seed must fit in int64.
MAX_SEED = (2**63 - 1 - 2**20) // SEED_STRIDE
#: Largest quantization block: one fp32 scale per block; larger blocks only lose precision.
MAX_BLOCK_SIZE = 1 << 20
#: Largest ``update_interval``: the refresh schedule lives in each layer's float64 ``control`` tensor, whose
#: integers are exact below 2**53 (a checkpoint's counters are checked against the same bound).
MAX_COUNTER = 2**53 - 1
#: Largest ``queue_size``: the queue of recent similarities lives in each layer's host ``control`` tensor (kept
#: twice while an accumulation window is open); 4096 refreshes are 819,200 steps at the default interval.
MAX_QUEUE_SIZE = 4096
#: Largest ``scale`` (alpha): beyond it an update overflows fp32 before the learning rate tames it.
MAX_SCALE = 1e3


def _check_int(name: str, value, low: int, allowed: Optional[Sequence[int]] = None, high: Optional[int] = None) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} ({value!r})")
    if allowed is not None and value not in allowed:
        raise ValueError(f"{name} must be one of {tuple(allowed)}, got {value}")
    if value < low:
        raise ValueError(f"{name} must be >= {low}, got {value}")
    if high is not None and value > high:
        raise ValueError(f"{name} must be <= {high}, got {value}")


def _check_bool(name: str, value) -> None:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be True or False, got {type(value).__name__} ({value!r})")


@dataclasses.dataclass(frozen=True)
class QGaLoreConfig:
    # Each field's metadata: "help" (what the option does); "cli": True where ``qgalore-fx pretrain``
    # exposes it as a switch (see `cli_fields`); "choices" for the options with a fixed set of values;
    # "negated" for a True-by-default switch, the help of its ``--no-...`` flag.
    rank: int = dataclasses.field(metadata={
        "help": "rank of the gradient projection", "cli": True})
    update_interval: int = dataclasses.field(default=200, metadata={
        "help": "steps between subspace refreshes", "cli": True})
    cos_threshold: float = dataclasses.field(default=0.4, metadata={
        "help": "similarity in [0, 1] of successive subspaces at or above which a layer's refresh interval "
                "doubles; a refresh below it puts the interval back to update_interval",
        "cli": True})
    queue_size: int = dataclasses.field(default=5, metadata={
        "help": "refreshes that must all pass cos_threshold before the interval doubles", "cli": True})
    adaptive: bool = dataclasses.field(default=True, metadata={
        "help": "layer-adaptive lazy refresh (a stable layer's refresh interval doubles)", "cli": True,
        "negated": "keep every layer's refresh interval fixed"})
    weight_bits: int = dataclasses.field(default=8, metadata={
        "help": "storage of projected weights: INT8 codes, bf16 or fp32", "cli": True, "choices": WEIGHT_BITS})
    proj_bits: int = dataclasses.field(default=4, metadata={
        "help": "storage of projection matrices: INT4 (packed), INT8, bf16 or fp32", "cli": True,
        "choices": PROJ_BITS})
    stochastic_round: bool = dataclasses.field(default=True, metadata={
        "help": "stochastic rounding of the INT8 weight write-back", "cli": True,
        "negated": "round the INT8 write-back to nearest instead of stochastically"})
    optim_bits: int = dataclasses.field(default=8, metadata={
        "help": "Adam moments of the low-rank gradient: 8-bit block-wise or fp32", "cli": True,
        "choices": OPTIM_BITS})
    lean: bool = dataclasses.field(default=False, metadata={
        "help": "least memory: the low-rank update keeps no first moment and a factored second moment (Adafactor's "
                "row and column statistics of R², update clipping at RMS 1) instead of 8-bit Adam moments of R "
                "(qgalore_fx.kernels.factored)", "cli": True})
    fused: bool = dataclasses.field(default=True, metadata={
        "help": "update projected layers inside backward (else in opt.step())", "cli": True,
        "negated": "update projected layers in opt.step() instead of inside backward"})
    scale: float = dataclasses.field(default=0.25, metadata={
        "help": "alpha, the scale of the projected-back update", "cli": True})
    block_size: int = dataclasses.field(default=256, metadata={
        "help": "quantization block of weights (even)"})
    proj_block_size: int = dataclasses.field(default=256, metadata={
        "help": "quantization block of projections (even)"})
    proj_method: str = dataclasses.field(default="subspace", metadata={
        "help": f"how a refreshed subspace is computed: one of {', '.join(PROJ_METHODS)}", "cli": True})
    align: str = dataclasses.field(default="sign", metadata={
        "help": "how a refreshed projection is aligned with the previous one, so Adam's moments keep their "
                f"meaning: one of {', '.join(ALIGN_METHODS)} (qgalore_fx.projection)", "cli": True,
        "choices": ALIGN_METHODS})
    eps_placement: str = dataclasses.field(default="adam", metadata={
        "help": "where the low-rank Adam adds eps: 'adam' (m̂/(sqrt(v̂)+eps), bitsandbytes' and Q-GaLore's) or "
                "'galore' (eps added to sqrt(v) before bias correction, galore-torch's GaLoreAdamW)", "cli": True,
        "choices": EPS_PLACEMENTS})
    proj_side: str = dataclasses.field(default="short", metadata={
        "help": "the side of each m x n weight the projection spans: 'short' (min(m, n), GaLore's: Adam's moments "
                "are max(m, n) x r) or 'long' (max(m, n): the moments are r x min(m, n), 1.5 r |m - n| bytes less "
                "per layer)", "cli": True, "choices": PROJ_SIDES})
    include_lm_head: bool = dataclasses.field(default=False, metadata={
        "help": "also project the output head"})
    target_modules: Optional[tuple] = dataclasses.field(default=None, metadata={
        "help": "regular expressions of the fully-qualified module names to project"})
    filter_fn: Optional[FilterFn] = dataclasses.field(default=None, metadata={
        "help": "filter_fn(module, fqn) -> bool, choosing the layers to project"})
    trace: bool = dataclasses.field(default=True, metadata={
        "help": "capture regions with torch.fx"})
    seed: int = dataclasses.field(default=0, metadata={
        "help": "seeds stochastic rounding and sketches"})

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):  # numpy and other integral/real scalars become plain Python numbers
            value = getattr(self, f.name)
            if isinstance(value, numbers.Integral) and not isinstance(value, (bool, int)):
                object.__setattr__(self, f.name, int(value))
            elif isinstance(value, numbers.Real) and not isinstance(value, (bool, int, float, numbers.Integral)):
                object.__setattr__(self, f.name, float(value))
        _check_int("rank", self.rank, 1)
        _check_int("update_interval", self.update_interval, 1, high=MAX_COUNTER)
        _check_int("queue_size", self.queue_size, 1, high=MAX_QUEUE_SIZE)
        _check_int("weight_bits", self.weight_bits, 0, WEIGHT_BITS)
        _check_int("proj_bits", self.proj_bits, 0, PROJ_BITS)
        _check_int("optim_bits", self.optim_bits, 0, OPTIM_BITS)
        _check_int("seed", self.seed, 0, high=MAX_SEED)
        for name in ("block_size", "proj_block_size"):
            value = getattr(self, name)
            _check_int(name, value, 2, high=MAX_BLOCK_SIZE)
            if value % 2:
                raise ValueError(f"{name} must be even (INT4 codes pack two per byte), got {value}")
        for name in ("adaptive", "stochastic_round", "lean", "fused", "include_lm_head", "trace"):
            _check_bool(name, getattr(self, name))
        if isinstance(self.cos_threshold, bool) or not isinstance(self.cos_threshold, (int, float)):
            raise TypeError(f"cos_threshold must be a float in [0, 1], got {self.cos_threshold!r}")
        if not 0.0 <= float(self.cos_threshold) <= 1.0:
            raise ValueError(f"cos_threshold must be in [0, 1], got {self.cos_threshold}")
        if isinstance(self.scale, bool) or not isinstance(self.scale, (int, float)) \
                or not 0 < self.scale <= MAX_SCALE:
            raise ValueError(f"scale must be a float in (0, {MAX_SCALE:g}] (alpha, default 0.25), got {self.scale!r}")
        for name, allowed in (("proj_method", PROJ_METHODS), ("align", ALIGN_METHODS),
                              ("eps_placement", EPS_PLACEMENTS), ("proj_side", PROJ_SIDES)):
            value = getattr(self, name)
            if value not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {value!r}")
        if self.filter_fn is not None and not callable(self.filter_fn):
            raise TypeError(f"filter_fn must be a callable (module, fqn) -> bool, got {self.filter_fn!r}")
        if self.target_modules is not None:
            patterns = self.target_modules
            if isinstance(patterns, str):
                patterns = (patterns,)
            if not all(isinstance(p, str) for p in patterns):
                raise TypeError(f"target_modules must be a list of regular expressions, got {self.target_modules!r}")
            for p in patterns:
                try:
                    re.compile(p)
                except re.error as e:
                    raise ValueError(f"target_modules entry {p!r} is not a valid regular expression: {e}") from None
            object.__setattr__(self, "target_modules", tuple(patterns))

    def fits(self, m: int, n: int) -> bool:
        """Whether ``rank`` fits a layer whose weight is [m, n]: a projection needs ``rank <= min(m, n)``."""
        return self.rank <= min(m, n)

    def check_fits(self, name: str, m: int, n: int) -> None:
        """Raise ValueError, naming the layer and the way out, unless ``rank`` fits layer ``name`` ([m, n])."""
        if not self.fits(m, n):
            raise ValueError(
                f"rank={self.rank} is larger than min(out, in)={min(m, n)} of layer {name!r} (shape [{m}, {n}]); "
                f"use rank <= {min(m, n)} or exclude the layer with filter_fn/target_modules"
            )

    @classmethod
    def from_options(cls, rank=None, **options) -> "QGaLoreConfig":
        """Build a config from `transform`'s keyword options, rejecting unknown names."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(options) - known)
        if unknown:
            raise TypeError(
                f"unknown option(s) {unknown} for qgalore_fx.transform; allowed: {sorted(known - {'rank'})}"
            )
        if rank is None:
            raise TypeError("transform() needs rank=, the rank of the gradient projection (e.g. rank=256)")
        return cls(rank=rank, **options)

    def to_dict(self) -> dict:
        """JSON-safe view (callables are named, not serialized)."""
        out = dataclasses.asdict(self)
        out["filter_fn"] = None if self.filter_fn is None else getattr(self.filter_fn, "__qualname__", repr(self.filter_fn))
        out["target_modules"] = None if self.target_modules is None else list(self.target_modules)
        return out


def cli_fields() -> tuple:
    """The `QGaLoreConfig` fields ``qgalore-fx pretrain`` exposes as switches (metadata ``cli``), in order."""
    return tuple(f for f in dataclasses.fields(QGaLoreConfig) if f.metadata.get("cli"))
