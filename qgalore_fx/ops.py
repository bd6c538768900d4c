"""The graph ops every rewritten linear becomes.

``torch.ops.qgalore_fx.linear(x, weight, scales, bias, anchor, state, hparams, block_size, spec)``
    y = x · dequant(weight)ᵀ + b. ``weight`` is either INT8 codes with per-block
    fp32 ``scales`` (block-quantized over the flattened [out, in] matrix) or a
    16/32-bit float matrix with an empty ``scales``. Its backward returns
    grad_x = grad_y · dequant(W) and the bias gradient; when ``state`` is not
    empty it then calls ``lowrank_update_``, so the layer's low-rank optimizer
    step runs right there and the full weight gradient never outlives the
    layer's backward. ``state`` is the layer's update-state tensors in the
    order of :data:`qgalore_fx.lowrank.OP_STATE_NAMES` (empty for a frozen
    quantized linear, which is what pass 1 emits before pass 2 wires the
    update), ``hparams`` the float64 ``[lr, beta1, beta2, eps, weight_decay]``
    the optimizer hands the layer, and ``spec`` the layer's static settings
    (:class:`qgalore_fx.lowrank.UpdateSpec`, JSON).

``torch.ops.qgalore_fx.lowrank_update_(weight!, scales!, state!, hparams, x, grad_y, spec)``
    The update from the backward (:func:`qgalore_fx.lowrank.update_`): decides
    on the host whether the subspace is refreshed, projects the gradient, then
    steps or accumulates. Declared as mutating the weight and the state, so
    ``torch.compile`` orders it after every read of the old weight; opaque to
    the compiler, because the refresh is data-dependent.

``torch.ops.qgalore_fx.lowrank_step_(weight!, scales!, state!, R!, hparams, seed, spec, P=None)``
    The steady-state update over tensors (:func:`qgalore_fx.lowrank.step_`):
    Adam on R (consumed: its direction N is written over it), project back, decay, stochastic-rounding
    write-back;
    branch-free, hyperparameters as tensors. ``P`` is the dequantized
    projection when the caller already holds it (else read from the state).

``anchor`` is a one-element Parameter (always 0) owned by each layer, the stand-in for
its weight. It makes autograd run the layer's backward even when nothing
upstream requires grad (e.g. frozen embeddings), gets an empty gradient so
DDP's reducer sees every parameter used, and is what the optimizer's
projected param group holds, so learning rate schedulers drive projected
layers like any other group. Freezing it (``requires_grad_(False)``, e.g.
through ``module.requires_grad_(False)``) freezes the layer: its update does
not run.
"""

from __future__ import annotations

from typing import List, Optional

import torch
from torch import Tensor

from qgalore_fx import lowrank
from qgalore_fx.kernels import int8_matmul as _mm  # noqa: F401  (registers int8_matmul ops)

dequantize_weight = lowrank.dequantize_weight


def _matmul_wt(x2d: Tensor, weight: Tensor, scales: Tensor, block_size: int) -> Tensor:
    if weight.is_floating_point():
        return x2d @ weight.to(x2d.dtype).t()
    return torch.ops.qgalore_fx.int8_matmul(x2d, weight, scales, block_size)


def _matmul_w(g2d: Tensor, weight: Tensor, scales: Tensor, block_size: int) -> Tensor:
    if weight.is_floating_point():
        return g2d @ weight.to(g2d.dtype)
    return torch.ops.qgalore_fx.int8_matmul_t(g2d, weight, scales, block_size)


def _check_linear_args(x: Tensor, weight: Tensor, scales: Tensor, bias: Optional[Tensor], state: List[Tensor]) -> None:
    if weight.dim() != 2:
        raise ValueError(f"weight must be a 2-D [out, in] tensor, got shape {tuple(weight.shape)}")
    if x.shape[-1] != weight.shape[1]:
        raise ValueError(f"x's last dimension ({x.shape[-1]}) must equal weight's in-features ({weight.shape[1]})")
    if weight.dtype not in (torch.int8, torch.bfloat16, torch.float16, torch.float32):
        raise TypeError(f"weight must be int8 codes or a float matrix, got {weight.dtype}")
    if bias is not None and bias.shape != (weight.shape[0],):
        raise ValueError(f"bias must have shape ({weight.shape[0]},), got {tuple(bias.shape)}")
    if state and len(state) not in (len(lowrank.STATE_NAMES), len(lowrank.OP_STATE_NAMES)):
        raise ValueError(f"state must be empty (frozen layer) or the {len(lowrank.OP_STATE_NAMES)} tensors "
                         f"{lowrank.OP_STATE_NAMES} (or the first {len(lowrank.STATE_NAMES)}), got {len(state)}")


