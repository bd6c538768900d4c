"""The Q-GaLore update of one projected layer, as functions over that layer's tensors.

For a weight W [m, n] at rank r: R = G·Pᵀ or Pᵀ·G (computed from grad_y and x, G formed only to refresh P),
N = Adam(R) on 8-bit moments, W <- W - lr·(α·N·P or α·P·N) - lr·wd·W, written back to INT8 with stochastic
rounding.
The layer owns its state (:data:`STATE_NAMES`, a host-side ``control`` tensor); the ops are
``qgalore_fx::lowrank_update_`` (:func:`update_`, in the layer's backward: refresh, project, accumulate) and
``qgalore_fx::lowrank_step_`` (:func:`step_`, the branch-free steady-state update); :func:`drop_pending_` drops an
accumulation window. See docs/layer-update.md.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import time
from typing import Dict, List, Optional

import torch
from torch import Tensor

from qgalore_fx import projection as proj
from qgalore_fx.config import SEED_STRIDE, QGaLoreConfig
from qgalore_fx.kernels import all_finite, quantize_blockwise
from qgalore_fx.kernels.adam8bit import BLOCK_SIZE as ADAM_BLOCK_SIZE
from qgalore_fx.kernels.adam8bit import AdamState, adam_direction_masked_
from qgalore_fx.kernels.factored import factor_size, factored_direction_
from qgalore_fx.kernels.quant import noise_key, row_chunks
from qgalore_fx.kernels.workspace import workspace
from qgalore_fx.kernels.writeback import writeback_, writeback_applies


#: Names of a layer's update-state tensors, in the order the ops take them.
STATE_NAMES = (
    "proj_codes", "proj_scales",
    "exp_avg", "exp_avg_sq", "exp_avg_absmax", "exp_avg_sq_absmax",
    "step", "skipped", "accum", "undo_proj_codes", "undo_proj_scales", "control",
)
#: Under FSDP2, the local shards of the weight's codes and scales that the update writes (empty tensors otherwise;
#: non-persistent: FSDP2 owns the storage, see qgalore_fx.sharding).
SHARD_NAMES = ("shard_codes", "shard_scales")
#: What the ops take as a layer's ``state`` list.
OP_STATE_NAMES = STATE_NAMES + SHARD_NAMES
#: The update-state tensors that are not saved (non-persistent buffers): the projection as it was before the
#: open accumulation window refreshed it, so that :func:`drop_pending_` can undo that refresh (empty unless the
#: layer defers its update).
UNDO_NAMES = ("undo_proj_codes", "undo_proj_scales")

# Slots of the host-side ``control`` tensor (float64 on the CPU; integers up to 2**53 are exact).
CALLS = 0            # update attempts so far (the refresh clock, and the stochastic-rounding offset)
PENDING = 1          # micro-batches accumulated since the last applied update
DEFER = 2            # 1: accumulate R and update at optimizer.step(); 0: update inside backward
REDUCE = 3           # under torch.distributed: 0 all-reduce R, 1 all-reduce G
INTERVAL = 4         # current refresh interval
LAST_REFRESH = 5     # attempt count of the last refresh, -1 before the first
REFRESH_COUNT = 6
LAST_SIMILARITY = 7  # -1 when there was nothing to compare with
REFRESH_SECONDS = 8
COMM_BYTES = 9       # bytes this layer all-reduced or broadcast
QUEUE_LEN = 10
STEP_UPDATES = 11    # updates applied inside backward since the last optimizer.step() (0 or 1)
CAPTURED = 12        # share of ||G||² the projection captured at its refresh (-1: not measured)
DRIFTED = 13         # 1: a drift check found the projection stale; the next attempt refreshes
QUEUE = 14           # the last ``queue_size`` similarities
# After the QUEUE + queue_size saved slots (:func:`saved_size`) come the open window's undo record, never saved:
# one slot, 1 when the window's first micro-batch refreshed the projection, then the saved slots as they were
# before that refresh (:func:`drop_pending_` restores the schedule's from them).
SCHEDULE = (INTERVAL, LAST_REFRESH, REFRESH_COUNT, LAST_SIMILARITY, QUEUE_LEN, CAPTURED, DRIFTED)  # and the queue
# Slots that are not training state: the bound optimizer's settings and this process's telemetry. They are saved as
# 0 (two runs that computed the same thing have equal state dicts) and loading keeps the live values.
NOT_SAVED = (DEFER, REDUCE, REFRESH_SECONDS, COMM_BYTES)
CONTROL_FIELDS = ("calls", "pending", "defer", "reduce", "interval", "last_refresh", "refresh_count",
                  "last_similarity", "refresh_seconds", "comm_bytes", "queue_len", "step_updates", "captured",
                  "drifted")

#: A drift check (:func:`_drift_check`) marks the projection stale when it captures less than this share of what
#: it captured of the gradient at its refresh.
DRIFT_THRESHOLD = 0.5

HPARAMS = ("lr", "beta1", "beta2", "eps", "weight_decay")

# Projections stored as floats (``proj_bits``: dtype); the other widths are block-quantized codes + scales.
_FLOAT_PROJ = {16: torch.bfloat16, 32: torch.float32}


@dataclasses.dataclass(frozen=True)
class UpdateSpec:
    """The static settings of one layer's update; what the ops take as their ``spec`` string.

    Everything here is fixed for the layer's life (the process group name is set once, when an
    optimizer binds the layer), so under ``torch.compile`` it is a constant of the graph.
    """

    name: str
    m: int
    n: int
    rank: int
    block_size: int
    proj_bits: int
    proj_block_size: int
    optim_bits: int
    scale: float
    stochastic_round: bool
    proj_method: str
    seed: int
    update_interval: int
    cos_threshold: float
    queue_size: int
    adaptive: bool
    lean: bool = False  # True: factored second moment, no first moment (qgalore_fx.kernels.factored)
    fused: bool = True  # False: the update runs at optimizer.step() (also with gradient accumulation)
    align: str = "sign"  # how a refreshed P is aligned with the old one (qgalore_fx.projection.align_projection)
    eps_placement: str = "adam"  # "galore": eps added to sqrt(v) before bias correction (config.EPS_PLACEMENTS)
    proj_side: str = "short"  # "long": P spans max(m, n), R is r x min(m, n) (config.PROJ_SIDES)
    group: str = ""  # torch.distributed process group name; "" = no data parallelism
    shard_world: int = 1  # FSDP2: ranks the weight's rows are sharded over (qgalore_fx.sharding); 1 = not sharded
    shard_rank: int = 0  # FSDP2: this rank's index in the shard group
    shard_group: str = ""  # FSDP2: the shard group's name

    @classmethod
    def from_config(cls, config: QGaLoreConfig, name: str, m: int, n: int, index: int) -> "UpdateSpec":
        """The spec of layer ``name`` ([m, n], the ``index``-th projected layer) under ``config``.

        Every option the two dataclasses share is copied by name, so a per-layer option added to both
        reaches the layer without being listed here; the seed becomes the layer's own stream.
        """
        config.check_fits(name, m, n)
        shared = {f.name for f in dataclasses.fields(cls)} & {f.name for f in dataclasses.fields(config)}
        options = {key: getattr(config, key) for key in shared}
        options.update(scale=float(config.scale), cos_threshold=float(config.cos_threshold),
                       seed=config.seed * SEED_STRIDE + index)
        return cls(name=name, m=m, n=n, **options)

    @property
    def side(self) -> str:
        """"right" (R = G Pᵀ is [m, r]) or "left" (R = Pᵀ G is [r, n]): GaLore's rule, flipped for "long"."""
        side = proj.projection_side(self.m, self.n)
        if self.proj_side == "long" and self.m != self.n:
            side = "left" if side == "right" else "right"
        return side

    @property
    def lowrank_shape(self) -> tuple:
        """Shape of R and of Adam's moments: [m, r] (right projection) or [r, n] (left)."""
        return (self.m, self.rank) if self.side == "right" else (self.rank, self.n)

    @property
    def projection_shape(self) -> tuple:
        """Shape of P: [r, n] for a right projection, [m, r] for a left one."""
        return (self.rank, self.n) if self.side == "right" else (self.m, self.rank)

    @functools.cached_property
    def text(self) -> str:
        """The JSON form the ops take (computed once per spec)."""
        return json.dumps(dataclasses.asdict(self), sort_keys=True)


