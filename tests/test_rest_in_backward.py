"""``qgalore_fx.optimizer(model, rest_in_backward=True)``: the AdamW group updated inside backward."""

import math
import warnings

import pytest
import torch

import qgalore_fx
from conftest import tiny_llama

VOCAB = 128


def _ids(seed):
    return torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(seed))


def _model():
    # vocabulary 512 x hidden 64: the embedding and head have 32k elements, so their moments take the 8-bit path
    return qgalore_fx.transform(tiny_llama(vocab=512), rank=8)


def _train(model, opt, steps, schedule=None):
    for i in range(steps):
        ids = _ids(i) * 4
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
        if schedule is not None:
            schedule.step()


@pytest.mark.parametrize("optim_bits", [8, 32])
def test_same_numbers_as_updating_at_step(optim_bits):
    models, opts = [], []
    for in_backward in (False, True):
        model = _model().train()
        opt = qgalore_fx.optimizer(model, lr=1e-2, rest_lr=3e-3, weight_decay=0.1, optim_bits=optim_bits,
                                   rest_in_backward=in_backward)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1 + s))
        _train(model, opt, 4, sched)
        models.append(model)
        opts.append(opt)
    a, b = (m.state_dict() for m in models)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    sa, sb = (o.state_dict() for o in opts)
    for i in sa["state"]:
        assert torch.equal(sa["state"][i]["step"], sb["state"][i]["step"])
        for name, t in sa["state"][i].get("adam", {}).items():  # a projected layer's entry is its step alone
            if isinstance(t, torch.Tensor):
                assert torch.equal(t, sb["state"][i]["adam"][name]), (i, name)
    assert sa["state"] and all(int(v["step"]) == 4 for v in sb["state"].values())


def test_gradients_are_freed_as_soon_as_they_are_used():
    model = _model().train()
    head, embed = model.lm_head.weight, model.model.embed_tokens.weight
    seen = {}
    # registered after the optimizer's hook: runs right after the head's update
    opt = qgalore_fx.optimizer(model, lr=1e-2, rest_in_backward=True)
    head.register_post_accumulate_grad_hook(lambda p: seen.setdefault("head_grad_after_update", p.grad))
    embed.register_post_accumulate_grad_hook(lambda p: seen.setdefault("head_grad_at_embedding", head.grad))
    before = head.detach().clone()
    ids = _ids(0)
    model(input_ids=ids, labels=ids).loss.backward()
    assert seen == {"head_grad_after_update": None, "head_grad_at_embedding": None}
    assert not torch.equal(head, before)  # already updated, before step()
    assert all(p.grad is None for p in opt.param_groups[1]["params"])
    opt.step()
    assert opt.skipped_steps == 0


def test_a_second_backward_before_step_is_refused():
    model = _model().train()
    opt = qgalore_fx.optimizer(model, lr=1e-2, rest_in_backward=True)
    ids = _ids(0)
    model(input_ids=ids, labels=ids).loss.backward()
    with pytest.raises(RuntimeError, match="second"):
        model(input_ids=ids, labels=ids).loss.backward()
    opt.step()  # the next step works again
    opt.zero_grad()
    model(input_ids=ids, labels=ids).loss.backward()
    opt.step()


def test_non_finite_gradient_skips_that_parameter_and_counts_the_step():
    model = _model().train()
    opt = qgalore_fx.optimizer(model, lr=1e-2, rest_in_backward=True)
    norm = model.model.norm.weight
    # a gradient hook runs before the gradient is accumulated, so before the optimizer's post-accumulate hook
    norm.register_hook(lambda g: torch.full_like(g, float("nan")))
    norm_before, head_before = norm.detach().clone(), model.lm_head.weight.detach().clone()
    ids = _ids(0)
    model(input_ids=ids, labels=ids).loss.backward()
    opt.step()
    assert torch.equal(norm, norm_before)
    assert not torch.equal(model.lm_head.weight, head_before)
    assert opt.skipped_steps == 1
    assert torch.isfinite(norm).all()


@pytest.mark.parametrize("kwargs, message", [
    (dict(accumulation_steps=2), "accumulation_steps=1"),
    (dict(rest_in_backward=1), "rest_in_backward must be True, False or None"),
])
def test_bad_combinations(kwargs, message):
    model = _model()
    kwargs.setdefault("rest_in_backward", True)
    with pytest.raises((ValueError, TypeError), match=message):
        qgalore_fx.optimizer(model, lr=1e-2, **kwargs)


