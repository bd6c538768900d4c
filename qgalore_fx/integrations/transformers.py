"""Q-GaLore as a transformers quantization method: ``quant_method: "qgalore_fx"``.

    import qgalore_fx
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(path, quantization_config=qgalore_fx.QGaLoreQuantizationConfig(rank=256))

``import qgalore_fx`` registers the method with transformers (as soon as transformers' quantizer registry is
imported, see ``qgalore_fx/__init__.py``). Three things follow:

* **Loading a plain checkpoint** with ``quantization_config=QGaLoreQuantizationConfig(rank=...)``: transformers
  builds the model on ``meta``; :class:`QGaLoreHfQuantizer` transforms it there and reads each projected weight
  from the safetensors shards straight into INT8 (:func:`qgalore_fx.rewrite.transform_projected`), one layer at a
  time; transformers then loads everything that is not projected (embeddings, norms, head) as it always does, in
  its ``dtype`` (float32 or bfloat16: :meth:`QGaLoreHfQuantizer.update_dtype`), except a large tensor the
  checkpoint holds in another float dtype, which the quantizer reads in row chunks itself (:func:`_read_converted`).
  The full-precision model never exists in memory.
* **Saving**: a model loaded this way, or transformed with :func:`qgalore_fx.transform`, carries this config as
  ``config.quantization_config``; ``save_pretrained`` writes ``"quant_method": "qgalore_fx"`` with the transform's
  options and the model's whole state dict (INT8 codes, scales, projections, moments, counters, refresh
  schedule), sharded by ``max_shard_size``, in safetensors.
* **Reloading** that folder with ``from_pretrained(folder)`` (qgalore_fx imported) rebuilds the transformed model
  and restores every tensor exactly; training continues as if never interrupted. Without qgalore_fx imported,
  transformers would skip an unknown quantization method with a warning and load the folder as a dense model
  whose projected weights are missing (randomly initialized). So the saved ``config.json`` also names, as its
  ``attn_implementation``, a value transformers refuses with a ``ValueError`` whose text says to
  ``import qgalore_fx`` (:meth:`QGaLoreHfQuantizer.get_state_dict_and_metadata`); with qgalore_fx imported the
  model's own attention comes back. ``qgalore_fx.export_dense(model).save_pretrained(dir)`` writes a dense
  folder any loader reads.

How the loading keeps the state intact: transformers replaces every tensor it loads with a new Parameter, fills
the keys it did not find with uninitialized memory and re-creates non-persistent buffers. Before it starts, the
quantizer notes every real tensor of the transformed layers (and frees the storage of those the checkpoint will
provide); afterwards it puts the same tensor objects back, adopting the loaded values where there were any. So a
transformed layer keeps its own tensors, flags and dtypes, whatever transformers did to the module slots.
"""

from __future__ import annotations

import dataclasses
import math
import re
import warnings
from pathlib import Path
from typing import Optional

import torch
import torch.nn as nn
from torch import Tensor
from transformers.quantizers.auto import (AUTO_QUANTIZATION_CONFIG_MAPPING, AUTO_QUANTIZER_MAPPING,
                                          register_quantization_config, register_quantizer)
from transformers.quantizers.base import HfQuantizer
from transformers.utils.quantization_config import QuantizationConfigMixin

from qgalore_fx import __version__
from qgalore_fx.config import QGaLoreConfig
from qgalore_fx.export import EXPORT_HOOKS
from qgalore_fx.handlers import projected_units
from qgalore_fx.host_allocator import release_free_memory
from qgalore_fx.materialize import key_renamer
from qgalore_fx.rewrite import TRANSFORM_HOOKS, logical_parameters, projected_layers, transform_projected

#: The ``quant_method`` of a transformed model's ``config.json``.
METHOD = "qgalore_fx"
#: How folders saved before ``quant_method`` existed mark a transformed model: a dict without ``quant_method``
#: holding the options under this key (``qgalore_fx.from_pretrained`` still reads them).
OLD_MARKER = "qgalore_fx"

_OPTIONS = tuple(f.name for f in dataclasses.fields(QGaLoreConfig))
#: The ``attn_implementation`` a saved ``config.json`` carries, followed by the model's own attention and ")":
#: transformers without qgalore_fx refuses to build the model and prints it.
_REFUSAL = ("qgalore_fx: this folder holds a model trained with qgalore_fx (INT8 weights and training state); "
            "run `import qgalore_fx` before from_pretrained, or save a dense copy with qgalore_fx.export_dense "
            "(attention: ")
