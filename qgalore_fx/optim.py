"""`qgalore_fx.optimizer(model, lr=...)`: one real ``torch.optim.Optimizer`` for the whole model.

Two param groups:

``"qgalore"``
    the ``anchor`` of every projected layer. Its ``lr``, ``betas``, ``eps`` and
    ``weight_decay`` are read by each layer's update *when it runs* (inside
    backward, or at ``step()`` in deferred mode), so any
    ``torch.optim.lr_scheduler`` drives projected layers unchanged. The
    update itself does not happen in ``step()`` unless it was deferred
    (``fused=False`` or ``accumulation_steps > 1``): then ``step()`` applies the
    summed low-rank gradient.
``"adamw"``
    every other trainable parameter (embeddings, norms, biases, the output
    head unless projected), updated in ``step()`` by AdamW with 8-bit
    block-wise moments (``optim_bits=32`` for fp32 moments).

Non-finite gradients never reach the weights: a projected layer skips its
update (see :mod:`qgalore_fx.lowrank`), and ``step()`` skips the AdamW group
for that step when any of its gradients is non-finite. Both are counted in
``skipped_updates``.
"""

from __future__ import annotations

from typing import Dict, Iterable, List, Optional, Tuple

import torch
import torch.nn as nn

from qgalore_fx.kernels.adam8bit import AdamState, adamw_step_
from qgalore_fx.layers import QGaLoreLinear
from qgalore_fx.rewrite import config_of, projected_layers


def _check_hparams(lr, betas, eps, weight_decay) -> None:
    if isinstance(lr, bool) or not isinstance(lr, (int, float, torch.Tensor)) or not float(lr) >= 0:
        raise ValueError(f"lr must be a non-negative float, got {lr!r}")
    if not (isinstance(betas, (tuple, list)) and len(betas) == 2 and all(0.0 <= float(b) < 1.0 for b in betas)):
        raise ValueError(f"betas must be a pair of floats in [0, 1), got {betas!r}")
    if not float(eps) > 0:
        raise ValueError(f"eps must be > 0, got {eps!r}")
    if not float(weight_decay) >= 0:
        raise ValueError(f"weight_decay must be >= 0, got {weight_decay!r}")


