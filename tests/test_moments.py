"""8-bit Adam moments through ``qgalore_fx.optimizer``: no blow-up where a block mixes tiny and large gradients.

A positive second moment below 1.625e-7·absmax of its block used to round to the zero code while the first
moment survived, so the next step divided m̂ by eps alone (docs/8bit-moments.md,
"Second moments never round to zero"). Each test below drives the public API
and bounds the largest single-step move against fp32 Adam on the same stream; each also checks that its stream
really reaches the floored code, so it would fail without the floor (measured without it: 692·lr, 4509 (in
units of lr·scale) and 460·lr).

Tolerances: fp32 Adam's largest move on these streams is 1.00-1.33·lr (measured), the bound is 2·lr (the
issue's "same as fp32 Adam within noise"). The recorded embedding stream's total movement may differ from fp32
Adam's by at most 6 % (measured 3.5 %; bitsandbytes' CPU optimizer: 3.8 % on the full embedding of the same
run, see BENCHMARKS.md).
"""

from __future__ import annotations

import pathlib

import pytest
import torch
import torch.nn as nn

import qgalore_fx
from qgalore_fx.kernels.adam8bit import dequantize_blockwise_dynamic

DATA = pathlib.Path(__file__).parent / "data" / "embedding_grads.pt"


def _model_with_free_parameter(shape, **transform_options):
    """A transformed one-linear model plus an unprojected parameter ``free`` (trained by the AdamW group)."""
    torch.manual_seed(0)
    net = qgalore_fx.transform(nn.Sequential(nn.Linear(8, 8)), rank=2, **transform_options)
    free = nn.Parameter(torch.zeros(shape))
    net.register_parameter("free", free)
    return net, free


def _replay_free(stream, lr=1e-3):
    """Feed ``stream`` (gradients) to a free parameter via qgalore_fx.optimizer and to torch.optim.Adam.

    Returns (largest single move of ours / lr, of torch's / lr, ours, torch's final parameter, our optimizer).
    """
    net, free = _model_with_free_parameter(stream[0].shape)
    opt = qgalore_fx.optimizer(net, lr=lr)
    ref = nn.Parameter(torch.zeros(stream[0].shape))
    ref_opt = torch.optim.Adam([ref], lr=lr, foreach=False)
    worst = worst_ref = 0.0
    for g in stream:
        before, ref_before = free.detach().clone(), ref.detach().clone()
        free.grad, ref.grad = g.clone(), g.clone()
        opt.step()
        ref_opt.step()
        worst = max(worst, float((free.detach() - before).abs().max()) / lr)
        worst_ref = max(worst_ref, float((ref.detach() - ref_before).abs().max()) / lr)
    return worst, worst_ref, free.detach(), ref.detach(), opt, free


def test_mixed_scale_stream_on_an_unprojected_parameter_moves_like_fp32_adam():
    """32x256 parameter, gradient 1e-5 in half of each 256-block and 1 in the other half, 20 steps, lr 1e-3."""
    gen = torch.Generator().manual_seed(0)
    scale = torch.ones(32, 256)
    scale[:, :128] = 1e-5
    stream = [scale * torch.randn(32, 256, generator=gen) for _ in range(20)]
    worst, worst_ref, p, p_ref, opt, free = _replay_free(stream)
    assert worst_ref == pytest.approx(1.0, abs=0.05)
    assert worst <= 2.0, worst
    adam = opt.state[free]["adam"]
    assert adam.bits == 8
    # the tiny half sits below 1.625e-7 of its block's absmax: without the floor those v codes would be 0
    v = dequantize_blockwise_dynamic(adam.v, adam.absmax_v, False)
    assert float((v[:, :128] / adam.absmax_v[:, None]).max()) < 1e-6
    assert torch.all(adam.v[:, :128] >= 1)
    # the large half follows fp32 Adam closely (the floored tiny half is over-damped: it moves less)
    big = (p - p_ref)[:, 128:].norm() / p_ref[:, 128:].norm()
    assert float(big) <= 0.02


