"""The memory planner behind ``qgalore-fx memory``: what a run will need, per training method.

``plan(preset_or_config, rank, batch_size=None, seq_len=None, methods=...) -> list[PlanRow]``
    Builds the LLaMA on the ``meta`` device (no memory is allocated) and, per
    training method, counts weights, optimizer states, projections, the
    transient weight-gradient peak and (given a batch) an activation estimate.
    See :func:`plan` for what each method holds and the formulas of the two
    estimates. ``qgalore-fx memory`` (or ``python -m qgalore_fx.app.planner``)
    prints these tables; with no ``--preset`` it prints the comparison with the
    paper's Table 1 and the LLaMA-7B set-up of its Figure 5.

The bytes of the Q-GaLore row are the library's own accounting,
:func:`qgalore_fx.memory.memory_report` with ``planned=True``, of the model
``qgalore_fx.transform`` builds on ``meta``.

Units: ``GiB`` is 2**30 bytes, ``GB`` 10**9 bytes, ``MiB`` 2**20 bytes. The
paper writes "G" without saying which; see BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import sys
from dataclasses import asdict, dataclass, field
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
from torch import Tensor

from qgalore_fx.handlers import handler_named
from qgalore_fx.kernels.adam8bit import AdamState
from qgalore_fx.memory import GB, MB, GiB, MiB, MemoryReport, _nbytes, memory_report, process_memory

__all__ = [
    "METHODS",
    "PAPER_FIG5",
    "PAPER_TABLE1",
    "PlanRow",
    "RunPlan",
    "activation_bytes",
    "add_memory_arguments",
    "format_paper_comparison",
    "format_plan",
    "main",
    "paper_comparison",
    "plan",
    "plan_run",
    "planned_qgalore_report",
    "run_memory",
]

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


# =========================================================================== the peak of one CPU run
@dataclass
class RunPlan:
    """Predicted peak resident memory of one eager Q-GaLore training run on the CPU; see :func:`plan_run`.

    Every field is bytes. ``peak = runtime + persistent + saved_activations + max(phases)``.
    """

    preset: str
    rank: int
    batch_size: int
    seq_len: int
    checkpointing: bool
    rest_in_backward: bool
    runtime: int  # the process before the model: interpreter, torch, transformers, kernels warmed up
    persistent: int  # weights, scales, projections, all moments (memory_report(planned=True), fp32 rest)
    saved_activations: int  # kept for backward across layers (checkpointing: each layer's input)
    layer_phase: int  # the backward of one decoder layer: recompute + the largest layer's update
    refresh_extra: int  # on refresh steps (step 0 for every layer): what the new subspace needs on top
    head_phase: int  # logits, the loss and the head's own gradient
    rest_grads_held: int  # unprojected gradients that outlive their layer (the step() path)
    embedding_dtype: torch.dtype = torch.float32
    notes: List[str] = field(default_factory=list)

    @property
    def peak(self) -> int:
        phases = max(self.layer_phase + self.refresh_extra, self.head_phase)
        return self.runtime + self.persistent + self.saved_activations + self.rest_grads_held + phases

    def to_dict(self) -> dict:
        out = asdict(self)
        out.update(peak=self.peak, embedding_dtype=str(self.embedding_dtype).replace("torch.", ""))
        return out

    def __str__(self) -> str:
        rows = [("runtime (process before the model, measured)", self.runtime),
                ("weights + states (memory_report, planned)", self.persistent),
                ("activations kept across layers", self.saved_activations),
                ("unprojected gradients held until step()", self.rest_grads_held),
                ("phase: one layer's backward + update", self.layer_phase),
                ("  + its first refresh (step 0)", self.refresh_extra),
                ("phase: logits, loss, head", self.head_phase),
                ("predicted peak RSS", self.peak)]
        lines = [f"{self.preset}, rank {self.rank}, batch {self.batch_size} x {self.seq_len}, checkpointing "
                 f"{'on' if self.checkpointing else 'off'}, rest_in_backward={self.rest_in_backward}, "
                 f"embedding and head {str(self.embedding_dtype).replace('torch.', '')}"]
        lines += [f"  {name:<48}{value / GiB:>9.3f} GiB" for name, value in rows]
        return "\n".join(lines + [f"  note: {n}" for n in self.notes])


def runtime_rss() -> int:
    """RSS of this process after one tiny warm-up step of a transformed model (imports, thread pools and
    compiled kernels loaded): the part of a run's peak that is not the model's. Linux only."""
    import qgalore_fx
    import transformers

    tiny = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                                    num_attention_heads=4, vocab_size=256)
    model = qgalore_fx.transform(transformers.LlamaForCausalLM(tiny), rank=8)
    opt = qgalore_fx.optimizer(model, lr=1e-3, rest_in_backward=True)
    ids = torch.zeros(1, 8, dtype=torch.long)
    for _ in range(2):
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
    del model, opt
    rss = process_memory("VmRSS")
    if rss is None:
        raise RuntimeError("no VmRSS in /proc/self/status")
    return rss


def plan_run(preset_or_config, rank: Optional[int] = None, batch_size: int = 1, seq_len: Optional[int] = None,
             checkpointing: bool = True, rest_in_backward: bool = True, vocab_size: Optional[int] = None,
             runtime: Optional[int] = None, embedding_dtype: torch.dtype = torch.float32, **options) -> RunPlan:
    """The peak RSS of ``benchmarks/bench_memory_timeline.py`` for this set-up: fp32 compute on the CPU,
    ``qgalore_fx.transform(model, rank, **options)`` from the meta device, unprojected parameters fp32.

    Counted from the model's real shapes (T = batch_size x seq_len tokens, h hidden, i intermediate,
    V vocabulary, fp32 = 4 bytes) and from the library's own chunk sizes:

    * ``saved_activations``: with checkpointing each decoder layer's input (``T h``) and the final norm's;
      without, every layer's saved tensors (``T (10h + 4i)`` plus ``2 heads S²`` attention scores per
      sequence).
    * ``layer_phase``: one layer's recomputed activations (the no-checkpointing per-layer figure) plus the
      largest projected layer's update: R and Adam's direction N (``2 x`` the low-rank shape), the input
      gradient and the fp32 gradients of its output and input (``T (m + n)`` twice), the dequantized
      projection, and the chunk workspaces of the dequant-matmul (``2 x MATMUL_CHUNK``), of Adam
      (``3 x ADAM_CHUNK``) and of the write-back (``3 x WRITE_CHUNK``).
    * ``refresh_extra`` (step 0 refreshes every layer): with few tokens (``T (m + n) < m n``, see
      ``qgalore_fx.projection.FactoredGradient``) the factored SVD's ``Q``, ``G Q`` and the completion block
      with its QR (``(d + a) T + 3 d r``); otherwise the formed ``G`` (``m n``) and three ``[d, r + 8]`` blocks.
    * ``head_phase``: logits, their fp32 copy for the loss, its log-probabilities and gradient (``4 T V``);
      plus the head's gradient (``V h``) unless the head is updated row chunk by row chunk
      (``rest_in_backward`` and ``qgalore_fx.fused_rest.eligible``; then ``3 x ADAMW_CHUNK``).
    * ``rest_grads_held``: without ``rest_in_backward`` every unprojected gradient lives until ``step()``;
      with it, only those the hook path frees one at a time (counted in ``head_phase``'s maximum).

    ``embedding_dtype``: the storage of the input embedding and the output head (``torch.bfloat16``: see
    ``qgalore_fx.fused_rest``). ``runtime`` defaults to :func:`runtime_rss` of this process. Allocator slack and fragmentation are not
    modelled; tests/test_planner_run.py measures how far a real run is from this prediction.
    """
    from qgalore_fx import fused_rest, lowrank, optim
    from qgalore_fx.kernels import int8_matmul as mm
    from qgalore_fx.projection import FactoredGradient

    name, config, default_rank, default_seq = _resolve(preset_or_config, vocab_size)
    rank = rank if rank is not None else default_rank
    seq_len = seq_len if seq_len is not None else (default_seq or 256)
    if rank is None:
        raise ValueError("rank is required when preset_or_config is a config (presets have a default rank)")
    for key, value in (("batch_size", batch_size), ("seq_len", seq_len), ("rank", rank)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{key} must be a positive int, got {value!r}")
    model = _qgalore_meta_model(config, rank, rest_dtype=None, **options)
    if embedding_dtype != torch.float32:
        for module in (model.get_input_embeddings(), model.get_output_embeddings()):
            if module is not None:
                module.to(embedding_dtype)
    persistent = memory_report(model, planned=True).weights_and_states
    f32 = 4
    T = batch_size * seq_len
    h, i, V, L = config.hidden_size, config.intermediate_size, config.vocab_size, config.num_hidden_layers
    heads = config.num_attention_heads
    per_layer = f32 * (T * (10 * h + 4 * i) + 2 * batch_size * heads * seq_len * seq_len)
    saved = f32 * T * h * (L + 1) if checkpointing else per_layer * L
    import qgalore_fx

    update, refresh = 0, 0
    for _, layer in qgalore_fx.projected_layers(model):
        spec = layer.spec
        m, n = spec.m, spec.n
        low = math.prod(spec.lowrank_shape)
        d = n if spec.side == "right" else m
        a = m + n - d
        cost = f32 * (2 * low + 2 * T * (m + n) + T * max(m, n) + rank * d + 2 * mm.MATMUL_CHUNK
                      + 3 * lowrank.ADAM_CHUNK + 3 * lowrank.WRITE_CHUNK)
        update = max(update, cost)
        if spec.proj_method != "full" and FactoredGradient.cheaper(T, m, n):
            extra = f32 * ((d + a) * T + 3 * d * rank)
        else:
            extra = f32 * (m * n + 3 * (a + 2 * d) * (rank + 8))
        refresh = max(refresh, extra)
    head = model.get_output_embeddings()
    fused = fused_rest.fused_weights(model) if rest_in_backward else {}
    head_grad = 0 if head is None or id(head.weight) in fused else head.weight.element_size() * head.weight.numel()
    if rest_in_backward:
        held = 0
        head_phase = f32 * (4 * T * V + max(head_grad, 3 * optim.ADAMW_CHUNK))
        notes = [f"{len(fused)} unprojected weight(s) updated row chunk by row chunk inside their backward"]
    else:
        held = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
        head_phase = f32 * 4 * T * V
        notes = ["every unprojected gradient is held until optimizer.step()"]
    return RunPlan(name, rank, batch_size, seq_len, checkpointing, rest_in_backward,
                   runtime_rss() if runtime is None else runtime, persistent, saved, per_layer + update, refresh,
                   head_phase, held, embedding_dtype, notes)


def _resolve(preset_or_config, vocab_size: Optional[int]):
    """(name, LlamaConfig, default rank, default seq_len) of a preset name, Preset or LlamaConfig."""
    from qgalore_fx.app import presets

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


def _qgalore_meta_model(config, rank: int, rest_dtype: Optional[torch.dtype] = torch.bfloat16,
                        **options) -> nn.Module:
    """``transform(meta model, rank, device="meta")``, then unprojected parameters to ``rest_dtype`` (codes and
    scales keep their dtypes: ``QGaLoreLinear._apply`` restores them); ``None``: fp32, as a CPU run keeps them."""
    import qgalore_fx

    model = qgalore_fx.transform(_meta_model(config), rank, device="meta", **options)
    return model if rest_dtype is None else model.to(rest_dtype)


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

    The projected layers are the ones ``transform`` selects (every layer with a handler in
    ``qgalore_fx.handlers`` inside the decoder layers: ``nn.Linear``, GPT-2's ``Conv1D``; embeddings, norms
    and the head are not projected) for both GaLore and Q-GaLore.

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
    projected = {f"{n}.{handler_named(l.source_type).weight_name}": n for n, l in layers.items()}
    missing = projected.keys() - {n for n, _ in dense_params}
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
                layer = layers[projected[pname]] if pname in projected else None
                if layer is None:
                    states += moments(p)
                    continue
                spec = layer.spec
                projections += _nbytes(torch.empty(spec.projection_shape, dtype=torch.bfloat16, device="meta"))
                states += moments(torch.empty(spec.lowrank_shape, device="meta"))
            grad_peak = bf16_grads
        else:
            rep = memory_report(qmodel, planned=True)
            states, projections = rep.optimizer_states, rep.projections
            anchors = {id(layer.anchor) for layer in layers.values()}
            trainable = [p for p in qmodel.parameters() if p.requires_grad and id(p) not in anchors]
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
    from qgalore_fx.app.argtypes import positive_int as _positive_int
    from qgalore_fx.app.presets import PRESETS

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
    run = parser.add_argument_group("the peak of one CPU run (--run; benchmarks/bench_memory_timeline.py measures it)")
    run.add_argument("--run", action="store_true",
                     help="predict the peak RSS of an eager fp32 CPU training run of --preset (batch 1 x 256 unless "
                          "--batch-size/--seq-len): weights, states, activations and the transients of each phase")
    run.add_argument("--proj-method", choices=("randomized", "subspace", "full"), default=None,
                     help="the transform's proj_method for --run (default: the library's)")
    run.add_argument("--no-rest-in-backward", action="store_true",
                     help="--run with qgalore_fx.optimizer(rest_in_backward=False): unprojected gradients held "
                          "until step()")
    run.add_argument("--no-checkpointing", action="store_true", help="--run without activation checkpointing")
    run.add_argument("--embedding-dtype", choices=("fp32", "bf16"), default="fp32",
                     help="--run: storage of the input embedding and output head (bf16 needs rest_in_backward)")
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
    if getattr(args, "run", False):
        if args.preset is None:
            raise ValueError("--run needs --preset")
        if args.embedding_dtype == "bf16" and args.no_rest_in_backward:
            raise ValueError("--embedding-dtype bf16 needs rest_in_backward (drop --no-rest-in-backward)")
        options = {} if args.proj_method is None else {"proj_method": args.proj_method}
        result = plan_run(args.preset, args.rank, batch_size=args.batch_size or 1, seq_len=args.seq_len,
                          checkpointing=not args.no_checkpointing, rest_in_backward=not args.no_rest_in_backward,
                          vocab_size=args.vocab_size, embedding_dtype={"fp32": torch.float32,
                                                                      "bf16": torch.bfloat16}[args.embedding_dtype],
                          **options)
        print(json.dumps(result.to_dict(), indent=1) if args.json else result, file=out)
        return 0
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
        prog="python -m qgalore_fx.app.planner",
        description="Bytes of weights, optimizer states, projections, gradient peak and activations per training "
                    "method, counted on the meta device."))
    return run_memory(parser.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
