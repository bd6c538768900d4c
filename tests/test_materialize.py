"""transform() on a meta-device model: layers materialize one at a time, straight to INT8."""

import copy

import pytest
import torch
import transformers
from conftest import tiny_llama
from safetensors.torch import save_file

import qgalore_fx


def meta_llama(tie=False):
    cfg = tiny_llama().config
    cfg.tie_word_embeddings = tie
    with torch.device("meta"):
        return transformers.LlamaForCausalLM(cfg)


@pytest.mark.parametrize("source", ["mapping", "file", "directory", "shards"])
def test_meta_model_from_weights_equals_transformed_real_model(tmp_path, source):
    real = tiny_llama()
    state = {k: v.contiguous() for k, v in real.state_dict().items()}
    if source == "mapping":
        weights = state
    elif source == "shards":  # a list of files, as transformers hands a sharded checkpoint over
        keys = sorted(state)
        weights = [tmp_path / "a.safetensors", tmp_path / "b.safetensors"]
        save_file({k: state[k] for k in keys[::2]}, weights[0])
        save_file({k: state[k] for k in keys[1::2]}, weights[1])
    else:
        save_file(state, tmp_path / "model.safetensors")
        weights = tmp_path / "model.safetensors" if source == "file" else tmp_path
    expected = qgalore_fx.transform(copy.deepcopy(real), rank=8)
    model = qgalore_fx.transform(meta_llama(), rank=8, weights=weights)
    assert not any(t.is_meta for t in list(model.parameters()) + list(model.buffers()))
    for (name, a), (_, b) in zip(expected.state_dict().items(), model.state_dict().items()):
        assert torch.equal(a, b), name
    ids = torch.randint(0, 128, (2, 12))
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, expected(input_ids=ids).logits, atol=0, rtol=0)


def test_transform_projected_leaves_the_rest_on_meta_and_needs_a_meta_model():
    from qgalore_fx.config import QGaLoreConfig
    from qgalore_fx.rewrite import transform_projected

    model = transform_projected(meta_llama(), QGaLoreConfig(rank=8))
    real = {n for n, t in model.state_dict().items() if not t.is_meta}
    assert real and all(".mlp." in n or ".self_attn." in n for n in real)
    assert model.model.embed_tokens.weight.is_meta and model.model.norm.weight.is_meta
    with pytest.raises(ValueError, match="meta device"):
        transform_projected(tiny_llama(), QGaLoreConfig(rank=8))
    with pytest.raises(ValueError, match="not one"):
        qgalore_fx.transform(meta_llama(), rank=8, weights=["missing.safetensors"])


def test_meta_model_initialized_without_weights_trains():
    model = qgalore_fx.transform(meta_llama(tie=True), rank=8)
    real = tiny_llama()
    rot, rot_real = model.model.rotary_emb, real.model.rotary_emb
    torch.testing.assert_close(rot.inv_freq, rot_real.inv_freq)  # non-persistent buffers re-derived
    assert model.lm_head.weight is model.model.embed_tokens.weight  # tied weights stay tied
    layer = model.model.layers[0].mlp.gate_proj
    w = layer.dequantized_weight()
    assert 0.01 < w.std().item() < 0.03  # HF's normal(0, initializer_range=0.02) init
    opt = qgalore_fx.optimizer(model, lr=1e-2)
    ids = torch.randint(0, 128, (2, 12))
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    opt.step()
    assert torch.isfinite(loss)


def test_meta_errors_name_the_problem(tmp_path):
    real = tiny_llama()
    state = dict(real.state_dict())
    del state["model.layers.1.mlp.up_proj.weight"]
    with pytest.raises(ValueError, match="model.layers.1.mlp.up_proj.weight"):
        qgalore_fx.transform(meta_llama(), rank=8, weights=state)
    state = dict(real.state_dict())
    state["model.norm.weight"] = torch.ones(7)
    with pytest.raises(ValueError, match="model.norm.weight.*shape"):
        qgalore_fx.transform(meta_llama(), rank=8, weights=state)
    del state["model.norm.weight"]
    with pytest.raises(ValueError, match="no tensor for.*model.norm.weight"):
        qgalore_fx.transform(meta_llama(), rank=8, weights=state)
    with pytest.raises(ValueError, match="neither a .safetensors file"):
        qgalore_fx.transform(meta_llama(), rank=8, weights=tmp_path / "nope.bin")
    with pytest.raises(ValueError, match="meta device"):
        qgalore_fx.transform(tiny_llama(), rank=8, weights=real.state_dict())


@pytest.mark.parametrize("weight_bits", [8, 32])
def test_non_finite_weight_is_named_and_the_meta_model_is_untouched(weight_bits):
    state = {k: v.contiguous().clone() for k, v in tiny_llama().state_dict().items()}
    key = "model.layers.1.mlp.up_proj.weight"
    state[key][3, 5] = float("nan")
    model = meta_llama()
    types = [(n, type(m)) for n, m in model.named_modules()]
    with pytest.raises(ValueError, match=r"'model\.layers\.1\.mlp\.up_proj'.*non-finite") as info:
        qgalore_fx.transform(model, rank=8, weights=state, weight_bits=weight_bits)
    assert "weight" in str(info.value)
    assert [(n, type(m)) for n, m in model.named_modules()] == types and not qgalore_fx.is_transformed(model)
    assert all(t.is_meta for t in list(model.parameters()) + list(model.buffers()))
