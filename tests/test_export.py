"""qgalore_fx.export.export_dense: plain nn.Linear copies that round-trip through HF save/load."""

import pytest
import torch
import torch.fx as fx
import torch.nn as nn
import transformers
from conftest import tiny_llama

import qgalore_fx
from qgalore_fx.export import export_dense
from qgalore_fx.layers import QGaLoreLinear
from qgalore_fx.rewrite import config_of


def trained_llama(steps=2):
    model = qgalore_fx.transform(tiny_llama(), rank=8, update_interval=3)
    opt = qgalore_fx.optimizer(model, lr=1e-2)
    for _ in range(steps):  # weights move away from their initial values, SR on
        ids = torch.randint(0, 128, (2, 12))
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
    return model, opt


def qgalore_pieces(model):
    """Anything of qgalore_fx left in a model: layers, graph ops, attributes, state-dict keys."""
    found = [n for n, m in model.named_modules() if isinstance(m, QGaLoreLinear)]
    for name, m in model.named_modules():
        if isinstance(m, fx.GraphModule):
            found += [f"{name}: {node.format_node()}" for node in m.graph.nodes if "qgalore_fx" in str(node.target)]
            found += [f"{name}: generated code mentions qgalore_fx"] if "qgalore_fx" in m.code else []
    found += [k for k in model.state_dict() if k.endswith((".anchor", ".weight_codes", ".weight_scales"))]
    found += [k for k in vars(model) if k.startswith("_qgalore_fx")]
    return found


@pytest.fixture(scope="module")
def llama_run():
    state = torch.random.get_rng_state()
    torch.manual_seed(0)
    model, opt = trained_llama()
    ids = torch.randint(0, 128, (2, 16))
    torch.random.set_rng_state(state)
    return model, opt, ids


@pytest.mark.parametrize("dtype,atol,rtol", [(torch.float32, 1e-5, 1e-5), (torch.bfloat16, 3e-2, 3e-2)])
def test_hf_export_round_trips_through_save_pretrained(llama_run, tmp_path, dtype, atol, rtol):
    model, _, ids = llama_run
    with torch.no_grad():
        expected = model(input_ids=ids).logits
    dense = export_dense(model, dtype=dtype)

    assert qgalore_pieces(dense) == []
    assert not qgalore_fx.is_transformed(dense) and config_of(dense) is None
    assert isinstance(dense.model.layers[0].self_attn.q_proj, nn.Linear)
    assert isinstance(dense.model.layers[0].mlp, fx.GraphModule)  # the traced region stays, as plain torch.fx
    assert "self.gate_proj(x)" in dense.model.layers[0].mlp.code
    assert {p.dtype for p in dense.parameters()} == {dtype}
    assert dense.model.rotary_emb.inv_freq.dtype == torch.float32  # non-persistent constants keep their dtype
    assert dense.config.dtype == dtype
    # the exported weight is the layer's dequantized INT8 weight
    layer = model.get_submodule("model.layers.1.mlp.down_proj")
    torch.testing.assert_close(dense.get_submodule("model.layers.1.mlp.down_proj").weight,
                               layer.dequantized_weight(torch.float32).to(dtype), atol=0, rtol=0)

    dense.save_pretrained(tmp_path)
    loaded = transformers.LlamaForCausalLM.from_pretrained(tmp_path)
    assert type(loaded.model.layers[0].mlp).__name__ == "LlamaMLP" and loaded.dtype == dtype
    with torch.no_grad():
        exported_logits = dense(input_ids=ids).logits
        loaded_logits = loaded(input_ids=ids).logits
    assert torch.equal(loaded_logits, exported_logits)  # same weights, same math, same class of module
    torch.testing.assert_close(loaded_logits.float(), expected, atol=atol, rtol=rtol)


def test_export_leaves_the_transformed_model_and_its_training_state_untouched(llama_run):
    model, opt, ids = llama_run
    before = {k: v.clone() for k, v in model.state_dict().items()}
    # the layers' update state is in the state dict (compared below) and stays the very same tensors
    layers_before = {n: [id(t) for t in l.update_state()] for n, l in qgalore_fx.projected_layers(model)}
    mlp_code = model.model.layers[0].mlp.code
    dense = export_dense(model, dtype=torch.float32)

    after = model.state_dict()
    assert list(after) == list(before) and all(torch.equal(after[k], before[k]) for k in before)
    assert {n: [id(t) for t in l.update_state()] for n, l in qgalore_fx.projected_layers(model)} == layers_before
    assert model.model.layers[0].mlp.code == mlp_code and config_of(model) is not None
    assert all(p.data_ptr() != q.data_ptr() for p in dense.parameters() for q in model.parameters() if p.numel())
    # the original still trains, and the copy does not move with it
    snapshot = {k: v.clone() for k, v in dense.state_dict().items()}
    model(input_ids=ids, labels=ids).loss.backward()
    opt.step()
    opt.zero_grad()
    assert all(torch.equal(v, snapshot[k]) for k, v in dense.state_dict().items())


def test_export_of_a_traced_sequential_root_with_biases():
    torch.manual_seed(0)
    original = nn.Sequential(nn.Linear(32, 64), nn.GELU(), nn.Linear(64, 32), nn.GELU(), nn.Linear(32, 8))
    model = qgalore_fx.transform(original, rank=4)
    assert isinstance(model, fx.GraphModule)
    x = torch.randn(5, 32)
    dense = export_dense(model, dtype=torch.float32)
    assert isinstance(dense, fx.GraphModule) and qgalore_pieces(dense) == []
    calls = [n.target for n in dense.graph.nodes if n.op == "call_module"]
    assert calls == ["0", "1", "2", "3", "4"]
    assert dense.get_submodule("0").bias is not None
    with torch.no_grad():
        torch.testing.assert_close(dense(x), model(x), atol=1e-5, rtol=1e-5)
    # the dense copy is an ordinary trainable model
    dense(x).sum().backward()
    assert dense.get_submodule("4").weight.grad.shape == (8, 32)


@pytest.mark.parametrize("weight_bits", [16, 32])
def test_export_of_float_weight_storage(weight_bits):
    torch.manual_seed(0)
    model = qgalore_fx.transform(nn.Sequential(nn.Linear(16, 24), nn.ReLU(), nn.Linear(24, 16)), rank=4,
                                 weight_bits=weight_bits)
    dense = export_dense(model, dtype=torch.float32)
    x = torch.randn(3, 16)
    with torch.no_grad():
        torch.testing.assert_close(dense(x), model(x), atol=1e-5, rtol=1e-5)


def test_export_rejects_a_non_float_dtype():
    model = qgalore_fx.transform(nn.Sequential(nn.Linear(16, 16)), rank=4)
    with pytest.raises(ValueError, match="dtype must be one of"):
        export_dense(model, dtype=torch.int8)
    with pytest.raises(TypeError, match="torch.nn.Module"):
        export_dense("model")
