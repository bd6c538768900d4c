"""`qgalore_fx.optimizer(model, lr=...)`: one real ``torch.optim.Optimizer`` for the whole model.

Two param groups:

``"qgalore"``
    the ``anchor`` of every projected layer. Its ``lr``, ``betas``, ``eps`` and
    ``weight_decay`` are the truth for every projected layer's update; the
    optimizer hands them to the layers as tensors (each layer's float64
    ``hparams`` buffer) whenever they change — a scheduler or a user writing
    ``group["lr"] = x`` writes through the group, a dict that mirrors those
    four keys on assignment. So any ``torch.optim.lr_scheduler`` drives the
    projected layers, without a host synchronization and without recompiling
    a compiled model. The update itself runs inside backward, unless it was
    deferred (``fused=False`` or ``accumulation_steps > 1``): then ``step()``
    applies the summed low-rank gradient.
``"adamw"``
    every other trainable parameter (embeddings, norms, biases, the output
    head unless projected), updated in ``step()`` by AdamW with 8-bit
    block-wise moments (``optim_bits=32`` for fp32 moments). With
    ``rest_in_backward=True`` each of them is updated inside backward instead,
    as soon as its gradient is complete, and its gradient is freed there (see
    :meth:`QGaLoreOptimizer._rest_hook`): the embedding's and the head's fp32
    gradients (0.5 GiB each at LLaMA-7B) then never coexist with each other or
    live until ``step()``.

One optimizer per model: building a second one for layers a live optimizer
already drives raises. A deep copy (or an unpickled copy) of a model is not
bound to any optimizer; it keeps the hyperparameters last handed to it until
``qgalore_fx.optimizer(copy)`` binds it.

Under FSDP2 (the model passed through ``fully_shard`` before the optimizer is built) each projected layer is
bound to its rank's shard (:func:`qgalore_fx.sharding.shard_layer`) and the AdamW group steps FSDP2's local
shards with moment blocks that do not depend on the world size (:func:`qgalore_fx.sharding.rest_layout`);
``state_dict()`` then holds global DTensors, for ``torch.distributed.checkpoint``.

Non-finite gradients never reach the weights, and nothing here synchronizes
with the device to find out: a projected layer selects its old state with
``torch.where`` (see :mod:`qgalore_fx.lowrank`), and ``step()`` masks the
AdamW group's update the same way when any of its gradients is non-finite.
Both are counted in ``skipped_updates`` (reading it synchronizes).
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import warnings
import weakref
import zlib
from typing import Dict, Iterable, List, Optional, Tuple

import torch
import torch.nn as nn
from torch import Tensor

from qgalore_fx import fused_rest, lowrank, sharding
from qgalore_fx.host_allocator import auto_mmap_threshold, check_mmap_threshold
from qgalore_fx.config import OPTIM_BITS
from qgalore_fx.kernels import all_finite
from qgalore_fx.kernels.adam8bit import AdamState, adamw_masked_
from qgalore_fx.kernels.quant import row_chunks
from qgalore_fx.layers import OptimizerLink, QGaLoreLinear
from qgalore_fx.rewrite import config_of, projected_layers

_MIRRORED = ("lr", "betas", "eps", "weight_decay")
_ANNOUNCED = False  # the notice of rest_in_backward=None turning it on: once per process


def _finite_number(value) -> bool:
    if isinstance(value, bool):
        return False
    if isinstance(value, torch.Tensor):  # read once, at construction
        return value.numel() == 1 and not value.is_complex() and math.isfinite(float(value))
    return isinstance(value, numbers.Real) and math.isfinite(float(value))


def _check_hparams(lr, betas, eps, weight_decay, lr_name: str = "lr") -> None:
    """Reject what would corrupt the weights at the first step; every message names the option."""
    if not _finite_number(lr) or not float(lr) >= 0:
        raise ValueError(f"{lr_name} must be a finite float >= 0, got {lr!r}")
    if not (isinstance(betas, (tuple, list)) and len(betas) == 2
            and all(_finite_number(b) and 0.0 <= float(b) < 1.0 for b in betas)):
        raise ValueError(f"betas must be a pair of floats in [0, 1), got {betas!r}")
    if not _finite_number(eps) or not float(eps) > 0:
        raise ValueError(f"eps must be a finite float > 0, got {eps!r}")
    if not _finite_number(weight_decay) or not float(weight_decay) >= 0:
        raise ValueError(f"weight_decay must be a finite float >= 0, got {weight_decay!r}")


class _LayerGroup(dict):
    """The projected layers' param group: assigning lr/betas/eps/weight_decay hands them to the layers."""

    def __init__(self, values: dict, optimizer: "QGaLoreOptimizer"):
        super().__init__(values)
        self._optimizer = weakref.ref(optimizer)  # no reference cycle: deleting the optimizer frees it at once

    def _changed(self) -> None:
        optimizer = self._optimizer()
        if optimizer is not None:
            optimizer._push_hparams()

    def __setitem__(self, key, value):
        super().__setitem__(key, value)
        if key in _MIRRORED:
            self._changed()

    def update(self, *args, **kwargs):
        super().update(*args, **kwargs)
        self._changed()

    def setdefault(self, key, default=None):
        value = super().setdefault(key, default)
        self._changed()
        return value

    def __reduce__(self):  # copies and pickles are plain dicts: the mirror belongs to the live optimizer
        return (dict, (dict(self),))