@functools.lru_cache(maxsize=None)
def decode_spec(text: str) -> UpdateSpec:
    return UpdateSpec(**json.loads(text))


# ---------------------------------------------------------------------------------------------- state
def saved_size(spec: UpdateSpec) -> int:
    """Slots of ``control`` that are training state (what ``state_dict`` holds): QUEUE + queue_size."""
    return QUEUE + spec.queue_size


def control_size(spec: UpdateSpec) -> int:
    """Slots of the live ``control`` tensor: the saved ones, the undo flag and the saved ones' copy."""
    return 2 * saved_size(spec) + 1


def initial_state(spec: UpdateSpec, device=None) -> Dict[str, Tensor]:
    """Fresh update-state tensors of a layer (see :data:`STATE_NAMES`); ``control`` is on the CPU."""
    P0 = torch.zeros(spec.projection_shape, dtype=torch.float32, device=device)
    if spec.proj_bits in _FLOAT_PROJ:
        proj_codes, proj_scales = P0.to(_FLOAT_PROJ[spec.proj_bits]), torch.zeros(0, device=device)
    else:
        q = quantize_blockwise(P0, bits=spec.proj_bits, block_size=spec.proj_block_size, check_finite=False)
        proj_codes, proj_scales = q.codes, q.scales
    empty = torch.zeros(0, dtype=torch.float32, device=device)
    if spec.lean:  # no first moment; the second moment's row and column statistics (kernels.factored)
        moments = {"exp_avg": empty.clone(),
                   "exp_avg_sq": torch.zeros(factor_size(spec.lowrank_shape), dtype=torch.float32, device=device),
                   "exp_avg_absmax": empty.clone(), "exp_avg_sq_absmax": empty.clone()}
    else:
        adam = AdamState.zeros(spec.lowrank_shape, bits=spec.optim_bits, device=device)
        moments = {"exp_avg": adam.m, "exp_avg_sq": adam.v,
                   "exp_avg_absmax": adam.absmax_m if adam.bits == 8 else empty.clone(),
                   "exp_avg_sq_absmax": adam.absmax_v if adam.bits == 8 else empty.clone()}
    control = torch.zeros(control_size(spec), dtype=torch.float64)
    control[INTERVAL] = spec.update_interval
    control[LAST_REFRESH] = -1
    control[LAST_SIMILARITY] = -1
    control[CAPTURED] = -1
    return {
        "proj_codes": proj_codes, "proj_scales": proj_scales,
        **moments,
        "step": torch.zeros((), dtype=torch.int64, device=device),
        "skipped": torch.zeros((), dtype=torch.int64, device=device),
        "accum": empty.clone(),
        "undo_proj_codes": proj_codes.new_empty(0), "undo_proj_scales": proj_scales.new_empty(0),
        "control": control,
    }


