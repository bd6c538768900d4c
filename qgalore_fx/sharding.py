"""FSDP2: projected layers whose INT8 weights and update state are sharded across ranks.

The user shards a transformed model with PyTorch's own ``fully_shard`` (FSDP2) and builds the optimizer after it::

    model = qgalore_fx.transform(model, rank=256)
    for block in model.model.layers:
        fully_shard(block)
    fully_shard(model)
    opt = qgalore_fx.optimizer(model, lr=1e-3)

How the pieces divide (README.md, "Sharded training (FSDP2)", has the user's view):

- ``weight_codes`` (INT8) and ``weight_scales`` are frozen Parameters, so ``fully_shard`` shards them along rows
  (``Shard(0)``) and all-gathers them for forward and backward like any parameter: the wire carries INT8 codes and
  fp32 scales (1 + 4/256 bytes per element), never a float copy. FSDP2 reduces nothing for them.
- The update writes each rank's own rows. :func:`shard_layer` (called when the optimizer binds the layer) points the
  layer's non-persistent ``shard_codes`` / ``shard_scales`` at FSDP2's local shard of the codes and scales and cuts
  Adam's moments and the accumulator to this rank's part of R (rows of R ``[m, r]`` for a right projection, rows of
  R ``[r, n]`` for a left one). In backward each rank forms its full low-rank R from its own tokens, one
  reduce-scatter sums and averages it over ranks, Adam steps its part, and the rank writes its rows of
  ``ΔW`` (right: ``N_local · P``; left: ``P_rows · N`` after an all-gather of the r × n direction ``N``).
  P (INT4, small) is replicated; a refresh all-reduces G once and rank 0's P is broadcast.
- Quantization blocks are global: a rank's shard must hold whole blocks of the codes (256 elements) and of the
  8-bit moments, so the numbers do not depend on the world size and a DCP checkpoint reshards exactly.
  :func:`check_layer` names the layer and what divides what when that does not hold.
- ``state_dict()`` returns the sharded state as DTensors with the global shape (``Shard(0)``), so
  ``torch.distributed.checkpoint`` saves from W ranks and loads into W' ranks; a plain (full) tensor loaded into a
  sharded layer is cut to this rank's part.

The unprojected parameters (embeddings, norms, head) are FSDP2's ordinary DTensor parameters; the optimizer's
8-bit AdamW steps their local shards (:func:`rest_layout` says how).
"""

from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
import torch.nn as nn
from torch import Tensor

#: The update-state tensors cut to this rank's part of R (dim 0 of their global shape).
SHARDED_STATE = ("exp_avg", "exp_avg_sq", "exp_avg_absmax", "exp_avg_sq_absmax", "accum")


def is_dtensor(t) -> bool:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # torch built without distributed
        return False
    return isinstance(t, DTensor)


def local(t: Tensor) -> Tensor:
    """The local tensor of a DTensor (a view, no copy); any other tensor as it is."""
    return t.to_local() if is_dtensor(t) else t


def fsdp1_modules(model: nn.Module) -> list:
    """Names of FSDP1 (``FullyShardedDataParallel``) wrappers in ``model``."""
    try:
        from torch.distributed.fsdp import FullyShardedDataParallel
    except ImportError:
        return []
    return [n or "<root>" for n, m in model.named_modules() if isinstance(m, FullyShardedDataParallel)]


def check_not_fsdp1(model: nn.Module) -> None:
    names = fsdp1_modules(model)
    if names:
        raise ValueError(
            f"{names[0]!r} is wrapped in FullyShardedDataParallel (FSDP1), which flattens parameters into one "
            "1-D buffer: a projected layer's INT8 rows and their low-rank update can no longer be found. Shard "
            "with FSDP2 instead: torch.distributed.fsdp.fully_shard(block) for each block, then fully_shard(model)")


def check_layer(name: str, layer: nn.Module, world: int) -> None:
    """Raise ValueError when ``layer`` cannot be updated shard by shard on ``world`` ranks."""
    from torch.distributed.tensor import Shard

    codes, scales = layer.weight_codes, layer.weight_scales
    if codes.device_mesh.ndim != 1:
        raise ValueError(f"layer {name!r} is sharded over a {codes.device_mesh.ndim}-D device mesh; qgalore_fx "
                         "shards projected layers over a 1-D mesh (fully_shard(..., mesh=init_device_mesh(dev, (W,))))")
    for what, t in (("weight_codes", codes), ("weight_scales", scales)):
        if tuple(t.placements) != (Shard(0),):
            raise ValueError(
                f"layer {name!r}: {what} is placed {tuple(t.placements)}; a projected weight must be sharded along "
                "its rows (Shard(0)), where each rank's INT8 blocks and its rows of the low-rank update live "
                "(drop the shard_placement_fn entry that places it, or return Shard(0) for it)")
    message = split_error(name, layer.spec, world, moments_8bit=layer.exp_avg.dtype == torch.uint8)
    if message:
        raise ValueError(message)


