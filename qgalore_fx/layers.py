"""`QGaLoreLinear`: the module that owns a rewritten linear's storage.

Compiled graphs see weights as inputs; to change *what is stored* the storage
has to be owned by a module before anything is captured or compiled. Each
rewritten ``nn.Linear`` therefore becomes one of these, holding:

- ``weight_codes``: INT8 codes [out, in] (``weight_bits=8``) — or, for the
  16/32-bit ablations, the weight itself in bf16/fp32;
- ``weight_scales``: fp32 per-block scales over the flattened weight (empty for
  16/32-bit storage);
- ``bias``: the original bias Parameter, untouched (trained by the optimizer's
  ordinary AdamW group);
- ``anchor``: a zero-element Parameter (see :mod:`qgalore_fx.ops`);
- ``lowrank``: the :class:`~qgalore_fx.lowrank.LowRankState` attached by the
  fuse-update pass (None for a frozen quantized linear).

No full-precision copy of the weight is kept. In a traced region the graph
reaches these buffers through ``get_attr`` nodes; where a region could not be
traced, this module's own ``forward`` calls the same op.
"""

from __future__ import annotations

import copy
from typing import Optional

import torch
import torch.nn as nn
from torch import Tensor

from qgalore_fx import ops  # noqa: F401  (registers the custom ops)
from qgalore_fx.config import QGaLoreConfig
from qgalore_fx.kernels import quantize_blockwise

_STORAGE_DTYPES = {16: torch.bfloat16, 32: torch.float32}


class QGaLoreLinear(nn.Module):
    def __init__(self, in_features: int, out_features: int, bias: Optional[Tensor], weight_bits: int, block_size: int,
                 device=None):
        super().__init__()
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
        self.register_buffer("weight_codes", codes)
        self.register_buffer("weight_scales", scales)
        self.bias = bias if bias is None or isinstance(bias, nn.Parameter) else nn.Parameter(bias)
        self.anchor = nn.Parameter(torch.zeros(0, device=device))
        self.lowrank = None

    @classmethod
    def from_linear(cls, linear: nn.Linear, config: QGaLoreConfig, weight: Optional[Tensor] = None,
                    bias: Optional[nn.Parameter] = None) -> "QGaLoreLinear":
        """Quantize ``linear.weight`` (nearest rounding) and drop the float weight.

        ``weight``/``bias`` replace the linear's own tensors (used when it lives on the meta device).
        """
        weight = linear.weight.detach() if weight is None else weight
        bias = linear.bias if bias is None else bias
        new = cls(linear.in_features, linear.out_features, bias, config.weight_bits, config.block_size,
                  device=weight.device)
        new.load_weight_(weight)
        return new

    @torch.no_grad()
    def load_weight_(self, weight: Tensor) -> None:
        """Store a dense [out, in] float weight (quantized when weight_bits == 8)."""
        if tuple(weight.shape) != (self.out_features, self.in_features):
            raise ValueError(
                f"weight must have shape ({self.out_features}, {self.in_features}), got {tuple(weight.shape)}"
            )
        if self.weight_bits == 8:
            q = quantize_blockwise(weight.float(), bits=8, block_size=self.block_size, check_finite=not weight.is_meta)
            self.weight_codes.copy_(q.codes.reshape(self.weight_codes.shape))
            self.weight_scales.copy_(q.scales)
        else:
            self.weight_codes.copy_(weight)

    @property
    def layer_id(self) -> int:
        """Key of the attached low-rank state for the graph op; -1 = frozen."""
        return -1 if self.lowrank is None else self.lowrank.layer_id

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> Tensor:
        """A dense copy of the current weight (materializes [out, in] floats)."""
        return ops.dequantize_weight(self.weight_codes, self.weight_scales, self.block_size, dtype)

    def forward(self, x: Tensor) -> Tensor:
        return torch.ops.qgalore_fx.linear(
            x, self.weight_codes, self.weight_scales, self.bias, self.anchor, self.layer_id, self.block_size
        )

    def weight_nbytes(self) -> int:
        return self.weight_codes.numel() * self.weight_codes.element_size() + \
            self.weight_scales.numel() * self.weight_scales.element_size()

    def _apply(self, fn, recurse=True):
        # .half()/.bfloat16() must not touch quantization scales; .to(device) must move the low-rank state.
        scales_dtype = self.weight_scales.dtype
        storage_dtype = self.weight_codes.dtype
        super()._apply(fn, recurse)
        if self.weight_scales.dtype != scales_dtype:
            self.weight_scales.data = self.weight_scales.data.to(scales_dtype)
        if self.weight_codes.dtype != storage_dtype:
            self.weight_codes.data = self.weight_codes.data.to(storage_dtype)
        if self.lowrank is not None:
            self.lowrank.to(self.weight_codes.device)
        return self

    def __deepcopy__(self, memo):
        new = self.__class__.__new__(self.__class__)
        memo[id(self)] = new
        for key, value in self.__dict__.items():
            if key == "lowrank":
                continue
            new.__dict__[key] = copy.deepcopy(value, memo)
        new.lowrank = None if self.lowrank is None else self.lowrank.clone()
        return new

    def extra_repr(self) -> str:
        storage = {8: f"int8 block={self.block_size}", 16: "bf16", 32: "fp32"}[self.weight_bits]
        text = f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, " \
               f"weight={storage}"
        if self.lowrank is not None:
            st = self.lowrank
            text += f", rank={st.rank}, side={st.side}, proj_bits={st.config.proj_bits}, " \
                    f"optim_bits={st.config.optim_bits}"
        return text
