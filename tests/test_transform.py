"""transform(): capture, INT8 storage, dequant-matmul nodes, errors, explain, compile."""

import copy
import gc

import pytest
import torch
import torch.fx as fx
import torch.nn as nn
from conftest import tiny_llama

import qgalore_fx
from qgalore_fx.layers import QGaLoreLinear


def sqnr_db(ref: torch.Tensor, test: torch.Tensor) -> float:
    return float(10 * torch.log10(ref.pow(2).mean() / (ref - test).pow(2).mean()))


def dequantized_twin(original: nn.Module, transformed: nn.Module) -> nn.Module:
    """The original model with every projected weight replaced by its dequantized INT8 value."""
    twin = copy.deepcopy(original)
    for name, layer in qgalore_fx.projected_layers(transformed):
        twin.get_submodule(name).weight.data.copy_(layer.dequantized_weight(torch.float32))
    return twin


@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2"])
def test_hf_logits_match_dequantized_and_fp32(arch):
    original = tiny_llama(arch, hidden=256, layers=4, vocab=32000, intermediate=688)
    model = qgalore_fx.transform(copy.deepcopy(original), rank=32)
    ids = torch.randint(0, 32000, (2, 24))
    with torch.no_grad():
        out = model(input_ids=ids, labels=ids)
        ref_fp32 = original(input_ids=ids).logits
        ref_deq = dequantized_twin(original, model)(input_ids=ids).logits
    assert out.loss is not None and out.logits.shape == (2, 24, 32000)
    torch.testing.assert_close(out.logits, ref_deq, atol=1e-4, rtol=1e-4)
    assert sqnr_db(ref_fp32, out.logits) >= 30
    # 4 blocks x (q, k, v, o, gate, up, down)
    assert len(qgalore_fx.projected_layers(model)) == 28


def test_plain_sequential_mlp():
    torch.manual_seed(0)
    original = nn.Sequential(nn.Linear(64, 256), nn.GELU(), nn.Linear(256, 64), nn.GELU(), nn.Linear(64, 10))
    model = qgalore_fx.transform(copy.deepcopy(original), rank=8)
    assert isinstance(model, fx.GraphModule)  # a Sequential root is traced as one region
    x = torch.randn(5, 64)
    with torch.no_grad():
        torch.testing.assert_close(model(x), dequantized_twin(original, model)(x), atol=1e-5, rtol=1e-5)
        assert sqnr_db(original(x), model(x)) >= 30
    code = model.code
    assert code.count("torch.ops.qgalore_fx.linear.default") == 3
    assert "weight_codes" in code


def test_regions_traced_where_possible_and_swapped_elsewhere(llama):
    model = qgalore_fx.transform(llama, rank=8)
    mlp = model.model.layers[0].mlp
    assert isinstance(mlp, fx.GraphModule)
    ops = [n for n in mlp.graph.nodes if n.op == "call_function" and n.target is torch.ops.qgalore_fx.linear.default]
    assert [n.meta["qgalore_fx_layer"] for n in ops] == ["gate_proj", "up_proj", "down_proj"]
    assert isinstance(model.model.layers[0].self_attn.q_proj, QGaLoreLinear)
    text = qgalore_fx.explain(model)
    assert "model.layers.1.mlp.down_proj" in text and "int8" in text and "not traceable" in text
    assert "14 projected linears" in text


def test_storage_is_really_int8_and_no_float_copy_survives():
    original = tiny_llama(hidden=256, layers=2, vocab=1000, intermediate=688)
    shapes = {n: tuple(m.weight.shape) for n, m in original.named_modules()
              if isinstance(m, nn.Linear) and n.startswith("model.layers")}
    model = qgalore_fx.transform(original, rank=16)
    del original
    gc.collect()
    stored = fp32 = 0
    for name, layer in qgalore_fx.projected_layers(model):
        assert layer.weight_codes.dtype == torch.int8
        stored += sum(t.numel() * t.element_size() for t in (layer.weight_codes, layer.weight_scales))
        fp32 += layer.in_features * layer.out_features * 4
    assert stored <= 0.26 * fp32
    assert stored <= 0.51 * fp32 / 2  # vs bf16
    # No floating tensor with a projected weight's shape is reachable from the model.
    float_shapes = {tuple(t.shape) for t in list(model.parameters()) + list(model.buffers()) if t.is_floating_point()}
    assert not float_shapes & set(shapes.values())
    assert not any(isinstance(m, nn.Linear) and n.startswith("model.layers") for n, m in model.named_modules())