# --------------------------------------------------------------------------- the default: on where valid and it pays
@pytest.fixture
def unannounced(monkeypatch):
    """The notice of the default turning rest_in_backward on is once per process: make this test the first."""
    monkeypatch.setattr(qgalore_fx.optim, "_ANNOUNCED", False)


def test_default_is_on_where_a_weight_is_fused_and_announced_once(fused_everywhere, unannounced):
    with pytest.warns(UserWarning, match="updated inside backward.*rest_in_backward=False"):
        opt = qgalore_fx.optimizer(_model().train(), lr=1e-2)
    assert opt.rest_in_backward and _fused_modules(opt) == ["Embedding", "Linear"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the second optimizer of the process says nothing
        assert qgalore_fx.optimizer(_model().train(), lr=1e-2).rest_in_backward


def test_default_computes_what_rest_in_backward_true_does(fused_everywhere, unannounced):
    models = []
    for flag in (None, True):
        model = _model().train()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            opt = qgalore_fx.optimizer(model, lr=1e-2, rest_lr=3e-3, rest_in_backward=flag)
        _train(model, opt, 3)
        models.append(model.state_dict())
    assert all(torch.equal(models[0][k], models[1][k]) for k in models[0])


def test_default_is_off_without_a_weight_large_enough(unannounced):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing to announce: the step path, as before
        opt = qgalore_fx.optimizer(_model().train(), lr=1e-2)
    assert not opt.rest_in_backward and not opt._rest_hooks and not opt._fused_modules


def test_default_falls_back_under_accumulation_with_a_notice(fused_everywhere, unannounced):
    model = _model().train()
    with pytest.warns(UserWarning, match="accumulation_steps=2 sums their gradients"):
        opt = qgalore_fx.optimizer(model, lr=1e-2, accumulation_steps=2)
    assert not opt.rest_in_backward and not opt._fused_modules
    for i in range(2):  # two micro-batches, then one step: every gradient is there to be summed
        ids = _ids(i)
        model(input_ids=ids, labels=ids).loss.backward()
    assert model.lm_head.weight.grad is not None and model.model.embed_tokens.weight.grad is not None
    opt.step()
    assert opt.skipped_steps == 0


def test_default_falls_back_under_a_process_group_with_a_notice(fused_everywhere, unannounced, tmp_path):
    import torch.distributed as dist

    store = dist.FileStore(str(tmp_path / "store"), 1)
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:
        with pytest.warns(UserWarning, match="torch.distributed averages their gradients"):
            opt = qgalore_fx.optimizer(_model().train(), lr=1e-2, process_group=dist.group.WORLD)
        assert not opt.rest_in_backward and not opt._fused_modules
    finally:
        dist.destroy_process_group()


# --------------------------------------------------------------------------- embedding and head without a gradient
@pytest.fixture
def fused_everywhere(monkeypatch):
    """Route this tiny model's embedding and head (512 x 64) through the fused backward."""
    from qgalore_fx import fused_rest, optim

    monkeypatch.setattr(fused_rest, "FUSED_MIN_NUMEL", 1)
    monkeypatch.setattr(optim, "ADAMW_CHUNK", 4096)  # several row chunks per weight


def _fused_modules(opt):
    return sorted(type(m).__name__ for m in opt._fused_modules)


@pytest.mark.parametrize("optim_bits", [8, 32])
def test_fused_embedding_and_head_train_as_the_step_path(fused_everywhere, optim_bits):
    models = []
    for in_backward in (False, True):
        model = _model().train()
        opt = qgalore_fx.optimizer(model, lr=1e-2, rest_lr=3e-3, weight_decay=0.1, optim_bits=optim_bits,
                                   rest_in_backward=in_backward)
        if in_backward:
            assert _fused_modules(opt) == ["Embedding", "Linear"]
        _train(model, opt, 4, torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1 + s)))
        models.append(model)
    a, b = (m.state_dict() for m in models)
    for k in ("model.embed_tokens.weight", "lm_head.weight"):
        moved = (a[k] - _model().state_dict()[k]).norm()
        assert float((a[k] - b[k]).norm()) < 1e-4 * float(moved), k  # another summation order only
    for k in a:
        if a[k].dtype in (torch.int8, torch.uint8):
            assert (a[k].int() - b[k].int()).abs().float().mean() < 0.01, k


