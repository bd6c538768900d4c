"""Layer handlers (qgalore_fx.handlers): GPT-2's transposed Conv1D and user-registered types go through the
same selection, INT8 storage, meta materialization and export as nn.Linear."""

import copy
import io

import pytest
import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import save_file
from transformers import GPT2Config, GPT2LMHeadModel
from transformers.pytorch_utils import Conv1D

import qgalore_fx
from qgalore_fx import handlers
from qgalore_fx.export import export_dense
from qgalore_fx.kernels import quantize_blockwise
from qgalore_fx.layers import QGaLoreLinear

CONV1D = "transformers.pytorch_utils.Conv1D"
# the 8 Conv1D layers of a 2-block GPT-2: attention qkv and output, MLP up and down, per block
GPT2_LAYERS = [f"transformer.h.{i}.{n}" for i in range(2) for n in ("attn.c_attn", "attn.c_proj", "mlp.c_fc",
                                                                    "mlp.c_proj")]
# Logits of the tiny GPT-2 after the transform vs before: INT8 block-wise weight error only. Measured max
# |difference| 3.8e-3 .. 5.6e-3 over model seeds 0-4 (logits up to ~1.1 in magnitude); a weight stored
# untransposed (only the square 64x64 attn.c_proj, where the shapes would still fit) moves them by 0.26 .. 0.40.
LOGIT_ATOL = 2e-2


def gpt2_config():
    return GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=128, n_positions=64, bos_token_id=0,
                      eos_token_id=0, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)


def tiny_gpt2():
    torch.manual_seed(0)
    return GPT2LMHeadModel(gpt2_config()).eval()


@pytest.fixture
def ids():
    return torch.randint(0, 128, (2, 16))


def test_gpt2_conv1d_layers_are_projected_as_int8_and_train(ids):
    original = tiny_gpt2()
    ref = copy.deepcopy(original)
    with torch.no_grad():
        expected = ref(input_ids=ids).logits
    model = qgalore_fx.transform(original, rank=8)

    layers = dict(qgalore_fx.projected_layers(model))
    assert sorted(layers) == sorted(GPT2_LAYERS)
    for name, layer in layers.items():
        conv = ref.get_submodule(name)
        assert isinstance(conv, Conv1D) and layer.source_type == CONV1D
        assert layer.weight_codes.dtype == torch.int8
        assert tuple(layer.weight_codes.shape) == (conv.nf, conv.nx)  # [out, in], whatever the source layout
        # the stored codes are the quantized transpose of the [in, out] Conv1D weight
        q = quantize_blockwise(conv.weight.detach().t().float(), bits=8, block_size=layer.block_size)
        assert torch.equal(layer.weight_codes, q.codes.reshape(conv.nf, conv.nx)), name
        assert layer.bias is conv.bias or torch.equal(layer.bias, conv.bias)
    assert not [n for n, m in model.named_modules() if isinstance(m, Conv1D)]  # no float copy left

    with torch.no_grad():
        got = model(input_ids=ids).logits
    torch.testing.assert_close(got, expected, atol=LOGIT_ATOL, rtol=0)

    text = qgalore_fx.explain(model)
    assert all(name in text for name in GPT2_LAYERS) and "8 projected linears" in text

    before = {n: l.weight_codes.clone() for n, l in layers.items()}
    opt = qgalore_fx.optimizer(model, lr=1e-2)
    model.train()
    losses = []
    for _ in range(3):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    with torch.no_grad():
        losses.append(model(input_ids=ids, labels=ids).loss.item())
    assert losses[-1] < losses[0], losses
    changed = [n for n, l in layers.items() if not torch.equal(l.weight_codes, before[n])]
    assert sorted(changed) == sorted(GPT2_LAYERS)


def test_gpt2_export_rebuilds_conv1d_and_round_trips_through_save_pretrained(tmp_path, ids):
    model = qgalore_fx.transform(tiny_gpt2(), rank=8)
    dense = export_dense(model, torch.float32)

    assert isinstance(dense.transformer.h[0].mlp, fx.GraphModule)  # a traced region: its call_module is rewired
    assert "self.c_fc(" in dense.transformer.h[0].mlp.code
    assert not any(isinstance(m, QGaLoreLinear) for m in dense.modules())
    for name, layer in qgalore_fx.projected_layers(model):
        conv = dense.get_submodule(name)
        assert type(conv) is Conv1D and (conv.nf, conv.nx) == (layer.out_features, layer.in_features)
        assert tuple(conv.weight.shape) == (layer.in_features, layer.out_features)  # [in, out] again
        assert torch.equal(conv.weight, layer.dequantized_weight(torch.float32).t())
        assert torch.equal(conv.bias, layer.bias)
    with torch.no_grad():
        torch.testing.assert_close(dense(input_ids=ids).logits, model(input_ids=ids).logits, atol=1e-5, rtol=1e-5)

    dense.save_pretrained(tmp_path)
    loaded = GPT2LMHeadModel.from_pretrained(tmp_path).eval()
    assert type(loaded.transformer.h[0].mlp).__name__ == "GPT2MLP"
    assert isinstance(loaded.transformer.h[1].attn.c_attn, Conv1D)
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=ids).logits, dense(input_ids=ids).logits)


def test_source_type_survives_deepcopy_and_pickle(ids):
    model = qgalore_fx.transform(tiny_gpt2(), rank=8)
    buf = io.BytesIO()
    torch.save(model, buf)
    buf.seek(0)
    for copied in (copy.deepcopy(model), torch.load(buf, weights_only=False)):
        assert {l.source_type for _, l in qgalore_fx.projected_layers(copied)} == {CONV1D}
        dense = export_dense(copied, torch.float32)
        assert isinstance(dense.transformer.h[1].mlp.c_proj, Conv1D)


