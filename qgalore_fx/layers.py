"""`QGaLoreLinear`: the module that owns a rewritten linear's storage and update state.

Compiled graphs see weights as inputs; to change *what is stored* the storage
has to be owned by a module before anything is captured or compiled. Each
rewritten layer (``nn.Linear``, GPT-2's ``Conv1D`` or any type with a handler in
:mod:`qgalore_fx.handlers`, and each expert matrix of a fused MoE module) therefore
becomes one of these, made whole by :meth:`QGaLoreLinear.projected` (its handler
reads the layer and calls it), holding:

- ``weight_codes``: INT8 codes [out, in] (``weight_bits=8``) — or, for the
  16/32-bit ablations, the weight itself in bf16/fp32; a frozen Parameter
  (``requires_grad=False``), so FSDP2 shards it (:mod:`qgalore_fx.sharding`);
- ``weight_scales``: fp32 per-block scales over the flattened weight (empty for
  16/32-bit storage), a frozen Parameter too;
- ``bias``: the original bias Parameter, untouched (trained by the optimizer's
  ordinary AdamW group);
- ``anchor``: a one-element Parameter, always 0 (see :mod:`qgalore_fx.ops`);
- its update state: the tensors of
  :data:`qgalore_fx.lowrank.STATE_NAMES` as buffers (projection codes and
  scales, Adam's moments, ``step``, ``skipped``, ``accum``), the host-side
  ``control`` tensor (kept on the CPU whatever ``.to()`` does to the rest,
  because the host reads it to decide when to refresh; it reaches
  ``state_dict`` as this module's extra state), ``hparams`` (a non-persistent
  buffer the optimizer writes), and ``spec``, the static settings;
- ``source_type``: the name of the handler of the layer it replaced (a str), so
  :func:`qgalore_fx.export_dense` rebuilds that type.

No full-precision copy of the weight is kept. In a traced region the graph
reaches these tensors through ``get_attr`` nodes; where a region could not be
traced, this module's own ``forward`` calls the same op. ``state_dict``,
``load_state_dict``, ``copy.deepcopy``, ``.to()`` and pickling all work by
PyTorch's own mechanisms: there is nothing else to carry.
"""

from __future__ import annotations

import weakref
from typing import Dict, List, Optional

import torch
import torch.nn as nn
from torch import Tensor

from qgalore_fx import lowrank, ops  # noqa: F401  (ops registers the custom ops)
from qgalore_fx.config import QGaLoreConfig
from qgalore_fx.kernels import all_finite, quantize_blockwise

_STORAGE_DTYPES = {16: torch.bfloat16, 32: torch.float32}
#: The ``source_type`` of a layer that replaced an ``nn.Linear`` (the name of its handler in :mod:`qgalore_fx.handlers`).
LINEAR = "torch.nn.Linear"


class OptimizerLink:
    """Which optimizer drives a layer (a weak reference).

    A link never travels with a copy or a pickle: a deep-copied or unpickled model is unbound and
    gets its own optimizer with ``qgalore_fx.optimizer(copy)``.
    """

    __slots__ = ("ref",)

    def __init__(self, optimizer=None):
        self.ref = None if optimizer is None else weakref.ref(optimizer)

    def get(self):
        return None if self.ref is None else self.ref()

    def __reduce__(self):
        return (OptimizerLink, ())

    def __deepcopy__(self, memo):
        return OptimizerLink()


