"""The lean low-rank update: a factored second moment and no first moment (Adafactor with ``beta1 = 0``).

Under ``transform(model, rank, lean=True)`` a projected layer keeps, in place of Adam's two 8-bit moments of R
(2 bytes per element of R: 3.06 GiB for LLaMA-7B at rank 1024), two fp32 vectors: the moving averages of the row
means and of the column means of R² (``a + b`` floats for an ``[a, b]`` R). The second moment is their outer
product, as Adafactor (Shazeer & Stern, 2018) rebuilds it,

    V̂_ij = row_i · col_j / mean(row) / (1 - beta2^t),

and the direction is ``U = R / (sqrt(V̂) + eps)``, scaled down to an RMS of at most :data:`CLIP` (Adafactor's update
clipping, which stands in for the first moment's smoothing when a step's R is an outlier). The weight update
around it (``scale``, ``lr``, weight decay, the INT8 write-back) is the default path's. ``beta1`` is not used.

Why no first moment rather than a compressed one: at LLaMA-7B rank 1024 only dropping it reaches the 9 GiB run
(a 4-bit first moment would still hold 0.75 GiB); and in a one-seed trial on the tiny preset (an experimental
variant, not kept) a stochastically rounded 4-bit first moment beside the factored second moment came out worse
than no first moment with update clipping. The quality of what is kept, against the default, is measured in
BENCHMARKS.md ("lean=True").

Everything is masked by the 0-d bool ``ok`` (a False ``ok`` leaves the statistics bit for bit and returns 0) and
nothing reads a value on the host. R is processed in row chunks of about ``chunk`` elements, so the
temporaries stay a few MiB; the direction is written over R.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .quant import row_chunks

__all__ = ["CLIP", "FLOOR", "factor_size", "factored_direction_"]

#: Largest RMS of the direction (Adafactor's ``d``).
CLIP = 1.0
#: Added to every R² before it is averaged (Adafactor's ``eps1``): keeps a row or column of zeros from dividing by 0.
FLOOR = 1e-30


def factor_size(shape) -> int:
    """Floats of the factored statistics of an ``[a, b]`` R: ``a`` row means then ``b`` column means."""
    a, b = shape
    return int(a) + int(b)


@torch.no_grad()
def factored_direction_(R: Tensor, factors: Tensor, step: Tensor, beta2, eps, ok: Tensor,
                        chunk: int = 1 << 20) -> Tensor:
    """Update the statistics ``factors`` (``[a + b]`` fp32) with the ``[a, b]`` R and return the clipped direction.

    ``step`` is the 1-based 0-d integer count of this update, ``beta2`` and ``eps`` floats or 0-d tensors, ``ok`` a
    0-d bool tensor: where it is False the statistics keep their bits and the direction is 0 (a non-finite R never
    reaches them). A contiguous fp32 ``R`` is consumed (the direction is written over it).
    """
    if R.dim() != 2:
        raise ValueError(f"R must be 2-D, got shape {tuple(R.shape)}")
    a, b = R.shape
    if factors.dtype != torch.float32 or factors.shape != (a + b,):
        raise ValueError(f"factors must be a float32 tensor of shape ({a + b},) for R {[a, b]}, got "
                         f"{factors.dtype} {tuple(factors.shape)}")
    ok = ok.reshape(())
    in_place = R.dtype == torch.float32 and R.is_contiguous()
    N = R if in_place else torch.empty((a, b), dtype=torch.float32, device=R.device)
    if a * b == 0:
        return N
    row, col = factors[:a], factors[a:]
    ranges = list(row_chunks(a, b, 1, chunk))  # whole rows, about chunk elements each
    row_mean = torch.empty(a, dtype=torch.float32, device=R.device)
    col_sum = torch.zeros(b, dtype=torch.float32, device=R.device)
    for s, e in ranges:  # pass 1: this step's row and column means of R² (0 where not ok)
        g = torch.where(ok, R[s:e].float(), 0.0)
        N[s:e] = g
        sq = g.square_().add_(FLOOR)
        row_mean[s:e] = sq.mean(1)
        col_sum.add_(sq.sum(0))
    beta2 = beta2.reshape(()).to(device=R.device, dtype=torch.float32) if isinstance(beta2, Tensor) else \
        torch.full((), float(beta2), device=R.device)
    new_row = row * beta2 + row_mean * (1.0 - beta2)
    new_col = col * beta2 + col_sum.div_(a) * (1.0 - beta2)
    row.copy_(torch.where(ok, new_row, row))
    col.copy_(torch.where(ok, new_col, col))
    t = step.reshape(()).to(device=R.device, dtype=torch.float64)
    c2 = (1.0 - torch.pow(beta2.double(), t)).float()
    # sqrt(V̂_ij) = sqrt(row_i / (mean(row) c2)) * sqrt(col_j). Before the first finite step the statistics are all
    # 0: the clamp keeps that 0 / 0 from turning a False ok's N (0 from pass 1) into NaN
    row_scale = (row / torch.clamp(row.mean() * c2, min=torch.finfo(torch.float32).tiny)).sqrt_()
    col_scale = col.sqrt()
    sumsq = torch.zeros((), dtype=torch.float32, device=R.device)
    for s, e in ranges:  # pass 2: U = R / (sqrt(V̂) + eps), and its sum of squares
        denom = torch.outer(row_scale[s:e], col_scale).add_(eps)
        u = N[s:e].div_(denom)
        sumsq.add_(u.square().sum())
    rms = (sumsq / (a * b)).sqrt()
    N.div_(torch.clamp(rms / CLIP, min=1.0))  # update clipping (one in-place pass, no temporary)
    return N


def reference_direction(R: Tensor, row: Tensor, col: Tensor, step: int, beta2: float, eps: float):
    """The same update written whole in float64 (tests): returns (new row, new col, direction)."""
    R = R.double()
    sq = R * R + FLOOR
    row = row.double() * beta2 + sq.mean(1) * (1 - beta2)
    col = col.double() * beta2 + sq.mean(0) * (1 - beta2)
    v = torch.outer(row, col) / row.mean() / (1 - beta2 ** step)
    U = R / (v.sqrt() + eps)
    rms = math.sqrt(float(U.square().mean()))
    return row, col, U / max(1.0, rms / CLIP)
