"""The fused low-rank update in backward and qgalore_fx.optimizer()."""

import copy
import gc
import math
import warnings

import pytest
import torch
import torch.nn as nn
from conftest import tiny_llama
from torch._subclasses.fake_tensor import FakeTensor

import qgalore_fx
from qgalore_fx import projection as proj


def one_linear(m=48, n=32, bias=True, **options):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(n, m, bias=bias))
    options.setdefault("rank", 4)
    return qgalore_fx.transform(net, **options)


def layer_of(model):
    ((_, layer),) = qgalore_fx.projected_layers(model)
    return layer


def after_one_step(**options):
    """(model, optimizer, layer) of one_linear(**options) after one plain training step."""
    model = one_linear(**options)
    opt = qgalore_fx.optimizer(model, lr=1e-2)
    layer = layer_of(model)
    model(torch.randn(4, 32)).sum().backward()
    opt.step()
    opt.zero_grad()
    return model, opt, layer


def test_backward_without_optimizer_is_a_clear_error():
    model = one_linear()
    with pytest.raises(RuntimeError, match="qgalore_fx.optimizer"):
        model(torch.randn(3, 32)).sum().backward()


def test_update_moves_int8_weights_inside_backward():
    model = one_linear()
    opt = qgalore_fx.optimizer(model, lr=1e-2)
    layer = layer_of(model)
    before = layer.weight_codes.clone()
    model(torch.randn(16, 32)).pow(2).sum().backward()
    # the update ran in backward, before step()
    assert (layer.weight_codes != before).any()
    assert layer.stats()["step"] == 1 and layer.stats()["refresh_count"] == 1
    opt.step()
    assert layer.stats()["step"] == 1


@pytest.mark.parametrize("proj_side", ["short", "long"])
@pytest.mark.parametrize("m,n", [(48, 32), (32, 48)])
def test_first_steps_equal_a_dense_galore_reference(m, n, proj_side):
    """fp32 weights, fp32 Adam, no SR: the layer follows GaLore's math exactly (given its stored P), on GaLore's
    side of the weight or (``proj_side="long"``) on the other one."""
    torch.manual_seed(1)
    dense = nn.Linear(n, m, bias=False)
    model = qgalore_fx.transform(nn.Sequential(copy.deepcopy(dense)), rank=5, weight_bits=32, proj_bits=16,
                                 optim_bits=32, stochastic_round=False, proj_method="full", scale=0.25,
                                 proj_side=proj_side)
    right = (m >= n) == (proj_side == "short")  # R = G Pᵀ ([m, r]) rather than Pᵀ G ([r, n])
    opt = qgalore_fx.optimizer(model, lr=1e-2, weight_decay=0.1)
    layer = layer_of(model)
    W = dense.weight.detach().clone()
    m1 = v1 = None
    for t in range(1, 6):
        x = torch.randn(8, n)
        target = torch.randn(8, m)
        loss = (model(x) - target).pow(2).mean()
        loss.backward()
        opt.step()
        opt.zero_grad()
        Wp = W.clone().requires_grad_(True)
        (x @ Wp.t() - target).pow(2).mean().backward()
        G = Wp.grad
        P = layer.projection_matrix()
        if t == 1:  # P is the top-r singular subspace of the first gradient
            U, S, Vh = torch.linalg.svd(G, full_matrices=False)
            ref_P = Vh[:5] if right else U[:, :5]
            assert proj.subspace_similarity(P, ref_P, "right" if right else "left") > 0.999
        assert layer.exp_avg.shape == ((m, 5) if right else (5, n))
        R = G @ P.t() if right else P.t() @ G
        m1 = (1 - 0.9) * R if m1 is None else 0.9 * m1 + 0.1 * R
        v1 = (1 - 0.999) * R * R if v1 is None else 0.999 * v1 + 0.001 * R * R
        N = (m1 / (1 - 0.9 ** t)) / ((v1 / (1 - 0.999 ** t)).sqrt() + 1e-8)
        delta = N @ P if right else P @ N
        W = W * (1 - 1e-2 * 0.1) - 1e-2 * 0.25 * delta
        torch.testing.assert_close(layer.dequantized_weight(), W, atol=2e-6, rtol=1e-5)


