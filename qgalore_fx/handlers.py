"""Layer handlers: the one place that knows how each projectable layer type is read, stored, run and exported.

The transform needs five things from a layer it projects, and they differ per type:

- its shape as ``(out, in)`` and its weight as a dense ``[out, in]`` tensor
  (``nn.Linear`` stores ``[out, in]``; GPT-2's ``transformers.pytorch_utils.Conv1D``
  stores ``[in, out]`` and computes ``addmm(bias, x, weight)``);
- whether an instance runs the class's own forward (a subclass that overrides
  ``forward`` computes something else and cannot be rewritten);
- the layout of its weight in a state dict or safetensors file, so a model on the
  ``meta`` device reads it under its own key and transposes it if needed;
- how to build a temporary of the type for initialization (a meta model
  without ``weights=``), initialized as the model would;
- how to rebuild the original type from a :class:`~qgalore_fx.layers.QGaLoreLinear`
  for :func:`qgalore_fx.export_dense`, so ``save_pretrained``/``from_pretrained``
  round-trips into the original classes.

A :class:`LayerHandler` answers all of them from four facts: the type, its
``(out, in)`` shape, a constructor, and whether the weight is stored transposed.
Whatever the source type, ``QGaLoreLinear`` stores ``W`` as ``[out, in]`` and
computes ``x @ W.T + b``: for a ``Conv1D`` that is ``x @ weight + b`` once the
transpose is stored. A ``QGaLoreLinear`` remembers the handler it came from by
name (``source_type``, a plain str, so it survives ``deepcopy`` and pickling).

Registered: ``torch.nn.Linear`` always; ``transformers.pytorch_utils.Conv1D``
as soon as ``transformers.pytorch_utils`` is imported (a ``Conv1D`` cannot exist
before that, and ``import qgalore_fx`` does not import transformers). Users add
their own with :func:`register_layer_handler`::

    qgalore_fx.register_layer_handler(qgalore_fx.LayerHandler(
        MyLinear, shape=lambda m: (m.out_dim, m.in_dim),
        build=lambda out, in_, bias: MyLinear(in_, out, bias=bias)))
"""

from __future__ import annotations

import dataclasses
import importlib
import sys
from typing import Callable, Dict, List, Optional, Tuple

import torch
import torch.nn as nn
from torch import Tensor

__all__ = ["LayerHandler", "handler_for", "handler_named", "register_layer_handler", "supported_types"]


@dataclasses.dataclass(frozen=True)
class LayerHandler:
    """How one layer type is projected.

    ``layer_type``  the class; instances of subclasses use it too when they keep its ``forward``.
    ``shape``       ``module -> (out, in)``.
    ``build``       ``(out, in, bias: bool) -> module`` of ``layer_type``, its tensors initialized as its
                    constructor does; called under a ``torch.device`` context, so it must create its
                    tensors on the default device (no explicit ``device=``), and only ``weight``/``bias``.
    ``transposed``  the module keeps its weight as ``[in, out]`` (GPT-2's ``Conv1D``) rather than ``[out, in]``.
    ``weight_name``, ``bias_name``  the attributes (and state-dict key suffixes) of weight and bias.
    ``name``        the registry key stored on each ``QGaLoreLinear`` (default ``module.QualName``).
    """

    layer_type: type
    shape: Callable[[nn.Module], Tuple[int, int]]
    build: Callable[[int, int, bool], nn.Module]
    transposed: bool = False
    weight_name: str = "weight"
    bias_name: str = "bias"
    name: str = ""

    def __post_init__(self):
        if not (isinstance(self.layer_type, type) and issubclass(self.layer_type, nn.Module)):
            raise TypeError(f"layer_type must be an nn.Module subclass, got {self.layer_type!r}")
        for field in ("shape", "build"):
            if not callable(getattr(self, field)):
                raise TypeError(f"{field} must be callable, got {getattr(self, field)!r}")
        if not self.name:
            object.__setattr__(self, "name", f"{self.layer_type.__module__}.{self.layer_type.__qualname__}")

    # ------------------------------------------------------------------ reading
    def is_plain(self, module: nn.Module) -> bool:
        """Whether ``module`` runs ``layer_type``'s own forward (not a subclass that overrides it)."""
        return isinstance(module, self.layer_type) and type(module).forward is self.layer_type.forward

    def dense_weight(self, module: nn.Module) -> Tensor:
        """The module's weight as ``[out, in]`` (a view; detached)."""
        return self.to_dense(getattr(module, self.weight_name).detach())

    def bias(self, module: nn.Module) -> Optional[nn.Parameter]:
        return getattr(module, self.bias_name, None)

    def release_weight(self, module: nn.Module) -> None:
        """Drop the module's reference to its float weight (it has been quantized)."""
        setattr(module, self.weight_name, None)

    # ------------------------------------------------------------------ state dicts
    def stored_shape(self, out_features: int, in_features: int) -> Tuple[int, int]:
        """The shape of the weight tensor in a state dict."""
        return (in_features, out_features) if self.transposed else (out_features, in_features)

    def to_dense(self, stored: Tensor) -> Tensor:
        """A state-dict weight (or the module's own) as ``[out, in]``."""
        return stored.t() if self.transposed else stored

    # ------------------------------------------------------------------ building
    def initialized_weight(self, module: nn.Module, device, init: Optional[Callable[[nn.Module], None]]) -> Tensor:
        """A fresh ``[out, in]`` weight for ``module`` (on the meta device), initialized as the model would.

        A temporary of the type is built on ``device`` (its constructor's init), then ``init`` (an HF
        model's ``_init_weights``) is applied to it when given.
        """
        out_features, in_features = self.shape(module)
        with torch.device(device):
            tmp = self.build(out_features, in_features, self.bias(module) is not None)
        if init is not None:
            init(tmp)
        return self.dense_weight(tmp)

    @torch.no_grad()
    def export(self, layer, dtype: torch.dtype) -> nn.Module:
        """The original layer type holding ``layer``'s current dequantized weight (fp32, then ``dtype``).

        ``layer`` is a :class:`~qgalore_fx.layers.QGaLoreLinear`; its bias is copied.
        """
        device = layer.weight_codes.device
        with torch.device("meta"):
            module = self.build(layer.out_features, layer.in_features, layer.bias is not None)
        w = layer.dequantized_weight(torch.float32).to(device=device, dtype=dtype)
        w = w.t().contiguous() if self.transposed else w
        setattr(module, self.weight_name, nn.Parameter(w))
        b = None if layer.bias is None else nn.Parameter(layer.bias.detach().to(dtype=dtype, copy=True))
        setattr(module, self.bias_name, b)
        left = [n for n, t in list(module.named_parameters()) + list(module.named_buffers()) if t.is_meta]
        if left:
            raise ValueError(f"layer handler {self.name!r}: build() created tensors other than "
                             f"{self.weight_name!r}/{self.bias_name!r} ({left}); export cannot fill them")
        return module