def test_fused_weights_never_have_a_gradient_and_update_before_step(fused_everywhere):
    model = _model().train()
    opt = qgalore_fx.optimizer(model, lr=1e-2, rest_in_backward=True)
    head, embed = model.lm_head.weight, model.model.embed_tokens.weight
    before = head.detach().clone(), embed.detach().clone()
    ids = _ids(0)
    model(input_ids=ids, labels=ids).loss.backward()
    assert head.grad is None and embed.grad is None
    assert not torch.equal(head, before[0]) and not torch.equal(embed, before[1])
    untouched = torch.ones(512, dtype=torch.bool)
    untouched[ids.reshape(-1)] = False
    # AdamW's first step moves only rows with a gradient (m is zero elsewhere; no weight decay here)
    assert torch.equal(embed[untouched], before[1][untouched])
    with pytest.raises(RuntimeError, match="second gradient"):
        model(input_ids=ids, labels=ids).loss.backward()
    opt.step()
    assert opt.skipped_steps == 0


def test_fused_non_finite_gradient_skips_and_counts(fused_everywhere):
    model = _model().train()
    opt = qgalore_fx.optimizer(model, lr=1e-2, rest_in_backward=True)
    head_before = model.lm_head.weight.detach().clone()
    ids = _ids(0)
    logits = model(input_ids=ids).logits
    (logits.sum() * float("nan")).backward()
    opt.step()
    assert torch.equal(model.lm_head.weight, head_before)
    assert opt.skipped_steps == 1


def test_fused_routing_is_not_copied_and_ends_with_the_optimizer(fused_everywhere):
    import copy
    import pickle

    model = _model().train()
    opt = qgalore_fx.optimizer(model, lr=1e-2, rest_in_backward=True)
    twin = copy.deepcopy(model)
    assert "forward" not in twin.lm_head.__dict__ or not hasattr(twin.lm_head.forward, "_update")
    restored = pickle.loads(pickle.dumps(model))
    ids = _ids(0)
    restored(input_ids=ids, labels=ids).loss.backward()  # a plain model: ordinary gradients
    assert restored.lm_head.weight.grad is not None
    del opt
    model.zero_grad()
    model(input_ids=ids, labels=ids).loss.backward()
    assert model.lm_head.weight.grad is not None  # the optimizer is gone: the plain forward again


def test_tied_weights_keep_the_hook(fused_everywhere):
    model = qgalore_fx.transform(tiny_llama(vocab=512), rank=8)
    model.lm_head.weight = model.model.embed_tokens.weight
    opt = qgalore_fx.optimizer(model, lr=1e-2, rest_in_backward=True)
    assert _fused_modules(opt) == []
    ids = _ids(0)
    model(input_ids=ids, labels=ids).loss.backward()
    assert model.lm_head.weight.grad is None  # updated and freed by the hook
    opt.step()


# --------------------------------------------------------------------------- bf16 storage of embedding and head
def test_round_bf16_is_unbiased_and_keeps_bf16_values():
    from qgalore_fx.fused_rest import round_bf16_

    lo = torch.tensor(1.0, dtype=torch.bfloat16)
    ulp = 2.0 ** -7  # bf16 spacing in [1, 2)
    for frac in (0.1, 0.5, 0.9):
        for sign in (1.0, -1.0):
            x = torch.full((200_000,), sign * (1.0 + frac * ulp))
            out = torch.empty(x.shape, dtype=torch.bfloat16)
            round_bf16_(out, x, torch.tensor(0))
            assert set(out.abs().float().unique().tolist()) <= {1.0, 1.0 + ulp}
            # mean error within 5 standard errors of the Bernoulli(frac) rounding
            err = float((out.float() - x).mean())
            assert abs(err) < 5 * ulp * (frac * (1 - frac) / x.numel()) ** 0.5
    exact = torch.randn(1000).bfloat16().float()
    out = torch.empty(1000, dtype=torch.bfloat16)
    round_bf16_(out, exact, torch.tensor(1))
    assert torch.equal(out.float(), exact)
    round_bf16_(out, torch.full((1000,), 1.0 + 0.4 * ulp), None)  # nearest
    assert torch.equal(out, lo.expand(1000))


