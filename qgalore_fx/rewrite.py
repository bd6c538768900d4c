"""`transform(model, rank=..., **options)`: capture, then run the passes.

    model = qgalore_fx.transform(model, rank=256)

1. ``select_layers``    which modules to project (config rules; any module a handler
                        in :mod:`qgalore_fx.handlers` claims: ``nn.Linear``, GPT-2's ``Conv1D``,
                        fused MoE experts), and that ``rank`` fits them;
2. ``capture_regions``  torch.fx regions around them (see passes/capture.py);
3. pass 1 ``quantize_weights``  each layer replaced by the projected layer its handler builds
                                whole (INT8 storage and update state) + ``qgalore_fx.linear`` nodes;
4. pass 2 ``fuse_update``       each node wired to its layer's update-state tensors.

The model is changed in place and returned (use the return value: a traced
``nn.Sequential`` root comes back as a ``GraphModule``). Transforming a model
twice raises: its linears are already rewritten.
"""

from __future__ import annotations

import copy
from collections import OrderedDict
from typing import List, Optional

import torch
import torch.nn as nn

from qgalore_fx.config import QGaLoreConfig
from qgalore_fx.handlers import summaries
from qgalore_fx.host_allocator import auto_mmap_threshold_for_build, release_free_memory
from qgalore_fx.layers import QGaLoreLinear
from qgalore_fx.lowrank import OP_STATE_NAMES
from qgalore_fx.materialize import MetaWeights, WeightsArg, WeightSource, key_renamer, materialize_rest
from qgalore_fx.passes.capture import Region, _set_submodule, capture_regions, select_layers
from qgalore_fx.passes.fuse_update import fuse_update
from qgalore_fx.passes.quantize_weights import quantize_module, quantize_weights

_REGIONS_ATTR = "_qgalore_fx_regions"
_CONFIG_ATTR = "_qgalore_fx_config"
_SKIPPED_ATTR = "_qgalore_fx_not_projected"

#: Called as ``hook(model, config)`` after every transform that succeeded. Integrations above the transform
#: register here (:mod:`qgalore_fx.integrations.transformers` marks HF models so that ``save_pretrained`` writes
#: ``quant_method: "qgalore_fx"``), so the transform never imports them.
TRANSFORM_HOOKS: list = []


def transform(model: nn.Module, rank: Optional[int] = None, *, config: Optional[QGaLoreConfig] = None,
              weights: WeightsArg = None, device=None, **options) -> nn.Module:
    """Rewrite ``model`` for Q-GaLore training; see :class:`QGaLoreConfig` for options.

    A model on the ``meta`` device is materialized layer by layer (see :mod:`qgalore_fx.materialize`):
    ``weights`` is a state dict, a ``.safetensors`` file, a directory or list of them (None: initialize as
    the model would), ``device`` where the real tensors go (default CPU).
    """
    return _transform(model, rank, config, weights, device, options, rest=True)


def transform_projected(model: nn.Module, config: QGaLoreConfig, weights: WeightsArg = None, device=None) -> nn.Module:
    """:func:`transform` of a model on the ``meta`` device that materializes only the projected layers (from
    ``weights``, or initialized) and leaves every other tensor on ``meta``, for a loader that fills them itself
    (transformers' ``from_pretrained``, :mod:`qgalore_fx.integrations.transformers`)."""
    return _transform(model, None, config, weights, device, {}, rest=False)


def _transform(model, rank, config, weights, device, options, rest: bool) -> nn.Module:
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
    rename = key_renamer(model) if not source.empty else None
    if rename is not None:  # an HF checkpoint under legacy names (e.g. Mixtral's block_sparse_moe)
        source.use_model_names(rename)
    target_device = torch.device("cpu" if device is None else device)
    if on_meta and target_device.type == "cpu":
        auto_mmap_threshold_for_build(model)

    selected, not_projected = select_layers(model, config)  # every check before anything changes

    if not rest and not on_meta:
        raise ValueError("transform_projected is for models built on the meta device")
    snapshot = _snapshot(model)
    try:
        meta = MetaWeights(model, source, target_device) if on_meta else None
        model = _rewrite(model, config, selected, not_projected, meta, rest)
    except BaseException:
        _restore(snapshot)  # nothing half-applied: the model is exactly as it was
        raise
    for hook in TRANSFORM_HOOKS:
        hook(model, config)
    return model