def test_no_full_rank_gradient_survives_backward():
    m, n = 96, 80
    model = one_linear(m, n, rank=8, update_interval=1000)
    opt = qgalore_fx.optimizer(model, lr=1e-3)
    for _ in range(2):  # a refresh step (forms G transiently) and a plain step (never forms G)
        model(torch.randn(32, n)).sum().backward()
        opt.step()
        opt.zero_grad()
    gc.collect()
    with warnings.catch_warnings():  # isinstance() on some deprecated torch globals warns
        warnings.simplefilter("ignore")
        # (fake tensors left behind by torch.compile's tracing of the fused Adam step hold no memory and may
        # have symbolic shapes: only real tensors count)
        live = [o for o in gc.get_objects() if isinstance(o, torch.Tensor) and not isinstance(o, FakeTensor)
                and o.is_floating_point() and all(type(d) is int for d in o.shape)
                and tuple(o.shape) in {(m, n), (n, m)}]
    assert live == []


def test_fused_and_deferred_give_the_same_weights():
    results = []
    for fused in (True, False):
        model = one_linear(fused=fused, rank=4)
        opt = qgalore_fx.optimizer(model, lr=1e-2)
        torch.manual_seed(3)
        for _ in range(4):
            model(torch.randn(8, 32)).pow(2).sum().backward()
            opt.step()
            opt.zero_grad()
        results.append(layer_of(model).weight_codes.clone())
    assert torch.equal(results[0], results[1])


def test_gradient_accumulation_sums_low_rank_gradients():
    """Two identical half-loss micro-batches == one micro-batch; the accumulator is low rank."""
    xs = torch.randn(8, 32)
    finals = []
    for k in (1, 2):
        model = one_linear(rank=4, stochastic_round=False)
        opt = qgalore_fx.optimizer(model, lr=1e-2, accumulation_steps=k)
        layer = layer_of(model)
        for step in range(3):
            for _ in range(k):
                (model(xs).pow(2).sum() / k).backward()
                if k == 2:
                    assert layer.accum.shape == (48, 4)  # r x max(m, n), never m x n
                    assert layer.stats()["pending"] >= 1
            opt.step()
            opt.zero_grad()
            assert layer.stats()["pending"] == 0 and not layer.accum.any()
        finals.append(layer.dequantized_weight())
    torch.testing.assert_close(finals[0], finals[1], atol=1e-6, rtol=0)


def test_non_finite_gradient_skips_update_and_training_continues():
    model, opt, layer = after_one_step()
    codes, scales = layer.weight_codes.clone(), layer.weight_scales.clone()
    moments = ("exp_avg", "exp_avg_sq", "exp_avg_absmax", "exp_avg_sq_absmax")
    adam = {k: getattr(layer, k).clone() for k in moments}
    bias = layer.bias.detach().clone()
    x = torch.randn(4, 32)
    x[0, 0] = float("nan")
    model(x).pow(2).sum().backward()  # NaN reaches grad_y: the weight gradient and the bias gradient
    opt.step()
    opt.zero_grad()
    assert torch.equal(layer.weight_codes, codes) and torch.equal(layer.weight_scales, scales)
    assert all(torch.equal(v, getattr(layer, k)) for k, v in adam.items())
    assert torch.equal(layer.bias, bias)
    assert opt.skipped_updates == 2  # the layer's update and the AdamW group's step
    assert layer.stats()["step"] == 1
    model(torch.randn(4, 32)).sum().backward()
    opt.step()
    assert layer.stats()["step"] == 2 and torch.isfinite(layer.dequantized_weight()).all()


def test_every_other_parameter_is_trained(llama):
    model = qgalore_fx.transform(llama, rank=8)
    model.train()
    opt = qgalore_fx.optimizer(model, lr=1e-2)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if not n.endswith(".anchor")}
    ids = torch.randint(0, 128, (2, 16))
    model(input_ids=ids, labels=ids).loss.backward()
    opt.step()
    for name, p in model.named_parameters():  # the INT8 codes and scales too (frozen Parameters, written in backward)
        if not name.endswith(".anchor"):  # the anchor is always 0
            assert not torch.equal(before[name], p), f"{name} was not updated"
    names = {g["name"] for g in opt.param_groups}
    assert names == {"qgalore", "adamw"} and all("lr" in g for g in opt.param_groups)


