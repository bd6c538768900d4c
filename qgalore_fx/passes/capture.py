"""Choose the layers to project and capture the regions around them as FX graphs.

A module is projectable when a handler claims it (:mod:`qgalore_fx.handlers`);
"linear" below means any layer of a handler that is rewritten in traced regions
(``nn.Linear``, GPT-2's ``Conv1D``, ...). Modules of a handler that is not
(fused MoE experts) are always swapped as modules, after every linear's region.

Why regions, not one whole-model graph (measured with torch 2.13 and
transformers 5.23, DESIGN.md §5): ``torch.fx.symbolic_trace`` fails on
``LlamaForCausalLM``, ``LlamaDecoderLayer`` and ``LlamaAttention`` (Python
control flow, iteration over proxies, decorated forwards) but succeeds on
``LlamaMLP`` and on plain modules. ``torch.export`` and Dynamo do capture the
whole model, but their graphs take the weights as *inputs*: a pass there can
re-route the op yet cannot change what the model stores, and the captured
program no longer behaves like the HF model (``generate``, caches, kwargs,
``ModelOutput``). So capture keeps the user's module tree and works bottom-up:

1. Walk from the root. A module that contains no selected linear is left alone.
2. A module that contains selected linears is traced with ``torch.fx`` (every
   submodule that holds no selected linear stays a leaf ``call_module`` node, so
   parameter names and state-dict keys do not change). If tracing succeeds the
   module is replaced by the resulting ``GraphModule`` — the *region* — and the
   passes rewrite its graph.
3. If tracing fails, its children are visited instead; a selected linear whose
   parent could not be traced is its own region and is rewritten by module
   swap, calling the same op from ``QGaLoreLinear.forward``.

The root module itself is traced only when it is an ``nn.Sequential`` or
already a ``GraphModule``: replacing a user's top-level class with a
``GraphModule`` would drop its methods (``generate``, ``save_pretrained``).

Either way the resulting model runs under ``torch.compile`` as one graph per
frame: the rewritten op is a ``torch.library`` custom op with a fake kernel,
so Dynamo sees the same node in traced and swapped regions.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Dict, List, Optional, Tuple

import torch.fx as fx
import torch.nn as nn

from qgalore_fx.config import QGaLoreConfig
from qgalore_fx.handlers import handler_for, supported_types


@dataclasses.dataclass
class Region:
    """A captured part of the model: a traced GraphModule or a single swapped linear."""

    name: str  # fully-qualified name in the model ('' = root)
    kind: str  # "graph" or "module"
    module: nn.Module
    note: str = ""  # why a parent could not be traced, for explain()
    layers: frozenset = frozenset()  # a graph's selected linears, by their names inside it: what pass 1 rewrites


def _tied_to_input_embeddings(model: nn.Module, layer: nn.Module) -> bool:
    get_in = getattr(model, "get_input_embeddings", None)
    emb = get_in() if callable(get_in) else None
    handler = handler_for(layer)
    weight = getattr(emb, "weight", None)
    return handler is not None and weight is not None and any(w is weight for w in handler.weights(layer))


def _supported() -> str:
    return ", ".join(supported_types())


def block_members(model: nn.Module) -> set:
    """Names of every module inside a transformer block (an element of an ``nn.ModuleList``), the lists too."""
    names = set()
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList):
            names.update(sub for sub, _ in module.named_modules(prefix=name))
    return names


def chosen_by_rules(config: QGaLoreConfig, module: nn.Module, name: str) -> bool:
    """Whether ``target_modules`` (a regex searched in ``name``) and ``filter_fn`` both accept ``module``."""
    wanted = True
    if config.target_modules is not None:
        wanted = any(re.search(p, name) for p in config.target_modules)
    if wanted and config.filter_fn is not None:
        wanted = bool(config.filter_fn(module, name))
    return wanted


#: ``(name, shape, why)`` of a module the default rule would project but leaves to the AdamW group.
LeftOut = Tuple[str, Tuple[int, ...], str]


def select_layers(model: nn.Module, config: QGaLoreConfig) -> Tuple[Dict[str, nn.Module], List[LeftOut]]:
    """The modules to project by fully-qualified name, in module order, and those left out.

    A module can be projected when a handler claims it (:mod:`qgalore_fx.handlers`: ``nn.Linear``, GPT-2's
    ``Conv1D``, one added with ``qgalore_fx.register_layer_handler``, fused MoE experts).
    Default: every such module inside a transformer block (an element of an ``nn.ModuleList``), or every
    such module when the model has no blocks. ``target_modules`` (regexes searched in the name) and
    ``filter_fn(module, fqn)`` replace the default; given together, a module must pass both. A module
    ``filter_fn`` selects must have a handler; modules ``target_modules`` alone matches without one
    (containers such as ``mlp``) are skipped. ``include_lm_head`` adds the output head.

    ``rank`` must fit every matrix of a chosen module (:meth:`QGaLoreConfig.fits`): one chosen explicitly
    (``target_modules``/``filter_fn``) that it does not fit is an error, as is the default rule's choice when
    it fits none; otherwise the modules it does not fit are left out (``explain()`` lists them), as are the
    modules of a form their handler cannot project when it says so (``Handler.skips_unsupported``).
    """
    custom = config.target_modules is not None or config.filter_fn is not None
    in_blocks = block_members(model)

    head = None
    get_out = getattr(model, "get_output_embeddings", None)
    if callable(get_out):
        head = get_out()

    chosen: Dict[str, nn.Module] = {}
    left_out: List[LeftOut] = []
    for name, module in model.named_modules():
        if not name:
            continue
        handler = handler_for(module)
        if custom:
            if not chosen_by_rules(config, module, name):
                continue
            if handler is None:
                if config.filter_fn is not None:
                    raise ValueError(
                        f"filter_fn selected {name!r} of type {type(module).__name__}, which has no layer handler; "
                        f"supported types: {_supported()}. Make filter_fn return True only for those, or add a "
                        "handler with qgalore_fx.register_layer_handler"
                    )
                continue  # a regex may match containers; only their handled layers count
        else:
            if handler is None:
                continue
            if module is head and not config.include_lm_head:
                continue
            if in_blocks and name not in in_blocks and module is not head:
                continue
        problem = handler.problem(module)
        if problem is not None:
            if custom or not handler.skips_unsupported:
                raise ValueError(f"{name!r} is a {type(module).__name__} ({problem}), which qgalore_fx cannot "
                                 "project; exclude it with filter_fn/target_modules")
            left_out.append((name, handler.listed_shape(module), problem))
            continue
        chosen[name] = module

    if config.include_lm_head and head is not None and handler_for(head) is not None:
        head_name = next(n for n, m in model.named_modules() if m is head)
        chosen.setdefault(head_name, head)

    for name, module in chosen.items():
        if _tied_to_input_embeddings(model, module):
            raise ValueError(
                f"{name!r} shares its weight with the input embedding (tied weights) and cannot be stored as INT8 "
                "codes; set include_lm_head=False or untie the weights (config.tie_word_embeddings=False)"
            )
    _check_not_shared(model, chosen)
    if not chosen:
        how = "filter_fn/target_modules" if custom else "the default rule (handled layers inside transformer blocks)"
        raise ValueError(f"{how} selected no layer of {type(model).__name__}; nothing to transform "
                         f"(projectable types: {_supported()})")

    # Before anything is rewritten. The default rule leaves out modules smaller than the rank (e.g. a 1 x 128
    # MoE gate) and lists them in explain(); a module chosen explicitly must fit.
    too_small = {name: [(f"{name}.{part}" if part else name, shape)
                        for part, shape in handler_for(module).shapes(module).items() if not config.fits(*shape)]
                 for name, module in chosen.items()}
    too_small = {name: parts for name, parts in too_small.items() if parts}
    if too_small and (custom or len(too_small) == len(chosen)):
        matrix, (m, n) = next(iter(too_small.values()))[0]
        config.check_fits(matrix, m, n)
    for name in too_small:
        module = chosen.pop(name)
        handler = handler_for(module)
        left_out.append((name, handler.listed_shape(module), handler.smaller_than_rank(config.rank)))
    return chosen, left_out


def _check_not_shared(model: nn.Module, chosen: Dict[str, nn.Module]) -> None:
    """Refuse, before anything changes, selected layers that are shared.

    A layer reachable under two names, or whose weight another module also holds, would be rewritten
    once and then either fail at its second place or silently lose the tie (each copy updating on its
    own): qgalore_fx stores each projected weight once, with its own update, so it asks for an untied model.
    """
    paths: Dict[int, List[str]] = {}
    owners: Dict[int, List[str]] = {}
    for mod_name, module in model.named_modules(remove_duplicate=False):
        paths.setdefault(id(module), []).append(mod_name)
        for pname, p in module._parameters.items():
            if p is not None:
                owners.setdefault(id(p), []).append(f"{mod_name}.{pname}" if mod_name else pname)
    for name, module in chosen.items():
        where = sorted(set(paths.get(id(module), [])))
        if len(where) > 1:
            raise ValueError(
                f"layer {name!r} is reachable from {len(where)} places ({', '.join(where[:4])}); a shared layer "
                "cannot be rewritten in one place only. Give each place its own layer, or exclude it with "
                "filter_fn/target_modules")
        sharers = sorted({o for w in handler_for(module).weights(module) for o in owners.get(id(w), [])
                          if not o.startswith(f"{name}.")})
        if sharers:
            raise ValueError(
                f"{name!r} shares its weight with {', '.join(sharers[:3])} (tied weights); a projected weight is "
                "stored once as INT8 codes with its own update, so the tie would be lost. Untie the weights, or "
                "exclude the layer with filter_fn/target_modules")


class _RegionTracer(fx.Tracer):
    """Traces through modules that contain selected linears; everything else is a leaf."""

    def __init__(self, keep_open: frozenset = frozenset()):
        # The default (every module a leaf) is what unpickling a GraphModule re-traces with.
        super().__init__()
        self.keep_open = keep_open

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return id(m) not in self.keep_open


def _set_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def capture_regions(model: nn.Module, selected: Dict[str, nn.Module], trace: bool = True):
    """Replace traceable regions by GraphModules in place; returns (model, regions).

    The returned model is ``model`` itself unless the root was traced. A selected module whose handler is not
    ``traced`` (fused experts) is a region of its own, swapped as a module, and the regions around it are not
    traced for its sake; these regions come after every linear's, so the layers keep their numbering
    (:meth:`qgalore_fx.handlers.Handler.project`'s ``index``: their random streams) whatever the model.
    """
    swapped = {name: module for name, module in selected.items() if not handler_for(module).traced}
    selected = {name: module for name, module in selected.items() if name not in swapped}
    containing = set()  # ids of modules with a selected linear at or below them
    for name in selected:
        parts = name.split(".")
        for i in range(len(parts) + 1):
            containing.add(id(model.get_submodule(".".join(parts[:i]))))
    selected_ids = {id(m) for m in selected.values()}

    regions: List[Region] = []
    root_holder = {"root": model}

    def visit(module: nn.Module, prefix: str, note: str) -> None:
        if id(module) not in containing:
            return
        if id(module) in selected_ids:
            regions.append(Region(prefix, "module", module, note))
            return
        is_root = prefix == ""
        traceable_root = isinstance(module, (nn.Sequential, fx.GraphModule))
        if trace and (not is_root or traceable_root):
            gm: Optional[fx.GraphModule] = None
            try:
                tracer = _RegionTracer(containing - selected_ids)
                graph = tracer.trace(module)
                gm = fx.GraphModule(module, graph, class_name=type(module).__name__)
            except Exception as e:  # tracing failures are expected; fall back to the children
                note = f"{prefix or type(module).__name__}: {type(e).__name__}: {str(e).splitlines()[0][:120]}"
            if gm is not None:
                if is_root:
                    root_holder["root"] = gm
                else:
                    _set_submodule(root_holder["root"], prefix, gm)
                inside = frozenset(n[len(prefix) + 1:] if prefix else n for n in selected
                                   if not prefix or n.startswith(prefix + "."))
                regions.append(Region(prefix, "graph", gm, layers=inside))
                return
        for child_name, child in module.named_children():
            visit(child, f"{prefix}.{child_name}" if prefix else child_name, note)

    visit(model, "", "")
    regions += [Region(name, "module", module) for name, module in swapped.items()]
    return root_holder["root"], regions
