"""Adam moments stored 8-bit block-wise, and the Adam / AdamW update on them.

:class:`AdamState` holds one tensor's moments (uint8 codes into bitsandbytes' dynamic maps plus an fp32 absmax per
256-element block, or fp32 below 4096 elements); the library calls two entry points, neither of which
synchronizes with the host: :func:`adam_direction_masked_` (update the moments, return N = m̂ / (sqrt(v̂) + eps))
and :func:`adamw_masked_` (a whole AdamW step on an fp32 parameter). Second moments are rounded stochastically
and never to zero. See docs/8bit-moments.md.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Union

import torch
from torch import Tensor

from qgalore_fx.config import OPTIM_BITS

from .fastpath import AVX2_CFLAGS, CPU_HAS_AVX2, CompiledKernel, NativeKernel
from .quant import _mix32

__all__ = [
    "AdamState",
    "adam_direction_masked_",
    "adamw_masked_",
    "dequantize_blockwise_dynamic",
    "dynamic_map",
    "quantize_blockwise_dynamic",
]

BLOCK_SIZE = 256
MIN_8BIT_SIZE = 4096
IMPLS = ("auto", "reference", "fused")
_BITS = OPTIM_BITS  # QGaLoreConfig.optim_bits


# --------------------------------------------------------------------------- maps
def _build_dynamic_map(signed: bool) -> Tensor:
    values = [0.0, 1.0]
    for k in range(7):  # decades 1e-6 .. 1e0
        parts = 2**k if signed else 2 ** (k + 1)
        edges = torch.linspace(0.1, 1.0, parts + 1, dtype=torch.float32)
        mids = (edges[:-1] + edges[1:]) / 2.0 * (10.0 ** (k - 6))
        values += mids.tolist()
        if signed:
            values += (-mids).tolist()
    assert len(values) == 256
    return torch.tensor(sorted(values), dtype=torch.float32)


# Nearest-code search. ``torch.bucketize`` against the 255 midpoints is the
# definition, but it is a scalar binary search (~20 ns per element on CPU).
# Instead a float32's sign, exponent and top 9 mantissa bits (its bit pattern
# >> 14) pick one of 2^18 cells; each cell spans at most 2^-9 of its magnitude,
# less than the smallest relative gap between two midpoints (0.35 %, next to
# 1.0), so a cell holds at most one midpoint (checked when the table is built).
# The table stores bucketize(the cell's smallest value) = g, and the code of x
# is g + (x > midpoint[g]): the same integer bucketize gives, ~20x faster
# single-threaded on CPU (1M values: 4-8 ms vs ~130 ms).
_LUT_SHIFT = 14
_LUT_CELLS = 1 << (32 - _LUT_SHIFT)


def _build_lut(midpoints: Tensor) -> Tensor:
    cells = torch.arange(_LUT_CELLS, dtype=torch.int64)
    ends = []
    for low_bits in (0, (1 << _LUT_SHIFT) - 1):
        pattern = (cells << _LUT_SHIFT) | low_bits
        pattern = torch.where(pattern >= 2**31, pattern - 2**32, pattern)  # as a signed int32
        ends.append(pattern.to(torch.int32).view(torch.float32))
    lo, hi = torch.minimum(*ends), torch.maximum(*ends)  # negative floats order backwards
    first = torch.bucketize(lo, midpoints, out_int32=True)
    finite = torch.isfinite(lo) & torch.isfinite(hi)
    last = torch.bucketize(hi, midpoints, out_int32=True)
    assert int((last - first)[finite].max()) <= 1, "a lookup cell holds two midpoints"
    return first  # int32


# Per (signed, device) cache. A plain dict, not lru_cache, so that a function
# compiled with torch.compile reads the cached tensors as constants; the cache
# is filled eagerly by AdamState.zeros / .to / from_state_dict, before any
# compiled step runs.
_MAP_CACHE: dict[tuple[bool, str], tuple[Tensor, Tensor, Tensor, Tensor]] = {}


def _cached_map(signed: bool, device: str) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(map, midpoints, lookup table, midpoints + [inf]) on ``device``."""
    key = (signed, device)
    hit = _MAP_CACHE.get(key)
    if hit is None:
        qmap = _build_dynamic_map(signed)
        midpoints = (qmap[:-1] + qmap[1:]) / 2.0
        lut = _build_lut(midpoints)
        mid_ext = torch.cat([midpoints, torch.tensor([math.inf])])
        hit = _MAP_CACHE[key] = tuple(t.to(device) for t in (qmap, midpoints, lut, mid_ext))
    return hit


def _warm_maps(device) -> None:
    for signed in (True, False):
        _cached_map(signed, str(torch.device(device)))