def test_recorded_embedding_stream_tracks_fp32_adam():
    """16 embedding rows of a real tiny-preset run, 100 steps (benchmarks/bench_moments.py --write-test-data).

    Recorded at commit f89581c: the 8 rows where 8-bit moments without the floor moved most, and 8 others.
    """
    d = torch.load(DATA, weights_only=True)
    steps, rows, width = d["shape"].tolist()
    stream = torch.zeros(steps, rows, width, dtype=torch.bfloat16)
    index = d["index"].long()
    stream[index[:, 0], index[:, 1]] = d["values"]
    stream = stream.float()
    assert int((stream.abs().amax(-1) > 0).sum()) == index.shape[0] > 0
    worst, worst_ref, p, p_ref, opt, free = _replay_free(list(stream))
    assert opt.state[free]["adam"].bits == 8
    assert worst_ref <= 2.0
    assert worst <= 2.0, worst
    assert float((p - p_ref).norm() / p_ref.norm()) <= 0.06


def test_projected_layer_low_rank_moments_mixed_scale():
    """R of a projected layer mixes rows of scale 1e-5 and 1 inside each 256-block of its 8-bit moments.

    Output features alternate between gradient scale 1e-5 and 1, so the rows of R = G·Pᵀ ([512, 8], blocks of
    32 rows) do too. fp32 weights, no stochastic rounding and no refresh after the first, so the per-step
    weight change is exactly lr·scale·N·P and N is read back from it.
    """
    m, n, r, lr, alpha = 512, 64, 8, 1e-2, 0.25

    def run(optim_bits):
        torch.manual_seed(0)
        net = qgalore_fx.transform(nn.Sequential(nn.Linear(n, m, bias=False)), rank=r, weight_bits=32,
                                   proj_bits=16, optim_bits=optim_bits, stochastic_round=False,
                                   update_interval=10**6, scale=alpha)
        opt = qgalore_fx.optimizer(net, lr=lr)
        ((_, layer),) = qgalore_fx.projected_layers(net)
        gen = torch.Generator().manual_seed(0)
        row_scale = torch.ones(m)
        row_scale[0::2] = 1e-5
        x = torch.randn(64, n, generator=gen)
        worst = 0.0
        for _ in range(20):
            c = torch.randn(64, m, generator=gen) * row_scale
            before = layer.dequantized_weight().clone()  # fp32 storage: a view, not a copy
            (net(x) * c).sum().backward()
            opt.step()
            opt.zero_grad()
            N = (before - layer.dequantized_weight()) @ torch.linalg.pinv(layer.projection_matrix()) / (lr * alpha)
            worst = max(worst, float(N.abs().max()))
        return worst, layer

    worst8, layer = run(8)
    worst32, _ = run(32)
    assert layer.exp_avg_sq.dtype == torch.uint8  # 4096 elements: 8-bit
    assert worst32 == pytest.approx(1.0, abs=0.05)
    assert worst8 <= 2.0, worst8
    assert torch.all(layer.exp_avg_sq[0::2] >= 1)  # the tiny rows hold the floored code, not 0
    assert torch.all(layer.exp_avg_sq[0::2] <= 1)


# --------------------------------------------------------------------------- a block whose maximum has decayed
# One element of each 256-block sees gradient 1 at step 1 and sqrt(1e-3) afterwards, the other 255 steady values
# of 3.2e-4 .. 4.7e-4 (lr 1, no decay). With nearest rounding their v, on the lowest codes of the block, could not
# move: each step adds (1 - beta2)·g² ≈ 1.6e-7 of the block's absmax, less than half the distance to the next code,
# so v rounded back to where it was while its true value grew 500x, and the small elements' moves reached 12.8x lr
# (fp32 Adam: 1.0x). Stochastic rounding of v keeps its expected value exact (measured with it: <= 1.94x in one
# block, <= 2.01x over 16 blocks).
def _decayed_max_stream(steps, blocks=1):
    small = torch.linspace(3.2e-4, 4.7e-4, 255)
    for t in range(1, steps + 1):
        g = torch.empty(256)
        g[0] = 1.0 if t == 1 else 1e-3 ** 0.5
        g[1:] = small
        yield t, g.repeat(blocks)


