"""The memory planner behind ``qgalore-fx memory``: what a run will need, per training method.

``plan(preset_or_config, rank, batch_size=None, seq_len=None, methods=...) -> list[PlanRow]``
    Builds the LLaMA on the ``meta`` device (no memory is allocated) and, per
    training method, counts weights, optimizer states, projections, the
    transient weight-gradient peak and (given a batch) an activation estimate.
    See :func:`plan` for what each method holds and the formulas of the two
    estimates. ``qgalore-fx memory`` (or ``python -m qgalore_fx.app.planner``)
    prints these tables; with no ``--preset`` it prints the comparison with the
    paper's Table 1 and the LLaMA-7B set-up of its Figure 5.

``plan_run(preset, rank, batch_size, seq_len, ...) -> RunPlan``
    The peak resident memory of one eager CPU training run, phase by phase
    (``qgalore-fx memory --run``).

``plan_sharded(preset, world_size, rank, batch_size, seq_len, ...) -> ShardedPlan``
    The same run sharded with FSDP2 on ``world_size`` ranks: one rank's weights,
    states, projections, transient peak and total, or a :class:`ShardingError`
    naming the layers that cannot split (``qgalore-fx memory --world-size W``;
    LLaMA-2 13B and 70B are presets for it).

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

from qgalore_fx.config import PROJ_METHODS, PROJ_SIDES
from qgalore_fx.handlers import handler_named
from qgalore_fx.kernels.adam8bit import AdamState
from qgalore_fx.memory import GB, MB, GiB, MiB, MemoryReport, _nbytes, memory_report, process_memory

__all__ = [
    "METHODS",
    "PAPER_FIG5",
    "PAPER_TABLE1",
    "PlanRow",
    "RunPlan",
    "ShardedPlan",
    "ShardingError",
    "activation_bytes",
    "add_memory_arguments",
    "format_paper_comparison",
    "format_plan",
    "main",
    "paper_comparison",
    "plan",
    "plan_run",
    "plan_sharded",
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
             checkpointing: bool = True, rest_in_backward: Optional[bool] = None, vocab_size: Optional[int] = None,
             runtime: Optional[int] = None, embedding_dtype: torch.dtype = torch.float32, **options) -> RunPlan:
    """The peak RSS of ``benchmarks/bench_memory_timeline.py`` for this set-up: fp32 compute on the CPU,
    ``qgalore_fx.transform(model, rank, **options)`` from the meta device, unprojected parameters fp32.

    Counted from the model's real shapes (T = batch_size x seq_len tokens, h hidden, i intermediate,
    V vocabulary, fp32 = 4 bytes) and from the library's own chunk sizes:

    * ``saved_activations``: with checkpointing each decoder layer's input (``T h``) and the final norm's;
      without, every layer's saved tensors (``T (10h + 4i)`` plus ``2 heads S²`` attention scores per
      sequence).
    * ``layer_phase``: one layer's recomputed activations (the no-checkpointing per-layer figure) plus the
      largest projected layer's update: R, over which the direction N is written (the low-rank shape), the input
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

    ``rest_in_backward``: ``None`` plans what ``qgalore_fx.optimizer`` does by default (on when an embedding or
    head is large enough for the row-chunked update). ``embedding_dtype``: the storage of the input embedding and the output head (``torch.bfloat16``: see
    ``qgalore_fx.fused_rest``). ``runtime`` defaults to :func:`runtime_rss` of this process. Allocator slack and fragmentation are not
    modelled; tests/test_planner_run.py measures how far a real run is from this prediction.
    """
    from qgalore_fx import fused_rest, optim

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
    V = config.vocab_size
    per_layer, saved = _activation_costs(config, batch_size, seq_len, checkpointing)
    update, refresh = _update_costs(model, rank, T, factored=True)
    head = model.get_output_embeddings()
    fused = fused_rest.fused_weights(model)
    if rest_in_backward is None:  # qgalore_fx.optimizer's default: on when an embedding or head is fused
        rest_in_backward = bool(fused)
    if not rest_in_backward:
        fused = {}
    head_grad = 0 if head is None or id(head.weight) in fused else head.weight.element_size() * head.weight.numel()
    if rest_in_backward:
        held = 0
        head_phase = f32 * 4 * T * V + max(head_grad, f32 * 3 * optim.ADAMW_CHUNK)
        notes = [f"{len(fused)} unprojected weight(s) updated row chunk by row chunk inside their backward"]
    else:
        held = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
        head_phase = f32 * 4 * T * V
        notes = ["every unprojected gradient is held until optimizer.step()"]
    return RunPlan(name, rank, batch_size, seq_len, checkpointing, rest_in_backward,
                   runtime_rss() if runtime is None else runtime, persistent, saved, per_layer + update, refresh,
                   head_phase, held, embedding_dtype, notes)


# =========================================================================== one rank of an FSDP2 run
@dataclass
class ShardedPlan:
    """Predicted peak memory of one rank of an FSDP2 (``fully_shard``) Q-GaLore run on W ranks; see
    :func:`plan_sharded`. Every field is bytes, for rank 0 (the largest shard where a split is uneven)."""

    preset: str
    rank: int
    world_size: int
    batch_size: int  # sequences per step over all ranks; each rank trains on batch_size / world_size
    seq_len: int
    checkpointing: bool
    prefetch: int  # decoder blocks FSDP2 holds all-gathered at once
    runtime: int  # the process before the model (measured here, as for plan_run)
    weights: int  # this rank's INT8 codes + scales and its shard of the unprojected parameters
    states: int  # its rows of the low-rank moments and accumulators, its AdamW states
    projections: int  # INT4 projections: replicated, whole on every rank
    saved_activations: int  # kept across layers for the rank's batch slice
    gathered: int  # FSDP2's unsharded copies: the root group (embedding, final norm, head) + `prefetch` blocks
    root_grads: int  # the head's (and final norm's) unsharded gradient, held until the root's reduce-scatter
    rest_grads_held: int  # this rank's shards of the blocks' unprojected gradients (norms), held until step()
    layer_phase: int  # one decoder layer's backward: recompute + the largest projected layer's update
    refresh_extra: int  # at a refresh: the full fp32 G of the largest layer (all-reduced) + the SVD's workspace
    head_phase: int  # logits, the loss and the head's unsharded gradient
    end_phase: int  # the end of backward: the embedding's unsharded gradient joins the head's, then 1/W of each
    notes: List[str] = field(default_factory=list)

    @property
    def weights_and_states(self) -> int:
        """Weights + states + projections: what ``memory_report`` counts on this rank after the first step."""
        return self.weights + self.states + self.projections

    @property
    def transient(self) -> int:
        """The transient peak: activations, FSDP2's gathered copies, the gradients held, the largest phase."""
        phases = max(self.layer_phase + self.refresh_extra + self.root_grads, self.head_phase, self.end_phase)
        return self.saved_activations + self.gathered + self.rest_grads_held + phases

    @property
    def total(self) -> int:
        return self.runtime + self.weights_and_states + self.transient

    def to_dict(self) -> dict:
        out = asdict(self)
        out.update(weights_and_states=self.weights_and_states, transient=self.transient, total=self.total)
        return out

    def __str__(self) -> str:
        W, per = self.world_size, self.batch_size // self.world_size
        rows = [("weights: INT8 codes + scales, unprojected (1/W)", self.weights),
                ("states: low-rank moments, accumulators, AdamW (1/W)", self.states),
                ("projections: INT4, whole on every rank", self.projections),
                ("transient peak", self.transient),
                (f"  activations kept across layers ({per} x {self.seq_len})", self.saved_activations),
                (f"  all-gathered: root group + {self.prefetch} block(s)", self.gathered),
                ("  blocks' gradient shards held until step()", self.rest_grads_held),
                ("  phase: one layer's backward + update", self.layer_phase),
                ("    + a refresh: full G all-reduced, SVD", self.refresh_extra),
                ("    + head's gradient awaiting the root's reduce", self.root_grads),
                ("  phase: logits, loss, head's gradient", self.head_phase),
                ("  phase: end of backward (embedding's gradient)", self.end_phase),
                ("process (measured here)", self.runtime),
                ("total per rank", self.total)]
        lines = [f"{self.preset} on {W} ranks (FSDP2), per rank: rank {self.rank}, global batch {self.batch_size} "
                 f"x {self.seq_len} ({per} per rank), checkpointing {'on' if self.checkpointing else 'off'}, fp32 "
                 "compute and unprojected parameters"]
        lines += [f"  {name:<52}{value / GiB:>10.3f} GiB" for name, value in rows]
        return "\n".join(lines + [f"  note: {n}" for n in self.notes])


