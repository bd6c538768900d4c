"""Tests for qgalore_fx.kernels.adam8bit: 8-bit block-wise Adam state and update.

Tolerances used below, and why:

* 8-bit vs fp32 Adam, 40 steps, lr 1e-3: displacement relative error
  ``|Δp8 - Δp32| / |Δp32| <= 0.03`` (measured 0.011-0.016), per-step direction
  relative error ``<= 0.06`` (measured <= 0.034), and elements off by more
  than 2.5 steps (2.5·lr) at most 0.1 % + 1 (measured 0).
* torch reference vs bitsandbytes on CPU, one step from the same state:
  N bit-equal, absmax bit-equal; codes may differ because bitsandbytes' CPU
  quantizer is not exactly nearest (docs/8bit-moments.md): each bitsandbytes
  value must be within 2^-14·absmax of the nearest one (measured ≤ 3.1e-5),
  the reference must be nearest, and >= 95 % of codes identical (measured
  >= 99.8 %). AdamW parameters: within 2 ulp of max(|p|, lr) (measured <= 1.7).
* 32-bit vs torch.optim: rtol 1e-5, atol 1e-7 after 20 steps.

Where the reference deliberately differs from nearest rounding (and from
bitsandbytes): a positive second moment never takes the zero code, it takes
code 1 (docs/8bit-moments.md, "Second moments never round to
zero"); bitsandbytes' CPU library takes code 7 there, its CUDA kernel may
take 0, and the bitsandbytes backend applies the same floor after the
kernel. The one-step agreement tests still hold as stated: the floored code
is still at least as close to the fp32 value as bitsandbytes' CPU choice.
The floor's own tests are at the end of the "torch reference vs
bitsandbytes" section; tests/test_moments.py runs it through the optimizer.

The two backends are tests/adam_peers.py: the library's masked entry points
(the pure-torch reference, every update applied) and bitsandbytes' kernels.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from adam_peers import BACKENDS, adam_direction, adamw_step
from qgalore_fx.kernels import adam8bit as A
from qgalore_fx.kernels import fastpath
from qgalore_fx.kernels.adam8bit import (
    AdamState,
    adam_direction_masked_,
    adamw_masked_,
    dequantize_blockwise_dynamic,
    dynamic_map,
    quantize_blockwise_dynamic,
)

bnb_functional = pytest.importorskip("bitsandbytes.functional")

AWKWARD_SHAPES = [(4097,), (33, 70), (7, 9), (300,)]


def make_case(shape, seed=0, drift=0.5, scale=0.01, steps=1):
    """Deterministic (p0, gradients) for a shape: noise plus a fixed drift, like a slowly moving loss."""
    gen = torch.Generator().manual_seed(seed)
    p0 = torch.randn(shape, generator=gen)
    bias = torch.randn(shape, generator=gen)
    grads = [scale * (torch.randn(shape, generator=gen) + drift * bias) for _ in range(steps)]
    return p0, grads


def warm_state(shape, bits=8, steps=3, seed=1):
    """A state with non-trivial moments (after ``steps`` reference updates)."""
    state = AdamState.zeros(shape, bits=bits, min_8bit_size=0)
    _, grads = make_case(shape, seed=seed, steps=steps)
    for t, g in enumerate(grads, 1):
        adam_direction(g, state, t, backend="torch")
    return state


# --------------------------------------------------------------------------- maps and quantization
@pytest.mark.parametrize("signed", [True, False])
def test_maps_equal_bitsandbytes(signed):
    qmap = dynamic_map(signed)
    assert torch.equal(qmap, bnb_functional.create_dynamic_map(signed=signed))
    assert qmap.numel() == 256 and qmap.unique().numel() == 256
    assert torch.all(qmap[1:] > qmap[:-1])
    assert qmap[-1] == 1.0 and (qmap == 0).sum() == 1
    assert qmap[0] == (pytest.approx(-0.99297, abs=1e-5) if signed else 0.0)


def _special_values(signed):
    mid = A._cached_map(signed, "cpu")[1]
    qmap = dynamic_map(signed)
    up, down = torch.tensor(2.0), torch.tensor(-2.0)
    vals = [mid, qmap, torch.nextafter(mid, up), torch.nextafter(mid, down),
            torch.tensor([0.0, -0.0, 1.0, -1.0, 1e-30, -1e-30, 1e-45, -1e-45, 1e-7, -1e-7])]
    return torch.cat(vals)


@pytest.mark.parametrize("signed", [True, False])
def test_lookup_search_equals_bucketize(signed):
    mid = A._cached_map(signed, "cpu")[1]
    gen = torch.Generator().manual_seed(0)
    mags = torch.rand(200_000, generator=gen) * 2 - 1
    logs = torch.logspace(-12, 0, 100_000) * torch.sign(torch.randn(100_000, generator=gen))
    for x in (_special_values(signed), mags, logs):
        expect = torch.bucketize(x, mid, out_int32=True).to(torch.uint8)
        assert torch.equal(A._nearest_code(x.contiguous(), signed), expect)


_floats = st.floats(min_value=-1e6, max_value=1e6, allow_nan=False, width=32)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    values=st.lists(_floats, min_size=1, max_size=700),
    signed=st.booleans(),
    block_size=st.sampled_from([16, 64, 256]),
    exponent=st.integers(min_value=-130, max_value=10),
)
def test_roundtrip_error_bounded_per_block(values, signed, block_size, exponent):
    x = torch.tensor(values, dtype=torch.float32) * 2.0**exponent
    if not signed:
        x = x.abs()
    codes, absmax = quantize_blockwise_dynamic(x, signed, block_size)
    y = dequantize_blockwise_dynamic(codes, absmax, signed, block_size)
    assert codes.dtype == torch.uint8 and codes.shape == x.shape
    n_blocks = -(-x.numel() // block_size)
    padded = torch.nn.functional.pad(x, (0, n_blocks * block_size - x.numel()))
    assert torch.equal(absmax, padded.view(n_blocks, block_size).abs().amax(1))  # exact absmax
    scale = absmax.repeat_interleave(block_size)[: x.numel()]
    qmap = dynamic_map(signed)
    gaps = torch.cat([qmap[1:] - qmap[:-1], (qmap[:1] + 1.0) * 2 if signed else torch.zeros(1)])
    delta = float(gaps.max()) / 2  # worst half-gap, including -1 -> -0.993 on the signed map
    err = (y - x).abs()
    ulp = torch.finfo(torch.float32).eps * scale  # fp32 rounding of qmap[code] * absmax
    assert torch.all(err <= delta * scale + 2 * ulp)
    # nearest: no map value is closer than the chosen one (up to fp32 rounding of the scaling)
    best = (qmap[None, :] * scale[:, None] - x[:, None]).abs().min(1).values
    assert torch.all(err <= best + 2 * ulp)
    assert torch.all(y[scale == 0] == 0)  # all-zero blocks come back as zeros


def test_constant_and_zero_blocks():
    x = torch.cat([torch.full((256,), 3.5), torch.zeros(256), torch.full((10,), -2.0)])
    codes, absmax = quantize_blockwise_dynamic(x, True)
    y = dequantize_blockwise_dynamic(codes, absmax, True)
    assert torch.equal(absmax, torch.tensor([3.5, 0.0, 2.0]))
    assert torch.equal(y[:512], x[:512])  # +absmax and 0 are map values
    assert torch.allclose(y[512:], x[512:], rtol=0.0071)  # -1 is not: -0.993
    assert torch.all(codes[256:512] == 127)


# --------------------------------------------------------------------------- AdamState
def test_zeros_layout_and_exact_bytes():
    s = AdamState.zeros((4097,), bits=8)
    assert s.bits == 8 and s.m.dtype == torch.uint8 and s.m.shape == (4097,)
    assert s.absmax_m.shape == (17,) and s.absmax_v.shape == (17,)
    assert s.nbytes == 2 * 4097 + 2 * 17 * 4
    assert torch.all(dequantize_blockwise_dynamic(s.m, s.absmax_m, True) == 0)
    s32 = AdamState.zeros((33, 70), bits=32)
    assert s32.bits == 32 and s32.nbytes == 2 * 33 * 70 * 4 and s32.absmax_m is None
    assert "bits=8" in repr(s) and "nbytes=8330" in repr(s)


def test_min_8bit_size_rule():
    assert AdamState.zeros((64, 64), bits=8).bits == 8  # 4096 elements: not below the threshold
    assert AdamState.zeros((4095,), bits=8).bits == 32
    assert AdamState.zeros((4095,), bits=8, min_8bit_size=0).bits == 8
    assert AdamState.zeros((3, 5), bits=8, min_8bit_size=0).absmax_m.shape == (1,)
    assert AdamState.zeros((10_000,), bits=8, min_8bit_size=20_000).bits == 32


@pytest.mark.parametrize("bits", [8, 32])
@pytest.mark.parametrize("backend", BACKENDS)
def test_state_dict_roundtrip_continues_bit_identically(bits, backend):
    from safetensors.torch import load, save

    shape = (33, 70)
    p0, grads = make_case(shape, steps=7)
    p, state = p0.clone(), AdamState.zeros(shape, bits=bits, min_8bit_size=0)
    for t in range(1, 4):
        adamw_step(p, grads[t - 1], state, t, lr=1e-3, weight_decay=0.01, backend=backend)
    blob = save(state.state_dict())
    loaded = AdamState.from_state_dict(load(blob))
    assert loaded.bits == bits and loaded.shape == state.shape and loaded.nbytes == state.nbytes
    p2 = p.clone()
    for t in range(4, 8):
        adamw_step(p, grads[t - 1], state, t, lr=1e-3, weight_decay=0.01, backend=backend)
        adamw_step(p2, grads[t - 1], loaded, t, lr=1e-3, weight_decay=0.01, backend=backend)
    assert torch.equal(p, p2)
    for k, t in state.tensors().items():
        assert torch.equal(t, loaded.tensors()[k]), k


def test_state_dict_is_tensors_only_and_from_state_dict_copies():
    s = warm_state((300,))
    d = s.state_dict()
    assert all(isinstance(v, torch.Tensor) for v in d.values())
    assert next(iter(d)) == "m"  # first tensor lives on the state's device
    t = AdamState.from_state_dict(d)
    t.m.zero_()
    assert not torch.equal(s.m, t.m)
    with pytest.raises(ValueError, match="absmax_v"):
        AdamState.from_state_dict({k: v for k, v in d.items() if k != "absmax_v"})


def test_to_and_shapes_without_elements():
    s = warm_state((300,))
    assert s.to("cpu") is s
    meta = s.to("meta")
    assert meta.device.type == "meta" and meta.nbytes == s.nbytes
    scalar = AdamState.zeros((), bits=8, min_8bit_size=0)
    n = adam_direction(torch.tensor(0.5), scalar, 1, backend="torch")
    assert n.shape == () and n.item() == pytest.approx(1.0, rel=1e-6)
    empty = AdamState.zeros((0, 8), bits=8, min_8bit_size=0)
    assert adam_direction(torch.zeros(0, 8), empty, 1).shape == (0, 8)


# --------------------------------------------------------------------------- 8-bit tracks fp32 Adam
@pytest.mark.parametrize("shape", AWKWARD_SHAPES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_8bit_tracks_fp32_adam(shape, backend):
    steps, lr = 40, 1e-3
    p0, grads = make_case(shape, steps=steps)
    p8, p32 = p0.clone(), p0.clone()
    s8 = AdamState.zeros(shape, bits=8, min_8bit_size=0)
    s32 = AdamState.zeros(shape, bits=32)
    assert s8.bits == 8
    worst_direction = 0.0
    for t, g in enumerate(grads, 1):
        n8 = adam_direction(g, s8, t, backend=backend)
        n32 = adam_direction(g, s32, t, backend="torch")
        worst_direction = max(worst_direction, float((n8 - n32).norm() / n32.norm()))
        p8.sub_(lr * n8)
        p32.sub_(lr * n32)
    d8, d32 = p8 - p0, p32 - p0
    assert float((d8 - d32).norm() / d32.norm()) <= 0.03
    assert worst_direction <= 0.06
    large = int(((p8 - p32).abs() > 2.5 * lr).sum())
    assert large <= 0.001 * p0.numel() + 1


# --------------------------------------------------------------------------- torch reference vs bitsandbytes
@pytest.mark.parametrize("shape", [(4097,), (33, 70), (5,), (1024, 64)])
def test_reference_matches_bitsandbytes_one_step(shape):
    state = warm_state(shape)
    ref, bnb = state.clone(), state.clone()
    g = make_case(shape, seed=7)[1][0]
    step = 4
    n_ref = adam_direction(g, ref, step, backend="torch")
    n_bnb = adam_direction(g, bnb, step, backend="bitsandbytes")
    assert torch.equal(n_ref, n_bnb)
    assert torch.equal(ref.absmax_m, bnb.absmax_m) and torch.equal(ref.absmax_v, bnb.absmax_v)

    # the fp32 moments both backends quantized
    m = dequantize_blockwise_dynamic(state.m, state.absmax_m, True)
    v = dequantize_blockwise_dynamic(state.v, state.absmax_v, False)
    A._adam_fp32_(m, v, g, step, 0.9, 0.999, 1e-8)
    scale = ref.absmax_m.repeat_interleave(256)[: m.numel()].view(m.shape)
    err_ref = (dequantize_blockwise_dynamic(ref.m, ref.absmax_m, True) - m).abs()
    err_bnb = (dequantize_blockwise_dynamic(bnb.m, ref.absmax_m, True) - m).abs()
    assert torch.all(err_ref <= err_bnb + 1e-7 * scale)  # the reference's m is nearest
    assert torch.all(err_bnb <= err_ref + 2.0**-14 * scale)  # bitsandbytes is nearly nearest
    assert float((ref.m == bnb.m).float().mean()) >= 0.95
    # v is rounded stochastically: to one of the two map values around it (up to the zero-code floor), and so
    # within one code of bitsandbytes' nearly nearest choice
    qmap = A.dynamic_map(False)
    a = ref.absmax_v.repeat_interleave(256)[: v.numel()].view(v.shape)
    code = ref.v.long()
    below = qmap[(code - 1).clamp(min=0)] * a
    above = qmap[(code + 1).clamp(max=255)] * a
    assert torch.all((below <= v * (1 + 1e-6)) & (v <= above * (1 + 1e-6)) | (code == 1))
    assert torch.all(((ref.v.int() - bnb.v.int()).abs() <= 1) | (bnb.v == 7))


@pytest.mark.parametrize("bits", [8, 32])
@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_adamw_step_matches_bitsandbytes_one_step(bits, weight_decay):
    shape = (4097,)
    state = warm_state(shape, bits=bits)
    p0, (g,) = make_case(shape, seed=3)
    p_ref, p_bnb = p0.clone(), p0.clone()
    s_ref, s_bnb = state.clone(), state.clone()
    adamw_step(p_ref, g, s_ref, 4, lr=1e-2, weight_decay=weight_decay, backend="torch")
    adamw_step(p_bnb, g, s_bnb, 4, lr=1e-2, weight_decay=weight_decay, backend="bitsandbytes")
    # 2 ulp of the larger of the parameter (before/after) and the step (measured <= 1.7)
    ulp = torch.finfo(torch.float32).eps * (torch.maximum(p0.abs(), p_ref.abs()) + 1e-2)
    assert torch.all((p_ref - p_bnb).abs() <= 2 * ulp)
    assert (p_ref - p0).abs().min() > 0
    if bits == 32:
        assert torch.equal(s_ref.m, s_bnb.m) and torch.equal(s_ref.v, s_bnb.v)


@pytest.mark.parametrize("shape", [(4097,), (33, 70)])
def test_reference_and_bitsandbytes_trajectories_agree(shape):
    steps, lr = 20, 1e-3
    p0, grads = make_case(shape, steps=steps)
    ps = {b: p0.clone() for b in BACKENDS}
    states = {b: AdamState.zeros(shape, bits=8, min_8bit_size=0) for b in BACKENDS}
    for t, g in enumerate(grads, 1):
        for b in BACKENDS:
            adamw_step(ps[b], g, states[b], t, lr=lr, weight_decay=0.01, backend=b)
    d_ref, d_bnb = ps["torch"] - p0, ps["bitsandbytes"] - p0
    assert float((d_ref - d_bnb).norm() / d_ref.norm()) <= 1e-2  # v rounded stochastically here: 6.7e-3


@pytest.mark.parametrize("bits", [8, 32])
def test_bitsandbytes_path_moves_weights(bits):
    """Guard against a silent no-op (e.g. arguments passed to bitsandbytes in the wrong order)."""
    shape, lr = (4097,), 1e-3
    p0, (g,) = make_case(shape, seed=5)
    state = AdamState.zeros(shape, bits=bits)
    n = adam_direction(g, state.clone(), 1, backend="bitsandbytes")
    # step 1: N = g / (|g| + eps), i.e. sign(g) up to eps / |g|
    assert torch.allclose(n, g / (g.abs() + 1e-8), rtol=1e-5, atol=0)
    p = p0.clone()
    adamw_step(p, g, state, 1, lr=lr, backend="bitsandbytes")
    moved = p0 - p
    assert torch.all(moved != 0)
    ulp = torch.finfo(torch.float32).eps * p0.abs().clamp_min(lr)
    assert torch.all((moved - lr * g / (g.abs() + 1e-8)).abs() <= 2 * ulp)
    if bits == 8:
        assert torch.all(state.absmax_m > 0) and torch.all(state.absmax_v > 0)


def test_bitsandbytes_does_not_modify_shared_maps():
    before = [dynamic_map(True).clone(), dynamic_map(False).clone()]
    s = AdamState.zeros((1000,), min_8bit_size=0)
    adam_direction(torch.randn(1000), s, 1, backend="bitsandbytes")
    assert torch.equal(dynamic_map(True), before[0]) and torch.equal(dynamic_map(False), before[1])


def test_positive_second_moment_never_takes_the_zero_code():
    """v over 14 decades inside each block: positive v gets code >= 1, zero v code 0, m never flips sign."""
    shape = (4, 256)
    g = torch.logspace(-7, 0, 256).repeat(4, 1) * torch.tensor([1.0, -1.0]).repeat(512)[: 1024].view(shape)
    g[1, :10] = 0.0  # elements that never saw a gradient keep v = 0 exactly
    state = AdamState.zeros(shape, bits=8, min_8bit_size=0)
    m = torch.zeros(shape)
    v = torch.zeros(shape)
    for t in range(1, 4):
        A._adam_fp32_(m, v, g, t, 0.9, 0.999, 1e-8)
        adam_direction(g, state, t, backend="torch")
    ratio = v / v.amax(1, keepdim=True)
    assert float(ratio[g != 0].min()) < 1.6e-7  # the smallest would round to 0 by nearest
    assert torch.all(state.v[v > 0] >= 1) and torch.all(state.v[v == 0] == 0)
    assert torch.all(state.v[(ratio > 0) & (ratio < 1.6e-7)] == 1)  # the floor is the smallest positive code
    m_deq = dequantize_blockwise_dynamic(state.m, state.absmax_m, True)
    assert torch.all(m_deq.sign() * m.sign() >= 0)
    # away from the floor, v is rounded stochastically: within one code of the nearest
    nearest, _ = quantize_blockwise_dynamic(v, False)
    above = ratio >= 1.625e-7
    assert int((state.v[above].int() - nearest[above].int()).abs().max()) <= 1


def test_bitsandbytes_backend_floors_a_zero_v_code_after_the_kernel(monkeypatch):
    """bitsandbytes' CUDA kernel can write v code 0 while m survives; the backend lifts such codes to 1.

    On CPU bitsandbytes floors these values itself, so the kernel is wrapped to write code 0 as the CUDA kernel
    may: code 0 next to a non-zero m becomes 1, code 0 next to a zero m stays 0.
    """
    real = bnb_functional.optimizer_update_8bit_blockwise

    def like_cuda(**kw):
        real(**kw)
        kw["state2"][:100] = 0
        kw["state1"][50:100] = A._zero_code(True)

    monkeypatch.setattr(bnb_functional, "optimizer_update_8bit_blockwise", like_cuda)
    state = AdamState.zeros((4097,), bits=8)
    adam_direction(make_case((4097,))[1][0], state, 1, backend="bitsandbytes")
    assert torch.all(state.v[:50] == 1) and torch.all(state.v[50:100] == 0)
    assert torch.all(state.v[100:] >= 1)


# --------------------------------------------------------------------------- 32-bit vs torch.optim
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_32bit_equals_torch_optim(backend, weight_decay):
    shape, steps, lr = (33, 70), 20, 1e-2
    p0, grads = make_case(shape, steps=steps)
    ref = torch.nn.Parameter(p0.clone())
    opt_cls = torch.optim.AdamW if weight_decay else torch.optim.Adam
    opt = opt_cls([ref], lr=lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=weight_decay, foreach=False)
    p, state = p0.clone(), AdamState.zeros(shape, bits=32)
    for t, g in enumerate(grads, 1):
        ref.grad = g.clone()
        opt.step()
        adamw_step(p, g, state, t, lr=lr, weight_decay=weight_decay, backend=backend)
    torch.testing.assert_close(p, ref.detach(), rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(state.m, opt.state[ref]["exp_avg"], rtol=1e-5, atol=1e-9)
    torch.testing.assert_close(state.v, opt.state[ref]["exp_avg_sq"], rtol=1e-5, atol=1e-12)


# --------------------------------------------------------------------------- argument forms
@pytest.mark.parametrize("bits", [8, 32])
def test_tensor_step_and_lr_equal_python_numbers(bits):
    shape = (4097,)
    p0, grads = make_case(shape, steps=3)
    a, b = p0.clone(), p0.clone()
    sa = AdamState.zeros(shape, bits=bits)
    sb = sa.clone()
    for t, g in enumerate(grads, 1):
        adamw_step(a, g, sa, t, lr=1e-3, weight_decay=0.1, backend="torch")
        adamw_step(b, g, sb, torch.tensor(t), lr=torch.tensor(1e-3), weight_decay=0.1, backend="torch")
    assert torch.equal(a, b)
    c = p0.clone()
    sc = AdamState.zeros(shape, bits=bits)
    for t, g in enumerate(grads, 1):
        adamw_step(c, g, sc, torch.tensor(t), lr=torch.tensor(1e-3), backend="bitsandbytes")
    assert (c - p0).abs().min() > 0


@pytest.mark.slow
def test_torch_backend_compiles_without_recompiling_per_step(monkeypatch):
    """fullgraph compile with step and lr as 0-d tensors: one graph for all steps, same codes as eager.

    The references are forced (QGALORE_FX_REFERENCE=1): the eager side must not compile the fused fast path,
    whose own graph would be counted too (the fast path is tested against the reference elsewhere).
    """
    import torch._dynamo

    monkeypatch.setenv("QGALORE_FX_REFERENCE", "1")

    shape = (300,)

    def step_fn(p, g, state, step, lr):
        adamw_step(p, g, state, step, lr, weight_decay=0.01, backend="torch")

    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()  # reset() keeps the counters: earlier tests' graphs would count
    compiled = torch.compile(step_fn, fullgraph=True, dynamic=False)
    p0, grads = make_case(shape, steps=3)
    pe, pc = p0.clone(), p0.clone()
    se, sc = AdamState.zeros(shape, min_8bit_size=0), AdamState.zeros(shape, min_8bit_size=0)
    try:
        for t, g in enumerate(grads, 1):
            step_fn(pe, g, se, torch.tensor(t), torch.tensor(1e-3))
            compiled(pc, g, sc, torch.tensor(t), torch.tensor(1e-3))
        frames = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    finally:
        torch._dynamo.reset()
    assert frames == 1
    torch.testing.assert_close(pc, pe, rtol=0, atol=4 * torch.finfo(torch.float32).eps)
    # inductor may round N differently by an ulp; codes may then differ at a midpoint, by one
    assert int((sc.m.int() - se.m.int()).abs().max()) <= 1 and int((sc.v.int() - se.v.int()).abs().max()) <= 1
    assert torch.equal(sc.v[256:], se.v[256:])  # the short last block is compiled like the others


@pytest.mark.parametrize("n", [300, 256 * 3 + 1])
def test_stochastic_v_codes_compile_to_the_eager_codes_in_a_short_last_block(n):
    """The rounding draws are integer hashes and the threshold the same IEEE ops in the same order, so compiled
    and eager codes are equal, the short last block included (an element-to-block index compiled by inductor into
    a loop that stopped at the last whole block once left that block's codes uninitialized)."""
    import torch._dynamo

    gen = torch.Generator().manual_seed(3)
    v = torch.rand(n, generator=gen) ** 4 * 1e-4
    nearest, absmax = quantize_blockwise_dynamic(v, False)

    def codes(v, nearest, absmax, step):
        return A._stochastic_v_codes_of(v, nearest, absmax, 256, step, 5)

    torch._dynamo.reset()
    try:
        compiled = torch.compile(codes, fullgraph=True, dynamic=False)
        for t in (1, 2, 7):
            eager = codes(v, nearest, absmax, torch.tensor(t))
            assert torch.equal(compiled(v, nearest, absmax, torch.tensor(t)), eager), t
    finally:
        torch._dynamo.reset()


def test_zero_gradient_blocks_stay_finite():
    shape = (600,)
    s = AdamState.zeros(shape, min_8bit_size=0)
    g = torch.zeros(shape)
    g[300:] = 1e-3
    for t in range(1, 4):
        n = adam_direction(g, s, t, backend="torch")
    assert torch.all(n[:256] == 0) and torch.isfinite(n).all()
    assert s.absmax_m[0] == 0 and torch.all(s.m[:256] == 127) and torch.all(s.v[:256] == 0)


# --------------------------------------------------------------------------- errors
def _ok():
    return torch.tensor(True)


@pytest.mark.parametrize(
    "kwargs, name",
    [
        (dict(grad=torch.zeros(11)), "grad shape"),
        (dict(impl="cuda"), "impl"),
        (dict(ok=torch.tensor([True, False])), "ok"),
        (dict(ok=torch.tensor(1.0)), "ok"),
    ],
)
def test_direction_errors_name_the_argument(kwargs, name):
    args = dict(grad=torch.zeros(10), state=AdamState.zeros((10,)), step=torch.tensor(1), beta1=0.9, beta2=0.999,
                eps=1e-8, ok=_ok())
    args.update(kwargs)
    with pytest.raises(ValueError, match=name):
        adam_direction_masked_(**args)


@pytest.mark.parametrize(
    "kwargs, name",
    [
        (dict(p32=torch.zeros(10, dtype=torch.float64)), "p32"),
        (dict(p32=torch.zeros(12)), "p32"),
        (dict(p32=torch.zeros(20)[::2]), "p32"),
        (dict(grad=torch.zeros(12)), "grad shape"),
    ],
)
def test_adamw_errors_name_the_argument(kwargs, name):
    args = dict(p32=torch.zeros(10), grad=torch.zeros(10), state=AdamState.zeros((10,)), step=torch.tensor(1),
                ok=_ok(), lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0)
    args.update(kwargs)
    with pytest.raises(ValueError, match=name):
        adamw_masked_(**args)


def test_state_errors_name_the_argument():
    with pytest.raises(ValueError, match="bits"):
        AdamState.zeros((10,), bits=16)
    with pytest.raises(ValueError, match="block_size"):
        AdamState.zeros((10,), block_size=0)
    with pytest.raises(ValueError, match="min_8bit_size"):
        AdamState.zeros((10,), min_8bit_size=-1)
    s = AdamState.zeros((300,), block_size=128, min_8bit_size=0)
    with pytest.raises(ValueError, match="block_size"):
        adam_direction(torch.zeros(300), s, 1, backend="bitsandbytes")
    assert math.isfinite(float(adam_direction(torch.ones(300), s, 1, backend="torch").sum()))


# --------------------------------------------------------------------------- fused step (torch.compile) vs reference
# The fused step is the reference's math compiled by inductor; it differs from the eager reference only in float
# rounding (docs/8bit-moments.md, "The fused step"): eager torch.sqrt on CPU is not correctly rounded, the compiled
# one is, and eager may fuse a multiply-add (m*b1 + g*(1-b1) with float betas, addcmul in v) that the compiled code
# rounds in two steps. So from the same state, one step (bounds; measured over 5 seeds x 4 shapes in brackets):
# * |N_fused - N_ref| <= 4 eps max|N_ref|                                      [<= 2.4 eps]
# * codes at most one apart, in under 0.1 % of elements                        [<= 0.0015 %]
# * absmax within one ulp                                                      [< 1 ulp]
# * tensor betas (the projected layers' path): m codes and absmax_m bit-equal  [always]
FUSED_SHAPES = [(4097,), (33, 70), (1024, 64), (300,)]


def _masked(grad, state, step, impl, tensor_betas):
    betas = (torch.tensor(0.9, dtype=torch.float64), torch.tensor(0.999, dtype=torch.float64),
             torch.tensor(1e-8, dtype=torch.float64)) if tensor_betas else (0.9, 0.999, 1e-8)
    return A.adam_direction_masked_(grad, state, torch.tensor(step), *betas, torch.tensor(True), impl=impl)


def _ulps(a, b):
    return ((a - b).abs() / (torch.finfo(torch.float32).eps * torch.maximum(a.abs(), b.abs()).clamp_min(1e-30)))


@pytest.mark.parametrize("shape", FUSED_SHAPES)
@pytest.mark.parametrize("tensor_betas", [True, False])
def test_fused_step_matches_reference_one_step(shape, tensor_betas):
    state = warm_state(shape)
    ref, fused = state.clone(), state.clone()
    g = make_case(shape, seed=7)[1][0]
    n_ref = _masked(g, ref, 4, "reference", tensor_betas)
    n_fused = _masked(g, fused, 4, "fused", tensor_betas)
    assert n_fused.shape == n_ref.shape and n_fused.dtype == torch.float32
    eps = torch.finfo(torch.float32).eps
    assert float((n_fused - n_ref).abs().max()) <= 4 * eps * float(n_ref.abs().max())
    for name in ("m", "v"):
        diff = (getattr(fused, name).int() - getattr(ref, name).int()).abs()
        assert int(diff.max()) <= 1 and float((diff > 0).float().mean()) < 1e-3, name
    for name in ("absmax_m", "absmax_v"):
        assert float(_ulps(getattr(fused, name), getattr(ref, name)).max()) <= 1.0, name
    if tensor_betas:
        assert torch.equal(fused.m, ref.m) and torch.equal(fused.absmax_m, ref.absmax_m)
    assert (n_fused != 0).any()


@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_fused_adamw_trajectory_tracks_reference(weight_decay):
    """30 AdamW steps on a mixed-scale stream: the fused and reference parameters move alike."""
    shape, lr, steps = (70, 61), 1e-2, 30  # 4270 elements: 16 whole blocks and a short one
    p0, grads = make_case(shape, steps=steps)
    gen = torch.Generator().manual_seed(11)
    scales = 10.0 ** torch.randint(-5, 1, shape, generator=gen).float()  # blocks mixing tiny and large gradients
    ps = {impl: p0.clone() for impl in ("reference", "fused")}
    states = {impl: AdamState.zeros(shape, bits=8) for impl in ps}
    steps_t = {impl: torch.zeros((), dtype=torch.int64) for impl in ps}
    ok = torch.tensor(True)
    for g in grads:
        for impl in ps:
            steps_t[impl] += 1
            A.adamw_masked_(ps[impl], g * scales, states[impl], steps_t[impl], ok, lr, 0.9, 0.999, 1e-8,
                            weight_decay, impl=impl)
    d_ref, d_fused = ps["reference"] - p0, ps["fused"] - p0
    assert float((d_ref - d_fused).norm() / d_ref.norm()) <= 1e-3
    assert float((d_ref - d_fused).abs().max()) <= 0.05 * lr * steps
    v = dequantize_blockwise_dynamic(states["fused"].v, states["fused"].absmax_v, False)
    assert not bool(((v == 0) & (states["fused"].m != 127)).any())  # the zero-code floor holds on the fused path


def test_fused_step_skips_non_finite_gradients_bit_for_bit():
    shape = (4097,)
    state = warm_state(shape)
    before = state.clone()
    p = torch.randn(shape)
    p0 = p.clone()
    g = make_case(shape, seed=2)[1][0]
    g[5] = math.nan
    ok = torch.isfinite(g).all()
    n = A.adam_direction_masked_(g, state, torch.tensor(4), 0.9, 0.999, 1e-8, ok, impl="fused")
    A.adamw_masked_(p, g, state, torch.tensor(4), ok, 1e-2, 0.9, 0.999, 1e-8, 0.1, impl="fused")
    assert torch.equal(n, torch.zeros(shape)) and torch.equal(p, p0)
    for name, t in before.tensors().items():
        assert torch.equal(state.tensors()[name], t), name


def test_fused_step_equals_reference_where_it_does_not_apply():
    """32-bit moments and states shorter than a block always run the reference, bit for bit."""
    for shape, bits in (((4097,), 32), ((100,), 8)):
        state = AdamState.zeros(shape, bits=bits, min_8bit_size=0)
        g = make_case(shape)[1][0]
        a, b = state.clone(), state.clone()
        assert torch.equal(_masked(g, a, 1, "fused", False), _masked(g, b, 1, "reference", False))


def test_reference_switch_forces_the_reference(monkeypatch):
    """QGALORE_FX_REFERENCE=1 makes impl="auto" run the torch reference: the result is the reference's, bit for bit,
    and the compiled kernel is never entered."""
    shape = (4097,)
    g = make_case(shape, seed=7)[1][0]
    state = warm_state(shape)
    expect = state.clone()
    n_expect = _masked(g, expect, 4, "reference", False)
    monkeypatch.setenv(fastpath.ENV_REFERENCE, "1")
    assert fastpath.reference_forced() and not A._DIRECTION_KERNEL.available() and not A._NATIVE_KERNEL.available()
    monkeypatch.setattr(A._NATIVE_KERNEL, "_fn", None)
    monkeypatch.setattr(A._NATIVE_KERNEL, "_load", None)  # would fail if it were built or called
    monkeypatch.setattr(A._DIRECTION_KERNEL, "fn", None)  # would fail if it were compiled or called
    monkeypatch.setattr(A._DIRECTION_KERNEL, "_compiled", None)
    n = _masked(g, state, 4, "auto", False)
    assert torch.equal(n, n_expect)
    for name, t in expect.tensors().items():
        assert torch.equal(state.tensors()[name], t), name
    monkeypatch.setenv(fastpath.ENV_REFERENCE, "0")
    assert not fastpath.reference_forced()


def test_fast_path_that_fails_to_compile_falls_back_with_a_warning():
    from qgalore_fx.kernels.fastpath import CompiledKernel

    def breaks(x):
        torch._dynamo.graph_break()  # fullgraph=True refuses this
        return x + 1

    kernel = CompiledKernel(breaks, "test kernel")
    with pytest.warns(RuntimeWarning, match="test kernel"):
        assert kernel(torch.ones(3)) == (False, None)
    assert kernel.failed and not kernel.available()
    assert kernel(torch.ones(3)) == (False, None)  # no second attempt


# --------------------------------------------------------------------------- the C++ step vs the compiled one
# On an AVX2 CPU the fused step runs in C++ (adam8bit_cpu.cpp), written op for op after the compiled function, so the
# two are compared bit for bit: N or the parameters, codes and absmax, over several steps (one skipped), with a short
# last block, moments spanning six decades, zero and subnormal gradients, tensor and float hyperparameters, a large
# offset (the draws' index wraps at 2^32), and one and two threads.
needs_avx2 = pytest.mark.skipif(not fastpath.CPU_HAS_AVX2, reason="the C++ step needs an AVX2 CPU")


def _fused_step(native: bool, mode: str, grad, state, p, step, ok, offset):
    before = A._NATIVE_KERNEL.failed
    if not native:
        A._NATIVE_KERNEL.failed = "the compiled step is the reference of this test"
    try:
        if mode == "direction":
            betas = [torch.tensor(b, dtype=torch.float64) for b in (0.9, 0.999, 1e-8)]
            return A.adam_direction_masked_(grad, state, torch.tensor(step), *betas, ok, impl="fused", offset=offset)
        A.adamw_masked_(p, grad, state, torch.tensor(step), ok, 1e-2, 0.9, 0.999, 1e-8, 0.1, impl="fused",
                        offset=offset)
        return p
    finally:
        A._NATIVE_KERNEL.failed = before


@needs_avx2
@pytest.mark.parametrize("shape", [(4097,), (33, 70), (64, 256)])
@pytest.mark.parametrize("mode", ["direction", "adamw"])
@pytest.mark.parametrize("threads", [1, 2])
def test_native_step_equals_compiled_step_bit_for_bit(shape, mode, threads):
    gen = torch.Generator().manual_seed(3)
    states = [AdamState.zeros(shape, bits=8) for _ in range(2)]
    p0 = torch.randn(shape, generator=gen)
    ps = [p0.clone(), p0.clone()]
    old_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for step in range(1, 7):
            g = torch.randn(shape, generator=gen) * 10.0 ** torch.randint(-6, 0, shape, generator=gen).float()
            g.view(-1)[:256] = 0.0  # a block without gradient
            g.view(-1)[300] = 1e-40  # a subnormal
            ok = torch.tensor(step != 4)  # step 4 is skipped: nothing may change
            got = [_fused_step(native, mode, g, states[i], ps[i], step, ok, offset=2**32 - 1000)
                   for i, native in enumerate((False, True))]
            assert torch.equal(got[0], got[1]), (step, float((got[0] - got[1]).abs().max()))
            for name, t in states[0].tensors().items():
                assert torch.equal(states[1].tensors()[name], t), (step, name)
    finally:
        torch.set_num_threads(old_threads)
    assert A._NATIVE_KERNEL._fn is not None and A._NATIVE_KERNEL.failed is None  # the C++ step did run
    assert bool((states[1].m != 127).any()) and (mode == "direction" or not torch.equal(ps[1], p0))


def test_native_step_is_not_used_for_bf16_gradients():
    """A bf16 gradient (the C++ step takes fp32) runs the compiled step, with the same result as its fp32 copy."""
    shape = (1024,)
    g = make_case(shape, seed=5)[1][0].bfloat16()
    a, b = warm_state(shape), warm_state(shape)
    assert not A._native_applies(g.view(-1, 256))
    n_bf16 = _fused_step(True, "direction", g, a, None, 4, torch.tensor(True), 0)
    n_fp32 = _fused_step(True, "direction", g.float(), b, None, 4, torch.tensor(True), 0)
    assert torch.equal(n_bf16, n_fp32)


def test_native_kernel_that_fails_to_build_falls_back_with_a_warning(monkeypatch):
    from qgalore_fx.kernels.fastpath import NativeKernel

    kernel = NativeKernel("adam8bit_cpu.cpp", "adam8bit_blocks_", "test native kernel")

    def no_compiler():
        raise OSError("no C++ compiler")

    monkeypatch.setattr(kernel, "_load", no_compiler)
    with pytest.warns(RuntimeWarning, match="test native kernel"):
        assert kernel(torch.ones(3)) == (False, None)
    assert kernel.failed and not kernel.available()
    assert kernel(torch.ones(3)) == (False, None)  # no second attempt


def test_impl_is_checked():
    state = AdamState.zeros((300,))
    with pytest.raises(ValueError, match="impl must be one of"):
        A.adam_direction_masked_(torch.zeros(300), state, torch.tensor(1), 0.9, 0.999, 1e-8, torch.tensor(True),
                                 impl="fast")


@pytest.mark.parametrize("signed", [True, False])
def test_compact_lookup_gives_the_nearest_codes(signed):
    """The fused step's compact table: the same code as _nearest_code for every value in [-1, 1] (or [0, 1]),
    every exponent down to the subnormals, the map values and the midpoints themselves (ties go to the lower code)."""
    gen = torch.Generator().manual_seed(0)
    mags = torch.pow(2.0, -torch.rand(200_000, generator=gen) * 149)  # 2^-149 .. 1
    x = mags * (torch.randint(0, 2, mags.shape, generator=gen) * 2 - 1) if signed else mags
    qmap, mid = A._cached_map(signed, "cpu")[:2]
    x = torch.cat([x, qmap, mid, torch.nextafter(mid, torch.tensor(2.0)), torch.tensor([0.0, -0.0, 1.0])])
    if not signed:
        x = x.abs()
    mid_ext = A._cached_map(signed, "cpu")[3]
    got = A._fused_codes(x.contiguous(), A._compact_lut(signed, "cpu"), mid_ext)
    assert torch.equal(got.to(torch.uint8), A._nearest_code(x.contiguous(), signed))
