"""A refresh aligns the new projection with the old one (qgalore_fx.projection.align_projection).

Adam's moments are kept across a refresh in the old projection's coordinates, so a refresh that finds what the
old projection already had must leave the next update exactly as if no refresh had happened:

* ``align="sign"`` (default): the same singular vectors, whatever signs the new SVD gives them. The gradients
  are one fixed matrix times a positive factor per step; the SVD's signs are scrambled on purpose (as LAPACK's
  are arbitrary).
* ``align="procrustes"``: the same subspace in any basis. The gradients live in a fixed rank-r subspace on the
  projection's side (right side: the inputs x span r directions; left side: the output gradients do), with new
  random coefficients every step, so every SVD returns the same subspace in a new basis.

Setup: one projected layer, fp32 weights, fp32 moments, no stochastic rounding. Model A refreshes at attempt 5
(``update_interval=5``), model B never after the first. Tolerances: with ``proj_bits=32`` the weights after the
update that follows the refresh agree to 5e-6 relative to the total movement of 6 steps (float rounding,
measured 5e-7); with ``proj_bits`` 16 and 4 the re-stored projection differs from the old one by its rounding,
so 1e-3 and 5 % (measured 8e-5 and 1.3 % for Procrustes). Without alignment the same comparisons are off by
far more (the last tests require more than 5 %).
"""

from __future__ import annotations

from unittest import mock

import pytest
import torch
import torch.nn as nn

import qgalore_fx
from qgalore_fx import projection as proj

R = 4


def _stream(m, n, side, steps, seed=0):
    """(x, c) pairs with loss (y * c).sum(): G = cᵀ x has its row (right) or column (left) space fixed."""
    gen = torch.Generator().manual_seed(seed)
    d = n if side == "right" else m
    basis = torch.linalg.qr(torch.randn(d, R, generator=gen)).Q.T  # [R, d]
    out = []
    for _ in range(steps):
        coef = torch.randn(16, R, generator=gen) * torch.tensor([4.0, 3.0, 2.0, 1.0])
        if side == "right":
            out.append((coef @ basis, torch.randn(16, m, generator=gen)))
        else:
            out.append((torch.randn(16, n, generator=gen), coef @ basis))
    return out


def _fixed_stream(m, n, steps, seed=0):
    """The same (x, c) scaled by a positive factor each step: G keeps its singular vectors (values 4:3:2:1...)."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(16, n, generator=gen)
    c = torch.randn(16, m, generator=gen)
    return [(x * (1.0 + 0.1 * t), c) for t in range(steps)]


def _scrambled_signs(real):
    """compute_projection whose vectors come back with alternating signs at every other call."""
    calls = [0]

    def compute(G, rank, side, **kw):
        P = real(G, rank, side, **kw)
        calls[0] += 1
        if calls[0] % 2 == 0:
            flip = torch.tensor([(-1.0) ** i for i in range(rank)])
            P = P * (flip[:, None] if side == "right" else flip[None, :])
        return P

    return compute


def _train(m, n, interval, proj_bits, stream, align="procrustes"):
    torch.manual_seed(0)
    model = qgalore_fx.transform(nn.Sequential(nn.Linear(n, m, bias=False)), rank=R, weight_bits=32,
                                 proj_bits=proj_bits, optim_bits=32, stochastic_round=False, adaptive=False,
                                 proj_method="full", update_interval=interval, align=align)
    opt = qgalore_fx.optimizer(model, lr=1e-2)
    ((_, layer),) = qgalore_fx.projected_layers(model)
    w0 = layer.dequantized_weight().clone()
    for x, c in stream:
        (model(x) * c).sum().backward()
        opt.step()
        opt.zero_grad()
    return layer, w0


@pytest.mark.parametrize("proj_bits, tol", [(32, 5e-6), (16, 1e-3), (4, 0.05)])
@pytest.mark.parametrize("m, n", [(48, 32), (32, 48)], ids=["right", "left"])
def test_procrustes_refresh_onto_an_unchanged_subspace_leaves_the_next_update_unchanged(m, n, proj_bits, tol):
    side = proj.projection_side(m, n)
    stream = _stream(m, n, side, steps=6)
    a, w0 = _train(m, n, 5, proj_bits, stream)
    b, _ = _train(m, n, 10**6, proj_bits, stream)
    assert a.stats()["refresh_count"] == 2 and b.stats()["refresh_count"] == 1
    assert a.stats()["last_similarity"] == pytest.approx(1.0, abs=0.02)  # the subspace did not move (INT4: 0.993)
    # the refreshed SVD basis really differs from the stored one: only the alignment makes them equal
    x, c = stream[5]
    G = c.t() @ x
    raw = proj.compute_projection(G, R, side, method="full")
    assert float((raw - b.projection_matrix()).abs().max()) > 0.1
    moved = (b.dequantized_weight() - w0).norm()
    assert float((a.dequantized_weight() - b.dequantized_weight()).norm() / moved) <= tol


@pytest.mark.parametrize("m, n", [(48, 32), (32, 48)], ids=["right", "left"])
def test_without_alignment_the_same_refresh_changes_the_update(m, n):
    """The comparison above can fail: with the new SVD basis used as is, the next update goes elsewhere."""
    side = proj.projection_side(m, n)
    stream = _stream(m, n, side, steps=6)
    b, w0 = _train(m, n, 10**6, 32, stream, align="none")
    a, _ = _train(m, n, 5, 32, stream, align="none")
    moved = (b.dequantized_weight() - w0).norm()
    assert float((a.dequantized_weight() - b.dequantized_weight()).norm() / moved) > 0.05


@pytest.mark.parametrize("proj_bits, tol", [(32, 5e-6), (16, 1e-3), (4, 0.05)])
@pytest.mark.parametrize("m, n", [(48, 32), (32, 48)], ids=["right", "left"])
def test_sign_refresh_onto_the_same_singular_vectors_leaves_the_next_update_unchanged(m, n, proj_bits, tol):
    stream = _fixed_stream(m, n, steps=6)
    with mock.patch.object(proj, "compute_projection", _scrambled_signs(proj.compute_projection)):
        a, w0 = _train(m, n, 5, proj_bits, stream, align="sign")
        b, _ = _train(m, n, 10**6, proj_bits, stream, align="sign")
    assert a.stats()["refresh_count"] == 2 and b.stats()["refresh_count"] == 1
    moved = (b.dequantized_weight() - w0).norm()
    assert float((a.dequantized_weight() - b.dequantized_weight()).norm() / moved) <= tol


@pytest.mark.parametrize("m, n", [(48, 32), (32, 48)], ids=["right", "left"])
def test_scrambled_signs_without_alignment_change_the_update(m, n):
    stream = _fixed_stream(m, n, steps=6)
    with mock.patch.object(proj, "compute_projection", _scrambled_signs(proj.compute_projection)):
        a, w0 = _train(m, n, 5, 32, stream, align="none")
        b, _ = _train(m, n, 10**6, 32, stream, align="none")
    moved = (b.dequantized_weight() - w0).norm()
    assert float((a.dequantized_weight() - b.dequantized_weight()).norm() / moved) > 0.05


def test_sign_is_the_default():
    assert qgalore_fx.QGaLoreConfig(rank=4).align == "sign"
