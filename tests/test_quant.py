"""Block quantization: reference math, public API, custom ops (CPU, no Triton here).

The Triton kernels are compared against this reference in test_quant_triton.py.
"""

import math
import os

import torch

# Importing qgalore_fx.kernels imports triton. Without CUDA, triton must come up in interpreter
# mode for test_quant_triton.py / test_int8_matmul.py to run their kernels in this process.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
from hypothesis import HealthCheck, assume, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from qgalore_fx.kernels import (  # noqa: E402
    MAX_SCALE,
    QMAX,
    QuantizedTensor,
    dequantize_blockwise,
    dequantize_reference,
    make_seed,
    pack_int4,
    quantize_blockwise,
    quantize_reference,
    unpack_int4,
)

FLOAT_DTYPES = [torch.float32, torch.bfloat16, torch.float16]
BLOCK_SIZES = [2, 4, 6, 16, 64, 256]
PROPERTY_SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


# ---------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------


def per_element(values: torch.Tensor, block_size: int, numel: int) -> torch.Tensor:
    """Broadcast one value per block to the flattened elements."""
    return values.repeat_interleave(block_size)[:numel]


def block_absmax(x: torch.Tensor, block_size: int) -> torch.Tensor:
    flat = x.reshape(-1).float().abs()
    pad = (-flat.numel()) % block_size
    return per_element(torch.nn.functional.pad(flat, (0, pad)).view(-1, block_size).amax(1), block_size, flat.numel())


def rounding_error(x: torch.Tensor, q: QuantizedTensor):
    """(|x - dequant(x)| per element in fp32, the scale of each element's block, fp32 slack).

    The slack covers the fp32 rounding of x / scale and of code * scale (well under 2^-20 of
    the block's absmax) and scales that underflow to zero or to subnormals (< 1e-42).
    """
    xf = x.reshape(-1).float()
    err = (q.dequantize(torch.float32).reshape(-1) - xf).abs()
    scale = per_element(q.scales, q.block_size, xf.numel())
    slack = block_absmax(x, q.block_size) * 2.0**-20 + 1e-42
    return err, scale, slack


@st.composite
def float_tensors(draw, dtypes=tuple(FLOAT_DTYPES)):
    """Tensors of awkward sizes: either arbitrary finite floats chosen element by element, or
    seeded random tensors with a chosen magnitude and a block pattern (zero, constant,
    single-sign regions)."""
    dtype = draw(st.sampled_from(dtypes))
    finfo = torch.finfo(dtype)
    if draw(st.booleans()):
        width = 16 if dtype == torch.float16 else 32
        values = draw(
            st.lists(st.floats(width=width, allow_nan=False, allow_infinity=False), min_size=1, max_size=200)
        )
        x = torch.tensor(values, dtype=torch.float32).clamp(finfo.min, finfo.max).to(dtype)
        assume(bool(torch.isfinite(x).all()))
        return x
    shape = draw(st.lists(st.integers(1, 20), min_size=1, max_size=3))
    seed = draw(st.integers(0, 2**31 - 1))
    log_scale = draw(st.integers(-6, 4))
    pattern = draw(st.sampled_from(["normal", "zeros", "constant", "positive", "negative"]))
    gen = torch.Generator().manual_seed(seed)
    flat = torch.randn(math.prod(shape), generator=gen) * 10.0**log_scale
    half = flat.numel() // 2
    if pattern == "zeros":
        flat[:half] = 0
    elif pattern == "constant":
        flat[:half] = flat[0]
    elif pattern == "positive":
        flat = flat.abs()
    elif pattern == "negative":
        flat = -flat.abs()
    return flat.view(shape).to(dtype)


# ---------------------------------------------------------------------------------------------
# properties of the round trip
# ---------------------------------------------------------------------------------------------


@PROPERTY_SETTINGS
@given(x=float_tensors(), bits=st.sampled_from([4, 8]), block_size=st.sampled_from(BLOCK_SIZES))
def test_nearest_round_trip_within_half_a_step(x, bits, block_size):
    q = quantize_blockwise(x, bits=bits, block_size=block_size)
    err, scale, slack = rounding_error(x, q)
    assert bool((err <= 0.5 * scale + slack).all()), f"max excess {(err - 0.5 * scale).max().item()}"
    # the scale is absmax / qmax of each block (clamped only next to the fp32 maximum)
    blocks_absmax = block_absmax(x, block_size)[::block_size]
    expected = torch.minimum(blocks_absmax / QMAX[bits], torch.tensor(MAX_SCALE[bits]))
    assert torch.equal(q.scales, expected)


