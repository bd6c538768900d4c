"""Pass 1: replace each selected layer by its projected layer, built whole by its handler, and call the
dequant-matmul op.

Requires
    a GraphModule whose selected layers appear as ``call_module`` nodes
    targeting plain submodules claimed by a traced handler (``nn.Linear``,
    GPT-2's ``Conv1D``, see :mod:`qgalore_fx.handlers`; ``select_layers`` and
    ``capture_regions`` guarantee it).
Guarantees
    each such node is replaced by
    ``call_function torch.ops.qgalore_fx.linear(x, codes, scales, bias, anchor, [], hparams, block, "")``
    whose tensor arguments are ``get_attr`` nodes reaching the buffers of the
    :class:`~qgalore_fx.layers.QGaLoreLinear` that took the layer's place:
    ``handler.project`` made it whole (weight read as [out, in], so a
    ``Conv1D``'s [in, out] weight is stored transposed, and its update state),
    numbered in node order from the index it was given. The float weight is no
    longer referenced by the GraphModule. The empty state list and spec make
    the call a frozen quantized linear until pass 2 wires the update;
    ``node.meta`` of the new call keeps the original node's metadata plus
    ``qgalore_fx_layer``. ``graph.lint()`` passes.

``quantize_module`` does the same for a module that is its own region (module
swap: a layer whose parent could not be traced, or fused experts).
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.fx as fx
import torch.nn as nn

from qgalore_fx.config import QGaLoreConfig
from qgalore_fx.handlers import handler_for
from qgalore_fx.host_allocator import release_free_memory
from qgalore_fx.materialize import MetaWeights
from qgalore_fx.passes.capture import _set_submodule

LINEAR_OP = torch.ops.qgalore_fx.linear.default


def quantize_module(module: nn.Module, config: QGaLoreConfig, fqn: str, index: int,
                    weights: Optional[MetaWeights] = None) -> Tuple[nn.Module, int]:
    """The projected module that replaces ``module`` (its handler builds it whole, numbering its layers from
    ``index``), and how many projected layers it holds; ``module``'s float weights are released.

    ``weights`` supplies the tensors of a module on the meta device.
    """
    handler = handler_for(module)
    if handler is None:
        raise ValueError(f"pass 1: {fqn!r} is a {type(module).__name__}, which has no layer handler")
    count = len(handler.shapes(module))
    projected = handler.project(module, fqn, config, index, weights)
    if weights is not None:  # its fp32 weight is freed: hand the heap's holes back (qgalore_fx.host_allocator)
        release_free_memory()
    return projected, count


def quantize_weights(gm: fx.GraphModule, selected: set, config: QGaLoreConfig, prefix: str = "", index: int = 0,
                     weights: Optional[MetaWeights] = None) -> int:
    """Rewrite the ``call_module`` nodes whose target is in ``selected``; returns how many it rewrote (0: the
    graph is unchanged).

    ``prefix`` is the GraphModule's name in the whole model (for weight lookup and messages); the layers are
    numbered from ``index``.
    """
    count = 0
    for node in list(gm.graph.nodes):
        if node.op != "call_module" or node.target not in selected:
            continue
        module = gm.get_submodule(node.target)
        handler = handler_for(module)
        if handler is None or not handler.traced:
            raise ValueError(f"pass 1 expected a layer whose handler is rewritten in graphs at {node.target!r}, "
                             f"found {type(module).__name__}")
        if len(node.args) + len(node.kwargs) != 1:
            raise ValueError(f"call of {node.target!r} must take exactly one input, got {node.args} {node.kwargs}")
        x = node.args[0] if node.args else next(iter(node.kwargs.values()))
        layer, _ = quantize_module(module, config, f"{prefix}.{node.target}" if prefix else node.target,
                                   index + count, weights)
        _set_submodule(gm, node.target, layer)
        with gm.graph.inserting_before(node):
            codes = gm.graph.get_attr(f"{node.target}.weight_codes")
            scales = gm.graph.get_attr(f"{node.target}.weight_scales")
            bias = gm.graph.get_attr(f"{node.target}.bias") if layer.bias is not None else None
            anchor = gm.graph.get_attr(f"{node.target}.anchor")
            hparams = gm.graph.get_attr(f"{node.target}.hparams")
            call = gm.graph.call_function(LINEAR_OP, (x, codes, scales, bias, anchor, [], hparams,
                                                      config.block_size, ""))
        call.meta.update(node.meta)
        call.meta["qgalore_fx_layer"] = node.target
        node.replace_all_uses_with(call)
        gm.graph.erase_node(node)
        count += 1
    if count:
        gm.graph.lint()
        gm.graph.eliminate_dead_code()
        gm.delete_all_unused_submodules()
        gm.recompile()
    return count
