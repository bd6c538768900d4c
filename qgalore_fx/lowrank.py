"""Per-layer Q-GaLore state and the update it runs inside backward.

For a weight W of shape [m, n] with rank r, one update is (DESIGN.md §2)::

    G  = grad_yᵀ · x                       only on refresh steps (for the SVD)
    P  = top-r singular vectors of G       refreshed lazily, stored INT4
    R  = G · Pᵀ  (m >= n)  or  Pᵀ · G      computed as grad_yᵀ·(x·Pᵀ) or (grad_y·P)ᵀ·x,
                                           so between refreshes G is never formed
    N  = Adam(R)                           8-bit block-wise moments
    W <- W - lr·(α·N·P or α·P·N) - lr·wd·W in fp32, then INT8 with stochastic rounding

All of it runs in the layer's backward, as soon as grad_y reaches it
(``fused=True``), or — for gradient accumulation and ``fused=False`` — R is
summed in fp32 across micro-batches (r·max(m, n) floats, not m·n) and the
update runs at ``optimizer.step()``.

A refresh needs a full G, so on a refresh step the first micro-batch's G
defines the new subspace and later micro-batches of that step are projected
onto it. Gradients with NaN/Inf skip the update entirely: weight, moments,
projection and counters stay as they were and ``skipped_updates`` counts it.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from qgalore_fx import projection as proj
from qgalore_fx.config import QGaLoreConfig
from qgalore_fx.kernels import QuantizedTensor, quantize_blockwise
from qgalore_fx.kernels.adam8bit import AdamState, adam_direction_
from qgalore_fx.ops import dequantize_weight, register_layer

_SEED_STRIDE = 1_000_003


def check_rank(rank: int, name: str, m: int, n: int) -> None:
    """Raise ValueError when ``rank`` does not fit a [m, n] layer."""
    if rank > min(m, n):
        raise ValueError(
            f"rank={rank} is larger than min(out, in)={min(m, n)} of layer {name!r} (shape [{m}, {n}]); "
            f"use rank <= {min(m, n)} or exclude the layer with filter_fn/target_modules"
        )


class LowRankState:
    """Everything one projected layer needs between steps.

    The optimizer reads ``group`` (its param group dict) at update time, so
    learning-rate schedules apply to projected layers exactly as to the rest.
    """

    def __init__(self, name: str, shape: tuple, config: QGaLoreConfig, index: int, device=None):
        m, n = shape
        check_rank(config.rank, name, m, n)
        self.name = name
        self.shape = (m, n)
        self.config = config
        self.rank = config.rank
        self.side = proj.projection_side(m, n)
        self.index = index
        self.seed = config.seed * _SEED_STRIDE + index
        lowrank_shape = (m, self.rank) if self.side == "right" else (self.rank, n)
        self.lowrank_shape = lowrank_shape
        self.adam = AdamState.zeros(lowrank_shape, bits=config.optim_bits, device=device)
        self.policy = proj.LazyRefreshPolicy(
            update_interval=config.update_interval,
            cos_threshold=config.cos_threshold,
            queue_size=config.queue_size,
            adaptive=config.adaptive,
        )
        self.projection: Optional[object] = None  # QuantizedTensor or a bf16 Tensor
        self.step = 0  # completed updates of this layer
        self.accum: Optional[Tensor] = None  # summed R while an update is deferred
        self.accum_count = 0
        self.skipped_updates = 0
        self.refresh_seconds = 0.0
        self.group: Optional[dict] = None  # the optimizer's param group, set by qgalore_fx.optimizer()
        self.defer = not config.fused
        self.process_group = None  # set by qgalore_fx.optimizer() under torch.distributed
        self.reduce = "lowrank"  # "lowrank": all-reduce R (r/min(m,n) of the bytes); "full": all-reduce G
        self.comm_bytes = 0
        self.layer_id = register_layer(self)

    # ------------------------------------------------------------------ projection storage
    @property
    def projection_shape(self) -> tuple:
        """Shape of P: [rank, n] for a right projection, [m, rank] for a left one."""
        m, n = self.shape
        return (self.rank, n) if self.side == "right" else (m, self.rank)

    def stored_projection(self, P: Tensor):
        """The stored form of ``P`` (packed INT4/INT8 QuantizedTensor or bf16), without changing this state."""
        bits = self.config.proj_bits
        if bits == 16:
            return P.to(torch.bfloat16)
        return quantize_blockwise(P, bits=bits, block_size=self.config.proj_block_size, check_finite=False)

    def _store_projection(self, P: Tensor) -> None:
        self.projection = self.stored_projection(P)

    def projection_matrix(self) -> Optional[Tensor]:
        """The current P in fp32 (dequantized), or None before the first refresh."""
        if self.projection is None:
            return None
        if isinstance(self.projection, QuantizedTensor):
            return self.projection.dequantize(torch.float32)
        return self.projection.float()

    # ------------------------------------------------------------------ backward
    def backward_hook(self, weight: Tensor, scales: Tensor, x: Tensor, grad_y: Tensor) -> None:
        if self.group is None:
            raise RuntimeError(
                f"layer {self.name!r} was transformed by qgalore_fx but has no optimizer: "
                "create one with qgalore_fx.optimizer(model, lr=...) before calling backward()"
            )
        m, n = self.shape
        x2 = x.reshape(-1, n).float()
        g2 = grad_y.reshape(-1, m).float()
        refresh = self.accum_count == 0 and self.policy.should_refresh(self.step)
        if refresh or self.reduce == "full":
            G = self._all_reduce(g2.t() @ x2)
            if not bool(torch.isfinite(G).all()):
                self._skip()
                return
            if refresh:
                self._refresh(G)
            R = proj.project(G, self.projection_matrix(), self.side)
            del G
        else:
            P = self.projection_matrix()
            if self.side == "right":
                R = g2.t() @ (x2 @ P.t())
            else:
                R = (g2 @ P).t() @ x2
            R = self._all_reduce(R)
            if not bool(torch.isfinite(R).all()):
                self._skip()
                return
        if self.defer:
            self.accum = R if self.accum is None else self.accum.add_(R)
            self.accum_count += 1
        else:
            self.apply_update(weight, scales, R)

    def _all_reduce(self, t: Tensor) -> Tensor:
        """Average ``t`` over the data-parallel group (no-op without one); counts the bytes sent."""
        if self.process_group is None:
            return t
        import torch.distributed as dist

        dist.all_reduce(t, op=dist.ReduceOp.SUM, group=self.process_group)
        self.comm_bytes += t.numel() * t.element_size()
        return t.div_(dist.get_world_size(self.process_group))

    def _broadcast_projection(self) -> None:
        """Make every rank hold rank 0's projection bit for bit (SVDs may differ in the last bits)."""
        import torch.distributed as dist

        p = self.projection
        tensors = [p.codes, p.scales] if isinstance(p, QuantizedTensor) else [p]
        src = dist.get_global_rank(self.process_group, 0) if self.process_group is not dist.group.WORLD else 0
        for t in tensors:
            dist.broadcast(t, src=src, group=self.process_group)
            self.comm_bytes += t.numel() * t.element_size()

    def _skip(self) -> None:
        self.skipped_updates += 1
        self.accum = None
        self.accum_count = 0

    def _refresh(self, G: Tensor) -> None:
        import time

        t0 = time.perf_counter()
        prev = self.projection_matrix()
        generator = torch.Generator(device=G.device).manual_seed(self.seed + 7 * self.policy.refresh_count)
        P = proj.compute_projection(G, self.rank, self.side, method=self.config.proj_method, prev=prev, generator=generator)
        self._store_projection(P)
        if self.process_group is not None:
            self._broadcast_projection()
        # Chance-adjusted: two unrelated rank-r subspaces of a d-dim space overlap by r/d on average, which at
        # rank 1024 of 2048 is above the 0.4 threshold; the adjusted score maps "unrelated" to 0, "same" to 1.
        similarity = None if prev is None else proj.subspace_similarity(
            self.projection_matrix(), prev, self.side, chance_adjusted=True)
        self.policy.record_refresh(self.step, similarity)
        self.refresh_seconds += time.perf_counter() - t0

    # ------------------------------------------------------------------ update
    def apply_pending(self, weight: Tensor, scales: Tensor) -> bool:
        """Apply the accumulated low-rank gradient (deferred mode); True if it ran."""
        if self.accum is None:
            return False
        R, self.accum, self.accum_count = self.accum, None, 0
        self.apply_update(weight, scales, R)
        return True

    @torch.no_grad()
    def apply_update(self, weight: Tensor, scales: Tensor, R: Tensor) -> None:
        group = self.group
        beta1, beta2 = group["betas"]
        lr = float(group["lr"])
        wd = float(group["weight_decay"])
        N = adam_direction_(R, self.adam, self.step + 1, beta1=beta1, beta2=beta2, eps=group["eps"])
        delta = proj.project_back(N, self.projection_matrix(), self.side)
        W = dequantize_weight(weight, scales, self.config.block_size, torch.float32)
        if wd:
            W.mul_(1.0 - lr * wd)
        W.add_(delta, alpha=-lr * self.config.scale)
        self._write_weight(weight, scales, W)
        self.step += 1

    def _write_weight(self, weight: Tensor, scales: Tensor, W: Tensor) -> None:
        if weight.is_floating_point():
            weight.copy_(W.to(weight.dtype))
            return
        seed = None
        if self.config.stochastic_round:
            seed = torch.tensor([self.seed, self.step * W.numel()], dtype=torch.int64, device=W.device)
        codes, new_scales = torch.ops.qgalore_fx.quantize(W, 8, self.config.block_size, seed)
        weight.copy_(codes)
        scales.copy_(new_scales)

    # ------------------------------------------------------------------ accounting and state
    def nbytes(self) -> dict:
        """Exact bytes of the persistent optimizer-side tensors of this layer."""
        p = self.projection
        if p is None:
            pbytes = 0
        elif isinstance(p, QuantizedTensor):
            pbytes = p.nbytes
        else:
            pbytes = p.numel() * p.element_size()
        accum = 0 if self.accum is None else self.accum.numel() * self.accum.element_size()
        return {"projection": pbytes, "optimizer_state": self.adam.nbytes, "accumulator": accum}

    def stats(self) -> dict:
        return {
            "step": self.step,
            "refresh_count": self.policy.refresh_count,
            "interval": self.policy.interval,
            "last_similarity": self.policy.last_similarity,
            "skipped_updates": self.skipped_updates,
            "refresh_seconds": self.refresh_seconds,
        }

    def state_dict(self) -> dict:
        """Tensors and JSON-safe values; no pickled objects."""
        out = {
            "step": self.step,
            "skipped_updates": self.skipped_updates,
            "refresh_seconds": self.refresh_seconds,
            "accum_count": self.accum_count,
            "policy": self.policy.state_dict(),
            "adam": self.adam.state_dict(),
            "accum": self.accum,
        }
        p = self.projection
        if isinstance(p, QuantizedTensor):
            out["projection"] = {"codes": p.codes, "scales": p.scales, "bits": p.bits, "block_size": p.block_size,
                                 "shape": list(p.shape)}
        elif p is not None:
            out["projection"] = {"dense": p}
        else:
            out["projection"] = None
        return out

    def check_state_dict(self, state: dict) -> None:
        """Raise ValueError if ``state`` does not fit this layer (rank, shape, projection layout)."""
        missing = [k for k in ("step", "skipped_updates", "refresh_seconds", "accum_count", "policy", "adam",
                               "projection") if k not in state]
        if missing:
            raise ValueError(f"low-rank state of layer {self.name!r} lacks {missing}")
        adam_shape = tuple(int(s) for s in state["adam"]["shape"].tolist())
        if adam_shape != self.lowrank_shape:
            raise ValueError(f"low-rank state of layer {self.name!r} has moments of shape {adam_shape}, this layer "
                             f"needs {self.lowrank_shape} (rank {self.rank}, side {self.side}): saved with another "
                             "rank or model?")
        accum = state.get("accum")
        if accum is not None and tuple(accum.shape) != self.lowrank_shape:
            raise ValueError(f"low-rank accumulator of layer {self.name!r} has shape {tuple(accum.shape)}, "
                             f"expected {self.lowrank_shape}")
        p = state["projection"]
        expected = self.projection_shape
        if p is not None:
            shape = tuple(p["dense"].shape) if "dense" in p else tuple(p["shape"])
            if shape != expected:
                raise ValueError(f"projection of layer {self.name!r} has shape {shape}, expected {expected}")

    def load_state_dict(self, state: dict) -> None:
        self.check_state_dict(state)
        self.step = int(state["step"])
        self.skipped_updates = int(state["skipped_updates"])
        self.refresh_seconds = float(state["refresh_seconds"])
        self.accum_count = int(state["accum_count"])
        self.policy.load_state_dict(state["policy"])
        self.adam = AdamState.from_state_dict(state["adam"])
        accum = state.get("accum")
        self.accum = None if accum is None else accum.clone()
        p = state["projection"]
        if p is None:
            self.projection = None
        elif "dense" in p:
            self.projection = p["dense"].clone()
        else:
            self.projection = QuantizedTensor(
                codes=p["codes"].clone(), scales=p["scales"].clone(), shape=torch.Size(p["shape"]),
                dtype=torch.float32, bits=int(p["bits"]), block_size=int(p["block_size"]),
            )

    def clone(self) -> "LowRankState":
        """An independent copy (own registry id, no optimizer attached)."""
        new = LowRankState(self.name, self.shape, self.config, self.index, device=self.adam_device())
        new.defer = self.defer
        new.load_state_dict(self.state_dict())
        return new

    def adam_device(self) -> torch.device:
        return next(iter(t for t in self.adam.state_dict().values() if isinstance(t, Tensor))).device

    def to(self, device) -> "LowRankState":
        self.adam = self.adam.to(device)
        if self.projection is not None:
            self.projection = self.projection.to(device)
        if self.accum is not None:
            self.accum = self.accum.to(device)
        return self
