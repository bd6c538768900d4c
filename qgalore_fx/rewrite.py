"""`transform(model, rank=..., **options)`: capture, then run the passes.

    model = qgalore_fx.transform(model, rank=256)

1. ``select_linears``   which layers to project (config rules; any type with a
                        handler in :mod:`qgalore_fx.handlers`: ``nn.Linear``, GPT-2's ``Conv1D``);
2. ``capture_regions``  torch.fx regions around them (see passes/capture.py);
3. pass 1 ``quantize_weights``  INT8 storage + ``qgalore_fx.linear`` nodes;
4. pass 2 ``fuse_update``       each node wired to its layer's update-state tensors.

The model is changed in place and returned (use the return value: a traced
``nn.Sequential`` root comes back as a ``GraphModule``). Transforming a model
twice raises: its linears are already rewritten.
"""

from __future__ import annotations

from typing import List, Optional

import torch
import torch.nn as nn

from qgalore_fx.config import QGaLoreConfig
from qgalore_fx.handlers import handler_for
from qgalore_fx.hf import mark_config
from qgalore_fx.layers import QGaLoreLinear
from qgalore_fx.lowrank import STATE_NAMES, check_rank
from qgalore_fx.materialize import WeightsArg, WeightSource, linear_weight_factory, materialize_bias, materialize_rest
from qgalore_fx.passes.capture import Region, _set_submodule, capture_regions, select_linears
from qgalore_fx.passes.fuse_update import attach_update, fuse_update
from qgalore_fx.passes.quantize_weights import quantize_module, quantize_weights

_REGIONS_ATTR = "_qgalore_fx_regions"
_CONFIG_ATTR = "_qgalore_fx_config"
_SKIPPED_ATTR = "_qgalore_fx_not_projected"


def transform(model: nn.Module, rank: Optional[int] = None, *, config: Optional[QGaLoreConfig] = None,
              weights: WeightsArg = None, device=None, **options) -> nn.Module:
    """Rewrite ``model`` for Q-GaLore training; see :class:`QGaLoreConfig` for options.

    A model on the ``meta`` device is materialized layer by layer (see :mod:`qgalore_fx.materialize`):
    ``weights`` is a state dict, a ``.safetensors`` file or a directory of them (None: initialize as the
    model would), ``device`` where the real tensors go (default CPU).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if config is not None:
        if rank is not None or options:
            raise TypeError("pass either config= or rank=/options, not both")
        if not isinstance(config, QGaLoreConfig):
            raise TypeError(f"config must be a qgalore_fx.QGaLoreConfig, got {type(config).__name__}")
    else:
        config = QGaLoreConfig.from_options(rank=rank, **options)
    if is_transformed(model):
        raise ValueError("model is already transformed by qgalore_fx; transform the original model once")

    on_meta = any(t.is_meta for t in list(model.parameters()) + list(model.buffers()))
    if weights is not None and not on_meta:
        raise ValueError("weights= is for models built on the meta device; this model already has real weights "
                         "(load them with model.load_state_dict before transform)")
    if device is not None and not on_meta:
        raise ValueError("device= is for models built on the meta device; move a real model with model.to(device)")
    source = WeightSource(weights)
    target_device = torch.device("cpu" if device is None else device)

    selected = select_linears(model, config)
    # Before anything is rewritten. The default rule leaves out layers smaller than the rank (e.g. a 1 x 128
    # MoE gate) and lists them in explain(); a layer chosen explicitly (target_modules/filter_fn) must fit.
    too_small = {name: handler_for(layer).shape(layer) for name, layer in selected.items()
                 if min(handler_for(layer).shape(layer)) < config.rank}
    explicit = config.target_modules is not None or config.filter_fn is not None
    if too_small and (explicit or len(too_small) == len(selected)):
        name, (m, n) = next(iter(too_small.items()))
        check_rank(config.rank, name, m, n)
    for name in too_small:
        del selected[name]

    materialize = None
    if on_meta:
        make_weight = linear_weight_factory(model, source, target_device)

        def materialize(fqn, layer):
            return make_weight(fqn, layer), materialize_bias(fqn, layer, source, target_device)

    model, regions = capture_regions(model, selected, trace=config.trace)
    index = 0
    for region in regions:
        if region.kind == "graph":
            prefix = region.name
            local = {n[len(prefix) + 1:] for n in selected if n.startswith(prefix + ".")} if prefix else set(selected)
            quantize_weights(region.module, local, config, prefix, materialize)
            index += fuse_update(region.module, prefix, config, index)
        else:
            layer = quantize_module(region.module, config, region.name, materialize)
            _set_submodule(model, region.name, layer)
            region.module = layer
            attach_update(layer, region.name, config, index)
            index += 1
    if on_meta:
        materialize_rest(model, source, target_device, skip=(QGaLoreLinear,))
    _exclude_state_from_ddp_sync(model)
    object.__setattr__(model, _REGIONS_ATTR, regions)
    object.__setattr__(model, _CONFIG_ATTR, config)
    object.__setattr__(model, _SKIPPED_ATTR, [(name, shape, f"smaller than rank {config.rank}")
                                              for name, shape in too_small.items()])
    mark_config(model, config.to_dict())  # HF models: save_pretrained output is never loaded as random weights
    return model


def _exclude_state_from_ddp_sync(model: nn.Module) -> None:
    """Keep DistributedDataParallel from broadcasting the update state every forward.

    DDP broadcasts a module's buffers from rank 0 before each forward. The update state (projections,
    moments, counters, hyperparameters) is identical on every rank by construction — each rank applies the
    same update to the same all-reduced low-rank gradient, and rank 0's projection is broadcast at each
    refresh — so re-sending it would cost its full size per step for nothing. The weights themselves stay
    under DDP's sync.
    """
    names = list(getattr(model, "_ddp_params_and_buffers_to_ignore", []))
    for name, layer in projected_layers(model):
        if layer.spec is not None:
            names += [f"{name}.{k}" for k in STATE_NAMES if k != "control"] + [f"{name}.hparams"]
    model._ddp_params_and_buffers_to_ignore = names


def is_transformed(model: nn.Module) -> bool:
    return any(isinstance(m, QGaLoreLinear) for m in model.modules())


def projected_layers(model: nn.Module):
    """(name, QGaLoreLinear) pairs in module order."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, QGaLoreLinear)]