def test_selection_rules():
    model = tiny_llama()
    t = qgalore_fx.transform(copy.deepcopy(model), rank=4, target_modules=[r"mlp\.(up|down)_proj$"])
    assert sorted(n.rsplit(".", 1)[1] for n, _ in qgalore_fx.projected_layers(t)) == ["down_proj"] * 2 + ["up_proj"] * 2
    t = qgalore_fx.transform(copy.deepcopy(model), rank=4, filter_fn=lambda m, fqn: fqn.endswith("q_proj"))
    assert len(qgalore_fx.projected_layers(t)) == 2
    t = qgalore_fx.transform(copy.deepcopy(model), rank=4, include_lm_head=True)
    assert "lm_head" in dict(qgalore_fx.projected_layers(t))


@pytest.mark.parametrize(
    "kwargs, exc, match",
    [
        (dict(rank=0), ValueError, "rank"),
        (dict(rank=-3), ValueError, "rank"),
        (dict(rank=2.5), TypeError, "rank"),
        (dict(rank=1000), ValueError, "rank=1000 is larger than"),
        (dict(rank=4, weight_bits=4), ValueError, "weight_bits"),
        (dict(rank=4, proj_bits=2), ValueError, "proj_bits"),
        (dict(rank=4, optim_bits=16), ValueError, "optim_bits"),
        (dict(rank=4, proj_method="qr"), ValueError, "proj_method"),
        (dict(rank=4, cos_threshold=1.5), ValueError, "cos_threshold"),
        (dict(rank=4, block_size=255), ValueError, "block_size"),
        (dict(rank=4, stochastic_round="yes"), TypeError, "stochastic_round"),
        (dict(rank=4, learning_rate=1e-3), TypeError, "unknown option"),
        (dict(rank=4, filter_fn=lambda m, n: False), ValueError, "selected no layer"),
        (dict(rank=4, filter_fn=lambda m, n: n.endswith("input_layernorm")), ValueError,
         "input_layernorm.*no layer handler; supported types: torch.nn.Linear"),
        (dict(), TypeError, "rank"),
    ],
)
def test_bad_options_raise_clear_errors(kwargs, exc, match):
    model = tiny_llama()
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(exc, match=match):
        qgalore_fx.transform(model, **kwargs)
    # a rejected transform leaves the model untouched
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


def test_transform_twice_is_an_error(llama):
    model = qgalore_fx.transform(llama, rank=4)
    with pytest.raises(ValueError, match="already transformed"):
        qgalore_fx.transform(model, rank=4)


def test_tied_head_cannot_be_projected():
    import transformers

    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, vocab_size=64,
        tie_word_embeddings=True))
    with pytest.raises(ValueError, match="tied"):
        qgalore_fx.transform(model, rank=4, include_lm_head=True)


def test_module_api_survives(llama):
    model = qgalore_fx.transform(llama, rank=4)
    keys = model.state_dict().keys()
    assert "model.layers.0.mlp.gate_proj.weight_codes" in keys
    assert "model.layers.0.self_attn.q_proj.weight_scales" in keys
    model.train()
    assert model.training and model.model.layers[0].mlp.training
    model.half()  # float conversion must not touch codes or scales
    layer = model.model.layers[0].self_attn.q_proj
    assert layer.weight_codes.dtype == torch.int8 and layer.weight_scales.dtype == torch.float32
    assert layer.exp_avg_sq_absmax.dtype == torch.float32 and layer.hparams.dtype == torch.float64
    clone = copy.deepcopy(model.float())
    twin = clone.model.layers[0].self_attn.q_proj
    for key, t in twin.state_tensors().items():  # the copy owns its own update state
        assert t is not getattr(layer, key, layer.control) and torch.equal(t, layer.state_tensors()[key]), key


def _snapshot(model):
    return [(n, type(m), {k: (v if v is None else v.detach().clone()) for k, v in m._parameters.items()})
            for n, m in model.named_modules(remove_duplicate=False)]


