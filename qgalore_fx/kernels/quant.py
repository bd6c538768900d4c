"""Block-wise symmetric quantization: the pure-torch reference, the public API and the custom ops.

This module is the single definition of what an INT8 weight or an INT4 projection *is* in
qgalore_fx. Everything else (the dequant-matmul, the fused optimizer's write-back, the
Triton kernels in ``quant_triton.py``) follows the math written here.

The format
----------
A tensor ``x`` is flattened and cut into blocks of ``block_size`` consecutive elements (the
last block may be short). For each block::

    qmax   = 127 (bits=8)  or  7 (bits=4)
    scale  = absmax(block) / qmax                      # fp32, one per block
    v      = x / scale          (v = 0 where scale == 0)
    code   = clamp(round(v), -qmax, qmax)
    x_hat  = code * scale                              # computed in fp32, then cast

* bits=8: codes are ``torch.int8`` with ``x``'s shape.
* bits=4: codes are packed two per byte into a flat ``torch.uint8`` tensor: nibble =
  code + 8 (so 1..15 for real codes), element ``2i`` in the low nibble, ``2i+1`` in the high
  nibble; an odd element count is padded with a raw zero nibble.
* No zero point is stored: the quantizer is symmetric.

Why symmetric (and not the asymmetric min/max quantizer of the original Q-GaLore code)
--------------------------------------------------------------------------------------
* Zero is always exactly representable (code 0), so zero weights, zero padding and all-zero
  blocks stay exactly zero, and an all-zero block has scale 0 and dequantizes to exact zeros.
* A block whose values all have the same sign loses nothing beyond rounding. The asymmetric
  quantizer of the original code takes ``scale = (max - min) / 255`` and an integer zero point
  clamped to the code range; on a single-sign block that zero point falls outside the range
  and is clamped, so every value farther than ``max - min`` from zero is clipped (a block of
  values in [1, 2] dequantizes to about 1 everywhere), and its floor of 1e-5 on ``max - min``
  flattens constant blocks the same way. Symmetric absmax has neither failure mode.
* The element of largest magnitude always gets code +-qmax, so it is reproduced up to fp32
  rounding of ``qmax * (absmax / qmax)``: exactly after casting back to bf16/fp16 inputs, and
  within one fp32 ulp for fp32 inputs (``fl(qmax * fl(a / qmax)) != a`` for ~0.6% of fp32
  values at qmax=127 and ~8% at qmax=7, and no other fp32 scale fixes it, so fp32 exactness
  of the maximum is not attainable with ``code * scale`` dequantization).
* A finite input never dequantizes to inf: where ``qmax * scale`` would round past the fp32
  maximum (absmax within an ulp or so of 3.4e38), the scale is clamped to ``MAX_SCALE[bits]``,
  the largest fp32 scale whose ``qmax`` multiple is finite (one ulp below ``absmax / qmax``).
* It needs half the side storage (no zero point) and one multiply to dequantize.
The price is one code value: the range [-qmax, qmax] uses 255 of 256 int8 codes and 15 of the
16 int4 codes.

Rounding
--------
* Nearest: round half to even (``torch.round``); the Triton path uses the same rule, so both
  paths give identical codes.
* Stochastic: ``code = floor(v) + (u < v - floor(v))`` with ``u ~ U[0, 1)``. This is the same
  law as ``floor(v + u)`` (it rounds down with probability ``ceil(v) - v``, else up, so
  ``E[x_hat] = x``) but it never suffers the fp32 rounding of the sum ``v + u``.
  The noise is counter based: the ops take ``seed`` = int64 tensor ``[seed, offset]``. The
  reference draws ``sr_noise(offset + element_index)``, a keyed integer hash of the element's
  counter (:func:`sr_noise`; the compiled write-back computes the same inside its kernel); the
  Triton path draws ``tl.rand(seed, offset + element_index)`` (Philox). The two streams are
  different but each is deterministic and independent of chunking: same seed, same codes.

Custom ops (namespace ``qgalore_fx``)
-------------------------------------
``torch.ops.qgalore_fx.quantize(x, bits, block_size, seed) -> (codes, scales)`` and
``torch.ops.qgalore_fx.dequantize(codes, scales, bits, block_size, shape, dtype) -> Tensor``.
The reference below is the default implementation for every device; ``quant_triton.py``
registers the Triton kernels for CUDA. The fake implementations check shapes and dtypes, so
the ops trace under ``torch.compile(fullgraph=True)``.
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass
from typing import List, Optional, Union

import torch
import torch.nn.functional as F

__all__ = [
    "all_finite",
    "QMAX",
    "MAX_SCALE",
    "SUPPORTED_BITS",
    "FLOAT_DTYPES",
    "QuantizedTensor",
    "quantize_blockwise",
    "dequantize_blockwise",
    "quantize_reference",
    "dequantize_reference",
    "pack_int4",
    "unpack_int4",
    "num_blocks",
    "make_seed",
]

QMAX = {8: 127, 4: 7}
SUPPORTED_BITS = (4, 8)
FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _max_finite_scale(qmax: int) -> float:
    s = torch.tensor(torch.finfo(torch.float32).max) / qmax
    while torch.isinf(s * qmax):
        s = torch.nextafter(s, torch.zeros(()))
    return s.item()


# Largest fp32 scale with qmax * scale finite: scales are clamped to it (see module docstring).
MAX_SCALE = {bits: _max_finite_scale(qmax) for bits, qmax in QMAX.items()}

_INT64_MIN = -(2**63)
_INT64_MAX = 2**63 - 1
_MASK64 = (1 << 64) - 1


# ---------------------------------------------------------------------------------------------
# Argument checks, shared by the public API, the reference, the fake impls and the Triton path.
# None of them looks at tensor values, so they are safe on fake tensors.
# ---------------------------------------------------------------------------------------------


def num_blocks(numel: int, block_size: int) -> int:
    """Number of quantization blocks for ``numel`` elements (the last block may be short)."""
    return (numel + block_size - 1) // block_size


def _check_bits(bits) -> None:
    if isinstance(bits, bool) or bits not in SUPPORTED_BITS:
        raise ValueError(f"bits must be one of {SUPPORTED_BITS}, got {bits!r}")


def _check_block_size(block_size) -> None:
    if (
        isinstance(block_size, bool)
        or not isinstance(block_size, int)
        or block_size <= 0
        or block_size % 2 != 0
    ):
        raise ValueError(
            "block_size must be a positive even int (int4 codes are packed two per byte and a "
            f"byte never straddles two blocks), got {block_size!r}"
        )


def _check_float_tensor(t, name: str) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(
            f"{name} must have dtype float32, bfloat16 or float16, got {t.dtype}"
        )


def _check_seed(seed: Optional[torch.Tensor], device: torch.device) -> None:
    if seed is None:
        return
    if not isinstance(seed, torch.Tensor):
        raise TypeError(f"seed must be None or an int64 tensor of shape [2], got {type(seed).__name__}")
    if seed.dtype != torch.int64 or tuple(seed.shape) != (2,):
        raise ValueError(
            "seed must be None (nearest rounding) or an int64 tensor of shape [2] holding "
            f"(seed, offset), got dtype {seed.dtype} and shape {tuple(seed.shape)}"
        )
    if seed.device != device:
        raise ValueError(f"seed must be on x's device {device}, got {seed.device}")


def check_quantize_args(x, bits, block_size, seed) -> None:
    """Validate the arguments of ``qgalore_fx::quantize`` (no data-dependent checks)."""
    _check_float_tensor(x, "x")
    _check_bits(bits)
    _check_block_size(block_size)
    _check_seed(seed, x.device)


def _codes_numel(bits: int, numel: int) -> int:
    return numel if bits == 8 else (numel + 1) // 2


def check_dequantize_args(codes, scales, bits, block_size, shape, dtype) -> None:
    """Validate the arguments of ``qgalore_fx::dequantize`` (no data-dependent checks)."""
    _check_bits(bits)
    _check_block_size(block_size)
    if dtype not in FLOAT_DTYPES:
        raise TypeError(f"dtype must be torch.float32, torch.bfloat16 or torch.float16, got {dtype}")
    if not isinstance(codes, torch.Tensor):
        raise TypeError(f"codes must be a torch.Tensor, got {type(codes).__name__}")
    if not isinstance(scales, torch.Tensor):
        raise TypeError(f"scales must be a torch.Tensor, got {type(scales).__name__}")
    numel = math.prod(shape)
    want = torch.int8 if bits == 8 else torch.uint8
    if codes.dtype != want:
        raise TypeError(f"codes must have dtype {want} for bits={bits}, got {codes.dtype}")
    if codes.numel() != _codes_numel(bits, numel):
        raise ValueError(
            f"codes must hold {_codes_numel(bits, numel)} elements for shape {list(shape)} at "
            f"bits={bits}, got {codes.numel()}"
        )
    if scales.dtype != torch.float32 or scales.dim() != 1:
        raise ValueError(
            f"scales must be a 1-D float32 tensor, got dtype {scales.dtype} and {scales.dim()} dims"
        )
    if scales.numel() != num_blocks(numel, block_size):
        raise ValueError(
            f"scales must hold {num_blocks(numel, block_size)} blocks for {numel} elements at "
            f"block_size={block_size}, got {scales.numel()}"
        )
    if codes.device != scales.device:
        raise ValueError(f"codes ({codes.device}) and scales ({scales.device}) must be on the same device")


# ---------------------------------------------------------------------------------------------
# INT4 packing
# ---------------------------------------------------------------------------------------------


# Packing works on byte pairs seen as one int16 (the pair's first byte is the low byte on
# little-endian machines): contiguous int16 passes instead of strided uint8 ones, about 1.7x
# faster on CPU (1M codes, one thread: 0.48 ms vs 0.80 ms).
_FIRST_BYTE_IS_LOW = sys.byteorder == "little"


def _pack_int4(codes: torch.Tensor) -> torch.Tensor:
    nibbles = codes.reshape(-1) + 8
    if nibbles.numel() % 2:
        nibbles = torch.cat([nibbles, nibbles.new_zeros(1)])  # raw zero nibble as padding
    pair = nibbles.view(torch.int16)
    if _FIRST_BYTE_IS_LOW:  # pair = first + (second << 8)
        packed = (pair & 0x0F) | ((pair >> 4) & 0xF0)
    else:  # pair = (first << 8) + second
        packed = ((pair >> 8) & 0x0F) | ((pair << 4) & 0xF0)
    return packed.to(torch.uint8)


def _unpack_int4(packed: torch.Tensor, numel: int) -> torch.Tensor:
    byte = packed.reshape(-1).to(torch.int16)
    if _FIRST_BYTE_IS_LOW:
        pair = (byte & 0x0F) | ((byte & 0xF0) << 4)
    else:
        pair = ((byte & 0x0F) << 8) | ((byte & 0xF0) >> 4)
    return pair.view(torch.int8)[:numel] - 8


def pack_int4(codes: torch.Tensor) -> torch.Tensor:
    """Pack int8 codes in [-8, 7] two per byte: ``uint8[ceil(n / 2)]``.

    Element ``2i`` goes to the low nibble and ``2i+1`` to the high nibble of byte ``i``, each as
    ``code + 8``; an odd count is padded with a raw zero nibble. ``codes`` is flattened.
    """
    if not isinstance(codes, torch.Tensor) or codes.dtype != torch.int8:
        got = codes.dtype if isinstance(codes, torch.Tensor) else type(codes).__name__
        raise TypeError(f"codes must be an int8 tensor, got {got}")
    if codes.numel() and (int(codes.min()) < -8 or int(codes.max()) > 7):
        raise ValueError(
            f"codes must lie in [-8, 7] to pack into 4 bits, got range "
            f"[{int(codes.min())}, {int(codes.max())}]"
        )
    return _pack_int4(codes)


def unpack_int4(packed: torch.Tensor, numel: int) -> torch.Tensor:
    """Inverse of :func:`pack_int4`: ``int8[numel]`` codes from ``uint8[ceil(numel / 2)]``."""
    if not isinstance(packed, torch.Tensor) or packed.dtype != torch.uint8:
        got = packed.dtype if isinstance(packed, torch.Tensor) else type(packed).__name__
        raise TypeError(f"packed must be a uint8 tensor, got {got}")
    if isinstance(numel, bool) or not isinstance(numel, int) or numel < 0:
        raise ValueError(f"numel must be a non-negative int, got {numel!r}")
    if packed.numel() != (numel + 1) // 2:
        raise ValueError(
            f"packed must hold ceil(numel / 2) = {(numel + 1) // 2} bytes for numel={numel}, "
            f"got {packed.numel()}"
        )
    return _unpack_int4(packed, numel)


# ---------------------------------------------------------------------------------------------
# Seeds
# ---------------------------------------------------------------------------------------------


def _splitmix64(z: int) -> int:
    z = (z + 0x9E3779B97F4A7C15) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return z ^ (z >> 31)


_MASK32 = (1 << 32) - 1
_MIX32 = 0x45D9F3B  # odd, < 2^27: a 32-bit value times it stays below 2^59 in int64


def noise_key(seed: torch.Tensor, device: torch.device) -> torch.Tensor:
    """int64 ``[k0, k1, offset]`` on ``device`` for the ``[seed, offset]`` pair (one host read of ``seed``): the
    32-bit halves of ``splitmix64(seed)`` and the offset, what :func:`sr_noise` needs besides the counters."""
    s, offset = (int(v) for v in seed.tolist())
    k = _splitmix64(s & _MASK64)
    return torch.tensor([k & _MASK32, k >> 32, offset], dtype=torch.int64, device=device)


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """A bijection of the 32-bit values ``x`` (int64 holding them): xor-shift, multiply by an odd constant."""
    x = ((x ^ (x >> 16)) * _MIX32) & _MASK32
    x = ((x ^ (x >> 16)) * _MIX32) & _MASK32
    return x ^ (x >> 16)


def sr_noise(index: torch.Tensor, key: torch.Tensor) -> torch.Tensor:
    """fp32 draws in [0, 1) (multiples of 2^-24) for the int64 counters ``index`` under ``key`` (:func:`noise_key`).

    ``u = hash(offset + i)``: counter based, so element ``i`` of a call draws the same whatever the chunking,
    the sharding or the kernel. The low 32 bits of the counter, keyed, go through a bijective 32-bit mix; the
    high 32 bits are folded in before a second (bijective) mix, so counters less than 2^32 apart never share a
    hash (the draw keeps its top 24 bits). Integer ops only, every product below 2^63: eager torch and compiled
    code give the same bits.
    """
    c = index + key[2]
    x = _mix32((c & _MASK32) ^ key[0])
    x = _mix32(x ^ (((c >> 32) ^ key[1]) & _MASK32))
    return (x >> 8).float() * (1.0 / (1 << 24))


def make_seed(
    generator: Union[None, int, torch.Generator], device: Union[str, torch.device] = "cpu", offset: int = 0
) -> torch.Tensor:
    """The ``seed`` tensor (int64 ``[seed, offset]``) the ``quantize`` op takes for SR.

    ``generator`` may be an int (used as the seed), a ``torch.Generator`` (one int64 seed is
    drawn from it with ``torch.randint``) or None (a seed is drawn from the global torch RNG).
    """
    if generator is None or isinstance(generator, torch.Generator):
        gen_device = generator.device if generator is not None else "cpu"
        s = int(
            torch.randint(_INT64_MIN, _INT64_MAX, (1,), dtype=torch.int64, generator=generator, device=gen_device)
        )
    elif isinstance(generator, int) and not isinstance(generator, bool):
        if not _INT64_MIN <= generator <= _INT64_MAX:
            raise ValueError(f"generator as an int seed must fit in int64, got {generator}")
        s = generator
    else:
        raise TypeError(
            f"generator must be None, an int seed or a torch.Generator, got {type(generator).__name__}"
        )
    if isinstance(offset, bool) or not isinstance(offset, int) or not _INT64_MIN <= offset <= _INT64_MAX:
        raise ValueError(f"offset must be an int64 int, got {offset!r}")
    return torch.tensor([s, offset], dtype=torch.int64, device=device)


# ---------------------------------------------------------------------------------------------
# Reference implementation (pure torch, vectorized over [blocks, block_size] within a chunk)
# ---------------------------------------------------------------------------------------------

# Elements per step of the reference. Working chunk by chunk bounds its fp32 temporaries to a
# few MiB (instead of several copies of the whole tensor) and keeps them in cache.
REFERENCE_CHUNK = 1 << 20


def _chunks(numel: int, block_size: int):
    """Block-aligned ``(start, stop)`` element ranges covering ``numel`` elements."""
    step = max(1, REFERENCE_CHUNK // block_size) * block_size
    for start in range(0, numel, step):
        yield start, min(numel, start + step)


def row_chunks(rows: int, cols: int, block_size: int, chunk: int):
    """``(start, stop)`` row ranges of a ``[rows, cols]`` matrix, about ``chunk`` elements each, whose first
    elements fall on ``block_size`` boundaries of the flattened matrix (at least one whole number of blocks)."""
    unit = block_size // math.gcd(cols, block_size)  # rows per whole number of blocks
    step = max(unit, chunk // cols // unit * unit)
    for start in range(0, rows, step):
        yield start, min(rows, start + step)


def _as_blocks(flat: torch.Tensor, block_size: int) -> torch.Tensor:
    pad = num_blocks(flat.numel(), block_size) * block_size - flat.numel()
    if pad:
        flat = F.pad(flat, (0, pad))
    return flat.view(-1, block_size)


def quantize_reference(
    x: torch.Tensor, bits: int, block_size: int, seed: Optional[torch.Tensor] = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric absmax block quantization in plain torch; see the module docstring for the math.

    Returns ``(codes, scales)``: int8 codes of ``x``'s shape (bits=8) or packed uint8 codes
    ``[ceil(numel / 2)]`` (bits=4), and fp32 ``scales[num_blocks]``. ``seed`` None rounds to
    nearest (half to even); an int64 ``[seed, offset]`` tensor rounds stochastically.
    ``x`` must be finite (NaN/Inf give unspecified codes); the op does not check, callers do
    (``quantize_blockwise(check_finite=True)``, or the fused optimizer's own check).
    """
    check_quantize_args(x, bits, block_size, seed)
    qmax = QMAX[bits]
    n = x.numel()
    flat = x.reshape(-1)
    scales = torch.empty(num_blocks(n, block_size), dtype=torch.float32, device=x.device)
    if bits == 8:
        codes = torch.empty(n, dtype=torch.int8, device=x.device)
    else:
        codes = torch.empty((n + 1) // 2, dtype=torch.uint8, device=x.device)
    key = None if seed is None else noise_key(seed, x.device)
    for start, stop in _chunks(n, block_size):
        blocks = _as_blocks(flat[start:stop].float(), block_size)  # may be a view of x: read only
        # max(amax, -amin) is several times faster than abs().amax() or aminmax() on CPU; the
        # final abs_ turns a -0.0 of an all-zero block into +0.0
        absmax = torch.maximum(blocks.amax(dim=1), blocks.amin(dim=1).neg_()).abs_()
        scale = absmax.div_(qmax).clamp_(max=MAX_SCALE[bits])  # the clamp bites at the fp32 top only
        v = blocks / torch.where(scale > 0, scale, torch.ones_like(scale)).unsqueeze(1)
        if key is None:
            q = v.round_()  # round half to even
        else:
            u = sr_noise(torch.arange(start, start + v.numel(), device=x.device).view(v.shape), key)
            q = torch.floor(v)
            q += u < v.sub_(q)  # v - floor(v) is exact in fp32
        q = q.clamp_(-qmax, qmax).view(-1)[: stop - start]
        scales[start // block_size : start // block_size + scale.numel()] = scale
        if bits == 8:
            codes[start:stop] = q  # integral floats: the int8 conversion is exact
        else:  # start is a multiple of the (even) block size, so bytes never straddle chunks
            codes[start // 2 : (stop + 1) // 2] = _pack_int4(q.to(torch.int8))
    return (codes.view(x.shape) if bits == 8 else codes), scales


def dequantize_into(codes: torch.Tensor, scales: torch.Tensor, block_size: int, out: torch.Tensor) -> torch.Tensor:
    """INT8 ``codes * scale`` written into the fp32 ``out`` (``codes.numel()`` elements, whole blocks), returned.

    The codes are copied into ``out`` (int8 to fp32 is exact) and multiplied there in place: the same products,
    rounded once, as ``torch.mul(codes, scales)``, which on the CPU first converts the int8 operand into an fp32
    temporary of the whole chunk (TensorIterator's input promotion).
    """
    blocks = out.view(-1, block_size)
    blocks.copy_(codes.reshape(-1, block_size))
    return blocks.mul_(scales.reshape(-1, 1)).view(-1)


def dequantize_reference(
    codes: torch.Tensor,
    scales: torch.Tensor,
    bits: int,
    block_size: int,
    shape: List[int],
    dtype: torch.dtype,
) -> torch.Tensor:
    """``code * scale`` in fp32, cast to ``dtype`` and shaped as ``shape``."""
    check_dequantize_args(codes, scales, bits, block_size, shape, dtype)
    n = math.prod(shape)
    flat = codes.reshape(-1)
    if bits == 8 and dtype == torch.float32 and n % block_size == 0:
        # The same products in one pass (about 2x faster than the chunk loop below on a 1376 x 512 weight).
        out = torch.empty(n, dtype=dtype, device=codes.device)
        return dequantize_into(flat, scales, block_size, out).view(list(shape))
    out = torch.empty(n, dtype=dtype, device=codes.device)
    for start, stop in _chunks(n, block_size):
        if bits == 8:
            q = flat[start:stop]
        else:
            q = _unpack_int4(flat[start // 2 : (stop + 1) // 2], stop - start)
        first = start // block_size
        values = _as_blocks(q.float(), block_size)
        values *= scales[first : first + values.shape[0]].unsqueeze(1)
        out[start:stop] = values.view(-1)[: stop - start]  # one cast to dtype, round to nearest even
    return out.view(list(shape))


# ---------------------------------------------------------------------------------------------
# Custom ops: the reference is the default kernel for every device (quant_triton.py registers
# the Triton kernels for CUDA).
# ---------------------------------------------------------------------------------------------


@torch.library.custom_op("qgalore_fx::quantize", mutates_args=())
def quantize_op(
    x: torch.Tensor, bits: int, block_size: int, seed: Optional[torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor]:
    return quantize_reference(x, bits, block_size, seed)


@quantize_op.register_fake
def _quantize_fake(x, bits, block_size, seed):
    check_quantize_args(x, bits, block_size, seed)
    n = x.numel()
    if bits == 8:
        codes = x.new_empty(x.shape, dtype=torch.int8)
    else:
        codes = x.new_empty(((n + 1) // 2,), dtype=torch.uint8)
    scales = x.new_empty((num_blocks(n, block_size),), dtype=torch.float32)
    return codes, scales


@torch.library.custom_op("qgalore_fx::dequantize", mutates_args=())
def dequantize_op(
    codes: torch.Tensor,
    scales: torch.Tensor,
    bits: int,
    block_size: int,
    shape: List[int],
    dtype: torch.dtype,
) -> torch.Tensor:
    return dequantize_reference(codes, scales, bits, block_size, shape, dtype)


@dequantize_op.register_fake
def _dequantize_fake(codes, scales, bits, block_size, shape, dtype):
    check_dequantize_args(codes, scales, bits, block_size, shape, dtype)
    return codes.new_empty(list(shape), dtype=dtype)


# ---------------------------------------------------------------------------------------------
# Public API
# ---------------------------------------------------------------------------------------------


@dataclass(eq=False, repr=False)
class QuantizedTensor:
    """A block-quantized tensor: codes + one fp32 scale per block (symmetric, so no zero points).

    ``codes``: int8 with ``shape`` for bits=8; packed uint8 ``[ceil(numel / 2)]`` for bits=4.
    ``scales``: fp32 ``[num_blocks]``. ``shape``/``dtype``: those of the original tensor.
    """

    codes: torch.Tensor
    scales: torch.Tensor
    shape: torch.Size
    dtype: torch.dtype
    bits: int
    block_size: int

    def dequantize(self, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
        """The dequantized tensor in ``dtype`` (default: the original dtype)."""
        return torch.ops.qgalore_fx.dequantize(
            self.codes, self.scales, self.bits, self.block_size, list(self.shape),
            self.dtype if dtype is None else dtype,
        )

    @property
    def nbytes(self) -> int:
        """Exact bytes of the stored tensors: codes + scales (there are no zero points)."""
        return self.codes.numel() * self.codes.element_size() + self.scales.numel() * self.scales.element_size()

    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def device(self) -> torch.device:
        return self.codes.device

    def to(self, device: Union[str, torch.device]) -> "QuantizedTensor":
        return QuantizedTensor(
            self.codes.to(device), self.scales.to(device), self.shape, self.dtype, self.bits, self.block_size
        )

    def __repr__(self) -> str:
        return (
            f"QuantizedTensor(shape={list(self.shape)}, dtype={self.dtype}, bits={self.bits}, "
            f"block_size={self.block_size}, nbytes={self.nbytes}, device={self.device})"
        )


def quantize_blockwise(
    x: torch.Tensor,
    bits: int = 8,
    block_size: int = 256,
    stochastic: bool = False,
    generator: Union[None, int, torch.Generator] = None,
    check_finite: bool = True,
) -> QuantizedTensor:
    """Quantize ``x`` symmetrically per block of ``block_size`` flattened elements.

    Args:
        x: fp32, bf16 or fp16 tensor of any shape.
        bits: 8 (int8 codes in [-127, 127]) or 4 (codes in [-7, 7], packed two per byte).
        block_size: positive even int.
        stochastic: round stochastically (unbiased: ``E[dequantize] = x``) instead of to nearest
            (half to even).
        generator: source of the SR seed: an int seed, a ``torch.Generator`` (one int64 seed is
            drawn from it) or None (drawn from the global torch RNG). Not consumed when
            ``stochastic`` is False. The same seed gives the same codes.
        check_finite: raise if ``x`` holds NaN or Inf (one reduction and a host sync). Callers
            that already checked, like the fused optimizer, pass False.

    Raises:
        TypeError: ``x`` is not an fp32/bf16/fp16 tensor; ``stochastic``/``check_finite`` are
            not bools; ``generator`` is of another type.
        ValueError: ``bits`` not in (4, 8); ``block_size`` not a positive even int; ``x``
            contains non-finite values; an int ``generator`` outside int64.

    Inside a ``torch.compile(fullgraph=True)`` region, call ``torch.ops.qgalore_fx.quantize``
    with an explicit ``seed`` tensor (see :func:`make_seed`) and ``check_finite=False`` here:
    drawing a seed or checking finiteness reads values on the host.
    """
    _check_float_tensor(x, "x")
    _check_bits(bits)
    _check_block_size(block_size)
    if not isinstance(stochastic, bool):
        raise TypeError(f"stochastic must be a bool, got {type(stochastic).__name__}")
    if not isinstance(check_finite, bool):
        raise TypeError(f"check_finite must be a bool, got {type(check_finite).__name__}")
    if isinstance(generator, bool) or not isinstance(generator, (type(None), int, torch.Generator)):
        raise TypeError(
            f"generator must be None, an int seed or a torch.Generator, got {type(generator).__name__}"
        )
    x = x.detach()
    if check_finite and not bool(all_finite(x)):
        raise ValueError(
            "x contains non-finite values (NaN or Inf); block quantization needs finite input "
            "(pass check_finite=False only if the caller has already checked)"
        )
    seed = make_seed(generator, x.device) if stochastic else None
    codes, scales = torch.ops.qgalore_fx.quantize(x, bits, block_size, seed)
    return QuantizedTensor(codes, scales, x.shape, x.dtype, bits, block_size)


def all_finite(t: torch.Tensor) -> torch.Tensor:
    """A 0-d bool tensor: every element of ``t`` is finite. No host synchronization.

    One min/max reduction (``torch.aminmax``: NaN propagates into both, an infinity into one of them), so the
    check allocates nothing the size of ``t``; ``torch.isfinite(t).all()`` materializes ``|t|`` and two bool
    masks, 1.75x the bytes of an fp32 ``t`` (+437 MiB for a 32000 x 2048 gradient, benchmarks/bench_transients.py).
    """
    if t.numel() == 0 or not t.is_floating_point():
        return torch.ones((), dtype=torch.bool, device=t.device)
    lo, hi = torch.aminmax(t)
    return torch.isfinite(lo) & torch.isfinite(hi)


def dequantize_blockwise(q: QuantizedTensor, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """``q.dequantize(dtype)``: the function form of :meth:`QuantizedTensor.dequantize`."""
    if not isinstance(q, QuantizedTensor):
        raise TypeError(f"q must be a QuantizedTensor, got {type(q).__name__}")
    return q.dequantize(dtype)