def _nearest_code(x: Tensor, signed: bool) -> Tensor:
    """uint8 ``torch.bucketize(x, midpoints)`` for contiguous fp32 ``x`` (ties to the lower code)."""
    _, _, lut, mid_ext = _cached_map(signed, str(x.device))
    cell = (x.reshape(-1).view(torch.int32) >> _LUT_SHIFT) & (_LUT_CELLS - 1)
    g = lut.index_select(0, cell)  # index_select: ~10x faster than lut[cell] on CPU
    return g.add_((x.reshape(-1) > mid_ext.index_select(0, g)).int()).to(torch.uint8).view(x.shape)


def dynamic_map(signed: bool, device: Optional[Union[str, torch.device]] = None) -> Tensor:
    """The 256-value dynamic quantization map (docs/8bit-moments.md, "Storage").

    The returned tensor is shared and cached per device: do not modify it.
    """
    return _cached_map(bool(signed), str(torch.device(device or "cpu")))[0]


def _zero_code(signed: bool) -> int:
    return 127 if signed else 0  # index of 0.0 in the map


# --------------------------------------------------------------------------- block-wise (de)quantization
def quantize_blockwise_dynamic(x: Tensor, signed: bool, block_size: int = BLOCK_SIZE) -> tuple[Tensor, Tensor]:
    """Quantize ``x`` (any shape) to uint8 codes into the dynamic map.

    Blocks are ``block_size`` consecutive elements of ``x.reshape(-1)``, the
    last one possibly short. Returns ``(codes, absmax)``: codes with ``x``'s
    shape, absmax fp32 of shape ``[ceil(numel / block_size)]`` holding
    ``max|x|`` of each block. Each code is the nearest map value to
    ``x / absmax`` (ties to the lower code); all-zero blocks get the zero code.
    """
    # Written without padding or in-place writes into slices: inductor (torch
    # 2.13) mis-compiled the short last block of a padded version.
    flat = x.reshape(-1).float()
    head, tail = _split_blocks(flat, block_size)
    normed, absmax = [], []
    if head.numel():
        a = head.abs().amax(dim=1)
        normed.append((head / torch.where(a > 0, a, 1.0)[:, None]).reshape(-1))
        absmax.append(a)
    if tail.numel():
        a = tail.abs().amax(dim=0, keepdim=True)
        normed.append(tail / torch.where(a > 0, a, 1.0))
        absmax.append(a)
    if not normed:
        return torch.empty(x.shape, dtype=torch.uint8, device=x.device), flat.new_empty(0)
    codes = _nearest_code(_cat(normed), bool(signed))
    return codes.view(x.shape), _cat(absmax)


def dequantize_blockwise_dynamic(codes: Tensor, absmax: Tensor, signed: bool, block_size: int = BLOCK_SIZE) -> Tensor:
    """fp32 tensor of ``codes``' shape: ``qmap[code] * absmax[block]``."""
    vals = dynamic_map(signed, codes.device).index_select(0, codes.reshape(-1).int())
    head, tail = _split_blocks(vals, block_size)
    parts = []
    if head.numel():
        parts.append((head * absmax[: head.shape[0], None]).reshape(-1))
    if tail.numel():
        parts.append(tail * absmax[-1])
    return _cat(parts).view(codes.shape) if parts else vals.view(codes.shape)