@PROPERTY_SETTINGS
@given(
    x=float_tensors(),
    bits=st.sampled_from([4, 8]),
    block_size=st.sampled_from(BLOCK_SIZES),
    seed=st.integers(-(2**63), 2**63 - 1),
)
def test_stochastic_round_trip_within_one_step(x, bits, block_size, seed):
    q = quantize_blockwise(x, bits=bits, block_size=block_size, stochastic=True, generator=seed)
    err, scale, slack = rounding_error(x, q)
    assert bool((err <= scale + slack).all())


@PROPERTY_SETTINGS
@given(x=float_tensors(), bits=st.sampled_from([4, 8]), block_size=st.sampled_from(BLOCK_SIZES))
def test_codes_in_range_and_storage_dtypes(x, bits, block_size):
    q = quantize_blockwise(x, bits=bits, block_size=block_size)
    n = x.numel()
    assert q.shape == x.shape and q.dtype == x.dtype and q.numel() == n
    assert q.scales.dtype == torch.float32 and q.scales.shape == (math.ceil(n / block_size),)
    if bits == 8:
        assert q.codes.dtype == torch.int8 and q.codes.shape == x.shape
        codes = q.codes.reshape(-1)
    else:
        assert q.codes.dtype == torch.uint8 and q.codes.shape == ((n + 1) // 2,)
        codes = unpack_int4(q.codes, n)
    assert int(codes.abs().max()) <= QMAX[bits]


@PROPERTY_SETTINGS
@given(x=float_tensors(), bits=st.sampled_from([4, 8]), block_size=st.sampled_from(BLOCK_SIZES))
def test_dequantize_to_original_dtype_is_one_cast_of_fp32(x, bits, block_size):
    q = quantize_blockwise(x, bits=bits, block_size=block_size)
    out = q.dequantize()
    assert out.dtype == x.dtype and out.shape == x.shape
    assert torch.equal(out, q.dequantize(torch.float32).to(x.dtype))
    assert torch.equal(dequantize_blockwise(q, torch.float16), q.dequantize(torch.float16))


@PROPERTY_SETTINGS
@given(x=float_tensors(), bits=st.sampled_from([4, 8]), block_size=st.sampled_from(BLOCK_SIZES))
def test_largest_magnitude_element_round_trips(x, bits, block_size):
    """Exact in bf16/fp16; within one fp32 ulp in fp32 (two where the scale is clamped at the
    top of the fp32 range) since fl(qmax * fl(a / qmax)) is not always a."""
    q = quantize_blockwise(x, bits=bits, block_size=block_size)
    flat = x.reshape(-1)
    is_max = flat.float().abs() == block_absmax(x, block_size)
    got = q.dequantize().reshape(-1)[is_max]
    want = flat[is_max]
    if x.dtype != torch.float32:
        assert torch.equal(got, want)
    else:
        ulp = torch.finfo(torch.float32).eps * want.abs().clamp_min(torch.finfo(torch.float32).tiny)
        ulps = torch.where(per_element(q.scales, block_size, flat.numel())[is_max] == MAX_SCALE[bits], 2.0, 1.0)
        assert bool(((got - want).abs() <= ulps * ulp + 1e-44).all())


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("bits", [4, 8])
def test_zero_constant_and_single_sign_blocks(dtype, bits):
    block = 64
    x = torch.cat(
        [
            torch.zeros(block),  # all zero: scale 0, exact zeros
            torch.full((block,), -0.3125),  # constant (exactly representable in every dtype)
            torch.linspace(1.0, 2.0, block),  # single sign, positive
            -torch.linspace(0.5, 4.0, block),  # single sign, negative
            torch.tensor([0.0, 3.0, -1.5, 0.0]),  # short last block with exact zeros
        ]
    ).to(dtype)
    q = quantize_blockwise(x, bits=bits, block_size=block)
    out = q.dequantize()
    assert q.scales[0] == 0 and torch.equal(out[:block], torch.zeros(block, dtype=dtype))
    if dtype == torch.float32:  # a constant block is its own maximum: within one fp32 ulp
        assert bool(((out[block : 2 * block] - x[block : 2 * block]).abs() <= 2**-23 * 0.3125).all())
    else:
        assert torch.equal(out[block : 2 * block], x[block : 2 * block])
    assert torch.equal(out[-4:][[0, 3]], torch.zeros(2, dtype=dtype))
    err, scale, slack = rounding_error(x, q)
    # single-sign blocks: nothing lost beyond rounding, over the whole range of the block
    assert bool((err[2 * block : 4 * block] <= 0.5 * scale[2 * block : 4 * block] + slack[2 * block : 4 * block]).all())


def test_round_half_to_even():
    # absmax 127 gives scale exactly 1, so v = x and every tie is visible
    x = torch.tensor([127.0, 0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 3.49, 3.51, -126.5])
    q = quantize_blockwise(x, bits=8, block_size=10)
    assert q.scales.item() == 1.0
    assert q.codes.tolist() == [127, 0, 2, 2, 0, -2, -2, 3, 4, -126]


# ---------------------------------------------------------------------------------------------
# int4 packing
# ---------------------------------------------------------------------------------------------


@settings(max_examples=100, deadline=None)
@given(codes=st.lists(st.integers(-8, 7), min_size=0, max_size=301))
def test_pack_unpack_identity(codes):
    c = torch.tensor(codes, dtype=torch.int8)
    packed = pack_int4(c)
    assert packed.dtype == torch.uint8 and packed.shape == ((len(codes) + 1) // 2,)
    assert torch.equal(unpack_int4(packed, len(codes)), c)


def test_pack_layout_all_sixteen_codes_and_odd_padding():
    every = torch.arange(-8, 8, dtype=torch.int8)
    packed = pack_int4(every)
    # element 2i in the low nibble, 2i+1 in the high nibble, nibble = code + 8
    assert packed.tolist() == [(2 * i) | ((2 * i + 1) << 4) for i in range(8)]
    assert torch.equal(unpack_int4(packed, 16), every)
    odd = torch.tensor([-7, 7, 0], dtype=torch.int8)
    assert pack_int4(odd).tolist() == [0x1 | (0xF << 4), 0x8]  # padding is a raw zero nibble
    assert torch.equal(unpack_int4(pack_int4(odd), 3), odd)


# ---------------------------------------------------------------------------------------------
# stochastic rounding
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bits", [4, 8])
def test_stochastic_rounding_is_unbiased_and_nearest_is_not(bits):
    """Mean of many draws within 5 sigma of the mean of x; nearest rounding fails that bound.

    The block is repeated ``draws`` times (same absmax, hence the same scale), so one call with
    a fixed seed gives ``draws`` independent roundings of every element.
    """
    block, draws = 256, 4000
    qmax = QMAX[bits]
    gen = torch.Generator().manual_seed(1234)
    # v = x / scale with fractional parts in [0.2, 0.8]: nearest rounding is off by >= 0.2 step
    v = torch.randint(-qmax + 1, qmax - 1, (block,), generator=gen) + 0.2 + 0.6 * torch.rand(block, generator=gen)
    x = v / qmax
    x[0] = 1.0  # absmax 1: scale = 1 / qmax
    q = quantize_blockwise(x.repeat(draws), bits=bits, block_size=block, stochastic=True, generator=2024)
    scale = q.scales[0].double()
    mean = q.dequantize().view(draws, block).double().mean(0)
    xd = x.double()
    frac = xd / scale - torch.floor(xd / scale)
    bound = 5 * scale * torch.sqrt(frac * (1 - frac) / draws) + 2.0**-22 * xd.abs()
    assert bool(((mean - xd).abs() <= bound).all()), f"worst {((mean - xd).abs() / bound).max():.2f} x bound"
    nearest = quantize_blockwise(x, bits=bits, block_size=block).dequantize().double()
    assert bool(((nearest - xd).abs() > bound)[1:].all())


def test_stochastic_rounding_seeds():
    x = torch.randn(1000, generator=torch.Generator().manual_seed(0))
    same = [quantize_blockwise(x, 8, 64, stochastic=True, generator=7).codes for _ in range(2)]
    assert torch.equal(same[0], same[1])
    other = quantize_blockwise(x, 8, 64, stochastic=True, generator=8).codes
    assert not torch.equal(same[0], other)
    # a torch.Generator is consumed: same state, same codes; advanced state, different codes
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    a = quantize_blockwise(x, 8, 64, stochastic=True, generator=g1).codes
    b = quantize_blockwise(x, 8, 64, stochastic=True, generator=g2).codes
    c = quantize_blockwise(x, 8, 64, stochastic=True, generator=g1).codes
    assert torch.equal(a, b) and not torch.equal(a, c)
    # the global RNG when no generator is given
    state = torch.get_rng_state()
    try:
        torch.manual_seed(11)
        d = quantize_blockwise(x, 8, 64, stochastic=True).codes
        torch.manual_seed(11)
        e = quantize_blockwise(x, 8, 64, stochastic=True).codes
    finally:
        torch.set_rng_state(state)
    assert torch.equal(d, e)
    # the op's offset selects another stream; nearest rounding ignores the generator
    c0, _ = torch.ops.qgalore_fx.quantize(x, 8, 64, make_seed(3, offset=0))
    c1, _ = torch.ops.qgalore_fx.quantize(x, 8, 64, make_seed(3, offset=1))
    assert not torch.equal(c0, c1)
    n1 = quantize_blockwise(x, 8, 64, generator=1).codes
    n2 = quantize_blockwise(x, 8, 64, generator=2).codes
    assert torch.equal(n1, n2)


# ---------------------------------------------------------------------------------------------
# errors
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, exc, match",
    [
        ({"bits": 3}, ValueError, r"bits must be one of \(4, 8\)"),
        ({"bits": 16}, ValueError, "bits must be one of"),
        ({"bits": True}, ValueError, "bits must be one of"),
        ({"block_size": 0}, ValueError, "block_size must be a positive even int"),
        ({"block_size": -4}, ValueError, "block_size must be a positive even int"),
        ({"block_size": 7}, ValueError, "block_size must be a positive even int"),
        ({"block_size": 64.0}, ValueError, "block_size must be a positive even int"),
        ({"stochastic": 1}, TypeError, "stochastic must be a bool"),
        ({"check_finite": "yes"}, TypeError, "check_finite must be a bool"),
        ({"stochastic": True, "generator": 1.5}, TypeError, "generator must be None, an int seed or a torch.Generator"),
        ({"stochastic": True, "generator": 2**64}, ValueError, "generator as an int seed must fit in int64"),
    ],
)
def test_invalid_arguments(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        quantize_blockwise(torch.randn(8, 8), **kwargs)


@pytest.mark.parametrize("x", [torch.arange(8), torch.randn(8, dtype=torch.float64), [1.0, 2.0]])
def test_invalid_x_type(x):
    with pytest.raises(TypeError, match="x must"):
        quantize_blockwise(x)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_non_finite_input(bad, dtype):
    x = torch.randn(300).to(dtype)
    x[257] = bad
    with pytest.raises(ValueError, match="x contains non-finite values"):
        quantize_blockwise(x)
    quantize_blockwise(x, check_finite=False)  # the caller checked: no host sync, no error


def test_invalid_arguments_elsewhere():
    q = quantize_blockwise(torch.randn(10, 10), bits=4, block_size=4)
    with pytest.raises(TypeError, match="dtype must be"):
        q.dequantize(torch.int32)
    with pytest.raises(TypeError, match="q must be a QuantizedTensor"):
        dequantize_blockwise(torch.zeros(3))
    with pytest.raises(ValueError, match=r"codes must lie in \[-8, 7\]"):
        pack_int4(torch.tensor([8], dtype=torch.int8))
    with pytest.raises(TypeError, match="codes must be an int8 tensor"):
        pack_int4(torch.tensor([1]))
    with pytest.raises(ValueError, match="packed must hold ceil"):
        unpack_int4(torch.zeros(3, dtype=torch.uint8), 8)
    with pytest.raises(TypeError, match="packed must be a uint8 tensor"):
        unpack_int4(torch.zeros(3, dtype=torch.int8), 6)
    x = torch.randn(16)
    with pytest.raises(ValueError, match="seed must be None"):
        torch.ops.qgalore_fx.quantize(x, 8, 4, torch.tensor([1, 2, 3]))
    with pytest.raises(ValueError, match="seed must be None"):
        torch.ops.qgalore_fx.quantize(x, 8, 4, torch.tensor([1.0, 2.0]))
    codes, scales = torch.ops.qgalore_fx.quantize(x, 8, 4, None)
    with pytest.raises(ValueError, match="scales must hold 4 blocks"):
        torch.ops.qgalore_fx.dequantize(codes, scales[:3], 8, 4, [16], torch.float32)
    with pytest.raises(TypeError, match="codes must have dtype torch.uint8 for bits=4"):
        torch.ops.qgalore_fx.dequantize(codes, scales, 4, 4, [16], torch.float32)
    with pytest.raises(ValueError, match="codes must hold 20 elements"):
        torch.ops.qgalore_fx.dequantize(codes, scales, 8, 4, [4, 5], torch.float32)


# ---------------------------------------------------------------------------------------------
# storage
# ---------------------------------------------------------------------------------------------


def test_byte_accounting_4096_squared():
    x = torch.randn(4096, 4096)
    n = x.numel()
    q8 = quantize_blockwise(x, bits=8, block_size=256)
    q4 = quantize_blockwise(x, bits=4, block_size=256)
    assert q8.nbytes == n + 4 * n // 256 and q8.codes.element_size() == 1
    assert q4.nbytes == n // 2 + 4 * n // 256 and q4.codes.numel() == n // 2
    assert q8.nbytes / n <= 1.02
    assert q4.nbytes / n <= 0.52


def test_quantized_tensor_methods():
    x = torch.randn(3, 5, dtype=torch.bfloat16)
    q = quantize_blockwise(x, bits=4, block_size=4)
    moved = q.to("cpu")
    assert isinstance(moved, QuantizedTensor) and torch.equal(moved.dequantize(), q.dequantize())
    assert q.numel() == 15 and q.device == torch.device("cpu")
    assert "bits=4" in repr(q) and "nbytes=" in repr(q)
    empty = quantize_blockwise(torch.zeros(0, 4))
    assert empty.dequantize().shape == (0, 4) and empty.nbytes == 0
    scalar = quantize_blockwise(torch.tensor(2.5))
    assert scalar.dequantize().shape == () and scalar.dequantize().item() == 2.5


def test_reference_functions_match_the_ops():
    x = torch.randn(7, 9)
    seed = make_seed(99)
    for bits in (4, 8):
        ref = quantize_reference(x, bits, 6, seed)
        op = torch.ops.qgalore_fx.quantize(x, bits, 6, seed)
        assert all(torch.equal(a, b) for a, b in zip(ref, op))
        deq = dequantize_reference(*ref, bits, 6, [7, 9], torch.bfloat16)
        assert torch.equal(deq, torch.ops.qgalore_fx.dequantize(*op, bits, 6, [7, 9], torch.bfloat16))


# ---------------------------------------------------------------------------------------------
# custom ops: registration, fake tensors, torch.compile
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bits", [4, 8])
def test_opcheck(bits):
    x = torch.randn(5, 13)
    torch.library.opcheck(torch.ops.qgalore_fx.quantize.default, (x, bits, 6, None))
    torch.library.opcheck(torch.ops.qgalore_fx.quantize.default, (x, bits, 6, make_seed(1)))
    codes, scales = torch.ops.qgalore_fx.quantize(x, bits, 6, None)
    torch.library.opcheck(torch.ops.qgalore_fx.dequantize.default, (codes, scales, bits, 6, [5, 13], torch.float16))


def _quantize_dequantize(x, seed):
    c8, s8 = torch.ops.qgalore_fx.quantize(x, 8, 64, seed)
    c4, s4 = torch.ops.qgalore_fx.quantize(x * 2, 4, 32, seed)
    a = torch.ops.qgalore_fx.dequantize(c8, s8, 8, 64, list(x.shape), torch.float32)
    b = torch.ops.qgalore_fx.dequantize(c4, s4, 4, 32, list(x.shape), torch.bfloat16)
    return a - b.float(), c8, c4


@pytest.mark.parametrize("stochastic", [False, True])
def test_ops_under_torch_compile_match_eager(stochastic):
    torch._dynamo.reset()
    x = torch.randn(33, 70)
    seed = make_seed(42) if stochastic else None
    compiled = torch.compile(_quantize_dequantize, backend="inductor", fullgraph=True)
    for got, want in zip(compiled(x, seed), _quantize_dequantize(x, seed)):
        assert torch.equal(got, want)


def test_public_api_under_torch_compile():
    torch._dynamo.reset()

    def round_trip(x):
        return quantize_blockwise(x, bits=8, block_size=64, check_finite=False).dequantize() * 3

    x = torch.randn(20, 30)
    assert torch.equal(torch.compile(round_trip, backend="inductor", fullgraph=True)(x), round_trip(x))


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("block_size", [2, 6, 64])
def test_reference_chunking_is_invisible(monkeypatch, bits, block_size):
    """The reference works in chunks of REFERENCE_CHUNK elements; results must not depend on it."""
    import qgalore_fx.kernels.quant as quant

    x = torch.randn(3, 1001, generator=torch.Generator().manual_seed(4)).to(torch.bfloat16)
    x[1, :500] = 0
    whole = quantize_reference(x, bits, block_size)
    deq_whole = dequantize_reference(*whole, bits, block_size, [3, 1001], torch.float32)
    monkeypatch.setattr(quant, "REFERENCE_CHUNK", 100)  # many chunks, a ragged last one
    chunked = quantize_reference(x, bits, block_size)
    assert torch.equal(whole[0], chunked[0]) and torch.equal(whole[1], chunked[1])
    assert torch.equal(deq_whole, dequantize_reference(*chunked, bits, block_size, [3, 1001], torch.float32))
    err, scale, slack = rounding_error(x, QuantizedTensor(*chunked, x.shape, x.dtype, bits, block_size))
    assert bool((err <= 0.5 * scale + slack).all())
    sr = quantize_reference(x, bits, block_size, make_seed(1))
    err, scale, slack = rounding_error(x, QuantizedTensor(*sr, x.shape, x.dtype, bits, block_size))
    assert bool((err <= scale + slack).all())


@settings(max_examples=60, deadline=None)
@given(n=st.integers(0, 3000), where=st.integers(0, 10**6), value=st.sampled_from(
    [math.nan, math.inf, -math.inf, 3.0e38, -3.0e38, 0.0, 1e-45]),
    dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float64]))
