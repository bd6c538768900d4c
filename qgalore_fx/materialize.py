"""Materialize a model built on the ``meta`` device, one layer at a time, straight into INT8.

    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    model = qgalore_fx.transform(model, rank=1024, weights="path/to/safetensors-dir")   # or a state dict, or None

A projected layer's float weight exists only while that one layer is being
quantized: it is read from ``weights`` (a state-dict mapping, a ``.safetensors``
file or a directory of them; only the needed tensor is read from disk), or
initialized as the model would initialize it (HF ``_init_weights``, else the
layer type's constructor) when ``weights`` is None. The layer's handler
(:mod:`qgalore_fx.handlers`) reads it from a :class:`MetaWeights`: GPT-2's
``Conv1D`` keeps its weight as [in, out] under ``{name}.weight``, which is read
and transposed; fused MoE experts may be stored per expert. So a 7B model never exists in
full precision in memory. Everything that is not projected (embeddings, norms,
rotary buffers) is then materialized module by module, initialized, and
overwritten from ``weights`` where it has the tensor. Parameters shared by
several modules (tied embeddings) stay shared.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Callable, Dict, Mapping, Optional, Sequence, Union

import torch
import torch.nn as nn
from torch import Tensor

WeightsArg = Union[None, str, os.PathLike, Sequence[Union[str, os.PathLike]], Mapping[str, Tensor]]


class WeightSource:
    """Reads named tensors lazily from a mapping or safetensors files."""

    def __init__(self, weights: WeightsArg):
        self._mapping: Optional[Mapping[str, Tensor]] = None
        self._files: Dict[str, Path] = {}
        self._alias: Dict[str, str] = {}  # the model's name -> the name stored (see use_model_names)
        if weights is None:
            return
        if isinstance(weights, Mapping):
            self._mapping = weights
            return
        if isinstance(weights, (list, tuple)):  # the shards of one checkpoint
            files = [Path(f) for f in weights]
            bad = [str(f) for f in files if not (f.is_file() and f.suffix == ".safetensors")]
            if not files or bad:
                raise ValueError(f"weights list must name .safetensors files; not one: {bad[:3] or files}")
        else:
            if not isinstance(weights, (str, os.PathLike)):
                raise TypeError(f"weights must be None, a state-dict mapping or a path (or list of paths) to "
                                f"safetensors, got {type(weights).__name__}")
            path = Path(weights)
            if path.is_dir():
                files = sorted(path.glob("*.safetensors"))
                if not files:
                    raise ValueError(f"weights directory {str(path)!r} contains no .safetensors file")
            elif path.is_file() and path.suffix == ".safetensors":
                files = [path]
            else:
                raise ValueError(f"weights path {str(path)!r} is neither a .safetensors file nor a directory of them")
        from safetensors import safe_open

        for f in files:
            try:
                with safe_open(str(f), framework="pt") as handle:
                    keys = list(handle.keys())
            except Exception as e:
                raise ValueError(f"weights file {str(f)!r} is not a readable safetensors file: {e}") from None
            for key in keys:
                self._files[key] = f

    @property
    def empty(self) -> bool:
        return self._mapping is None and not self._files

    def keys(self):
        return list(self._mapping.keys()) if self._mapping is not None else list(self._files)

    def use_model_names(self, rename: Callable[[str], str]) -> None:
        """Also answer to ``rename(stored_key)``: the name the model gives a stored tensor (e.g. HF's
        renaming of legacy checkpoint keys, :func:`key_renamer`)."""
        for stored in self.keys():
            name = rename(stored)
            if name != stored and name not in self:
                self._alias[name] = stored

    def __contains__(self, key: str) -> bool:
        key = self._alias.get(key, key)
        return (self._mapping is not None and key in self._mapping) or key in self._files

    def get(self, key: str, shape) -> Optional[Tensor]:
        key = self._alias.get(key, key)
        if self._mapping is not None:
            t = self._mapping.get(key)
        elif key in self._files:
            t = _read(self._files[key], key)
        else:
            return None
        if t is None:
            return None
        if tuple(t.shape) != tuple(shape):
            raise ValueError(f"weights[{key!r}] has shape {tuple(t.shape)}, the model expects {tuple(shape)}")
        return t


def _read(path: Path, key: str) -> Tensor:
    """One tensor, copied out of its file. The file is mapped only while it is read: pages of a mapping that
    stays open count in the process's resident memory, so holding every shard open while each layer is read
    would grow the process by the whole checkpoint."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        return handle.get_tensor(key)


