"""A steady-state training step performs no host synchronization of qgalore_fx's own.

``aten::_local_scalar_dense`` is the op behind ``.item()``, ``bool(t)``, ``float(t)`` and ``int(t)`` on a
tensor: on a GPU each one waits for the stream. The profiler counts them on the CPU too, so this test
guards the property without a GPU.
"""

import torch
from torch.profiler import ProfilerActivity, profile

import qgalore_fx
from conftest import tiny_llama


def _syncs(fn) -> int:
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    return sum(1 for e in prof.events() if e.name == "aten::_local_scalar_dense")


def _batch():
    return torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(0))


def test_steady_state_step_adds_no_host_sync():
    ids = _batch()
    plain = tiny_llama()

    def plain_fwd_bwd():
        plain(input_ids=ids, labels=ids).loss.backward()

    baseline = _syncs(plain_fwd_bwd)

    model = qgalore_fx.transform(tiny_llama(), rank=8, update_interval=1000)
    model.train()
    opt = qgalore_fx.optimizer(model, lr=1e-3, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0 / (1 + step))

    def step():
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
        sched.step()

    for _ in range(2):  # the first step refreshes every subspace (allowed to synchronize) and creates AdamW state
        step()
    assert {s["refresh_count"] for s in opt.layer_stats().values()} == {1}
    ours = _syncs(step)
    assert {s["refresh_count"] for s in opt.layer_stats().values()} == {1}  # it was a steady-state step
    assert {s["step"] for s in opt.layer_stats().values()} == {3}
    assert ours <= baseline, (ours, baseline)


def test_refresh_step_is_where_synchronization_happens():
    """The counter above can fail: a refresh step (data-dependent SVD and schedule) is seen to synchronize."""
    ids = _batch()
    model = qgalore_fx.transform(tiny_llama(), rank=8, update_interval=1000)
    opt = qgalore_fx.optimizer(model, lr=1e-3)

    def step():
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()

    plain = tiny_llama()
    baseline = _syncs(lambda: plain(input_ids=ids, labels=ids).loss.backward())
    assert _syncs(step) > baseline  # step 0 refreshes all 14 layers


def test_non_finite_gradient_is_skipped_without_synchronizing():
    ids = _batch()
    model = qgalore_fx.transform(tiny_llama(), rank=8, update_interval=1000)
    opt = qgalore_fx.optimizer(model, lr=1e-3)
    model(input_ids=ids, labels=ids).loss.backward()
    opt.step()
    opt.zero_grad()
    before = {k: v.clone() for k, v in model.state_dict().items()}

    def nan_step():
        (model(input_ids=ids, labels=ids).loss * float("nan")).backward()
        opt.step()
        opt.zero_grad()

    plain = tiny_llama()
    baseline = _syncs(lambda: plain(input_ids=ids, labels=ids).loss.backward())
    assert _syncs(nan_step) <= baseline
    after = model.state_dict()
    changed = [k for k in before if not torch.equal(before[k], after[k])
               and not k.endswith(("._extra_state", ".skipped"))]
    assert changed == []  # weights, moments and projections untouched; only the counters moved
    assert opt.skipped_updates == 14 + 1  # every projected layer and the AdamW group
