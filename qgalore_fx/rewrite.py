"""`transform(model, rank=..., **options)`: capture, then run the passes.

    model = qgalore_fx.transform(model, rank=256)

1. ``select_linears``   which layers to project (config rules; any type with a
                        handler in :mod:`qgalore_fx.handlers`: ``nn.Linear``, GPT-2's ``Conv1D``);
                        ``select_experts``: fused MoE experts (:mod:`qgalore_fx.experts`), each
                        expert matrix projected on its own;
2. ``capture_regions``  torch.fx regions around them (see passes/capture.py);
3. pass 1 ``quantize_weights``  INT8 storage + ``qgalore_fx.linear`` nodes;
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
from qgalore_fx.experts import QGaLoreExperts, checkpoint_expert_keys, expert_shapes, select_experts
from qgalore_fx.handlers import handler_for
from qgalore_fx.host_allocator import release_free_memory
from qgalore_fx.layers import QGaLoreLinear
from qgalore_fx.lowrank import OP_STATE_NAMES
from qgalore_fx.materialize import (WeightsArg, WeightSource, key_renamer, linear_weight_factory, materialize_bias,
                                   materialize_rest)
from qgalore_fx.passes.capture import Region, _set_submodule, capture_regions, select_linears
from qgalore_fx.passes.fuse_update import attach_update, fuse_update
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

    experts, not_projected = select_experts(model, config)
    selected = select_linears(model, config, allow_empty=bool(experts))
    # Before anything is rewritten. The default rule leaves out layers smaller than the rank (e.g. a 1 x 128
    # MoE gate) and lists them in explain(); a layer chosen explicitly (target_modules/filter_fn) must fit.
    too_small = {name: handler_for(layer).shape(layer) for name, layer in selected.items()
                 if not config.fits(*handler_for(layer).shape(layer))}
    small_experts = {f"{name}.{kind}": shape for name, module in experts.items()
                     for kind, shape in expert_shapes(module).items() if not config.fits(*shape)}
    explicit = config.target_modules is not None or config.filter_fn is not None
    all_small = len(too_small) == len(selected) and len({n.rsplit(".", 1)[0] for n in small_experts}) == len(experts)
    if (too_small or small_experts) and (explicit or all_small):
        name, (m, n) = next(iter({**too_small, **small_experts}.items()))
        config.check_fits(name, m, n)
    for name in too_small:
        del selected[name]
    for name in {n.rsplit(".", 1)[0] for n in small_experts}:
        not_projected.append((name, tuple(experts.pop(name).gate_up_proj.shape), f"experts smaller than rank "
                                                                                   f"{config.rank}"))

    if not rest and not on_meta:
        raise ValueError("transform_projected is for models built on the meta device")
    snapshot = _snapshot(model)
    try:
        model = _rewrite(model, config, selected, experts, too_small, not_projected, source if on_meta else None,
                         target_device, rest)
    except BaseException:
        _restore(snapshot)  # nothing half-applied: the model is exactly as it was
        raise
    for hook in TRANSFORM_HOOKS:
        hook(model, config)
    return model


def _rewrite(model: nn.Module, config: QGaLoreConfig, selected: dict, experts: dict, too_small: dict,
             not_projected: list, source: Optional[WeightSource], target_device, rest: bool = True) -> nn.Module:
    """Capture and both passes, after every check (``source``: the weights of a model on the meta device;
    ``rest``: also materialize what is not projected)."""
    on_meta = source is not None
    materialize = None
    if on_meta:
        make_weight = linear_weight_factory(model, source, target_device)

        def materialize(fqn, layer):
            release_free_memory()  # the previous layer's fp32 weight, freed once quantized (qgalore_fx.host_allocator)
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
    for name, module in experts.items():
        index = _project_experts(model, name, module, config, index, source, target_device)
    if on_meta and rest:
        materialize_rest(model, source, target_device, skip=(QGaLoreLinear,))
    if on_meta:
        release_free_memory()
    _exclude_state_from_ddp_sync(model)
    object.__setattr__(model, _REGIONS_ATTR, regions)
    object.__setattr__(model, _CONFIG_ATTR, config)
    object.__setattr__(model, _SKIPPED_ATTR, [(name, shape, f"smaller than rank {config.rank}")
                                              for name, shape in too_small.items()] + not_projected)
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


def _project_experts(model: nn.Module, name: str, module: nn.Module, config: QGaLoreConfig, index: int,
                     source: Optional[WeightSource], device) -> int:
    """Replace one fused-experts module by a :class:`QGaLoreExperts`; returns the next layer index.

    ``source`` (a model on the meta device): the 3-D weights are read from it, or initialized as the model
    would when it is empty. Each expert matrix is quantized from its slice, one at a time.
    """
    weights = None
    if source is not None:
        weights = _expert_weights(model, name, module, source, device)

    def build(e: int, kind: str, w: torch.Tensor) -> QGaLoreLinear:
        out_features, in_features = w.shape
        layer = QGaLoreLinear(in_features, out_features, None, config.weight_bits, config.block_size, device=w.device)
        layer.load_weight_(w, f"{name}.{kind}.{e}")
        return layer

    new = QGaLoreExperts.from_module(module, build, weights)
    del weights
    _set_submodule(model, name, new)
    for e in range(new.num_experts):
        for kind in ("gate_up", "down"):
            attach_update(getattr(new, kind)[e], f"{name}.{kind}.{e}", config, index)
            index += 1
    return index


def _expert_weights(model: nn.Module, name: str, module: nn.Module, source: WeightSource, device):
    """The fp32 3-D ``gate_up_proj`` / ``down_proj`` of a fused-experts module on the meta device."""
    if not source.empty:
        out = []
        for pname in ("gate_up_proj", "down_proj"):
            key, shape = f"{name}.{pname}", getattr(module, pname).shape
            w = source.get(key, shape) if key in source else None
            if w is None:  # stored per expert, as HF checkpoints do: expert e = cat of its pieces along dim 0
                candidates = checkpoint_expert_keys(model, key, shape[0])
                groups = next((g for g in candidates if all(k in source for keys in g for k in keys)), None)
                if groups is None:
                    example = "".join(f" such as {c[0][0]!r}" for c in candidates[-1:])
                    raise ValueError(f"weights has no tensor {key!r} (nor its per-expert pieces{example}) for the "
                                     f"projected experts {name!r}")
                rows = shape[1] // len(groups)
                w = torch.stack([torch.cat([source.get(keys[e], (rows, shape[2])) for keys in groups])
                                 for e in range(shape[0])])
            out.append(w.to(device=device, dtype=torch.float32))
        return tuple(out)
    tmp = copy.deepcopy(module).to_empty(device=device)
    init = getattr(model, "_init_weights", None)
    if callable(init):
        init(tmp)
    else:  # the fused parameters are created with torch.empty: never train from uninitialized memory
        for p in (tmp.gate_up_proj, tmp.down_proj):
            nn.init.normal_(p, std=0.02)
    return tmp.gate_up_proj.detach().float(), tmp.down_proj.detach().float()


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
        swapped = [r for r in regions if r.kind == "module"]
        lines.append(f"regions: {len(traced)} traced with torch.fx, {len(swapped)} linears swapped as modules")
        notes = sorted({r.note for r in swapped if r.note})
        for note in notes[:5]:
            lines.append(f"  not traceable: {note}")
    moe = [(n, m) for n, m in model.named_modules() if isinstance(m, QGaLoreExperts)]
    if moe:
        lines.append(f"MoE: {len(moe)} fused-experts modules, each expert matrix projected on its own "
                     f"({sum(m.num_experts for _, m in moe)} experts, e.g. {moe[0][0]}.gate_up.0)")
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