def regions_of(model: nn.Module) -> List[Region]:
    return list(getattr(model, _REGIONS_ATTR, []))


def config_of(model: nn.Module) -> Optional[QGaLoreConfig]:
    return getattr(model, _CONFIG_ATTR, None)


def explain(model: nn.Module) -> str:
    """A table of what the transform did: regions, layers, shapes, ranks and bytes."""
    layers = projected_layers(model)
    if not layers:
        return f"{type(model).__name__}: not transformed by qgalore_fx"
    lines = []
    regions = regions_of(model)
    if regions:
        traced = [r for r in regions if r.kind == "graph"]
        swapped = [r for r in regions if r.kind == "module"]
        lines.append(f"regions: {len(traced)} traced with torch.fx, {len(swapped)} linears swapped as modules")
        notes = sorted({r.note for r in swapped if r.note})
        for note in notes[:5]:
            lines.append(f"  not traceable: {note}")
    for name, (m, n), why in getattr(model, _SKIPPED_ATTR, []):
        lines.append(f"  not projected: {name} [{m}x{n}] ({why}; trained by the AdamW group)")
    header = f"{'layer':<44} {'shape':>13} {'weight':>8} {'rank':>5} {'side':>5} {'bytes fp32':>12} {'bytes now':>11}"
    lines.append(header)
    lines.append("-" * len(header))
    total_before = total_after = 0
    for name, layer in layers:
        m, n = layer.out_features, layer.in_features
        before = m * n * 4
        after = layer.weight_nbytes()
        rank = side = "-"
        if layer.spec is not None:
            rank, side = str(layer.spec.rank), layer.spec.side
            after += sum(layer.state_nbytes().values())
        storage = {8: "int8", 16: "bf16", 32: "fp32"}[layer.weight_bits]
        lines.append(f"{name:<44} {f'{m}x{n}':>13} {storage:>8} {rank:>5} {side:>5} {before:>12,} {after:>11,}")
        total_before += before
        total_after += after
    lines.append("-" * len(header))
    lines.append(f"{len(layers)} projected linears: {total_before:,} bytes as fp32 -> {total_after:,} bytes now "
                 f"(weights + projections + optimizer state, {total_after / max(total_before, 1):.3f}x)")
    lines.append(f"logical parameters: {logical_parameters(model):,} (each projected weight counted as out x in; "
                 "model.num_parameters() counts only torch Parameters, which the INT8 codes are not)")
    return "\n".join(lines)


def logical_parameters(model: nn.Module) -> int:
    """The parameter count of the model as it was before the transform: every Parameter (shared ones once) plus
    out x in for each projected weight (stored as INT8 codes in a buffer, so ``num_parameters()`` misses it)."""
    params = sum(p.numel() for p in model.parameters())
    return params + sum(layer.out_features * layer.in_features for _, layer in projected_layers(model))
