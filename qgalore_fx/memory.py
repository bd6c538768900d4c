"""Memory accounting: what a transformed model and its optimizer hold.

``memory_report(model, optimizer=None, planned=False) -> MemoryReport``
    Bytes per component, read from the *real tensors* of the model and the
    optimizer (``numel * element_size`` of each tensor, every tensor counted
    once): projected weights (INT8 codes, or the 16/32-bit storage of the
    ablations), their fp32 quantization scales, projections (INT4 codes + fp32
    scales), the low-rank 8-bit Adam moments, low-rank accumulators (with the
    projection copy that undoes a dropped window's refresh), the
    unprojected parameters (embeddings, norms, biases, head), their AdamW
    moments, parameter gradients currently held and other buffers. On CUDA it
    adds ``torch.cuda.max_memory_allocated()``: the allocator's peak of the run
    so far (since the process started or since the last
    ``torch.cuda.reset_peak_memory_stats()``), not a property of the model.

    A projected layer's projection and low-rank moments exist from the
    transform on (they are the layer's buffers), so they are always counted as
    stored. ``planned=True`` also counts the pieces that do not exist yet, as
    they will be: the AdamW moments before the optimizer's first step (and, for
    layers that defer their update but have no optimizer yet, the fp32
    low-rank accumulator that lives between backward and ``step()``, with its
    copy of the projection for undoing a dropped window's refresh). They are
    built on the ``meta`` device by the same code that builds the real ones
    (``AdamState.zeros(..., device="meta")`` with the optimizer's bits) and
    measured by the same ``nbytes``: there is no separate formula to drift. So
    a planned report taken before the first step equals the plain report taken
    after it (a test checks this).

What a run *will* need per training method, for model shapes that need not fit
in memory, is the application's memory planner (``qgalore-fx memory``,
:mod:`qgalore_fx.app.planner`), which builds its Q-GaLore row with this report.

Units: ``GiB`` is 2**30 bytes, ``GB`` 10**9 bytes, ``MiB`` 2**20 bytes.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Dict, List, Optional

import torch
import torch.nn as nn
from torch import Tensor

from qgalore_fx.host_allocator import CPU_MMAP_THRESHOLD, set_cpu_mmap_threshold  # noqa: F401  (their old home)
from qgalore_fx.kernels.adam8bit import AdamState

__all__ = [
    "MemoryReport",
    "memory_report",
]

GiB = 2**30
GB = 10**9
MiB = 2**20
MB = 10**6


def _nbytes(t: Optional[Tensor]) -> int:
    """Bytes this process holds of ``t`` (a DTensor's local shard under FSDP2)."""
    from qgalore_fx.sharding import local

    return 0 if t is None else local(t).numel() * t.element_size()


# =========================================================================== memory_report
_COMPONENTS = (
    ("projected_weights", "projected weights"),
    ("weight_scales", "weight quantization scales"),
    ("projections", "projections"),
    ("lowrank_optimizer_state", "low-rank optimizer state"),
    ("accumulators", "low-rank accumulators"),
    ("unprojected_params", "unprojected parameters"),
    ("adamw_optimizer_state", "AdamW optimizer state"),
    ("gradients", "parameter gradients held now"),
    ("other_buffers", "other buffers"),
)


@dataclass
class MemoryReport:
    """Bytes per component of a model (+ optimizer); see :func:`memory_report`.

    ``planned`` maps a component to the bytes of it that were counted as planned (built on ``meta``)
    rather than read from an existing tensor. ``cuda_max_allocated`` / ``cuda_allocated`` are the CUDA
    allocator's peak of the run so far and its current figure (None off CUDA); they are not part of
    ``total``.
    """

    projected_weights: int = 0
    weight_scales: int = 0
    projections: int = 0
    lowrank_optimizer_state: int = 0
    accumulators: int = 0
    unprojected_params: int = 0
    adamw_optimizer_state: int = 0
    gradients: int = 0
    other_buffers: int = 0
    projected_layers: int = 0
    weight_storage: str = "-"
    projection_storage: str = "-"
    moment_storage: str = "-"  # of the low-rank moments: "8-bit m, v", "fp32 m, v" or lean's factored v
    planned: Dict[str, int] = field(default_factory=dict)
    cuda_max_allocated: Optional[int] = None
    cuda_allocated: Optional[int] = None
    notes: List[str] = field(default_factory=list)

    @property
    def components(self) -> Dict[str, int]:
        return {name: getattr(self, name) for name, _ in _COMPONENTS}

    @property
    def total(self) -> int:
        """Sum of all components (bytes); the CUDA allocator figures are not included."""
        return sum(self.components.values())

    @property
    def weights(self) -> int:
        """Projected weights + their scales + unprojected parameters."""
        return self.projected_weights + self.weight_scales + self.unprojected_params

    @property
    def optimizer_states(self) -> int:
        """Adam moments: low-rank (projected layers) + AdamW (the rest)."""
        return self.lowrank_optimizer_state + self.adamw_optimizer_state

    @property
    def weights_and_states(self) -> int:
        """What the paper's Table 1 counts: weights + optimizer states, projections included."""
        return self.weights + self.optimizer_states + self.projections

    def to_dict(self) -> dict:
        out = asdict(self)
        out.update(total=self.total, weights=self.weights, optimizer_states=self.optimizer_states,
                   weights_and_states=self.weights_and_states)
        return out

    def __str__(self) -> str:
        labels = dict(_COMPONENTS)
        labels["projected_weights"] += f" ({self.weight_storage})"
        labels["projections"] += f" ({self.projection_storage})"
        labels["lowrank_optimizer_state"] += f" ({self.moment_storage})"
        width = max(len(v) for v in labels.values()) + 2
        head = f"{'component':<{width}}{'bytes':>16}{'MiB':>12}{'GiB':>10}"
        lines = [f"qgalore_fx memory report: {self.projected_layers} projected layers"
                 + (" (planned: * = counted as it will be, built on the meta device)" if self.planned else ""),
                 head, "-" * len(head)]
        for name, value in self.components.items():
            mark = " *" if self.planned.get(name) else ""
            lines.append(f"{labels[name]:<{width}}{value:>16,}{value / MiB:>12.2f}{value / GiB:>10.3f}{mark}")
        lines.append("-" * len(head))
        for label, value in (("weights + optimizer states", self.weights_and_states), ("total", self.total)):
            lines.append(f"{label:<{width}}{value:>16,}{value / MiB:>12.2f}{value / GiB:>10.3f}")
        if self.cuda_max_allocated is not None:
            lines.append(f"CUDA max_memory_allocated (peak of the run so far): {self.cuda_max_allocated:,} bytes "
                         f"({self.cuda_max_allocated / GiB:.3f} GiB); allocated now {self.cuda_allocated:,} bytes")
        lines += [f"note: {n}" for n in self.notes]
        return "\n".join(lines)


_WEIGHT_KINDS = {8: "int8 codes", 16: "bf16", 32: "fp32"}
_MOMENT_KINDS = {8: "8-bit m, v", 32: "fp32 m, v"}
_LEAN_MOMENTS = "lean: factored v, no m"
_PROJ_KINDS = {4: "int4 codes + scales", 8: "int8 codes + scales", 16: "bf16", 32: "fp32"}


def _state_nbytes(value, seen: set) -> int:
    """Bytes of the tensors inside one optimizer state entry (tensors, AdamStates, nested containers)."""
    if isinstance(value, Tensor):
        if id(value) in seen:
            return 0
        seen.add(id(value))
        return _nbytes(value)
    if isinstance(value, AdamState):
        return sum(_state_nbytes(t, seen) for t in value.tensors().values())
    if isinstance(value, dict):
        return sum(_state_nbytes(v, seen) for v in value.values())
    if isinstance(value, (list, tuple)):
        return sum(_state_nbytes(v, seen) for v in value)
    return 0


def _cuda_device(model: nn.Module) -> Optional[torch.device]:
    for t in list(model.parameters()) + list(model.buffers()):
        if t.device.type == "cuda":
            return t.device
    return None


def memory_report(model: nn.Module, optimizer: Optional[torch.optim.Optimizer] = None,
                  planned: bool = False) -> MemoryReport:
    """Bytes per component of ``model`` and ``optimizer``, from their real tensors (see module docstring).

    ``optimizer``: a :class:`~qgalore_fx.optim.QGaLoreOptimizer` or any ``torch.optim.Optimizer`` (its
    state tensors are counted as AdamW state). Without one, no AdamW state is counted unless
    ``planned=True``, which counts what ``qgalore_fx.optimizer(model)`` would create: 8-bit (or the
    transform's ``optim_bits``) block-wise moments for every trainable unprojected parameter.

    ``planned=True`` counts projections before the first refresh, AdamW states before the first step and
    (for layers that defer their update) the low-rank accumulator, as they will be.
    """
    from qgalore_fx.layers import QGaLoreLinear
    from qgalore_fx.lowrank import UNDO_NAMES
    from qgalore_fx.optim import QGaLoreOptimizer
    from qgalore_fx.rewrite import config_of

    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if optimizer is not None and not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(f"optimizer must be a torch.optim.Optimizer or None, got {type(optimizer).__name__}")
    if not isinstance(planned, bool):
        raise TypeError(f"planned must be a bool, got {type(planned).__name__}")

    report = MemoryReport()
    pending: Dict[str, int] = {}
    optim_bits = None  # the transform's optim_bits, read from a layer (works through wrappers such as DDP)
    layer_tensors = set()
    anchors = set()
    weight_kinds, proj_kinds, moment_kinds = set(), set(), set()

    for _, layer in ((n, m) for n, m in model.named_modules() if isinstance(m, QGaLoreLinear)):
        report.projected_layers += 1
        layer_tensors.update((id(layer.weight_codes), id(layer.weight_scales)))
        anchors.add(id(layer.anchor))
        report.projected_weights += _nbytes(layer.weight_codes)
        report.weight_scales += _nbytes(layer.weight_scales)
        weight_kinds.add(_WEIGHT_KINDS.get(layer.weight_bits, str(layer.weight_codes.dtype)))
        spec = layer.spec
        if spec is None:
            continue
        # counted below as projections, low-rank moments and accumulators; the counters and hparams (a few
        # bytes per layer) stay under other buffers
        layer_tensors.update(id(getattr(layer, k)) for k in ("proj_codes", "proj_scales", "exp_avg", "exp_avg_sq",
                                                              "exp_avg_absmax", "exp_avg_sq_absmax", "accum",
                                                              *UNDO_NAMES))
        optim_bits = spec.optim_bits
        nbytes = layer.state_nbytes()
        report.lowrank_optimizer_state += nbytes["optimizer_state"]
        proj_kinds.add(_PROJ_KINDS.get(spec.proj_bits, str(spec.proj_bits)))
        moment_kinds.add(_LEAN_MOMENTS if spec.lean else _MOMENT_KINDS.get(spec.optim_bits, str(spec.optim_bits)))
        report.projections += nbytes["projection"]  # allocated at transform time, in its stored form
        report.accumulators += nbytes["accumulator"]
        if planned and not nbytes["accumulator"] and not spec.fused:
            b = _nbytes(torch.empty(spec.lowrank_shape, dtype=torch.float32, device="meta"))
            b += _nbytes(layer.proj_codes) + _nbytes(layer.proj_scales)  # the undo copy (UNDO_NAMES)
            report.accumulators += b
            pending["accumulators"] = pending.get("accumulators", 0) + b

    params = [p for p in model.parameters() if id(p) not in anchors and id(p) not in layer_tensors]
    report.unprojected_params = sum(_nbytes(p) for p in params)
    report.gradients = sum(_nbytes(p.grad) for p in model.parameters() if p.grad is not None)
    report.other_buffers = sum(_nbytes(b) for b in model.buffers() if id(b) not in layer_tensors)
    # each projected layer's anchor (one element, always 0) is bookkeeping, like its counters
    report.other_buffers += sum(_nbytes(p) for p in model.parameters() if id(p) in anchors)
    report.weight_storage = "/".join(sorted(weight_kinds)) or "-"
    report.projection_storage = "/".join(sorted(proj_kinds)) or "-"
    report.moment_storage = "/".join(sorted(moment_kinds)) or "-"

    # AdamW state: what the optimizer holds, plus (planned) what its first step will create.
    seen: set = set()
    if optimizer is not None:
        for p, s in optimizer.state.items():
            if id(p) in anchors:  # the qgalore group keeps its state in the layers, counted above
                continue
            report.adamw_optimizer_state += _state_nbytes(s, seen)
    if planned:
        if isinstance(optimizer, QGaLoreOptimizer):
            bits = optimizer.optim_bits
            todo = [p for g in optimizer.param_groups for p in g["params"] if id(p) not in anchors]
        elif optimizer is None and report.projected_layers:
            config = config_of(model)
            bits = config.optim_bits if config is not None else (optim_bits or 8)
            todo = [p for p in params if p.requires_grad]
        elif optimizer is None:
            todo, bits = [], None
            report.notes.append("not a qgalore_fx model and no optimizer given: AdamW states not planned")
        else:
            todo, bits = [], None
            if any(not optimizer.state.get(p) for g in optimizer.param_groups for p in g["params"]):
                report.notes.append(f"states of {type(optimizer).__name__} not yet created are not planned "
                                    "(only qgalore_fx's optimizer is)")
        step_bytes = torch.empty((), dtype=torch.int64, device="meta").element_size()  # the step count tensor
        b = sum(AdamState.zeros(p.shape, bits=bits, device="meta").nbytes + step_bytes
                for p in todo if optimizer is None or not optimizer.state.get(p))
        if b:
            report.adamw_optimizer_state += b
            pending["adamw_optimizer_state"] = b
    elif optimizer is None:
        report.notes.append("no optimizer given: AdamW states not counted (pass the optimizer, or planned=True)")
    report.planned = pending

    device = _cuda_device(model)
    if device is not None and torch.cuda.is_available():
        report.cuda_max_allocated = torch.cuda.max_memory_allocated(device)
        report.cuda_allocated = torch.cuda.memory_allocated(device)
        report.notes.append("CUDA max_memory_allocated is the allocator's peak since the process started or the "
                            "last torch.cuda.reset_peak_memory_stats(), activations and temporaries included")
    return report


def process_memory(field: str = "VmRSS") -> Optional[int]:
    """A memory figure of this process in bytes from ``/proc/self/status``: ``"VmRSS"`` (resident now) or
    ``"VmHWM"`` (its peak; unlike ``ru_maxrss`` it is this process's own, not inherited across fork + exec).
    None where ``/proc`` does not have it (not Linux)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None