def key_renamer(model: nn.Module) -> Optional[Callable[[str], str]]:
    """transformers' renaming of checkpoint keys to ``model``'s names, or None (not an HF model, no rules).

    transformers 5.x saves some models under their legacy names (Mixtral's ``mlp.`` becomes
    ``block_sparse_moe.``) and renames them back when loading; this applies those renaming rules. Its weight
    *converters* (e.g. merging per-expert ``w1``/``w3`` into ``gate_up_proj``) are not applied here: a
    transformed model keeps its experts per expert (see ``ExpertsHandler.checkpoint_keys`` in :mod:`qgalore_fx.handlers`).
    """
    if not hasattr(model, "config") or not hasattr(type(model), "from_pretrained"):
        return None
    try:
        from transformers import PreTrainedModel
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightRenaming, rename_source_key

        if not isinstance(model, PreTrainedModel):
            return None
        renamings = [t for t in get_model_conversion_mapping(model) if isinstance(t, WeightRenaming)]
    except (ImportError, AttributeError, TypeError):  # another transformers: the keys are taken as they are
        return None
    if not renamings:
        return None
    return lambda key: rename_source_key(key, renamings, [])[0]


@dataclasses.dataclass(frozen=True)
class MetaWeights:
    """Where the tensors of a model built on the ``meta`` device come from: ``source`` (empty: initialize as the
    model would), ``device`` (where the real tensors go) and the ``model`` itself (its ``_init_weights`` and
    transformers' checkpoint conventions). A layer handler (:mod:`qgalore_fx.handlers`) reads its layer from it."""

    model: nn.Module
    source: WeightSource
    device: torch.device

    @property
    def init(self) -> Optional[Callable[[nn.Module], None]]:
        """The model's own initializer (HF ``_init_weights``), or None."""
        init = getattr(self.model, "_init_weights", None)
        return init if callable(init) else None

    def tensor(self, key: str, shape, what: str, dtype: torch.dtype = torch.float32) -> Optional[Tensor]:
        """``key`` from ``source``, in ``dtype`` on ``device`` (None when the source is empty: initialize instead).
        A key the source lacks is an error saying it is ``what``'s."""
        if self.source.empty:
            return None
        t = self.source.get(key, shape)
        if t is None:
            raise ValueError(f"weights has no tensor {key!r} for {what}")
        return t.to(device=self.device, dtype=dtype)


@torch.no_grad()
def materialize_rest(model: nn.Module, source: WeightSource, device, skip: tuple) -> None:
    """Materialize every remaining meta tensor (modules of type ``skip`` are already real)."""
    shared: Dict[int, nn.Parameter] = {}
    loaded: Dict[int, str] = {}
    missing = []
    init = getattr(model, "_init_weights", None)
    for name, module in model.named_modules():
        if isinstance(module, skip):
            continue
        fresh = False
        reused = []  # parameters shared with a module materialized earlier (tied weights): already set
        for pname, p in list(module._parameters.items()):
            if p is None or not p.is_meta:
                continue
            if id(p) in shared:
                reused.append(shared[id(p)])
            else:
                shared[id(p)] = nn.Parameter(torch.empty_like(p, device=device), requires_grad=p.requires_grad)
                fresh = True
            module._parameters[pname] = shared[id(p)]
        for bname, b in list(module._buffers.items()):
            if b is not None and b.is_meta:
                module._buffers[bname] = torch.empty_like(b, device=device)
                fresh = True
        if not fresh and not reused:
            continue
        if fresh:
            kept = [(t, t.detach().clone()) for t in reused]  # initializing this module must not reset them
            if callable(init):
                init(module)
            elif hasattr(module, "reset_parameters"):
                module.reset_parameters()
            elif source.empty:
                raise ValueError(f"cannot initialize {name!r} ({type(module).__name__}) from the meta device: it "
                                 "has no reset_parameters(); pass weights= with its tensors")
            for t, value in kept:
                t.copy_(value)
        if source.empty:
            continue
        for pname, p in module.named_parameters(prefix=name, recurse=False):
            if _copy_from(source, pname, p):
                loaded[id(p)] = pname
            elif id(p) not in loaded:
                missing.append((pname, p))
        persistent = {k for k in module._buffers if k not in module._non_persistent_buffers_set}
        for bname, b in module.named_buffers(prefix=name, recurse=False):
            if bname.rsplit(".", 1)[-1] in persistent and not _copy_from(source, bname, b):
                missing.append((bname, b))
    still_missing = [n for n, t in missing if id(t) not in loaded]  # a tied parameter loaded under its other name
    if still_missing:
        raise ValueError(f"weights has no tensor for {still_missing[:5]} ({len(still_missing)} missing); "
                         "pass a complete state dict or set weights=None to initialize")


def _copy_from(source: WeightSource, key: str, target: Tensor) -> bool:
    t = source.get(key, target.shape)
    if t is None:
        return False
    target.copy_(t)
    return True


def describe(weights: WeightsArg) -> str:
    if weights is None:
        return "initialized"
    if isinstance(weights, Mapping):
        return f"state dict ({len(weights)} tensors)"
    return json.dumps(str(weights))
