"""Fused MoE experts (transformers 5.x 3-D parameters): INT8 per expert, trained, exported, restored."""

import pytest
import torch
import transformers

import qgalore_fx
from qgalore_fx.experts import QGaLoreExperts
from qgalore_fx.layers import QGaLoreLinear

VOCAB = 128


def _mixtral_config(**kw):
    return transformers.MixtralConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2, max_position_embeddings=64,
        tie_word_embeddings=False, **kw)


def _mixtral():
    torch.manual_seed(0)
    return transformers.MixtralForCausalLM(_mixtral_config()).eval()


def _qwen2_moe(moe_intermediate_size=48):
    torch.manual_seed(0)
    cfg = transformers.Qwen2MoeConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, moe_intermediate_size=moe_intermediate_size,
        shared_expert_intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        num_experts=4, num_experts_per_tok=2, max_position_embeddings=64, tie_word_embeddings=False)
    return transformers.Qwen2MoeForCausalLM(cfg).eval()


def _ids(seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (2, 16), generator=g)


def _experts(model):
    return [(n, m) for n, m in model.named_modules() if isinstance(m, QGaLoreExperts)]


def _train(model, steps=3, **opt_kw):
    opt = qgalore_fx.optimizer(model, lr=1e-2, **opt_kw)
    for i in range(steps):
        ids = _ids(i)
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
    return opt


def test_experts_are_int8_per_expert_and_compute_the_dequantized_model():
    model = _mixtral()
    ids = _ids()
    with torch.no_grad():
        ref = model(input_ids=ids).logits
    model = qgalore_fx.transform(model, rank=8)
    moe = _experts(model)
    assert [n for n, _ in moe] == ["model.layers.0.mlp.experts", "model.layers.1.mlp.experts"]
    for _, experts in moe:
        assert experts.num_experts == 4
        assert all(isinstance(layer, QGaLoreLinear) and layer.weight_codes.dtype == torch.int8
                   for layer in [*experts.gate_up, *experts.down])
        assert (experts.gate_up[0].out_features, experts.gate_up[0].in_features) == (192, 64)
        assert (experts.down[0].out_features, experts.down[0].in_features) == (64, 96)
    keys = model.state_dict().keys()
    assert not any(k.endswith(("gate_up_proj", "down_proj")) for k in keys)  # no fp32 copy of a fused weight
    assert "model.layers.0.mlp.experts.gate_up.3.weight_codes" in keys
    text = qgalore_fx.explain(model)
    assert "MoE: 2 fused-experts modules" in text and "model.layers.1.mlp.experts.down.3" in text
    # the logical parameter count is the original model's
    assert qgalore_fx.logical_parameters(model) == sum(p.numel() for p in _mixtral().parameters())

    dense = qgalore_fx.export_dense(model, torch.float32)
    with torch.no_grad():
        out, twin = model(input_ids=ids).logits, dense(input_ids=ids).logits
    torch.testing.assert_close(out, twin, atol=1e-4, rtol=1e-4)  # same routing, same dequantized weights
    assert (out - ref).abs().max() < 0.05  # INT8 storage error only


def test_routed_experts_train_and_idle_ones_do_not():
    model = qgalore_fx.transform(_mixtral(), rank=8)
    experts = _experts(model)[0][1]
    hit = set()

    def record(module, args, output):
        hit.update(args[1].unique().tolist())

    handle = experts.register_forward_hook(record)
    codes = [layer.weight_codes.clone() for layer in experts.gate_up]
    opt = _train(model, steps=1)
    handle.remove()
    assert hit, "the router sent no token anywhere"
    for e, (layer, before) in enumerate(zip(experts.gate_up, codes)):
        changed = bool((layer.weight_codes != before).any())
        assert changed == (e in hit), (e, hit)
        assert layer.stats()["step"] == int(e in hit)
    assert opt.skipped_updates == 0


def test_every_expert_steps_under_distributed(monkeypatch):
    # With several processes each projected layer all-reduces inside backward, so all experts must run.
    import qgalore_fx.experts as experts_mod

    monkeypatch.setattr(experts_mod, "_distributed", lambda: True)
    model = qgalore_fx.transform(_mixtral(), rank=8)
    opt = qgalore_fx.optimizer(model, lr=1e-2, process_group=None)
    # route every token of layer 0 to experts 0 and 1 only: experts 2 and 3 get an empty batch
    experts = _experts(model)[0][1]
    forward = experts.forward
    monkeypatch.setattr(experts, "forward", lambda h, idx, w: forward(h, idx % 2, w))
    ids = _ids()
    model(input_ids=ids, labels=ids).loss.backward()
    opt.step()
    assert [layer.stats()["step"] for layer in experts.gate_up] == [1, 1, 1, 1]
    assert all(torch.isfinite(layer.dequantized_weight()).all() for layer in experts.gate_up)


