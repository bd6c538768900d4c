"""save_pretrained of a transformed model is never loaded as random weights; it is restored exactly."""

import pytest
import torch
import transformers

import qgalore_fx
from conftest import tiny_llama


def _trained():
    model = qgalore_fx.transform(tiny_llama(), rank=8, update_interval=2)
    model.train()
    opt = qgalore_fx.optimizer(model, lr=1e-2)
    for seed in range(3):
        ids = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(seed))
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
    return model, opt


def test_original_class_refuses_a_transformed_save(tmp_path):
    model, _ = _trained()
    model.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="quant_method"):
        transformers.LlamaForCausalLM.from_pretrained(tmp_path)
    with pytest.raises(ValueError, match="quant_method"):
        transformers.AutoModelForCausalLM.from_pretrained(tmp_path)


def test_qgalore_from_pretrained_restores_the_transformed_model_exactly(tmp_path):
    model, opt = _trained()
    model.save_pretrained(tmp_path)
    restored = qgalore_fx.from_pretrained(tmp_path)
    assert qgalore_fx.is_transformed(restored)
    expected, got = model.state_dict(), restored.state_dict()
    assert expected.keys() == got.keys()
    assert all(torch.equal(expected[k], got[k]) for k in expected)
    ids = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(9))
    model.eval(), restored.eval()
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, restored(input_ids=ids).logits)
    # and it trains on exactly as the original does
    restored.train(), model.train()
    opt2 = qgalore_fx.optimizer(restored, lr=1e-2)
    opt2.load_state_dict(opt.state_dict())
    for m, o in ((model, opt), (restored, opt2)):
        m(input_ids=ids, labels=ids).loss.backward()
        o.step()
    assert all(torch.equal(model.state_dict()[k], restored.state_dict()[k]) for k in expected)


def test_dense_export_is_a_plain_hf_checkpoint(tmp_path):
    model, _ = _trained()
    dense = qgalore_fx.export_dense(model, dtype=torch.float32)
    assert getattr(dense.config, "quantization_config", None) is None
    assert qgalore_fx.hf.is_marked(model.config)  # the transformed model keeps its marker
    dense.save_pretrained(tmp_path)
    loaded = transformers.LlamaForCausalLM.from_pretrained(tmp_path)
    ids = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(9))
    dense.eval()
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=ids).logits, dense(input_ids=ids).logits)
    with pytest.raises(ValueError, match="not saved from a model transformed"):
        qgalore_fx.from_pretrained(tmp_path)