@pytest.mark.parametrize("source", ["mapping", "safetensors"])
def test_gpt2_on_meta_reads_the_transposed_weights(tmp_path, ids, source):
    real = tiny_gpt2()
    if source == "mapping":
        weights = real.state_dict()
    else:  # lm_head.weight is wte.weight (tied): safetensors stores the tensor once
        save_file({k: v.clone() for k, v in real.state_dict().items() if k != "lm_head.weight"},
                  tmp_path / "model.safetensors")
        weights = tmp_path / "model.safetensors"
    assert tuple(real.state_dict()["transformer.h.0.attn.c_attn.weight"].shape) == (64, 192)  # [in, out]
    expected = qgalore_fx.transform(copy.deepcopy(real), rank=8)
    with torch.device("meta"):
        meta = GPT2LMHeadModel(gpt2_config())
    model = qgalore_fx.transform(meta, rank=8, weights=weights).eval()

    assert not any(t.is_meta for t in list(model.parameters()) + list(model.buffers()))
    got, want = dict(qgalore_fx.projected_layers(model)), dict(qgalore_fx.projected_layers(expected))
    assert sorted(got) == sorted(GPT2_LAYERS)
    for name in GPT2_LAYERS:
        assert torch.equal(got[name].weight_codes, want[name].weight_codes), name
        assert torch.equal(got[name].weight_scales, want[name].weight_scales), name
        assert torch.equal(got[name].bias, want[name].bias), name
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, expected.eval()(input_ids=ids).logits)


def test_gpt2_on_meta_without_weights_is_initialized_like_gpt2():
    with torch.device("meta"):
        meta = GPT2LMHeadModel(gpt2_config())
    model = qgalore_fx.transform(meta, rank=8)
    w = model.transformer.h[0].attn.c_attn.dequantized_weight()
    assert tuple(w.shape) == (192, 64)
    assert 0.015 < w.std().item() < 0.025  # GPT-2's normal(0, initializer_range=0.02)


def test_selection_by_regex_and_errors_name_the_supported_types():
    model = qgalore_fx.transform(tiny_gpt2(), rank=8, target_modules=[r"c_fc"])
    assert sorted(n for n, _ in qgalore_fx.projected_layers(model)) == ["transformer.h.0.mlp.c_fc",
                                                                         "transformer.h.1.mlp.c_fc"]
    with pytest.raises(ValueError) as err:
        qgalore_fx.transform(tiny_gpt2(), rank=8, filter_fn=lambda m, n: n == "transformer.wte")
    message = str(err.value)
    assert "'transformer.wte'" in message and "Embedding" in message
    assert "torch.nn.Linear" in message and CONV1D in message and "register_layer_handler" in message


class ToyLinear(nn.Module):
    """A linear-like layer the library does not know: weight [in, out] under another name."""

    def __init__(self, in_dim, out_dim):
        super().__init__()
        self.in_dim, self.out_dim = in_dim, out_dim
        self.kernel = nn.Parameter(torch.randn(in_dim, out_dim) / in_dim ** 0.5)
        self.offset = nn.Parameter(torch.randn(out_dim) * 0.1)

    def forward(self, x):
        return F.linear(x, self.kernel.t(), self.offset)


def toy_handler():
    def build(out_features, in_features, bias):
        assert bias
        return ToyLinear(in_features, out_features)

    return handlers.LayerHandler(ToyLinear, shape=lambda m: (m.out_dim, m.in_dim), build=build, transposed=True,
                                 weight_name="kernel", bias_name="offset", name="tests.ToyLinear")


def test_user_registered_handler_is_used_by_transform_and_export(monkeypatch):
    monkeypatch.setattr(handlers, "_REGISTRY", dict(handlers._REGISTRY))  # restored after the test
    torch.manual_seed(0)
    net = nn.Sequential(ToyLinear(32, 64), nn.ReLU(), ToyLinear(64, 16))
    x = torch.randn(4, 32)
    with pytest.raises(ValueError, match="selected no layer"):
        qgalore_fx.transform(copy.deepcopy(net), rank=4)

    handler = qgalore_fx.register_layer_handler(toy_handler())
    assert handlers.handler_for(net[0]) is handler and "tests.ToyLinear" in handlers.supported_types()
    model = qgalore_fx.transform(copy.deepcopy(net), rank=4)
    layers = qgalore_fx.projected_layers(model)
    assert [(l.source_type, l.out_features, l.in_features) for _, l in layers] == [
        ("tests.ToyLinear", 64, 32), ("tests.ToyLinear", 16, 64)]
    (_, first), (_, second) = layers
    # stored [out, in]: the transpose of the [in, out] kernel, to INT8 precision (a step is <= 0.6/127)
    torch.testing.assert_close(first.dequantized_weight(), net[0].kernel.detach().t(), atol=5e-3, rtol=0)
    torch.testing.assert_close(second.dequantized_weight(), net[2].kernel.detach().t(), atol=5e-3, rtol=0)
    with torch.no_grad():  # the reference built from the dequantized weights: only fp32 rounding differs
        h = F.relu(F.linear(x, first.dequantized_weight(), net[0].offset))
        torch.testing.assert_close(model(x), F.linear(h, second.dequantized_weight(), net[2].offset),
                                   atol=1e-5, rtol=1e-5)

    dense = export_dense(model, torch.float32)
    toys = [m for m in dense.modules() if isinstance(m, ToyLinear)]
    assert len(toys) == 2 and tuple(toys[0].kernel.shape) == (32, 64)
    with torch.no_grad():
        torch.testing.assert_close(dense(x), model(x), atol=1e-5, rtol=1e-5)
