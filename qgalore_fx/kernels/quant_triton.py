"""Triton kernels for block quantization, registered as the CUDA implementation of the
``qgalore_fx::quantize`` and ``qgalore_fx::dequantize`` custom ops.

The math is the one written in ``quant.py`` (its module docstring is the specification); the
kernels reproduce the reference bit for bit for nearest rounding and for dequantization:

* the absmax is an exact reduction, ``scale = absmax / qmax`` and ``v = x / scale`` use
  correctly rounded division (``tl.math.div_rn``, not the approximate ``/`` of fp32 Triton),
* nearest rounding is round half to even, written out with ``floor`` so that it is the same
  on GPU and in the interpreter,
* dequantization is ``code * scale`` in fp32 and one cast.

Stochastic rounding draws ``u = tl.rand(seed, offset + element_index)`` (Philox, counter
based), with ``seed`` and ``offset`` loaded from the int64 ``seed`` tensor inside the kernel,
so a compiled graph can pass a fresh offset each step without recompiling. The reference
draws from a differently built stream; both are unbiased and deterministic per seed.

Running on CPU: launch the kernels on CPU tensors through :func:`quantize_triton` /
:func:`dequantize_triton` with ``TRITON_INTERPRET=1`` set before ``triton`` is first imported
in the process (Triton decides interpretation when it decorates its own library functions).
"""

from __future__ import annotations

from typing import List, Optional

import torch
import triton
import triton.language as tl

from .fastpath import reference_forced
from .quant import (
    MAX_SCALE,
    QMAX,
    check_dequantize_args,
    check_quantize_args,
    dequantize_op,
    dequantize_reference,
    num_blocks,
    quantize_op,
    quantize_reference,
)

__all__ = ["quantize_triton", "dequantize_triton", "triton_interpreter_active", "MAX_TRITON_BLOCK_SIZE"]

# Blocks longer than this do not fit one tile of the quantize kernel; the op then runs the
# (device-agnostic) torch reference instead. The library default is 256.
MAX_TRITON_BLOCK_SIZE = 16384
# Elements handled by one program of the quantize kernel (several short blocks per program).
_QUANT_TILE = 4096
_DEQUANT_TILE = 4096


@triton.jit
def _cast_rtne(x, DTYPE: tl.constexpr):
    """``x.to(DTYPE)`` for fp32 ``x``, rounding to nearest even like torch.

    The bf16 rounding is done on the fp32 bit pattern (add 0x7FFF plus the lowest kept bit,
    clear the low half), after which the cast is exact. A GPU's native cast gives the same
    result; Triton's interpreter truncates instead, so the explicit form keeps one code path
    for both. Inputs are finite here (NaN is not handled).
    """
    if DTYPE == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        return bits.to(tl.float32, bitcast=True).to(tl.bfloat16)
    else:
        return x.to(DTYPE)