class QGaLoreOptimizer(torch.optim.Optimizer):
    def __init__(self, model: nn.Module, lr: float = 1e-3, betas: Tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.0, optim_bits: Optional[int] = None,
                 accumulation_steps: int = 1, process_group="auto", reduce: str = "lowrank",
                 rest_lr: Optional[float] = None, rest_in_backward: Optional[bool] = None):
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module transformed by qgalore_fx.transform(model, rank=...), "
                            f"got {type(model).__name__}")
        _check_hparams(lr, betas, eps, weight_decay)
        if rest_lr is not None:
            _check_hparams(rest_lr, betas, eps, weight_decay, lr_name="rest_lr")
        if reduce not in ("lowrank", "full"):
            raise ValueError(f"reduce must be 'lowrank' (all-reduce the rank-r gradient) or 'full' (all-reduce the "
                             f"full weight gradient), got {reduce!r}")
        self.process_group = _resolve_process_group(process_group)
        self.reduce = reduce
        if isinstance(accumulation_steps, bool) or not isinstance(accumulation_steps, int) or accumulation_steps < 1:
            raise ValueError(f"accumulation_steps must be an int >= 1, got {accumulation_steps!r}")
        sharding.check_not_fsdp1(model)
        layers = [(n, m) for n, m in projected_layers(model) if m.trainable]
        if not layers:
            raise ValueError("model has no projected layers: call qgalore_fx.transform(model, rank=...) first")
        for name, layer in layers:
            if layer.optimizer_link.get() is not None:
                raise ValueError(
                    f"layer {name!r} is already driven by another qgalore_fx optimizer: build one optimizer per "
                    "model (delete the old one first to replace it; a copy.deepcopy of the model is unbound)")
        config = config_of(model)
        if optim_bits is None:
            optim_bits = config.optim_bits if config is not None else 8
        if optim_bits not in OPTIM_BITS:
            raise ValueError(f"optim_bits must be 8 or 32, got {optim_bits!r}")
        self.optim_bits = optim_bits
        self.accumulation_steps = accumulation_steps
        self._layers: List[Tuple[str, QGaLoreLinear]] = layers
        anchors = [m.anchor for _, m in layers]
        anchor_ids = {id(a) for a in anchors}
        others = [p for p in model.parameters() if p.requires_grad and id(p) not in anchor_ids]
        self._param_names: Dict[int, str] = {id(p): n for n, p in model.named_parameters()}
        groups = [{"params": anchors, "name": "qgalore"}]
        if others:
            groups.append({"params": others, "name": "adamw", **({} if rest_lr is None else {"lr": rest_lr})})
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay)
        super().__init__(groups, defaults)
        self._skipped = torch.zeros((), dtype=torch.int64, device=sharding.local(anchors[0]).device)
        self._bind_layers()
        # FSDP2: the AdamW states exist from the start (torch.distributed.checkpoint's get_state_dict reads their
        # layout as the template a checkpoint loads into)
        self._mesh = sharding.mesh_of(p for g in self.param_groups[1:] for p in g["params"])
        if self._mesh is not None:
            for group in self.param_groups[1:]:
                for p in group["params"]:
                    self._adam_state_of(p)
        if rest_in_backward is not None and not isinstance(rest_in_backward, bool):
            raise TypeError(f"rest_in_backward must be True, False or None (on wherever it is valid), "
                            f"got {rest_in_backward!r}")
        fused = fused_rest.fused_weights(model)
        if rest_in_backward is None:
            rest_in_backward = self._rest_in_backward_by_default(fused, accumulation_steps)
        if rest_in_backward and accumulation_steps > 1:
            raise ValueError("rest_in_backward=True updates each parameter inside backward, which cannot sum "
                             f"gradients over micro-batches; use it with accumulation_steps=1 (got {accumulation_steps})")
        if rest_in_backward and self.process_group is not None:
            raise ValueError("rest_in_backward=True cannot run under torch.distributed: the update would use this "
                             "rank's gradient before DistributedDataParallel has averaged it")
        self.rest_in_backward = rest_in_backward
        self._rest_done: set = set()  # ids of parameters updated in the current backward (host-side)
        self._rest_bad = torch.zeros((), dtype=torch.bool, device=anchors[0].device)
        self._rest_hooks = []
        self._fused_modules: List[nn.Module] = []
        if rest_in_backward:
            for index, group in enumerate(self.param_groups[1:], start=1):
                for p in group["params"]:
                    module = fused.get(id(p))
                    if module is not None:
                        fused_rest.install(module, _FusedUpdate(self, p, index))
                        self._fused_modules.append(module)
                    else:
                        self._rest_hooks.append(p.register_post_accumulate_grad_hook(self._rest_hook(group)))

    def _rest_in_backward_by_default(self, fused: Dict[int, nn.Module], accumulation_steps: int) -> bool:
        """``rest_in_backward=None``: on where it pays and is valid, off with a one-line notice where it would pay
        but cannot run.

        It pays when a weight of the AdamW group is large enough for the row-chunked update
        (:func:`qgalore_fx.fused_rest.eligible`: an untied embedding or bias-free head of >= 4M elements, whose
        fp32 gradient would otherwise wait for ``step()`` whole); models without one keep ``step()``, where their
        small gradients cost little. It cannot run when the gradients are needed after backward: summed over
        micro-batches (``accumulation_steps > 1``) or averaged by torch.distributed (DDP, FSDP2). Gradient
        clipping cannot see parameters updated in backward either; the optimizer cannot tell whether a loop
        clips, so turning it on is announced once per process, naming ``rest_in_backward=False``.
        """
        if not fused:
            return False
        held = sum(sharding.local(module.weight).numel() * 4 for module in fused.values()) / 2 ** 20
        if accumulation_steps > 1 or self.process_group is not None or self._mesh is not None:
            why = (f"accumulation_steps={accumulation_steps} sums their gradients over micro-batches"
                   if accumulation_steps > 1 else "torch.distributed averages their gradients after backward")
            warnings.warn(f"qgalore_fx.optimizer: the embedding/head ({held:.0f} MiB of fp32 gradients) step in "
                          f"optimizer.step(), not inside backward: {why}", stacklevel=4)
            return False
        global _ANNOUNCED
        if not _ANNOUNCED:
            _ANNOUNCED = True
            warnings.warn(f"qgalore_fx.optimizer: embeddings, norms and head are updated inside backward (saves "
                          f"{held:.0f} MiB of fp32 gradients); gradient clipping cannot see them: pass "
                          "rest_in_backward=False to clip them", stacklevel=4)
        return True

    # ------------------------------------------------------------------ binding
    def _bind_layers(self) -> None:
        """Hand this optimizer's settings to its layers and mirror the projected group into their hparams."""
        group_name = "" if self.process_group is None else self.process_group.group_name
        defer = self.accumulation_steps > 1
        for name, layer in self._layers:  # every sharded layer checked before any is cut: all or nothing
            if sharding.is_dtensor(layer.weight_codes):
                sharding.check_layer(name, layer, layer.weight_codes.device_mesh.size())
        for name, layer in self._layers:
            layer.optimizer_link = OptimizerLink(self)
            sharded = sharding.shard_layer(name, layer)  # FSDP2: its reduction runs over the shard group instead
            layer_group = "" if sharded else group_name
            if layer.spec.group != layer_group:
                layer.set_spec(dataclasses.replace(layer.spec, group=layer_group))
            layer.set_deferred(defer or not layer.spec.fused)
            layer.control[lowrank.REDUCE] = float(self.reduce == "full")
            device = sharding.local(layer.weight_codes).device
            if layer.hparams.numel() != len(lowrank.HPARAMS):
                layer.hparams = torch.zeros(len(lowrank.HPARAMS), dtype=torch.float64, device=device)
        self.param_groups[0] = _LayerGroup(self.param_groups[0], self)
        self._push_hparams()

    def _push_hparams(self) -> None:
        """Copy the projected group's hyperparameters into every layer's ``hparams`` (no host sync)."""
        group = self.param_groups[0]
        beta1, beta2 = group["betas"]
        values = [group["lr"], beta1, beta2, group["eps"], group["weight_decay"]]
        src = torch.stack([torch.as_tensor(v, dtype=torch.float64).reshape(()).cpu() for v in values])
        by_device: Dict[torch.device, List[Tensor]] = {}
        for _, layer in self._layers:
            by_device.setdefault(layer.hparams.device, []).append(layer.hparams)
        for device, targets in by_device.items():
            on_device = src.to(device, non_blocking=True)
            torch._foreach_copy_(targets, [on_device] * len(targets))

    # ------------------------------------------------------------------ reading
    @property
    def skipped_updates(self) -> int:
        """Updates skipped because of non-finite values: projected layers + AdamW steps (synchronizes)."""
        return int(self._skipped) + sum(int(layer.skipped) for _, layer in self._layers)

    @property
    def skipped_steps(self) -> int:
        """AdamW-group steps skipped because of non-finite gradients (synchronizes)."""
        return int(self._skipped)

    @property
    def comm_bytes(self) -> int:
        """Bytes the projected layers all-reduced or broadcast so far (0 without a process group)."""
        return sum(int(layer.control[lowrank.COMM_BYTES]) for _, layer in self._layers)

    def layer_stats(self) -> Dict[str, dict]:
        """Per projected layer: step, refresh count, current interval, last similarity, skips."""
        return {name: layer.stats() for name, layer in self._layers}

    # ------------------------------------------------------------------ step
    def _rest_hook(self, group: dict):
        """The post-accumulate-grad hook of one AdamW-group parameter under ``rest_in_backward=True``.

        It runs the same masked 8-bit AdamW step ``step()`` would, with the group's hyperparameters as they are
        now (a scheduler steps between iterations, so they are this step's), then frees the gradient. What
        differs from ``step()``: a non-finite gradient skips only that parameter's update (``step()`` skips the
        whole group's, which needs every gradient first); the step still counts once in ``skipped_steps``.
        Gradient clipping cannot see these parameters (their gradients are gone by ``step()``), and a second
        gradient before ``step()`` (accumulation, or a parameter reached by two backward passes) is refused.
        """
        weak_self = weakref.ref(self)

        @torch.no_grad()
        def hook(p: Tensor) -> None:
            optimizer = weak_self()
            if optimizer is None or p.grad is None:
                return
            optimizer._mark_rest_done(p)
            if optimizer._hparams_invalid(group):
                optimizer._rest_bad.fill_(True)
                p.grad = None
                return
            ok = all_finite(p.grad)
            optimizer._adamw_one(p, group, ok)
            optimizer._rest_bad.logical_or_(~ok)
            p.grad = None

        return hook

    def _mark_rest_done(self, p: Tensor) -> None:
        if id(p) in self._rest_done:
            name = self._param_names.get(id(p), "a parameter")
            raise RuntimeError(
                f"{name!r} received a second gradient before optimizer.step() while rest_in_backward=True (its "
                "update runs inside backward); call optimizer.step() between backward() calls, or build the "
                "optimizer with rest_in_backward=False and accumulation_steps=k to accumulate")
        self._rest_done.add(id(p))

    @torch.no_grad()
    def _fused_update(self, p: Tensor, group: dict, grad_rows, ok: Tensor) -> None:
        """The update of an embedding or head weight from its own backward (:mod:`qgalore_fx.fused_rest`): the
        same masked AdamW as the hook's, over row chunks whose gradient ``grad_rows(start, stop)`` computes."""
        self._mark_rest_done(p)
        if self._hparams_invalid(group):
            self._rest_bad.fill_(True)
            return
        state = self._adam_state_of(p)
        beta1, beta2 = group["betas"]
        _masked_adamw_rows_(p, grad_rows, state["adam"], state["step"], ok, lr=group["lr"], beta1=beta1,
                            beta2=beta2, eps=group["eps"], weight_decay=group["weight_decay"], stream=self._stream(p))
        self._rest_bad.logical_or_(~ok)

    def _stream(self, p: Tensor) -> int:
        """The stream of a bf16 parameter's stochastic rounding: a hash of its name, so that no two parameters
        draw the same noise at the same step."""
        return zlib.crc32(self._param_names.get(id(p), "").encode())

    def _adam_state_of(self, p: Tensor) -> dict:
        state = self.state[p]
        if not state:
            device = sharding.local(p).device
            state["step"] = torch.zeros((), dtype=torch.int64, device=device)
            layout = sharding.rest_layout(p, self.optim_bits)
            shape = sharding.local(p).shape if layout == "local" else p.shape
            state["adam"] = AdamState.zeros(shape, bits=sharding.state_bits(p, self.optim_bits), device=device,
                                            min_8bit_size=0)
        return state

    @staticmethod
    def _hparams_invalid(group: dict) -> bool:
        beta1, beta2 = group["betas"]
        return not all(_finite_number(group[k]) for k in ("lr", "eps", "weight_decay")) \
            or not (_finite_number(beta1) and _finite_number(beta2))

    def _adamw_one(self, p: Tensor, group: dict, ok: Tensor) -> None:
        state = self._adam_state_of(p)
        beta1, beta2 = group["betas"]
        hp = dict(lr=group["lr"], beta1=beta1, beta2=beta2, eps=group["eps"], weight_decay=group["weight_decay"],
                  stream=self._stream(p))
        if sharding.rest_layout(p, self.optim_bits) == "full":  # FSDP2, a shard that is not whole moment blocks
            full = p.full_tensor()
            _masked_adamw_(full, p.grad.full_tensor(), state["adam"], state["step"], ok, **hp)
            p.to_local().copy_(full[sharding.rows_of(p)])
            return
        base = 0
        if sharding.is_dtensor(p):  # "local": this rank's rows; the rounding draws index the whole parameter
            base = sharding.rows_of(p).start * (p.numel() // max(p.shape[0], 1))
        _masked_adamw_(sharding.local(p), sharding.local(p.grad), state["adam"], state["step"], ok, base=base, **hp)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for _, layer in self._layers:
            layer.apply_pending()
            layer.bind_shards()  # FSDP2: follow its shard storage should anything have replaced it
        if self.rest_in_backward and self._rest_done:
            self._skipped.add_(self._rest_bad.to(torch.int64).to(self._skipped.device))
            self._rest_bad.fill_(False)
            self._rest_done.clear()
        for group in self.param_groups[1:]:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            if self._hparams_invalid(group):
                self._skipped.add_(1)  # e.g. a scheduler wrote NaN: skip the group's step, counted like a bad grad
                continue
            ok = torch.stack([all_finite(sharding.local(p.grad)) for p in params]).all()
            if self._mesh is not None:  # FSDP2: every rank holds part of the gradients; all skip alike
                ok = sharding.agree(ok, self._mesh)
            for p in params:
                self._adamw_one(p, group, ok)
            self._skipped.add_((~ok).to(torch.int64).to(self._skipped.device))
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Drop the micro-batches since the last ``step()``, for every parameter.

        The AdamW group's gradients are reset as ``torch.optim.Optimizer.zero_grad`` does; each projected
        layer that defers its update forgets its accumulated low-rank gradient (a poisoned one too) and undoes a
        refresh those micro-batches made (:func:`qgalore_fx.lowrank.drop_pending_`), so the next step is the
        step of a run that never saw them. A projected layer that updates inside backward has applied its
        micro-batch already; there is nothing pending to drop.
        """
        super().zero_grad(set_to_none=set_to_none)
        for _, layer in self._layers:
            layer.drop_pending()

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict:
        """Plain tensors and JSON-safe values only (no pickled objects), loadable by load_state_dict.

        The projected layers' own state (projections, moments, schedules) is the model's: it is in
        ``model.state_dict()``.
        """
        index = {}
        groups = []
        for group in self.param_groups:
            packed = {k: v for k, v in group.items() if k != "params"}
            packed["params"] = []
            for p in group["params"]:
                index.setdefault(id(p), len(index))
                packed["params"].append(index[id(p)])
            groups.append(packed)
        state = {}
        for p, s in self.state.items():
            if s:
                adam = s["adam"].state_dict()
                if sharding.rest_layout(p, self.optim_bits) == "local":  # FSDP2: global DTensors, for DCP
                    adam = sharding.global_adam_state(p, adam)
                state[index[id(p)]] = {"step": s["step"], "adam": adam}
        # Each projected layer's own state is in model.state_dict(); its anchor's entry only mirrors how many
        # updates the layer applied, so that torch.distributed.checkpoint finds a state for every trainable
        # parameter. Loading ignores it.
        for _, layer in self._layers:
            if id(layer.anchor) in index:
                state[index[id(layer.anchor)]] = {"step": layer.step}
        return {"state": state, "param_groups": groups, "skipped_steps": self._skipped,
                "accumulation_steps": self.accumulation_steps}

    def load_state_dict(self, state_dict: dict) -> None:
        groups = state_dict["param_groups"]
        if len(groups) != len(self.param_groups) or any(
                len(g["params"]) != len(s["params"]) for g, s in zip(groups, self.param_groups)):
            raise ValueError("optimizer state_dict has a different parameter layout than this optimizer "
                             "(different model or options)")
        if "qgalore_layers" in state_dict:
            raise ValueError("optimizer state_dict holds per-layer state in the optimizer (an older layout); the "
                             "projected layers' state now lives in model.state_dict()")
        accumulation_steps = int(state_dict.get("accumulation_steps", self.accumulation_steps))
        if accumulation_steps != self.accumulation_steps:
            raise ValueError(f"optimizer state_dict was saved with accumulation_steps={accumulation_steps}, this "
                             f"optimizer has {self.accumulation_steps}; build it with the same value")
        by_index = {}
        for group, saved in zip(self.param_groups, groups):
            for p, i in zip(group["params"], saved["params"]):
                by_index[i] = p
        new_state = {}
        anchors = {id(layer.anchor) for _, layer in self._layers}
        for i, s in state_dict["state"].items():
            p = by_index[i if i in by_index else int(i)]  # ids by position: ints, or names (torch.distributed.checkpoint)
            if id(p) in anchors:  # the layer's state comes with the model's state dict
                continue
            layout = sharding.rest_layout(p, self.optim_bits)
            saved = sharding.local_adam_state(p, s["adam"]) if layout == "local" else \
                {k: sharding.full(v) for k, v in s["adam"].items()}
            adam = AdamState.from_state_dict(saved).to(sharding.local(p).device)
            if adam.shape != (sharding.local(p).shape if layout == "local" else p.shape):
                raise ValueError(f"optimizer state of {self._param_names.get(id(p), i)!r} has shape "
                                 f"{tuple(adam.shape)}, the parameter {tuple(p.shape)}")
            step = torch.as_tensor(sharding.full(s["step"]), dtype=torch.int64).to(
                sharding.local(p).device).reshape(()).clone()  # never aliases
            new_state[p] = {"step": step, "adam": adam}
        for group, saved in zip(self.param_groups, groups):
            for key, value in saved.items():
                if key != "params":
                    dict.__setitem__(group, key, tuple(value) if key == "betas" else value)
        self.state.clear()
        self.state.update(new_state)
        self._skipped = torch.as_tensor(state_dict.get("skipped_steps", 0), dtype=torch.int64).clone().to(
            self._skipped.device).reshape(())
        self._push_hparams()

    def state_nbytes(self) -> Dict[str, int]:
        """Bytes of optimizer-side tensors: projections, low-rank moments, AdamW moments, accumulators."""
        out = {"projections": 0, "lowrank_optimizer_state": 0, "adamw_optimizer_state": 0, "accumulators": 0}
        for _, layer in self._layers:
            b = layer.state_nbytes()
            out["projections"] += b["projection"]
            out["lowrank_optimizer_state"] += b["optimizer_state"]
            out["accumulators"] += b["accumulator"]
        for s in self.state.values():
            if s:
                out["adamw_optimizer_state"] += s["adam"].nbytes + s["step"].numel() * s["step"].element_size()
        return out


#: Elements of an unprojected parameter updated at a time: the fp32 temporaries of 8-bit AdamW (dequantized
#: moments, the gradient, the update) stay a few MiB instead of several copies of a 32000 x 4096 embedding.
ADAMW_CHUNK = 1 << 20


@torch.no_grad()
def _masked_adamw_(p: Tensor, grad: Tensor, state: AdamState, step: Tensor, ok: Tensor, lr: float, beta1: float,
                   beta2: float, eps: float, weight_decay: float, base: int = 0, stream: int = 0) -> None:
    """AdamW on ``p`` that changes nothing where ``ok`` (a 0-d bool tensor) is False; no host sync.

    :func:`qgalore_fx.kernels.adam8bit.adamw_masked_` (the fused 8-bit step where it is available, else the torch
    reference) run over chunks of whole moment blocks (:data:`ADAMW_CHUNK` elements), each a view into the
    parameter and its state. ``base``: the index of ``p``'s first element in the whole parameter (FSDP2's shard).
    A bf16 ``p`` is updated in fp32 a chunk at a time and written back by
    :func:`qgalore_fx.fused_rest.round_bf16_` (stochastic rounding, the draws of ``stream`` at ``step``): rounded
    to nearest, an update below bf16's resolution (2^-8 of a norm weight near 1, about 4e-3, against Adam's
    lr-sized steps) would be lost every time.
    """
    if p.numel() == 0:
        return
    g = grad.reshape(-1)
    t = step + 1
    bs = state.block_size
    chunk = max(bs, ADAMW_CHUNK // bs * bs)
    bf16 = p.dtype == torch.bfloat16
    # in place: p's own memory, chunk by chunk (a bf16 chunk widened to fp32 and rounded back); else an fp32 copy
    in_place = p.is_contiguous() and p.dtype in (torch.float32, torch.bfloat16)
    flat = p.view(-1) if in_place else p.float().contiguous().view(-1)
    for start in range(0, flat.numel(), chunk):
        stop = min(flat.numel(), start + chunk)
        part = flat[start:stop].float() if in_place and bf16 else flat[start:stop]
        adamw_masked_(part, g[start:stop], state.part(start, stop), t, ok, lr, beta1, beta2, eps,
                      weight_decay, offset=base + start)
        if in_place and bf16:
            fused_rest.round_bf16_(flat[start:stop], part, step, stream, offset=base + start)
    if not in_place and bf16:
        rounded = torch.empty(p.shape, dtype=p.dtype, device=p.device)
        fused_rest.round_bf16_(rounded, flat, step, stream, offset=base)
        p.copy_(rounded)
    elif not in_place:
        p.copy_(flat.view(p.shape))
    step.add_(ok.to(torch.int64))


@torch.no_grad()
def _masked_adamw_rows_(p: Tensor, grad_rows, state: AdamState, step: Tensor, ok: Tensor, lr: float, beta1: float,
                        beta2: float, eps: float, weight_decay: float, stream: int = 0) -> None:
    """:func:`_masked_adamw_` for a contiguous 2-D ``p`` whose gradient is never whole: chunks of whole rows
    (about :data:`ADAMW_CHUNK` elements, starting on moment-block boundaries), each chunk's gradient rows from
    ``grad_rows(first_row, stop_row)`` just before they are used. A bf16 ``p`` is updated in fp32 a chunk at a
    time and written back by :func:`qgalore_fx.fused_rest.round_bf16_`, its draws those of ``stream`` at ``step``."""
    rows, cols = p.shape
    flat = p.view(-1)
    t = step + 1
    for first, last in row_chunks(rows, cols, state.block_size, ADAMW_CHUNK):  # whole moment blocks
        start, stop = first * cols, last * cols
        p32 = flat[start:stop] if p.dtype == torch.float32 else flat[start:stop].float()
        adamw_masked_(p32, grad_rows(first, last).reshape(-1), state.part(start, stop), t, ok, lr, beta1, beta2, eps,
                      weight_decay, offset=start)
        if p.dtype != torch.float32:
            fused_rest.round_bf16_(flat[start:stop], p32, step, stream, offset=start)
    step.add_(ok.to(torch.int64))


class _FusedUpdate:
    """What a fused embedding/head backward calls: the optimizer's update of one parameter (held weakly)."""

    def __init__(self, optimizer: "QGaLoreOptimizer", param: Tensor, group_index: int):
        self._optimizer = weakref.ref(optimizer)
        self._param = param
        self._group_index = group_index

    def alive(self) -> bool:
        return self._optimizer() is not None

    def __call__(self, grad_rows, ok: Tensor) -> None:
        optimizer = self._optimizer()
        if optimizer is not None:
            optimizer._fused_update(self._param, optimizer.param_groups[self._group_index], grad_rows, ok)


