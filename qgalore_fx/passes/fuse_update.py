"""Pass 2: wire every INT8 linear's op call to its layer's low-rank update state.

Requires
    the output of pass 1: ``torch.ops.qgalore_fx.linear`` nodes whose weight
    argument is a ``get_attr`` reaching a projected layer (made whole by its
    handler, :meth:`qgalore_fx.handlers.Handler.project`), with an empty state
    list (the call of a frozen quantized linear).
Guarantees
    each such node reads the layer's update state, as its handler names it
    (:meth:`~qgalore_fx.handlers.Handler.update_inputs`: projection codes and
    scales, Adam's moments, counters, accumulator, the host-side control
    tensor, and the static spec): argument 5 becomes the list of ``get_attr``
    nodes of the state and argument 8 a ``get_attr`` of the spec. The op's
    backward then runs the layer's update on exactly those tensors, with no
    lookup outside the graph. Every other node is unchanged; ``graph.lint()``
    passes and the module is recompiled. Nothing is built here.

Untraced regions (a ``QGaLoreLinear`` swapped in as a module) need no wiring:
:meth:`QGaLoreLinear.forward` passes the same tensors.
"""

from __future__ import annotations

import warnings

import torch.fx as fx

from qgalore_fx.handlers import handler_of
from qgalore_fx.passes.quantize_weights import LINEAR_OP


def fuse_update(gm: fx.GraphModule) -> int:
    """Wire every pass-1 node of ``gm`` to its layer's update state; returns how many nodes were wired."""
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
        handler = handler_of(layer)
        if handler is None:
            raise ValueError(f"node {node.name}: {target!r} is {type(layer).__name__}, which no handler made")
        state_names, spec_name = handler.update_inputs()
        with gm.graph.inserting_before(node), warnings.catch_warnings():
            # ``control`` is a host tensor attribute and ``spec_json`` a string: FX warns that they are not
            # parameters or buffers; both are read from the layer at run time.
            warnings.filterwarnings("ignore", message="Attempted to insert a get_attr Node")
            state = [gm.graph.get_attr(f"{target}.{k}") for k in state_names]
            spec = gm.graph.get_attr(f"{target}.{spec_name}")
        args = list(node.args)
        args[5], args[8] = state, spec
        node.args = tuple(args)
        count += 1
    if count:
        gm.graph.lint()
        gm.recompile()
    return count