#: Layer tensors whose saved shape may differ from a fresh layer's: the accumulator (and its undo copies) are
#: sized by the optimizer (``accumulation_steps``), the anchor had 0 elements in older saves.
_SIZED_ON_LOAD = ("accum", "undo_proj_codes", "undo_proj_scales", "anchor")


class QGaLoreQuantizationConfig(QuantizationConfigMixin):
    """``quantization_config=`` for transformers: the options of :func:`qgalore_fx.transform`.

    ``QGaLoreQuantizationConfig(rank=256, update_interval=200, ...)`` takes exactly the transform's keyword options
    (:class:`qgalore_fx.QGaLoreConfig`, validated there) except ``filter_fn``, which a ``config.json`` cannot hold
    (choose layers with ``target_modules``, regular expressions of module names).
    """

    def __init__(self, rank: Optional[int] = None, **options):
        options.pop("quant_method", None)  # from_dict passes a saved dict back whole
        version = options.pop("qgalore_fx_version", __version__)
        filter_fn = options.pop("filter_fn", None)
        if filter_fn is not None and not isinstance(filter_fn, str):
            raise TypeError("QGaLoreQuantizationConfig cannot hold filter_fn (a config.json holds no callables); "
                            "choose the layers with target_modules=[regular expressions of module names]")
        config = QGaLoreConfig.from_options(rank=rank, **options)
        self.quant_method = METHOD
        self.__dict__.update({k: v for k, v in config.to_dict().items() if k != "filter_fn"})
        # A model transformed with filter_fn directly (not through this config) is saved with the callable's
        # name: enough to refuse a reload that could not choose the same layers.
        self.filter_fn = filter_fn
        self.qgalore_fx_version = version

    @classmethod
    def from_transform_config(cls, config: QGaLoreConfig) -> "QGaLoreQuantizationConfig":
        return cls(**config.to_dict())

    def transform_config(self) -> QGaLoreConfig:
        """The :class:`qgalore_fx.QGaLoreConfig` these options describe (validated again: ``update()`` may have
        changed them)."""
        if self.filter_fn is not None:
            raise ValueError(f"this model was transformed with filter_fn={self.filter_fn!r}, which cannot be saved: "
                             "build the model, transform it with the same filter_fn and load_state_dict the files")
        options = {k: getattr(self, k) for k in _OPTIONS if k != "filter_fn" and hasattr(self, k)}
        return QGaLoreConfig.from_options(**options)


def _one_device(device_map) -> Optional[torch.device]:
    """The single device of ``device_map`` (None: CPU); a map over several devices is refused."""
    if device_map is None:
        return None
    if isinstance(device_map, (str, torch.device, int)):
        devices = {device_map}
    elif isinstance(device_map, dict):
        devices = set(device_map.values())
    else:
        devices = {object()}
    if len(devices) != 1 or next(iter(devices)) in ("disk", "auto", "balanced", "balanced_low_0", "sequential"):
        raise ValueError(f"quant_method 'qgalore_fx' loads the whole model onto one device; got device_map="
                         f"{device_map!r}. Pass device_map=None (CPU) or {{'': 'cuda:0'}}; to spread a model over "
                         "devices, shard it with FSDP2 after loading")
    device = next(iter(devices))
    return torch.device(f"cuda:{device}" if isinstance(device, int) else device)