class QGaLoreLinear(nn.Module):
    source_type = LINEAR  # class default: layers pickled before source_type existed came from nn.Linear

    def __init__(self, in_features: int, out_features: int, bias: Optional[Tensor], weight_bits: int, block_size: int,
                 device=None, source_type: str = LINEAR):
        super().__init__()
        self.source_type = source_type  # the handler (qgalore_fx.handlers) of the layer this replaced
        self.in_features = in_features
        self.out_features = out_features
        self.weight_bits = weight_bits
        self.block_size = block_size
        if weight_bits == 8:
            nblocks = -(-in_features * out_features // block_size)
            codes = torch.zeros(out_features, in_features, dtype=torch.int8, device=device)
            scales = torch.zeros(nblocks, dtype=torch.float32, device=device)
        else:
            codes = torch.zeros(out_features, in_features, dtype=_STORAGE_DTYPES[weight_bits], device=device)
            scales = torch.zeros(0, dtype=torch.float32, device=device)
        # Frozen Parameters (as bitsandbytes' Int8Params): FSDP2 shards and all-gathers them like any parameter,
        # and reduces nothing for them (qgalore_fx.sharding); the update writes them inside backward.
        self.weight_codes = nn.Parameter(codes, requires_grad=False)
        self.weight_scales = nn.Parameter(scales, requires_grad=False)
        self.bias = bias if bias is None or isinstance(bias, nn.Parameter) else nn.Parameter(bias)
        # One element (not zero: FSDP2 cannot shard an empty parameter); its value and gradient are always 0.
        self.anchor = nn.Parameter(torch.zeros(1, dtype=torch.float32, device=device))  # whatever the default dtype
        self.register_buffer("hparams", torch.zeros(0, dtype=torch.float64, device=device), persistent=False)
        # Under FSDP2: views of this rank's shard of the codes and scales, which the update writes (empty otherwise).
        self.register_buffer("shard_codes", torch.zeros(0, dtype=codes.dtype, device=device), persistent=False)
        self.register_buffer("shard_scales", torch.zeros(0, dtype=torch.float32, device=device), persistent=False)
        self.shard_mesh = None
        self.spec: Optional[lowrank.UpdateSpec] = None
        self.spec_json = ""
        self.control: Optional[Tensor] = None
        self.optimizer_link = OptimizerLink()

    @classmethod
    def projected(cls, weight: Tensor, bias: Optional[Tensor], config: QGaLoreConfig, name: str, index: int,
                  source_type: str = LINEAR) -> "QGaLoreLinear":
        """The projected layer of a dense ``[out, in]`` weight, whole: stored (quantized with nearest rounding
        when ``weight_bits == 8``) and with its low-rank update state (:meth:`enable_update`).

        This is the one constructor of a projected layer: a layer handler (:mod:`qgalore_fx.handlers`) reads the
        weight and bias of the layer it replaces (or of each expert matrix) and calls it. ``name`` is the layer's
        fully-qualified name (errors and the update spec use it), ``index`` its place among the model's projected
        layers (its random stream), ``source_type`` the name of the handler.
        """
        out_features, in_features = weight.shape
        new = cls(in_features, out_features, bias, config.weight_bits, config.block_size, device=weight.device,
                  source_type=source_type)
        new.load_weight_(weight, name)
        new.enable_update(config, name, index)
        return new

    @torch.no_grad()
    def load_weight_(self, weight: Tensor, name: str = "") -> None:
        """Store a dense [out, in] float weight (quantized when weight_bits == 8); it must be finite."""
        what = f"the weight of {name!r}" if name else "weight"
        if tuple(weight.shape) != (self.out_features, self.in_features):
            raise ValueError(
                f"{what} must have shape ({self.out_features}, {self.in_features}), got {tuple(weight.shape)}"
            )
        if not weight.is_meta and not bool(all_finite(weight)):
            raise ValueError(f"{what} holds non-finite values (NaN or Inf); a projected weight must be finite: "
                             "check the weights it was read from")
        if self.weight_bits == 8:
            q = quantize_blockwise(weight.float(), bits=8, block_size=self.block_size, check_finite=False)
            self.weight_codes.copy_(q.codes.reshape(self.weight_codes.shape))
            self.weight_scales.copy_(q.scales)
        else:
            self.weight_codes.copy_(weight)

    # ------------------------------------------------------------------ update state
    def enable_update(self, config: QGaLoreConfig, name: str, index: int) -> bool:
        """Give this layer its low-rank update state (:meth:`projected` does); False if it already has one."""
        if self.spec is not None:
            return False
        self.set_spec(lowrank.UpdateSpec.from_config(config, name, self.out_features, self.in_features, index))
        for key, t in lowrank.initial_state(self.spec, device=self.weight_codes.device).items():
            if key == "control":
                self.control = t
            else:
                self.register_buffer(key, t, persistent=key not in lowrank.UNDO_NAMES)
        return True

    def set_deferred(self, defer: bool) -> None:
        """Size the accumulation-window state for an optimizer that defers this layer's update (or not): the
        low-rank accumulator and the undo copy of the projection (:data:`qgalore_fx.lowrank.UNDO_NAMES`)."""
        from qgalore_fx.sharding import local

        self.control[lowrank.DEFER] = float(defer)
        device = local(self.weight_codes).device
        shape = self.spec.lowrank_shape if defer else (0,)
        if defer and self.spec.shard_world > 1:  # FSDP2: this rank's rows of R
            shape = (shape[0] // self.spec.shard_world, shape[1])
        if tuple(self.accum.shape) != tuple(shape):
            self.accum = torch.zeros(shape, dtype=torch.float32, device=device)
        for name in lowrank.UNDO_NAMES:
            like = getattr(self, name[len("undo_"):])
            shape = like.shape if defer else (0,)
            if tuple(getattr(self, name).shape) != tuple(shape):
                setattr(self, name, torch.empty(shape, dtype=like.dtype, device=device))
        self.control[lowrank.saved_size(self.spec)] = 0

    def set_spec(self, spec: lowrank.UpdateSpec) -> None:
        self.spec = spec
        self.spec_json = spec.text

    @property
    def trainable(self) -> bool:
        """Whether this layer updates its weight in backward (False: a frozen quantized linear)."""
        return self.spec is not None

    def update_state(self) -> List[Tensor]:
        """The update-state tensors in the order the ops take them (empty when frozen)."""
        if self.spec is None:
            return []
        return [self.control if k == "control" else getattr(self, k) for k in lowrank.OP_STATE_NAMES]

    def bind_shards(self) -> None:
        """Point ``shard_codes`` / ``shard_scales`` at FSDP2's local shards of the codes and scales (at rest, the
        module's parameters are the sharded DTensors; their local tensors are FSDP2's own storage)."""
        from qgalore_fx.sharding import is_dtensor

        if self.spec is None or not self.spec.shard_world > 1 or not is_dtensor(self.weight_codes):
            return
        codes, scales = self.weight_codes._local_tensor, self.weight_scales._local_tensor
        if self.shard_codes.data_ptr() != codes.data_ptr() or self.shard_codes.shape != codes.shape:
            self.shard_codes = codes
        if self.shard_scales.data_ptr() != scales.data_ptr() or self.shard_scales.shape != scales.shape:
            self.shard_scales = scales

    def state_tensors(self) -> Dict[str, Tensor]:
        return dict(zip(lowrank.OP_STATE_NAMES, self.update_state()))

    def apply_pending(self) -> bool:
        """Apply an accumulated update (deferred mode); True if there was one."""
        if self.spec is None:
            return False
        from qgalore_fx.sharding import local

        # under FSDP2 the step writes shard_codes/shard_scales (in the state); the op takes plain tensors
        return lowrank.apply_pending_(local(self.weight_codes), local(self.weight_scales), self.state_tensors(),
                                      self.hparams, self.spec)

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if self.spec is not None and self.spec.shard_world > 1:  # this rank's part of R, as a global DTensor
            from qgalore_fx.sharding import SHARDED_STATE, dtensor_state

            for key in SHARDED_STATE:
                if prefix + key in destination:
                    destination[prefix + key] = dtensor_state(self, destination[prefix + key])

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        anchor = state_dict.get(prefix + "anchor")
        if isinstance(anchor, Tensor) and anchor.numel() == 0 and self.anchor.numel() == 1:
            state_dict[prefix + "anchor"] = self.anchor.detach().new_zeros(self.anchor.shape)  # saved as 0 elements
        if self.spec is not None and self.spec.shard_world > 1:
            from qgalore_fx.sharding import SHARDED_STATE, local_part

            for key in SHARDED_STATE:
                if prefix + key in state_dict:
                    state_dict[prefix + key] = local_part(self, key, state_dict[prefix + key])
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)

    def drop_pending(self) -> None:
        """Forget the accumulated micro-batches and undo their refresh (``optimizer.zero_grad()``)."""
        if self.spec is not None:
            lowrank.drop_pending_(self.state_tensors(), self.spec)

    def get_extra_state(self) -> Tensor:
        """The host control state's saved slots, for ``state_dict`` (see :data:`qgalore_fx.lowrank.NOT_SAVED`)."""
        if self.control is None:
            return torch.zeros(0, dtype=torch.float64)
        out = self.control[:lowrank.saved_size(self.spec)].clone()
        out[list(lowrank.NOT_SAVED)] = 0.0
        return out

    def set_extra_state(self, state) -> None:
        if self.control is None:
            if not (isinstance(state, Tensor) and state.numel() == 0):
                raise ValueError("this layer is frozen (no update state) but the state dict holds update state")
            return
        lowrank.check_control(state, self.spec, f"layer {self.spec.name!r}")
        keep = list(lowrank.NOT_SAVED)
        live = self.control[keep].clone()
        saved = lowrank.saved_size(self.spec)
        self.control[:saved] = state
        self.control[keep] = live
        self.control[saved:] = 0  # no undo record: the loaded window keeps any refresh it made

    # ------------------------------------------------------------------ reading
    @property
    def rank(self) -> Optional[int]:
        return None if self.spec is None else self.spec.rank

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> Tensor:
        """A dense copy of the current weight (materializes [out, in] floats)."""
        return ops.dequantize_weight(self.weight_codes, self.weight_scales, self.block_size, dtype)

    def projection_matrix(self) -> Optional[Tensor]:
        """The current projection P in fp32, or None before the first refresh (or when frozen)."""
        if self.spec is None or not self.stats()["refresh_count"]:
            return None
        return lowrank.projection_matrix(self.proj_codes, self.proj_scales, self.spec)

    def stats(self) -> dict:
        """Step, refresh count, interval, last similarity, skips (reads ``step``/``skipped``: synchronizes)."""
        if self.spec is None:
            return {}
        c = lowrank.control_dict(self.control)
        return {
            "step": int(self.step),
            "attempts": int(c["calls"]),
            "refresh_count": int(c["refresh_count"]),
            "interval": int(c["interval"]),
            "last_similarity": None if c["last_similarity"] < 0 else c["last_similarity"],
            "skipped_updates": int(self.skipped),
            "refresh_seconds": c["refresh_seconds"],
            "comm_bytes": int(c["comm_bytes"]),
            "pending": int(c["pending"]),
        }

    def weight_nbytes(self) -> int:
        """Bytes of the stored weight this process holds (its shard under FSDP2)."""
        from qgalore_fx.sharding import local

        return sum(local(t).numel() * t.element_size() for t in (self.weight_codes, self.weight_scales))

    def state_nbytes(self) -> Dict[str, int]:
        """Exact bytes of the update state: projection, optimizer moments, accumulator."""
        def nb(*names):
            return sum(getattr(self, k).numel() * getattr(self, k).element_size() for k in names)

        if self.spec is None:
            return {"projection": 0, "optimizer_state": 0, "accumulator": 0}
        return {"projection": nb("proj_codes", "proj_scales"),
                "optimizer_state": nb("exp_avg", "exp_avg_sq", "exp_avg_absmax", "exp_avg_sq_absmax"),
                "accumulator": nb("accum", *lowrank.UNDO_NAMES)}

    def _apply(self, fn, recurse=True):
        # Float conversions (.half(), .bfloat16(), .to(dtype)) change the compute dtype, never the storage
        # format: codes, scales, moments and hparams keep their dtypes (converting fp32 scales to fp16 and back
        # would lose bits). Device moves go through unchanged; the bias is an ordinary parameter and converts.
        buffers = {id(t) for t in self._buffers.values() if t is not None}
        buffers |= {id(self.weight_codes), id(self.weight_scales)}

        def keep_dtype(t):
            out = fn(t)
            if id(t) in buffers and out.dtype != t.dtype:
                return t.to(out.device)
            return out

        return super()._apply(keep_dtype, recurse)

    def forward(self, x: Tensor) -> Tensor:
        return torch.ops.qgalore_fx.linear(
            x, self.weight_codes, self.weight_scales, self.bias, self.anchor, self.update_state(), self.hparams,
            self.block_size, self.spec_json,
        )

    def extra_repr(self) -> str:
        storage = {8: f"int8 block={self.block_size}", 16: "bf16", 32: "fp32"}[self.weight_bits]
        text = f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, " \
               f"weight={storage}"
        if self.source_type != LINEAR:
            text += f", source={self.source_type}"
        if self.spec is not None:
            s = self.spec
            text += f", rank={s.rank}, side={s.side}, proj_bits={s.proj_bits}, " + \
                ("moments=lean (factored v, no m)" if s.lean else f"optim_bits={s.optim_bits}")
        return text