def test_scheduler_drives_projected_layers():
    model = one_linear()
    opt = qgalore_fx.optimizer(model, lr=1e-2)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0 if step == 0 else 0.0)
    layer = layer_of(model)
    model(torch.randn(4, 32)).sum().backward()
    opt.step()
    opt.zero_grad()
    sched.step()
    assert opt.param_groups[0]["lr"] == 0.0
    codes = layer.weight_codes.clone()
    model(torch.randn(4, 32)).sum().backward()
    assert torch.equal(layer.weight_codes, codes)  # lr 0: the fused update in backward moved nothing


def test_adaptive_refresh_doubles_interval_on_a_stable_subspace():
    model = one_linear(rank=2, update_interval=1, queue_size=2, cos_threshold=0.4, stochastic_round=False)
    opt = qgalore_fx.optimizer(model, lr=1e-4)
    layer = layer_of(model)
    x = torch.randn(64, 32)
    for _ in range(8):
        model(x).pow(2).sum().backward()  # the same data: the gradient subspace barely moves
        opt.step()
        opt.zero_grad()
    stats = opt.layer_stats()["0"]
    assert stats["interval"] >= 2 and stats["last_similarity"] > 0.9
    assert stats["refresh_count"] < 8
    frozen = one_linear(rank=2, update_interval=1, queue_size=2, adaptive=False)
    opt = qgalore_fx.optimizer(frozen, lr=1e-4)
    for _ in range(8):
        frozen(x).pow(2).sum().backward()
        opt.step()
        opt.zero_grad()
    assert opt.layer_stats()["0"]["interval"] == 1 and opt.layer_stats()["0"]["refresh_count"] == 8


SWITCHES = [
    dict(),
    dict(weight_bits=16),
    dict(weight_bits=32),
    dict(proj_bits=8),
    dict(proj_bits=16),
    dict(stochastic_round=False),
    dict(adaptive=False),
    dict(optim_bits=32),
    dict(fused=False),
    dict(proj_method="full"),
    dict(proj_method="randomized"),
    dict(proj_side="long"),
]


@pytest.mark.parametrize("switch", SWITCHES, ids=lambda d: ",".join(f"{k}={v}" for k, v in d.items()) or "defaults")
def test_each_switch_trains_a_regression(switch):
    torch.manual_seed(123)  # a teacher different from the student's initialization
    teacher = nn.Linear(32, 48)
    model = one_linear(rank=16, update_interval=5, **switch)
    opt = qgalore_fx.optimizer(model, lr=3e-2)
    layer = layer_of(model)
    expected_dtype = {8: torch.int8, 16: torch.bfloat16, 32: torch.float32}[switch.get("weight_bits", 8)]
    assert layer.weight_codes.dtype == expected_dtype
    losses = []
    for _ in range(60):
        x = torch.randn(32, 32)
        loss = (model(x) - teacher(x).detach()).pow(2).mean()
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert math.isfinite(losses[-1]) and sum(losses[-5:]) / 5 < 0.6 * sum(losses[:5]) / 5


def test_optimizer_state_dict_round_trip_is_exact(llama):
    ids = torch.randint(0, 128, (4, 2, 16))

    def run(model, opt, batches):
        for b in batches:
            model(input_ids=b, labels=b).loss.backward()
            opt.step()
            opt.zero_grad()

    model = qgalore_fx.transform(llama, rank=8, update_interval=2)
    model.train()
    opt = qgalore_fx.optimizer(model, lr=1e-2)
    run(model, opt, ids[:2])
    saved_model = copy.deepcopy(model.state_dict())
    saved_opt = copy.deepcopy(opt.state_dict())
    run(model, opt, ids[2:])

    fresh = qgalore_fx.transform(tiny_llama(), rank=8, update_interval=2)
    fresh.train()
    fresh.load_state_dict(saved_model)
    fresh_opt = qgalore_fx.optimizer(fresh, lr=1e-2)
    fresh_opt.load_state_dict(saved_opt)
    run(fresh, fresh_opt, ids[2:])
    for (name, a), (_, b) in zip(model.state_dict().items(), fresh.state_dict().items()):
        assert torch.equal(a, b), name
    assert opt.layer_stats() == fresh_opt.layer_stats() or all(
        {k: v for k, v in opt.layer_stats()[n].items() if k != "refresh_seconds"}
        == {k: v for k, v in fresh_opt.layer_stats()[n].items() if k != "refresh_seconds"}
        for n in opt.layer_stats())


