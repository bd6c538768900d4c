"""Embedding and output-head updates inside their own backward, row chunk by row chunk.

With ``qgalore_fx.optimizer(model, rest_in_backward=True)`` every parameter of the AdamW group is updated
as soon as its gradient is complete (:meth:`qgalore_fx.optim.QGaLoreOptimizer._rest_hook`). For the two
largest of them that is not enough: autograd still forms the whole fp32 gradient first, 0.49 GiB each for
LLaMA-7B's 32000 x 4096 embedding and head, the largest transient of a step once the projected layers
update in their own backward. Here those two never have a gradient at all:

* the module's forward runs through an autograd function whose backward computes the input gradient
  with the weight as it was, then hands the optimizer the weight gradient as a function of a row range;
* the optimizer runs its masked 8-bit AdamW over row chunks of about ``ADAMW_CHUNK`` elements, asking
  for each chunk's gradient rows just before it uses them (:func:`qgalore_fx.optim._masked_adamw_rows_`).

Gradient rows of the head ``y = x Wᵀ`` are ``grad_y[:, rows]ᵀ x``; of an embedding, the output gradients
of the tokens in those rows, summed by ``index_add_`` into a chunk buffer (the padding row gets none, as
``F.embedding`` gives it none). Whether the update is applied is decided as for a hook-updated parameter,
from the finiteness of what the gradient is made of (``grad_y`` and ``x``), so nothing synchronizes.

Only an ``nn.Embedding`` (without ``max_norm``, ``scale_grad_by_freq`` or ``sparse``) or a bias-free
``nn.Linear`` whose weight has at least :data:`FUSED_MIN_NUMEL` elements and is used by that module alone
(a tied embedding and head keep the hook path: their gradient is a sum of two) is routed here; everything
else keeps the hook. The numbers equal the hook path's up to float rounding (another summation order for
the head's gradient), tested in tests/test_rest_in_backward.py.

Storage in bfloat16. Such a weight may be stored as bf16 (``module.to(torch.bfloat16)`` before building
the optimizer: half the bytes, 0.24 GiB instead of 0.49 GiB each at LLaMA-7B) while the model computes in
fp32: the embedding returns its bf16 rows (the next fp32 operation promotes them), the head multiplies
fp32 inputs by fp32 row chunks of the weight (:func:`linear_any_dtype`), and each updated row chunk is
computed in fp32 and written back with stochastic rounding (:func:`round_bf16_`), so updates far below
bf16's resolution still move the weight in expectation. The draws are a hash of each element's index, the
parameter's name and its step count, computed where the weight is (the step count stays a device tensor: no
synchronization). BENCHMARKS.md ("LLaMA-7B on one 24 GiB machine") measures its quality.

The routing is an instance attribute ``forward`` on the module (:class:`FusedForward`); it holds the
optimizer weakly and falls back to the module's own forward once the optimizer is gone (a bf16 head
keeps :func:`linear_any_dtype`), and a copy or a pickle of the model gets the plain forward back.
It is an attribute rather than a hook or a subclass: a forward hook runs after autograd has tied the
output to the weight (whose whole gradient would then be formed), and swapping the module's class (as
``torch.nn.utils.parametrize`` does) would change ``type(module)``, which :func:`eligible` and callers
match on, and what a pickle of the model has to import.
"""

from __future__ import annotations

import weakref
from typing import Callable, Dict, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from qgalore_fx.kernels import all_finite
from qgalore_fx.kernels.adam8bit import _rounding_salt, _uniform
from qgalore_fx.kernels.quant import row_chunks

#: Parameters below this many elements keep the post-accumulate-grad hook (their gradient is small).
FUSED_MIN_NUMEL = 1 << 22


#: Storage dtypes of a fused weight.
DTYPES = (torch.float32, torch.bfloat16)

#: Weight rows multiplied at a time by :func:`linear_any_dtype`, in elements of the weight.
LINEAR_CHUNK = 1 << 22


def eligible(module: nn.Module, param: Tensor, users: int) -> bool:
    """Whether ``param`` (of ``module``, used by ``users`` modules) is updated by a fused backward."""
    if users != 1 or param.numel() < FUSED_MIN_NUMEL or param.dtype not in DTYPES or not param.is_contiguous():
        return False
    if type(module) is nn.Embedding:
        return (param is module.weight and module.max_norm is None and not module.scale_grad_by_freq
                and not module.sparse)
    if type(module) is nn.Linear:
        return param is module.weight and module.bias is None
    return False


def fused_weights(model: nn.Module) -> Dict[int, nn.Module]:
    """``id(weight) -> module`` for every trainable weight of ``model`` that :func:`eligible` routes through a
    fused backward (the optimizer installs them; the planner counts them)."""
    owners: Dict[int, Tuple[nn.Module, Tensor, int]] = {}
    for module in model.modules():
        for p in module._parameters.values():
            if p is not None:
                first, _, users = owners.get(id(p), (module, p, 0))
                owners[id(p)] = (first, p, users + 1)
    return {key: module for key, (module, p, users) in owners.items()
            if p.requires_grad and eligible(module, p, users)}