def control_dict(control: Tensor) -> dict:
    """The host control state as a dict of Python numbers (reads a CPU tensor: no device sync)."""
    values = control.tolist()
    out = dict(zip(CONTROL_FIELDS, values))
    out["queue"] = values[QUEUE:QUEUE + int(values[QUEUE_LEN])]
    return out


def _policy(spec: UpdateSpec, c: dict) -> proj.LazyRefreshPolicy:
    policy = proj.LazyRefreshPolicy(update_interval=spec.update_interval, cos_threshold=spec.cos_threshold,
                                    queue_size=spec.queue_size, adaptive=spec.adaptive)
    policy.interval = int(c["interval"])
    policy.last_refresh_step = None if c["last_refresh"] < 0 else int(c["last_refresh"])
    policy.refresh_count = int(c["refresh_count"])
    policy.last_similarity = None if c["last_similarity"] < 0 else c["last_similarity"]
    policy.queue = list(c["queue"])
    return policy


def _store_policy(control: Tensor, policy: proj.LazyRefreshPolicy) -> None:
    control[INTERVAL] = policy.interval
    control[LAST_REFRESH] = -1 if policy.last_refresh_step is None else policy.last_refresh_step
    control[REFRESH_COUNT] = policy.refresh_count
    control[LAST_SIMILARITY] = -1 if policy.last_similarity is None else policy.last_similarity
    control[QUEUE_LEN] = len(policy.queue)
    control[QUEUE:QUEUE + policy.queue_size] = 0.0
    if policy.queue:
        control[QUEUE:QUEUE + len(policy.queue)] = torch.tensor(policy.queue, dtype=torch.float64)


def check_control(control: Tensor, spec: UpdateSpec, where: str) -> None:
    """Raise ValueError when a loaded ``control`` tensor (its saved slots) cannot be this layer's."""
    size = saved_size(spec)
    if not isinstance(control, Tensor) or control.dtype != torch.float64 or tuple(control.shape) != (size,):
        got = f"{control.dtype} {tuple(control.shape)}" if isinstance(control, Tensor) else type(control).__name__
        raise ValueError(f"{where}: the update control state must be a float64 tensor of shape ({size},), got {got}")
    c = control_dict(control.cpu())
    counters = ("calls", "pending", "refresh_count", "comm_bytes", "queue_len", "step_updates")
    bad = [k for k in counters if not (math.isfinite(c[k]) and c[k] >= 0 and c[k] == int(c[k]))]
    if not (math.isfinite(c["interval"]) and c["interval"] >= 1 and c["interval"] == int(c["interval"])):
        bad.append("interval")
    if not (c["last_refresh"] == int(c["last_refresh"]) and -1 <= c["last_refresh"] <= c["calls"]):
        bad.append("last_refresh")
    if c["defer"] not in (0.0, 1.0) or c["reduce"] not in (0.0, 1.0):
        bad.append("defer/reduce")
    if not (c["last_similarity"] == -1 or 0.0 <= c["last_similarity"] <= 1.0):
        bad.append("last_similarity")
    if c["queue_len"] > spec.queue_size or not all(0.0 <= s <= 1.0 for s in c["queue"]):
        bad.append("queue")
    if not (c["captured"] == -1 or 0.0 <= c["captured"] <= 1.0 + 1e-3):  # a dequantized P may capture a hair more
        bad.append("captured")
    if c["drifted"] not in (0.0, 1.0):
        bad.append("drifted")
    if bad:
        raise ValueError(f"{where}: the update control state has invalid {sorted(set(bad))}: {c}")