class QGaLoreHfQuantizer(HfQuantizer):
    """Builds the transformed model inside ``from_pretrained`` (module docstring)."""

    requires_calibration = False

    def __init__(self, quantization_config, **kwargs):
        super().__init__(quantization_config, **kwargs)
        # While loading: (our tensor, its slots [(module, container, name, state key or None)], the key the
        # checkpoint fills it from or None, its shape before loading).
        self._slots: list = []
        self._hidden = None  # the state-dict hook of _hide, while transformers loads

    # What transformers asks a method -------------------------------------------------------------------------

    def validate_environment(self, *args, **kwargs):
        _one_device(kwargs.get("device_map"))
        self.quantization_config.transform_config()  # refuse bad options before the model is built

    def update_dtype(self, dtype):
        """The dtype of what is not projected (embeddings, norms, head, biases), which the model computes in:
        transformers' ``dtype`` (``"auto"``: the checkpoint's). float32 keeps fp32 weights for AdamW; bfloat16
        stores them in bf16, each update computed in fp32 and written back with stochastic rounding
        (:func:`qgalore_fx.fused_rest.round_bf16_`), and halves their memory. float16 cannot be trained without
        loss scaling: float32 is used instead, with a warning."""
        if dtype in (torch.float32, torch.bfloat16):
            return dtype
        if dtype is not None:
            warnings.warn(f"quant_method 'qgalore_fx' stores the weights it does not project (embeddings, norms, head) "
                          f"in float32 or bfloat16; dtype={dtype} cannot be trained without loss scaling, so float32 "
                          "is used (pass dtype=torch.bfloat16 for 16-bit storage)", stacklevel=2)
        return torch.float32

    def update_attn_implementation(self, config):
        """A folder saved by :meth:`get_state_dict_and_metadata` names an attention only qgalore_fx reads."""
        saved = getattr(config, "_attn_implementation", None)
        if isinstance(saved, str) and saved.startswith(_REFUSAL):
            chosen = saved[len(_REFUSAL):].rstrip(")")
            config._attn_implementation = None if chosen == "default" else chosen
        return config

    def get_state_dict_and_metadata(self, model):
        """Called by ``save_pretrained`` before it writes ``config.json``: the saved config names, as its
        ``attn_implementation``, a value transformers refuses with a message naming qgalore_fx, so that the
        folder is never loaded as a dense model with the projected weights missing; with qgalore_fx imported,
        :meth:`update_attn_implementation` puts the model's own attention back."""
        chosen = getattr(model.config, "_attn_implementation", None)
        model.config.__dict__["attn_implementation"] = f"{_REFUSAL}{chosen or 'default'})"
        return None, {}

    def get_new_dtype(self, converter, param, dtype):
        return None  # a saved transformed model holds each tensor in its own dtype: load it as it is

    def is_serializable(self):
        return True

    @property
    def is_trainable(self) -> bool:
        return True  # every projected weight is trained in place (INT8 codes, stochastically rounded)

    @property
    def is_qat_trainable(self) -> bool:
        return True  # full-parameter training of the quantized model itself, no adapters needed

    @property
    def is_compileable(self) -> bool:
        return True

    # Before and after transformers loads the checkpoint ------------------------------------------------------

    def _process_model_before_weight_loading(self, model, device_map=None, checkpoint_files=None, **kwargs):
        files = [Path(f) for f in (checkpoint_files or [])]
        bad = [f.name for f in files if f.suffix != ".safetensors"]
        if bad:
            raise ValueError(f"quant_method 'qgalore_fx' reads safetensors checkpoints; got {bad[:3]} (save the model "
                             "with save_pretrained(..., safe_serialization=True), or convert it)")
        weights = None if self.pre_quantized or not files else files
        device = _one_device(device_map)
        stored = _stored_tensors(model, files)
        with torch.device(device or "cpu"):  # transformers calls this under its meta-device context
            transform_projected(model, self.quantization_config.transform_config(), weights=weights, device=device)
            converted = self._convert_large(model, stored, device)
        self._hold(model, {k: v.shape for k, v in stored.items() if k not in converted})
        self._hide(model, converted)

    def _process_model_after_weight_loading(self, model, **kwargs):
        self._put_back(model)
        # The loading's freed temporaries (each fp32 weight read, quantized and dropped) leave holes in the heap:
        # hand them all back once, whatever their size (20-50 MiB at 117M; the 64 MiB floor of the per-layer
        # trims during the build would keep them)
        release_free_memory(min_bytes=0)
        return model

    @torch.no_grad()
    def _convert_large(self, model: nn.Module, stored: dict, device) -> set:
        """Read the large unprojected tensors whose checkpoint dtype is not the model's ourselves
        (:data:`CONVERT_MIN_NUMEL`, :func:`_read_converted`); returns their state keys (a tied one under every
        name). Skipped when loading a saved transformed model, whose tensors are kept in their own dtypes."""
        if self.pre_quantized:
            return set()
        converted = set()
        for t, places in _tensor_slots(model, meta=True).values():
            keys = [key for *_, key in places if key is not None]
            source = next((stored[k] for k in keys if k in stored), None)
            if (source is None or source.dtype is None or source.dtype == t.dtype or not t.is_floating_point()
                    or t.numel() < CONVERT_MIN_NUMEL or source.shape != tuple(t.shape)):
                continue
            value = _read_converted(source, t.dtype, device or "cpu")
            if isinstance(t, nn.Parameter):
                value = nn.Parameter(value, requires_grad=t.requires_grad)
            for module, container, name, _ in places:
                getattr(module, container)[name] = value
            converted.update(keys)
        return converted

    def _hide(self, model: nn.Module, keys: set) -> None:
        """While transformers loads: ``keys`` are not in the model's state dict, so it neither reads them from the
        checkpoint (we did) nor reports them; :meth:`_put_back` shows them again."""
        if not keys:
            return
        hidden = frozenset(keys)

        def drop(module, state_dict, prefix, local_metadata):
            for key in hidden:
                state_dict.pop(key, None)

        self._hidden = model._register_state_dict_hook(drop)
        patterns = {f"^{re.escape(k)}$" for k in hidden}  # beside _hold's (which runs first)
        model._keys_to_ignore_on_load_unexpected = set(getattr(model, "_keys_to_ignore_on_load_unexpected", None)
                                                       or ()) | patterns

    def _hold(self, model: nn.Module, stored: dict) -> None:
        """Note every real tensor slot; free those the checkpoint will fill; keep transformers' init away."""
        groups = _tensor_slots(model, meta=False)
        for module in model.modules():
            tensors = [t for t in (*module._parameters.values(), *module._buffers.values()) if t is not None]
            if tensors and not any(t.is_meta for t in tensors):
                module._is_hf_initialized = True  # transformers' _init_weights must not touch it
        self._slots = []
        for t, slots in groups.values():
            loaded = [key for *_, key in slots if key is not None and key in stored]
            shape = t.shape
            if loaded:  # transformers will load it: free ours now, take over its values afterwards
                placeholder = torch.empty(stored[loaded[0]], dtype=t.dtype, device="meta")
                if isinstance(t, nn.Parameter):
                    placeholder = nn.Parameter(placeholder, requires_grad=t.requires_grad)
                t.data = torch.empty(0, dtype=t.dtype, device=t.device)
                for module, container, name, _ in slots:
                    getattr(module, container)[name] = placeholder
            self._slots.append((t, slots, loaded[0] if loaded else None, shape))
        names = [re.escape(name) for name, _ in projected_units(model)]
        if names:  # the report: projected layers hold no `weight`, the checkpoint's fp weights are not used
            layers = r"^(?:" + "|".join(names) + r")\."
            model._keys_to_ignore_on_load_missing = {layers}
            model._keys_to_ignore_on_load_unexpected = {layers}

    @torch.no_grad()
    def _put_back(self, model: nn.Module) -> None:
        if self._hidden is not None:
            self._hidden.remove()
            self._hidden = None
        lost = []
        for t, slots, loaded_key, shape in self._slots:
            if loaded_key is not None:
                module, container, name, _ = next(s for s in slots if s[3] == loaded_key)
                value = getattr(module, container)[name]
                if value is None or value.is_meta or value.dtype != t.dtype or (
                        value.shape != shape and name not in _SIZED_ON_LOAD):
                    lost.append(loaded_key)
                    continue
                if name == "anchor" and value.numel() == 0:  # saved before the anchor had its one element
                    value = torch.zeros(shape, dtype=t.dtype)
                t.data = value.detach().to(t.device)
            for module, container, name, _ in slots:
                getattr(module, container)[name] = t
        self._slots = []
        for _, layer in projected_layers(model):  # transformers' stand-in for a missing extra state (the layer
            layer.__dict__.pop("_extra_state", None)  # keeps its own, in its control tensor)
        for attr in ("_keys_to_ignore_on_load_missing", "_keys_to_ignore_on_load_unexpected"):
            model.__dict__.pop(attr, None)
        if lost:
            raise ValueError(f"the checkpoint's tensors {lost[:5]} do not fit the transformed model (wrong shape or "
                             "dtype); was it saved from a model transformed with these options?")
        _mark(model, self.quantization_config, self)