@torch.library.custom_op("qgalore_fx::linear", mutates_args=())
def linear(
    x: Tensor,
    weight: Tensor,
    scales: Tensor,
    bias: Optional[Tensor],
    anchor: Tensor,
    state: List[Tensor],
    hparams: Tensor,
    block_size: int,
    spec: str,
) -> Tensor:
    _check_linear_args(x, weight, scales, bias, state)
    y = _matmul_wt(x.reshape(-1, x.shape[-1]), weight, scales, block_size)
    if bias is not None:
        y = y + bias.to(y.dtype)
    return y.reshape(*x.shape[:-1], weight.shape[0])


@linear.register_fake
def _(x, weight, scales, bias, anchor, state, hparams, block_size, spec):
    _check_linear_args(x, weight, scales, bias, state)
    return x.new_empty(*x.shape[:-1], weight.shape[0])


def _setup_context(ctx, inputs, output):
    x, weight, scales, bias, anchor, state, hparams, block_size, spec = inputs
    ctx.save_for_backward(x, weight, scales, hparams, *state)
    ctx.block_size = block_size
    ctx.spec = spec
    ctx.has_bias = bias is not None
    ctx.bias_dtype = None if bias is None else bias.dtype
    ctx.anchor_shape = anchor.shape
    ctx.anchor_dtype = anchor.dtype
    ctx.n_state = len(state)


def _backward(ctx, grad_y):
    x, weight, scales, hparams, *state = ctx.saved_tensors
    m = weight.shape[0]
    g2d = grad_y.reshape(-1, m)
    grad_x = grad_bias = grad_anchor = None
    if ctx.needs_input_grad[0]:
        grad_x = _matmul_w(g2d, weight, scales, ctx.block_size).reshape(x.shape)
    if ctx.has_bias and ctx.needs_input_grad[3]:
        grad_bias = g2d.sum(0).to(ctx.bias_dtype)
    if ctx.needs_input_grad[4]:
        grad_anchor = grad_y.new_zeros(ctx.anchor_shape, dtype=ctx.anchor_dtype)
    if state and ctx.needs_input_grad[4]:  # a frozen anchor (requires_grad=False) freezes the layer's weight
        torch.ops.qgalore_fx.lowrank_update_(weight, scales, state, hparams, x, grad_y, ctx.spec)
    return grad_x, None, None, grad_bias, grad_anchor, [None] * ctx.n_state, None, None, None


linear.register_autograd(_backward, setup_context=_setup_context)


@torch.library.custom_op("qgalore_fx::lowrank_update_", mutates_args=("weight", "scales", "state"))
def lowrank_update_(weight: Tensor, scales: Tensor, state: List[Tensor], hparams: Tensor, x: Tensor,
                    grad_y: Tensor, spec: str) -> None:
    lowrank.update_(weight, scales, lowrank.state_from_list(state), hparams, x, grad_y, lowrank.decode_spec(spec))


@lowrank_update_.register_fake
def _(weight, scales, state, hparams, x, grad_y, spec):
    return None


@torch.library.custom_op("qgalore_fx::lowrank_step_", mutates_args=("weight", "scales", "state", "R"))
def lowrank_step_(weight: Tensor, scales: Tensor, state: List[Tensor], R: Tensor, hparams: Tensor,
                  seed: Optional[Tensor], spec: str, P: Optional[Tensor] = None) -> None:
    lowrank.step_(weight, scales, lowrank.state_from_list(state), R, hparams, seed, lowrank.decode_spec(spec), P)


@lowrank_step_.register_fake
def _(weight, scales, state, R, hparams, seed, spec, P=None):
    return None
