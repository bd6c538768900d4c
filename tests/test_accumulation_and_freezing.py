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
