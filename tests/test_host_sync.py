"""A steady-state training step performs no host synchronization of qgalore_fx's own.

``aten::_local_scalar_dense`` is the op behind ``.item()``, ``bool(t)``, ``float(t)`` and ``int(t)`` on a
tensor: on a GPU each one waits for the stream. The profiler counts them on the CPU too, so this test
guards the property without a GPU.
"""

import pathlib

import pytest
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


@pytest.mark.parametrize("options", [{}, {"lean": True}], ids=["default", "lean"])
def test_steady_state_step_adds_no_host_sync(options):
    ids = _batch()
    plain = tiny_llama()

    def plain_fwd_bwd():
        plain(input_ids=ids, labels=ids).loss.backward()

    baseline = _syncs(plain_fwd_bwd)

    model = qgalore_fx.transform(tiny_llama(), rank=8, update_interval=1000, **options)
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


def _host_tensors_of_a_steady_step(write_chunk: int, monkeypatch) -> int:
    """How many tensors a steady-state step builds from host values (``torch.tensor``: ``aten::lift_fresh``, each
    a small host-to-device copy on a GPU), with the weights rewritten ``write_chunk`` elements at a time."""
    from qgalore_fx import lowrank

    monkeypatch.setattr(lowrank, "WRITE_CHUNK", write_chunk)
    ids = _batch()
    model = qgalore_fx.transform(tiny_llama(), rank=8, update_interval=1000)
    model.train()
    opt = qgalore_fx.optimizer(model, lr=1e-3)

    def step():
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()

    for _ in range(2):
        step()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step()
    return sum(1 for e in prof.events() if e.name == "aten::lift_fresh")


def test_write_back_builds_no_host_tensor_per_chunk(monkeypatch):
    """Each write-back chunk's stochastic-rounding offset is computed on the device: rewriting the weights in
    chunks of about 256 elements (several per layer) builds no more host tensors than in one chunk."""
    whole = _host_tensors_of_a_steady_step(1 << 20, monkeypatch)
    chunked = _host_tensors_of_a_steady_step(256, monkeypatch)
    assert chunked == whole, (chunked, whole)


def test_bf16_head_updated_in_its_backward_adds_no_host_sync(monkeypatch):
    """A bf16 head under ``rest_in_backward`` rounds stochastically with draws seeded from its step count, which
    stays on the device (reading it seeded a generator: one synchronization per step)."""
    from qgalore_fx import fused_rest

    monkeypatch.setattr(fused_rest, "FUSED_MIN_NUMEL", 1)  # this tiny head (128 x 64) takes the fused backward
    ids = _batch()
    plain = tiny_llama()
    baseline = _syncs(lambda: plain(input_ids=ids, labels=ids).loss.backward())

    model = qgalore_fx.transform(tiny_llama(), rank=8, update_interval=1000)
    model.train()
    model.lm_head.to(torch.bfloat16)
    opt = qgalore_fx.optimizer(model, lr=1e-3, rest_lr=1e-3, rest_in_backward=True)
    assert model.lm_head in opt._fused_modules

    def step():
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()

    for _ in range(2):  # refreshes and AdamW state
        step()
    before = model.lm_head.weight.detach().clone()
    ours = _syncs(step)
    assert not torch.equal(model.lm_head.weight, before)  # the head was updated in the step measured
    assert ours <= baseline, (ours, baseline)


# --------------------------------------------------------------------------- the application's step loop
def _loop_config(steps: int, **kw):
    from types import SimpleNamespace

    options = dict(steps=steps, log_every=steps, eval_every=0, save_every=0, batch_size=2, seq_len=16,
                   device="cpu", autocast="off", lr=1e-3, warmup=0)
    return SimpleNamespace(**(options | kw))


def _run_loop(model, optimizer, config, saves=None, evaluate=lambda last: (1.0, 1), batches=None):
    from qgalore_fx.app import data as data_lib
    from qgalore_fx.app import loop

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    ids = _batch()
    if batches is None:
        batches = iter(lambda: data_lib.Batch(ids, ids.roll(-1, dims=1)), None)
    progress = loop.Progress()
    metrics = loop.MetricsLog(pathlib.Path("unused"), [], write=False)
    loop.train_steps(model, optimizer, scheduler, batches, progress, config, evaluate=evaluate,
                     save=lambda p: (saves if saves is not None else []).append(p.step), metrics=metrics,
                     times=("step_s",), desc="test", verbose=False)
    return progress


def test_the_loops_steady_steps_add_no_host_sync():
    """``qgalore-fx pretrain``/``finetune`` read the loss (and whether it is finite) at their records only.

    Steps 5 to 8 of a run that records at step 9 cost no more synchronizations than four forward/backward passes
    of the plain model (a per-step ``isfinite(loss)`` check would add one each)."""
    from qgalore_fx.app import data as data_lib
    from qgalore_fx.app import loop

    ids = _batch()
    batch = data_lib.Batch(ids, ids.roll(-1, dims=1))
    plain = tiny_llama().train()
    baseline = _syncs(lambda: loop.loss(plain, batch, _loop_config(1)).backward())

    prof = profile(activities=[ProfilerActivity.CPU])

    def batches():
        for step in range(1, 10):
            if step == 5:  # the first steady-state step: refreshes and AdamW state are behind
                prof.start()
            elif step == 9:  # steps 5..8 are done, the record of step 9 is ahead
                prof.stop()
            yield batch

    model = qgalore_fx.transform(tiny_llama(), rank=8, update_interval=1000)
    model.train()
    _run_loop(model, qgalore_fx.optimizer(model, lr=1e-3), _loop_config(9), batches=batches())
    ours = sum(1 for e in prof.events() if e.name == "aten::_local_scalar_dense")
    assert ours <= 4 * baseline, (ours, baseline)


class _PoisonedLM(torch.nn.Module):
    """A bigram LM whose logits are NaN at its ``bad``-th training forward."""

    def __init__(self, bad: int):
        super().__init__()
        self.emb, self.head = torch.nn.Embedding(128, 8), torch.nn.Linear(8, 128)
        self.bad, self.calls = bad, 0

    def forward(self, input_ids):
        self.calls += 1
        logits = self.head(self.emb(input_ids))
        return logits * float("nan") if self.calls == self.bad else logits


def test_a_non_finite_loss_stops_the_loop_at_its_next_record_naming_the_step():
    import pytest

    model = _PoisonedLM(bad=3)
    with pytest.raises(FloatingPointError, match=r"^training loss is nan at step 3; lower --lr"):
        _run_loop(model, torch.optim.AdamW(model.parameters()), _loop_config(8, log_every=5))
    assert model.calls == 5  # it trained on until the record of step 5


def test_a_non_finite_loss_is_caught_before_a_checkpoint_saves_its_state():
    import pytest

    model, saves = _PoisonedLM(bad=3), []
    with pytest.raises(FloatingPointError, match=r"at step 3;"):
        _run_loop(model, torch.optim.AdamW(model.parameters()), _loop_config(8, log_every=100, save_every=2), saves)
    assert saves == [2] and model.calls == 4  # step 2 saved, step 4 refused

    model, saves = _PoisonedLM(bad=0), []  # never poisoned: every record and checkpoint goes through
    progress = _run_loop(model, torch.optim.AdamW(model.parameters()), _loop_config(8, log_every=3, save_every=2),
                         saves)
    assert saves == [2, 4, 6] and [r["step"] for r in progress.history] == [3, 6, 8]
