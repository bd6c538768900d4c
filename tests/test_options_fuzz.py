"""Fuzz transform()/optimizer() options: invalid ones raise a clear error naming the option, valid ones train."""

import dataclasses
import sys

import pytest
import torch
import torch.nn as nn
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import qgalore_fx
from qgalore_fx.config import QGaLoreConfig

VALID = {
    "update_interval": st.integers(1, 5),
    "cos_threshold": st.floats(0.0, 1.0),
    "queue_size": st.integers(1, 4),
    "adaptive": st.booleans(),
    "weight_bits": st.sampled_from([8, 16, 32]),
    "proj_bits": st.sampled_from([4, 8, 16, 32]),
    "stochastic_round": st.booleans(),
    "optim_bits": st.sampled_from([8, 32]),
    "fused": st.booleans(),
    "scale": st.floats(0.01, 2.0),
    "block_size": st.sampled_from([2, 64, 256]),
    "proj_block_size": st.sampled_from([2, 64, 256]),
    "proj_method": st.sampled_from(["subspace", "randomized", "full"]),
    "seed": st.integers(0, 2**31),
}
INVALID = {
    "update_interval": st.one_of(st.integers(-5, 0), st.floats(0.5, 3.0), st.just("200"), st.just(True)),
    "cos_threshold": st.one_of(st.floats(1.01, 5.0), st.floats(-5.0, -0.01), st.just("0.4")),
    "queue_size": st.one_of(st.integers(-3, 0), st.just(2.0)),
    "adaptive": st.one_of(st.just(1), st.just("yes"), st.none()),
    "weight_bits": st.one_of(st.sampled_from([0, 1, 4, 7, 9, 64]), st.just(8.0)),
    "proj_bits": st.sampled_from([0, 2, 3, 64, "4"]),
    "stochastic_round": st.one_of(st.just(0), st.just("true")),
    "optim_bits": st.sampled_from([4, 16, 64, None]),
    "fused": st.just("no"),
    "scale": st.one_of(st.floats(-2.0, 0.0), st.just("0.25"), st.just(float("nan"))),
    "block_size": st.one_of(st.integers(-4, 1), st.sampled_from([3, 255, 257])),
    "proj_method": st.text(max_size=8).filter(lambda s: s not in ("subspace", "randomized", "full")),
    "seed": st.one_of(st.integers(-10, -1), st.just(1.5)),
}


def model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 24), nn.ReLU(), nn.Linear(24, 16))


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(options=st.fixed_dictionaries({}, optional=VALID), rank=st.integers(1, 16))
def test_valid_options_train_one_step(options, rank):
    m = qgalore_fx.transform(model(), rank=rank, **options)
    opt = qgalore_fx.optimizer(m, lr=1e-3)
    m(torch.randn(4, 16)).pow(2).mean().backward()
    opt.step()
    for _, layer in qgalore_fx.projected_layers(m):
        assert torch.isfinite(layer.dequantized_weight()).all()
        stats = layer.stats()
        assert stats["step"] + stats["pending"] >= 1 and stats["skipped_updates"] == 0


@settings(max_examples=60, deadline=None)
@given(data=st.data(), name=st.sampled_from(sorted(INVALID)))
def test_invalid_option_names_the_option(data, name):
    value = data.draw(INVALID[name])
    try:
        qgalore_fx.transform(model(), rank=4, **{name: value})
    except (ValueError, TypeError) as e:
        assert name in str(e), (name, value, str(e))
    else:
        raise AssertionError(f"{name}={value!r} was accepted")


@settings(max_examples=30, deadline=None)
@given(name=st.text(alphabet="abcdefghijklmnopqrstuvwxyz_", min_size=1, max_size=12))
def test_unknown_option_names_are_rejected(name):
    known = {f.name for f in dataclasses.fields(QGaLoreConfig)} | {"config", "weights", "device", "rank"}
    if name in known:
        return
    try:
        qgalore_fx.transform(model(), rank=4, **{name: 1})
    except TypeError as e:
        assert "unknown option" in str(e) and name in str(e)
    else:
        raise AssertionError(f"unknown option {name!r} was accepted")


@settings(max_examples=30, deadline=None)
@given(lr=st.one_of(st.floats(-1.0, -1e-9), st.just(float("nan")), st.just("1e-3")),
       beta=st.one_of(st.floats(1.0, 2.0), st.floats(-1.0, -1e-6)))
def test_invalid_optimizer_hyperparameters(lr, beta):
    m = qgalore_fx.transform(model(), rank=4)
    try:
        qgalore_fx.optimizer(m, lr=lr)
    except (ValueError, TypeError) as e:
        assert "lr" in str(e)
    else:
        raise AssertionError(f"lr={lr!r} was accepted")
    try:
        qgalore_fx.optimizer(m, betas=(0.9, beta))
    except ValueError as e:
        assert "betas" in str(e)
    else:
        raise AssertionError(f"betas=(0.9, {beta!r}) was accepted")


# ---------------------------------------------------------------------------------------------- all or nothing
def _model_state(m):
    """Module types by name and every tensor of the state dict (cloned), to compare before and after."""
    return ([(n, type(mod)) for n, mod in m.named_modules(remove_duplicate=False)],
            {k: v.clone() for k, v in m.state_dict().items()})


