"""Gradient accumulation and frozen layers cannot go silently wrong, in plain loops and in HF Trainer."""

import pytest
import torch

import qgalore_fx
from conftest import tiny_llama


def _ids(seed=0, batch=2):
    return torch.randint(0, 128, (batch, 16), generator=torch.Generator().manual_seed(seed))


def _codes(model):
    return {n: layer.weight_codes.clone() for n, layer in qgalore_fx.projected_layers(model)}


def test_second_backward_before_step_is_a_clear_error_and_updates_nothing_twice():
    model = qgalore_fx.transform(tiny_llama(), rank=8)
    opt = qgalore_fx.optimizer(model, lr=1e-2)
    ids = _ids()
    model(input_ids=ids, labels=ids).loss.backward()
    after_first = _codes(model)
    with pytest.raises(RuntimeError, match="accumulation_steps"):
        model(input_ids=ids, labels=ids).loss.backward()
    assert all(torch.equal(after_first[n], c) for n, c in _codes(model).items())
    opt.step()
    opt.zero_grad()
    model(input_ids=ids, labels=ids).loss.backward()  # after step() the next backward updates again
    assert any(not torch.equal(after_first[n], c) for n, c in _codes(model).items())


@pytest.mark.parametrize("freeze_before_optimizer", [True, False])
def test_frozen_projected_layers_are_not_updated(freeze_before_optimizer):
    model = qgalore_fx.transform(tiny_llama(), rank=8)
    model.train()
    frozen = model.model.layers[0]
    if freeze_before_optimizer:
        frozen.requires_grad_(False)
    opt = qgalore_fx.optimizer(model, lr=1e-2)
    if not freeze_before_optimizer:
        frozen.requires_grad_(False)
    before = _codes(model)
    for seed in range(2):
        ids = _ids(seed)
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
    after = _codes(model)
    for name in before:
        if name.startswith("model.layers.0."):
            assert torch.equal(before[name], after[name]), name
        else:
            assert not torch.equal(before[name], after[name]), name
    assert all(s["step"] == 0 for n, s in opt.layer_stats().items() if n.startswith("model.layers.0."))


def _trainer(tmp_path, model, opt, accumulation, steps=3):
    import transformers
    from torch.utils.data import Dataset

    class Tokens(Dataset):
        def __len__(self):
            return 64

        def __getitem__(self, i):
            ids = _ids(seed=i, batch=1)[0]
            return {"input_ids": ids, "labels": ids}

    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), per_device_train_batch_size=2, gradient_accumulation_steps=accumulation,
        max_steps=steps, logging_steps=1, save_strategy="no", report_to=[], use_cpu=True, disable_tqdm=True,
        dataloader_num_workers=0, seed=0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0)
    return transformers.Trainer(model=model, args=args, train_dataset=Tokens(), optimizers=(opt, sched))


def test_trainer_gradient_accumulation_updates_once_per_optimizer_step(tmp_path):
    model = qgalore_fx.transform(tiny_llama(), rank=8)
    model.train()
    opt = qgalore_fx.optimizer(model, lr=1e-2, accumulation_steps=4)  # the Trainer recipe
    trainer = _trainer(tmp_path, model, opt, accumulation=4)
    trainer.train()
    assert trainer.state.global_step == 3
    assert {s["step"] for s in opt.layer_stats().values()} == {3}  # one update per optimizer step, not 12
    assert {s["pending"] for s in opt.layer_stats().values()} == {0}


def test_trainer_gradient_accumulation_without_the_recipe_fails_loudly(tmp_path):
    model = qgalore_fx.transform(tiny_llama(), rank=8)
    model.train()
    opt = qgalore_fx.optimizer(model, lr=1e-2)
    trainer = _trainer(tmp_path, model, opt, accumulation=4, steps=1)
    with pytest.raises(RuntimeError, match="accumulation_steps"):
        trainer.train()


# ---------------------------------------------------------------------------------------------- zero_grad
def _micro_batch(model, seed, nan=False):
    ids = _ids(seed)
    loss = model(input_ids=ids, labels=ids).loss
    (loss * float("nan") if nan else loss).backward()


def _window_run(schedule, update_interval, set_to_none=True):
    """Micro-batches as listed (an int: its seed; "nan": a non-finite one; "zero": opt.zero_grad(); "step":
    opt.step() then opt.zero_grad()), on a fresh model; returns the model and the optimizer."""
    model = qgalore_fx.transform(tiny_llama(), rank=8, update_interval=update_interval)
    model.train()
    opt = qgalore_fx.optimizer(model, lr=1e-2, accumulation_steps=2)
    for item in schedule:
        if item == "step":
            opt.step()
            opt.zero_grad()
        elif item == "zero":
            opt.zero_grad(set_to_none=set_to_none)
        elif item == "nan":
            _micro_batch(model, 99, nan=True)
        else:
            _micro_batch(model, item)
    return model, opt


def _assert_same_state(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        assert torch.equal(sa[key], sb[key]), key


@pytest.mark.parametrize("dropped", ["finite", "nan"])
@pytest.mark.parametrize("update_interval", [1, 100])  # 1: the dropped micro-batch refreshed the projection
def test_zero_grad_drops_the_micro_batch_for_every_parameter(dropped, update_interval):
    mb = 2 if dropped == "finite" else "nan"
    model, opt = _window_run([0, 1, "step", mb, "zero", 3, 4, "step"], update_interval)
    never, never_opt = _window_run([0, 1, "step", 3, 4, "step"], update_interval)
    _assert_same_state(model, never)  # projected layers (codes, projections, moments, schedule) and the rest
    assert opt.skipped_updates == never_opt.skipped_updates == 0
    never_stats = never_opt.layer_stats()
    for name, stats in opt.layer_stats().items():  # refresh_seconds is telemetry: the dropped refresh took time
        assert {**stats, "refresh_seconds": 0} == {**never_stats[name], "refresh_seconds": 0}, name


@pytest.mark.parametrize("set_to_none", [True, False])
def test_zero_grad_drops_a_partial_window_and_an_empty_one(set_to_none):
    model, _ = _window_run(["zero", 0, "zero", "zero", 1, 2, "step", 3, "nan", "zero", 4, "step"], 1,
                           set_to_none=set_to_none)
    never, _ = _window_run([1, 2, "step", 4, "step"], 1)
    _assert_same_state(model, never)
    assert {s["pending"] for _, s in model_stats(model)} == {0}


def model_stats(model):
    return [(n, layer.stats()) for n, layer in qgalore_fx.projected_layers(model)]


def test_zero_grad_after_a_window_resumed_from_a_state_dict_drops_its_micro_batches():
    model, opt = _window_run([0, 1, "step", 2], 1)
    state = model.state_dict()
    twin, twin_opt = _window_run([], 1)
    twin.load_state_dict(state)
    assert {s["pending"] for _, s in model_stats(twin)} == {1}
    twin_opt.zero_grad()
    assert {s["pending"] for _, s in model_stats(twin)} == {0}
    assert all(not layer.accum.any() for _, layer in qgalore_fx.projected_layers(twin))
