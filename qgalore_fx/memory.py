"""Memory accounting: what a transformed model and its optimizer hold, and what a run will need.

Two entry points:

``memory_report(model, optimizer=None, planned=False) -> MemoryReport``
    Bytes per component, read from the *real tensors* of the model and the
    optimizer (``numel * element_size`` of each tensor, every tensor counted
    once): projected weights (INT8 codes, or the 16/32-bit storage of the
    ablations), their fp32 quantization scales, projections (INT4 codes + fp32
    scales), the low-rank 8-bit Adam moments, low-rank accumulators, the
    unprojected parameters (embeddings, norms, biases, head), their AdamW
    moments, parameter gradients currently held and other buffers. On CUDA it
    adds ``torch.cuda.max_memory_allocated()``: the allocator's peak of the run
    so far (since the process started or since the last
    ``torch.cuda.reset_peak_memory_stats()``), not a property of the model.

    ``planned=True`` also counts the pieces that do not exist yet, as they will
    be: a projection before the layer's first refresh, the AdamW moments before
    the optimizer's first step (and, for layers that defer their update, the
    fp32 low-rank accumulator that lives between backward and ``step()``).
    They are built on the ``meta`` device by the same code that builds the
    real ones (``LowRankState.stored_projection`` of a meta projection, i.e.
    ``quantize_blockwise`` for INT4/INT8; ``AdamState.zeros(..., device="meta")``
    with the optimizer's bits) and measured by the same ``nbytes``: there is
    no separate formula to drift. So a planned report taken before the first
    step equals the plain report taken after it (a test checks this).

``plan(preset_or_config, rank, batch_size=None, seq_len=None, methods=...) -> list[PlanRow]``
    Builds the LLaMA on the ``meta`` device (no memory is allocated) and, per
    training method, counts weights, optimizer states, projections, the
    transient weight-gradient peak and (given a batch) an activation estimate.
    See :func:`plan` for what each method holds and the formulas of the two
    estimates. ``python -m qgalore_fx.memory`` prints these tables; with no
    ``--preset`` it prints the comparison with the paper's Table 1 and the
    LLaMA-7B set-up of its Figure 5.

Units: ``GiB`` is 2**30 bytes, ``GB`` 10**9 bytes, ``MiB`` 2**20 bytes. The
paper writes "G" without saying which; see BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
from dataclasses import asdict, dataclass, field
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
from torch import Tensor

from qgalore_fx.kernels.adam8bit import AdamState
from qgalore_fx.kernels.quant import QuantizedTensor

__all__ = [
    "METHODS",
    "PAPER_FIG5",
    "PAPER_TABLE1",
    "MemoryReport",
    "PlanRow",
    "activation_bytes",
    "add_memory_arguments",
    "memory_report",
    "paper_comparison",
    "plan",
    "planned_qgalore_report",
    "run_memory",
]

GiB = 2**30
GB = 10**9
MiB = 2**20
MB = 10**6

METHODS = ("adamw", "adamw8bit", "galore", "qgalore")
METHOD_LABELS = {
    "adamw": "Full (bf16 AdamW)",
    "adamw8bit": "8-bit AdamW",
    "galore": "GaLore (16-bit)",
    "qgalore": "Q-GaLore",
}

# Table 1 of the Q-GaLore paper: "Memory" column (weights + optimizer states only), in the paper's "G",
# at ranks 128/256/256/512. Full and GaLore are copied there from the GaLore paper (Zhao et al., 2024).
PAPER_TABLE1: Dict[str, Dict[str, float]] = {
    "60m": {"rank": 128, "adamw": 0.36, "galore": 0.24, "qgalore": 0.18},
    "130m": {"rank": 256, "adamw": 0.76, "galore": 0.52, "qgalore": 0.39},
    "350m": {"rank": 256, "adamw": 2.06, "galore": 1.22, "qgalore": 0.88},
    "1b": {"rank": 512, "adamw": 7.80, "galore": 4.38, "qgalore": 3.08},
}
# Figure 5 (LLaMA-7B end to end): the text states only that Q-GaLore alone fits 16 GB; its bars are a figure.
PAPER_FIG5 = {"preset": "7b", "rank": 1024, "batch_size": 1, "seq_len": 256, "budget_bytes": 16 * GB}


def _nbytes(t: Optional[Tensor]) -> int:
    return 0 if t is None else t.numel() * t.element_size()


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
_PROJ_KINDS = {4: "int4 codes + scales", 8: "int8 codes + scales", 16: "bf16"}


def _planned_projection(state) -> object:
    """The projection ``state`` will hold after its first refresh, built on ``meta``.

    The stored form is made by the layer's own ``stored_projection`` (INT4/INT8 ``quantize_blockwise``
    or a bf16 copy) from a meta fp32 matrix of the shape ``compute_projection`` returns.
    """
    return state.stored_projection(torch.empty(state.projection_shape, dtype=torch.float32, device="meta"))


def _projection_nbytes(p) -> int:
    if p is None:
        return 0
    if isinstance(p, QuantizedTensor):
        return p.nbytes
    return _nbytes(p)


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
    weight_kinds, proj_kinds = set(), set()

    for _, layer in ((n, m) for n, m in model.named_modules() if isinstance(m, QGaLoreLinear)):
        report.projected_layers += 1
        layer_tensors.update((id(layer.weight_codes), id(layer.weight_scales)))
        anchors.add(id(layer.anchor))
        report.projected_weights += _nbytes(layer.weight_codes)
        report.weight_scales += _nbytes(layer.weight_scales)
        weight_kinds.add(_WEIGHT_KINDS.get(layer.weight_bits, str(layer.weight_codes.dtype)))
        state = layer.lowrank
        if state is None:
            continue
        optim_bits = state.config.optim_bits
        report.lowrank_optimizer_state += state.adam.nbytes
        proj_kinds.add(_PROJ_KINDS.get(state.config.proj_bits, str(state.config.proj_bits)))
        if state.projection is not None:
            report.projections += _projection_nbytes(state.projection)
        elif planned:
            b = _projection_nbytes(_planned_projection(state))
            report.projections += b
            pending["projections"] = pending.get("projections", 0) + b
        if state.accum is not None:
            report.accumulators += _nbytes(state.accum)
        elif planned and state.defer:
            b = _nbytes(torch.empty(state.lowrank_shape, dtype=torch.float32, device="meta"))
            report.accumulators += b
            pending["accumulators"] = pending.get("accumulators", 0) + b

    params = [p for p in model.parameters() if id(p) not in anchors]
    report.unprojected_params = sum(_nbytes(p) for p in params)
    report.gradients = sum(_nbytes(p.grad) for p in model.parameters() if p.grad is not None)
    report.other_buffers = sum(_nbytes(b) for b in model.buffers() if id(b) not in layer_tensors)
    report.weight_storage = "/".join(sorted(weight_kinds)) or "-"
    report.projection_storage = "/".join(sorted(proj_kinds)) or "-"

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
        b = sum(AdamState.zeros(p.shape, bits=bits, device="meta").nbytes
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


# =========================================================================== plan
@dataclass
class PlanRow:
    """Bytes one training method needs for one model shape; see :func:`plan`."""

    method: str
    label: str
    preset: str
    rank: Optional[int]
    params: int  # number of model parameters (the dense model's)
    weights: int
    optimizer_states: int
    projections: int
    grad_peak: int
    activations: Optional[int] = None
    notes: List[str] = field(default_factory=list)

    @property
    def weights_and_states(self) -> int:
        """The paper's Table 1 "Memory": weights + optimizer states (projections included)."""
        return self.weights + self.optimizer_states + self.projections

    @property
    def total(self) -> int:
        """weights + states + projections + gradient peak + activations (when estimated)."""
        return self.weights_and_states + self.grad_peak + (self.activations or 0)

    def to_dict(self) -> dict:
        out = asdict(self)
        out.update(weights_and_states=self.weights_and_states, total=self.total)
        return out