def _resolve_process_group(process_group):
    if process_group is None:
        return None
    import torch.distributed as dist

    if isinstance(process_group, str):
        if process_group != "auto":
            raise ValueError(f"process_group must be 'auto', None or a torch.distributed ProcessGroup, "
                             f"got {process_group!r}")
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            return dist.group.WORLD
        return None
    if not (dist.is_available() and isinstance(process_group, dist.ProcessGroup)):
        raise TypeError(f"process_group must be 'auto', None or a torch.distributed ProcessGroup, "
                        f"got {type(process_group).__name__}")
    return process_group


def optimizer(model: nn.Module, lr: float = 1e-3, betas: Iterable[float] = (0.9, 0.999), eps: float = 1e-8,
              weight_decay: float = 0.0, optim_bits: Optional[int] = None, accumulation_steps: int = 1,
              process_group="auto", reduce: str = "lowrank", rest_lr: Optional[float] = None,
              rest_in_backward: Optional[bool] = None, mmap_threshold: Optional[bool] = None) -> QGaLoreOptimizer:
    """The optimizer for a transformed model (see module docstring).

    ``lr`` drives the projected layers; ``rest_lr`` (default: ``lr``) the AdamW group of everything else —
    low-rank updates usually take a larger learning rate than embeddings and norms tolerate.

    Under ``torch.distributed`` (e.g. with the model wrapped in ``DistributedDataParallel``), each projected layer
    averages its gradient across ``process_group`` ("auto": the default group when more than one process runs)
    before its update: ``reduce="lowrank"`` all-reduces the rank-r gradient R (and the full G only on refresh
    steps, whose projection rank 0 then broadcasts), ``"full"`` all-reduces G every step.

    ``rest_in_backward=True`` updates every other parameter inside backward too, as soon as its gradient is
    complete, and frees that gradient at once (no accumulation, no torch.distributed, no clipping of those
    parameters; see :meth:`QGaLoreOptimizer._rest_hook`): the memory of the embedding's and head's gradients
    is then one tensor at a time instead of all of them until ``step()``. The default, ``None``, turns it on
    when the model has an embedding or head large enough to matter and nothing needs the gradients after
    backward (:meth:`QGaLoreOptimizer._rest_in_backward_by_default`); ``False`` keeps every update of that
    group in ``step()``.

    ``mmap_threshold`` (CPU, Linux with glibc): True returns freed blocks of 1 MiB and more to the OS at once
    (process-wide, :func:`qgalore_fx.host_allocator.set_cpu_mmap_threshold`), False leaves the allocator as it is.
    The default, ``None``, sets it for a model holding 4 GiB or more on the CPU, where it lowers the peak and the
    step time (LLaMA-7B: 2.4 GiB lower), and says so once (a build of such a model on ``meta`` has already set it
    before materializing); smaller models keep glibc's policy, ``QGALORE_FX_MMAP_THRESHOLD=0`` keeps it always
    (docs/host-memory.md).
    """
    if isinstance(betas, Iterable) and not isinstance(betas, (str, bytes)):
        betas = tuple(betas)  # any iterable pair; anything else is refused by name, as a bad pair is
    check_mmap_threshold(mmap_threshold)  # before the optimizer binds the layers
    opt = QGaLoreOptimizer(model, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                            optim_bits=optim_bits, accumulation_steps=accumulation_steps,
                            process_group=process_group, reduce=reduce, rest_lr=rest_lr,
                            rest_in_backward=rest_in_backward)
    auto_mmap_threshold(model, mmap_threshold)
    return opt