class ShardingError(ValueError):
    """A model whose projected layers do not split over the world size (:func:`qgalore_fx.sharding.split_error`)."""


def plan_sharded(preset_or_config, world_size: int, rank: Optional[int] = None, batch_size: Optional[int] = None,
                 seq_len: Optional[int] = None, checkpointing: bool = True, prefetch: int = 2,
                 vocab_size: Optional[int] = None, runtime: Optional[int] = None, **options) -> ShardedPlan:
    """Bytes on one rank of an eager fp32 Q-GaLore run sharded with FSDP2 on ``world_size`` ranks, as README's
    recipe builds it: ``transform``, ``fully_shard`` each decoder block and then the root, ``qgalore_fx.optimizer``
    (``rest_in_backward`` is refused under torch.distributed, so the AdamW group steps in ``step()``).

    What each rank keeps (counted on the meta model ``transform`` builds, with the library's own rules):

    * 1/W: INT8 codes and their scales (FSDP2 shards them along rows), the low-rank moments and accumulators (cut
      to the rank's rows of R, :func:`qgalore_fx.sharding.shard_layer`), the unprojected parameters (FSDP2's
      ``Shard(0)``: rank 0 holds ``ceil(rows / W)`` rows) and their AdamW states where
      :func:`qgalore_fx.sharding.shard0_layout` says ``"local"`` (a parameter whose shard is not whole moment
      blocks keeps its state whole on every rank, as the optimizer does).
    * whole on every rank: the INT4 projections.

    The transient peak, per rank, is the :func:`plan_run` model (fp32, T = batch_size / W x seq_len tokens: the
    rank's slice of the global batch) with what FSDP2 adds:

    * ``saved_activations``: as :func:`plan_run` for the rank's tokens.
    * ``gathered``: FSDP2's unsharded copies. The root group (embedding, final norm, head) stays gathered from the
      root's forward to the end of backward (FSDP2 does not reshard the root after forward); of the decoder blocks,
      ``prefetch`` at once (default 2: the block computing and the one FSDP2's implicit prefetch gathers next, in
      forward and in backward), each its INT8 codes + scales and its norms, unsharded. The all-gather's staging
      buffer, freed at copy-out, is not counted.
    * ``layer_phase`` (+ ``refresh_extra``): one layer's recompute and the largest projected layer's update, as
      :func:`plan_run`; every rank forms the full R (reduce-scattered to its rows, counted in the update). At a
      refresh (step 0 for every layer) the layer all-reduces its full fp32 G (``m x n``, never factored under a
      process group) and runs the SVD on it. While the blocks run backward the head's and final norm's unsharded
      gradients (``root_grads``) wait for the root group's reduce-scatter, which FSDP2 runs at the end of backward.
    * ``head_phase``: logits, their fp32 copy, log-probabilities and gradient (``4 T V``) and the head's
      unsharded gradient. ``end_phase``: the root group's unsharded gradients (embedding, norm, head) and their
      1/W reduce-scattered shards.
    * ``rest_grads_held``: the rank's gradient shards of the blocks' unprojected parameters (their norms), reduced
      as each block's backward ends and held until ``step()`` (the root group's arrive in ``end_phase``).

    ``transient = saved_activations + gathered + rest_grads_held + max(layer_phase + refresh_extra + root_grads,
    head_phase, end_phase)``; ``total = runtime + weights + states + projections + transient``.

    ``batch_size`` is global (default: one sequence per rank) and must divide by ``world_size``. Raises
    :class:`ShardingError` naming the layers when a projected layer cannot be split over ``world_size`` ranks
    (``out_features % W``, whole 256-element INT8 blocks per rank, whole moment blocks of R: the check the
    optimizer makes, :func:`qgalore_fx.sharding.split_error`). Mixed precision (bf16 parameters through FSDP2's
    ``MixedPrecisionPolicy``), allocator slack and the communication buffers of the process group are not modelled.
    """
    import re

    import qgalore_fx
    from qgalore_fx import sharding
    from qgalore_fx.rewrite import config_of

    for key, value in (("world_size", world_size), ("prefetch", prefetch)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{key} must be a positive int, got {value!r}")
    name, config, default_rank, default_seq = _resolve(preset_or_config, vocab_size)
    rank = rank if rank is not None else default_rank
    seq_len = seq_len if seq_len is not None else (default_seq or 256)
    batch_size = batch_size if batch_size is not None else world_size
    if rank is None:
        raise ValueError("rank is required when preset_or_config is a config (presets have a default rank)")
    for key, value in (("batch_size", batch_size), ("seq_len", seq_len), ("rank", rank)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{key} must be a positive int, got {value!r}")
    if batch_size % world_size:
        raise ValueError(f"batch_size {batch_size} (global) must divide by world_size {world_size}: each rank "
                         "trains on an equal slice")
    model = _qgalore_meta_model(config, rank, rest_dtype=None, **options)
    W = world_size

    def nbytes(t: Tensor) -> int:
        return t.numel() * t.element_size()

    def share(t: Tensor) -> int:  # rank 0's part of a Shard(0) tensor, as FSDP2 and shard_layer cut it
        return nbytes(t.chunk(W)[0]) if t.dim() and t.numel() else nbytes(t)

    layers = dict(qgalore_fx.projected_layers(model))
    problems = {}
    for lname, layer in layers.items():
        message = sharding.split_error(lname, layer.spec, W, moments_8bit=layer.exp_avg.dtype == torch.uint8)
        if message:
            generic = re.sub(r"\.layers\.\d+\.", ".layers.*.", message)
            problems[generic] = problems.get(generic, 0) + 1
    if problems:
        raise ShardingError(f"{name}: {sum(problems.values())} of {len(layers)} projected layers cannot be sharded "
                            f"on {W} ranks, so no per-rank figure is given: "
                            + "; ".join(f"{m} ({k} layers)" for m, k in problems.items()))

    weights = states = projections = 0
    layer_tensors, anchors = set(), set()
    for lname, layer in layers.items():
        layer_tensors |= {id(layer.weight_codes), id(layer.weight_scales)}
        anchors.add(id(layer.anchor))
        weights += share(layer.weight_codes) + share(layer.weight_scales)
        states += sum(share(getattr(layer, k)) for k in sharding.SHARDED_STATE)
        if not layer.spec.fused and not layer.accum.numel():  # the accumulator the optimizer will create
            states += share(torch.empty(layer.spec.lowrank_shape, dtype=torch.float32, device="meta"))
        projections += layer.state_nbytes()["projection"]
    rest = [(n, p) for n, p in model.named_parameters() if id(p) not in layer_tensors and id(p) not in anchors]
    weights += sum(share(p) for _, p in rest)
    bits = config_of(model).optim_bits
    step_bytes = 8  # the int64 step count of each parameter
    for _, p in rest:
        if not p.requires_grad:
            continue
        local = sharding.shard0_layout(tuple(p.shape), W, bits) == "local"
        shape = p.chunk(W)[0].shape if local else p.shape
        states += AdamState.zeros(shape, bits=sharding.state_bits_of(p.numel(), bits), device="meta").nbytes
        states += step_bytes

    blocks = _decoder_blocks(model)  # a block's unsharded codes, scales and other parameters (the largest)
    block_gathered = max((sum(nbytes(p) for p in b.parameters()) for b in blocks), default=0)
    in_blocks = {id(p) for b in blocks for p in b.parameters()}
    root = [p for _, p in rest if id(p) not in in_blocks]
    gathered = sum(nbytes(p) for p in root) + min(prefetch, len(blocks)) * block_gathered

    f32 = 4
    T = batch_size // W * seq_len
    V = config.vocab_size
    per_layer, saved = _activation_costs(config, batch_size // W, seq_len, checkpointing)
    update, refresh = _update_costs(model, rank, T, factored=False)
    head, embedding = model.get_output_embeddings(), model.get_input_embeddings()
    head_grad = 0 if head is None else nbytes(head.weight)
    root_grads_all = sum(nbytes(p) for p in root if p.requires_grad)
    emb_grad = 0 if embedding is None or embedding.weight is getattr(head, "weight", None) else \
        nbytes(embedding.weight)
    root_grads = root_grads_all - emb_grad  # the head's and the final norm's: computed before the blocks'
    end_phase = root_grads_all + sum(share(p) for p in root if p.requires_grad)
    # the blocks' gradient shards (norms) wait for step(); the root's arrive at the end of backward (end_phase)
    held = sum(share(p) for _, p in rest if p.requires_grad and id(p) in in_blocks)
    notes = [f"FSDP2 all-gathers {prefetch} decoder block(s) at once (the one computing and the one prefetched)"]
    if not checkpointing:
        notes.append("without checkpointing every layer's activations are kept (fp32, the rank's tokens)")
    return ShardedPlan(name, rank, W, batch_size, seq_len, checkpointing, prefetch,
                       runtime_rss() if runtime is None else runtime, weights, states, projections, saved,
                       gathered, root_grads, held, per_layer + update, refresh, f32 * 4 * T * V + head_grad,
                       end_phase, notes)


def _decoder_blocks(model: nn.Module) -> List[nn.Module]:
    """The decoder blocks README's recipe wraps one by one with ``fully_shard`` (``model.model.layers``; the
    first ``ModuleList`` otherwise)."""
    inner = getattr(model, "model", None)
    if isinstance(getattr(inner, "layers", None), nn.ModuleList):
        return list(inner.layers)
    for module in model.modules():
        if isinstance(module, nn.ModuleList):
            return list(module)
    return []


def _activation_costs(config, batch_size: int, seq_len: int, checkpointing: bool) -> Tuple[int, int]:
    """(one decoder layer's saved activations, what is kept across layers) in fp32 bytes; see :func:`plan_run`."""
    f32 = 4
    T = batch_size * seq_len
    h, i, L = config.hidden_size, config.intermediate_size, config.num_hidden_layers
    heads = config.num_attention_heads
    per_layer = f32 * (T * (10 * h + 4 * i) + 2 * batch_size * heads * seq_len * seq_len)
    saved = f32 * T * h * (L + 1) if checkpointing else per_layer * L
    return per_layer, saved


def _update_costs(model: nn.Module, rank: int, T: int, factored: bool) -> Tuple[int, int]:
    """(the largest projected layer's update, the largest refresh's extra) in fp32 bytes for T tokens; see
    :func:`plan_run`. ``factored=False``: every refresh forms G (a refresh under a process group does)."""
    import qgalore_fx
    from qgalore_fx import lowrank
    from qgalore_fx.kernels import int8_matmul as mm
    from qgalore_fx.projection import FactoredGradient

    f32 = 4
    update, refresh = 0, 0
    for _, layer in qgalore_fx.projected_layers(model):
        spec = layer.spec
        m, n = spec.m, spec.n
        low = math.prod(spec.lowrank_shape)
        d = n if spec.side == "right" else m
        a = m + n - d
        cost = f32 * (low + 2 * T * (m + n) + T * max(m, n) + rank * d + 2 * mm.MATMUL_CHUNK
                      + 3 * lowrank.ADAM_CHUNK + 3 * lowrank.WRITE_CHUNK)
        update = max(update, cost)
        if factored and spec.proj_method != "full" and FactoredGradient.cheaper(T, m, n):
            extra = f32 * ((d + a) * T + 3 * d * rank)
        else:
            extra = f32 * (m * n + 3 * (a + 2 * d) * (rank + 8))
        refresh = max(refresh, extra)
    return update, refresh


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
                        help="projection rank (default: the preset's; 60m 128, 130m/350m 256, 1b 512, 7b/13b/70b 1024; "
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
    run.add_argument("--proj-method", choices=PROJ_METHODS, default=None,
                     help="the transform's proj_method for --run (default: the library's)")
    run.add_argument("--proj-side", choices=PROJ_SIDES, default=None,
                     help="the transform's proj_side for --run (default: the library's)")
    run.add_argument("--lean", action="store_true",
                     help="--run with transform(lean=True): a factored second moment and no first moment in the "
                          "projected layers' update (qgalore_fx.kernels.factored)")
    run.add_argument("--no-rest-in-backward", action="store_true",
                     help="--run with qgalore_fx.optimizer(rest_in_backward=False): unprojected gradients held "
                          "until step()")
    run.add_argument("--no-checkpointing", action="store_true", help="--run without activation checkpointing")
    run.add_argument("--embedding-dtype", choices=("fp32", "bf16"), default="fp32",
                     help="--run: storage of the input embedding and output head (bf16 is planned with "
                          "rest_in_backward only)")
    world = parser.add_argument_group("one rank of an FSDP2 run (--world-size)")
    world.add_argument("--world-size", type=_positive_int, default=None, metavar="W",
                       help="per-rank bytes of a fully_shard run on W ranks: weights, states, projections, transient "
                            "peak, total (every paper size, 13b and 70b unless --preset; --batch-size is the global "
                            "batch, default one sequence per rank; says which layers cannot split over W ranks)")
    world.add_argument("--prefetch", type=_positive_int, default=2, metavar="BLOCKS",
                       help="--world-size: decoder blocks FSDP2 holds all-gathered at once (default: %(default)s, "
                            "the one computing and the one prefetched)")
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
    if getattr(args, "world_size", None) is not None:
        return _run_world(args, out)
    if getattr(args, "run", False):
        if args.preset is None:
            raise ValueError("--run needs --preset")
        if args.embedding_dtype == "bf16" and args.no_rest_in_backward:
            raise ValueError("--embedding-dtype bf16 is planned with rest_in_backward only (drop --no-rest-in-backward)")
        options = _transform_options(args)
        result = plan_run(args.preset, args.rank, batch_size=args.batch_size or 1, seq_len=args.seq_len,
                          checkpointing=not args.no_checkpointing,
                          rest_in_backward=False if args.no_rest_in_backward else None,
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


#: The presets ``--world-size`` plans when no ``--preset`` is given: the paper's sizes and LLaMA-2's 13B and 70B.
WORLD_PRESETS = ("60m", "130m", "350m", "1b", "7b", "13b", "70b")


def _transform_options(args: argparse.Namespace) -> dict:
    """The transform options ``--proj-method``, ``--proj-side`` and ``--lean`` set (the library's default where
    unset)."""
    options = {key: value for key, value in (("proj_method", args.proj_method), ("proj_side", args.proj_side))
               if value is not None}
    if getattr(args, "lean", False):
        options["lean"] = True
    return options


def _run_world(args: argparse.Namespace, out) -> int:
    if getattr(args, "lean", False):
        raise ValueError("--lean with --world-size: lean=True is not supported under FSDP2 yet (its factored "
                         "statistics span every rank's rows); plan the sharded run without --lean")
    if args.embedding_dtype != "fp32" or args.no_rest_in_backward:
        raise ValueError("--world-size plans fp32 unprojected parameters stepped in step() (rest_in_backward is "
                         "refused under torch.distributed): drop --embedding-dtype and --no-rest-in-backward")
    options = _transform_options(args)
    runtime = runtime_rss()
    results = []
    for preset in [args.preset] if args.preset else WORLD_PRESETS:
        try:
            results.append(plan_sharded(preset, args.world_size, args.rank, batch_size=args.batch_size,
                                        seq_len=args.seq_len, checkpointing=not args.no_checkpointing,
                                        prefetch=args.prefetch, vocab_size=args.vocab_size, runtime=runtime,
                                        **options))
        except ShardingError as e:
            if args.preset:
                raise
            results.append(e)
    if args.json:
        print(json.dumps([{"error": str(r)} if isinstance(r, Exception) else r.to_dict() for r in results],
                         indent=1), file=out)
        return 0
    for i, r in enumerate(results):
        print(("\n" if i else "") + (f"not shardable: {r}" if isinstance(r, Exception) else str(r)), file=out)
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    parser = add_memory_arguments(argparse.ArgumentParser(
        prog="python -m qgalore_fx.app.planner",
        description="Bytes of weights, optimizer states, projections, gradient peak and activations per training "
                    "method, counted on the meta device."))
    return run_memory(parser.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