def activation_bytes(config, batch_size: int, seq_len: int) -> int:
    """Estimated activation bytes kept for backward by a HF LLaMA, bf16, no checkpointing.

    An estimate, not a measurement. Tokens T = batch_size * seq_len; h hidden, i intermediate, V vocabulary,
    L layers. Per layer, tensors saved for backward in bf16 (2 bytes): attention block 6h per token (norm
    input, norm output = q/k/v input, rotated q and k, v, attention output = o_proj input), attention
    itself by a fused kernel (SDPA/flash: no T x T scores kept; eager attention would add 2*heads*seq_len
    bytes per token per layer); MLP block 2h + 4i (norm input and output, gate and up outputs, SiLU(gate),
    the down_proj input). So ``T * L * (16h + 8i)`` bytes, plus ``T * (6h + 6V)`` for the embedding
    output, the final norm's input and output, bf16 logits and the fp32 log-probabilities of the loss.
    RMSNorm's fp32 intermediates and allocator fragmentation are not counted.
    """
    h, i, V, L = config.hidden_size, config.intermediate_size, config.vocab_size, config.num_hidden_layers
    tokens = batch_size * seq_len
    return tokens * L * (16 * h + 8 * i) + tokens * (6 * h + 6 * V)


def _resolve(preset_or_config, vocab_size: Optional[int]):
    """(name, LlamaConfig, default rank, default seq_len) of a preset name, Preset or LlamaConfig."""
    from qgalore_fx import presets

    if isinstance(preset_or_config, (str, presets.Preset)):
        p = presets.get_preset(preset_or_config)
        vocab = vocab_size if vocab_size is not None else (p.vocab_size or 32000)
        return p.name, presets.llama_config(p, vocab_size=vocab), p.rank, p.seq_len
    from transformers import PretrainedConfig

    if isinstance(preset_or_config, PretrainedConfig):
        cfg = copy.deepcopy(preset_or_config)
        if vocab_size is not None:
            cfg.vocab_size = vocab_size
        return getattr(cfg, "model_type", "custom"), cfg, None, None
    raise TypeError(f"preset_or_config must be a preset name ({', '.join(presets.PRESETS)}), a qgalore_fx Preset "
                    f"or a transformers LlamaConfig, got {type(preset_or_config).__name__}")


