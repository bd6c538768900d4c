"""Fused mixture-of-experts weights (transformers 5.x layout), projected per expert.

transformers 5.x stores the experts of Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE, ... as one
module with two 3-D parameters::

    gate_up_proj  [E, 2 * I, H]     expert e computes  gate, up = (x @ gate_up_proj[e].T).chunk(2)
    down_proj     [E, H, I]                            y = (act(gate) * up) @ down_proj[e].T

and a forward ``(hidden_states, top_k_index, top_k_weights)`` that routes each token to its
top-k experts. Each ``gate_up_proj[e]`` and ``down_proj[e]`` is an ordinary linear weight, so
:func:`qgalore_fx.transform` stores each as a :class:`~qgalore_fx.layers.QGaLoreLinear` (INT8 codes,
its own projection, moments and lazy-refresh schedule) inside a :class:`QGaLoreExperts` that
replaces the fused module and routes exactly as the eager transformers forward does. Everything
that works for a projected linear (the optimizer, ``state_dict``, checkpoints, ``explain``,
``memory_report``, accumulation, freezing) then works per expert. The state-dict keys become
``...experts.gate_up.{e}.weight_codes`` etc.; :func:`qgalore_fx.export_dense` writes the fused
parameters back under their original names, so ``from_pretrained`` of the original class loads the
export.

Which experts update in a step. With one process, an expert that receives no token in a step runs
no backward, so it takes no update (its refresh clock, which counts update attempts, does not move
either: a refresh always sees a real gradient). That differs from AdamW on the fused parameter,
where an idle expert's zero gradient still moves it by its momentum; for Q-GaLore the choice is
between momentum drift and an update computed from nothing, and skipping is the cheaper and, for a
projection refresh, the meaningful one. Under ``torch.distributed`` (more than one process) every
expert runs every step, on an empty batch when it has no token, because each projected layer
all-reduces its low-rank gradient inside backward and all ranks must make the same calls.

Supported layout: the concatenated ``[gate; up]`` layout, not transposed, no biases, no post-expert
norm, with the default gating (``transformers.integrations.moe.use_experts_implementation``'s
``is_concatenated=True, is_transposed=False, has_bias=False, has_gate=True``). A fused-experts
module of another layout is left as it is, trained by the AdamW group, and listed by ``explain()``.
Routing follows transformers' eager experts implementation whatever ``config._experts_implementation``
says (grouped matmuls need the fused tensors this module no longer has).
"""

from __future__ import annotations

import copy
import inspect
from typing import Callable, Dict, List, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from qgalore_fx.layers import QGaLoreLinear

__all__ = ["QGaLoreExperts", "experts_layout_problem", "is_fused_experts"]

_FORWARD_ARGS = ["hidden_states", "top_k_index", "top_k_weights"]


def is_fused_experts(module: nn.Module) -> bool:
    """Whether ``module`` keeps MoE experts as 3-D ``gate_up_proj`` / ``down_proj`` parameters."""
    gate_up, down = getattr(module, "gate_up_proj", None), getattr(module, "down_proj", None)
    return (isinstance(gate_up, nn.Parameter) and isinstance(down, nn.Parameter)
            and gate_up.dim() == 3 and down.dim() == 3)


