"""Adam updates on an ``AdamState`` for the tests and benchmarks of :mod:`qgalore_fx.kernels.adam8bit`.

``backend="torch"`` is the library's own entry point, :func:`adam_direction_masked_` / :func:`adamw_masked_` with
every update applied (``ok`` true) and the pure-torch reference (``impl="reference"``; the fused step is checked
against it in tests/test_adam8bit.py). ``backend="bitsandbytes"`` runs bitsandbytes' block-wise kernels
(``optimizer_update_8bit_blockwise`` / ``optimizer_update_32bit``, every argument by keyword) on the same state:
the peer the reference is checked against. For a direction it updates a zero fp32 buffer with ``lr=-1`` and no
weight decay, so bitsandbytes writes ``0 + (1/c1) * m / denom``, which is N exactly.
"""

from __future__ import annotations

import torch
from torch import Tensor

from qgalore_fx.kernels import adam8bit as A
from qgalore_fx.kernels.adam8bit import AdamState, adam_direction_masked_, adamw_masked_

BACKENDS = ("torch", "bitsandbytes")
BNB_BLOCK_SIZE = 256  # bitsandbytes' block-wise optimizer kernels hard-code it


def adam_direction(grad: Tensor, state: AdamState, step, beta1=0.9, beta2=0.999, eps=1e-8,
                   backend: str = "torch", impl: str = "reference") -> Tensor:
    """Update ``state`` with ``grad``; N = m̂ / (sqrt(v̂) + eps) (``step``: the 1-based index, an int or 0-d tensor)."""
    if backend == "bitsandbytes":
        n = torch.zeros(state.shape, dtype=torch.float32, device=state.device)
        _bnb_update_(n, grad, state, step, -1.0, beta1, beta2, eps)  # p = 0 - (-1) * N
        return n
    return adam_direction_masked_(grad, state, _tensor_step(step, state), beta1, beta2, eps, _ok(state), impl=impl)


def adamw_step(param: Tensor, grad: Tensor, state: AdamState, step, lr, beta1=0.9, beta2=0.999, eps=1e-8,
               weight_decay: float = 0.0, backend: str = "torch", impl: str = "reference") -> None:
    """AdamW in place on the contiguous fp32 ``param``: ``p = p*(1 - lr*wd) - lr*N``."""
    if backend == "bitsandbytes":
        if weight_decay:
            param.mul_(1.0 - lr * weight_decay)
        _bnb_update_(param, grad, state, step, float(lr), beta1, beta2, eps)
        return
    adamw_masked_(param, grad, state, _tensor_step(step, state), _ok(state), lr, beta1, beta2, eps, weight_decay,
                  impl=impl)


def _tensor_step(step, state: AdamState) -> Tensor:
    return step if isinstance(step, Tensor) else torch.tensor(step, dtype=torch.int64, device=state.device)


def _ok(state: AdamState) -> Tensor:
    return torch.ones((), dtype=torch.bool, device=state.device)


def _bnb_update_(p32: Tensor, grad: Tensor, state: AdamState, step, lr: float, beta1, beta2, eps) -> None:
    """One bitsandbytes Adam step on the contiguous fp32 ``p32`` (no weight decay)."""
    import bitsandbytes.functional as F

    g = grad.float().contiguous()
    step = int(step)
    if state.bits == 8:
        if state.block_size != BNB_BLOCK_SIZE:
            raise ValueError(f'backend="bitsandbytes" needs block_size={BNB_BLOCK_SIZE}, the state has '
                             f'block_size={state.block_size}; use backend="torch"')
        F.optimizer_update_8bit_blockwise(
            optimizer_name="adam", g=g, p=p32,
            state1=state.m, state2=state.v,
            beta1=float(beta1), beta2=float(beta2), beta3=0.0, alpha=0.0,
            eps=float(eps), step=step, lr=float(lr),
            qmap1=A.dynamic_map(True, p32.device), qmap2=A.dynamic_map(False, p32.device),
            absmax1=state.absmax_m, absmax2=state.absmax_v,
            weight_decay=0.0, gnorm_scale=1.0, skip_zeros=False,
        )
        # bitsandbytes' CUDA kernel can store a positive v as code 0 (its CPU library floors such values to code 7
        # itself, so this changes nothing there). The unquantized v is gone by now, but a first moment that is not
        # the zero code means some past gradient of that element was non-zero, so its true v is positive.
        state.v.copy_(A._floor_positive_codes(state.v, state.m != A._zero_code(True)))
    else:
        F.optimizer_update_32bit(
            optimizer_name="adam", g=g, p=p32,
            state1=state.m, state2=state.v,
            beta1=float(beta1), beta2=float(beta2), beta3=0.0, alpha=0.0,
            eps=float(eps), step=step, lr=float(lr),
            weight_decay=0.0, gnorm_scale=1.0, unorm_vec=None, max_unorm=0.0, skip_zeros=False,
        )