def _tensor_slots(model: nn.Module, meta: bool) -> dict:
    """{id: (tensor, [(module, container, name, state key or None)])} of every parameter and buffer that is on the
    meta device (``meta``) or is not; a tensor in several slots (a tied embedding and head) is one entry. The key is
    None for a non-persistent buffer, which no checkpoint holds."""
    groups: dict = {}
    for prefix, module in model.named_modules():
        for container in ("_parameters", "_buffers"):
            for name, t in getattr(module, container).items():
                if t is None or t.is_meta != meta:
                    continue
                persistent = container == "_parameters" or name not in module._non_persistent_buffers_set
                key = (f"{prefix}.{name}" if prefix else name) if persistent else None
                groups.setdefault(id(t), (t, []))[1].append((module, container, name, key))
    return groups


@dataclasses.dataclass(frozen=True)
class _Stored:
    """One tensor of the checkpoint: its file, its name there, shape and dtype (from the header)."""
    file: Path
    key: str
    shape: tuple
    dtype: Optional[torch.dtype]


#: safetensors' names of the float dtypes a checkpoint tensor may be converted from.
_SAFETENSORS_FLOATS = {"F64": torch.float64, "F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}


def _stored_tensors(model: nn.Module, files: list) -> dict:
    """{the model's name: :class:`_Stored`} of the tensors in the checkpoint ``files`` (transformers' legacy
    renaming applied); only the headers are read."""
    from safetensors import safe_open

    stored = {}
    for f in files:
        with safe_open(str(f), framework="pt") as handle:
            for k in handle.keys():
                part = handle.get_slice(k)
                stored[k] = _Stored(f, k, tuple(part.get_shape()), _SAFETENSORS_FLOATS.get(part.get_dtype()))
    rename = key_renamer(model)
    return stored if rename is None else {**stored, **{rename(k): v for k, v in stored.items()}}


#: An unprojected tensor of at least this many elements that the checkpoint holds in another float dtype than the
#: model's (an fp32 embedding loaded with ``dtype=torch.bfloat16``) is read by the quantizer in row chunks of about
#: :data:`CONVERT_CHUNK_BYTES` of the file, each converted into the model's tensor: transformers would read it whole
#: and then convert it, both copies at once on top of the INT8 layers (117M: a 94 MiB fp32 embedding and its
#: 47 MiB bf16 copy, the whole load's peak; BENCHMARKS.md "transformers from_pretrained").
CONVERT_MIN_NUMEL = 1 << 20
CONVERT_CHUNK_BYTES = 16 << 20


def _read_converted(stored: _Stored, dtype: torch.dtype, device) -> Tensor:
    """``stored`` read in row chunks and converted to ``dtype``; the file is mapped only while a chunk is read
    (the pages of a mapping that stays open count in the resident set)."""
    from safetensors import safe_open

    out = torch.empty(stored.shape, dtype=dtype, device=device)
    rows = stored.shape[0]
    row_bytes = math.prod(stored.shape[1:]) * stored.dtype.itemsize
    step = max(1, CONVERT_CHUNK_BYTES // max(row_bytes, 1))
    for start in range(0, rows, step):
        with safe_open(str(stored.file), framework="pt") as handle:
            out[start:start + step].copy_(handle.get_slice(stored.key)[start:start + step])
    return out


def _is_hf_model(model: nn.Module) -> bool:
    from transformers import PreTrainedModel

    return isinstance(model, PreTrainedModel)


def _mark(model: nn.Module, qconfig: QGaLoreQuantizationConfig, quantizer: Optional[QGaLoreHfQuantizer] = None):
    """Make ``model`` a model quantized with ``qgalore_fx`` in transformers' eyes (``save_pretrained`` writes the
    method, Trainer accepts it for full-parameter training)."""
    model.config.quantization_config = qconfig
    model.hf_quantizer = quantizer or QGaLoreHfQuantizer(qconfig, pre_quantized=True)
    model.quantization_method = METHOD
    model.num_parameters = _LogicalParameterCount(model)
    # transformers' guards for quantized models (no .half()/.float()/.to(dtype); Trainer wants adapters; attention
    # kernels take the dtype from elsewhere) are for frozen quantized weights. A transformed model trains its INT8
    # weights in place and its layers keep codes and scales through any cast, so it is not "quantized" for them.
    model.is_quantized = False
    from transformers import PretrainedConfig

    for module in model.modules():
        if isinstance(getattr(module, "config", None), PretrainedConfig):
            module.config.__dict__.pop("_is_quantized", None)


class _LogicalParameterCount:
    """``num_parameters`` of a transformed transformers model: the dense model's count
    (:func:`qgalore_fx.logical_parameters`). transformers counts ``named_parameters()``, which for a projected
    layer are its INT8 codes (out x in, right) plus its scales and anchor (about 0.4 % more at block 256); the
    scales stay Parameters so that FSDP2 shards them with the codes. transformers has no hook for the count, so
    the marked model carries this in its instance ``__dict__`` (a plain object, not a bound method, so that
    ``copy.deepcopy`` and pickling keep it); :func:`unmark` takes it away. Trainer's FLOP estimate reads it;
    Trainer's "Number of trainable parameters" line sums ``p.numel()`` over ``requires_grad`` Parameters
    itself, so it shows the AdamW group (and the anchors), not the INT8 weights, which have no ``.grad``."""

    def __init__(self, model: nn.Module):
        self.model = model

    def __call__(self, only_trainable: bool = False, exclude_embeddings: bool = False) -> int:
        return logical_parameters(self.model, only_trainable=only_trainable, exclude_embeddings=exclude_embeddings)


def _after_transform(model: nn.Module, config: QGaLoreConfig) -> None:
    """Every HF model transformed by :func:`qgalore_fx.transform` saves as ``quant_method: "qgalore_fx"``."""
    if _is_hf_model(model):
        _mark(model, QGaLoreQuantizationConfig.from_transform_config(config))


def unmark(model: nn.Module) -> None:
    """A dense export is a plain model again: no quantization config, no quantizer."""
    if not _is_hf_model(model):
        return
    for attr in ("hf_quantizer", "quantization_method", "num_parameters"):
        model.__dict__.pop(attr, None)
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.config.__dict__.pop("attn_implementation", None)


def from_pretrained(path, model_class=None, device=None, **kwargs) -> nn.Module:
    """``AutoModelForCausalLM.from_pretrained(path)`` of a folder saved from a transformed model (``model_class``:
    another transformers class; ``device``: where the tensors go, default CPU). Also reads folders saved before
    ``quant_method`` existed."""
    import transformers

    config = kwargs.pop("config", None) or transformers.AutoConfig.from_pretrained(str(path))
    saved = getattr(config, "quantization_config", None)
    if isinstance(saved, dict) and saved.get("quant_method") is None and OLD_MARKER in saved:
        config.quantization_config = QGaLoreQuantizationConfig(**saved[OLD_MARKER]).to_dict()
    elif not (isinstance(saved, dict) and saved.get("quant_method") == METHOD):
        raise ValueError(f"{str(path)!r} was not saved from a model transformed by qgalore_fx (its config has no "
                         f"quantization_config with quant_method {METHOD!r}); load it with transformers' "
                         "from_pretrained, or pass quantization_config=qgalore_fx.QGaLoreQuantizationConfig(rank=...) "
                         "to transform it while loading")
    cls = transformers.AutoModelForCausalLM if model_class is None else model_class
    device_map = None if device is None else {"": str(device)}
    return cls.from_pretrained(str(path), config=config, device_map=device_map, **kwargs)


def register() -> None:
    """Register ``quant_method: "qgalore_fx"`` with transformers (idempotent)."""
    if AUTO_QUANTIZATION_CONFIG_MAPPING.get(METHOD) is not QGaLoreQuantizationConfig:
        AUTO_QUANTIZATION_CONFIG_MAPPING.pop(METHOD, None)
        register_quantization_config(METHOD)(QGaLoreQuantizationConfig)
    if AUTO_QUANTIZER_MAPPING.get(METHOD) is not QGaLoreHfQuantizer:
        AUTO_QUANTIZER_MAPPING.pop(METHOD, None)
        register_quantizer(METHOD)(QGaLoreHfQuantizer)
    if _after_transform not in TRANSFORM_HOOKS:
        TRANSFORM_HOOKS.append(_after_transform)
    if unmark not in EXPORT_HOOKS:
        EXPORT_HOOKS.append(unmark)


register()