# ---------------------------------------------------------------------------------------------- helpers
def projection_matrix(proj_codes: Tensor, proj_scales: Tensor, spec: UpdateSpec) -> Tensor:
    """The current P in fp32 (dequantized)."""
    if spec.proj_bits in _FLOAT_PROJ:
        return proj_codes.float()  # proj_bits=32: the stored tensor itself, not a copy
    return torch.ops.qgalore_fx.dequantize(proj_codes, proj_scales, spec.proj_bits, spec.proj_block_size,
                                           list(spec.projection_shape), torch.float32)


def dequantize_weight(weight: Tensor, scales: Tensor, block_size: int, dtype: torch.dtype) -> Tensor:
    """The weight as a dense [out, in] matrix of ``dtype``."""
    if weight.is_floating_point():
        return weight.to(dtype)
    return torch.ops.qgalore_fx.dequantize(weight, scales, 8, block_size, list(weight.shape), dtype)


def adam_state(state: Dict[str, Tensor]) -> AdamState:
    """A view of the layer's moment tensors as an :class:`AdamState` (no copy)."""
    m, v = state["exp_avg"], state["exp_avg_sq"]
    if m.dtype == torch.uint8:
        return AdamState(m.shape, 8, ADAM_BLOCK_SIZE, m, v, state["exp_avg_absmax"], state["exp_avg_sq_absmax"])
    return AdamState(m.shape, 32, ADAM_BLOCK_SIZE, m, v)


def sr_seed(spec: UpdateSpec, calls: int, device) -> Optional[Tensor]:
    """The (seed, offset) pair of this attempt's stochastic rounding (None: round to nearest); the offset counts
    elements of the whole weight, sharded or not."""
    if not spec.stochastic_round:
        return None
    return torch.tensor([spec.seed, calls * spec.m * spec.n], dtype=torch.int64).to(device, non_blocking=True)


# ---------------------------------------------------------------------------------------------- the steady-state step
#: Elements of the weight rewritten at a time by :func:`step_`: the fp32 temporaries of the write-back (the
#: dequantized rows, their update, the quantizer's work) stay a few MiB instead of several m×n copies.
WRITE_CHUNK = 1 << 20


def _row_chunks(m: int, n: int, block_size: int):
    """Row ranges of about WRITE_CHUNK elements whose element counts are whole quantization blocks."""
    return row_chunks(m, n, block_size, WRITE_CHUNK)


#: Elements of R that Adam processes at a time in :func:`step_`: its fp32 temporaries (the new moments before
#: they are quantized) stay a few MiB; whole, they were 2x R (+129 MiB with N for a LLaMA-7B MLP layer at rank 1024,
#: benchmarks/bench_transients.py).
ADAM_CHUNK = 1 << 20


