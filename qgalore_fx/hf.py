"""Hugging Face checkpoints of transformed models: never loaded as random weights, restored exactly.

``model.save_pretrained(dir)`` on a transformed model (and every HF Trainer
checkpoint of one) writes the model's own state dict: INT8 codes, scales and
each projected layer's training state, under the transformed names. Loading
that directory with the original class would leave every projected layer
randomly initialized, so :func:`transform` marks an HF model's config: its
``quantization_config`` becomes a dict without ``quant_method`` that carries
the transform's options under ``"qgalore_fx"``. ``from_pretrained`` of the
original class then refuses the directory with a ``ValueError`` (transformers
requires ``quant_method`` of every quantization config), whether or not
qgalore_fx is imported, instead of loading random weights; the marker's
``"load_with"`` and ``"dense_export"`` entries say what to do instead.

Two ways out:

* ``qgalore_fx.from_pretrained(dir)`` rebuilds the transformed model (built on
  ``meta``, transformed with the saved options) and loads the saved state
  exactly — for resuming training;
* ``qgalore_fx.export_dense(model).save_pretrained(dir)`` writes a plain model
  that ``from_pretrained`` of the original class loads — for sharing and
  inference (the dense copy's config has no marker).

Trainer checkpoints keep working as they are: Trainer restores a checkpoint
into the live transformed model, whose keys match.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.nn as nn

MARKER = "qgalore_fx"


def _hf_config(model: nn.Module):
    config = getattr(model, "config", None)
    try:
        from transformers import PretrainedConfig
    except ImportError:  # pragma: no cover - transformers is a dependency
        return None
    return config if isinstance(config, PretrainedConfig) else None


def mark_config(model: nn.Module, options: dict) -> None:
    """Mark an HF model's config as transformed (see the module docstring); no-op for other models."""
    config = _hf_config(model)
    if config is None:
        return
    from qgalore_fx import __version__

    config.quantization_config = {
        MARKER: options,
        "qgalore_fx_version": __version__,
        "load_with": "qgalore_fx.from_pretrained(path)",
        "dense_export": "qgalore_fx.export_dense(model).save_pretrained(path)",
    }


def unmark_config(model: nn.Module) -> None:
    """Drop the marker (a dense export is a plain model again)."""
    config = _hf_config(model)
    if config is not None and is_marked(config):
        del config.quantization_config


def is_marked(config) -> bool:
    q = getattr(config, "quantization_config", None)
    return isinstance(q, dict) and MARKER in q


def _read_state(path: Path) -> dict:
    from safetensors.torch import load_file

    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise ValueError(f"{str(path)!r} holds no .safetensors file (save it with save_pretrained)")
    state = {}
    for f in files:
        state.update(load_file(str(f)))
    return state


def key_renamer(model: nn.Module) -> Optional[Callable[[str], str]]:
    """transformers' renaming of checkpoint keys to ``model``'s names, or None (not an HF model, no rules).

    transformers 5.x saves some models under their legacy names (Mixtral's ``mlp.`` becomes
    ``block_sparse_moe.``) and renames them back when loading; this applies those renaming rules. Its weight
    *converters* (e.g. merging per-expert ``w1``/``w3`` into ``gate_up_proj``) are not applied here: a
    transformed model keeps its experts per expert (see :func:`qgalore_fx.experts.checkpoint_expert_keys`).
    """
    if _hf_config(model) is None:
        return None
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightRenaming, rename_source_key
        renamings = [t for t in get_model_conversion_mapping(model) if isinstance(t, WeightRenaming)]
    except (ImportError, AttributeError, TypeError):  # another transformers: the keys are taken as they are
        return None
    if not renamings:
        return None
    return lambda key: rename_source_key(key, renamings, [])[0]


def _hf_names(model: nn.Module, state: dict) -> dict:
    """``state`` with the keys ``save_pretrained`` renamed back to the model's own names."""
    own = set(model.state_dict().keys())
    rename = key_renamer(model)
    if rename is None or all(k in own for k in state):
        return state
    return {(k if k in own else rename(k)): v for k, v in state.items()}


def from_pretrained(path, model_class=None, device=None) -> nn.Module:
    """Rebuild a transformed model saved with ``save_pretrained`` and load its state exactly.

    ``model_class``: the transformers class to build (default: ``AutoModelForCausalLM``); ``device``: where
    the tensors go (default CPU). Training continues where it stopped once an optimizer is built with
    ``qgalore_fx.optimizer(model)`` (restore the optimizer's own state dict, if saved, as usual).
    """
    import transformers

    from qgalore_fx.config import QGaLoreConfig
    from qgalore_fx.rewrite import transform

    path = Path(os.fspath(path))
    config = transformers.AutoConfig.from_pretrained(str(path))
    if not is_marked(config):
        raise ValueError(f"{str(path)!r} was not saved from a model transformed by qgalore_fx (its config has no "
                         f"quantization_config['{MARKER}']); load it with transformers' from_pretrained")
    options = dict(config.quantization_config[MARKER])
    del config.quantization_config
    if options.get("filter_fn") is not None:
        raise ValueError(f"{str(path)!r} was transformed with filter_fn={options['filter_fn']!r}, which cannot be "
                         "saved: build the model, transform it with the same filter_fn and load_state_dict the files")
    known = {f.name for f in dataclasses.fields(QGaLoreConfig)}
    qconfig = QGaLoreConfig(**{k: (tuple(v) if k == "target_modules" and v is not None else v)
                               for k, v in options.items() if k in known and k != "filter_fn"})
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(config) if model_class is None else model_class(config)
    model = transform(model, config=qconfig, device=device)
    state = _hf_names(model, _read_state(path))
    missing, unexpected = model.load_state_dict(state, strict=False)
    # save_pretrained stores a tied parameter once: a missing key is fine only if it aliases a loaded one
    loaded = {id(t) for k, t in model.state_dict(keep_vars=True).items() if k in state}
    current = model.state_dict(keep_vars=True)
    missing = [k for k in missing if id(current[k]) not in loaded]
    if missing or unexpected:
        raise ValueError(f"{str(path)!r} does not fit the rebuilt model: missing {missing[:5]}, unexpected "
                         f"{unexpected[:5]}")
    return model

