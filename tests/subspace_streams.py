"""Synthetic gradient streams with a known subspace, shared by tests/test_lazy_refresh.py and
benchmarks/bench_lazy_refresh.py.

One projected 256x128 layer, rank 8, ``update_interval=10``, fed G_t = U·S·V_tᵀ + noise (16 tokens: 8 carry
the rank-8 signal, 8 small noise). The true top-8 right subspace V_t is steady, rotates slowly, or jumps to an
orthogonal one at step 400 and back at step 700.
"""

from __future__ import annotations

import torch
import torch.nn as nn

import qgalore_fx
from qgalore_fx import projection as proj

BIG_M, BIG_N, R, BASE = 256, 128, 8, 10
JUMPS = (400, 700)
STREAMS = ("steady", "rotate", "jump")


def signal(stream, steps, seed=0):
    """Yield ``(x, c)`` per step; the layer's weight gradient is ``c.t() @ x`` = U·S·V_tᵀ + noise."""
    if stream not in STREAMS:
        raise ValueError(f"stream must be one of {STREAMS}, got {stream!r}")
    gen = torch.Generator().manual_seed(seed)
    U = torch.linalg.qr(torch.randn(BIG_M, R, generator=gen)).Q
    V = torch.linalg.qr(torch.randn(BIG_N, 2 * R, generator=gen)).Q  # two orthogonal rank-8 subspaces
    S = torch.linspace(2.0, 1.0, R)
    angle = torch.linspace(0, 1.5, steps)
    for t in range(steps):
        if stream == "jump":
            Vt = V[:, R:] if JUMPS[0] <= t < JUMPS[1] else V[:, :R]
        elif stream == "rotate":  # turns from the first subspace toward the second over the run
            Vt = torch.linalg.qr(V[:, :R] * torch.cos(angle[t]) + V[:, R:] * torch.sin(angle[t])).Q
        else:
            Vt = V[:, :R]
        x = torch.cat([Vt.t(), 0.05 * torch.randn(8, BIG_N, generator=gen)])
        c = torch.cat([(U * S).t(), 0.05 * torch.randn(8, BIG_M, generator=gen)])
        yield x, c


def run_stream(stream, steps, **options):
    """Train the transformed layer on ``stream``; return (captured share of ||G_t||² after each step, layer).

    ``options`` go to ``qgalore_fx.transform`` (e.g. ``adaptive=False`` for the fixed schedule).
    """
    torch.manual_seed(0)
    net = qgalore_fx.transform(nn.Sequential(nn.Linear(BIG_N, BIG_M, bias=False)), rank=R, update_interval=BASE,
                               **options)
    opt = qgalore_fx.optimizer(net, lr=1e-4)
    ((_, layer),) = qgalore_fx.projected_layers(net)
    captured = []
    for x, c in signal(stream, steps):
        (net(x) * c).sum().backward()
        opt.step()
        opt.zero_grad()
        captured.append(proj.captured_energy(c.t() @ x, layer.projection_matrix(), "right"))
    return captured, layer


def steps_to_catch(captured, jump, share=0.8):
    """Steps after ``jump`` until the projection captures more than ``share`` of the gradient's energy (None: never)."""
    return next((t - jump for t in range(jump, len(captured)) if captured[t] > share), None)
