"""Dequant-matmul: products with a weight stored as INT8 block-quantized codes.

The weight ``W`` of a projected linear layer is stored as ``codes`` (int8 ``[out, in]``) and
``scales`` (fp32, one per ``block_size`` consecutive elements of the flattened weight, see
``quant.py``), so ``dequant(W)[r, c] = codes[r, c] * scales[(r * in + c) // block_size]``.

Forward needs ``x @ dequant(W)^T`` and backward ``grad_y @ dequant(W)``; both are provided as

* references (pure torch): dequantize to the activation dtype, then one torch matmul;
* custom ops ``torch.ops.qgalore_fx.int8_matmul(x2d, codes, scales, block_size)`` (``x2d @ W^T``)
  and ``torch.ops.qgalore_fx.int8_matmul_t(g2d, codes, scales, block_size)`` (``g2d @ W``),
  with the reference computed over row chunks of the weight as the default implementation
  (:func:`int8_matmul_chunked`: the fp32 weight is never whole, see :data:`MATMUL_CHUNK`)
  and the Triton kernel below registered for CUDA. They have no autograd formula: the autograd op of the projected linear is built
  on top of them.

The Triton kernel never materializes ``dequant(W)``: each K-step of the tile loop loads an int8
tile of codes, gathers the scale of each element, dequantizes in fp32, casts to the activation
dtype (as the reference does) and feeds ``tl.dot`` with an fp32 accumulator.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from .fastpath import reference_forced
from .quant import FLOAT_DTYPES, _check_block_size, dequantize_into, dequantize_reference, num_blocks, row_chunks
from .workspace import workspace

try:
    import triton
    import triton.language as tl
except ImportError:  # no triton: only the references and the ops' default kernels exist
    triton = None

__all__ = [
    "int8_linear_reference",
    "int8_matmul_grad_input_reference",
    "int8_matmul_reference",
    "int8_matmul_t_reference",
]
if triton is not None:
    __all__ += ["int8_matmul_triton", "int8_matmul_t_triton"]


# ---------------------------------------------------------------------------------------------
# References
# ---------------------------------------------------------------------------------------------


def _dequantize_weight(codes: torch.Tensor, scales: torch.Tensor, block_size: int, dtype: torch.dtype):
    return dequantize_reference(codes, scales, 8, block_size, list(codes.shape), dtype)


def int8_linear_reference(
    x: torch.Tensor,
    codes: torch.Tensor,
    scales: torch.Tensor,
    bias: Optional[torch.Tensor],
    block_size: int,
) -> torch.Tensor:
    """``x @ dequant(codes, scales).T + bias`` in ``x``'s dtype; ``x`` is ``[..., in]``."""
    return F.linear(x, _dequantize_weight(codes, scales, block_size, x.dtype), bias)


def int8_matmul_grad_input_reference(
    grad_y: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor, block_size: int
) -> torch.Tensor:
    """``grad_y @ dequant(codes, scales)`` in ``grad_y``'s dtype; ``grad_y`` is ``[..., out]``."""
    return grad_y @ _dequantize_weight(codes, scales, block_size, grad_y.dtype)


def _check_matmul_args(a, codes, scales, block_size, a_name: str, transposed: bool) -> None:
    if not isinstance(a, torch.Tensor) or a.dtype not in FLOAT_DTYPES or a.dim() != 2:
        raise TypeError(f"{a_name} must be a 2-D float32, bfloat16 or float16 tensor")
    if not isinstance(codes, torch.Tensor) or codes.dtype != torch.int8 or codes.dim() != 2:
        raise TypeError("codes must be a 2-D int8 tensor [out_features, in_features]")
    _check_block_size(block_size)
    if not isinstance(scales, torch.Tensor) or scales.dtype != torch.float32 or scales.dim() != 1:
        raise TypeError("scales must be a 1-D float32 tensor")
    if scales.numel() != num_blocks(codes.numel(), block_size):
        raise ValueError(
            f"scales must hold {num_blocks(codes.numel(), block_size)} blocks for codes of shape "
            f"{list(codes.shape)} at block_size={block_size}, got {scales.numel()}"
        )
    inner = codes.shape[0] if transposed else codes.shape[1]
    if a.shape[1] != inner:
        what = "out_features (codes.shape[0])" if transposed else "in_features (codes.shape[1])"
        raise ValueError(f"{a_name}.shape[1] must equal {what} = {inner}, got {a.shape[1]}")
    if a.device != codes.device or scales.device != codes.device:
        raise ValueError(
            f"{a_name} ({a.device}), codes ({codes.device}) and scales ({scales.device}) must be on one device"
        )


