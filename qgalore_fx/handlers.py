"""Handlers: the one place that knows how each kind of projectable module is read, stored, updated,
materialized and exported. The transform asks them and nothing else: selection asks which modules a
handler claims and what shapes they have, pass 1 asks it for the projected module, built whole
(:meth:`Handler.project`), pass 2 which of the layer's tensors its update reads, :func:`qgalore_fx.export_dense`
for the original module back, the transformers integration which modules it made.

Two kinds are registered:

- :class:`LayerHandler`, one per linear-like type (``torch.nn.Linear`` always;
  ``transformers.pytorch_utils.Conv1D`` as soon as ``transformers.pytorch_utils`` is imported, since a
  ``Conv1D`` cannot exist before that and ``import qgalore_fx`` does not import transformers). One such
  layer becomes one :class:`~qgalore_fx.layers.QGaLoreLinear`, rewritten in traced regions. It answers
  from four facts: the type, its ``(out, in)`` shape, a constructor, and whether the weight is stored
  transposed (GPT-2's ``Conv1D`` stores ``[in, out]`` and computes ``addmm(bias, x, weight)``; whatever
  the source type, ``QGaLoreLinear`` stores ``W`` as ``[out, in]`` and computes ``x @ W.T + b``). Those
  facts give: whether an instance runs the class's own forward (a subclass that overrides it computes
  something else), the layout of its weight in a state dict or safetensors file (so a model on the
  ``meta`` device reads it under its own key), a temporary of the type for initialization, and the
  original type rebuilt for export. A ``QGaLoreLinear`` remembers its handler by name (``source_type``,
  a plain str, so it survives ``deepcopy`` and pickling).
- :class:`ExpertsHandler`, for the fused mixture-of-experts modules of transformers 5.x (3-D
  ``gate_up_proj`` / ``down_proj``, any class): each expert matrix becomes a ``QGaLoreLinear`` inside a
  :class:`~qgalore_fx.experts.QGaLoreExperts`, swapped in as a module (its call takes the routing too).

Users add linear-like types with :func:`register_layer_handler`::

    qgalore_fx.register_layer_handler(qgalore_fx.LayerHandler(
        MyLinear, shape=lambda m: (m.out_dim, m.in_dim),
        build=lambda out, in_, bias: MyLinear(in_, out, bias=bias)))
"""

from __future__ import annotations

import copy
import dataclasses
import importlib
import inspect
import sys
from typing import Callable, Dict, List, Optional, Tuple

import torch
import torch.nn as nn
from torch import Tensor

from qgalore_fx.config import QGaLoreConfig
from qgalore_fx.experts import QGaLoreExperts
from qgalore_fx.layers import LINEAR, QGaLoreLinear
from qgalore_fx.lowrank import OP_STATE_NAMES
from qgalore_fx.materialize import MetaWeights

__all__ = ["ExpertsHandler", "Handler", "LayerHandler", "handler_for", "handler_named", "handler_of",
           "projected_units", "register_layer_handler", "supported_types"]