def _largest_small_move(direction, steps=1500):
    worst = 0.0
    for t, g in _decayed_max_stream(steps):
        N = direction(t, g)
        worst = max(worst, float(N[1:].abs().max()))
    return worst


@pytest.mark.parametrize("impl", ["reference", "fused"])
def test_decayed_block_maximum_low_rank_moments_do_not_stick(impl):
    from qgalore_fx.kernels.adam8bit import AdamState, adam_direction_masked_

    state = AdamState.zeros((256,), bits=8, min_8bit_size=0)
    ok = torch.tensor(True)
    worst = _largest_small_move(lambda t, g: adam_direction_masked_(g, state, torch.tensor(t), 0.9, 0.999, 1e-8, ok,
                                                                    impl=impl))
    assert worst <= 2.0, worst


@pytest.mark.parametrize("impl", ["reference", "fused"])
def test_decayed_block_maximum_adamw_moments_do_not_stick(impl):
    from qgalore_fx.kernels.adam8bit import AdamState, adamw_masked_

    state = AdamState.zeros((256,), bits=8, min_8bit_size=0)
    p, ok = torch.zeros(256), torch.tensor(True)

    def direction(t, g):
        before = p.clone()
        adamw_masked_(p, g, state, torch.tensor(t), ok, 1.0, 0.9, 0.999, 1e-8, 0.0, impl=impl)
        return before - p

    assert _largest_small_move(direction) <= 2.0


def test_decayed_block_maximum_through_the_optimizer_rest_group():
    stream = [g.repeat(16) for _, g in _decayed_max_stream(400)]  # 4096 elements: 8-bit moments
    worst, worst_ref, *_ = _replay_free(stream, lr=1.0)
    assert worst_ref == pytest.approx(1.0, abs=0.01)
    assert worst <= 2.05, worst  # 16 blocks: measured 2.01 (one block: 1.94)


def _adam_fp32_largest_move(stream):
    m = v = torch.zeros_like(stream[0])
    worst = 0.0
    for t, g in enumerate(stream, 1):
        m, v = 0.9 * m + 0.1 * g, 0.999 * v + 0.001 * g * g
        worst = max(worst, float(((m / (1 - 0.9**t)) / ((v / (1 - 0.999**t)).sqrt() + 1e-8)).abs().max()))
    return worst


from hypothesis import given, settings, strategies as st  # noqa: E402


@settings(max_examples=12, deadline=None)
@given(peak=st.floats(1e-2, 1e2), decay=st.floats(0.9, 0.999), floor=st.floats(1e-6, 1e-2),
       small_exp=st.floats(-6.0, -2.0), spread=st.floats(1.0, 3.0), seed=st.integers(0, 2**16))
def test_streams_whose_block_maximum_decays_move_like_fp32_adam(peak, decay, floor, small_exp, spread, seed):
    """One element's gradient decays geometrically from ``peak`` to ``floor·peak``; the others are steady, of
    scales 10^small_exp .. spread·10^small_exp. The 8-bit moves stay within 2x of fp32 Adam's largest (+0.25)."""
    from qgalore_fx.kernels.adam8bit import AdamState, adam_direction_masked_

    gen = torch.Generator().manual_seed(seed)
    small = 10.0**small_exp * (1 + (spread - 1) * torch.rand(255, generator=gen))
    stream = []
    for t in range(300):
        g = torch.empty(256)
        g[0] = peak * max(decay**t, floor)
        g[1:] = small
        stream.append(g)
    state, ok = AdamState.zeros((256,), bits=8, min_8bit_size=0), torch.tensor(True)
    worst = 0.0
    for t, g in enumerate(stream, 1):
        N = adam_direction_masked_(g, state, torch.tensor(t), 0.9, 0.999, 1e-8, ok, impl="reference")
        worst = max(worst, float(N[1:].abs().max()))
    assert worst <= 2.0 * _adam_fp32_largest_move([g[1:] for g in stream]) + 0.25, worst
