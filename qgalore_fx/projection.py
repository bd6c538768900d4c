"""Gradient subspaces for Q-GaLore: computing projections and deciding when to refresh them.

Pure functions of tensors and a small plain-Python state object (no module, graph or optimizer code):
:func:`compute_projection` (methods ``"full"``, ``"randomized"``, ``"subspace"``; :class:`FactoredGradient` for a
gradient never formed), :func:`align_projection`, :func:`subspace_similarity` / :func:`weighted_similarity`,
and :class:`LazyRefreshPolicy`, the layer-adaptive lazy refresh. See docs/projection-and-refresh.md.
"""

from __future__ import annotations

import math
from typing import Literal, Optional

import torch

from qgalore_fx.config import ALIGN_METHODS, PROJ_METHODS
from qgalore_fx.kernels.quant import all_finite

__all__ = [
    "METHODS",
    "SIDES",
    "LazyRefreshPolicy",
    "align_projection",
    "captured_energy",
    "compute_projection",
    "project",
    "project_back",
    "projection_side",
    "subspace_similarity",
    "synthetic_gradient",
    "weighted_similarity",
]

Side = Literal["right", "left"]
SIDES: tuple[str, ...] = ("right", "left")
METHODS: tuple[str, ...] = PROJ_METHODS  # declared with the option, in qgalore_fx.config

# Default block power iterations per method (see compute_projection's docstring).
_DEFAULT_NITER = {"randomized": 3, "subspace": 2}


class FactoredGradient:
    """``G = leftᵀ @ right`` without forming it: ``left`` is ``[T, m]`` (output gradients), ``right``
    ``[T, n]`` (inputs), so ``G`` is ``[m, n]`` of rank at most ``T``.

    Supports what the projection code applies to ``G``: ``G @ X``, ``G.T`` (another
    :class:`FactoredGradient`), ``.shape``, ``.dense()`` and :meth:`isfinite`.
    """

    __slots__ = ("left", "right")

    def __init__(self, left: torch.Tensor, right: torch.Tensor):
        _check_2d("left", left)
        _check_2d("right", right)
        if left.shape[0] != right.shape[0]:
            raise ValueError(f"left {tuple(left.shape)} and right {tuple(right.shape)} must have the same number of "
                             "rows (tokens)")
        self.left, self.right = left, right

    @staticmethod
    def cheaper(tokens: int, m: int, n: int) -> bool:
        """Whether products through the factors cost less than through the formed ``[m, n]`` gradient."""
        return tokens * (m + n) < m * n

    @property
    def shape(self) -> torch.Size:
        return torch.Size((self.left.shape[1], self.right.shape[1]))

    @property
    def T(self) -> "FactoredGradient":
        return FactoredGradient(self.right, self.left)

    @property
    def dtype(self) -> torch.dtype:
        return torch.promote_types(self.left.dtype, self.right.dtype)

    @property
    def device(self) -> torch.device:
        return self.left.device

    def __matmul__(self, X: torch.Tensor) -> torch.Tensor:
        return self.left.T @ (self.right @ X)

    def dense(self) -> torch.Tensor:
        return self.left.T @ self.right

    def float(self) -> "FactoredGradient":
        return FactoredGradient(self.left.detach().float(), self.right.detach().float())

    def isfinite(self) -> bool:
        """Both factors finite (synchronizes); a product of finite fp32 factors overflows only past 3e38."""
        return bool(all_finite(self.left) & all_finite(self.right))


def _check_gradient(G: object) -> None:
    if isinstance(G, FactoredGradient):
        return
    _check_2d("G", G)


def _all_finite(G) -> bool:
    return G.isfinite() if isinstance(G, FactoredGradient) else bool(all_finite(G))


# --------------------------------------------------------------------------------------
# Side convention
# --------------------------------------------------------------------------------------