def int8_matmul_reference(x2d: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor, block_size: int):
    """``x2d @ dequant(W).T``: ``[M, in] -> [M, out]``."""
    _check_matmul_args(x2d, codes, scales, block_size, "x2d", transposed=False)
    return x2d @ _dequantize_weight(codes, scales, block_size, x2d.dtype).T


def int8_matmul_t_reference(g2d: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor, block_size: int):
    """``g2d @ dequant(W)``: ``[M, out] -> [M, in]``."""
    _check_matmul_args(g2d, codes, scales, block_size, "g2d", transposed=True)
    return g2d @ _dequantize_weight(codes, scales, block_size, g2d.dtype)


#: Weight elements dequantized at a time by the ops' default (non-Triton) kernel. Dequantizing a whole
#: 11008 x 4096 LLaMA-7B MLP weight to fp32 raised peak RSS by 343 MiB (the int8 -> fp32 promotion and the
#: product); in row chunks of this many elements the temporaries stay a few tens of MiB at any size.
MATMUL_CHUNK = 1 << 22


def _row_chunks(rows: int, cols: int, block_size: int):
    """Row ranges of about MATMUL_CHUNK elements that start on quantization-block boundaries."""
    return row_chunks(rows, cols, block_size, MATMUL_CHUNK)


def _weight_rows(codes: torch.Tensor, scales: torch.Tensor, block_size: int, start: int, stop: int, dtype):
    cols = codes.shape[1]
    first, last = start * cols // block_size, -(-stop * cols // block_size)
    return dequantize_reference(codes[start:stop], scales[first:last], 8, block_size, [stop - start, cols], dtype)