class Handler:
    """What the transform asks of every kind of projectable module; :class:`LayerHandler` and
    :class:`ExpertsHandler` answer it.

    ``name``               the registry key (a ``QGaLoreLinear``'s ``source_type`` for a layer handler).
    ``made_type``          the type of the modules :meth:`project` returns.
    ``traced``             True: pass 1 rewrites the module's calls inside traced regions (one input); False: the
                           module is always swapped in as a module, and the regions around it are not traced for it.
    ``skips_unsupported``  True: the default selection leaves out (and ``explain`` lists) a module of a form
                           :meth:`problem` refuses; False: it is an error, as it always is for a module chosen
                           with ``target_modules``/``filter_fn``.
    """

    name: str
    made_type: type
    traced = True
    skips_unsupported = False

    # ------------------------------------------------------------------ selection
    def claims(self, module: nn.Module) -> bool:
        """Whether ``module`` is of the kind this handler projects (:func:`handler_for` asks)."""
        raise NotImplementedError

    def problem(self, module: nn.Module) -> Optional[str]:
        """None if :meth:`project` can take this instance, else why not."""
        return None

    def shapes(self, module: nn.Module) -> Dict[str, Tuple[int, int]]:
        """``(out, in)`` of each matrix the module is projected as, by the suffix of its layer name ('' for the
        module itself); ``rank`` must fit each (:meth:`QGaLoreConfig.fits`)."""
        raise NotImplementedError

    def listed_shape(self, module: nn.Module) -> Tuple[int, ...]:
        """The shape ``explain()`` shows for the module when it is left out."""
        raise NotImplementedError

    def smaller_than_rank(self, rank: int) -> str:
        """Why a module one of whose matrices is smaller than ``rank`` is left out (``explain()``)."""
        return f"smaller than rank {rank}"

    def weights(self, module: nn.Module) -> List[Tensor]:
        """The parameters that become projected storage (they must not be shared)."""
        raise NotImplementedError

    # ------------------------------------------------------------------ the projected module
    def project(self, module: nn.Module, name: str, config: QGaLoreConfig, index: int,
                weights: Optional[MetaWeights] = None) -> nn.Module:
        """The module that replaces ``module`` (named ``name``), whole: every matrix stored and with its update
        state, through :meth:`QGaLoreLinear.projected`, numbered from ``index`` (their random streams) in the
        order of :meth:`shapes`. ``weights`` supplies the tensors of a module on the ``meta`` device.
        The module's own float weights are released."""
        raise NotImplementedError

    def update_inputs(self) -> Tuple[Tuple[str, ...], str]:
        """What pass 2 wires into a projected layer's op call: the attributes holding its update state, in the
        op's order, and the one holding its spec."""
        return OP_STATE_NAMES, "spec_json"

    def made(self, projected: nn.Module) -> bool:
        """Whether this handler made ``projected``."""
        return isinstance(projected, self.made_type)

    def export(self, projected: nn.Module, dtype: torch.dtype, memo: Optional[dict] = None) -> nn.Module:
        """The original module back, holding ``projected``'s current dequantized weights (fp32, then ``dtype``).
        ``memo``: the deepcopy memo of the model being exported, for anything the copy shares with it."""
        raise NotImplementedError

    def summary(self, model: nn.Module) -> Optional[str]:
        """A line for ``explain()`` about the modules this handler made in ``model`` (None: nothing to add)."""
        return None


@dataclasses.dataclass(frozen=True)
class LayerHandler(Handler):
    """How one linear-like layer type is projected: as one :class:`~qgalore_fx.layers.QGaLoreLinear`.

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

    made_type = QGaLoreLinear

    def __post_init__(self):
        if not (isinstance(self.layer_type, type) and issubclass(self.layer_type, nn.Module)):
            raise TypeError(f"layer_type must be an nn.Module subclass, got {self.layer_type!r}")
        for field in ("shape", "build"):
            if not callable(getattr(self, field)):
                raise TypeError(f"{field} must be callable, got {getattr(self, field)!r}")
        if not self.name:
            object.__setattr__(self, "name", f"{self.layer_type.__module__}.{self.layer_type.__qualname__}")

    # ------------------------------------------------------------------ selection
    def claims(self, module: nn.Module) -> bool:
        return isinstance(module, self.layer_type)

    def is_plain(self, module: nn.Module) -> bool:
        """Whether ``module`` runs ``layer_type``'s own forward (not a subclass that overrides it)."""
        return isinstance(module, self.layer_type) and type(module).forward is self.layer_type.forward

    def problem(self, module: nn.Module) -> Optional[str]:
        if self.is_plain(module):
            return None
        return f"with its own forward instead of {self.name}'s; a handler registered for its type can project it"

    def shapes(self, module: nn.Module) -> Dict[str, Tuple[int, int]]:
        return {"": tuple(self.shape(module))}

    def listed_shape(self, module: nn.Module) -> Tuple[int, ...]:
        return tuple(self.shape(module))

    def weights(self, module: nn.Module) -> List[Tensor]:
        weight = getattr(module, self.weight_name, None)
        return [] if weight is None else [weight]

    # ------------------------------------------------------------------ reading
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

    def read(self, module: nn.Module, name: str, weights: MetaWeights) -> Tuple[Tensor, Optional[nn.Parameter]]:
        """The fp32 ``[out, in]`` weight and the bias of a layer on the ``meta`` device, on ``weights.device``.

        From ``weights.source`` under ``{name}.{weight_name}`` (``[in, out]`` when ``transposed``, then transposed)
        and ``{name}.{bias_name}``; when the source is empty, initialized as the model would
        (:meth:`initialized_weight`), the bias zero.
        """
        def key(attr: str) -> str:
            return f"{name}.{attr}" if name else attr

        out_features, in_features = self.shape(module)
        what = f"projected layer {name!r}"
        stored = weights.tensor(key(self.weight_name), self.stored_shape(out_features, in_features), what)
        weight = (self.initialized_weight(module, weights.device, weights.init).detach() if stored is None
                  else self.to_dense(stored))
        bias = self.bias(module)
        if bias is not None:
            b = weights.tensor(key(self.bias_name), bias.shape, what, dtype=bias.dtype)
            if b is None:
                b = torch.zeros(bias.shape, dtype=bias.dtype, device=weights.device)
            bias = nn.Parameter(b, requires_grad=bias.requires_grad)
        return weight, bias

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

    def project(self, module: nn.Module, name: str, config: QGaLoreConfig, index: int,
                weights: Optional[MetaWeights] = None) -> QGaLoreLinear:
        """The :class:`QGaLoreLinear` replacing ``module``, whole (see :meth:`Handler.project`); its bias is the
        module's own Parameter."""
        weight, bias = self.dense_weight(module), self.bias(module)
        if weight.is_meta:
            if weights is None:
                raise ValueError(f"layer {name!r} is on the meta device and no weights/initializer was given")
            weight, bias = self.read(module, name, weights)
        if tuple(weight.shape) != tuple(self.shape(module)):
            raise ValueError(f"the weight of {name!r} must have shape {tuple(self.shape(module))} ([out, in] from "
                             f"handler {self.name!r}), got {tuple(weight.shape)}")
        layer = QGaLoreLinear.projected(weight, bias, config, name, index, source_type=self.name)
        self.release_weight(module)
        return layer

    def made(self, projected: nn.Module) -> bool:
        return isinstance(projected, QGaLoreLinear) and projected.source_type == self.name

    @torch.no_grad()
    def export(self, layer: QGaLoreLinear, dtype: torch.dtype, memo: Optional[dict] = None) -> nn.Module:
        """The original layer type holding ``layer``'s current dequantized weight (fp32, then ``dtype``);
        its bias is copied."""
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