def projection_side(m: int, n: int) -> Side:
    """GaLore's side for a gradient of shape ``[m, n]``: ``"right"`` if ``m >= n``, else ``"left"``."""
    for name, value in (("m", m), ("n", n)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    return "right" if m >= n else "left"


def _check_side(side: object) -> Side:
    if side not in SIDES:
        raise ValueError(f"side must be one of {SIDES}, got {side!r}")
    return side  # type: ignore[return-value]


def _check_2d(name: str, t: object) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != 2:
        raise ValueError(f"{name} must be 2-D, got shape {tuple(t.shape)}")
    return t


def project(G: torch.Tensor, P: torch.Tensor, side: Side) -> torch.Tensor:
    """Low-rank gradient: ``G @ P.T`` (right, ``P`` is ``[r, n]``) or ``P.T @ G`` (left, ``P`` is ``[m, r]``).

    Computed in the promoted dtype of ``G`` and ``P`` (fp32 when either is fp32).
    """
    side = _check_side(side)
    _check_2d("G", G)
    _check_2d("P", P)
    m, n = G.shape
    if side == "right":
        if P.shape[1] != n:
            raise ValueError(
                f"right side needs P of shape [r, {n}] for G of shape {tuple(G.shape)}, got P {tuple(P.shape)}"
            )
        dtype = torch.promote_types(G.dtype, P.dtype)
        return G.to(dtype) @ P.to(dtype).T
    if P.shape[0] != m:
        raise ValueError(
            f"left side needs P of shape [{m}, r] for G of shape {tuple(G.shape)}, got P {tuple(P.shape)}"
        )
    dtype = torch.promote_types(G.dtype, P.dtype)
    return P.to(dtype).T @ G.to(dtype)


def project_back(R: torch.Tensor, P: torch.Tensor, side: Side, out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Full-shape update from a low-rank one: ``R @ P`` (right) or ``P @ R`` (left); into ``out`` (a contiguous
    tensor of the result's shape and dtype) when given."""
    side = _check_side(side)
    _check_2d("R", R)
    _check_2d("P", P)
    dtype = torch.promote_types(R.dtype, P.dtype)
    if side == "right":
        if R.shape[1] != P.shape[0]:
            raise ValueError(
                f"right side needs R of shape [m, {P.shape[0]}] for P {tuple(P.shape)}, got R {tuple(R.shape)}"
            )
        return _matmul(R.to(dtype), P.to(dtype), out)
    if R.shape[0] != P.shape[1]:
        raise ValueError(
            f"left side needs R of shape [{P.shape[1]}, n] for P {tuple(P.shape)}, got R {tuple(R.shape)}"
        )
    return _matmul(P.to(dtype), R.to(dtype), out)


def _matmul(a: torch.Tensor, b: torch.Tensor, out: Optional[torch.Tensor]) -> torch.Tensor:
    if out is None:
        return a @ b
    if out.shape != (a.shape[0], b.shape[1]) or out.dtype != a.dtype or not out.is_contiguous():
        raise ValueError(f"out must be a contiguous {a.dtype} tensor of shape {(a.shape[0], b.shape[1])}, got "
                         f"{out.dtype} {tuple(out.shape)}")
    return torch.matmul(a, b, out=out)


# --------------------------------------------------------------------------------------
# Computing P
# --------------------------------------------------------------------------------------


def _check_int_at_least(name: str, value: object, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    return value


def _canonical_signs(V: torch.Tensor) -> torch.Tensor:
    """Flip each column of ``V`` so that its largest-magnitude entry is positive."""
    idx = V.abs().argmax(dim=0, keepdim=True)
    signs = torch.gather(V, 0, idx).sign()
    signs[signs == 0] = 1.0
    return V * signs


def _gaussian(rows: int, cols: int, generator: Optional[torch.Generator], device: torch.device) -> torch.Tensor:
    gen_device = generator.device if generator is not None else device
    return torch.randn(rows, cols, generator=generator, dtype=torch.float32, device=gen_device).to(device)


def _block_power_rayleigh_ritz(A: torch.Tensor, X: torch.Tensor, rank: int, niter: int) -> torch.Tensor:
    """Top-``rank`` right singular vectors of ``A`` ([m, d]) as columns of a [d, rank] matrix.

    ``X`` ([d, q], q >= rank) is the starting block. Each iteration is ``X <- qr(AᵀA X)``
    (Householder QR on the [d, q] block: d is the projection's own dimension, the smaller
    one under GaLore's convention, which keeps the QR cheap). The Rayleigh-Ritz step then
    takes ``Z = A X`` and the eigenvectors ``W`` of ``ZᵀZ = Xᵀ AᵀA X`` ([q, q]); ``X W``
    are the Ritz vectors, ordered by decreasing Ritz value. The Gram matrix squares the
    condition number, so directions below ~sqrt(eps) * sigma_1 come out in arbitrary order,
    but they carry under ~eps of the energy and ``X W`` stays orthonormal either way.
    """
    for _ in range(niter):
        X = torch.linalg.qr(A.T @ (A @ X), mode="reduced").Q
    Z = A @ X
    _, W = torch.linalg.eigh(Z.T @ Z)  # ascending eigenvalues
    return X @ W.flip(-1)[:, :rank]


def _factored_svd(A: FactoredGradient, rank: int, generator: Optional[torch.Generator]) -> torch.Tensor:
    """Top-``rank`` right singular vectors of ``A = Lᵀ F`` ([a, d], ``F`` [T, d]) as a [d, rank] matrix, exactly.

    ``A``'s rows lie in the row space of ``F``, spanned by ``Q = qr(Fᵀ).Q`` ([d, T]), so ``A = (A Q) Qᵀ`` and the
    SVD of the [a, T] matrix ``A Q = Lᵀ (F Q)`` gives ``A``'s: its right singular vectors ``V_C`` map to ``Q V_C``.
    Costs ``O((a + d) T²)``. Past the first ``min(rank, T)`` vectors ``A`` has no energy; the remaining columns are
    an orthonormal completion drawn from ``generator`` (projected off the top vectors twice, then QR).
    """
    Q = torch.linalg.qr(A.right.T, mode="reduced").Q  # [d, T]
    C = A.left.T @ (A.right @ Q)  # [a, T]
    Vh = torch.linalg.svd(C, full_matrices=False).Vh  # descending singular values
    k = min(rank, Vh.shape[0])
    V = Q @ Vh[:k].T
    if k == rank:
        return V
    Z = _gaussian(V.shape[0], rank - k, generator, V.device)
    for _ in range(2):
        Z = Z - V @ (V.T @ Z)
    return torch.cat([V, torch.linalg.qr(Z, mode="reduced").Q], dim=1)


def compute_projection(
    G: torch.Tensor,
    rank: int,
    side: Side,
    method: str = "subspace",
    prev: Optional[torch.Tensor] = None,
    generator: Optional[torch.Generator] = None,
    oversample: int = 8,
    niter: Optional[int] = None,
) -> torch.Tensor:
    """Top-``rank`` singular subspace of ``G`` as a projection matrix, in fp32.

    Args:
        G: gradient, 2-D ``[m, n]``, any floating dtype (computed in fp32), or a
            :class:`FactoredGradient` (applied through its factors; ``"full"`` forms it). Must be finite.
        rank: number of singular vectors, ``1 <= rank <= min(m, n)``.
        side: ``"right"`` -> returns ``[rank, n]`` with orthonormal rows;
            ``"left"`` -> returns ``[m, rank]`` with orthonormal columns.
            :func:`projection_side` gives GaLore's choice.
        method: ``"full"``, ``"randomized"`` or ``"subspace"`` (docs/projection-and-refresh.md).
        prev: the previous projection (dequantized), same shape as the result; used by
            ``"subspace"`` only. ``None``, another shape or non-finite values make
            ``"subspace"`` fall back to ``"randomized"``.
        generator: source of the Gaussian sketch for ``"randomized"`` and of the extra
            columns for ``"subspace"``. With a seeded generator the result is
            deterministic; with ``None`` the global RNG is used.
        oversample: extra columns in the block, ``q = min(rank + oversample, min(m, n))``.
        niter: block power iterations, each one application of ``GᵀG`` (right) or ``GGᵀ``
            (left), i.e. two matmuls with ``G``; ``>= 1``. Default 3 for ``"randomized"``
            and 2 for ``"subspace"`` (BENCHMARKS.md has the measurements behind
            both). ``torch.svd_lowrank(niter=k)`` ends with an extra half step, so its
            subspace is the one ``niter=k + 1`` gives here: the randomized default matches
            ``torch.svd_lowrank(niter=2)`` in quality, with its QR factorizations on the
            small side only.
    """
    _check_gradient(G)
    side = _check_side(side)
    if method not in METHODS:  # alphabetically, as the module docstring lists them
        raise ValueError(f"method must be one of {tuple(sorted(METHODS))}, got {method!r}")
    m, n = G.shape
    if isinstance(rank, bool) or not isinstance(rank, int) or not 1 <= rank <= min(m, n):
        raise ValueError(
            f"rank must be an int with 1 <= rank <= min(m, n) = {min(m, n)} for G of shape {(m, n)}, got {rank!r}"
        )
    oversample = _check_int_at_least("oversample", oversample, 0)
    if niter is not None:
        niter = _check_int_at_least("niter", niter, 1)
    if not G.dtype.is_floating_point:
        raise ValueError(f"G must be a floating-point tensor, got dtype {G.dtype}")
    if not _all_finite(G):
        raise ValueError("G contains NaN or Inf; a projection cannot be computed from it")

    A = G.float() if isinstance(G, FactoredGradient) else G.detach().to(torch.float32)
    if method == "full" and isinstance(A, FactoredGradient):
        A = A.dense()  # the SVD reference works on the formed matrix
    if side == "left":
        A = A.T  # left singular vectors of G are the right singular vectors of Gᵀ
    # From here on: A is [a, d] and we want V = top-rank right singular vectors, [d, rank].
    d = A.shape[1]
    out_shape = (rank, d) if side == "right" else (d, rank)

    q = min(rank + oversample, min(m, n))
    if method == "full":
        V = torch.linalg.svd(A, full_matrices=False).Vh[:rank].T
    elif isinstance(A, FactoredGradient) and A.left.shape[0] < q:
        # G has rank <= T < q: the iteration cannot beat the exact SVD, which the factors give cheaply
        V = _factored_svd(A, rank, generator)
    else:
        if method == "subspace" and _usable_prev(prev, out_shape):
            start = prev.detach().to(device=A.device, dtype=torch.float32)
            start = start.T if side == "right" else start  # [d, rank]
            if q > rank:
                start = torch.cat([start, _gaussian(d, q - rank, generator, A.device)], dim=1)
            iters = _DEFAULT_NITER["subspace"] if niter is None else niter
        else:
            start = _gaussian(d, q, generator, A.device)
            iters = _DEFAULT_NITER["randomized"] if niter is None else niter
        V = _block_power_rayleigh_ritz(A, start, rank, iters)

    V = _canonical_signs(V)
    P = V.T if side == "right" else V
    return P.contiguous()


def align_projection(P_new: torch.Tensor, P_old: Optional[torch.Tensor], side: Side,
                     method: str = "sign") -> torch.Tensor:
    """``P_new``'s subspace in a basis aligned with ``P_old`` (docs/projection-and-refresh.md, "Aligning a
    refreshed projection"), fp32.

    With ``B`` the basis as columns (``P.T`` on the right side, ``P`` on the left):

    - ``"sign"``: ``B_new`` with each column negated where its inner product with the same column of
      ``B_old`` is negative; the vectors and their order are the new ones.
    - ``"procrustes"``: ``B_new @ Q`` with the orthogonal ``Q`` ([r, r]) minimizing ``||B_new Q - B_old||_F``
      (``B_newᵀ B_old = U S Vᵀ``, ``Q = U Vᵀ``, in fp64); when the subspaces are equal it *is* ``P_old``
      (to rounding), whatever basis the new SVD returned. ``P_old`` may be a dequantized, slightly
      non-orthonormal projection: only its polar factor matters.
    - ``"none"``: ``P_new`` as it is.

    Either way the span is exactly ``P_new``'s, so what a projection captures does not change. ``None``,
    another shape or non-finite values of ``P_old`` return ``P_new`` unchanged.
    """
    side = _check_side(side)
    _check_2d("P_new", P_new)
    if method not in ALIGN_METHODS:
        raise ValueError(f"align method must be one of {ALIGN_METHODS}, got {method!r}")
    if method == "none" or not _usable_prev(P_old, tuple(P_new.shape)):
        return P_new
    B_new = (P_new.T if side == "right" else P_new).to(torch.float64)
    B_old = (P_old.T if side == "right" else P_old).to(device=P_new.device, dtype=torch.float64)
    if method == "sign":
        B = B_new * torch.where((B_new * B_old).sum(dim=0) < 0, -1.0, 1.0).to(B_new)
    else:
        U, _, Vh = torch.linalg.svd(B_new.T @ B_old)
        B = B_new @ (U @ Vh)
    return (B.T if side == "right" else B).to(torch.float32).contiguous()


def _usable_prev(prev: Optional[torch.Tensor], shape: tuple[int, int]) -> bool:
    return (
        isinstance(prev, torch.Tensor)
        and tuple(prev.shape) == shape
        and prev.dtype.is_floating_point
        and bool(all_finite(prev))
    )


# --------------------------------------------------------------------------------------
# Comparing projections
# --------------------------------------------------------------------------------------


def _orthonormal_basis(P: torch.Tensor, side: Side) -> torch.Tensor:
    """Columns spanning P's subspace, orthonormalized (P may be a dequantized, slightly
    non-orthonormal matrix)."""
    B = P.detach().to(torch.float64)
    B = B.T if side == "right" else B
    return torch.linalg.qr(B, mode="reduced").Q


def subspace_similarity(
    P_new: torch.Tensor, P_old: torch.Tensor, side: Side, *, chance_adjusted: bool = False
) -> float:
    """Mean squared cosine of the principal angles between two projections' subspaces.

    For rows-orthonormal ``[r, n]`` (right side) this is ``||P_new P_oldᵀ||_F² / r``; for
    columns-orthonormal ``[m, r]`` (left side) ``||P_newᵀ P_old||_F² / r``. The inputs are
    orthonormalized first (in fp64), so a dequantized INT4 ``P`` is measured by the subspace
    it spans. With different ranks the mean runs over ``min(r_new, r_old)`` angles.

    Range ``[0, 1]``: 1 when the subspaces are equal, whatever the signs or the basis within
    them; about ``r / d`` for unrelated random subspaces of a d-dimensional space, or about 0
    with ``chance_adjusted=True`` (``(s - r/d) / (1 - r/d)`` clamped to ``[0, 1]``).
    docs/projection-and-refresh.md explains why this replaces the official code's signed cosine of
    the top singular vector.
    """
    side = _check_side(side)
    _check_2d("P_new", P_new)
    _check_2d("P_old", P_old)
    dim_axis = 1 if side == "right" else 0
    if P_new.shape[dim_axis] != P_old.shape[dim_axis]:
        raise ValueError(
            f"P_new {tuple(P_new.shape)} and P_old {tuple(P_old.shape)} live in different spaces for side={side!r}"
        )
    d = P_new.shape[dim_axis]
    r_new, r_old = P_new.shape[1 - dim_axis], P_old.shape[1 - dim_axis]
    if max(r_new, r_old) > d:
        raise ValueError(f"rank exceeds the dimension {d}: P_new {tuple(P_new.shape)}, P_old {tuple(P_old.shape)}")
    Qn = _orthonormal_basis(P_new, side)
    Qo = _orthonormal_basis(P_old, side)
    r = min(r_new, r_old)
    s = float((Qn.T @ Qo).square().sum()) / r
    s = min(max(s, 0.0), 1.0)
    if chance_adjusted:
        chance = max(r_new, r_old) / d
        if chance >= 1.0:
            return 1.0
        s = min(max((s - chance) / (1.0 - chance), 0.0), 1.0)
    return s


def weighted_similarity(
    G: torch.Tensor, P_new: torch.Tensor, P_old: torch.Tensor, side: Side, *, chance_adjusted: bool = False
) -> float:
    """Mean squared cosine of the principal angles, weighted by ``G``'s energy along each direction of ``P_new``.

    With ``Q`` the orthonormalized bases and ``Z = project(G, Q_new)`` (``G``'s component in the new
    subspace, its best rank-r approximation when ``P_new`` holds the top-r singular vectors), this is
    ``||Z Q_newᵀ Q_old||_F² / ||Z||_F²`` (right side; the left side transposes): the fraction of that
    component the *old* projection still captures. Writing ``G``'s component along the new singular
    vectors ``v_i`` as ``σ_i``, it is ``Σ σ_i² ||Q_oldᵀ v_i||² / Σ σ_i²`` — :func:`subspace_similarity`
    (which weights every direction ``1 / r``) with each direction weighted by the gradient energy it
    carries. Range ``[0, 1]``; 1 when the old subspace contains the new one's energy; about ``r / d`` for
    an unrelated random subspace, or about 0 with ``chance_adjusted=True`` (``(s - r/d) / (1 - r/d)``,
    clamped). Invariant to signs and rotations within either basis. ``G`` all zero: the unweighted
    :func:`subspace_similarity`. Cost: one product the size of ``R`` and two ``[r, r]``-sized ones (fp32).

    docs/projection-and-refresh.md ("Calibrating the lazy refresh") explains why the lazy refresh uses this.
    """
    side = _check_side(side)
    _check_gradient(G)
    Qn = _orthonormal_basis(P_new, side).float()
    Qo = _orthonormal_basis(P_old, side).float()
    if Qn.shape[0] != Qo.shape[0]:
        raise ValueError(f"P_new {tuple(P_new.shape)} and P_old {tuple(P_old.shape)} live in different spaces")
    A = G.float() if isinstance(G, FactoredGradient) else G.detach().float()
    Z = A @ Qn if side == "right" else A.T @ Qn  # [*, r_new]: G's coordinates in the new basis
    total = float(Z.square().sum())
    if total <= 0.0 or not math.isfinite(total):
        return subspace_similarity(P_new, P_old, side, chance_adjusted=chance_adjusted)
    s = float((Z @ (Qn.T @ Qo)).square().sum()) / total
    s = min(max(s, 0.0), 1.0)
    if chance_adjusted:
        d = Qn.shape[0]
        chance = max(Qn.shape[1], Qo.shape[1]) / d
        if chance >= 1.0:
            return 1.0
        s = min(max((s - chance) / (1.0 - chance), 0.0), 1.0)
    return s


def captured_energy(G: torch.Tensor, P: torch.Tensor, side: Side) -> float:
    """Fraction of ``||G||_F²`` kept by the projection: ``||project(G, P)||_F² / ||G||_F²``.

    For orthonormal ``P`` this is in ``[0, 1]``, and the top-r singular vectors maximize it
    (Eckart-Young). 0 for an all-zero ``G``.
    """
    total = float(G.detach().double().square().sum())
    if total == 0.0:
        return 0.0
    return float(project(G.detach().double(), P.detach().double(), side).square().sum()) / total


# --------------------------------------------------------------------------------------
# Layer-adaptive lazy refresh
# --------------------------------------------------------------------------------------


def _check_step(step: object) -> int:
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise ValueError(f"step must be an int >= 0, got {step!r}")
    return step


def _as_similarity(name: str, value: object) -> float:
    """A finite float in [-1, 1] (signed cosines are accepted, for callers that use them)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{name} must be a float or None, got {value!r}")
    value = float(value)
    if not math.isfinite(value) or not -1.0 - 1e-6 <= value <= 1.0 + 1e-6:
        raise ValueError(f"{name} must be a finite number in [-1, 1] or None, got {value!r}")
    return value


class LazyRefreshPolicy:
    """When one layer recomputes its projection: Q-GaLore's layer-adaptive lazy refresh.

    Args:
        update_interval: initial steps between refreshes (int >= 1); the paper's 200.
        cos_threshold: similarity at or above which a refresh counts as "agreeing"
            (``0 <= cos_threshold <= 1``); the paper's 0.4.
        queue_size: agreeing refreshes in a row needed to double the interval (int >= 1);
            5, the official code's default.
        adaptive: ``False`` keeps the interval fixed (plain GaLore).

    Usage, per layer and step::

        if policy.should_refresh(step):
            P_new = compute_projection(G, rank, side, prev=P_old)
            sim = None if P_old is None else weighted_similarity(G, P_new, P_old, side, chance_adjusted=True)
            policy.record_refresh(step, sim)

    ``step`` is the layer's own update counter; steps must not go backwards.
    """

    def __init__(
        self,
        update_interval: int = 200,
        cos_threshold: float = 0.4,
        queue_size: int = 5,
        adaptive: bool = True,
    ) -> None:
        if isinstance(update_interval, bool) or not isinstance(update_interval, int) or update_interval < 1:
            raise ValueError(f"update_interval must be an int >= 1, got {update_interval!r}")
        if (
            isinstance(cos_threshold, bool)
            or not isinstance(cos_threshold, (int, float))
            or not 0.0 <= float(cos_threshold) <= 1.0
        ):
            raise ValueError(f"cos_threshold must be a number with 0 <= cos_threshold <= 1, got {cos_threshold!r}")
        if isinstance(queue_size, bool) or not isinstance(queue_size, int) or queue_size < 1:
            raise ValueError(f"queue_size must be an int >= 1, got {queue_size!r}")
        if not isinstance(adaptive, bool):
            raise ValueError(f"adaptive must be a bool, got {adaptive!r}")
        self.update_interval = update_interval
        self.cos_threshold = float(cos_threshold)
        self.queue_size = queue_size
        self.adaptive = adaptive
        # Schedule state.
        self.interval = update_interval
        self.last_refresh_step: Optional[int] = None
        self.refresh_count = 0
        self.last_similarity: Optional[float] = None
        self.queue: list[float] = []
        self.interval_history: list[tuple[int, int]] = []  # (step, new interval) at each doubling

    # -- schedule ------------------------------------------------------------------------

    @property
    def next_refresh_step(self) -> int:
        """The first step at which :meth:`should_refresh` returns True (0 before any refresh)."""
        return 0 if self.last_refresh_step is None else self.last_refresh_step + self.interval

    def should_refresh(self, step: int) -> bool:
        """True at the first step seen, then whenever ``step - last_refresh_step >= interval``."""
        step = _check_step(step)
        if self.last_refresh_step is None:
            return True
        if step < self.last_refresh_step:
            raise ValueError(
                f"step {step} is before the last refresh at step {self.last_refresh_step}; steps must not go backwards"
            )
        return step - self.last_refresh_step >= self.interval

    def record_refresh(self, step: int, similarity: Optional[float]) -> bool:
        """Record a refresh at ``step``; returns True if the interval grew.

        ``similarity`` compares the new projection with the previous one (the library's
        layers record :func:`weighted_similarity` with ``chance_adjusted=True``, see
        ``lowrank._refresh_similarity``); ``None`` when there was no previous one (the first
        refresh), in which case the queue is left as it is. With ``adaptive=True`` the value
        joins the queue of the last ``queue_size`` similarities; a value below ``cos_threshold``
        puts the interval back to ``update_interval`` (the subspace moved: the lazy schedule
        re-arms); when the queue is full and every entry is ``>= cos_threshold`` the interval
        doubles.
        """
        step = _check_step(step)
        if self.last_refresh_step is not None and step <= self.last_refresh_step:
            raise ValueError(f"step {step} must be after the last refresh at step {self.last_refresh_step}")
        if similarity is not None:
            similarity = _as_similarity("similarity", similarity)
        self.last_refresh_step = step
        self.refresh_count += 1
        self.last_similarity = similarity
        if not self.adaptive or similarity is None:
            return False
        self.queue.append(similarity)
        if len(self.queue) > self.queue_size:
            del self.queue[: len(self.queue) - self.queue_size]
        if similarity < self.cos_threshold:  # the subspace moved: back to the base interval
            if self.interval != self.update_interval:
                self.interval = self.update_interval
                self.interval_history.append((step, self.interval))
            return False
        if len(self.queue) < self.queue_size or min(self.queue) < self.cos_threshold:
            return False
        self.interval *= 2
        self.interval_history.append((step, self.interval))
        return True

    def __repr__(self) -> str:
        return (
            f"LazyRefreshPolicy(interval={self.interval}, update_interval={self.update_interval}, "
            f"cos_threshold={self.cos_threshold}, queue_size={self.queue_size}, adaptive={self.adaptive}, "
            f"refresh_count={self.refresh_count}, "
            f"last_refresh_step={self.last_refresh_step}, last_similarity={self.last_similarity})"
        )


# --------------------------------------------------------------------------------------
# Test and benchmark helper
# --------------------------------------------------------------------------------------


def synthetic_gradient(
    m: int,
    n: int,
    *,
    decay: float = 1.0,
    generator: Optional[torch.Generator] = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """A gradient-like ``[m, n]`` matrix with singular values ``(i + 1) ** -decay``.

    Random orthonormal singular vectors (QR of Gaussian matrices drawn from ``generator``),
    computed in ``dtype``. ``decay=0`` gives an exactly flat spectrum. Shared by the tests
    and ``benchmarks/bench_projection.py`` so both measure the same matrices.
    """
    k = min(m, n)
    U = torch.linalg.qr(torch.randn(m, k, generator=generator, dtype=dtype)).Q
    V = torch.linalg.qr(torch.randn(n, k, generator=generator, dtype=dtype)).Q
    s = torch.arange(1, k + 1, dtype=dtype).pow(-float(decay))
    return (U * s) @ V.T