def split_error(name: str, spec, world: int, moments_8bit: bool) -> Optional[str]:
    """Why a projected layer of ``spec`` cannot be split over ``world`` ranks (None when it can): it must not be
    lean, its rows must form whole INT8 blocks on each rank, and so must the rows of R its 8-bit moments are cut
    into. The memory planner asks the same question of a model on the meta device."""
    from qgalore_fx.kernels.adam8bit import BLOCK_SIZE as ADAM_BLOCK

    if spec.lean:
        return (f"layer {name!r}: lean=True is not supported under FSDP2 yet (the factored second moment's column "
                "statistics span every rank's rows of R); transform without lean=True to shard, or train lean on "
                "one process or with DDP")
    m, n, bs = spec.m, spec.n, spec.block_size
    if m % world or (m // world * n) % bs:
        return (f"layer {name!r} [{m}, {n}] cannot be sharded on {world} ranks: each rank must hold an equal number "
                f"of rows forming whole INT8 blocks of {bs} elements (out_features % world_size == 0 and "
                f"(out_features / world_size) * in_features % {bs} == 0); exclude it with filter_fn or change the "
                "world size")
    lead, cols = spec.lowrank_shape
    if lead % world or (moments_8bit and (lead // world * cols) % ADAM_BLOCK):
        what = "rank" if spec.side == "left" else "out_features"
        return (f"layer {name!r}: its low-rank gradient R {list(spec.lowrank_shape)} cannot be split evenly into "
                f"whole 8-bit moment blocks ({ADAM_BLOCK} elements) on {world} ranks; choose a {what} divisible by "
                f"{world} whose share times {cols} is a multiple of {ADAM_BLOCK}")
    return None


def shard_layer(name: str, layer: nn.Module) -> bool:
    """Bind a projected layer to FSDP2's shards of its codes and scales; False when they are not sharded.

    Cuts the moments and accumulator to this rank's part (from a replicated start: every rank holds the same
    full tensors, as after ``transform``) and records the shard in the layer's spec.
    """
    import dataclasses

    codes = layer.weight_codes
    if not is_dtensor(codes):
        return False
    mesh = codes.device_mesh
    world, rank = mesh.size(), mesh.get_local_rank()
    check_layer(name, layer, world)
    group = mesh.get_group()
    spec = layer.spec
    if spec.shard_world == world and spec.shard_rank == rank:  # already bound (a second optimizer after the first)
        layer.bind_shards()
        return True
    if spec.shard_world not in (1, world):
        raise ValueError(f"layer {name!r} was sharded on {spec.shard_world} ranks and is now on {world}; reshard "
                         "through a torch.distributed.checkpoint save and load, not by re-wrapping a live model")
    for key in SHARDED_STATE:
        t = getattr(layer, key)
        if t.numel():
            setattr(layer, key, rank_part(t, world, rank).clone())
    layer.set_spec(dataclasses.replace(spec, shard_world=world, shard_rank=rank, shard_group=group.group_name))
    layer.shard_mesh = mesh
    layer.bind_shards()
    return True


def global_rows(t: Tensor, mesh) -> Tensor:
    """This rank's rows ``t`` of an evenly split tensor, as the ``Shard(0)`` DTensor of the whole (no copy)."""
    from torch.distributed.tensor import DTensor, Shard

    shape = torch.Size((t.shape[0] * mesh.size(), *t.shape[1:]))
    return DTensor.from_local(t, mesh, [Shard(0)], run_check=False, shape=shape,
                              stride=torch.empty(shape, device="meta").stride())


def dtensor_state(layer: nn.Module, t: Tensor) -> Tensor:
    """A layer's local state tensor as a ``Shard(0)`` DTensor with its global shape (empty tensors stay as they are)."""
    return global_rows(t, layer.shard_mesh) if t.numel() else t


def rank_part(value: Tensor, world: int, rank: int) -> Tensor:
    """This rank's rows of a loaded tensor: a DTensor's local tensor, or its chunk of a full one (from one process)."""
    return value.to_local() if is_dtensor(value) else value.chunk(world)[rank]


def local_part(layer: nn.Module, key: str, value: Tensor) -> Tensor:
    """What a loaded state entry means for this rank (:func:`rank_part`); a tensor already of the local size, or
    of a shape that is not the whole of this layer's, is taken as it is (the load then names the mismatch)."""
    if is_dtensor(value):
        return value.to_local()
    own = getattr(layer, key)
    if not isinstance(value, Tensor) or not value.numel() or value.shape == own.shape:
        return value
    world, rank = layer.spec.shard_world, layer.spec.shard_rank
    return rank_part(value, world, rank) if value.shape[0] == own.shape[0] * world else value


# ---------------------------------------------------------------------------------------------- the AdamW group
def rest_layout(p: Tensor, bits: int) -> str:
    """How the optimizer keeps the 8-bit AdamW state of an unprojected parameter.

    ``"plain"``: not a DTensor. ``"local"``: a ``Shard(0)`` DTensor split evenly into whole moment blocks — the
    state covers this rank's rows only, with the blocks a single process would have. ``"full"``: anything else (a
    norm whose shard is part of a block, an uneven split): the state covers the whole parameter on every rank, and
    each step all-gathers the parameter and its gradient (small, or a layout FSDP2 was asked for) so every rank
    computes the same update and keeps its rows.
    """
    from torch.distributed.tensor import Shard

    if not is_dtensor(p):
        return "plain"
    if p.device_mesh.ndim != 1 or tuple(p.placements) != (Shard(0),):
        return "full"
    return shard0_layout(p.shape, p.device_mesh.size(), bits)


def shard0_layout(shape, world: int, bits: int) -> str:
    """:func:`rest_layout` of a parameter of global ``shape`` placed ``Shard(0)`` on a 1-D mesh of ``world`` ranks
    (the planner asks it of meta shapes)."""
    from qgalore_fx.kernels.adam8bit import BLOCK_SIZE

    numel = math.prod(shape)
    if not len(shape) or shape[0] % world:
        return "full"
    if state_bits_of(numel, bits) == 8 and (numel // world) % BLOCK_SIZE:
        return "full"
    return "local"


def state_bits(p: Tensor, bits: int) -> int:
    """The moment width of a parameter: 8-bit only when the *global* parameter is large enough (every world size
    decides alike)."""
    return state_bits_of(p.numel(), bits)


def state_bits_of(numel: int, bits: int) -> int:
    from qgalore_fx.kernels.adam8bit import MIN_8BIT_SIZE

    return 8 if bits == 8 and numel >= MIN_8BIT_SIZE else 32


def rows_of(p: Tensor) -> slice:
    """The global rows (dim 0) a DTensor's local shard holds."""
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    shape, offset = compute_local_shape_and_global_offset(p.shape, p.device_mesh, p.placements)
    if p.dim() == 0:
        return slice(0, 0)
    return slice(offset[0], offset[0] + shape[0])


def agree(ok: Tensor, mesh) -> Tensor:
    """``ok`` (a 0-d bool tensor) AND-ed over the ranks of ``mesh``: one tiny all-reduce, no host sync of ours."""
    import torch.distributed as dist

    flag = (~ok).to(torch.float32).reshape(1)
    dist.all_reduce(flag, group=mesh.get_group())
    return (flag == 0).reshape(())


def mesh_of(params) -> Optional[object]:
    for p in params:
        if is_dtensor(p):
            return p.device_mesh
    return None


def full(t):
    """A DTensor gathered whole (a replicated entry of a checkpoint); anything else as it is."""
    return t.full_tensor() if is_dtensor(t) else t


#: The sharded entries of an ``AdamState.state_dict()`` (the rest: its shape, bits and block size).
_ADAM_MOMENTS = ("m", "v", "absmax_m", "absmax_v")


def global_adam_state(p: Tensor, adam: dict) -> dict:
    """An ``AdamState.state_dict()`` of a ``"local"`` parameter with its moments as global ``Shard(0)`` DTensors."""
    out = {k: (global_rows(v, p.device_mesh) if k in _ADAM_MOMENTS else v) for k, v in adam.items()}
    out["shape"] = torch.tensor(list(p.shape), dtype=torch.int64)
    return out


def local_adam_state(p: Tensor, adam: dict) -> dict:
    """The inverse of :func:`global_adam_state` for this rank; a full tensor (from one process) is cut to its part."""
    world, rank = p.device_mesh.size(), p.device_mesh.get_local_rank()
    out = {k: (rank_part(v, world, rank) if k in _ADAM_MOMENTS else v) for k, v in adam.items()}
    out["shape"] = torch.tensor(list(p.to_local().shape), dtype=torch.int64)
    return out