def _meta_model(config) -> nn.Module:
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


def _qgalore_meta_model(config, rank: int, **options) -> nn.Module:
    """``transform(meta model, rank, device="meta")``, then unprojected parameters to bf16 (codes and scales keep
    their dtypes: ``QGaLoreLinear._apply`` restores them)."""
    import qgalore_fx

    model = qgalore_fx.transform(_meta_model(config), rank, device="meta", **options)
    return model.to(torch.bfloat16)


def planned_qgalore_report(preset_or_config, rank: Optional[int] = None, vocab_size: Optional[int] = None,
                           **options) -> MemoryReport:
    """``memory_report(planned=True)`` of the Q-GaLore model :func:`plan` counts (meta, unprojected in bf16)."""
    _, config, default_rank, _ = _resolve(preset_or_config, vocab_size)
    rank = rank if rank is not None else default_rank
    if rank is None:
        raise ValueError("rank is required when preset_or_config is a config (presets have a default rank)")
    return memory_report(_qgalore_meta_model(config, rank, **options), planned=True)


def plan(preset_or_config, rank: Optional[int] = None, batch_size: Optional[int] = None,
         seq_len: Optional[int] = None, methods: Sequence[str] = METHODS, vocab_size: Optional[int] = None,
         **options) -> List[PlanRow]:
    """Per method, the bytes of training ``preset_or_config`` on a GPU with bf16 compute.

    Every model is built on the ``meta`` device and every piece is a meta tensor of the real dtype and
    shape, so nothing is allocated (the 7B plan runs in seconds). ``rank`` defaults to the preset's
    (the paper's); ``seq_len`` to the preset's when ``batch_size`` is given; ``options`` go to
    ``qgalore_fx.transform`` for the "qgalore" row (e.g. ``proj_bits=16``). Methods:

    ``"adamw"``      the paper's "Full": bf16 weights, bf16 gradients, bf16 Adam m and v.
    ``"adamw8bit"``  bf16 weights and gradients, 8-bit block-wise moments (``AdamState.zeros(bits=8)``,
                     with its rule that tensors under 4096 elements keep fp32 moments).
    ``"galore"``     GaLore as the paper counts it: bf16 weights; each projected layer a bf16 projection
                     and 16-bit Adam moments of the rank-r gradient; unprojected parameters 16-bit Adam.
    ``"qgalore"``    ``qgalore_fx.transform(meta model, rank, device="meta")`` with the defaults (INT8
                     weights + scales, INT4 projections, 8-bit low-rank moments), measured by
                     ``memory_report(planned=True)``; the unprojected parameters are converted to bf16 on
                     meta first (``model.to(torch.bfloat16)``, which leaves codes and scales alone), as GPU
                     training keeps them, and get 8-bit AdamW moments.

    The projected layers are the ones ``transform`` selects (every linear inside the decoder layers;
    embeddings, norms and the head are not projected) for both GaLore and Q-GaLore.

    ``grad_peak`` is the transient weight-gradient memory: the full methods and GaLore (whose optimizer
    runs in ``step()``, as in Table 1) hold every parameter's bf16 gradient at once. Fused Q-GaLore holds
    the unprojected parameters' bf16 gradients until ``step()`` plus one projected layer's G at a time:
    the largest ``m x n`` fp32 G, formed on refresh steps only (between refreshes only the rank-r
    gradient is formed). Its fp32 copies of that layer's input and output gradient (``T x (m + n)``
    floats) and the SVD workspace are not counted.

    ``activations`` (only with ``batch_size``): :func:`activation_bytes`, the same for every method.
    Other buffers (the rotary ``inv_freq``) are left out of every row.
    """
    import qgalore_fx

    unknown = [m for m in methods if m not in METHODS]
    if unknown or not methods:
        raise ValueError(f"methods must be a non-empty subset of {METHODS}, got {list(methods)!r}")
    for name, value in (("rank", rank), ("batch_size", batch_size), ("seq_len", seq_len)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ValueError(f"{name} must be a positive int or None, got {value!r}")
    name, config, default_rank, default_seq = _resolve(preset_or_config, vocab_size)
    rank = rank if rank is not None else default_rank
    if rank is None:
        raise ValueError("rank is required when preset_or_config is a config (presets have a default rank)")
    if batch_size is not None and seq_len is None:
        if default_seq is None:
            raise ValueError("seq_len is required with batch_size when preset_or_config is a config")
        seq_len = default_seq
    if seq_len is not None and batch_size is None:
        raise ValueError("seq_len was given without batch_size; pass both to estimate activations")
    activations = None if batch_size is None else activation_bytes(config, batch_size, seq_len)

    # The Q-GaLore model: transformed on meta, unprojected parameters as bf16.
    qmodel = _qgalore_meta_model(config, rank, **options)
    layers = {n: l for n, l in qgalore_fx.projected_layers(qmodel)}
    # The dense model of the baselines, bf16 on meta.
    dense = _meta_model(config).to(torch.bfloat16)
    dense_params = list(dense.named_parameters())
    n_params = sum(p.numel() for _, p in dense_params)
    dense_weights = sum(_nbytes(p) for _, p in dense_params)
    bf16_grads = dense_weights  # one bf16 gradient per parameter
    projected = {f"{n}.weight" for n in layers}
    missing = projected - {n for n, _ in dense_params}
    if missing:
        raise RuntimeError(f"projected layers not found in the dense model: {sorted(missing)[:3]}")

    def moments(t: Tensor, dtype=torch.bfloat16) -> int:
        return 2 * _nbytes(torch.empty(t.shape, dtype=dtype, device="meta"))

    rows = []
    for method in methods:
        notes: List[str] = []
        projections = 0
        if method == "adamw":
            states = sum(moments(p) for _, p in dense_params)
            grad_peak = bf16_grads
        elif method == "adamw8bit":
            states = sum(AdamState.zeros(p.shape, bits=8, device="meta").nbytes for _, p in dense_params)
            grad_peak = bf16_grads
        elif method == "galore":
            states = 0
            for pname, p in dense_params:
                layer = layers.get(pname[: -len(".weight")]) if pname in projected else None
                if layer is None:
                    states += moments(p)
                    continue
                lr = layer.lowrank
                m, n = lr.shape
                pshape = (lr.rank, n) if lr.side == "right" else (m, lr.rank)
                projections += _nbytes(torch.empty(pshape, dtype=torch.bfloat16, device="meta"))
                states += moments(torch.empty(lr.lowrank_shape, device="meta"))
            grad_peak = bf16_grads
        else:
            rep = memory_report(qmodel, planned=True)
            states, projections = rep.optimizer_states, rep.projections
            trainable = [p for p in qmodel.parameters() if p.requires_grad and p.numel()]
            largest_g = max((l.out_features * l.in_features * 4 for l in layers.values()), default=0)
            grad_peak = sum(_nbytes(p) for p in trainable) + largest_g
            notes.append("weights: INT8 codes + fp32 scales for projected layers, bf16 for the rest")
            rows.append(PlanRow(method, METHOD_LABELS[method], name, rank, n_params, rep.weights, states,
                                projections, grad_peak, activations, notes))
            continue
        rows.append(PlanRow(method, METHOD_LABELS[method], name, rank, n_params, dense_weights, states,
                            projections, grad_peak, activations, notes))
    return rows


def paper_comparison(presets: Iterable[str] = tuple(PAPER_TABLE1),
                     methods: Sequence[str] = ("adamw", "galore", "qgalore")) -> List[dict]:
    """Our weights + optimizer states next to the paper's Table 1 (its "G" read as GiB)."""
    out = []
    for preset in presets:
        paper = PAPER_TABLE1[preset]
        for row in plan(preset, paper["rank"], methods=methods):
            ours = row.weights_and_states
            ref = paper.get(row.method)
            out.append({
                "preset": preset, "rank": paper["rank"], "method": row.method, "label": row.label,
                "ours_bytes": ours, "ours_gib": ours / GiB, "ours_gb": ours / GB, "paper_g": ref,
                "rel_diff_gib": None if ref is None else ours / GiB / ref - 1.0,
            })
    return out


# =========================================================================== tables and CLI
def _fmt(value: Optional[int], unit: int = GiB) -> str:
    return "-" if value is None else f"{value / unit:.3f}"


def format_plan(rows: List[PlanRow], paper: Optional[Dict[str, float]] = None) -> str:
    """A text table of :func:`plan` rows in GiB (MiB for small models; and the paper's figure when given)."""
    r0 = rows[0]
    small = not paper and max(r.total for r in rows) < GiB
    unit, unit_name, big = (MiB, "MiB (2^20 bytes)", MB) if small else (GiB, "GiB (2^30 bytes)", GB)
    head = (f"{'method':<20}{'weights':>9}{'states':>9}{'proj':>8}{'W+S':>9}{'W+S ' + ('MB' if small else 'GB'):>9}"
            f"{'grad pk':>9}{'activ.':>9}{'total':>9}")
    if paper:
        head += f"{'paper':>8}{'diff':>8}"
    lines = [f"{r0.preset}: {r0.params / 1e6:,.1f}M parameters, rank {r0.rank}; {unit_name} unless marked "
             f"{'MB' if small else 'GB'}; W+S = weights + optimizer states + projections (the paper's Table 1 "
             "'Memory')", head, "-" * len(head)]
    for r in rows:
        line = (f"{r.label:<20}{_fmt(r.weights, unit):>9}{_fmt(r.optimizer_states, unit):>9}"
                f"{_fmt(r.projections, unit):>8}{_fmt(r.weights_and_states, unit):>9}"
                f"{_fmt(r.weights_and_states, big):>9}{_fmt(r.grad_peak, unit):>9}{_fmt(r.activations, unit):>9}"
                f"{_fmt(r.total, unit):>9}")
        if paper:
            ref = paper.get(r.method)
            diff = "-" if ref is None else f"{(r.weights_and_states / GiB / ref - 1) * 100:+.1f}%"
            line += f"{'-' if ref is None else f'{ref:.2f}G':>8}{diff:>8}"
        lines.append(line)
    return "\n".join(lines)


def format_paper_comparison(rows: List[dict]) -> str:
    head = f"{'model':<7}{'rank':>5}  {'method':<20}{'ours GiB':>9}{'ours GB':>9}{'paper G':>9}{'diff (GiB)':>11}"
    lines = ["Weights + optimizer states (incl. projections) vs the paper's Table 1", head, "-" * len(head)]
    for r in rows:
        diff = "-" if r["rel_diff_gib"] is None else f"{r['rel_diff_gib'] * 100:+.1f}%"
        lines.append(f"{r['preset']:<7}{r['rank']:>5}  {r['label']:<20}{r['ours_gib']:>9.3f}{r['ours_gb']:>9.3f}"
                     f"{r['paper_g']:>9.2f}{diff:>11}")
    return "\n".join(lines)


def _methods(text: str) -> Tuple[str, ...]:
    items = tuple(t.strip() for t in text.split(",") if t.strip())
    bad = [t for t in items if t not in METHODS]
    if bad or not items:
        raise argparse.ArgumentTypeError(f"expected a comma-separated subset of {','.join(METHODS)}, got {text!r}")
    return items


def add_memory_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Register the ``memory`` command's arguments on ``parser`` (used by ``qgalore-fx memory`` and ``-m``)."""
    from qgalore_fx.cli import _positive_int
    from qgalore_fx.presets import PRESETS

    parser.add_argument("--preset", choices=list(PRESETS), default=None,
                        help="model shape to plan (default: compare with the paper's Table 1 and the "
                             "LLaMA-7B set-up of its Figure 5)")
    parser.add_argument("--rank", type=_positive_int, default=None,
                        help="projection rank (default: the preset's; 60m 128, 130m/350m 256, 1b 512, 7b 1024; "
                             "without --preset it sets the 7B table's rank)")
    parser.add_argument("--batch-size", type=_positive_int, default=None,
                        help="sequences per step, to add an activation estimate")
    parser.add_argument("--seq-len", type=_positive_int, default=None,
                        help="tokens per sequence (default with --batch-size: the preset's, 256 for paper sizes)")
    parser.add_argument("--vocab-size", type=_positive_int, default=None,
                        help="vocabulary (default: the preset's; 32000 for presets that take the tokenizer's)")
    parser.add_argument("--methods", type=_methods, default=METHODS,
                        help=f"comma-separated subset of {','.join(METHODS)} (default: all)")
    parser.add_argument("--breakdown", action="store_true",
                        help="also print the per-component memory report of the Q-GaLore model (with --preset)")
    parser.add_argument("--json", action="store_true", help="print the rows as JSON instead of a table")
    return parser


def run_memory(args: argparse.Namespace, out=None) -> int:
    """Print the memory table(s) for parsed ``args`` (see :func:`add_memory_arguments`).

    Returns 0, or 2 after printing ``error: ...`` to stderr when the arguments do not fit the model
    (e.g. a rank above a layer's smaller dimension, or ``--seq-len`` without ``--batch-size``).
    """
    out = sys.stdout if out is None else out
    try:
        return _run_memory(args, out)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


def _run_memory(args: argparse.Namespace, out) -> int:
    if args.seq_len is not None and args.batch_size is None:
        raise ValueError("--seq-len needs --batch-size (the activation estimate needs both)")
    if args.preset is None:
        comparison = paper_comparison()
        fig = PAPER_FIG5
        rows7 = plan(fig["preset"], args.rank or fig["rank"], batch_size=args.batch_size or fig["batch_size"],
                     seq_len=args.seq_len or fig["seq_len"], methods=args.methods)
        if args.json:
            print(json.dumps({"table1": comparison, "llama7b": [r.to_dict() for r in rows7]}, indent=1), file=out)
            return 0
        print(format_paper_comparison(comparison), file=out)
        print(file=out)
        print(f"LLaMA-7B as in the paper's Figure 5 (batch {args.batch_size or fig['batch_size']}, "
              f"seq_len {args.seq_len or fig['seq_len']}):", file=out)
        print(format_plan(rows7), file=out)
        return 0
    rows = plan(args.preset, args.rank, batch_size=args.batch_size, seq_len=args.seq_len, methods=args.methods,
                vocab_size=args.vocab_size)
    report = None
    if args.breakdown:
        report = planned_qgalore_report(args.preset, args.rank, vocab_size=args.vocab_size)
    if args.json:
        data = [r.to_dict() for r in rows]
        print(json.dumps(data if report is None else {"rows": data, "qgalore_report": report.to_dict()}, indent=1),
              file=out)
        return 0
    paper = PAPER_TABLE1.get(args.preset)
    if paper is not None and (rows[0].rank != paper["rank"] or args.vocab_size not in (None, 32000)):
        paper = None  # the paper's figure is for its own rank and vocabulary only
    print(format_plan(rows, paper), file=out)
    if report is not None:
        print(file=out)
        print("Q-GaLore model (transformed on the meta device, unprojected parameters in bf16):", file=out)
        print(report, file=out)
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    parser = add_memory_arguments(argparse.ArgumentParser(
        prog="python -m qgalore_fx.memory",
        description="Bytes of weights, optimizer states, projections, gradient peak and activations per training "
                    "method, counted on the meta device."))
    return run_memory(parser.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