def test_optimizer_rejects_bad_hyperparameters():
    model = one_linear()
    with pytest.raises(ValueError, match="lr"):
        qgalore_fx.optimizer(model, lr=-1)
    with pytest.raises(ValueError, match="betas"):
        qgalore_fx.optimizer(model, betas=(0.9, 1.0))
    with pytest.raises(ValueError, match="eps"):
        qgalore_fx.optimizer(model, eps=0)
    with pytest.raises(ValueError, match="accumulation_steps"):
        qgalore_fx.optimizer(model, accumulation_steps=0)
    with pytest.raises(ValueError, match="transform"):
        qgalore_fx.optimizer(nn.Linear(3, 3))


def test_layer_state_of_another_rank_is_rejected_before_anything_changes(tmp_path):
    model8 = one_linear(rank=8)
    opt8 = qgalore_fx.optimizer(model8, lr=1e-2)
    model8(torch.randn(4, 32)).sum().backward()
    opt8.step()
    qgalore_fx.save_checkpoint(tmp_path / "r8", model8, opt8)
    model4 = one_linear(rank=4)
    opt4 = qgalore_fx.optimizer(model4, lr=1e-2)
    model4(torch.randn(4, 32)).sum().backward()
    opt4.step()
    before = {k: v.clone() for k, v in model4.state_dict().items()}
    with pytest.raises(qgalore_fx.checkpoint.CheckpointMismatchError, match="rank: checkpoint 8, model 4"):
        qgalore_fx.load_checkpoint(tmp_path / "r8", model4, opt4)
    after = model4.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_rest_lr_sets_the_adamw_group():
    model = one_linear()
    opt = qgalore_fx.optimizer(model, lr=1e-2, rest_lr=1e-3)
    lrs = {g["name"]: g["lr"] for g in opt.param_groups}
    assert lrs == {"qgalore": 1e-2, "adamw": 1e-3}
    with pytest.raises(ValueError, match="lr"):
        qgalore_fx.optimizer(model, rest_lr=-1.0)


@pytest.mark.parametrize("option,value", [("lr", float("inf")), ("lr", float("nan")), ("eps", float("inf")),
                                          ("weight_decay", float("inf")), ("rest_lr", float("inf")),
                                          ("betas", (0.9, float("nan"))), ("lr", "0.1")])
def test_non_finite_hyperparameters_are_rejected_naming_the_option(option, value):
    model = one_linear()
    with pytest.raises(ValueError, match=option):
        qgalore_fx.optimizer(model, **{option: value})


def test_non_finite_learning_rate_at_run_time_skips_every_update():
    """A broken scheduler writing NaN: projected layers and the AdamW group skip, weights and states untouched."""
    model, opt, layer = after_one_step()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    for group in opt.param_groups:
        group["lr"] = float("nan")
    model(torch.randn(4, 32)).pow(2).sum().backward()
    opt.step()
    opt.zero_grad()
    after = model.state_dict()
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert sorted(changed) == ["0._extra_state", "0.skipped"]  # the attempt and skip counters only
    assert opt.skipped_updates == 2 and torch.isfinite(layer.dequantized_weight()).all()


@pytest.mark.parametrize("m,n,block_size", [(48, 32, 256), (50, 33, 16), (30, 50, 16)])
def test_chunked_write_back_equals_one_piece(monkeypatch, m, n, block_size):
    """The weight is rewritten in row chunks of whole blocks; the result equals rewriting it at once."""
    from qgalore_fx import lowrank

    finals = {}
    for chunk in (1 << 20, 64):
        monkeypatch.setattr(lowrank, "WRITE_CHUNK", chunk)
        model = one_linear(m=m, n=n, rank=4, stochastic_round=False, block_size=block_size)
        opt = qgalore_fx.optimizer(model, lr=1e-2, weight_decay=0.1)
        torch.manual_seed(5)
        for _ in range(3):
            model(torch.randn(8, n)).pow(2).sum().backward()
            opt.step()
            opt.zero_grad()
        finals[chunk] = (layer_of(model).weight_codes.clone(), layer_of(model).weight_scales.clone())
    assert len(list(lowrank._row_chunks(m, n, block_size))) > 1  # the small chunk really split the rows
    (codes_a, scales_a), (codes_b, scales_b) = finals.values()
    torch.testing.assert_close(scales_b, scales_a, atol=0, rtol=1e-6)
    assert (codes_a.int() - codes_b.int()).abs().max() <= 1 and (codes_a != codes_b).float().mean() < 0.01