class _FusedEmbedding(torch.autograd.Function):
    @staticmethod
    def forward(ctx, ids: Tensor, weight: Tensor, padding_idx: Optional[int], update: Callable):
        ctx.save_for_backward(ids)
        ctx.padding_idx, ctx.update = padding_idx, update
        return F.embedding(ids, weight, padding_idx)

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        (ids,) = ctx.saved_tensors
        if ctx.needs_input_grad[1]:
            flat_ids = ids.reshape(-1)
            g = grad_out.reshape(flat_ids.numel(), -1).float()
            padding = ctx.padding_idx

            def grad_rows(start: int, stop: int) -> Tensor:
                rows = stop - start
                local = flat_ids - start
                inside = (local >= 0) & (local < rows)
                # tokens outside the chunk go to an extra row that is dropped: no host synchronization
                buf = g.new_zeros(rows + 1, g.shape[1]).index_add_(0, torch.where(inside, local, rows), g)
                if padding is not None and start <= padding < stop:
                    buf[padding - start] = 0.0
                return buf[:rows]

            ctx.update(grad_rows, all_finite(g))
        return None, None, None, None


def linear_any_dtype(x: Tensor, weight: Tensor) -> Tensor:
    """``F.linear(x, weight)`` in ``x``'s dtype; a weight of another dtype is converted a row chunk at a time
    (:data:`LINEAR_CHUNK` elements), never whole. Differentiable."""
    if weight.dtype == x.dtype:
        return F.linear(x, weight)
    parts = [F.linear(x, weight[a:b].to(x.dtype)) for a, b in row_chunks(*weight.shape, 1, LINEAR_CHUNK)]
    return torch.cat(parts, dim=-1)


def _grad_input(grad_y: Tensor, weight: Tensor) -> Tensor:
    if weight.dtype == grad_y.dtype:
        return grad_y @ weight
    out = None
    for a, b in row_chunks(*weight.shape, 1, LINEAR_CHUNK):
        part = grad_y[..., a:b] @ weight[a:b].to(grad_y.dtype)
        out = part if out is None else out.add_(part)
    return out


class _FusedLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, update: Callable):
        ctx.save_for_backward(x, weight)
        ctx.update = update
        return linear_any_dtype(x, weight)

    @staticmethod
    def backward(ctx, grad_y: Tensor):
        x, weight = ctx.saved_tensors
        grad_x = _grad_input(grad_y, weight) if ctx.needs_input_grad[0] else None  # the weight before the update
        if ctx.needs_input_grad[1]:
            g2 = grad_y.reshape(-1, weight.shape[0]).float()
            x2 = x.reshape(-1, weight.shape[1]).float()

            def grad_rows(start: int, stop: int) -> Tensor:
                return g2[:, start:stop].T @ x2

            ctx.update(grad_rows, all_finite(g2) & all_finite(x2))
        return grad_x, None, None


class FusedForward:
    """The ``forward`` of an embedding or head whose weight the optimizer updates inside its backward."""

    def __init__(self, module: nn.Module, update: Callable):
        self._module = weakref.ref(module)
        self._update = update  # holds the optimizer weakly (QGaLoreOptimizer._fused_update)

    def __call__(self, input: Tensor) -> Tensor:
        module = self._module()
        if not self._update.alive() or not torch.is_grad_enabled() or not module.weight.requires_grad:
            if isinstance(module, nn.Linear):
                return linear_any_dtype(input, module.weight)
            return type(module).forward(module, input)
        if isinstance(module, nn.Embedding):
            return _FusedEmbedding.apply(input, module.weight, module.padding_idx, self._update)
        return _FusedLinear.apply(input, module.weight, self._update)

    def __reduce__(self):  # a copy or pickle of the model gets the module's own forward back
        return (_own_forward, (self._module(),))


def _own_forward(module: nn.Module):
    return type(module).forward.__get__(module)


def install(module: nn.Module, update: Callable) -> None:
    module.forward = FusedForward(module, update)


def round_bf16_(dst: Tensor, values: Tensor, step: Optional[Tensor], stream: int = 0, offset: int = 0) -> None:
    """Write fp32 ``values`` into the bf16 ``dst`` (same number of elements), rounding stochastically.

    bf16 is the top half of an fp32 bit pattern: adding a uniform 16-bit integer to the pattern and clearing
    the low half rounds the magnitude up with probability equal to the discarded fraction, so the expected
    result is ``values`` (``step`` None: round to nearest even). Values that are already bf16 are kept.
    The 16-bit draws are those of the 8-bit moments' rounding (:func:`qgalore_fx.kernels.adam8bit._uniform`):
    a hash of the element's index (``offset`` + its position, plus ``stream``) moved along with ``step``, a
    0-d integer tensor that is never read on the host.
    """
    if step is None:
        dst.view(-1).copy_(values.reshape(-1))
        return
    bits = values.reshape(-1).contiguous().view(torch.int32)
    index = torch.arange(offset, offset + bits.numel(), dtype=torch.int64, device=bits.device)
    noise = (_uniform(index, _rounding_salt(step, stream, bits.device)) * (1 << 16)).to(torch.int32)
    dst.view(-1).copy_(((bits + noise) & -65536).view(torch.float32))