class QGaLoreOptimizer(torch.optim.Optimizer):
    def __init__(self, model: nn.Module, lr: float = 1e-3, betas: Tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.0, optim_bits: Optional[int] = None,
                 accumulation_steps: int = 1, process_group="auto", reduce: str = "lowrank",
                 rest_lr: Optional[float] = None):
        _check_hparams(lr, betas, eps, weight_decay)
        if rest_lr is not None:
            _check_hparams(rest_lr, betas, eps, weight_decay)
        if reduce not in ("lowrank", "full"):
            raise ValueError(f"reduce must be 'lowrank' (all-reduce the rank-r gradient) or 'full' (all-reduce the "
                             f"full weight gradient), got {reduce!r}")
        self.process_group = _resolve_process_group(process_group)
        self.reduce = reduce
        if isinstance(accumulation_steps, bool) or not isinstance(accumulation_steps, int) or accumulation_steps < 1:
            raise ValueError(f"accumulation_steps must be an int >= 1, got {accumulation_steps!r}")
        layers = [(n, m) for n, m in projected_layers(model) if m.lowrank is not None]
        if not layers:
            raise ValueError("model has no projected layers: call qgalore_fx.transform(model, rank=...) first")
        config = config_of(model)
        if optim_bits is None:
            optim_bits = config.optim_bits if config is not None else 8
        if optim_bits not in (8, 32):
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
        self.skipped_steps = 0
        self._link_layers()

    def _link_layers(self) -> None:
        group = self.param_groups[0]
        for _, layer in self._layers:
            layer.lowrank.group = group
            layer.lowrank.process_group = self.process_group
            layer.lowrank.reduce = self.reduce
            layer.lowrank.defer = (not layer.lowrank.config.fused) or self.accumulation_steps > 1

    @property
    def skipped_updates(self) -> int:
        """Updates skipped because of non-finite gradients: projected layers + AdamW steps."""
        return self.skipped_steps + sum(layer.lowrank.skipped_updates for _, layer in self._layers)

    @property
    def comm_bytes(self) -> int:
        """Bytes the projected layers all-reduced or broadcast so far (0 without a process group)."""
        return sum(layer.lowrank.comm_bytes for _, layer in self._layers)

    def layer_stats(self) -> Dict[str, dict]:
        """Per projected layer: step, refresh count, current interval, last similarity, skips."""
        return {name: layer.lowrank.stats() for name, layer in self._layers}

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for _, layer in self._layers:
            layer.lowrank.apply_pending(layer.weight_codes, layer.weight_scales)
        for group in self.param_groups[1:]:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            finite = torch.stack([torch.isfinite(p.grad).all() for p in params]).all()
            if not bool(finite):
                self.skipped_steps += 1
                continue
            beta1, beta2 = group["betas"]
            for p in params:
                state = self.state[p]
                if not state:
                    state["step"] = 0
                    state["adam"] = AdamState.zeros(p.shape, bits=self.optim_bits, device=p.device)
                state["step"] += 1
                adamw_step_(p, p.grad, state["adam"], state["step"], lr=group["lr"], beta1=beta1, beta2=beta2,
                            eps=group["eps"], weight_decay=group["weight_decay"])
        return loss

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict:
        """Plain tensors and JSON-safe values only (no pickled objects), loadable by load_state_dict."""
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
                state[index[id(p)]] = {"step": s["step"], "adam": s["adam"].state_dict()}
        layers = {name: layer.lowrank.state_dict() for name, layer in self._layers}
        return {"state": state, "param_groups": groups, "qgalore_layers": layers,
                "skipped_steps": self.skipped_steps, "accumulation_steps": self.accumulation_steps}

    def load_state_dict(self, state_dict: dict) -> None:
        groups = state_dict["param_groups"]
        if len(groups) != len(self.param_groups) or any(
                len(g["params"]) != len(s["params"]) for g, s in zip(groups, self.param_groups)):
            raise ValueError("optimizer state_dict has a different parameter layout than this optimizer "
                             "(different model or options)")
        layers = state_dict["qgalore_layers"]
        names = [n for n, _ in self._layers]
        if sorted(layers) != sorted(names):
            missing = sorted(set(names) - set(layers))[:3]
            extra = sorted(set(layers) - set(names))[:3]
            raise ValueError(f"optimizer state_dict's projected layers differ from the model's: missing {missing}, "
                             f"unexpected {extra}")
        for name, layer in self._layers:  # validate everything before changing anything
            layer.lowrank.check_state_dict(layers[name])
        by_index = {}
        for group, saved in zip(self.param_groups, groups):
            for p, i in zip(group["params"], saved["params"]):
                by_index[i] = p
            for key, value in saved.items():
                if key != "params":
                    group[key] = tuple(value) if key == "betas" else value
        self.state.clear()
        for i, s in state_dict["state"].items():
            p = by_index[int(i)]
            adam = AdamState.from_state_dict(s["adam"]).to(p.device)
            self.state[p] = {"step": int(s["step"]), "adam": adam}
        for name, layer in self._layers:
            layer.lowrank.load_state_dict(layers[name])
            layer.lowrank.to(layer.weight_codes.device)
        self.skipped_steps = int(state_dict.get("skipped_steps", 0))
        self.accumulation_steps = int(state_dict.get("accumulation_steps", self.accumulation_steps))
        self._link_layers()

    def state_nbytes(self) -> Dict[str, int]:
        """Bytes of optimizer-side tensors: projections, low-rank moments, AdamW moments, accumulators."""
        out = {"projections": 0, "lowrank_optimizer_state": 0, "adamw_optimizer_state": 0, "accumulators": 0}
        for _, layer in self._layers:
            b = layer.lowrank.nbytes()
            out["projections"] += b["projection"]
            out["lowrank_optimizer_state"] += b["optimizer_state"]
            out["accumulators"] += b["accumulator"]
        for s in self.state.values():
            if s:
                out["adamw_optimizer_state"] += s["adam"].nbytes
        return out


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
              process_group="auto", reduce: str = "lowrank", rest_lr: Optional[float] = None) -> QGaLoreOptimizer:
    """The optimizer for a transformed model (see module docstring).

    ``lr`` drives the projected layers; ``rest_lr`` (default: ``lr``) the AdamW group of everything else —
    low-rank updates usually take a larger learning rate than embeddings and norms tolerate.

    Under ``torch.distributed`` (e.g. with the model wrapped in ``DistributedDataParallel``), each projected layer
    averages its gradient across ``process_group`` ("auto": the default group when more than one process runs)
    before its update: ``reduce="lowrank"`` all-reduces the rank-r gradient R (and the full G only on refresh
    steps, whose projection rank 0 then broadcasts), ``"full"`` all-reduces G every step.
    """
    return QGaLoreOptimizer(model, lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay,
                            optim_bits=optim_bits, accumulation_steps=accumulation_steps,
                            process_group=process_group, reduce=reduce, rest_lr=rest_lr)