def test_export_loads_in_the_original_class_and_restore_is_exact(tmp_path):
    model = qgalore_fx.transform(_mixtral(), rank=8)
    _train(model)
    ids = _ids(5)
    dense = qgalore_fx.export_dense(model, torch.float32)
    assert isinstance(dense.model.layers[0].mlp.experts, transformers.models.mixtral.modeling_mixtral.MixtralExperts)
    dense.save_pretrained(tmp_path / "dense")
    back = transformers.MixtralForCausalLM.from_pretrained(tmp_path / "dense", dtype=torch.float32)
    with torch.no_grad():
        torch.testing.assert_close(back(input_ids=ids).logits, dense(input_ids=ids).logits, atol=0, rtol=0)
        torch.testing.assert_close(dense(input_ids=ids).logits, model(input_ids=ids).logits, atol=1e-4, rtol=1e-4)

    model.save_pretrained(tmp_path / "transformed")
    restored = qgalore_fx.from_pretrained(tmp_path / "transformed")
    for (n1, t1), (n2, t2) in zip(model.state_dict().items(), restored.state_dict().items()):
        assert n1 == n2 and torch.equal(t1, t2), n1
    with torch.no_grad():
        assert torch.equal(restored(input_ids=ids).logits, model(input_ids=ids).logits)


def test_meta_materialization_reads_each_expert_from_safetensors(tmp_path):
    real = _mixtral()
    real.save_pretrained(tmp_path)
    expected = qgalore_fx.transform(_mixtral(), rank=8)
    with torch.device("meta"):
        meta = transformers.MixtralForCausalLM(_mixtral_config())
    built = qgalore_fx.transform(meta, rank=8, weights=tmp_path)
    for (n1, t1), (n2, t2) in zip(expected.state_dict().items(), built.state_dict().items()):
        assert n1 == n2 and torch.equal(t1, t2), n1
    # without weights, a meta model's experts are initialized as the model initializes them (not left empty)
    with torch.device("meta"):
        meta = transformers.MixtralForCausalLM(_mixtral_config(initializer_range=0.02))
    fresh = qgalore_fx.transform(meta, rank=8)
    w = _experts(fresh)[0][1].gate_up[0].dequantized_weight()
    assert torch.isfinite(w).all() and 0.015 < w.std().item() < 0.025


def test_qwen2_moe_defaults_project_experts_and_skip_the_tiny_gate():
    model = qgalore_fx.transform(_qwen2_moe(), rank=16)
    text = qgalore_fx.explain(model)
    assert "not projected: model.layers.0.mlp.shared_expert_gate [1x64]" in text
    assert len(_experts(model)) == 2
    assert "model.layers.0.mlp.shared_expert.gate_proj" in dict(qgalore_fx.projected_layers(model))
    opt = _train(model, steps=2)
    assert opt.skipped_updates == 0
    ids = _ids(7)
    dense = qgalore_fx.export_dense(model, torch.float32)
    with torch.no_grad():
        torch.testing.assert_close(dense(input_ids=ids).logits, model(input_ids=ids).logits, atol=1e-4, rtol=1e-4)


def test_accumulation_and_freezing_reach_experts():
    model = qgalore_fx.transform(_mixtral(), rank=8)
    experts = _experts(model)[1][1]
    experts.requires_grad_(False)
    frozen = [layer.weight_codes.clone() for layer in [*experts.gate_up, *experts.down]]
    opt = qgalore_fx.optimizer(model, lr=1e-2, accumulation_steps=2)
    live = _experts(model)[0][1]
    for i in range(2):
        ids = _ids(i)
        model(input_ids=ids, labels=ids).loss.backward()
    assert any(layer.stats()["pending"] for layer in live.gate_up)
    assert all(layer.stats()["step"] == 0 for layer in live.gate_up)  # nothing applied before step()
    opt.step()
    assert any(layer.stats()["step"] == 1 for layer in live.gate_up)
    assert max(layer.stats()["step"] for layer in live.gate_up) == 1  # one update for two micro-batches
    for layer, before in zip([*experts.gate_up, *experts.down], frozen):
        assert torch.equal(layer.weight_codes, before)


def test_unsupported_layout_is_left_out_and_listed():
    model = _mixtral()
    model.model.layers[0].mlp.experts.has_bias = True  # e.g. GPT-OSS-style biased experts
    model = qgalore_fx.transform(model, rank=8)
    assert [n for n, _ in _experts(model)] == ["model.layers.1.mlp.experts"]
    assert "not projected: model.layers.0.mlp.experts [4x192x64] (fused experts with has_bias=True" \
        in qgalore_fx.explain(model)
    assert model.model.layers[0].mlp.experts.gate_up_proj.dtype == torch.float32
    with pytest.raises(ValueError, match="has_bias=True.*cannot project"):
        odd = _mixtral()
        odd.model.layers[0].mlp.experts.has_bias = True
        qgalore_fx.transform(odd, rank=8, target_modules=[r"experts$"])


def test_experts_smaller_than_the_rank():
    # explicitly chosen: an error naming the expert matrix
    message = r"rank=80 is larger than min\(out, in\)=64 of layer 'model\.layers\.0\.mlp\.experts\.gate_up'"
    with pytest.raises(ValueError, match=message):
        qgalore_fx.transform(_mixtral(), rank=80, target_modules=[r"experts$"])
    # default selection: left to the AdamW group and listed, the rest of the model is projected
    model = qgalore_fx.transform(_qwen2_moe(moe_intermediate_size=12), rank=16)
    assert not _experts(model)
    assert "not projected: model.layers.0.mlp.experts [4x24x64] (experts smaller than rank 16" \
        in qgalore_fx.explain(model)
    assert model.model.layers[0].mlp.experts.gate_up_proj.requires_grad
    _train(model, steps=1)