@triton.jit
def _quantize_kernel(
    x_ptr, codes_ptr, scales_ptr, seed_ptr, n, n_blocks,
    BLOCK_SIZE: tl.constexpr, BLOCK_P2: tl.constexpr, ROWS: tl.constexpr,
    QMAX: tl.constexpr, MAX_SCALE: tl.constexpr, BITS: tl.constexpr, STOCHASTIC: tl.constexpr,
):
    """ROWS quantization blocks per program. In torch terms, for blocks = x.view(-1, BLOCK_SIZE):

        scale = min(blocks.abs().amax(1) / QMAX, MAX_SCALE)
        v = blocks / where(scale > 0, scale, 1)[:, None]
        q = round_half_even(v)                         if not STOCHASTIC
        q = floor(v) + (rand(seed, offset + idx) < v - floor(v))   if STOCHASTIC
        codes = clamp(q, -QMAX, QMAX)   # int8, or packed pairs (c[2i] + 8) | (c[2i+1] + 8) << 4
    """
    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    cols = tl.arange(0, BLOCK_P2)
    idx = rows[:, None] * BLOCK_SIZE + cols[None, :]
    mask = (cols[None, :] < BLOCK_SIZE) & (idx < n)
    x = tl.load(x_ptr + idx, mask=mask, other=0.0).to(tl.float32)

    absmax = tl.max(tl.abs(x), axis=1)
    scale = tl.math.div_rn(absmax, tl.full(absmax.shape, QMAX, tl.float32))
    scale = tl.minimum(scale, MAX_SCALE)  # keeps QMAX * scale finite next to the fp32 maximum
    safe = tl.where(scale > 0, scale, 1.0)
    v = tl.math.div_rn(x, tl.broadcast_to(safe[:, None], x.shape))
    v_floor = tl.floor(v)
    frac = v - v_floor  # exact
    if STOCHASTIC:
        seed = tl.load(seed_ptr)
        offset = tl.load(seed_ptr + 1)
        u = tl.rand(seed, offset + idx)
        q = v_floor + tl.where(u < frac, 1.0, 0.0)
    else:
        floor_is_odd = v_floor - 2.0 * tl.floor(0.5 * v_floor)
        q = tl.where(frac > 0.5, v_floor + 1.0, tl.where(frac < 0.5, v_floor, v_floor + floor_is_odd))
    q = tl.minimum(tl.maximum(q, -QMAX), QMAX).to(tl.int32)

    tl.store(scales_ptr + rows, scale, mask=rows < n_blocks)
    if BITS == 8:
        tl.store(codes_ptr + idx, q.to(tl.int8), mask=mask)
    else:
        nibbles = tl.where(mask, q + 8, 0)  # raw zero nibble past the end
        lo, hi = tl.split(tl.reshape(nibbles, (ROWS, BLOCK_P2 // 2, 2)))
        pair = tl.arange(0, BLOCK_P2 // 2)
        byte_idx = rows[:, None] * (BLOCK_SIZE // 2) + pair[None, :]
        byte_mask = (pair[None, :] < BLOCK_SIZE // 2) & (2 * byte_idx < n)
        tl.store(codes_ptr + byte_idx, (lo | (hi << 4)).to(tl.uint8), mask=byte_mask)


@triton.jit
def _dequantize_kernel(
    codes_ptr, scales_ptr, out_ptr, n, BLOCK_SIZE: tl.constexpr, BITS: tl.constexpr, BLOCK: tl.constexpr
):
    """out.view(-1)[i] = (code[i] * scales[i // BLOCK_SIZE]).to(out.dtype), code unpacked for BITS=4."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    if BITS == 8:
        q = tl.load(codes_ptr + offs, mask=mask, other=0).to(tl.float32)
    else:
        byte = tl.load(codes_ptr + offs // 2, mask=mask, other=0).to(tl.int32)
        shift = ((offs % 2) * 4).to(tl.int32)
        q = (((byte >> shift) & 0xF) - 8).to(tl.float32)
    s = tl.load(scales_ptr + offs // BLOCK_SIZE, mask=mask, other=0.0)
    tl.store(out_ptr + offs, _cast_rtne(q * s, out_ptr.dtype.element_ty), mask=mask)


def triton_interpreter_active() -> bool:
    """Whether Triton kernels can run on CPU tensors in this process (``TRITON_INTERPRET=1``
    was set before triton, and this module, were imported)."""
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(_quantize_kernel, InterpretedFunction) and isinstance(tl.max, InterpretedFunction)


def _require_launchable(t: torch.Tensor, name: str) -> None:
    if t.device.type != "cuda" and not triton_interpreter_active():
        raise RuntimeError(
            f"{name} is on {t.device}; the Triton kernels need a CUDA device, or "
            "TRITON_INTERPRET=1 set in the environment before triton is first imported to run "
            "them on CPU (use quantize_reference/dequantize_reference otherwise)"
        )


def quantize_triton(
    x: torch.Tensor, bits: int, block_size: int, seed: Optional[torch.Tensor] = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Same signature and results as :func:`quant.quantize_reference`, computed by Triton."""
    check_quantize_args(x, bits, block_size, seed)
    if block_size > MAX_TRITON_BLOCK_SIZE:
        return quantize_reference(x, bits, block_size, seed)
    _require_launchable(x, "x")
    x = x.contiguous()
    n = x.numel()
    n_blocks = num_blocks(n, block_size)
    if bits == 8:
        codes = torch.empty(x.shape, dtype=torch.int8, device=x.device)
    else:
        codes = torch.empty(((n + 1) // 2,), dtype=torch.uint8, device=x.device)
    scales = torch.empty((n_blocks,), dtype=torch.float32, device=x.device)
    if n == 0:
        return codes, scales
    block_p2 = triton.next_power_of_2(block_size)
    rows = max(1, _QUANT_TILE // block_p2)
    _quantize_kernel[(triton.cdiv(n_blocks, rows),)](
        x, codes, scales, seed if seed is not None else scales, n, n_blocks,
        BLOCK_SIZE=block_size, BLOCK_P2=block_p2, ROWS=rows, QMAX=float(QMAX[bits]), MAX_SCALE=MAX_SCALE[bits],
        BITS=bits,
        STOCHASTIC=seed is not None,
    )
    return codes, scales


def dequantize_triton(
    codes: torch.Tensor,
    scales: torch.Tensor,
    bits: int,
    block_size: int,
    shape: List[int],
    dtype: torch.dtype,
) -> torch.Tensor:
    """Same signature and results as :func:`quant.dequantize_reference`, computed by Triton."""
    check_dequantize_args(codes, scales, bits, block_size, shape, dtype)
    _require_launchable(codes, "codes")
    out = torch.empty(list(shape), dtype=dtype, device=codes.device)
    n = out.numel()
    if n:
        _dequantize_kernel[(triton.cdiv(n, _DEQUANT_TILE),)](
            codes.contiguous(), scales.contiguous(), out, n, BLOCK_SIZE=block_size, BITS=bits, BLOCK=_DEQUANT_TILE
        )
    return out


def _quantize_cuda(x, bits, block_size, seed):
    """The op's CUDA kernel: Triton, or the reference under ``QGALORE_FX_REFERENCE=1`` (``fastpath``)."""
    if reference_forced():
        return quantize_reference(x, bits, block_size, seed)
    return quantize_triton(x, bits, block_size, seed)


def _dequantize_cuda(codes, scales, bits, block_size, shape, dtype):
    """The op's CUDA kernel: Triton, or the reference under ``QGALORE_FX_REFERENCE=1`` (``fastpath``)."""
    if reference_forced():
        return dequantize_reference(codes, scales, bits, block_size, shape, dtype)
    return dequantize_triton(codes, scales, bits, block_size, shape, dtype)


quantize_op.register_kernel("cuda")(_quantize_cuda)
dequantize_op.register_kernel("cuda")(_dequantize_cuda)