def experts_layout_problem(module: nn.Module) -> Optional[str]:
    """None if :class:`QGaLoreExperts` can replace this fused-experts module, else why not."""
    gate_up, down = module.gate_up_proj, module.down_proj
    flags = {"is_transposed": False, "has_bias": False, "has_gate": True, "is_concatenated": True,
             "has_post_expert_norm": False}
    for flag, wanted in flags.items():
        if bool(getattr(module, flag, wanted)) != wanted:
            return f"fused experts with {flag}={not wanted}"
    e, two_i, h = gate_up.shape
    if down.shape != (e, h, two_i // 2) or two_i % 2:
        return f"fused experts of shapes {tuple(gate_up.shape)} / {tuple(down.shape)}, expected [E, 2I, H] / [E, H, I]"
    if not callable(getattr(module, "act_fn", None)):
        return "fused experts without an act_fn"
    try:
        params = list(inspect.signature(type(module).forward).parameters)[1:]
    except (TypeError, ValueError):
        return "fused experts whose forward signature cannot be read"
    if params != _FORWARD_ARGS:
        return f"fused experts whose forward takes {params}, expected {_FORWARD_ARGS}"
    return None


def _distributed() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _gate(shell: nn.Module, gate_up_out: Tensor) -> Tensor:
    apply_gate = getattr(shell, "_apply_gate", None)
    if callable(apply_gate):
        return apply_gate(gate_up_out)
    gate, up = gate_up_out.chunk(2, dim=-1)
    return shell.act_fn(gate) * up


class QGaLoreExperts(nn.Module):
    """A fused-experts module whose expert matrices are :class:`QGaLoreLinear` layers (module docstring).

    ``gate_up[e]`` is expert e's ``[2I, H]`` linear, ``down[e]`` its ``[H, I]`` one. The original module is
    kept, with its 3-D parameters on the ``meta`` device, outside the module tree (so it is in no state
    dict): it supplies the activation and gating, and the type and constructor arguments for export.
    """

    def __init__(self, gate_up: List[QGaLoreLinear], down: List[QGaLoreLinear], shell: nn.Module):
        super().__init__()
        if len(gate_up) != len(down) or not gate_up:
            raise ValueError(f"need one gate_up and one down linear per expert, got {len(gate_up)} and {len(down)}")
        self.gate_up = nn.ModuleList(gate_up)
        self.down = nn.ModuleList(down)
        self.num_experts = len(gate_up)
        object.__setattr__(self, "_shell", shell)

    @property
    def source_type(self) -> str:
        cls = type(self._shell)
        return f"{cls.__module__}.{cls.__qualname__}"

    @classmethod
    def from_module(cls, module: nn.Module, build: Callable[[int, str, Tensor], QGaLoreLinear],
                    weights: Optional[Tuple[Tensor, Tensor]] = None) -> "QGaLoreExperts":
        """Replace a fused-experts ``module``: ``build(expert, "gate_up"|"down", weight) -> QGaLoreLinear``.

        ``weights`` (the two 3-D tensors) replaces the module's own, e.g. when it lives on the meta device.
        The module itself becomes the meta shell; its float weights are released.
        """
        gate_up_w, down_w = weights if weights is not None else (module.gate_up_proj.detach(),
                                                                 module.down_proj.detach())
        frozen = not module.gate_up_proj.requires_grad, not module.down_proj.requires_grad
        gate_up, down = [], []
        for e in range(gate_up_w.shape[0]):
            for kind, w, out, is_frozen in (("gate_up", gate_up_w, gate_up, frozen[0]),
                                            ("down", down_w, down, frozen[1])):
                layer = build(e, kind, w[e])
                if is_frozen:
                    layer.requires_grad_(False)
                out.append(layer)
        for name in ("gate_up_proj", "down_proj"):
            p = getattr(module, name)
            module._parameters[name] = nn.Parameter(torch.empty(p.shape, dtype=p.dtype, device="meta"),
                                                    requires_grad=p.requires_grad)
        return cls(gate_up, down, module)

    def forward(self, hidden_states: Tensor, top_k_index: Tensor, top_k_weights: Tensor) -> Tensor:
        out = torch.zeros_like(hidden_states)
        with torch.no_grad():
            # [E + 1, k, tokens]; index E marks tokens routed nowhere (as transformers' eager loop allows)
            mask = F.one_hot(top_k_index, num_classes=self.num_experts + 1).permute(2, 1, 0)
            if _distributed():
                experts = range(self.num_experts)
            else:
                experts = mask[: self.num_experts].sum(dim=(-1, -2)).nonzero()[:, 0].tolist()
        for e in experts:
            top_k_pos, token_idx = torch.where(mask[e])
            h = _gate(self._shell, self.gate_up[e](hidden_states[token_idx]))
            y = self.down[e](h) * top_k_weights[token_idx, top_k_pos, None]
            out.index_add_(0, token_idx, y.to(out.dtype))
        return out

    @torch.no_grad()
    def export(self, dtype: torch.dtype, memo: Optional[Dict[int, object]] = None) -> nn.Module:
        """The original fused-experts module holding the current dequantized weights (fp32, then ``dtype``).

        ``memo`` is the deepcopy memo of the model being exported, so the copy shares that copy's objects
        (e.g. the HF config) instead of holding its own.
        """
        module = copy.deepcopy(self._shell, memo if memo is not None else {})
        for name, layers in (("gate_up_proj", self.gate_up), ("down_proj", self.down)):
            w = torch.stack([layer.dequantized_weight(torch.float32) for layer in layers]).to(dtype)
            requires_grad = all(layer.anchor.requires_grad for layer in layers)
            setattr(module, name, nn.Parameter(w, requires_grad=requires_grad))
        return module

    def extra_repr(self) -> str:
        return f"num_experts={self.num_experts}, source={self.source_type}"


def select_experts(model: nn.Module, config) -> Tuple[Dict[str, nn.Module], List[Tuple[str, Tuple[int, ...], str]]]:
    """The fused-experts modules to project, and those left out ``(name, shape, why)``.

    The rules are :func:`qgalore_fx.passes.capture.select_linears`' applied to the experts module as a whole:
    by default every fused-experts module inside a transformer block (an element of an ``nn.ModuleList``);
    with ``target_modules`` (regexes searched in the module's name) and/or ``filter_fn(module, fqn)``, those
    they select. A module of an unsupported layout is left out (listed), unless it was chosen explicitly.
    """
    from qgalore_fx.passes.capture import block_members, chosen_by_rules

    custom = config.target_modules is not None or config.filter_fn is not None
    in_blocks = block_members(model)
    chosen: Dict[str, nn.Module] = {}
    left_out: List[Tuple[str, Tuple[int, ...], str]] = []
    for name, module in model.named_modules():
        if not name or not is_fused_experts(module):
            continue
        if custom:
            if not chosen_by_rules(config, module, name):
                continue
        elif in_blocks and name not in in_blocks:
            continue
        problem = experts_layout_problem(module)
        if problem is not None:
            if custom:
                raise ValueError(f"{name!r} is a {type(module).__name__} ({problem}), which qgalore_fx cannot "
                                 "project; exclude it with filter_fn/target_modules")
            left_out.append((name, tuple(module.gate_up_proj.shape), problem))
            continue
        chosen[name] = module
    return chosen, left_out


def expert_shapes(module: nn.Module) -> Dict[str, Tuple[int, int]]:
    """``(out, in)`` of one expert's ``gate_up`` and ``down`` linears."""
    _, two_i, h = module.gate_up_proj.shape
    return {"gate_up": (two_i, h), "down": (h, two_i // 2)}


def checkpoint_expert_keys(model: nn.Module, fused_key: str, num_experts: int) -> List[List[List[str]]]:
    """The per-expert keys a checkpoint may store ``fused_key`` under, from transformers' conversion mapping.

    Checkpoints of Mixtral, Qwen2-MoE, OLMoE, ... (and transformers' own ``save_pretrained``) keep one 2-D
    tensor per expert and matrix (``mlp.experts.{e}.gate_proj.weight``, Mixtral's
    ``block_sparse_moe.experts.{e}.w1.weight``); transformers merges them into the fused parameters when it
    loads. Returns, per source pattern of the merging rule, the list of per-expert keys (expert e's slice of
    the fused tensor is their concatenation along the output dimension) — one such candidate for each way
    the key may have been renamed; empty when no rule applies. Only rules that stack experts along dim 0
    and concatenate along dim 1 are read.
    """
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightConverter, WeightRenaming
        transforms = get_model_conversion_mapping(model)
    except (ImportError, AttributeError, TypeError):
        return []
    variants = [fused_key]
    for t in transforms:  # a renaming applied on load (e.g. ".block_sparse_moe." -> ".mlp."), undone here
        if isinstance(t, WeightRenaming) and len(t.source_patterns) == len(t.target_patterns) == 1:
            src, tgt = t.source_patterns[0], t.target_patterns[0]
            if all(ch.isalnum() or ch in "._" for ch in src + tgt) and tgt in fused_key:
                variants.append(fused_key.replace(tgt, src))
    candidates = []
    for t in transforms:
        if not isinstance(t, WeightConverter) or len(t.target_patterns) != 1:
            continue
        ops = [(type(op).__name__, getattr(op, "dim", None)) for op in t.operations]
        if ops not in ([("MergeModulelist", 0)], [("MergeModulelist", 0), ("Concatenate", 1)]):
            continue
        target = t.target_patterns[0].lstrip(".")
        for key in variants:
            if key == target or key.endswith("." + target):
                base = key[: len(key) - len(target)]
                candidates.append([[base + p.lstrip(".").replace("*", str(e)) for e in range(num_experts)]
                                   for p in t.source_patterns])
    return candidates