def test_linear_any_dtype_multiplies_in_the_input_dtype(monkeypatch):
    from qgalore_fx import fused_rest

    monkeypatch.setattr(fused_rest, "LINEAR_CHUNK", 64)
    W = torch.randn(40, 16).bfloat16()
    x = torch.randn(3, 5, 16, requires_grad=True)
    y = fused_rest.linear_any_dtype(x, W)
    assert y.dtype == torch.float32
    torch.testing.assert_close(y, x @ W.float().T)
    y.sum().backward()
    torch.testing.assert_close(x.grad, torch.ones(3, 5, 40) @ W.float())


def test_bf16_embedding_and_head_train_close_to_fp32_and_stay_bf16(fused_everywhere):
    losses, weights = {}, {}
    for dtype in (torch.float32, torch.bfloat16):
        model = _model().train()
        model.model.embed_tokens.to(dtype)
        model.lm_head.to(dtype)
        opt = qgalore_fx.optimizer(model, lr=1e-2, rest_lr=3e-3, rest_in_backward=True)
        assert _fused_modules(opt) == ["Embedding", "Linear"]
        for i in range(4):
            ids = _ids(i) * 4
            loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            opt.step()
            opt.zero_grad()
        losses[dtype] = float(loss)
        weights[dtype] = model.lm_head.weight.detach().float().clone()
        assert model.lm_head.weight.dtype == dtype and model.model.embed_tokens.weight.dtype == dtype
        assert model.lm_head.weight.grad is None
    assert math.isfinite(losses[torch.bfloat16]) and abs(losses[torch.bfloat16] - losses[torch.float32]) < 0.05
    start = _model().lm_head.weight.detach()
    moved = float((weights[torch.float32] - start).norm())
    assert float((weights[torch.bfloat16] - weights[torch.float32]).norm()) < 0.05 * moved


def test_bf16_updates_below_resolution_still_move_the_weight(fused_everywhere):
    """lr far below bf16's spacing: nearest rounding would never move the head; stochastic rounding moves a
    fraction of the touched elements by one step each."""
    model = _model().train()
    model.lm_head.to(torch.bfloat16)
    opt = qgalore_fx.optimizer(model, lr=1e-2, rest_lr=1e-6, rest_in_backward=True)
    before = model.lm_head.weight.detach().clone()
    ids = _ids(0)
    model(input_ids=ids, labels=ids).loss.backward()
    opt.step()
    changed = (model.lm_head.weight != before).float().mean().item()
    assert 0.0 < changed < 0.2


@pytest.mark.parametrize("contiguous", [True, False])
def test_a_bf16_parameter_updated_at_step_rounds_stochastically(contiguous):
    """The AdamW of ``opt.step()`` and of the gradient hook (``_masked_adamw_``) writes a bf16 parameter back with
    stochastic rounding, as the fused embedding/head update does: a norm weight at 1.0 moved by Adam's 1e-3 steps
    (a quarter of bf16's spacing below 1) follows the fp32 run on average; rounded to nearest it never moves.
    A step whose ``ok`` is False leaves it bit for bit."""
    from qgalore_fx.kernels.adam8bit import AdamState
    from qgalore_fx.optim import _masked_adamw_

    n, steps, lr = 64 * 64, 10, 1e-3
    grad = torch.ones(64, 64)
    runs = {}
    for dtype in (torch.float32, torch.bfloat16):
        p = torch.ones(64, 64, dtype=dtype)
        if not contiguous:
            p = p.t()
        state, step = AdamState.zeros((n,), bits=8, min_8bit_size=0), torch.zeros((), dtype=torch.int64)
        for _ in range(steps):
            _masked_adamw_(p, grad, state, step, torch.tensor(True), lr, 0.9, 0.999, 1e-8, 0.0, stream=7)
        assert p.dtype == dtype and int(step) == steps
        runs[dtype] = p.float()
    fp32_mean, bf16 = float(runs[torch.float32].mean()), runs[torch.bfloat16]
    assert abs(fp32_mean - (1 - steps * lr)) < 1e-4
    assert abs(float(bf16.mean()) - fp32_mean) < 5e-4  # the mean of 4096 stochastic roundings (std about 1e-4)
    assert set(torch.unique(bf16).tolist()) <= {1.0, 0.99609375, 0.9921875, 0.98828125, 0.984375}
    before = bf16.bfloat16().clone()
    p = before.clone()
    _masked_adamw_(p, grad, state, step, torch.tensor(False), lr, 0.9, 0.999, 1e-8, 0.0, stream=7)
    assert torch.equal(p, before)