def _assert_unchanged(m, before):
    types, state = _model_state(m)
    assert types == before[0]
    assert state.keys() == before[1].keys()
    assert all(torch.equal(state[k], before[1][k]) for k in state)
    assert not qgalore_fx.is_transformed(m)


OUT_OF_RANGE = {
    "update_interval": st.one_of(st.integers(2**53, 2**70), st.just(10**30)),
    "queue_size": st.one_of(st.integers(4097, 2**40), st.just(10**9)),
    "seed": st.integers(2**53, 2**80),
    "block_size": st.integers(2**21, 2**40).map(lambda b: b * 2),
    "proj_block_size": st.integers(2**21, 2**40).map(lambda b: b * 2),
    "scale": st.one_of(st.floats(1000.5, 1e300), st.just(float("inf"))),
    "cos_threshold": st.one_of(st.just(float("nan")), st.just(float("inf")), st.floats(1.0001, 1e300)),
    "rank": st.one_of(st.integers(17, 2**70), st.just(10**30)),
}


@settings(max_examples=40, deadline=None)
@given(data=st.data(), name=st.sampled_from(sorted(OUT_OF_RANGE)))
def test_out_of_range_option_is_named_and_the_model_is_untouched(data, name):
    value = data.draw(OUT_OF_RANGE[name])
    m = model()
    before = _model_state(m)
    options = {"rank": 4, name: value}
    try:
        qgalore_fx.transform(m, **options)
    except (ValueError, TypeError) as e:
        assert name in str(e), (name, value, str(e))
    else:
        raise AssertionError(f"{name}={value!r} was accepted")
    _assert_unchanged(m, before)
    qgalore_fx.transform(m, rank=4)  # and the model can still be transformed


def test_queue_and_interval_at_their_bounds_are_accepted():
    from qgalore_fx.config import MAX_COUNTER, MAX_QUEUE_SIZE

    m = qgalore_fx.transform(model(), rank=4, update_interval=MAX_COUNTER, queue_size=MAX_QUEUE_SIZE)
    opt = qgalore_fx.optimizer(m, lr=1e-3)
    m(torch.randn(4, 16)).pow(2).mean().backward()
    opt.step()
    assert {s["step"] for s in opt.layer_stats().values()} == {1}


class _Midway(RuntimeError):
    pass


def _fail_on_call(monkeypatch, target, attr, call):
    """Make ``target.attr`` raise on its ``call``-th call (1-based)."""
    original = getattr(target, attr)
    calls = []

    def failing(*args, **kwargs):
        calls.append(1)
        if len(calls) == call:
            raise _Midway(f"{attr} failed")
        return original(*args, **kwargs)

    monkeypatch.setattr(target, attr, failing)


def _hf_model():
    from conftest import tiny_llama

    return tiny_llama()


@pytest.mark.parametrize("where", ["second layer built", "second layer's update state", "last layer's update state",
                                   "pass 2"])
@pytest.mark.parametrize("build", [model, _hf_model], ids=["sequential", "llama"])
def test_a_failure_midway_restores_the_model_exactly(monkeypatch, where, build):
    from qgalore_fx.layers import QGaLoreLinear

    m = build()
    before = _model_state(m)
    params = {n: p for n, p in m.named_parameters()}
    layers = len(qgalore_fx.projected_layers(qgalore_fx.transform(build(), rank=4)))
    if where == "second layer built":  # pass 1: a handler builds each projected layer whole
        _fail_on_call(monkeypatch, QGaLoreLinear, "projected", 2)
    elif where == "pass 2":  # wiring the first graph's op calls to their layers' state
        _fail_on_call(monkeypatch, sys.modules["qgalore_fx.rewrite"], "fuse_update", 1)
    else:
        _fail_on_call(monkeypatch, QGaLoreLinear, "enable_update", 2 if where.startswith("second") else layers)
    with pytest.raises(_Midway):
        qgalore_fx.transform(m, rank=4)
    monkeypatch.undo()
    _assert_unchanged(m, before)
    assert all(p is params[n] for n, p in m.named_parameters())  # the same Parameter objects, weights included
    done = qgalore_fx.transform(m, rank=4)  # a second transform is not refused
    fresh = qgalore_fx.transform(build(), rank=4)
    a, b = done.state_dict(), fresh.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("kwargs, name", [
    ({"betas": None}, "betas"), ({"betas": "ab"}, "betas"), ({"betas": (0.9,)}, "betas"), ({"betas": 0.9}, "betas"),
    ({"eps": None}, "eps"), ({"weight_decay": "0"}, "weight_decay"), ({"accumulation_steps": None}, "accumulation_steps"),
    ({"rest_lr": float("inf")}, "rest_lr"), ({"optim_bits": 4}, "optim_bits"), ({"reduce": None}, "reduce"),
])
def test_optimizer_argument_errors_name_the_argument(kwargs, name):
    m = qgalore_fx.transform(model(), rank=4)
    with pytest.raises((TypeError, ValueError), match=name):
        qgalore_fx.optimizer(m, **kwargs)


@pytest.mark.parametrize("bad", [None, "model", nn.Linear(4, 4)])
def test_optimizer_of_something_not_transformed_names_the_model(bad):
    with pytest.raises((TypeError, ValueError), match="model") as info:
        qgalore_fx.optimizer(bad)
    assert "qgalore_fx.transform" in str(info.value)
