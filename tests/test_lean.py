"""transform(model, rank, lean=True): the factored second moment without a first moment (qgalore_fx.kernels.factored).

The kernel against a float64 reference written whole, its masking, its chunk independence and its clipping; the
layer state it keeps, what the reports say, training, checkpoints and the planner's figures.
"""

import math

import pytest
import torch
import transformers

import qgalore_fx
from qgalore_fx.kernels.factored import CLIP, factor_size, factored_direction_, reference_direction
from qgalore_fx.layers import QGaLoreLinear

BETA2 = float(torch.tensor(0.999))  # the fp32 value the layers' hparams tensor holds


def _tiny(layers=1):
    cfg = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                                   num_attention_heads=4, vocab_size=256)
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(cfg)


def _run(R, factors, t, ok=True, chunk=1 << 20):
    return factored_direction_(R.clone(), factors, torch.tensor(t), torch.tensor(BETA2), 1e-8,
                               torch.tensor(ok), chunk=chunk)


@pytest.mark.parametrize("shape", [(37, 19), (8, 300), (130, 1)])
def test_the_direction_and_statistics_follow_the_float64_reference(shape):
    gen = torch.Generator().manual_seed(1)
    a, b = shape
    factors = torch.zeros(factor_size(shape))
    row, col = torch.zeros(a, dtype=torch.float64), torch.zeros(b, dtype=torch.float64)
    for t in range(1, 6):
        R = torch.randn(shape, generator=gen) * 10.0 ** (t - 4)  # the scale moves by 10x per step
        row, col, U = reference_direction(R, row, col, t, BETA2, 1e-8)
        N = _run(R, factors, t, chunk=64)
        torch.testing.assert_close(factors[:a].double(), row, rtol=2e-6, atol=0)
        torch.testing.assert_close(factors[a:].double(), col, rtol=2e-6, atol=0)
        torch.testing.assert_close(N.double(), U, rtol=2e-5, atol=1e-6)


def test_the_chunking_changes_only_the_order_of_the_column_sums():
    gen = torch.Generator().manual_seed(2)
    R = torch.randn(97, 33, generator=gen)
    f1, f2 = torch.zeros(130), torch.zeros(130)
    for t in (1, 2):
        torch.testing.assert_close(_run(R * t, f1, t, chunk=33 * 5), _run(R * t, f2, t, chunk=33 * 97),
                                   rtol=1e-6, atol=0)
        assert torch.equal(f1[:97], f2[:97])  # a row's mean is one chunk's
        torch.testing.assert_close(f1[97:], f2[97:], rtol=1e-6, atol=0)


def test_a_false_ok_or_a_non_finite_R_leaves_the_statistics_and_returns_zero():
    gen = torch.Generator().manual_seed(3)
    factors = torch.zeros(50)
    _run(torch.randn(20, 30, generator=gen), factors, 1)
    before = factors.clone()
    R = torch.randn(20, 30, generator=gen)
    R[3, 4] = float("nan")
    R[5, 6] = float("inf")
    N = _run(R, factors, 2, ok=False)
    assert torch.equal(factors, before)
    assert torch.equal(N, torch.zeros_like(N))


def test_a_non_finite_first_step_returns_zero_not_nan():
    """Before any finite step the statistics are all zero; a skipped first step must still give N = 0 exactly."""
    factors = torch.zeros(50)
    R = torch.full((20, 30), float("nan"))
    N = _run(R, factors, 1, ok=False)
    assert torch.equal(N, torch.zeros_like(N)) and torch.equal(factors, torch.zeros(50))


def test_the_direction_is_written_over_R_and_clipped_to_rms_one():
    gen = torch.Generator().manual_seed(4)
    factors = torch.zeros(40)
    _run(torch.randn(20, 20, generator=gen) * 1e-3, factors, 1)  # small history ...
    R = torch.randn(20, 20, generator=gen) * 10.0  # ... then an outlier step: unclipped RMS would be ~ 300
    N = factored_direction_(R, factors, torch.tensor(2), torch.tensor(BETA2), 1e-8, torch.tensor(True))
    assert N.data_ptr() == R.data_ptr()
    assert math.isclose(float(N.square().mean().sqrt()), CLIP, rel_tol=1e-5)


def test_bad_statistics_are_refused_by_name():
    with pytest.raises(ValueError, match=r"factors must be a float32 tensor of shape \(50,\)"):
        factored_direction_(torch.zeros(20, 30), torch.zeros(49), torch.tensor(1), 0.999, 1e-8, torch.tensor(True))


