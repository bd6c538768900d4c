"""Pass 1: store each selected layer's weight as INT8 and call the dequant-matmul op.

Requires
    a GraphModule whose selected layers appear as ``call_module`` nodes
    targeting plain submodules of a type with a layer handler (``nn.Linear``,
    GPT-2's ``Conv1D``, see :mod:`qgalore_fx.handlers`; ``select_linears`` and
    ``capture_regions`` guarantee it).
Guarantees
    each such node is replaced by
    ``call_function torch.ops.qgalore_fx.linear(x, codes, scales, bias, anchor, [], hparams, block, "")``
    whose tensor arguments are ``get_attr`` nodes reaching the buffers of a
    :class:`~qgalore_fx.layers.QGaLoreLinear` that took the layer's place
    (its weight read as [out, in] through the handler, so a ``Conv1D``'s
    [in, out] weight is stored transposed); the float weight is no longer
    referenced by the GraphModule. The
    empty state list and spec make it a frozen quantized linear until pass 2
    wires the update; ``node.meta`` of the new call keeps the original node's
    metadata plus ``qgalore_fx_layer``. ``graph.lint()`` passes.

``quantize_module`` does the same for a layer that is its own region (module
swap, used where the parent could not be traced).
"""

from __future__ import annotations

from typing import Callable, Optional, Tuple

import torch
import torch.fx as fx
import torch.nn as nn

from qgalore_fx.config import QGaLoreConfig
from qgalore_fx.handlers import handler_for
from qgalore_fx.layers import QGaLoreLinear
from qgalore_fx.passes.capture import _set_submodule

LINEAR_OP = torch.ops.qgalore_fx.linear.default

Materializer = Callable[[str, nn.Module], Tuple[torch.Tensor, Optional[nn.Parameter]]]


def quantize_module(module: nn.Module, config: QGaLoreConfig, fqn: str = "",
                    materialize: Optional[Materializer] = None) -> QGaLoreLinear:
    """Swap-in replacement for one handled layer; its float weight is released.

    ``materialize(fqn, module) -> (weight [out, in], bias)`` supplies the tensors of a layer on the meta device.
    """
    handler = handler_for(module)
    if handler is None:
        raise ValueError(f"pass 1: {fqn!r} is a {type(module).__name__}, which has no layer handler")
    weight = bias = None
    if handler.dense_weight(module).is_meta:
        if materialize is None:
            raise ValueError(f"layer {fqn!r} is on the meta device and no weights/initializer was given")
        weight, bias = materialize(fqn, module)
    new = QGaLoreLinear.from_module(module, config, weight=weight, bias=bias, name=fqn)
    handler.release_weight(module)  # drop the reference held by the old module
    return new


def quantize_weights(gm: fx.GraphModule, selected: set, config: QGaLoreConfig, prefix: str = "",
                     materialize: Optional[Materializer] = None) -> bool:
    """Rewrite the ``call_module`` nodes whose target is in ``selected``; returns whether anything changed.

    ``prefix`` is the GraphModule's name in the whole model (for weight lookup and messages).
    """
    changed = False
    for node in list(gm.graph.nodes):
        if node.op != "call_module" or node.target not in selected:
            continue
        module = gm.get_submodule(node.target)
        if handler_for(module) is None:
            raise ValueError(f"pass 1 expected a layer with a handler at {node.target!r}, found "
                             f"{type(module).__name__}")
        if len(node.args) + len(node.kwargs) != 1:
            raise ValueError(f"call of {node.target!r} must take exactly one input, got {node.args} {node.kwargs}")
        x = node.args[0] if node.args else next(iter(node.kwargs.values()))
        layer = quantize_module(module, config, f"{prefix}.{node.target}" if prefix else node.target, materialize)
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
        changed = True
    if changed:
        gm.graph.lint()
        gm.graph.eliminate_dead_code()
        gm.delete_all_unused_submodules()
        gm.recompile()
    return changed
