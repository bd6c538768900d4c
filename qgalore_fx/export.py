"""``export_dense(model, dtype)``: a plain PyTorch copy of a transformed model, for inference and sharing.

    dense = qgalore_fx.export_dense(model, dtype=torch.bfloat16)
    dense.save_pretrained("out")                   # HF models: loads back with LlamaForCausalLM.from_pretrained
    assert not qgalore_fx.is_transformed(dense)

The result is a deep copy; ``model`` and its training state are untouched.

What changes in the copy
------------------------
- every projected module becomes the module it replaced, rebuilt by the
  handler that made it (:mod:`qgalore_fx.handlers`, ``Handler.export``): a
  :class:`~qgalore_fx.layers.QGaLoreLinear` a layer of its original type
  (``layer.source_type``: ``nn.Linear``, GPT-2's ``Conv1D``, ...) whose weight
  is the layer's current dequantized weight (computed in fp32, then cast to
  ``dtype``; transposed back to [in, out] for a ``Conv1D``) and whose bias is a
  copy of the layer's bias; projected MoE experts the fused-experts module,
  its 3-D ``gate_up_proj`` / ``down_proj`` stacked from the experts'
  dequantized weights (same keys as before the transform). The low-rank state
  (projection, moments) is not copied.
- in every traced region (a ``GraphModule`` made by the transform), each
  ``torch.ops.qgalore_fx.linear`` node becomes a ``call_module`` node calling
  that rebuilt layer, and the ``get_attr`` nodes that fed it (codes, scales,
  anchor, update state, spec) are removed. The region stays a ``GraphModule``.

  Why not rebuild the region's original class (e.g. ``LlamaMLP``)? A traced
  region keeps the original's submodules and parameter names but not its
  constructor arguments or plain attributes (``config``, ``hidden_size``), so
  an instance cannot be rebuilt generically; and it is not needed: the
  state-dict keys are the original ones (``mlp.gate_proj.weight``), so HF's
  ``save_pretrained``/``from_pretrained`` round-trips into the original
  classes, while the ``GraphModule`` in the copy is plain ``torch.fx`` with
  no qgalore_fx op (it runs, pickles and compiles without qgalore_fx).
- every other parameter and every persistent floating-point buffer is cast to
  ``dtype``; non-persistent buffers (derived constants such as rotary
  frequencies, which models keep in fp32 on purpose) keep their dtype. An HF
  model's ``config.dtype`` is set to ``dtype``.
- the transform's bookkeeping (regions, config) is dropped, so
  ``is_transformed(copy)`` is False and ``config_of(copy)`` is None.

A model that was never transformed is simply copied and cast.
"""

from __future__ import annotations

import copy

import torch
import torch.fx as fx
import torch.nn as nn

from qgalore_fx.handlers import handler_for, handler_of, projected_units
from qgalore_fx.layers import QGaLoreLinear
from qgalore_fx.passes.quantize_weights import LINEAR_OP
from qgalore_fx.rewrite import _CONFIG_ATTR, _REGIONS_ATTR, _SKIPPED_ATTR

__all__ = ["export_dense"]

_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def _rewrite_graph(gm: fx.GraphModule) -> bool:
    """Turn ``qgalore_fx.linear`` nodes back into ``call_module`` nodes of the rebuilt layer at the same path."""
    changed = False
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node.target is not LINEAR_OP:
            continue
        x, codes = node.args[0], node.args[1]
        if not isinstance(codes, fx.Node) or codes.op != "get_attr":
            raise ValueError(f"export_dense: node {node.name} of a traced region does not read its weight through "
                             f"get_attr (got {codes!r}); cannot tell which layer it calls")
        target = codes.target.rsplit(".", 1)[0]
        module = gm.get_submodule(target)
        if isinstance(module, QGaLoreLinear) or handler_for(module) is None:
            raise ValueError(f"export_dense: {target!r} is a {type(module).__name__} after export, expected a "
                             "rebuilt layer of its original type")
        with gm.graph.inserting_before(node):
            call = gm.graph.call_module(target, (x,))
        call.meta.update({k: v for k, v in node.meta.items() if not k.startswith("qgalore_fx")})
        node.replace_all_uses_with(call)
        feeds = [a for a in node.all_input_nodes if a.op == "get_attr"]
        gm.graph.erase_node(node)
        for attr in feeds:  # codes, scales, bias, anchor, update state: now unused and pointing at nothing
            if not attr.users:
                gm.graph.erase_node(attr)
        changed = True
    if changed:
        gm.graph.eliminate_dead_code()
        gm.graph.lint()
        gm.recompile()
    return changed


