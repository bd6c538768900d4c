"""Fused mixture-of-experts weights (transformers 5.x layout), projected per expert.

transformers 5.x stores the experts of Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE, ... as one
module with two 3-D parameters::

    gate_up_proj  [E, 2 * I, H]     expert e computes  gate, up = (x @ gate_up_proj[e].T).chunk(2)
    down_proj     [E, H, I]                            y = (act(gate) * up) @ down_proj[e].T

and a forward ``(hidden_states, top_k_index, top_k_weights)`` that routes each token to its
top-k experts. Each ``gate_up_proj[e]`` and ``down_proj[e]`` is an ordinary linear weight, so
:func:`qgalore_fx.transform` stores each as a :class:`~qgalore_fx.layers.QGaLoreLinear` (INT8 codes,
its own projection, moments and lazy-refresh schedule) inside a :class:`QGaLoreExperts` that
replaces the fused module and routes exactly as the eager transformers forward does. How such a
module is selected, read from a checkpoint, built and exported is its handler's business
(``ExpertsHandler`` in :mod:`qgalore_fx.handlers`); this module is what runs. Everything
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

Supported layout: see ``ExpertsHandler``; a fused-experts module of another layout is left as it is,
trained by the AdamW group, and listed by ``explain()``. Routing follows transformers' eager experts
implementation whatever ``config._experts_implementation`` says (grouped matmuls need the fused
tensors this module no longer has).
"""

from __future__ import annotations

from typing import List

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from qgalore_fx.layers import QGaLoreLinear

__all__ = ["QGaLoreExperts"]


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
    def shell(self) -> nn.Module:
        """The replaced module, its fused parameters on the ``meta`` device (its handler exports a copy of it)."""
        return self._shell

    @property
    def source_type(self) -> str:
        cls = type(self._shell)
        return f"{cls.__module__}.{cls.__qualname__}"

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

    def extra_repr(self) -> str:
        return f"num_experts={self.num_experts}, source={self.source_type}"