def test_a_lean_layer_keeps_row_and_column_statistics_and_no_first_moment():
    model = qgalore_fx.transform(_tiny(), rank=8, lean=True)
    layers = [m for m in model.modules() if isinstance(m, QGaLoreLinear)]
    total = 0
    for layer in layers:
        a, b = layer.spec.lowrank_shape
        assert layer.exp_avg.numel() == 0 and layer.exp_avg_absmax.numel() == 0
        assert layer.exp_avg_sq.dtype == torch.float32 and layer.exp_avg_sq.shape == (a + b,)
        assert "moments=lean" in repr(layer)
        total += 4 * (a + b)
    report = qgalore_fx.memory_report(model)
    assert report.lowrank_optimizer_state == total
    assert report.moment_storage == "lean: factored v, no m" and "lean: factored v, no m" in str(report)
    assert "lean=True: 7 of 7 layers keep a factored second moment" in qgalore_fx.explain(model)
    default = qgalore_fx.memory_report(qgalore_fx.transform(_tiny(), rank=8))
    assert default.moment_storage == "8-bit m, v"
    assert default.lowrank_optimizer_state > 10 * total


def test_lean_must_be_a_bool():
    with pytest.raises(TypeError, match="lean must be True or False"):
        qgalore_fx.transform(_tiny(), rank=8, lean=1)


def _steps(model, opt, ids, n):
    losses = []
    for _ in range(n):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(float(loss.detach()))
    return losses


def _train(model, steps=12, seed=0):
    opt = qgalore_fx.optimizer(model, lr=1e-2)
    ids = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(seed))  # one batch, to fit
    return opt, _steps(model, opt, ids, steps)


def test_lean_trains_and_each_layer_moves_its_weight():
    model = qgalore_fx.transform(_tiny(), rank=8, lean=True, update_interval=4)
    before = {n: m.weight_codes.clone() for n, m in model.named_modules() if isinstance(m, QGaLoreLinear)}
    _, losses = _train(model, steps=30)
    assert losses[-1] < losses[0] - 0.5, losses
    for name, m in model.named_modules():
        if isinstance(m, QGaLoreLinear):
            assert not torch.equal(m.weight_codes, before[name]), name
            assert int(m.step) == 30 and bool((m.exp_avg_sq > 0).all()), name


def test_a_lean_checkpoint_resumes_exactly_and_a_default_one_is_refused(tmp_path):
    model = qgalore_fx.transform(_tiny(), rank=8, lean=True, update_interval=3)
    opt, _ = _train(model, steps=4)
    qgalore_fx.save_checkpoint(tmp_path / "lean", model, opt)
    ids = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(5))
    expected = _steps(model, opt, ids, 3)
    again = qgalore_fx.transform(_tiny(), rank=8, lean=True, update_interval=3)
    opt2 = qgalore_fx.optimizer(again, lr=1e-2)
    qgalore_fx.load_checkpoint(tmp_path / "lean", again, opt2)
    assert _steps(again, opt2, ids, 3) == expected

    default = qgalore_fx.transform(_tiny(), rank=8, update_interval=3)
    opt3 = qgalore_fx.optimizer(default, lr=1e-2)
    with pytest.raises(ValueError, match="different qgalore_fx config: lean: checkpoint True, model False"):
        qgalore_fx.load_checkpoint(tmp_path / "lean", default, opt3)


def test_the_planner_counts_lean_state_from_the_layers():
    from qgalore_fx.app.planner import plan_run
    from qgalore_fx.app.presets import get_preset, llama_config

    kw = dict(batch_size=1, seq_len=32, runtime=0)
    default, lean = plan_run("tiny", **kw), plan_run("tiny", lean=True, **kw)
    rank = get_preset("tiny").rank
    built = [qgalore_fx.memory_report(qgalore_fx.transform(
        transformers.LlamaForCausalLM(llama_config("tiny", vocab_size=256)), rank=rank, lean=lean))
        for lean in (False, True)]
    saved = built[0].lowrank_optimizer_state - built[1].lowrank_optimizer_state
    assert saved > 0
    assert default.persistent - lean.persistent == saved and default.peak - lean.peak == saved


def test_lean_with_gradient_accumulation_updates_once_per_step():
    """Under accumulation the update runs at step() from the accumulated R (the deferred path), lean or not."""
    model = qgalore_fx.transform(_tiny(), rank=8, lean=True)
    opt = qgalore_fx.optimizer(model, lr=1e-2, accumulation_steps=2)
    ids = torch.randint(0, 256, (4, 16), generator=torch.Generator().manual_seed(6))
    layer = model.model.layers[0].mlp.down_proj
    for step in range(3):
        for micro in ids.chunk(2):
            model(input_ids=micro, labels=micro).loss.div(2).backward()
        before = layer.weight_codes.clone()
        opt.step()
        opt.zero_grad()
        assert int(layer.step) == step + 1
        assert not torch.equal(layer.weight_codes, before)
    assert bool((layer.exp_avg_sq > 0).all())


def test_the_sharded_planner_refuses_lean_as_fsdp2_does():
    """plan_sharded asks sharding.split_error, the question optimizer() asks under FSDP2: no per-rank figure for a
    lean model, and the message names lean=True."""
    from qgalore_fx.app.planner import ShardingError, plan_sharded

    with pytest.raises(ShardingError, match="lean=True is not supported under FSDP2"):
        plan_sharded("tiny", 2, runtime=0, lean=True)
    assert plan_sharded("tiny", 2, runtime=0).world_size == 2