def _leftover_ops(model: nn.Module) -> list:
    out = []
    for name, module in model.named_modules():
        if isinstance(module, fx.GraphModule):
            for node in module.graph.nodes:
                if node.op == "call_function" and "qgalore_fx" in str(node.target):
                    out.append(f"{name or '<root>'}: {node.format_node()}")
    return out


@torch.no_grad()
def _cast_(model: nn.Module, dtype: torch.dtype) -> None:
    for p in model.parameters():  # unique Parameters: tied weights stay tied
        if p.dtype in _FLOAT_DTYPES and p.dtype != dtype:
            p.data = p.data.to(dtype)
    for module in model.modules():
        for name, buf in module._buffers.items():
            if buf is None or name in module._non_persistent_buffers_set:
                continue
            if buf.dtype in _FLOAT_DTYPES and buf.dtype != dtype:
                module._buffers[name] = buf.to(dtype)


#: Called as ``hook(dense)`` on every export; integrations above the transform register here (the transformers
#: integration drops the copy's ``quant_method: "qgalore_fx"``).
EXPORT_HOOKS: list = []


def export_dense(model: nn.Module, dtype: torch.dtype = torch.bfloat16) -> nn.Module:
    """A plain copy of ``model``, each projected layer back to its original type in ``dtype`` (module docstring)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(dtype, torch.dtype) or dtype not in _FLOAT_DTYPES:
        raise ValueError(f"dtype must be one of {[str(d) for d in _FLOAT_DTYPES]}, got {dtype!r}")
    from qgalore_fx.sharding import is_dtensor

    if any(is_dtensor(p) for p in model.parameters()):
        raise ValueError(
            "export_dense needs the whole model in one process; this one is sharded with FSDP2. Gather it on rank 0 "
            "with torch.distributed.checkpoint.state_dict.get_model_state_dict(model, options=StateDictOptions("
            "full_state_dict=True, cpu_offload=True)), load that into the same model transformed in one process "
            "(model.load_state_dict), and export that one")
    # Each projected module is copied as the dense module it replaced (never as INT8 codes + low-rank state),
    # rebuilt by its handler through the same memo (so e.g. the experts' copy shares the model copy's config);
    # the transform's bookkeeping is not copied at all.
    memo: dict = {}
    for _, unit in projected_units(model):
        memo[id(unit)] = handler_of(unit).export(unit, dtype, memo)
    for attr in (_REGIONS_ATTR, _CONFIG_ATTR, _SKIPPED_ATTR):
        if attr in model.__dict__:
            memo[id(model.__dict__[attr])] = None
    dense = copy.deepcopy(model, memo)
    for attr in (_REGIONS_ATTR, _CONFIG_ATTR, _SKIPPED_ATTR):
        dense.__dict__.pop(attr, None)
    for module in dense.modules():
        if isinstance(module, fx.GraphModule):
            _rewrite_graph(module)
    leftover = _leftover_ops(dense) + [n for n, _ in projected_units(dense)]
    if leftover:
        raise RuntimeError(f"export_dense left qgalore_fx pieces in the copy: {leftover[:5]}")
    _cast_(dense, dtype)
    for hook in EXPORT_HOOKS:  # e.g. a plain HF model again: from_pretrained of the original class loads it
        hook(dense)
    config = getattr(dense, "config", None)
    if config is not None and hasattr(config, "dtype"):
        config.dtype = dtype
    return dense