def _split_blocks(flat: Tensor, block_size: int) -> tuple[Tensor, Tensor]:
    """(full blocks as [n_full, block_size], the short last block or an empty tensor)."""
    full = (flat.numel() // block_size) * block_size
    return flat[:full].view(-1, block_size), flat[full:]


def _cat(parts: list) -> Tensor:
    return parts[0] if len(parts) == 1 else torch.cat(parts)


# --------------------------------------------------------------------------- state
@dataclass(eq=False)
class AdamState:
    """Adam's two moments for one tensor of shape ``shape``.

    ``bits == 8``: ``m`` and ``v`` are uint8 codes of shape ``shape`` (signed
    and unsigned dynamic map), ``absmax_m`` / ``absmax_v`` fp32 of shape
    ``[ceil(numel / block_size)]``. ``bits == 32``: ``m`` and ``v`` are fp32
    of shape ``shape`` and the absmax fields are ``None``.

    Build with ``AdamState.zeros``; the step count is the caller's.
    """

    shape: torch.Size
    bits: int
    block_size: int
    m: Tensor
    v: Tensor
    absmax_m: Optional[Tensor] = None
    absmax_v: Optional[Tensor] = None

    def __post_init__(self):
        self.shape = torch.Size(self.shape)
        self.bits = int(self.bits)
        self.block_size = int(self.block_size)
        if self.bits not in _BITS:
            raise ValueError(f"bits must be one of {_BITS}, got {self.bits!r}")
        if self.block_size <= 0:
            raise ValueError(f"block_size must be a positive int, got {self.block_size!r}")
        dtype = torch.uint8 if self.bits == 8 else torch.float32
        for name in ("m", "v"):
            t = getattr(self, name)
            if not isinstance(t, Tensor) or t.dtype != dtype or t.shape != self.shape:
                got = f"{t.dtype} {tuple(t.shape)}" if isinstance(t, Tensor) else type(t).__name__
                raise ValueError(f"AdamState.{name} must be a {dtype} tensor of shape {tuple(self.shape)} "
                                 f"for bits={self.bits}, got {got}")
        if self.bits == 8:
            n_blocks = -(-self.shape.numel() // self.block_size)
            for name in ("absmax_m", "absmax_v"):
                t = getattr(self, name)
                if not isinstance(t, Tensor) or t.dtype != torch.float32 or tuple(t.shape) != (n_blocks,):
                    got = f"{t.dtype} {tuple(t.shape)}" if isinstance(t, Tensor) else repr(t)
                    raise ValueError(f"AdamState.{name} must be a float32 tensor of shape ({n_blocks},) "
                                     f"for bits=8, block_size={self.block_size}, got {got}")
        elif self.absmax_m is not None or self.absmax_v is not None:
            raise ValueError("AdamState.absmax_m / absmax_v must be None for bits=32")
        devices = {t.device for t in (self.m, self.v, self.absmax_m, self.absmax_v) if t is not None}
        if len(devices) != 1:
            raise ValueError(f"all AdamState tensors must be on one device, got {sorted(map(str, devices))}")
        if self.bits == 8 and self.m.device.type != "meta":
            _warm_maps(self.m.device)

    # ---------------------------------------------------------------- construction
    @classmethod
    def zeros(
        cls,
        shape,
        bits: int = 8,
        device=None,
        block_size: int = BLOCK_SIZE,
        min_8bit_size: int = MIN_8BIT_SIZE,
    ) -> "AdamState":
        """Zero moments for a tensor of ``shape``.

        ``bits=8`` stores 8-bit block-wise moments unless the tensor has fewer
        than ``min_8bit_size`` elements, in which case fp32 moments are kept
        (bitsandbytes' rule; ``min_8bit_size=0`` disables it).
        """
        if bits not in _BITS:
            raise ValueError(f"bits must be one of {_BITS}, got {bits!r}")
        if not isinstance(block_size, int) or block_size <= 0:
            raise ValueError(f"block_size must be a positive int, got {block_size!r}")
        if not isinstance(min_8bit_size, int) or min_8bit_size < 0:
            raise ValueError(f"min_8bit_size must be an int >= 0, got {min_8bit_size!r}")
        try:
            shape = torch.Size(shape)
        except TypeError:
            raise ValueError(f"shape must be a sequence of ints, got {shape!r}") from None
        if any(d < 0 for d in shape):
            raise ValueError(f"shape must not have negative sizes, got {tuple(shape)}")
        if bits == 8 and shape.numel() < min_8bit_size:
            bits = 32
        if bits == 32:
            z = torch.zeros(shape, dtype=torch.float32, device=device)
            return cls(shape, 32, block_size, z, z.clone())
        n_blocks = -(-shape.numel() // block_size)
        return cls(
            shape, 8, block_size,
            m=torch.full(shape, _zero_code(True), dtype=torch.uint8, device=device),
            v=torch.full(shape, _zero_code(False), dtype=torch.uint8, device=device),
            absmax_m=torch.zeros(n_blocks, dtype=torch.float32, device=device),
            absmax_v=torch.zeros(n_blocks, dtype=torch.float32, device=device),
        )

    # ---------------------------------------------------------------- accounting
    def tensors(self) -> dict[str, Tensor]:
        """The stored tensors by name (the quantization maps are shared, not counted)."""
        out = {"m": self.m, "v": self.v}
        if self.bits == 8:
            out["absmax_m"] = self.absmax_m
            out["absmax_v"] = self.absmax_v
        return out

    @property
    def nbytes(self) -> int:
        """Exact bytes of this state's own tensors (codes/moments and absmax)."""
        return sum(t.numel() * t.element_size() for t in self.tensors().values())

    @property
    def device(self) -> torch.device:
        return self.m.device

    def __repr__(self) -> str:
        return (f"AdamState(shape={tuple(self.shape)}, bits={self.bits}, block_size={self.block_size}, "
                f"nbytes={self.nbytes}, device={self.device})")

    # ---------------------------------------------------------------- (de)serialization
    def state_dict(self) -> dict[str, Tensor]:
        """Tensors only (safetensors-ready). The moment tensors are this state's own, not copies."""
        out = dict(self.tensors())
        out["shape"] = torch.tensor(list(self.shape), dtype=torch.int64)
        out["bits"] = torch.tensor(self.bits, dtype=torch.int64)
        out["block_size"] = torch.tensor(self.block_size, dtype=torch.int64)
        return out

    @classmethod
    def from_state_dict(cls, d: dict) -> "AdamState":
        """Inverse of ``state_dict``. The tensors are copied, so the result never aliases ``d``."""
        missing = [k for k in ("m", "v", "shape", "bits", "block_size") if k not in d]
        if missing:
            raise ValueError(f"AdamState state dict is missing {missing}; it has {sorted(d)}")
        bits = int(d["bits"])
        absmax = {}
        if bits == 8:
            for k in ("absmax_m", "absmax_v"):
                if k not in d:
                    raise ValueError(f"AdamState state dict with bits=8 is missing {k!r}")
                absmax[k] = d[k].clone()
        return cls(
            shape=torch.Size(int(s) for s in d["shape"].tolist()),
            bits=bits,
            block_size=int(d["block_size"]),
            m=d["m"].clone(),
            v=d["v"].clone(),
            **absmax,
        )

    def part(self, start: int, stop: int) -> "AdamState":
        """The moments of flat elements ``[start, stop)`` as a 1-D state of views (``start`` on a block boundary
        for 8-bit moments): updating the part updates this state."""
        m, v = self.m.view(-1)[start:stop], self.v.view(-1)[start:stop]
        if self.bits == 8:
            if start % self.block_size:
                raise ValueError(f"an 8-bit part must start on a block boundary ({self.block_size}), got {start}")
            blocks = slice(start // self.block_size, -(-stop // self.block_size))
            return AdamState((stop - start,), 8, self.block_size, m, v, self.absmax_m[blocks], self.absmax_v[blocks])
        return AdamState((stop - start,), 32, self.block_size, m, v)

    def to(self, device) -> "AdamState":
        """A state on ``device`` (``self`` if already there)."""
        device = torch.device(device)
        if device == self.device:
            return self
        moved = {k: t.to(device) for k, t in self.tensors().items()}
        return AdamState(self.shape, self.bits, self.block_size, **moved)

    def clone(self) -> "AdamState":
        return AdamState(self.shape, self.bits, self.block_size, **{k: t.clone() for k, t in self.tensors().items()})


# --------------------------------------------------------------------------- torch reference
def _bias_corrections(beta1: float, beta2: float, step):
    """(c1, c2) = (1 - beta1^t, sqrt(1 - beta2^t)), computed in float64."""
    if isinstance(step, Tensor):
        t = step.reshape(()).to(torch.float64)
        return 1.0 - torch.pow(beta1, t), torch.sqrt(1.0 - torch.pow(beta2, t))
    return 1.0 - beta1**step, math.sqrt(1.0 - beta2**step)


def _adam_fp32_(m: Tensor, v: Tensor, g: Tensor, step, beta1, beta2, eps) -> Tensor:
    """Update fp32 moments ``m``, ``v`` in place; return N = m̂ / (sqrt(v̂) + eps).

    ``beta1``, ``beta2``, ``eps`` are floats or 0-d tensors (then nothing reads them on the host).
    """
    if isinstance(beta1, Tensor) or isinstance(beta2, Tensor):
        m.mul_(beta1).add_(g * (1.0 - beta1))
        v.mul_(beta2).addcmul_(g, g * (1.0 - beta2))
    else:
        m.mul_(beta1).add_(g, alpha=1.0 - beta1)
        v.mul_(beta2).addcmul_(g, g, value=1.0 - beta2)
    c1, c2 = _bias_corrections(beta1, beta2, step)
    denom = v.sqrt().div_(c2).add_(eps)
    return m.mul(1.0 / c1).div_(denom)


def _floor_positive_codes(v_codes: Tensor, positive: Tensor) -> Tensor:
    """Second-moment codes where no element of ``positive`` holds the zero code (it takes code 1 instead).

    Code 0 of the unsigned map is 0.0 and code 1 its smallest positive value (3.25e-7; the midpoint between
    them, below which a value rounds to 0, is 1.625e-7 of the block's absmax). See "Second moments never
    round to zero" in docs/8bit-moments.md.
    """
    return torch.where(positive & (v_codes == _zero_code(False)), 1, v_codes).to(torch.uint8)


_MASK32 = 0xFFFFFFFF
_GOLDEN32 = 0x9E3779B9  # 2^32 / golden ratio


def _rounding_salt(step, offset: int, device) -> Tensor:
    """int64 ``[offset, (step * golden) mod 2^32]``: what the rounding draws of a state's elements at ``step`` need
    besides their index (:func:`_uniform`)."""
    t = step.reshape(()).to(device=device, dtype=torch.int64) if isinstance(step, Tensor) else \
        torch.full((), int(step), dtype=torch.int64, device=device)
    return torch.stack([torch.full((), int(offset), dtype=torch.int64, device=device),
                        ((t & 0xFFFFFFF) * _GOLDEN32) & _MASK32])  # 28 bits x 32 bits: stays inside int64


def _uniform(index: Tensor, salt: Tensor) -> Tensor:
    """fp32 draws in [0, 1) (multiples of 2^-24) for the int64 element indices ``index`` at the step of ``salt``.

    Element ``i`` starts from a hash ``h`` of ``offset + i`` and steps along the golden-ratio sequence,
    ``u_t = frac(h + t / golden)``: over the elements each draw is uniform, and over the steps an element's draws
    are spread evenly (a low-discrepancy sequence), so an element waits about ``1 / p`` steps for an event of
    probability ``p`` and never the long geometric tails of independent draws. Integer ops only, so eager torch
    and compiled code give the same bits; every product stays below 2^63.
    """
    x = (_mix32((index + salt[0]) & _MASK32) + salt[1]) & _MASK32
    return (x >> 8).float() * (1.0 / (1 << 24))


def _stochastic_v_codes(x: Tensor, nearest: Tensor, qmap: Tensor, u: Tensor) -> Tensor:
    """int64 codes of ``x`` in [0, 1] into the unsigned map, rounded stochastically between its two neighbours.

    With ``lo``/``hi`` the map values around ``x``, the code is ``hi``'s with probability
    ``(x - lo) / (hi - lo)`` (``u`` the uniform draw), so the expected stored value is ``x``. ``nearest``, the
    nearest code, locates them. See "Second moments are rounded stochastically" in docs/8bit-moments.md.
    """
    lo = torch.clamp(nearest.long() - (qmap[nearest.long()] > x).long(), 0, qmap.numel() - 2)
    q_lo, q_hi = qmap[lo], qmap[lo + 1]
    return lo + (u < (x - q_lo) / (q_hi - q_lo)).long()


def _direction_torch(grad: Tensor, state: AdamState, step, beta1, beta2, eps, ok: Optional[Tensor] = None,
                     offset: int = 0) -> Tensor:
    """N from ``grad``; the moments are written in place, or — with ``ok``, a 0-d bool tensor — only where it holds.

    With ``ok`` the update is branch-free: a False ``ok`` keeps the moments bit for bit and returns N = 0, and a
    non-finite ``grad`` never reaches the moments (it is replaced by 0 before use).
    """
    g = grad.float() if ok is None else torch.where(ok, grad.float(), 0.0)
    if state.bits == 32:
        if ok is None:
            return _adam_fp32_(state.m, state.v, g, step, beta1, beta2, eps)
        m, v = state.m.clone(), state.v.clone()
    else:
        m = dequantize_blockwise_dynamic(state.m, state.absmax_m, True, state.block_size)
        v = dequantize_blockwise_dynamic(state.v, state.absmax_v, False, state.block_size)
    n = _adam_fp32_(m, v, g, step, beta1, beta2, eps)
    if state.bits == 32:
        state.m.copy_(torch.where(ok, m, state.m))
        state.v.copy_(torch.where(ok, v, state.v))
        return n.masked_fill_(~ok, 0.0)
    for codes, absmax, x, signed in ((state.m, state.absmax_m, m, True), (state.v, state.absmax_v, v, False)):
        new_codes, new_absmax = quantize_blockwise_dynamic(x, signed, state.block_size)
        if not signed:
            new_codes = _stochastic_v_codes_of(x, new_codes, new_absmax, state.block_size, step, offset)
            new_codes = _floor_positive_codes(new_codes, x > 0)
        codes.copy_(new_codes if ok is None else torch.where(ok, new_codes, codes))
        absmax.copy_(new_absmax if ok is None else torch.where(ok, new_absmax, absmax))
    return n if ok is None else n.masked_fill_(~ok, 0.0)


def _stochastic_v_codes_of(v: Tensor, nearest: Tensor, absmax: Tensor, block_size: int, step, offset: int) -> Tensor:
    """uint8 stochastic codes of the fp32 second moment ``v`` whose nearest codes and new block absmax are given;
    element ``i`` draws ``_uniform(offset + i, step)``."""
    flat = v.reshape(-1)
    # x / absmax per block, split into the whole blocks and the short last one as in quantize_blockwise_dynamic:
    # inductor (torch 2.13, CPU) compiles an element-to-block index (``repeat_interleave(absmax, block_size)[:n]``
    # or ``absmax[arange(n) // block_size]``) into a loop that stops at the last whole block, leaving the short
    # block's values uninitialized
    scale = torch.where(absmax > 0, absmax, 1.0)
    head, tail = _split_blocks(flat, block_size)
    parts = [(head / scale[: head.shape[0], None]).reshape(-1)] if head.numel() else []
    if tail.numel():
        parts.append(tail / scale[-1])
    index = torch.arange(flat.numel(), dtype=torch.int64, device=v.device)
    u = _uniform(index, _rounding_salt(step, offset, v.device))
    codes = _stochastic_v_codes(_cat(parts), nearest.reshape(-1), dynamic_map(False, v.device), u)
    return codes.to(torch.uint8).view(v.shape)


# --------------------------------------------------------------------------- fused step (torch.compile)
# The reference's math and op order as one function of whole blocks, compiled once by torch.compile (inductor) into
# a few loops over the data (qgalore_fx.kernels.fastpath). Equal to the reference up to float rounding (sqrt, the
# first moment's multiply-add), not bit for bit: docs/8bit-moments.md, "The fused step".


def _fused_coefficients(step: Tensor, beta1, beta2, eps) -> Tensor:
    """float32 ``[beta1, 1-beta1, beta2, 1-beta2, 1/c1, c2, eps]`` computed as the reference computes them.

    ``c1 = 1 - beta1^t`` and ``c2 = sqrt(1 - beta2^t)`` in float64 (``t`` the 0-d integer ``step``), every value
    rounded once to fp32 at the end, as the reference's ops round their float64 scalars. No host sync: floats
    are filled on the step's device, tensors used where they are.
    """
    device = step.device

    def as64(x):
        if isinstance(x, Tensor):
            return x.reshape(()).to(device=device, dtype=torch.float64)
        return torch.full((), float(x), dtype=torch.float64, device=device)

    b1, b2, e = as64(beta1), as64(beta2), as64(eps)
    c1, c2 = _bias_corrections(b1, b2, step)
    return torch.stack([b1, 1.0 - b1, b2, 1.0 - b2, 1.0 / c1, c2, e]).float()


# The fused step looks codes up in a compact copy of the lookup table: values divided by their block's absmax lie
# in [-1, 1], and every |x| < 2^-23 takes the zero code of both maps (their smallest midpoints are 1.6e-7 and
# 2.7e-7), so only the cells of the 24 exponents 2^-23 .. 2^0 are kept, plus one row standing for every smaller
# exponent: 2 signs x 25 exponents x 512 mantissa cells (100 KiB instead of 1 MiB; the signed lookup runs ~2x
# faster once the table stays in cache). The cells are the same, so the codes are the same (checked when built).
_COMPACT_EXP0 = 103  # exponent field of the row that also stands for every smaller exponent
_COMPACT_EXPS = 25
_COMPACT_CACHE: dict[tuple[bool, str], Tensor] = {}


def _compact_lut(signed: bool, device: str) -> Tensor:
    key = (signed, device)
    hit = _COMPACT_CACHE.get(key)
    if hit is None:
        lut = _cached_map(signed, "cpu")[2]
        mant_bits = 23 - _LUT_SHIFT
        sign = torch.arange(2).view(2, 1, 1)
        exp = torch.arange(_COMPACT_EXPS).view(1, -1, 1) + _COMPACT_EXP0
        mant = torch.arange(1 << mant_bits).view(1, 1, -1)
        compact = lut[((sign << (31 - _LUT_SHIFT)) | (exp << mant_bits) | mant).reshape(-1)]
        small = lut.view(2, 256, 1 << mant_bits)[:, : _COMPACT_EXP0 + 1]  # every exponent the first row stands for
        assert bool((small == small[:, :1, :1]).all()), "tiny values do not share one code"
        hit = _COMPACT_CACHE[key] = compact.to(device)
    return hit


def _fused_codes(x: Tensor, lut: Tensor, mid_ext: Tensor) -> Tensor:
    """int32 :func:`_nearest_code` of ``x`` in [-1, 1] (the same cells, looked up in :func:`_compact_lut`)."""
    mant_bits = 23 - _LUT_SHIFT
    bits = x.view(torch.int32)
    row = ((bits >> 31) & 1) * _COMPACT_EXPS + torch.clamp(((bits >> 23) & 0xFF) - _COMPACT_EXP0, 0,
                                                           _COMPACT_EXPS - 1)
    g = lut[(row << mant_bits) | ((bits >> _LUT_SHIFT) & ((1 << mant_bits) - 1))]
    return g + (x > mid_ext[g]).to(torch.int32)


def _fused_moments(g, m_codes, v_codes, absmax_m, absmax_v, ok, coef, tables, salt):
    """Adam on ``[n_blocks, block_size]`` views: writes the codes and absmax (where ``ok``), returns N (0 elsewhere).

    Selections happen on int32 / fp32 values before the single cast to uint8: ``torch.where`` on uint8 codes
    compiles to a loop several times slower.
    """
    b1, omb1, b2, omb2, inv_c1, c2, eps = coef.unbind()
    qmap_m, lut_m, mid_m, qmap_v, lut_v, mid_v = tables
    g = torch.where(ok, g.float(), 0.0)
    m = qmap_m[m_codes.int()] * absmax_m[:, None]
    v = qmap_v[v_codes.int()] * absmax_v[:, None]
    m = m * b1 + g * omb1
    v = v * b2 + g * omb2 * g
    n = torch.where(ok, (m * inv_c1) / (v.sqrt() / c2 + eps), 0.0)
    new_absmax_m = m.abs().amax(1)
    new_absmax_v = v.abs().amax(1)
    code_m = _fused_codes(m / torch.where(new_absmax_m > 0, new_absmax_m, 1.0)[:, None], lut_m, mid_m)
    x_v = v / torch.where(new_absmax_v > 0, new_absmax_v, 1.0)[:, None]
    index = torch.arange(x_v.numel(), dtype=torch.int64, device=x_v.device).view(x_v.shape)
    code_v = _stochastic_v_codes(x_v, _fused_codes(x_v, lut_v, mid_v), qmap_v, _uniform(index, salt))
    code_v = torch.where((v > 0) & (code_v == _zero_code(False)), 1, code_v)  # _floor_positive_codes
    m_codes.copy_(torch.where(ok, code_m, m_codes.int()).to(torch.uint8))
    v_codes.copy_(torch.where(ok, code_v, v_codes.int()).to(torch.uint8))
    absmax_m.copy_(torch.where(ok, new_absmax_m, absmax_m))
    absmax_v.copy_(torch.where(ok, new_absmax_v, absmax_v))
    return n


def _fused_direction_blocks(g, m_codes, v_codes, absmax_m, absmax_v, ok, coef, tables, salt):
    return _fused_moments(g, m_codes, v_codes, absmax_m, absmax_v, ok, coef, tables, salt)


def _fused_adamw_blocks(p, g, m_codes, v_codes, absmax_m, absmax_v, ok, coef, lr, decay, tables, salt):
    n = _fused_moments(g, m_codes, v_codes, absmax_m, absmax_v, ok, coef, tables, salt)
    p.copy_(p * decay - n * lr)


# dynamic=True: one compilation serves every block count (chunks, tails, each layer's low-rank shape) instead of
# one per shape; measured as fast as the static version at 1M elements.
_DIRECTION_KERNEL = CompiledKernel(_fused_direction_blocks, "adam8bit direction", dynamic=True)
_ADAMW_KERNEL = CompiledKernel(_fused_adamw_blocks, "adam8bit adamw", dynamic=True)
# On an AVX2 CPU the same step in C++ (adam8bit_cpu.cpp): bit-identical to the compiled functions above and faster
# (inductor loads the eight table lookups per element one by one; AVX2 gathers them; BENCHMARKS.md, "the 8-bit
# Adam step in C++").
# -ffp-contract=off: every product rounded, as in the compiled code.
_NATIVE_KERNEL = NativeKernel("adam8bit_cpu.cpp", "adam8bit_blocks_", "adam8bit step (AVX2)",
                              cflags=AVX2_CFLAGS)


def _native_applies(*blocks: Tensor) -> bool:
    """Whether :data:`_NATIVE_KERNEL` takes these ``[blocks, block_size]`` views (gradient, parameter): fp32 on an
    AVX2 CPU, contiguous, ``block_size`` a multiple of 8."""
    return CPU_HAS_AVX2 and all(t.device.type == "cpu" and t.dtype == torch.float32 and t.is_contiguous()
                         and t.shape[-1] % 8 == 0 for t in blocks)


def _fused_blocks(p: Optional[Tensor], g: Tensor, views: tuple, ok: Tensor, coef: Tensor, lr: Optional[Tensor],
                  decay: Optional[Tensor], tables: tuple, salt: Tensor) -> tuple:
    """The fused step over ``[blocks, block_size]`` views: AdamW on ``p``, or (``p`` None) the direction N.
    ``(ran, N or None)``; the C++ kernel where it applies, else the compiled function."""
    if _native_applies(g, *(() if p is None else (p,))):
        empty = g.new_empty(0)
        n = torch.empty_like(g) if p is None else empty
        ran, _ = _NATIVE_KERNEL(empty if p is None else p, n, g, *views, ok.reshape(1), coef,
                                empty if lr is None else lr.float(), empty if decay is None else decay.float(),
                                *tables, salt)
        if ran:
            return True, (n if p is None else None)
    if p is None:
        return _DIRECTION_KERNEL(g, *views, ok, coef, tables, salt)
    return _ADAMW_KERNEL(p, g, *views, ok, coef, lr, decay, tables, salt)


def _tables(device) -> tuple:
    device = str(device)
    m_map, _, _, m_mid = _cached_map(True, device)
    v_map, _, _, v_mid = _cached_map(False, device)
    return m_map, _compact_lut(True, device), m_mid, v_map, _compact_lut(False, device), v_mid


def _check_impl(impl: str) -> None:
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")


def _fused_applies(state: AdamState, impl: str) -> bool:
    return impl != "reference" and state.bits == 8 and state.shape.numel() >= state.block_size


def _block_views(state: AdamState, full: int):
    """(m, v) codes of the first ``full`` elements as [blocks, block_size] views, and their absmax."""
    bs = state.block_size
    nb = full // bs
    m, v = state.m.view(-1)[:full].view(nb, bs), state.v.view(-1)[:full].view(nb, bs)
    return m, v, state.absmax_m[:nb], state.absmax_v[:nb]


def _tail_state(state: AdamState, full: int) -> AdamState:
    """The short last block of ``state`` (elements from ``full`` on) as a state of views."""
    n = state.shape.numel()
    nb = full // state.block_size
    return AdamState((n - full,), 8, state.block_size, state.m.view(-1)[full:], state.v.view(-1)[full:],
                     state.absmax_m[nb:], state.absmax_v[nb:])


def _check_masked(grad: Tensor, state: AdamState, ok: Tensor, impl: str) -> None:
    _check_impl(impl)
    if not isinstance(ok, Tensor) or ok.dtype != torch.bool or ok.numel() != 1:
        raise ValueError(f"ok must be a 0-d bool tensor, got {ok!r}")
    if grad.shape != state.shape:
        raise ValueError(f"grad shape {tuple(grad.shape)} does not match the state shape {tuple(state.shape)}")


@torch.no_grad()
def adam_direction_masked_(grad: Tensor, state: AdamState, step: Tensor, beta1, beta2, eps, ok: Tensor,
                           impl: str = "auto", offset: int = 0) -> Tensor:
    """Update ``state`` with ``grad`` and return N = m̂ / (sqrt(v̂) + eps); no host synchronization.

    ``step`` (the 1-based index of this update) is a 0-d integer tensor and ``beta1``, ``beta2``, ``eps`` floats
    or 0-d tensors; the moments change only where the 0-d bool tensor ``ok`` holds, and N is 0 where it does not.

    ``impl="auto"`` runs the fused step (equal to the reference up to float rounding; docs/8bit-moments.md, "The fused
    step") on the whole blocks of an 8-bit state when it is available (:mod:`qgalore_fx.kernels.fastpath`), the torch
    reference otherwise; ``"reference"`` always runs the reference, ``"fused"`` the fused step where it applies.
    ``offset``: the index of ``state``'s first element in the tensor it is part of (the second moment's rounding
    draws are a hash of the element's index and ``step``), so a state updated part by part rounds as a whole.
    """
    _check_masked(grad, state, ok, impl)
    if state.shape.numel() == 0:
        return torch.zeros(state.shape, dtype=torch.float32, device=state.device)
    ok = ok.reshape(())
    if _fused_applies(state, impl):
        n_total = state.shape.numel()
        full = n_total // state.block_size * state.block_size
        g = grad.reshape(-1)
        coef = _fused_coefficients(step, beta1, beta2, eps)
        ran, n = _fused_blocks(None, g[:full].view(-1, state.block_size), _block_views(state, full), ok, coef, None,
                               None, _tables(state.device), _rounding_salt(step, offset, state.device))
        if ran:
            if full == n_total:
                return n.view(state.shape)
            tail = _direction_torch(g[full:], _tail_state(state, full), step, beta1, beta2, eps, ok, offset + full)
            return torch.cat([n.view(-1), tail]).view(state.shape)
    return _direction_torch(grad, state, step, beta1, beta2, eps, ok, offset)


@torch.no_grad()
def adamw_masked_(p32: Tensor, grad: Tensor, state: AdamState, step: Tensor, ok: Tensor, lr: float, beta1, beta2,
                  eps, weight_decay: float, impl: str = "auto", offset: int = 0) -> None:
    """AdamW on the contiguous fp32 ``p32`` (``grad``'s shape) that changes nothing where ``ok`` is False.

    ``p = p * (1 - lr*wd) - lr * N`` with N from :func:`adam_direction_masked_` (same ``impl`` rule); ``lr`` and
    ``weight_decay`` floats; ``offset`` as for :func:`adam_direction_masked_`. No host synchronization.
    """
    _check_masked(grad, state, ok, impl)
    if p32.dtype != torch.float32 or not p32.is_contiguous() or p32.shape != grad.shape:
        raise ValueError(f"p32 must be a contiguous float32 tensor of grad's shape {tuple(grad.shape)}, got "
                         f"{p32.dtype} {tuple(p32.shape)}")
    if state.shape.numel() == 0:
        return
    ok = ok.reshape(())
    decay = torch.where(ok, 1.0 - lr * weight_decay, 1.0) if weight_decay else None
    p_flat, g = p32.view(-1), grad.reshape(-1)
    full = 0
    if _fused_applies(state, impl):
        full = state.shape.numel() // state.block_size * state.block_size
        coef = _fused_coefficients(step, beta1, beta2, eps)
        lr_t = (lr.reshape(()).to(device=p32.device, dtype=torch.float32) if isinstance(lr, Tensor)
                else torch.full((), lr, dtype=torch.float32, device=p32.device))
        ran, _ = _fused_blocks(p_flat[:full].view(-1, state.block_size), g[:full].view(-1, state.block_size),
                               _block_views(state, full), ok, coef, lr_t,
                               torch.ones((), device=p32.device) if decay is None else decay, _tables(state.device),
                               _rounding_salt(step, offset, state.device))
        if not ran:
            full = 0
        elif full == state.shape.numel():
            return
    if full == 0:
        n = _direction_torch(grad, state, step, beta1, beta2, eps, ok, offset).view(-1)
    else:
        n = _direction_torch(g[full:], _tail_state(state, full), step, beta1, beta2, eps, ok, offset + full)
    if decay is not None:
        p_flat[full:].mul_(decay)
    p_flat[full:].sub_(n.mul_(lr))