@pytest.mark.parametrize("optim_bits", [8, 32])
def test_chunked_adamw_of_the_rest_equals_one_piece(monkeypatch, llama, optim_bits):
    """The AdamW group runs over chunks of whole moment blocks; the result is bit-identical to one piece."""
    from qgalore_fx import optim as optim_module

    base = qgalore_fx.transform(llama, rank=8, optim_bits=optim_bits)
    base.train()
    results = []
    for chunk in (1 << 20, 768):  # 768 = 3 blocks: the 128 x 64 embedding (8192 elements) splits into 11 chunks
        monkeypatch.setattr(optim_module, "ADAMW_CHUNK", chunk)
        model = copy.deepcopy(base)
        opt = qgalore_fx.optimizer(model, lr=1e-2, weight_decay=0.1)
        for seed in range(3):
            ids = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(seed))
            model(input_ids=ids, labels=ids).loss.backward()
            opt.step()
            opt.zero_grad()
        assert {s["adam"].bits for s in opt.state.values()} == ({8, 32} if optim_bits == 8 else {32})
        results.append({n: p.detach().clone() for n, p in model.named_parameters()})
    assert all(torch.equal(results[0][n], results[1][n]) for n in results[0])


@pytest.mark.parametrize("m,n", [(96, 80), (80, 96)])
@pytest.mark.parametrize("method", ["randomized", "subspace"])
def test_a_refresh_with_few_tokens_never_forms_G_and_trains_as_the_formed_one(monkeypatch, m, n, method):
    """T (m + n) < m n: the refresh applies G through its factors; fp32 weights and moments, so the two runs are
    compared to float rounding over refreshes (interval 2) and steady steps."""
    options = dict(rank=5, update_interval=2, weight_bits=32, optim_bits=32, stochastic_round=False,
                   proj_method=method, adaptive=False)
    gen = torch.Generator().manual_seed(0)
    basis = torch.randn(16, n, generator=gen) * torch.logspace(0, -2, 16)[:, None]  # inputs with a spectral gap,
    data = [torch.randn(16, 16, generator=gen) @ basis for _ in range(6)]  # so no refresh is a near tie
    assert proj.FactoredGradient.cheaper(16, m, n)

    def run(factored: bool):
        torch.manual_seed(0)
        model = qgalore_fx.transform(nn.Sequential(nn.Linear(n, m, bias=False)), **options)
        starts.append(layer_of(model).dequantized_weight().clone())
        opt = qgalore_fx.optimizer(model, lr=1e-2)
        for x in data:
            model(x).pow(2).sum().backward()
            opt.step()
            opt.zero_grad()
        return layer_of(model).dequantized_weight().clone(), layer_of(model).stats()["refresh_count"]

    made, starts = [], []
    real_init = proj.FactoredGradient.__init__
    monkeypatch.setattr(proj.FactoredGradient, "__init__",
                        lambda self, *a: (made.append(1), real_init(self, *a))[1])
    factored, refreshes = run(True)
    assert made and refreshes == 3
    monkeypatch.setattr(proj.FactoredGradient, "cheaper", staticmethod(lambda *a: False))
    formed, _ = run(False)
    assert float((factored - formed).norm() / (formed - starts[0]).norm()) < 1e-4


def test_adams_direction_is_written_over_R_chunk_by_chunk(monkeypatch):
    """The update holds one R-sized tensor: N goes over the R it came from, chunk by chunk, with the same values
    as a separate N, and the same moments."""
    from qgalore_fx import lowrank
    from qgalore_fx.kernels.adam8bit import AdamState

    monkeypatch.setattr(lowrank, "ADAM_CHUNK", 4096)  # 4 chunks
    R = torch.randn(64, 256, generator=torch.Generator().manual_seed(0))
    args = (torch.tensor(3), 0.9, 0.999, 1e-8, torch.tensor(True))
    a, b = AdamState.zeros(R.shape), AdamState.zeros(R.shape)
    expect = lowrank._adam_direction(R.clone().t().contiguous().t(), b, *args)  # not contiguous: a separate N
    R_in = R.clone()
    N = lowrank._adam_direction(R_in, a, *args)
    assert N.data_ptr() == R_in.data_ptr()
    assert torch.equal(N, expect) and not torch.equal(N, R)
    assert torch.equal(a.m, b.m) and torch.equal(a.v, b.v)