def test_all_finite_agrees_with_isfinite(n, where, value, dtype):
    from qgalore_fx.kernels import all_finite

    t = torch.randn(n, generator=torch.Generator().manual_seed(n)).to(dtype)
    if n:
        t[where % n] = value
    got = all_finite(t)
    assert got.dtype == torch.bool and got.dim() == 0
    assert bool(got) == bool(torch.isfinite(t).all())
    assert bool(all_finite(torch.zeros(3, dtype=torch.int64)))  # integers are always finite


def test_the_reference_noise_is_a_uniform_hash_of_each_elements_counter(monkeypatch):
    """``sr_noise``: uniform on the multiples of 2^-24 (chi-square over 64 bins, lag-1 correlation), a function of
    ``offset + index`` only (so the codes do not depend on the reference's chunking), and the counter's high word
    matters (offsets 2^32 apart draw differently)."""
    from qgalore_fx.kernels import quant

    key = quant.noise_key(make_seed(42, offset=5), "cpu")
    u = quant.sr_noise(torch.arange(1 << 20), key)
    assert u.dtype == torch.float32 and float(u.min()) >= 0.0 and float(u.max()) < 1.0
    assert torch.equal(u * 2**24, (u * 2**24).floor())
    counts = torch.bincount((u * 64).long(), minlength=64).double()
    chi2 = float(((counts - counts.mean()) ** 2 / counts.mean()).sum())
    assert chi2 < 120.0  # 63 degrees of freedom: p < 1e-5 above 120
    assert abs(float(torch.corrcoef(torch.stack([u[:-1], u[1:]]).double())[0, 1])) < 0.01
    shifted = quant.sr_noise(torch.arange(1000, 2000), quant.noise_key(make_seed(42, offset=0), "cpu"))
    assert torch.equal(shifted, quant.sr_noise(torch.arange(995, 1995), key))  # 5 + 995 + i = 0 + 1000 + i
    far = quant.sr_noise(torch.arange(4096), quant.noise_key(make_seed(42, offset=5 + (1 << 32)), "cpu"))
    assert float((far == u[:4096]).double().mean()) < 0.01
    x = torch.randn(3000, generator=torch.Generator().manual_seed(1))
    whole = quantize_reference(x, 8, 64, make_seed(3, offset=7))
    monkeypatch.setattr(quant, "REFERENCE_CHUNK", 256)  # 12 chunks instead of one
    assert all(torch.equal(a, b) for a, b in zip(whole, quantize_reference(x, 8, 64, make_seed(3, offset=7))))
