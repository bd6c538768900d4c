"""Pass 2: give every INT8 linear its fused low-rank update in backward.

Requires
    the output of pass 1: ``torch.ops.qgalore_fx.linear`` nodes whose weight
    argument is a ``get_attr`` reaching a ``QGaLoreLinear`` (or a swapped
    ``QGaLoreLinear`` module for untraced regions).
Guarantees
    each such layer owns a :class:`~qgalore_fx.lowrank.LowRankState` (rank,
    projection storage, 8-bit Adam moments, lazy-refresh policy), registered so
    that the node's ``layer_id`` argument — read through ``get_attr`` — is
    non-negative. The op's backward then computes grad_x, projects the weight
    gradient to rank r, takes the Adam step and writes the weight back, inside
    that layer's backward (see :mod:`qgalore_fx.lowrank`). The graph's shape
    does not change: the same node now carries a trainable layer.
"""

from __future__ import annotations

import torch.fx as fx

from qgalore_fx.config import QGaLoreConfig
from qgalore_fx.layers import QGaLoreLinear
from qgalore_fx.lowrank import LowRankState
from qgalore_fx.passes.quantize_weights import LINEAR_OP


def attach_update(layer: QGaLoreLinear, name: str, config: QGaLoreConfig, index: int) -> bool:
    """Attach a LowRankState to one layer; False if it already had one."""
    if layer.lowrank is not None:
        return False
    layer.lowrank = LowRankState(name, (layer.out_features, layer.in_features), config, index,
                                 device=layer.weight_codes.device)
    return True


def fuse_update(gm: fx.GraphModule, prefix: str, config: QGaLoreConfig, start_index: int) -> int:
    """Attach updates to every pass-1 node of ``gm``; returns how many layers were attached."""
    count = 0
    for node in gm.graph.nodes:
        if node.op != "call_function" or node.target is not LINEAR_OP:
            continue
        weight = node.args[1]
        if weight.op != "get_attr":
            raise ValueError(f"node {node.name}: weight must come from get_attr, got {weight.op}")
        target = weight.target.rsplit(".", 1)[0]
        layer = gm.get_submodule(target)
        if not isinstance(layer, QGaLoreLinear):
            raise ValueError(f"node {node.name}: {target!r} is {type(layer).__name__}, expected QGaLoreLinear")
        name = f"{prefix}.{target}" if prefix else target
        if attach_update(layer, name, config, start_index + count):
            node.meta["qgalore_fx_rank"] = config.rank
            count += 1
    return count