# =========================================================================== fused MoE experts
_EXPERTS_FORWARD_ARGS = ["hidden_states", "top_k_index", "top_k_weights"]
_EXPERTS_FLAGS = {"is_transposed": False, "has_bias": False, "has_gate": True, "is_concatenated": True,
                  "has_post_expert_norm": False}


class ExpertsHandler(Handler):
    """How transformers 5.x fused MoE experts are projected: each expert matrix as its own
    :class:`~qgalore_fx.layers.QGaLoreLinear`, inside a :class:`~qgalore_fx.experts.QGaLoreExperts`.

    A fused-experts module (Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE, ... whatever its class) holds
    ``gate_up_proj [E, 2I, H]`` and ``down_proj [E, H, I]``; expert e's ``gate_up`` and ``down`` linears are
    their slices ``[e]``, named ``{name}.gate_up.{e}`` and ``{name}.down.{e}``. Supported layout: the
    concatenated ``[gate; up]`` layout, not transposed, no biases, no post-expert norm, the default gating
    (``transformers.integrations.moe.use_experts_implementation``'s ``is_concatenated=True,
    is_transposed=False, has_bias=False, has_gate=True``) and the forward ``(hidden_states, top_k_index,
    top_k_weights)``; the default selection leaves a module of another layout to the AdamW group and lists it.
    """

    name = "transformers.fused_experts"
    made_type = QGaLoreExperts
    traced = False  # its call takes the routing as well: always swapped in as a module
    skips_unsupported = True
    parts = ("gate_up_proj", "down_proj")  # the fused parameters, in the order of shapes()

    def claims(self, module: nn.Module) -> bool:
        tensors = [getattr(module, p, None) for p in self.parts]
        return all(isinstance(t, nn.Parameter) and t.dim() == 3 for t in tensors)

    def problem(self, module: nn.Module) -> Optional[str]:
        gate_up, down = module.gate_up_proj, module.down_proj
        for flag, wanted in _EXPERTS_FLAGS.items():
            if bool(getattr(module, flag, wanted)) != wanted:
                return f"fused experts with {flag}={not wanted}"
        e, two_i, h = gate_up.shape
        if down.shape != (e, h, two_i // 2) or two_i % 2:
            return (f"fused experts of shapes {tuple(gate_up.shape)} / {tuple(down.shape)}, expected [E, 2I, H] / "
                    "[E, H, I]")
        if not callable(getattr(module, "act_fn", None)):
            return "fused experts without an act_fn"
        try:
            params = list(inspect.signature(type(module).forward).parameters)[1:]
        except (TypeError, ValueError):
            return "fused experts whose forward signature cannot be read"
        if params != _EXPERTS_FORWARD_ARGS:
            return f"fused experts whose forward takes {params}, expected {_EXPERTS_FORWARD_ARGS}"
        return None

    def shapes(self, module: nn.Module) -> Dict[str, Tuple[int, int]]:
        """``(out, in)`` of one expert's ``gate_up`` and ``down`` linears."""
        _, two_i, h = module.gate_up_proj.shape
        return {"gate_up": (two_i, h), "down": (h, two_i // 2)}

    def listed_shape(self, module: nn.Module) -> Tuple[int, ...]:
        return tuple(module.gate_up_proj.shape)

    def smaller_than_rank(self, rank: int) -> str:
        return f"experts smaller than rank {rank}"

    def weights(self, module: nn.Module) -> List[Tensor]:
        return [getattr(module, p) for p in self.parts]

    # ------------------------------------------------------------------ reading
    def read(self, module: nn.Module, name: str, weights: MetaWeights) -> Tuple[Tensor, Tensor]:
        """The fp32 3-D ``gate_up_proj`` / ``down_proj`` of a fused-experts module on the ``meta`` device.

        From ``weights.source`` under ``{name}.gate_up_proj`` etc., or per expert as HF checkpoints store them
        (:meth:`checkpoint_keys`); when the source is empty, initialized as the model would.
        """
        if weights.source.empty:
            tmp = copy.deepcopy(module).to_empty(device=weights.device)
            if weights.init is not None:
                weights.init(tmp)
            else:  # the fused parameters are created with torch.empty: never train from uninitialized memory
                for p in self.weights(tmp):
                    nn.init.normal_(p, std=0.02)
            return tuple(p.detach().float() for p in self.weights(tmp))
        out = []
        for pname in self.parts:
            key, shape = f"{name}.{pname}", getattr(module, pname).shape
            w = weights.source.get(key, shape) if key in weights.source else None
            if w is None:  # stored per expert, as HF checkpoints do: expert e = cat of its pieces along dim 0
                candidates = self.checkpoint_keys(weights.model, key, shape[0])
                groups = next((g for g in candidates if all(k in weights.source for keys in g for k in keys)), None)
                if groups is None:
                    example = "".join(f" such as {c[0][0]!r}" for c in candidates[-1:])
                    raise ValueError(f"weights has no tensor {key!r} (nor its per-expert pieces{example}) for the "
                                     f"projected experts {name!r}")
                rows = shape[1] // len(groups)
                w = torch.stack([torch.cat([weights.source.get(keys[e], (rows, shape[2])) for keys in groups])
                                 for e in range(shape[0])])
            out.append(w.to(device=weights.device, dtype=torch.float32))
        return tuple(out)

    @staticmethod
    def checkpoint_keys(model: nn.Module, fused_key: str, num_experts: int) -> List[List[List[str]]]:
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

    # ------------------------------------------------------------------ the projected module
    def project(self, module: nn.Module, name: str, config: QGaLoreConfig, index: int,
                weights: Optional[MetaWeights] = None) -> QGaLoreExperts:
        """The :class:`QGaLoreExperts` replacing ``module``, whole (see :meth:`Handler.project`): expert e's
        ``gate_up`` and ``down`` layers are numbered ``index + 2e`` and ``index + 2e + 1``, each quantized from its
        slice, one at a time. ``module`` becomes the meta shell that supplies the activation and gating."""
        if module.gate_up_proj.is_meta:
            if weights is None:
                raise ValueError(f"experts {name!r} are on the meta device and no weights/initializer was given")
            tensors = self.read(module, name, weights)
        else:
            tensors = tuple(p.detach() for p in self.weights(module))
        frozen = [not p.requires_grad for p in self.weights(module)]
        layers: Dict[str, List[QGaLoreLinear]] = {"gate_up": [], "down": []}
        for e in range(tensors[0].shape[0]):
            for k, (kind, w) in enumerate(zip(layers, tensors)):
                layer = QGaLoreLinear.projected(w[e], None, config, f"{name}.{kind}.{e}", index + 2 * e + k)
                if frozen[k]:
                    layer.requires_grad_(False)
                layers[kind].append(layer)
        for pname in self.parts:
            p = getattr(module, pname)
            module._parameters[pname] = nn.Parameter(torch.empty(p.shape, dtype=p.dtype, device="meta"),
                                                     requires_grad=p.requires_grad)
        return QGaLoreExperts(layers["gate_up"], layers["down"], module)

    @torch.no_grad()
    def export(self, experts: QGaLoreExperts, dtype: torch.dtype, memo: Optional[dict] = None) -> nn.Module:
        """The original fused-experts module, its 3-D parameters stacked from the experts' dequantized weights
        (same keys as before the transform); the copy of the shell shares ``memo``'s objects (e.g. the HF config)."""
        module = copy.deepcopy(experts.shell, memo if memo is not None else {})
        for pname, layers in zip(self.parts, (experts.gate_up, experts.down)):
            w = torch.stack([layer.dequantized_weight(torch.float32) for layer in layers]).to(dtype)
            requires_grad = all(layer.anchor.requires_grad for layer in layers)
            setattr(module, pname, nn.Parameter(w, requires_grad=requires_grad))
        return module

    def summary(self, model: nn.Module) -> Optional[str]:
        moe = [(n, m) for n, m in model.named_modules() if isinstance(m, QGaLoreExperts)]
        if not moe:
            return None
        return (f"MoE: {len(moe)} fused-experts modules, each expert matrix projected on its own "
                f"({sum(m.num_experts for _, m in moe)} experts, e.g. {moe[0][0]}.gate_up.0)")


# =========================================================================== registry
_REGISTRY: Dict[str, Handler] = {}


def _linear_handler() -> LayerHandler:
    return LayerHandler(
        nn.Linear,
        name=LINEAR,
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
    if old is not None and getattr(old, "layer_type", None) is not handler.layer_type:
        what = old.layer_type.__name__ if isinstance(old, LayerHandler) else "another kind of module"
        raise ValueError(f"a handler named {handler.name!r} is already registered for {what}; "
                         "give this one another name=")
    _REGISTRY[handler.name] = handler
    return handler


def handler_for(module: nn.Module) -> Optional[Handler]:
    """The handler of ``module``: that of its type or its nearest registered base class, else the first
    other handler that claims it (fused experts); None if unhandled."""
    _sync_lazy()
    by_type = {h.layer_type: h for h in _REGISTRY.values() if isinstance(h, LayerHandler)}  # the last per type wins
    for cls in type(module).__mro__:
        handler = by_type.get(cls)
        if handler is not None:
            return handler
    return next((h for h in _REGISTRY.values() if not isinstance(h, LayerHandler) and h.claims(module)), None)


def handler_named(name: str) -> Handler:
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


def handler_of(projected: nn.Module) -> Optional[Handler]:
    """The handler that made ``projected`` (None: no handler made it). A ``QGaLoreLinear`` names its own
    (:func:`handler_named` of its ``source_type``, which must be registered)."""
    if isinstance(projected, QGaLoreLinear):
        return handler_named(projected.source_type)
    _sync_lazy()
    return next((h for h in _REGISTRY.values() if h.made(projected)), None)


def projected_units(model: nn.Module) -> List[Tuple[str, nn.Module]]:
    """``(name, module)`` of every module a handler made in ``model``, outermost only (the layers inside
    projected experts are part of them), in module order."""
    _sync_lazy()
    made = tuple({h.made_type for h in _REGISTRY.values()})
    units: List[Tuple[str, nn.Module]] = []
    for name, module in model.named_modules():
        if units and units[-1][0] and name.startswith(units[-1][0] + "."):
            continue
        if isinstance(module, made):
            units.append((name, module))
    return units


def summaries(model: nn.Module) -> List[str]:
    """The handlers' lines about ``model`` for ``explain()``."""
    _sync_lazy()
    return [line for line in (h.summary(model) for h in _REGISTRY.values()) if line]


def supported_types() -> List[str]:
    """Names of the kinds of module the transform can project now."""
    _sync_lazy()
    return list(_REGISTRY)


_REGISTRY[LINEAR] = _linear_handler()  # first, whatever is imported already
_REGISTRY[ExpertsHandler.name] = ExpertsHandler()
