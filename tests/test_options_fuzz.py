"""Fuzz transform()/optimizer() options: invalid ones raise a clear error naming the option, valid ones train."""

import dataclasses

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
