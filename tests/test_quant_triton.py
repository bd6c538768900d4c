"""Triton quantization kernels against the torch reference.

On a machine without CUDA the kernels run in Triton's interpreter, which must be switched on
(TRITON_INTERPRET=1) before triton is first imported in the process. This module sets it at
import; if something imported triton earlier, the module re-runs itself in a fresh process.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import subprocess  # noqa: E402
import sys  # noqa: E402

import pytest  # noqa: E402
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

pytest.importorskip("triton")

from qgalore_fx.kernels import make_seed, quantize_reference, dequantize_reference  # noqa: E402
from qgalore_fx.kernels.quant_triton import (  # noqa: E402
    MAX_TRITON_BLOCK_SIZE,
    dequantize_triton,
    quantize_triton,
    triton_interpreter_active,
)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
IN_PROCESS = DEVICE == "cuda" or triton_interpreter_active()
FLOAT_DTYPES = [torch.float32, torch.bfloat16, torch.float16]


@pytest.fixture(autouse=True)
def _kernels_launchable(request):
    if not IN_PROCESS and request.node.name != "test_module_in_fresh_process":
        pytest.skip("triton was imported before TRITON_INTERPRET=1; test_module_in_fresh_process runs these")


@pytest.mark.skipif(IN_PROCESS, reason="the kernels run in this process")
def test_module_in_fresh_process():
    env = dict(os.environ, TRITON_INTERPRET="1")
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__]
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-3000:]


def bitwise_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal bit patterns (so +0.0 and -0.0 differ), on CPU."""
    a, b = a.cpu(), b.cpu()
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    if a.is_floating_point():
        as_int = {4: torch.int32, 2: torch.int16}[a.element_size()]
        a, b = a.view(as_int), b.view(as_int)
    return torch.equal(a, b)