# =========================================================================== registry
_REGISTRY: Dict[str, LayerHandler] = {}


def _linear_handler() -> LayerHandler:
    return LayerHandler(
        nn.Linear,
        name="torch.nn.Linear",
        shape=lambda m: (m.out_features, m.in_features),
        build=lambda out_features, in_features, bias: nn.Linear(in_features, out_features, bias=bias),
    )


def _conv1d_handler() -> LayerHandler:
    from transformers.pytorch_utils import Conv1D

    def build(out_features: int, in_features: int, bias: bool) -> nn.Module:
        if not bias:
            raise ValueError("transformers Conv1D always has a bias (its forward is addmm(bias, x, weight))")
        return Conv1D(nf=out_features, nx=in_features)

    return LayerHandler(Conv1D, name="transformers.pytorch_utils.Conv1D", shape=lambda m: (m.nf, m.nx),
                        build=build, transposed=True)


# Built-in handlers whose type lives in an optional package: registered once that module is imported.
_LAZY: Dict[str, Tuple[str, Callable[[], LayerHandler]]] = {
    "transformers.pytorch_utils.Conv1D": ("transformers.pytorch_utils", _conv1d_handler),
}


def _sync_lazy() -> None:
    for name, (module, factory) in _LAZY.items():
        if name not in _REGISTRY and module in sys.modules:
            _REGISTRY[name] = factory()


def register_layer_handler(handler: LayerHandler) -> LayerHandler:
    """Make ``handler.layer_type`` projectable by :func:`qgalore_fx.transform`; returns the handler.

    Registering again under the same name replaces the earlier handler; a name already used by a
    different type is an error. When several handlers name the same type, the last registered is used
    for new transforms (layers keep the name they were made with, for export).
    """
    if not isinstance(handler, LayerHandler):
        raise TypeError(f"handler must be a qgalore_fx.LayerHandler, got {type(handler).__name__}")
    _sync_lazy()
    old = _REGISTRY.get(handler.name)
    if old is not None and old.layer_type is not handler.layer_type:
        raise ValueError(f"a handler named {handler.name!r} is already registered for {old.layer_type.__name__}; "
                         "give this one another name=")
    _REGISTRY[handler.name] = handler
    return handler


def handler_for(module: nn.Module) -> Optional[LayerHandler]:
    """The handler of ``module``'s type or its nearest registered base class; None if unhandled."""
    _sync_lazy()
    by_type = {h.layer_type: h for h in _REGISTRY.values()}  # the last registered per type wins
    for cls in type(module).__mro__:
        handler = by_type.get(cls)
        if handler is not None:
            return handler
    return None


def handler_named(name: str) -> LayerHandler:
    """The handler registered as ``name`` (a ``QGaLoreLinear.source_type``)."""
    _sync_lazy()
    if name not in _REGISTRY and name in _LAZY:
        importlib.import_module(_LAZY[name][0])
        _sync_lazy()
    handler = _REGISTRY.get(name)
    if handler is None:
        raise ValueError(f"no layer handler named {name!r} is registered (registered: {sorted(_REGISTRY)}); "
                         "register it with qgalore_fx.register_layer_handler before exporting")
    return handler


def supported_types() -> List[str]:
    """Names of the layer types the transform can project now."""
    _sync_lazy()
    return list(_REGISTRY)


_REGISTRY["torch.nn.Linear"] = _linear_handler()  # first, whatever is imported already
LINEAR = "torch.nn.Linear"
