"""Fused INT8 write-back of a projected layer's update: dequantize, decay and step, re-quantize, in two passes.

The reference is the chunk body of :func:`qgalore_fx.lowrank.step_`, three ops over a block-aligned chunk of
the weight (``codes``, ``scales``)::

    W      = dequantize_reference(codes, scales)          # codes * scale, fp32
    W      = W * decay - delta * step_size                # delta = this chunk's rows of N·P (or P·N)
    codes, scales = quantize_reference(W, 8, seed)        # stochastic rounding from the (seed, offset) stream
    keep the old codes and scales where ``ok`` is False

:func:`writeback_` computes the same with the same ops in the same order, compiled by ``torch.compile``
(``qgalore_fx.kernels.fastpath``) as two kernels: the new fp32 weight written over ``delta`` (the caller's
scratch), then its quantization; two passes over the chunk instead of about a dozen, and no fp32 copy
allocated. On an AVX2 CPU the C++ kernel ``writeback_cpu.cpp`` does both in one pass per block (inductor is
then never imported by a training step, nor its memory). The stochastic-rounding noise is the
reference's own — :func:`qgalore_fx.kernels.quant.sr_noise`, integer ops on each element's counter, computed
inside the kernel (no noise tensor) — so the codes are the reference's **bit for bit** (every op involved is exactly rounded: int8 to fp32, products, differences, the
division by the scale, floor, the integer hash; a test checks it). It applies on the CPU,
where the ``quantize`` op's kernel is that reference (on CUDA the op's Triton kernel draws Philox noise
itself), to chunks of whole blocks that the reference quantizes in one piece.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from . import quant
from .fastpath import AVX2_CFLAGS, CPU_HAS_AVX2, CompiledKernel, NativeKernel

__all__ = ["writeback_", "writeback_applies"]


def _new_weight(codes, scales, delta, decay, step_size):
    """``delta`` (in place) becomes the new fp32 weight ``dequant(codes) * decay - delta * step_size``."""
    W = codes.float() * scales[:, None]
    delta.copy_(W * decay - delta * step_size)


def _requantize(codes, scales, W, key, ok):
    """``codes``/``scales`` (in place) become ``W`` quantized, kept as they were where ``ok`` is False; ``key`` the
    noise's (:func:`qgalore_fx.kernels.quant.noise_key`, None: round half to even)."""
    qmax = quant.QMAX[8]
    absmax = torch.maximum(W.amax(1), W.amin(1).neg()).abs()
    scale = (absmax / qmax).clamp(max=quant.MAX_SCALE[8])
    v = W / torch.where(scale > 0, scale, 1.0)[:, None]
    if key is None:
        q = v.round()
    else:
        u = quant.sr_noise(torch.arange(W.numel(), device=W.device).view(W.shape), key)
        q = torch.floor(v)
        q = q + (u < v - q).to(q.dtype)
    q = q.clamp(-qmax, qmax)
    codes.copy_(torch.where(ok, q, codes.float()).to(torch.int8))  # select before the cast (see adam8bit)
    scales.copy_(torch.where(ok, scale, scales))


def _requantize_nearest(codes, scales, W, ok):
    _requantize(codes, scales, W, None, ok)


# Two kernels, not one: compiled together, inductor keeps the new weight (read by the block's absmax, then by the
# rounding) in a fresh fp32 buffer of the chunk's size on every call; written into ``delta``, the caller's
# workspace, it costs no allocation, and the pair ran 20 % faster on a 4096 x 256 chunk (bits unchanged).
_STEP_KERNEL = CompiledKernel(_new_weight, "int8 write-back (new weight)", dynamic=True)
_SR_KERNEL = CompiledKernel(_requantize, "int8 write-back (requantize)", dynamic=True)
_NEAREST_KERNEL = CompiledKernel(_requantize_nearest, "int8 write-back (requantize, nearest)", dynamic=True)
# Both in one pass, the noise in 32-bit lanes, on an AVX2 CPU (writeback_cpu.cpp; bit-identical); the compiled
# pair is its fallback.
_NATIVE_KERNEL = NativeKernel("writeback_cpu.cpp", "writeback_blocks_", "int8 write-back (AVX2)",
                              cflags=AVX2_CFLAGS)
_AVX2 = CPU_HAS_AVX2  # a module attribute: tests switch the C++ path off here


def writeback_applies(codes: Tensor, block_size: int) -> bool:
    """Whether :func:`writeback_` can take this chunk (else run the reference)."""
    n = codes.numel()
    return (codes.device.type == "cpu" and codes.dtype == torch.int8 and n > 0 and n % block_size == 0
            and n <= quant.REFERENCE_CHUNK // block_size * block_size and _SR_KERNEL.available())


@torch.no_grad()
def writeback_(codes: Tensor, scales: Tensor, delta: Tensor, decay: Tensor, step_size: Tensor, block_size: int,
               key: Optional[Tensor], ok: Tensor) -> bool:
    """Rewrite ``codes``/``scales`` (a block-aligned chunk, in place) as the reference would; False if it did not run
    (then nothing was written, ``delta`` included).

    ``delta`` fp32 of ``codes``' shape, overwritten with the new fp32 weight (scratch: the caller's workspace);
    ``decay``/``step_size``/``ok`` 0-d tensors, ``key`` the noise key of the reference's ``[seed, offset]`` pair
    (``quant.noise_key(seed)``: made once per update, then only its offset moves per chunk, on the device) or None
    for nearest rounding. Call only where :func:`writeback_applies`.
    """
    nb = codes.numel() // block_size
    c, W = codes.view(nb, block_size), delta.reshape(nb, block_size)
    # fp32 0-d tensors: the eager ops round these scalars to fp32 as well, and Dynamo's guards would read
    # float64 0-d tensors on the host (one .item() each per call)
    decay, step_size = decay.float(), step_size.float()
    if _AVX2 and block_size % 8 == 0 and W.is_contiguous() and scales.is_contiguous():
        ran, _ = _NATIVE_KERNEL(c, scales, W, decay.reshape(1), step_size.reshape(1), quant.MAX_SCALE[8],
                                c.new_empty(0, dtype=torch.int64) if key is None else key, ok.reshape(1))
        if ran:
            return True
    ran, _ = _STEP_KERNEL(c, scales, W, decay, step_size)
    if not ran:
        return False
    ran, _ = _NEAREST_KERNEL(c, scales, W, ok) if key is None else _SR_KERNEL(c, scales, W, key, ok)
    if not ran:  # the new weight is already in ``delta``: finish with the same ops, eagerly
        _requantize(c, scales, W, key, ok)
    return True
