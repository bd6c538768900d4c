"""Each projected layer owns its state as tensors: PyTorch's own mechanisms carry it.

``copy.deepcopy``, ``torch.save``/``torch.load``, ``state_dict``/``load_state_dict`` (also through
``torch.load(weights_only=True)``, as HF Trainer checkpoints) and ``.to()`` need no qgalore_fx code.
"""

import copy
import io

import pytest
import torch

import qgalore_fx
from conftest import tiny_llama


def _batches(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 128, (2, 16), generator=g) for _ in range(n)]


def _train(model, opt, batches, sched=None):
    losses = []
    for ids in batches:
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        if sched is not None:
            sched.step()
        losses.append(loss.item())
    return losses


def _transformed(**options):
    options = {"rank": 8, "update_interval": 2, **options}
    model = qgalore_fx.transform(tiny_llama(), **options)
    model.train()
    return model


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_deepcopy_trains_independently_of_the_original():
    model = _transformed()
    opt = qgalore_fx.optimizer(model, lr=1e-2)
    _train(model, opt, _batches(2))
    twin = copy.deepcopy(model)
    assert all(layer.optimizer_link.get() is None for _, layer in qgalore_fx.projected_layers(twin))
    twin_opt = qgalore_fx.optimizer(twin, lr=1e-2)  # a copy is unbound: it takes its own optimizer
    frozen = {k: v.clone() for k, v in model.state_dict().items()}
    _train(twin, twin_opt, _batches(3, seed=1))
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in frozen.items())  # the original did not move
    moved = [k for k, v in twin.state_dict().items() if not torch.equal(v, frozen[k])]
    assert any(k.endswith("weight_codes") for k in moved) and any(k.endswith("exp_avg_sq") for k in moved)
    # and the original keeps training with its own optimizer, unaffected by the copy's
    before = model.model.layers[0].mlp.up_proj.weight_codes.clone()
    _train(model, opt, _batches(1, seed=2))
    assert not torch.equal(before, model.model.layers[0].mlp.up_proj.weight_codes)


def test_second_optimizer_on_one_model_is_a_clear_error():
    model = _transformed()
    opt = qgalore_fx.optimizer(model, lr=1e-2)
    with pytest.raises(ValueError, match="already driven by another qgalore_fx optimizer"):
        qgalore_fx.optimizer(model, lr=5e-2)
    # the first optimizer still drives every layer with its own lr
    assert {float(layer.hparams[0]) for _, layer in qgalore_fx.projected_layers(model)} == {1e-2}
    del opt  # once the first optimizer is gone, a new one may take the layers
    opt2 = qgalore_fx.optimizer(model, lr=5e-2)
    assert {float(layer.hparams[0]) for _, layer in qgalore_fx.projected_layers(model)} == {5e-2}
    assert all(layer.optimizer_link.get() is opt2 for _, layer in qgalore_fx.projected_layers(model))


def test_assigning_group_values_reaches_the_layers():
    model = _transformed()
    opt = qgalore_fx.optimizer(model, lr=1e-2, betas=(0.8, 0.99), eps=1e-7, weight_decay=0.1)
    layer = model.model.layers[0].self_attn.q_proj
    assert layer.hparams.tolist() == [1e-2, 0.8, 0.99, 1e-7, 0.1]
    opt.param_groups[0]["lr"] = 3e-3
    opt.param_groups[0]["betas"] = (0.5, 0.9)
    opt.param_groups[0].update(weight_decay=0.0)
    assert layer.hparams.tolist() == [3e-3, 0.5, 0.9, 1e-7, 0.0]


@pytest.mark.parametrize("which", ["transformed", "export_dense"])
def test_torch_save_and_load_give_identical_logits(which):
    model = _transformed()
    opt = qgalore_fx.optimizer(model, lr=1e-2)
    _train(model, opt, _batches(2))
    obj = model if which == "transformed" else qgalore_fx.export_dense(model, dtype=torch.float32)
    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    ids = _batches(1, seed=5)[0]
    assert torch.equal(_logits(loaded, ids), _logits(obj, ids))
    if which == "transformed":  # the unpickled model carries its full training state, and trains on
        assert all(torch.equal(v, loaded.state_dict()[k]) for k, v in model.state_dict().items())
        opt_l = qgalore_fx.optimizer(loaded, lr=1e-2)
        opt_l.load_state_dict(opt.state_dict())
        assert _train(loaded, opt_l, _batches(2, seed=3)) == _train(model, opt, _batches(2, seed=3))
        assert all(torch.equal(v, loaded.state_dict()[k]) for k, v in model.state_dict().items())


@pytest.mark.parametrize("accumulation_steps", [1, 2])
def test_state_dicts_through_torch_load_weights_only_continue_bit_identically(tmp_path, accumulation_steps):
    """How HF Trainer checkpoints: model and optimizer state dicts, torch.save, torch.load(weights_only=True)."""
    def build():
        model = _transformed()
        opt = qgalore_fx.optimizer(model, lr=1e-2, weight_decay=0.01, accumulation_steps=accumulation_steps)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0 / (1 + step))
        return model, opt, sched

    model, opt, sched = build()
    _train(model, opt, _batches(3), sched)
    torch.save({"model": model.state_dict(), "optimizer": opt.state_dict(), "scheduler": sched.state_dict()},
               tmp_path / "ckpt.pt")
    reference = _train(model, opt, _batches(4, seed=9), sched)

    fresh, fresh_opt, fresh_sched = build()
    saved = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    fresh.load_state_dict(saved["model"])
    fresh_opt.load_state_dict(saved["optimizer"])
    fresh_sched.load_state_dict(saved["scheduler"])
    assert _train(fresh, fresh_opt, _batches(4, seed=9), fresh_sched) == reference
    for k, v in model.state_dict().items():
        assert torch.equal(v, fresh.state_dict()[k]), k


def test_to_moves_the_update_state_and_keeps_the_host_schedule_on_the_host():
    model = _transformed()
    opt = qgalore_fx.optimizer(model, lr=1e-2)
    _train(model, opt, _batches(1))
    layer = model.model.layers[0].mlp.down_proj
    control = layer.control
    model.to("meta")  # every buffer moves; the host-side control tensor stays where the host reads it
    assert all(t.is_meta for t in layer.state_tensors().values() if t is not layer.control)
    assert layer.control is control and layer.control.device.type == "cpu"


def test_state_dict_of_another_layout_is_rejected_with_its_name():
    model = _transformed()
    qgalore_fx.optimizer(model, lr=1e-2)
    state = model.state_dict()
    bad = dict(state)
    key = "model.layers.0.mlp.up_proj._extra_state"
    bad[key] = torch.zeros(3, dtype=torch.float64)
    with pytest.raises(ValueError, match="control state"):
        model.load_state_dict(bad)
