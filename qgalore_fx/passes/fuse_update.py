"""Pass 2: wire every INT8 linear to its low-rank update state.

Requires
    the output of pass 1: ``torch.ops.qgalore_fx.linear`` nodes whose weight
    argument is a ``get_attr`` reaching a ``QGaLoreLinear``, with an empty
    state list (a frozen quantized linear).
Guarantees
    each such layer owns its update state (:meth:`QGaLoreLinear.enable_update`:
    projection codes and scales, Adam's moments, counters, accumulator, the
    host-side control tensor, and its static ``spec``), and the node now reads
    all of it: argument 5 becomes the list of ``get_attr`` nodes of
    :data:`qgalore_fx.lowrank.OP_STATE_NAMES` and argument 8 a ``get_attr`` of the
    layer's ``spec_json``. The op's backward then runs the layer's update on
    exactly those tensors, with no lookup outside the graph. Every other node
    is unchanged; ``graph.lint()`` passes and the module is recompiled.

Untraced regions (a ``QGaLoreLinear`` swapped in as a module) get the same
wiring through :meth:`QGaLoreLinear.forward`, which passes the same tensors.
"""

from __future__ import annotations

import warnings

import torch.fx as fx

from qgalore_fx.config import QGaLoreConfig
from qgalore_fx.layers import QGaLoreLinear
from qgalore_fx.lowrank import OP_STATE_NAMES
from qgalore_fx.passes.quantize_weights import LINEAR_OP


def attach_update(layer: QGaLoreLinear, name: str, config: QGaLoreConfig, index: int) -> bool:
    """Give one layer its update state; False if it already had one."""
    return layer.enable_update(config, name, index)


def fuse_update(gm: fx.GraphModule, prefix: str, config: QGaLoreConfig, start_index: int) -> int:
    """Wire every pass-1 node of ``gm`` to its layer's update; returns how many layers were wired."""
    count = 0
    for node in gm.graph.nodes:
        if node.op != "call_function" or node.target is not LINEAR_OP:
            continue
        weight = node.args[1]
        if weight.op != "get_attr":
            raise ValueError(f"node {node.name}: weight must come from get_attr, got {weight.op}")
        if node.args[5]:
            raise ValueError(f"node {node.name}: already wired to an update state")
        target = weight.target.rsplit(".", 1)[0]
        layer = gm.get_submodule(target)
        if not isinstance(layer, QGaLoreLinear):
            raise ValueError(f"node {node.name}: {target!r} is {type(layer).__name__}, expected QGaLoreLinear")
        name = f"{prefix}.{target}" if prefix else target
        attach_update(layer, name, config, start_index + count)
        with gm.graph.inserting_before(node), warnings.catch_warnings():
            # ``control`` is a host tensor attribute and ``spec_json`` a string: FX warns that they are not
            # parameters or buffers; both are read from the layer at run time.
            warnings.filterwarnings("ignore", message="Attempted to insert a get_attr Node")
            state = [gm.graph.get_attr(f"{target}.{k}") for k in OP_STATE_NAMES]
            spec = gm.graph.get_attr(f"{target}.spec_json")
        args = list(node.args)
        args[5], args[8] = state, spec
        node.args = tuple(args)
        count += 1
    if count:
        gm.graph.lint()
        gm.recompile()
    return count
