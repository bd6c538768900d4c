"""Dequant-matmul: references against plain fp32 math, Triton against the references, ops.

On a machine without CUDA the Triton kernel runs in Triton's interpreter (TRITON_INTERPRET=1,
set here before triton is imported; if something imported triton earlier, the Triton tests
re-run in a fresh process).
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import subprocess  # noqa: E402
import sys  # noqa: E402

import pytest  # noqa: E402

from qgalore_fx.kernels import (  # noqa: E402
    int8_linear_reference,
    int8_matmul_grad_input_reference,
    int8_matmul_reference,
    int8_matmul_t_reference,
    quantize_blockwise,
)

try:
    from qgalore_fx.kernels.int8_matmul import int8_matmul_t_triton, int8_matmul_triton
    from qgalore_fx.kernels.quant_triton import triton_interpreter_active
except ImportError:  # no triton installed: only the reference tests run
    HAS_TRITON = False
else:
    HAS_TRITON = True

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TRITON_IN_PROCESS = HAS_TRITON and (DEVICE == "cuda" or triton_interpreter_active())
needs_triton = pytest.mark.skipif(
    not TRITON_IN_PROCESS,
    reason="no triton, or triton imported before TRITON_INTERPRET=1 (test_triton_in_fresh_process runs these)",
)

# (dtype, atol, rtol) of Triton against the reference: the inputs and the dequantized weight are
# identical, only the fp32 accumulation order differs, plus one rounding of the output dtype.
TRITON_TOLERANCES = [
    (torch.float32, 1e-4, 1e-5),
    (torch.float16, 2e-3, 2e-3),
    (torch.bfloat16, 1.6e-2, 1.6e-2),
]
# (M, in, out, block_size): ragged against every tile size, weights not a multiple of the block
SHAPES = [(33, 70, 45, 64), (1, 16, 16, 256), (17, 130, 96, 30), (64, 64, 33, 2)]


def make_weight(out_features, in_features, block_size, seed=0):
    w = torch.randn(out_features, in_features, generator=torch.Generator().manual_seed(seed))
    q = quantize_blockwise(w, bits=8, block_size=block_size)
    return q.codes, q.scales


def randn(*shape, dtype, seed=1):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


@pytest.mark.skipif(not HAS_TRITON or TRITON_IN_PROCESS, reason="the Triton tests run in this process")
def test_triton_in_fresh_process():
    env = dict(os.environ, TRITON_INTERPRET="1")
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__, "-k", "triton and not fresh"]
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-3000:]


# ---------------------------------------------------------------------------------------------
# references
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype, atol, rtol", TRITON_TOLERANCES)
def test_references_match_fp32_math_on_the_dequantized_weight(dtype, atol, rtol):
    codes, scales = make_weight(45, 70, 64)
    w = (codes.float().view(-1) * scales.repeat_interleave(64)[: codes.numel()]).view(45, 70)
    x = randn(3, 11, 70, dtype=dtype)
    bias = randn(45, dtype=dtype, seed=2)
    y = int8_linear_reference(x, codes, scales, bias, 64)
    w_in_dtype = w.to(dtype).float()  # the reference dequantizes to x's dtype, as the kernel does
    assert y.dtype == dtype and y.shape == (3, 11, 45)
    torch.testing.assert_close(y.float(), x.float() @ w_in_dtype.T + bias.float(), atol=atol * 10, rtol=rtol * 10)
    g = randn(3, 11, 45, dtype=dtype, seed=3)
    gx = int8_matmul_grad_input_reference(g, codes, scales, 64)
    assert gx.dtype == dtype and gx.shape == (3, 11, 70)
    torch.testing.assert_close(gx.float(), g.float() @ w_in_dtype, atol=atol * 10, rtol=rtol * 10)
    torch.testing.assert_close(
        int8_matmul_reference(x.view(-1, 70), codes, scales, 64),
        int8_linear_reference(x, codes, scales, None, 64).view(-1, 45), atol=atol, rtol=rtol,
    )
    torch.testing.assert_close(
        int8_matmul_t_reference(g.view(-1, 45), codes, scales, 64), gx.view(-1, 70), atol=atol, rtol=rtol
    )


def test_ops_default_to_the_reference_on_cpu():
    codes, scales = make_weight(45, 70, 64)
    x = randn(33, 70, dtype=torch.float32)
    g = randn(33, 45, dtype=torch.float32)
    ops = torch.ops.qgalore_fx
    assert torch.equal(ops.int8_matmul(x, codes, scales, 64), int8_matmul_reference(x, codes, scales, 64))
    assert torch.equal(ops.int8_matmul_t(g, codes, scales, 64), int8_matmul_t_reference(g, codes, scales, 64))


def test_opcheck():
    codes, scales = make_weight(12, 10, 6)
    x, g = randn(5, 10, dtype=torch.float32), randn(5, 12, dtype=torch.float32)
    torch.library.opcheck(torch.ops.qgalore_fx.int8_matmul.default, (x, codes, scales, 6))
    torch.library.opcheck(torch.ops.qgalore_fx.int8_matmul_t.default, (g, codes, scales, 6))


def test_ops_under_torch_compile():
    torch._dynamo.reset()
    codes, scales = make_weight(45, 70, 64)

    def forward_backward(x, g):
        y = torch.ops.qgalore_fx.int8_matmul(x, codes, scales, 64).relu()
        return y, torch.ops.qgalore_fx.int8_matmul_t(g, codes, scales, 64)

    x, g = randn(9, 70, dtype=torch.float32), randn(9, 45, dtype=torch.float32)
    compiled = torch.compile(forward_backward, backend="inductor", fullgraph=True)
    for got, want in zip(compiled(x, g), forward_backward(x, g)):
        assert torch.equal(got, want)


@pytest.mark.parametrize(
    "op, args, exc, match",
    [
        ("int8_matmul", ((4, 71), (45, 70), 64), ValueError, r"x2d.shape\[1\] must equal in_features"),
        ("int8_matmul_t", ((4, 70), (45, 70), 64), ValueError, r"g2d.shape\[1\] must equal out_features"),
        ("int8_matmul", ((2, 4, 70), (45, 70), 64), TypeError, "x2d must be a 2-D"),
        ("int8_matmul", ((4, 70), (45, 70), 63), ValueError, "block_size must be a positive even int"),
        ("int8_matmul", ((4, 70), (45, 70), 32), ValueError, "scales must hold"),
    ],
)
def test_errors_name_the_argument(op, args, exc, match):
    x_shape, w_shape, block_size = args
    codes, scales = make_weight(*w_shape, 64)
    with pytest.raises(exc, match=match):
        getattr(torch.ops.qgalore_fx, op)(torch.randn(x_shape), codes, scales, block_size)
    with pytest.raises(TypeError, match="codes must be a 2-D int8"):
        torch.ops.qgalore_fx.int8_matmul(torch.randn(4, 70), codes.float(), scales, 64)


# ---------------------------------------------------------------------------------------------
# Triton against the reference
# ---------------------------------------------------------------------------------------------


@needs_triton
@pytest.mark.parametrize("dtype, atol, rtol", TRITON_TOLERANCES)
@pytest.mark.parametrize("m, in_features, out_features, block_size", SHAPES)
def test_triton_int8_matmul_matches_reference(m, in_features, out_features, block_size, dtype, atol, rtol):
    codes, scales = make_weight(out_features, in_features, block_size)
    x = randn(m, in_features, dtype=dtype)
    want = int8_matmul_reference(x, codes, scales, block_size)
    got = int8_matmul_triton(x.to(DEVICE), codes.to(DEVICE), scales.to(DEVICE), block_size)
    assert got.dtype == dtype and got.shape == (m, out_features)
    torch.testing.assert_close(got.cpu(), want, atol=atol, rtol=rtol)


@needs_triton
@pytest.mark.parametrize("dtype, atol, rtol", TRITON_TOLERANCES)
@pytest.mark.parametrize("m, in_features, out_features, block_size", SHAPES)
def test_triton_int8_matmul_t_matches_reference(m, in_features, out_features, block_size, dtype, atol, rtol):
    codes, scales = make_weight(out_features, in_features, block_size)
    g = randn(m, out_features, dtype=dtype)
    want = int8_matmul_t_reference(g, codes, scales, block_size)
    got = int8_matmul_t_triton(g.to(DEVICE), codes.to(DEVICE), scales.to(DEVICE), block_size)
    assert got.dtype == dtype and got.shape == (m, in_features)
    torch.testing.assert_close(got.cpu(), want, atol=atol, rtol=rtol)


@needs_triton
def test_triton_uses_every_scale():
    """A weight whose blocks have very different scales: a wrong scale index shows at once."""
    block_size = 10
    w = torch.randn(7, 13) * torch.logspace(-3, 3, 91)[: 7 * 13].view(7, 13)
    q = quantize_blockwise(w, bits=8, block_size=block_size)
    eye_in, eye_out = torch.eye(13), torch.eye(7)
    deq = q.dequantize()
    got_w_t = int8_matmul_triton(eye_in.to(DEVICE), q.codes.to(DEVICE), q.scales.to(DEVICE), block_size).cpu()
    got_w = int8_matmul_t_triton(eye_out.to(DEVICE), q.codes.to(DEVICE), q.scales.to(DEVICE), block_size).cpu()
    assert torch.equal(got_w_t, deq.T) and torch.equal(got_w, deq)


@needs_triton
def test_triton_non_contiguous_input_and_empty():
    codes, scales = make_weight(45, 70, 64)
    x = randn(70, 33, dtype=torch.float32).T  # strided view
    torch.testing.assert_close(
        int8_matmul_triton(x.to(DEVICE), codes.to(DEVICE), scales.to(DEVICE), 64).cpu(),
        int8_matmul_reference(x, codes, scales, 64), atol=1e-4, rtol=1e-5,
    )
    empty = int8_matmul_triton(torch.zeros(0, 70, device=DEVICE), codes.to(DEVICE), scales.to(DEVICE), 64)
    assert empty.shape == (0, 45)


@pytest.mark.parametrize("shape,block_size", [((37, 24), 16), ((64, 40), 256), ((9, 1000), 64)])
def test_the_ops_chunked_default_kernel_equals_the_reference(monkeypatch, shape, block_size):
    """Row chunks start on block boundaries (including blocks that straddle rows); both agree with the
    reference to float rounding (the BLAS blocks another shape; the input gradient sums in another order)."""
    from qgalore_fx.kernels import int8_matmul as mm

    gen = torch.Generator().manual_seed(0)
    out_f, in_f = shape
    codes = torch.randint(-127, 128, shape, generator=gen, dtype=torch.int8)
    scales = torch.rand(mm.num_blocks(codes.numel(), block_size), generator=gen) + 0.1
    x = torch.randn(5, in_f, generator=gen)
    g = torch.randn(5, out_f, generator=gen)
    monkeypatch.setattr(mm, "MATMUL_CHUNK", 3 * in_f)  # a few rows per chunk
    assert len(list(mm._row_chunks(out_f, in_f, block_size))) > 1
    torch.testing.assert_close(torch.ops.qgalore_fx.int8_matmul(x, codes, scales, block_size),
                               mm.int8_matmul_reference(x, codes, scales, block_size), rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(torch.ops.qgalore_fx.int8_matmul_t(g, codes, scales, block_size),
                               mm.int8_matmul_t_reference(g, codes, scales, block_size), rtol=1e-5, atol=1e-4)


def test_the_chunked_kernels_allocate_nothing_of_a_chunks_size(monkeypatch):
    """Each chunk's fp32 rows are dequantized into this thread's workspace, codes copied then scaled in place: a
    warm call allocates only its output (``torch.mul`` of int8 by fp32 would first promote the codes into a
    temporary of the chunk's size, a fresh mapping faulted in page by page under the mmap threshold)."""
    from torch.profiler import ProfilerActivity, profile

    from qgalore_fx.kernels import int8_matmul as mm

    gen = torch.Generator().manual_seed(0)
    codes = torch.randint(-127, 128, (2048, 1024), generator=gen, dtype=torch.int8)
    scales = torch.rand(mm.num_blocks(codes.numel(), 256), generator=gen) + 0.1
    x, g = torch.randn(4, 1024, generator=gen), torch.randn(4, 2048, generator=gen)
    monkeypatch.setattr(mm, "MATMUL_CHUNK", 256 * 1024)  # 8 chunks of 1 MiB fp32
    chunk_bytes = 256 * 1024 * 4
    for fn, a in ((mm.int8_matmul_chunked, x), (mm.int8_matmul_t_chunked, g)):
        fn(a, codes, scales, 256)  # fills the workspace
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            out = fn(a, codes, scales, 256)
        assert [e.name for e in prof.events() if e.cpu_memory_usage >= chunk_bytes] == []
        ref = (mm.int8_matmul_reference if fn is mm.int8_matmul_chunked else mm.int8_matmul_t_reference)(
            a, codes, scales, 256)
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6 * ref.abs().max().item())  # sums of ~1e3


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_weight_of_one_chunk_is_dequantized_into_the_workspace_too(dtype):
    """A weight of at most MATMUL_CHUNK elements (every linear of a 117M model) is one chunk: it is dequantized
    into the thread's workspace as well, so a warm forward or input-gradient product allocates nothing of the
    weight's size (a fresh fp32 weight per call left the 117M model's heap 60 MiB of holes after one forward),
    and the result is the reference's, bit for bit (the same weight, one product); in bf16 too (a model loaded
    with dtype=torch.bfloat16), whose weight is the fp32 products rounded once, as the reference's."""
    from torch.profiler import ProfilerActivity, profile

    from qgalore_fx.kernels import int8_matmul as mm

    gen = torch.Generator().manual_seed(0)
    codes = torch.randint(-127, 128, (2304, 768), generator=gen, dtype=torch.int8)
    assert codes.numel() <= mm.MATMUL_CHUNK
    scales = torch.rand(mm.num_blocks(codes.numel(), 256), generator=gen) + 0.1
    x, g = torch.randn(4, 768, generator=gen).to(dtype), torch.randn(4, 2304, generator=gen).to(dtype)
    weight_bytes = codes.numel() * dtype.itemsize
    for fn, ref_fn, a in ((mm.int8_matmul_chunked, mm.int8_matmul_reference, x),
                          (mm.int8_matmul_t_chunked, mm.int8_matmul_t_reference, g)):
        fn(a, codes, scales, 256)  # fills the workspace
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            out = fn(a, codes, scales, 256)
        assert [(e.name, e.cpu_memory_usage) for e in prof.events() if e.cpu_memory_usage >= weight_bytes // 2] == []
        assert torch.equal(out, ref_fn(a, codes, scales, 256))