def _adam_direction(R: Tensor, adam: AdamState, t: Tensor, beta1, beta2, eps, ok: Tensor, base: int = 0) -> Tensor:
    """Adam's direction N for R, over chunks of :data:`ADAM_CHUNK` elements (whole moment blocks). ``base``: the
    index of R's first element in the whole R (under FSDP2 a rank holds rows of it), so the second moment's
    rounding draws are the same whatever the split.

    A contiguous fp32 ``R`` is consumed: each chunk of N is written over the chunk of R it came from (R is read
    by nothing after Adam), so the update holds one ``R``-sized tensor instead of two (45 MiB less at the peak of
    a LLaMA-7B MLP layer's update, rank 1024)."""
    n = R.numel()
    if n <= ADAM_CHUNK:
        return adam_direction_masked_(R, adam, t, beta1, beta2, eps, ok, offset=base)
    chunk = max(adam.block_size, ADAM_CHUNK // adam.block_size * adam.block_size)
    flat = R.reshape(-1)
    in_place = R.dtype == torch.float32 and R.is_contiguous()
    N = flat if in_place else torch.empty(n, dtype=torch.float32, device=R.device)
    for start in range(0, n, chunk):
        stop = min(n, start + chunk)
        N[start:stop] = adam_direction_masked_(flat[start:stop], adam.part(start, stop), t, beta1, beta2, eps, ok,
                                               offset=base + start)
    return N.view(R.shape)


@torch.no_grad()
def step_(weight: Tensor, scales: Tensor, state: Dict[str, Tensor], R: Tensor, hparams: Tensor,
          seed: Optional[Tensor], spec: UpdateSpec, P: Optional[Tensor] = None) -> None:
    """One update from the low-rank gradient ``R`` (consumed: Adam's direction is written over it), branch-free
    (no host synchronization).

    Writes ``weight``/``scales`` and the moments, and counts ``step``/``skipped``; a non-finite
    ``R`` or non-finite hyperparameters leave weight and moments exactly as they were. The weight is
    rewritten in row chunks of whole quantization blocks (:data:`WRITE_CHUNK` elements); chunk ``k``'s
    stochastic rounding draws from the stream ``(seed, offset + first element of the chunk)``.
    On the CPU each chunk is rewritten by the compiled :func:`qgalore_fx.kernels.writeback.writeback_`
    (bit-identical to the three reference ops below it); Adam on ``R`` runs the fused 8-bit step of
    :func:`~qgalore_fx.kernels.adam8bit.adam_direction_masked_` (``QGALORE_FX_REFERENCE=1``: references).
    """
    lr, beta1, beta2, eps, wd = hparams.unbind()
    ok = all_finite(R) & all_finite(hparams)
    t = state["step"] + 1
    if spec.eps_placement == "galore":  # GaLoreAdamW: m / (sqrt(v) + eps) * sqrt(1 - beta2^t) / (1 - beta1^t)
        eps = eps / torch.sqrt(1.0 - torch.pow(beta2, t.to(beta2.dtype)))
    if spec.lean:
        N = factored_direction_(R.reshape(spec.lowrank_shape), state["exp_avg_sq"], t, beta2, eps, ok, ADAM_CHUNK)
    else:
        N = _adam_direction(R, adam_state(state), t, beta1, beta2, eps, ok,
                            base=spec.shard_rank * R.numel())  # FSDP2: this rank's R starts there in the whole R
    if P is None:  # the caller may pass the dequantized projection it already holds
        P = projection_matrix(state["proj_codes"], state["proj_scales"], spec)
    lr = torch.where(ok, lr, 0.0)
    decay = 1.0 - lr * torch.where(ok, wd, 0.0)
    step_size = lr * spec.scale
    m, n = spec.m, spec.n
    bs = spec.block_size
    row0 = 0
    if spec.shard_world > 1:  # FSDP2: this rank's rows of the weight, from its part of R (qgalore_fx.sharding)
        weight, scales = state["shard_codes"], state["shard_scales"]
        m = weight.shape[0]
        row0 = spec.shard_rank * m
        if spec.side == "left":  # ΔW rows = P[rows] · N needs all of N (r x n)
            N = _all_gather_rows(N, _resolve_group(spec.shard_group), state["control"])
    key = None  # the write-back's noise key (quant.noise_key), made at the first chunk that needs it
    for start, stop in _row_chunks(m, n, bs):
        rows = slice(start, stop)
        # ΔW rows: N[rows] @ P (right projection) or P[rows] @ N (left)
        out = workspace("delta", (stop - start) * n, torch.float32, N.device).view(stop - start, n)
        delta = proj.project_back(N[rows], P, "right", out) if spec.side == "right" else \
            proj.project_back(N, P[row0 + start:row0 + stop], "left", out)
        if weight.is_floating_point():
            W = weight[rows].float()
            W.mul_(decay).sub_(delta.mul_(step_size))
            weight[rows] = torch.where(ok, W.to(weight.dtype), weight[rows])
            continue
        first, last = start * n // bs, -(-stop * n // bs)  # the chunk starts on a block boundary
        codes_now, scales_now = weight[rows], scales[first:last]
        offset = (row0 + start) * n  # the stream of these rows in the whole weight: sharded or not, the same draws
        if writeback_applies(codes_now, bs):
            if key is None and seed is not None:  # once per update: one host read of the seed
                key = noise_key(seed, codes_now.device)
            chunk_key = None if key is None else torch.stack((key[0], key[1], key[2] + offset))  # no host tensor
            if writeback_(codes_now, scales_now, delta, decay, step_size, bs, chunk_key, ok):
                continue  # the same codes and scales as the three ops below, in one fused pass
        chunk_seed = None if seed is None else torch.stack((seed[0], seed[1] + offset))  # on seed's device: no copy
        W = dequantize_weight(codes_now, scales_now, bs, torch.float32)
        W.mul_(decay).sub_(delta.mul_(step_size))
        codes, new_scales = torch.ops.qgalore_fx.quantize(W, 8, bs, chunk_seed)
        weight[rows] = torch.where(ok, codes, codes_now)
        scales[first:last] = torch.where(ok, new_scales, scales_now)
    state["step"].add_(ok.to(torch.int64))
    state["skipped"].add_((~ok).to(torch.int64))


# ---------------------------------------------------------------------------------------------- backward
def _world_size(group) -> int:
    import torch.distributed as dist

    return dist.get_world_size(group)


def _resolve_group(name: str):
    if not name:
        return None
    from torch.distributed.distributed_c10d import _resolve_process_group

    return _resolve_process_group(name)


def _process_group(spec: UpdateSpec):
    """The group this layer reduces its gradient over: FSDP2's shard group, else the data-parallel one."""
    return _resolve_group(spec.shard_group or spec.group)


def _reduce_scatter(R: Tensor, group, control: Tensor) -> Tensor:
    """This rank's rows of ``R`` summed over the FSDP2 shard group and averaged (as FSDP2 averages gradients)."""
    import torch.distributed as dist

    world = _world_size(group)
    R = R.contiguous()
    out = R.new_empty((R.shape[0] // world, *R.shape[1:]))
    getattr(dist, "reduce_scatter_single", dist.reduce_scatter_tensor)(out, R, group=group)  # torch < 2.13: old name
    control[COMM_BYTES] += R.numel() * R.element_size()
    return out.div_(world)


def _all_gather_rows(t: Tensor, group, control: Tensor) -> Tensor:
    """Every rank's rows of ``t`` (dim 0), in rank order."""
    import torch.distributed as dist

    world = _world_size(group)
    out = t.new_empty((t.shape[0] * world, *t.shape[1:]))
    getattr(dist, "all_gather_single", dist.all_gather_into_tensor)(out, t.contiguous(), group=group)
    control[COMM_BYTES] += out.numel() * out.element_size()
    return out


def _local_rows(R: Tensor, spec: UpdateSpec) -> Tensor:
    """This rank's rows of a full (already reduced) ``R``."""
    return R.chunk(spec.shard_world)[spec.shard_rank].clone()


def _agree_finite(R: Tensor, group) -> Tensor:
    """``R`` poisoned with NaN on every rank when any rank's part is non-finite, so all ranks skip alike (one
    one-element all-reduce; no host synchronization)."""
    import torch.distributed as dist

    bad = (~all_finite(R)).to(torch.float32).reshape(1)
    dist.all_reduce(bad, group=group)
    return torch.where(bad > 0, math.nan, R)


def _all_reduce(t: Tensor, group, control: Tensor) -> Tensor:
    """Average ``t`` over the data-parallel group (no-op without one); counts the bytes sent."""
    if group is None:
        return t
    import torch.distributed as dist

    dist.all_reduce(t, op=dist.ReduceOp.SUM, group=group)
    control[COMM_BYTES] += t.numel() * t.element_size()
    return t.div_(_world_size(group))


def _broadcast_projection(state: Dict[str, Tensor], group) -> None:
    """Make every rank hold rank 0's projection bit for bit (SVDs may differ in the last bits)."""
    import torch.distributed as dist

    src = dist.get_global_rank(group, 0)
    for key in ("proj_codes", "proj_scales"):
        t = state[key]
        if t.numel():
            dist.broadcast(t, src=src, group=group)
            state["control"][COMM_BYTES] += t.numel() * t.element_size()


def _gradient_energy(g2: Tensor, x2: Tensor) -> Tensor:
    """``||G||_F²`` of ``G = g2ᵀ x2`` ([T, m] and [T, n]): from the two [T, T] Gram matrices when that is cheaper
    than forming G (``trace(g2 g2ᵀ x2 x2ᵀ)``), else from G itself."""
    T, m, n = g2.shape[0], g2.shape[1], x2.shape[1]
    if T * (m + n) < m * n:
        return ((g2 @ g2.t()) * (x2 @ x2.t())).sum()
    return (g2.t() @ x2).square().sum()


def _captured_share(R: Tensor, energy: Tensor) -> float:
    """``||R||² / ||G||²`` (synchronizes), clamped to [0, 1]; -1 when G has no finite, positive energy."""
    total, kept = float(energy), float(R.square().sum())
    if not (math.isfinite(total) and math.isfinite(kept) and total > 0.0):
        return -1.0
    return min(max(kept / total, 0.0), 1.0)


def _drift_check_due(c: dict, spec: UpdateSpec, group) -> bool:
    """Whether this attempt checks the projection for drift (see :func:`update_`): a lazy layer (its interval grown
    past ``update_interval``) checks where the fixed schedule would have refreshed, every ``update_interval``
    attempts after its last refresh. Not under torch.distributed (ranks would decide apart)."""
    since = c["calls"] - c["last_refresh"]
    return (group is None and spec.adaptive and c["interval"] > spec.update_interval and c["captured"] > 0
            and c["last_refresh"] >= 0 and since > 0 and since % spec.update_interval == 0)


def _refresh_similarity(G: Tensor, P_new: Tensor, P_old: Tensor, spec: UpdateSpec) -> float:
    """The similarity a refresh records for the lazy-refresh policy, in [0, 1].

    The chance-adjusted, energy-weighted mean cos² of the principal angles: how much of the new gradient's
    rank-r component the previous projection would still have captured, 0 for an unrelated subspace
    (``qgalore_fx.projection``, "Calibrating the lazy refresh", has the measurements behind this choice).
    """
    return proj.weighted_similarity(G, P_new, P_old, spec.side, chance_adjusted=True)


def _refresh(state: Dict[str, Tensor], G: Tensor, c: dict, spec: UpdateSpec, group) -> None:
    """Recompute P from G, store it, and record the refresh in the schedule (synchronizes)."""
    t0 = time.perf_counter()
    if c["defer"]:
        _keep_undo(state, spec)
    prev = None
    if c["refresh_count"]:  # a copy: with proj_bits=32 projection_matrix is the stored tensor, overwritten below
        prev = projection_matrix(state["proj_codes"], state["proj_scales"], spec).clone()
    policy = _policy(spec, c)
    generator = torch.Generator(device=G.device).manual_seed(spec.seed + 7 * policy.refresh_count)
    P = proj.compute_projection(G, spec.rank, spec.side, method=spec.proj_method, prev=prev, generator=generator)
    # The moments stay in the old projection's coordinates: align the new basis with the old one (by default each
    # vector's sign), so a coordinate of R keeps meaning the direction its moments were built on.
    P = proj.align_projection(P, prev, spec.side, method=spec.align)
    if spec.proj_bits in _FLOAT_PROJ:
        state["proj_codes"].copy_(P)
    else:
        q = quantize_blockwise(P, bits=spec.proj_bits, block_size=spec.proj_block_size, check_finite=False)
        state["proj_codes"].copy_(q.codes)
        state["proj_scales"].copy_(q.scales)
    if group is not None:
        _broadcast_projection(state, group)
    similarity = None if prev is None else _refresh_similarity(
        G, projection_matrix(state["proj_codes"], state["proj_scales"], spec), prev, spec)
    policy.record_refresh(int(c["calls"]), similarity)
    control = state["control"]
    _store_policy(control, policy)
    control[DRIFTED] = 0
    control[REFRESH_SECONDS] += time.perf_counter() - t0


def _keep_undo(state: Dict[str, Tensor], spec: UpdateSpec) -> None:
    """Before the refresh of an accumulation window: keep what it overwrites, for :func:`drop_pending_`."""
    state["undo_proj_codes"].copy_(state["proj_codes"])
    state["undo_proj_scales"].copy_(state["proj_scales"])
    control, saved = state["control"], saved_size(spec)
    control[saved + 1:] = control[:saved]
    control[saved] = 1


def _project_factors(g2: Tensor, x2: Tensor, P: Tensor, side: str) -> Tensor:
    """R = G Pᵀ (right) or Pᵀ G (left) for G = g2ᵀ x2, without forming G."""
    return g2.t() @ (x2 @ P.t()) if side == "right" else (g2 @ P).t() @ x2


def _skip_refresh(state: Dict[str, Tensor], defer: bool) -> None:
    """A refresh step whose gradient is non-finite: no new subspace, and the update is skipped (or poisoned)."""
    control = state["control"]
    if defer:
        _poison(state)
        control[PENDING] += 1
    else:
        state["skipped"].add_(1)
        control[CALLS] += 1
        control[STEP_UPDATES] = 1


def _poison(state: Dict[str, Tensor]) -> None:
    """Mark a pending accumulated update as non-finite, so that optimizer.step() skips it whole."""
    state["accum"].fill_(math.nan)


@torch.no_grad()
def update_(weight: Tensor, scales: Tensor, state: Dict[str, Tensor], hparams: Tensor, x: Tensor, grad_y: Tensor,
            spec: UpdateSpec) -> None:
    """The layer's update from its backward: refresh when due, project, then step or accumulate."""
    if hparams.numel() != len(HPARAMS):
        raise RuntimeError(
            f"layer {spec.name!r} was transformed by qgalore_fx but has no optimizer: "
            "create one with qgalore_fx.optimizer(model, lr=...) before calling backward()"
        )
    control = state["control"]
    c = control_dict(control)
    defer = bool(c["defer"])
    if defer and (state["accum"].numel() == 0 or state["undo_proj_codes"].numel() != state["proj_codes"].numel()):
        raise RuntimeError(f"layer {spec.name!r} defers its update but has no accumulator; rebuild the optimizer")
    if not defer and c["step_updates"]:
        raise RuntimeError(
            f"layer {spec.name!r} received a second backward() before optimizer.step(): its update runs inside "
            "backward, so gradient accumulation would apply one update per micro-batch. Build the optimizer with "
            "qgalore_fx.optimizer(model, accumulation_steps=k) for k micro-batches per step (HF Trainer: "
            "accumulation_steps=args.gradient_accumulation_steps), or call optimizer.step() between backward() calls")
    group = _process_group(spec)
    sharded = spec.shard_world > 1
    m, n = spec.m, spec.n
    x2 = x.reshape(-1, n).float()
    g2 = grad_y.reshape(-1, m).float()
    refresh = c["pending"] == 0 and (c["last_refresh"] < 0 or c["calls"] - c["last_refresh"] >= c["interval"]
                                     or c["drifted"] == 1)
    factored = refresh and group is None and spec.proj_method != "full" and \
        proj.FactoredGradient.cheaper(x2.shape[0], m, n)
    if factored:  # few tokens against a large weight: the refresh applies G through its factors, never forms it
        G = proj.FactoredGradient(g2, x2)
        if not G.isfinite():
            _skip_refresh(state, defer)
            return
        _refresh(state, G, c, spec, group)
        del G
        P = projection_matrix(state["proj_codes"], state["proj_scales"], spec)
        R = _project_factors(g2, x2, P, spec.side)
        control[CAPTURED] = _captured_share(R, _gradient_energy(g2, x2))
    elif refresh or (group is not None and c["reduce"] == 1):
        G = _all_reduce(g2.t() @ x2, group, control)
        if refresh:
            if not bool(all_finite(G)):  # the refresh path may synchronize; the SVD does anyway
                _skip_refresh(state, defer)
                return
            _refresh(state, G, c, spec, group)
        P = projection_matrix(state["proj_codes"], state["proj_scales"], spec)
        R = proj.project(G, P, spec.side)
        if refresh:
            control[CAPTURED] = _captured_share(R, G.square().sum())
        del G
        if sharded:
            R = _local_rows(R, spec)
    elif c["refresh_count"] == 0:  # the refresh of this accumulated step was skipped: nothing to project on
        _poison(state)
        control[PENDING] += 1
        return
    else:
        P = projection_matrix(state["proj_codes"], state["proj_scales"], spec)
        R = _project_factors(g2, x2, P, spec.side)
        R = _reduce_scatter(R, group, control) if sharded else _all_reduce(R, group, control)
        if _drift_check_due(c, spec, group):  # reads two sums back (a sync), once per update_interval attempts
            share = _captured_share(R, _gradient_energy(g2, x2))
            if 0.0 <= share < DRIFT_THRESHOLD * c["captured"]:
                control[DRIFTED] = 1
    if sharded:
        R = _agree_finite(R, group)
    if defer:
        state["accum"].add_(R)
        control[PENDING] += 1
        return
    calls = int(c["calls"])
    torch.ops.qgalore_fx.lowrank_step_(weight, scales, _state_list(state), R, hparams,
                                       sr_seed(spec, calls, weight.device), spec.text, P)
    control[CALLS] = calls + 1
    control[STEP_UPDATES] = 1


@torch.no_grad()
def apply_pending_(weight: Tensor, scales: Tensor, state: Dict[str, Tensor], hparams: Tensor,
                   spec: UpdateSpec) -> bool:
    """At ``optimizer.step()``: apply the accumulated low-rank gradient (deferred mode); True if there was one."""
    control = state["control"]
    c = control_dict(control)
    if c["step_updates"]:
        control[STEP_UPDATES] = 0
    if c["pending"] == 0:
        return False
    calls = int(c["calls"])
    torch.ops.qgalore_fx.lowrank_step_(weight, scales, _state_list(state), state["accum"], hparams,
                                       sr_seed(spec, calls, weight.device), spec.text)
    state["accum"].zero_()
    control[PENDING] = 0
    control[saved_size(spec)] = 0  # the window is closed: its refresh stays
    control[CALLS] = calls + 1
    return True


@torch.no_grad()
def drop_pending_(state: Dict[str, Tensor], spec: UpdateSpec) -> None:
    """At ``optimizer.zero_grad()``: forget the micro-batches accumulated since the last update.

    The accumulator is cleared (a poisoned one too) and a refresh made by one of those micro-batches is undone:
    the projection and the schedule are as before the window, so the next micro-batch refreshes as the dropped
    one did. Nothing else changed during the window (the moments, ``step`` and the weights change only when an
    update is applied). A layer with nothing pending is left as it is.
    """
    control, saved = state["control"], saved_size(spec)
    values = control.tolist()  # a host tensor, read without an op (bool(control[i]) would count as a sync)
    if values[saved] == 1:
        state["proj_codes"].copy_(state["undo_proj_codes"])
        state["proj_scales"].copy_(state["undo_proj_scales"])
        before = control[saved + 1:]
        control[list(SCHEDULE)] = before[list(SCHEDULE)]
        control[QUEUE:saved] = before[QUEUE:saved]
        control[saved] = 0
    if values[PENDING]:
        state["accum"].zero_()
        control[PENDING] = 0


def _state_list(state: Dict[str, Tensor]) -> List[Tensor]:
    return [state[k] for k in (OP_STATE_NAMES if SHARD_NAMES[0] in state else STATE_NAMES)]


def state_from_list(tensors: List[Tensor]) -> Dict[str, Tensor]:
    if len(tensors) not in (len(STATE_NAMES), len(OP_STATE_NAMES)):
        raise ValueError(f"a layer's update state has {len(OP_STATE_NAMES)} tensors {OP_STATE_NAMES} (or the first "
                         f"{len(STATE_NAMES)}), got {len(tensors)}")
    return dict(zip(OP_STATE_NAMES, tensors))