def randn(*shape, dtype=torch.float32, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(dtype).to(DEVICE)


# ---------------------------------------------------------------------------------------------
# exact agreement: nearest rounding and dequantization
# ---------------------------------------------------------------------------------------------

SHAPES = [(33, 70), (1001,), (7,), (5, 3), (2, 3, 40), (1,)]


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("shape, block_size", list(zip(SHAPES, [256, 64, 2, 6, 30, 4])))
def test_quantize_nearest_matches_reference_exactly(shape, block_size, bits, dtype):
    """Same codes (ties included: both round half to even) and bit-identical scales."""
    x = randn(*shape, dtype=dtype) * 3
    x.view(-1)[: x.numel() // 3] = 0  # whole zero blocks, and zeros inside blocks
    x.view(-1)[-1:] = -0.0
    codes, scales = quantize_triton(x, bits, block_size)
    ref_codes, ref_scales = quantize_reference(x.cpu(), bits, block_size)
    assert torch.equal(codes.cpu(), ref_codes)
    assert bitwise_equal(scales, ref_scales)


@pytest.mark.parametrize("bits", [4, 8])
def test_ties_round_half_to_even(bits):
    qmax = 127 if bits == 8 else 7
    # absmax == qmax makes the scale exactly 1, so each value is its own v
    values = [float(qmax), 0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 3.5, -3.5, 2.49, 2.51]
    x = torch.tensor(values, device=DEVICE)
    codes, scales = quantize_triton(x, bits, 12)
    ref_codes, _ = quantize_reference(x.cpu(), bits, 12)
    assert scales.item() == 1.0
    assert torch.equal(codes.cpu(), ref_codes)
    expected = torch.round(torch.tensor(values)).to(torch.int8)
    if bits == 4:
        from qgalore_fx.kernels import unpack_int4

        assert torch.equal(unpack_int4(codes.cpu(), len(values)), expected)
    else:
        assert torch.equal(codes.cpu(), expected)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    n=st.integers(1, 700),
    block_size=st.sampled_from([2, 4, 10, 64, 256]),
    bits=st.sampled_from([4, 8]),
    dtype=st.sampled_from(FLOAT_DTYPES),
    log_scale=st.integers(-30, 30),
    seed=st.integers(0, 1000),
)
def test_quantize_nearest_matches_reference_property(n, block_size, bits, dtype, log_scale, seed):
    finfo = torch.finfo(dtype)
    x = (randn(n, seed=seed) * 2.0**log_scale).clamp(finfo.min, finfo.max).to(dtype)
    codes, scales = quantize_triton(x, bits, block_size)
    ref_codes, ref_scales = quantize_reference(x.cpu(), bits, block_size)
    assert torch.equal(codes.cpu(), ref_codes) and bitwise_equal(scales, ref_scales)


def test_quantize_extremes_match_reference():
    x = torch.tensor([3.4028235e38, -1e38, 1.0, 0.0, 1e-40, -3e-45, 2e-39, 0.0], device=DEVICE)
    for bits in (4, 8):
        for block_size in (2, 8):
            codes, scales = quantize_triton(x, bits, block_size)
            ref_codes, ref_scales = quantize_reference(x.cpu(), bits, block_size)
            assert torch.equal(codes.cpu(), ref_codes) and torch.equal(scales.cpu(), ref_scales)
            assert torch.isfinite(dequantize_triton(codes, scales, bits, block_size, [8], torch.float32)).all()


@pytest.mark.parametrize("out_dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("shape, block_size", [((33, 70), 256), ((1001,), 64), ((5, 3), 6), ((9,), 2)])
def test_dequantize_matches_reference_exactly(shape, block_size, bits, out_dtype):
    x = randn(*shape, seed=3) * 50
    ref_codes, ref_scales = quantize_reference(x.cpu(), bits, block_size)
    out = dequantize_triton(ref_codes.to(DEVICE), ref_scales.to(DEVICE), bits, block_size, list(shape), out_dtype)
    ref = dequantize_reference(ref_codes, ref_scales, bits, block_size, list(shape), out_dtype)
    assert out.dtype == out_dtype and out.shape == shape
    assert bitwise_equal(out, ref)


def test_large_block_sizes_fall_back_to_the_reference():
    x = randn(3 * MAX_TRITON_BLOCK_SIZE + 10)
    block_size = 2 * MAX_TRITON_BLOCK_SIZE
    codes, scales = quantize_triton(x, 8, block_size)
    ref_codes, ref_scales = quantize_reference(x.cpu(), 8, block_size)
    assert torch.equal(codes.cpu(), ref_codes) and torch.equal(scales.cpu(), ref_scales)


def test_empty_input():
    codes, scales = quantize_triton(torch.zeros(0, 3, device=DEVICE), 4, 4)
    assert codes.numel() == 0 and scales.numel() == 0
    assert dequantize_triton(codes, scales, 4, 4, [0, 3], torch.float16).shape == (0, 3)


# ---------------------------------------------------------------------------------------------
# stochastic rounding in the Triton path
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bits", [4, 8])
def test_stochastic_rounding_unbiased(bits):
    """Mean over many draws within 5 sigma of the mean; nearest rounding fails the same bound."""
    block, draws = 64, 1500
    qmax = 127 if bits == 8 else 7
    gen = torch.Generator().manual_seed(7)
    # v = x / scale with fractional parts in [0.2, 0.8]; absmax 1 gives scale 1 / qmax
    v = torch.randint(-qmax + 1, qmax - 1, (block,), generator=gen) + 0.2 + 0.6 * torch.rand(block, generator=gen)
    x = v / qmax
    x[0] = 1.0
    codes, scales = quantize_triton(x.repeat(draws).to(DEVICE), bits, block, make_seed(31, device=DEVICE))
    assert torch.equal(scales.cpu(), torch.full((draws,), 1.0 / qmax))
    if bits == 4:
        from qgalore_fx.kernels import unpack_int4

        codes = unpack_int4(codes.cpu(), block * draws)
    deq = codes.cpu().view(draws, block).double() * scales[0].item()
    mean = deq.mean(0)
    scale = scales[0].item()
    frac = torch.frac(x.double() / scale).abs()
    frac[0] = 0
    bound = 5 * scale * torch.sqrt(frac * (1 - frac) / draws) + 2.0**-22 * x.double().abs()
    assert bool(((mean - x.double()).abs() <= bound).all())
    # every draw is within one step
    assert bool(((deq - x.double()).abs() <= scale * (1 + 1e-6)).all())
    nearest_codes, _ = quantize_triton(x.to(DEVICE), bits, block)
    if bits == 4:
        nearest_codes = unpack_int4(nearest_codes.cpu(), block)
    nearest = nearest_codes.cpu().double() * scale
    assert bool(((nearest - x.double()).abs()[1:] > bound[1:]).all())


def test_stochastic_rounding_seed_and_offset():
    x = randn(3000, seed=5)
    a, sa = quantize_triton(x, 8, 64, make_seed(123, device=DEVICE))
    b, sb = quantize_triton(x, 8, 64, make_seed(123, device=DEVICE))
    c, _ = quantize_triton(x, 8, 64, make_seed(124, device=DEVICE))
    d, _ = quantize_triton(x, 8, 64, make_seed(123, device=DEVICE, offset=3000))
    assert torch.equal(a, b) and not torch.equal(a, c) and not torch.equal(a, d)
    ref_codes, ref_scales = quantize_reference(x.cpu(), 8, 64)
    assert torch.equal(sa.cpu(), ref_scales)
    # stochastic codes are the nearest codes or one step away toward x
    assert int((a.cpu().int() - ref_codes.int()).abs().max()) <= 1


def test_argument_errors_name_the_argument():
    x = randn(16)
    with pytest.raises(ValueError, match="bits must be one of"):
        quantize_triton(x, 2, 4)
    with pytest.raises(ValueError, match="block_size must be a positive even int"):
        quantize_triton(x, 8, 5)
    with pytest.raises(TypeError, match="x must have dtype"):
        quantize_triton(x.double(), 8, 4)
    with pytest.raises(ValueError, match="seed must be None"):
        quantize_triton(x, 8, 4, torch.zeros(3, dtype=torch.int64, device=DEVICE))
    codes, scales = quantize_triton(x, 8, 4)
    with pytest.raises(ValueError, match="scales must hold"):
        dequantize_triton(codes, scales[:2], 8, 4, [16], torch.float32)


@pytest.mark.skipif(DEVICE == "cuda", reason="the CPU error path only exists without CUDA")
def test_cpu_launch_without_interpreter_says_what_to_set():
    code = (
        "import torch\n"
        "from qgalore_fx.kernels.quant_triton import quantize_triton\n"
        "try:\n"
        "    quantize_triton(torch.randn(8), 8, 4)\n"
        "except RuntimeError as e:\n"
        "    print(e)\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert "x is on cpu" in result.stdout and "TRITON_INTERPRET=1" in result.stdout, result.stdout + result.stderr