def _weight_rows_in_workspace(codes: torch.Tensor, scales: torch.Tensor, block_size: int, start: int, stop: int,
                              dtype: torch.dtype) -> torch.Tensor:
    """:func:`_weight_rows` written into this thread's workspace (:mod:`.workspace`; the same products, so the
    same bits) where the rows are whole blocks; elsewhere a fresh tensor as before. A 16-bit ``dtype`` (a model
    computing in bf16) takes the fp32 products rounded once into a second workspace, as the reference rounds them."""
    cols = codes.shape[1]
    n = (stop - start) * cols
    if dtype not in (torch.float32, torch.bfloat16, torch.float16) or n % block_size or (start * cols) % block_size:
        return _weight_rows(codes, scales, block_size, start, stop, dtype)
    first = start * cols // block_size
    out = workspace("dequant", n, torch.float32, codes.device)
    dequantize_into(codes[start:stop], scales[first:first + n // block_size], block_size, out)
    if dtype != torch.float32:
        out = workspace("dequant16", n, dtype, codes.device).copy_(out)
    return out.view(stop - start, cols)


def int8_matmul_chunked(x2d: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor, block_size: int):
    """``int8_matmul_reference`` computed over row chunks of the weight (:data:`MATMUL_CHUNK`), so the fp32
    weight is never whole; equal to the reference up to float rounding (the BLAS blocks another shape), and
    bit for bit where the weight is one chunk. Each chunk, a whole small weight included, is dequantized into a
    workspace the thread reuses (:mod:`.workspace`): a fresh fp32 weight per call left a 117M model's heap with
    60 MiB of holes after one forward (BENCHMARKS.md, the transformers load)."""
    _check_matmul_args(x2d, codes, scales, block_size, "x2d", transposed=False)
    if codes.numel() <= MATMUL_CHUNK:  # one chunk: one product, the reference's bits
        return x2d @ _weight_rows_in_workspace(codes, scales, block_size, 0, codes.shape[0], x2d.dtype).T
    out = x2d.new_empty((x2d.shape[0], codes.shape[0]))
    for start, stop in _row_chunks(codes.shape[0], codes.shape[1], block_size):
        out[:, start:stop] = x2d @ _weight_rows_in_workspace(codes, scales, block_size, start, stop, x2d.dtype).T
    return out


def int8_matmul_t_chunked(g2d: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor, block_size: int):
    """``int8_matmul_t_reference`` as a sum over row chunks of the weight (:data:`MATMUL_CHUNK`); the sum
    runs in another order than one product, so results agree to float rounding. The dequantized chunk lives
    in a workspace the thread reuses; each chunk's product in one buffer per call (its size follows the
    tokens, so it is not kept)."""
    _check_matmul_args(g2d, codes, scales, block_size, "g2d", transposed=True)
    if codes.numel() <= MATMUL_CHUNK:  # one chunk: one product, the reference's bits
        return g2d @ _weight_rows_in_workspace(codes, scales, block_size, 0, codes.shape[0], g2d.dtype)
    out = None
    part = None
    for start, stop in _row_chunks(codes.shape[0], codes.shape[1], block_size):
        rows = _weight_rows_in_workspace(codes, scales, block_size, start, stop, g2d.dtype)
        if out is None:
            out = g2d[:, start:stop] @ rows
            continue
        if part is None:
            part = torch.empty_like(out)
        torch.matmul(g2d[:, start:stop], rows, out=part)
        out.add_(part)
    return out


# ---------------------------------------------------------------------------------------------
# Custom ops (chunked reference by default; Triton registered for CUDA below)
# ---------------------------------------------------------------------------------------------


@torch.library.custom_op("qgalore_fx::int8_matmul", mutates_args=())
def int8_matmul_op(x2d: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor, block_size: int) -> torch.Tensor:
    return int8_matmul_chunked(x2d, codes, scales, block_size)


@int8_matmul_op.register_fake
def _int8_matmul_fake(x2d, codes, scales, block_size):
    _check_matmul_args(x2d, codes, scales, block_size, "x2d", transposed=False)
    return x2d.new_empty((x2d.shape[0], codes.shape[0]))


@torch.library.custom_op("qgalore_fx::int8_matmul_t", mutates_args=())
def int8_matmul_t_op(g2d: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor, block_size: int) -> torch.Tensor:
    return int8_matmul_t_chunked(g2d, codes, scales, block_size)


@int8_matmul_t_op.register_fake
def _int8_matmul_t_fake(g2d, codes, scales, block_size):
    _check_matmul_args(g2d, codes, scales, block_size, "g2d", transposed=True)
    return g2d.new_empty((g2d.shape[0], codes.shape[1]))


# ---------------------------------------------------------------------------------------------
# Triton kernel, launchers, CUDA registration
# ---------------------------------------------------------------------------------------------

if triton is not None:
    from .quant_triton import _cast_rtne, triton_interpreter_active

    @triton.jit
    def _dequant_matmul_kernel(
        a_ptr, codes_ptr, scales_ptr, c_ptr,
        M, N, K,
        stride_am, stride_ak, stride_wk, stride_wn, stride_cm, stride_cn,
        BLOCK_SIZE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
        DOT_FP32: tl.constexpr,
    ):
        """C[M, N] = A[M, K] @ B[K, N] with B dequantized tile by tile from the int8 weight:

            i = k * stride_wk + n * stride_wn            # flat index into W [out, in]
            B[k, n] = (codes[i] * scales[i // BLOCK_SIZE]).to(A.dtype)

        x @ W^T uses (stride_wk, stride_wn) = (1, in); g @ W uses (in, 1).
        Accumulation is fp32; C is stored in C's dtype. BLOCK_SIZE (the quantization block) is a
        constexpr so that the scale index is a shift for the usual power-of-two sizes.
        """
        rm = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
        rn = tl.program_id(1).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
        rk = tl.arange(0, BLOCK_K)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            kk = k0 + rk
            a_mask = (rm[:, None] < M) & (kk[None, :] < K)
            a = tl.load(a_ptr + rm[:, None] * stride_am + kk[None, :] * stride_ak, mask=a_mask, other=0.0)
            w_idx = kk[:, None].to(tl.int64) * stride_wk + rn[None, :] * stride_wn
            w_mask = (kk[:, None] < K) & (rn[None, :] < N)
            code = tl.load(codes_ptr + w_idx, mask=w_mask, other=0).to(tl.float32)
            scale = tl.load(scales_ptr + w_idx // BLOCK_SIZE, mask=w_mask, other=0.0)
            w = _cast_rtne(code * scale, a_ptr.dtype.element_ty)
            if DOT_FP32:
                acc += tl.dot(a.to(tl.float32), w.to(tl.float32), input_precision="ieee")
            else:
                acc = tl.dot(a, w, acc)
        c_mask = (rm[:, None] < M) & (rn[None, :] < N)
        c = _cast_rtne(acc, c_ptr.dtype.element_ty)
        tl.store(c_ptr + rm[:, None] * stride_cm + rn[None, :] * stride_cn, c, mask=c_mask)

    def _launch_dequant_matmul(a: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor, block_size: int,
                               transposed: bool) -> torch.Tensor:
        interpreting = triton_interpreter_active()
        if a.device.type != "cuda" and not interpreting:
            raise RuntimeError(
                f"the Triton dequant-matmul needs a CUDA device, or TRITON_INTERPRET=1 set before triton "
                f"is first imported to run on CPU; got tensors on {a.device}"
            )
        codes = codes.contiguous()
        out_features, in_features = codes.shape
        m = a.shape[0]
        if transposed:  # g @ W: K = out, N = in
            n, k, stride_wk, stride_wn = in_features, out_features, in_features, 1
        else:  # x @ W^T: K = in, N = out
            n, k, stride_wk, stride_wn = out_features, in_features, 1, in_features
        c = torch.empty((m, n), dtype=a.dtype, device=a.device)
        if m == 0 or n == 0:
            return c
        if k == 0:
            return c.zero_()
        if interpreting:
            block_m = block_n = block_k = 32
            launch = {}
        else:
            block_m, block_n, block_k = 64, 64, 64
            launch = {"num_warps": 4, "num_stages": 3}
        # fp32: exact fp32 products like torch's default (no TF32). bf16 under the interpreter:
        # its tl.dot multiplies the raw bf16 bit patterns, so compute the same products in fp32.
        dot_fp32 = a.dtype == torch.float32 or (interpreting and a.dtype == torch.bfloat16)
        grid = (triton.cdiv(m, block_m), triton.cdiv(n, block_n))
        _dequant_matmul_kernel[grid](
            a, codes, scales.contiguous(), c, m, n, k,
            a.stride(0), a.stride(1), stride_wk, stride_wn, c.stride(0), c.stride(1),
            BLOCK_SIZE=block_size, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, DOT_FP32=dot_fp32, **launch,
        )
        return c

    def int8_matmul_triton(x2d: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor, block_size: int):
        """Same signature and result as :func:`int8_matmul_reference`, computed by Triton."""
        _check_matmul_args(x2d, codes, scales, block_size, "x2d", transposed=False)
        return _launch_dequant_matmul(x2d, codes, scales, block_size, transposed=False)

    def int8_matmul_t_triton(g2d: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor, block_size: int):
        """Same signature and result as :func:`int8_matmul_t_reference`, computed by Triton."""
        _check_matmul_args(g2d, codes, scales, block_size, "g2d", transposed=True)
        return _launch_dequant_matmul(g2d, codes, scales, block_size, transposed=True)

    def _int8_matmul_cuda(x2d, codes, scales, block_size):
        """The op's CUDA kernel: Triton, or the reference under ``QGALORE_FX_REFERENCE=1`` (``fastpath``)."""
        if reference_forced():
            return int8_matmul_reference(x2d, codes, scales, block_size)
        return int8_matmul_triton(x2d, codes, scales, block_size)

    def _int8_matmul_t_cuda(g2d, codes, scales, block_size):
        """The op's CUDA kernel: Triton, or the reference under ``QGALORE_FX_REFERENCE=1`` (``fastpath``)."""
        if reference_forced():
            return int8_matmul_t_reference(g2d, codes, scales, block_size)
        return int8_matmul_t_triton(g2d, codes, scales, block_size)

    int8_matmul_op.register_kernel("cuda")(_int8_matmul_cuda)
    int8_matmul_t_op.register_kernel("cuda")(_int8_matmul_t_cuda)