def _rewrite(model: nn.Module, config: QGaLoreConfig, selected: dict, not_projected: list,
             weights: Optional[MetaWeights], rest: bool = True) -> nn.Module:
    """Capture and both passes, after every check (``weights``: where the tensors of a model on the meta device
    come from; ``rest``: also materialize what is not projected)."""
    model, regions = capture_regions(model, selected, trace=config.trace)
    index = 0  # each projected layer's place in the model: its random stream
    for region in regions:
        if region.kind == "graph":
            index += quantize_weights(region.module, region.layers, config, region.name, index, weights)
            fuse_update(region.module)
        else:
            region.module, count = quantize_module(region.module, config, region.name, index, weights)
            _set_submodule(model, region.name, region.module)
            index += count
    if weights is not None and rest:
        materialize_rest(model, weights.source, weights.device, skip=(QGaLoreLinear,))
    if weights is not None:
        release_free_memory()
    _exclude_state_from_ddp_sync(model)
    object.__setattr__(model, _REGIONS_ATTR, regions)
    object.__setattr__(model, _CONFIG_ATTR, config)
    object.__setattr__(model, _SKIPPED_ATTR, not_projected)
    return model


def _snapshot(model: nn.Module) -> list:
    """What ``transform`` may change in ``model``: each module's attributes and the contents of its
    containers (submodules, parameters, buffers), by reference — no tensor is copied."""
    return [(module, {k: copy.copy(v) if type(v) in _CONTAINERS else v for k, v in vars(module).items()})
            for module in model.modules()]


_CONTAINERS = (dict, OrderedDict, set, list)


def _restore(snapshot: list) -> None:
    """Put every module back as :func:`_snapshot` found it (replaced submodules, released weights, attributes)."""
    for module, attrs in snapshot:
        vars(module).clear()
        vars(module).update({k: copy.copy(v) if type(v) in _CONTAINERS else v for k, v in attrs.items()})


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
            names += [f"{name}.{k}" for k in OP_STATE_NAMES if k != "control"] + [f"{name}.hparams"]
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
        swapped = [r for r in regions if r.kind == "module" and isinstance(r.module, QGaLoreLinear)]
        lines.append(f"regions: {len(traced)} traced with torch.fx, {len(swapped)} linears swapped as modules")
        notes = sorted({r.note for r in swapped if r.note})
        for note in notes[:5]:
            lines.append(f"  not traceable: {note}")
    lines += summaries(model)  # e.g. the MoE experts' line
    for name, shape, why in getattr(model, _SKIPPED_ATTR, []):
        dims = "x".join(str(d) for d in shape)
        lines.append(f"  not projected: {name} [{dims}] ({why}; trained by the AdamW group)")
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
    lean = sum(1 for _, layer in layers if layer.spec is not None and layer.spec.lean)
    if lean:
        lines.append(f"lean=True: {lean} of {len(layers)} layers keep a factored second moment of R (its row and "
                     "column means, fp32) and no first moment in place of 8-bit Adam moments "
                     "(qgalore_fx.kernels.factored)")
    lines.append(f"logical parameters: {logical_parameters(model):,} (each projected weight counted as out x in; "
                 "a transformers model's num_parameters() agrees)")
    return "\n".join(lines)


def logical_parameters(model: nn.Module, only_trainable: bool = False, exclude_embeddings: bool = False) -> int:
    """The parameter count of the model as it was before the transform: every Parameter (shared ones once) but
    the projected layers' storage (INT8 codes, their scales, the one-element anchor), plus out x in for each
    projected weight. The flags are ``PreTrainedModel.num_parameters``': ``only_trainable`` counts what training
    changes (a projected weight when its layer updates it, which has no ``.grad`` but is trained all the same;
    other Parameters when they require grad), ``exclude_embeddings`` leaves out ``nn.Embedding`` weights.
    A transformers model's own ``num_parameters()`` gives this count once transformed."""
    layers = projected_layers(model)
    storage = {id(t) for _, layer in layers for t in (layer.weight_codes, layer.weight_scales, layer.anchor)}
    if exclude_embeddings:
        storage |= {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    params = sum(p.numel() for p in model.parameters()
                 if id(p) not in storage and (p.requires_grad or not only_trainable))
    return params + sum(layer.out_features * layer.in_features for _, layer in layers
                        if layer.trainable or not only_trainable)
