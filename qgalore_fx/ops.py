"""The two graph ops every rewritten linear becomes.

``torch.ops.qgalore_fx.linear(x, weight, scales, bias, anchor, layer_id, block_size)``
    y = x · dequant(weight)ᵀ + b. ``weight`` is either INT8 codes with per-block
    fp32 ``scales`` (block-quantized over the flattened [out, in] matrix) or a
    16/32-bit float matrix with an empty ``scales``. Its backward returns
    grad_x = grad_y · dequant(W) and the bias gradient; when ``layer_id >= 0``
    it then calls ``lowrank_update_`` so the layer's low-rank optimizer step
    runs right there, and the full weight gradient never outlives the layer's
    backward. ``layer_id == -1`` is a frozen quantized linear (no weight
    update), which is what pass 1 emits before pass 2 attaches the update.

``torch.ops.qgalore_fx.lowrank_update_(weight!, scales!, x, grad_y, layer_id)``
    Declared as mutating the weight storage, so ``torch.compile`` keeps its
    ordering after every read of the old weight. Its implementation is opaque
    to the compiler: the data-dependent parts (lazy subspace refresh, skipping
    non-finite gradients, stochastic-rounding counters) run as ordinary Python
    on the layer's :class:`~qgalore_fx.lowrank.LowRankState`, found through a
    small registry keyed by ``layer_id`` (a compile-time constant per layer).

``anchor`` is a zero-element Parameter owned by each layer. It makes autograd
run the layer's backward even when nothing upstream requires grad (e.g. frozen
embeddings), gets an empty gradient so DDP's reducer sees every parameter
used, and is what the optimizer's projected param group holds, so learning
rate schedulers drive projected layers like any other group.
"""

from __future__ import annotations

import itertools
import weakref
from typing import Optional

import torch
from torch import Tensor

from qgalore_fx.kernels import int8_matmul as _mm  # noqa: F401  (registers int8_matmul ops)

_LAYERS: "weakref.WeakValueDictionary[int, object]" = weakref.WeakValueDictionary()
_NEXT_ID = itertools.count()


def register_layer(state) -> int:
    """Give a LowRankState a process-unique id the graph can carry as a constant."""
    layer_id = next(_NEXT_ID)
    _LAYERS[layer_id] = state
    return layer_id


def lookup_layer(layer_id: int):
    state = _LAYERS.get(layer_id)
    if state is None:
        raise RuntimeError(f"qgalore_fx layer {layer_id} is not registered (its module was garbage collected?)")
    return state


def dequantize_weight(weight: Tensor, scales: Tensor, block_size: int, dtype: torch.dtype) -> Tensor:
    """The weight as a dense [out, in] matrix of ``dtype``."""
    if weight.is_floating_point():
        return weight.to(dtype)
    return torch.ops.qgalore_fx.dequantize(weight, scales, 8, block_size, list(weight.shape), dtype)


def _matmul_wt(x2d: Tensor, weight: Tensor, scales: Tensor, block_size: int) -> Tensor:
    if weight.is_floating_point():
        return x2d @ weight.to(x2d.dtype).t()
    return torch.ops.qgalore_fx.int8_matmul(x2d, weight, scales, block_size)


def _matmul_w(g2d: Tensor, weight: Tensor, scales: Tensor, block_size: int) -> Tensor:
    if weight.is_floating_point():
        return g2d @ weight.to(g2d.dtype)
    return torch.ops.qgalore_fx.int8_matmul_t(g2d, weight, scales, block_size)


def _check_linear_args(x: Tensor, weight: Tensor, scales: Tensor, bias: Optional[Tensor]) -> None:
    if weight.dim() != 2:
        raise ValueError(f"weight must be a 2-D [out, in] tensor, got shape {tuple(weight.shape)}")
    if x.shape[-1] != weight.shape[1]:
        raise ValueError(f"x's last dimension ({x.shape[-1]}) must equal weight's in-features ({weight.shape[1]})")
    if weight.dtype not in (torch.int8, torch.bfloat16, torch.float16, torch.float32):
        raise TypeError(f"weight must be int8 codes or a float matrix, got {weight.dtype}")
    if bias is not None and bias.shape != (weight.shape[0],):
        raise ValueError(f"bias must have shape ({weight.shape[0]},), got {tuple(bias.shape)}")


@torch.library.custom_op("qgalore_fx::linear", mutates_args=())
def linear(
    x: Tensor,
    weight: Tensor,
    scales: Tensor,
    bias: Optional[Tensor],
    anchor: Tensor,
    layer_id: int,
    block_size: int,
) -> Tensor:
    _check_linear_args(x, weight, scales, bias)
    y = _matmul_wt(x.reshape(-1, x.shape[-1]), weight, scales, block_size)
    if bias is not None:
        y = y + bias.to(y.dtype)
    return y.reshape(*x.shape[:-1], weight.shape[0])


@linear.register_fake
def _(x, weight, scales, bias, anchor, layer_id, block_size):
    _check_linear_args(x, weight, scales, bias)
    return x.new_empty(*x.shape[:-1], weight.shape[0])


def _setup_context(ctx, inputs, output):
    x, weight, scales, bias, anchor, layer_id, block_size = inputs
    ctx.save_for_backward(x, weight, scales)
    ctx.layer_id = layer_id
    ctx.block_size = block_size
    ctx.has_bias = bias is not None
    ctx.bias_dtype = None if bias is None else bias.dtype
    ctx.anchor_shape = anchor.shape


def _backward(ctx, grad_y):
    x, weight, scales = ctx.saved_tensors
    m = weight.shape[0]
    g2d = grad_y.reshape(-1, m)
    grad_x = grad_bias = grad_anchor = None
    if ctx.needs_input_grad[0]:
        grad_x = _matmul_w(g2d, weight, scales, ctx.block_size).reshape(x.shape)
    if ctx.has_bias and ctx.needs_input_grad[3]:
        grad_bias = g2d.sum(0).to(ctx.bias_dtype)
    if ctx.needs_input_grad[4]:
        grad_anchor = grad_y.new_zeros(ctx.anchor_shape)
    if ctx.layer_id >= 0:
        torch.ops.qgalore_fx.lowrank_update_(weight, scales, x, grad_y, ctx.layer_id)
    return grad_x, None, None, grad_bias, grad_anchor, None, None


linear.register_autograd(_backward, setup_context=_setup_context)


@torch.library.custom_op("qgalore_fx::lowrank_update_", mutates_args=("weight", "scales"))
def lowrank_update_(weight: Tensor, scales: Tensor, x: Tensor, grad_y: Tensor, layer_id: int) -> None:
    lookup_layer(layer_id).backward_hook(weight, scales, x, grad_y)


@lowrank_update_.register_fake
def _(weight, scales, x, grad_y, layer_id):
    return None