def _unchanged(model, snapshot):
    now = _snapshot(model)
    return len(now) == len(snapshot) and all(
        a[0] == b[0] and a[1] is b[1] and a[2].keys() == b[2].keys()
        and all((x is None and y is None) or (x is not None and y is not None and torch.equal(x, y))
                for x, y in zip(a[2].values(), b[2].values()))
        for a, b in zip(now, snapshot))


def test_linears_sharing_a_weight_are_refused_before_anything_changes():
    a, b = torch.nn.Linear(16, 16), torch.nn.Linear(16, 16)
    b.weight = a.weight  # tied
    model = torch.nn.Sequential(a, torch.nn.ReLU(), b)
    before = _snapshot(model)
    with pytest.raises(ValueError, match="shares its weight with 2.weight"):
        qgalore_fx.transform(model, rank=4)
    assert _unchanged(model, before) and model[0].weight is model[2].weight


def test_a_linear_reachable_from_two_places_is_refused_before_anything_changes():
    shared = torch.nn.Linear(16, 16)
    model = torch.nn.Sequential(shared, torch.nn.ReLU(), shared)
    before = _snapshot(model)
    with pytest.raises(ValueError, match="reachable from 2 places"):
        qgalore_fx.transform(model, rank=4)
    assert _unchanged(model, before) and isinstance(model[0].weight, torch.nn.Parameter)
    assert torch.equal(model(torch.ones(2, 16)), shared(torch.relu(shared(torch.ones(2, 16)))))


class _GatedBlock(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.up = torch.nn.Linear(32, 64)
        self.gate = torch.nn.Linear(32, 1)  # like Qwen2-MoE's shared_expert_gate: smaller than any useful rank

    def forward(self, x):
        return self.up(x) * torch.sigmoid(self.gate(x))


def test_default_rule_leaves_layers_smaller_than_the_rank_and_explains_why():
    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.blocks = torch.nn.ModuleList([_GatedBlock(), _GatedBlock()])

        def forward(self, x):
            return sum(b(x) for b in self.blocks)

    net = qgalore_fx.transform(Net(), rank=8)
    assert sorted(n for n, _ in qgalore_fx.projected_layers(net)) == ["blocks.0.up", "blocks.1.up"]
    assert isinstance(net.blocks[0].gate, torch.nn.Linear)  # left as it was, trained by the AdamW group
    text = qgalore_fx.explain(net)
    assert "not projected: blocks.0.gate [1x32] (smaller than rank 8" in text
    opt = qgalore_fx.optimizer(net, lr=1e-2)
    assert any(p is net.blocks[0].gate.weight for p in opt.param_groups[1]["params"])
    with pytest.raises(ValueError, match="rank=8 is larger than min"):  # chosen explicitly: it must fit
        qgalore_fx.transform(Net(), rank=8, target_modules=[r"gate"])


@pytest.mark.parametrize("kwargs, match", [
    (dict(scale=float("inf")), "scale must be a float in"),
    (dict(scale=1e308), "scale must be a float in"),
    (dict(scale=float("nan")), "scale must be a float in"),
    (dict(seed=2**62), "seed must be <="),
    (dict(block_size=2**40), "block_size must be <="),
])
def test_out_of_range_options_are_rejected_naming_them(kwargs, match):
    with pytest.raises(ValueError, match=match):
        qgalore_fx.QGaLoreConfig(rank=4, **kwargs)


def test_numpy_scalars_are_accepted_as_options():
    import numpy as np

    config = qgalore_fx.QGaLoreConfig(rank=np.int64(4), update_interval=np.int32(10), scale=np.float32(0.5),
                                      cos_threshold=np.float64(0.4))
    assert (config.rank, config.update_interval, config.scale) == (4, 10, 0.5)
    assert type(config.rank) is int and type(config.scale) is float


def test_logical_parameter_count_survives_the_transform(llama):
    before = sum(p.numel() for p in llama.parameters())
    model = qgalore_fx.transform(llama, rank=4)
    assert qgalore_fx.logical_parameters(model) == before
    # the stored Parameters are every INT8 code plus the scales and the anchors; transformers' count agrees
    # with the dense model's all the same
    layers = qgalore_fx.projected_layers(model)
    extra = sum(layer.weight_scales.numel() + layer.anchor.numel() for _, layer in layers)
    assert sum(p.numel() for p in model.parameters()) == before + extra
    assert model.num_parameters() == before
    assert f"logical parameters: {before:,}" in qgalore_fx.explain(model)
