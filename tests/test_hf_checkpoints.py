"""quant_method "qgalore_fx": from_pretrained(quantization_config=) loads straight into INT8, save_pretrained ->
from_pretrained restores a transformed model exactly, and a dense export is a plain checkpoint again."""

import json
import subprocess
import sys

import pytest
import torch
import transformers

import qgalore_fx
from conftest import tiny_llama

OPTIONS = dict(rank=8, update_interval=2)


def _steps(model, opt, seeds):
    model.train()
    for seed in seeds:
        ids = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(seed))
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()


def _trained():
    model = qgalore_fx.transform(tiny_llama(), **OPTIONS)
    opt = qgalore_fx.optimizer(model, lr=1e-2)
    _steps(model, opt, range(3))
    return model, opt


def _assert_same_state(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    differ = [k for k in sa if sa[k].dtype != sb[k].dtype or not torch.equal(sa[k], sb[k])]
    assert not differ, differ[:5]


def test_plain_checkpoint_loads_straight_into_int8(tmp_path):
    tiny_llama().save_pretrained(tmp_path)
    model, info = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path, quantization_config=qgalore_fx.QGaLoreQuantizationConfig(**OPTIONS), output_loading_info=True)
    assert qgalore_fx.is_transformed(model)
    assert not any(t.is_meta for t in model.state_dict().values())
    # the loading report is clean: no projected weight reported missing, no fp checkpoint weight unexpected
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    # exactly what transform() makes of the same weights, and it trains identically
    reference = qgalore_fx.transform(tiny_llama(), **OPTIONS)
    _assert_same_state(reference, model)
    for m in (reference, model):
        _steps(m, qgalore_fx.optimizer(m, lr=1e-2), range(3))
    _assert_same_state(reference, model)
    layer = dict(qgalore_fx.projected_layers(model))["model.layers.0.mlp.up_proj"]
    assert layer.weight_codes.dtype == torch.int8 and not layer.weight_scales.requires_grad
    assert model.config.quantization_config.quant_method == "qgalore_fx"
    assert qgalore_fx.logical_parameters(model) == tiny_llama().num_parameters()


def test_num_parameters_is_the_dense_models_count(tmp_path):
    import copy
    import pickle

    dense = tiny_llama()
    model = qgalore_fx.transform(tiny_llama(), **OPTIONS)
    model.model.norm.weight.requires_grad_(False)
    dense.model.norm.weight.requires_grad_(False)
    stored = sum(p.numel() for p in model.parameters())
    for kw in ({}, {"exclude_embeddings": True}, {"only_trainable": True}):
        assert model.num_parameters(**kw) == dense.num_parameters(**kw), kw
    assert stored > dense.num_parameters()  # the scales and anchors are Parameters too
    assert f"logical parameters: {dense.num_parameters():,}" in qgalore_fx.explain(model)
    for copied in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        assert copied.num_parameters() == dense.num_parameters()
        assert copied.num_parameters.model is copied
    # a reload, and a load straight into INT8, count the same
    model.save_pretrained(tmp_path / "saved")
    assert transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "saved").num_parameters() == \
        tiny_llama().num_parameters()
    tiny_llama().save_pretrained(tmp_path / "plain")
    loaded = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path / "plain", quantization_config=qgalore_fx.QGaLoreQuantizationConfig(**OPTIONS))
    assert loaded.num_parameters(exclude_embeddings=True) == tiny_llama().num_parameters(exclude_embeddings=True)


@pytest.mark.parametrize("model_class", [transformers.AutoModelForCausalLM, transformers.LlamaForCausalLM])
def test_save_pretrained_reloads_exactly_and_trains_on_identically(tmp_path, model_class):
    model, opt = _trained()
    model.save_pretrained(tmp_path, max_shard_size="100KB")
    assert len(list(tmp_path.glob("*.safetensors"))) > 1 and not list(tmp_path.glob("*.bin"))
    saved = json.loads((tmp_path / "config.json").read_text())["quantization_config"]
    assert saved["quant_method"] == "qgalore_fx" and saved["rank"] == 8 and saved["update_interval"] == 2
    restored = model_class.from_pretrained(tmp_path)
    assert qgalore_fx.is_transformed(restored)
    _assert_same_state(model, restored)  # codes, scales, projections, moments, counters, refresh schedule
    opt2 = qgalore_fx.optimizer(restored, lr=1e-2)
    opt2.load_state_dict(opt.state_dict())
    for m, o in ((model, opt), (restored, opt2)):
        _steps(m, o, range(3, 7))  # across a refresh (update_interval 2)
    _assert_same_state(model, restored)


def test_alias_and_folders_saved_before_quant_method(tmp_path):
    model, _ = _trained()
    model.save_pretrained(tmp_path)
    _assert_same_state(model, qgalore_fx.from_pretrained(tmp_path))
    # the earlier marker: a quantization_config without quant_method, the options under "qgalore_fx"
    path = tmp_path / "config.json"
    config = json.loads(path.read_text())
    options = {k: v for k, v in config["quantization_config"].items() if k not in ("quant_method", "qgalore_fx_version")}
    config["quantization_config"] = {"qgalore_fx": options, "qgalore_fx_version": "0.1.0",
                                     "load_with": "qgalore_fx.from_pretrained(path)"}
    path.write_text(json.dumps(config))
    _assert_same_state(model, qgalore_fx.from_pretrained(tmp_path))


def test_without_qgalore_fx_imported_transformers_refuses_naming_it(tmp_path):
    model, _ = _trained()
    model.save_pretrained(tmp_path)
    code = ("import sys, transformers\n"
            f"transformers.AutoModelForCausalLM.from_pretrained({str(tmp_path)!r})\n")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert run.returncode != 0
    assert "ValueError" in run.stderr and "import qgalore_fx" in run.stderr, run.stderr[-2000:]
    assert "Unknown quantization type, got qgalore_fx" in run.stderr
    # with qgalore_fx imported the model's own attention comes back
    model.config._attn_implementation = "eager"
    model.save_pretrained(tmp_path / "eager")
    assert transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "eager").config._attn_implementation == "eager"
    assert transformers.AutoModelForCausalLM.from_pretrained(tmp_path).config._attn_implementation == "sdpa"


def test_registration_follows_either_import_order():
    for code in ("import qgalore_fx, sys; assert 'transformers' not in sys.modules; "
                 "from transformers.quantizers.auto import AUTO_QUANTIZER_MAPPING as M; assert 'qgalore_fx' in M",
                 "from transformers.quantizers.auto import AUTO_QUANTIZER_MAPPING as M; import qgalore_fx; "
                 "assert 'qgalore_fx' in M"):
        run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
        assert run.returncode == 0, run.stderr[-2000:]


def test_dense_export_is_a_plain_hf_checkpoint(tmp_path):
    model, _ = _trained()
    dense = qgalore_fx.export_dense(model, dtype=torch.float32)
    assert getattr(dense.config, "quantization_config", None) is None and not dense.is_quantized
    assert model.config.quantization_config.quant_method == "qgalore_fx"  # the transformed model keeps its own
    dense.save_pretrained(tmp_path)
    loaded = transformers.LlamaForCausalLM.from_pretrained(tmp_path)
    ids = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(9))
    dense.eval()
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=ids).logits, dense(input_ids=ids).logits)
    with pytest.raises(ValueError, match="not saved from a model transformed"):
        qgalore_fx.from_pretrained(tmp_path)


def test_bad_options_are_refused_before_anything_is_built(tmp_path):
    with pytest.raises(ValueError, match="rank must be >= 1"):
        qgalore_fx.QGaLoreQuantizationConfig(rank=0)
    with pytest.raises(TypeError, match="unknown option"):
        qgalore_fx.QGaLoreQuantizationConfig(rank=8, rnak=3)
    with pytest.raises(TypeError, match="target_modules"):
        qgalore_fx.QGaLoreQuantizationConfig(rank=8, filter_fn=lambda m, n: True)
    tiny_llama().save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="device_map"):
        transformers.AutoModelForCausalLM.from_pretrained(
            tmp_path, quantization_config=qgalore_fx.QGaLoreQuantizationConfig(rank=8),
            device_map={"model.embed_tokens": "cpu", "lm_head": "disk"})


def _dtypes(model):
    return {name: t.dtype for name, t in model.named_parameters()}


@pytest.mark.parametrize("how", ["dtype=bfloat16", "auto from a bf16 checkpoint"])
def test_dtype_bfloat16_stores_what_is_not_projected_in_bf16_trains_and_reloads(tmp_path, how):
    """transformers' ``dtype`` is the storage of what qgalore_fx does not project: with bfloat16 (asked for, or
    "auto" on a bf16 checkpoint) the embedding, norms and head are bf16, the projected layers INT8 with fp32
    scales and anchors as always; a training step moves the bf16 norms (stochastic rounding: Adam's 1e-3 steps
    are below bf16's spacing near 1, so rounding to nearest would leave every one at 1.0); the saved folder reloads
    with every tensor and dtype equal and the next steps identical."""
    dense = tiny_llama()
    if how == "dtype=bfloat16":
        dense.save_pretrained(tmp_path / "ck")
        kwargs = {"dtype": torch.bfloat16}
    else:
        dense.to(torch.bfloat16).save_pretrained(tmp_path / "ck")
        kwargs = {}
    model = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path / "ck", quantization_config=qgalore_fx.QGaLoreQuantizationConfig(**OPTIONS), **kwargs)
    dtypes = _dtypes(model)
    rest = {k: v for k, v in dtypes.items() if not k.endswith(("weight_codes", "weight_scales", "anchor"))}
    assert set(rest.values()) == {torch.bfloat16} and "model.embed_tokens.weight" in rest and "lm_head.weight" in rest
    layer = dict(qgalore_fx.projected_layers(model))["model.layers.0.mlp.up_proj"]
    assert (layer.weight_codes.dtype, layer.weight_scales.dtype, layer.anchor.dtype) == \
        (torch.int8, torch.float32, torch.float32)
    expected = dense.model.embed_tokens.weight.detach().to(torch.bfloat16)
    assert torch.equal(model.model.embed_tokens.weight.detach(), expected)

    opt = qgalore_fx.optimizer(model, lr=1e-2, rest_lr=1e-3)
    norm = model.model.layers[0].input_layernorm.weight
    assert torch.equal(norm.detach(), torch.ones_like(norm))
    _steps(model, opt, range(2))
    assert _dtypes(model) == dtypes
    moved = (norm.detach() != 1).float().mean().item()
    assert 0.05 < moved < 1.0, moved  # some elements stepped to a neighbour of 1.0, in expectation as fp32 would

    model.save_pretrained(tmp_path / "saved", max_shard_size="100KB")
    restored = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "saved")
    _assert_same_state(model, restored)
    opt2 = qgalore_fx.optimizer(restored, lr=1e-2, rest_lr=1e-3)
    opt2.load_state_dict(opt.state_dict())
    for m, o in ((model, opt), (restored, opt2)):
        _steps(m, o, range(2, 5))  # across a refresh (update_interval 2)
    _assert_same_state(model, restored)


def test_dtype_float16_is_stored_as_float32_with_a_warning(tmp_path):
    tiny_llama().save_pretrained(tmp_path)
    with pytest.warns(UserWarning, match=r"dtype=torch.float16 cannot be trained without loss scaling.*float32"):
        model = transformers.AutoModelForCausalLM.from_pretrained(
            tmp_path, dtype=torch.float16, quantization_config=qgalore_fx.QGaLoreQuantizationConfig(**OPTIONS))
    assert model.model.embed_tokens.weight.dtype == torch.float32 and model.model.norm.weight.dtype == torch.float32


@pytest.mark.parametrize("tied", [True, False])
def test_a_large_tensor_converted_on_load_is_read_by_the_quantizer_in_row_chunks(tmp_path, monkeypatch, tied):
    """An unprojected tensor the checkpoint holds in fp32, loaded with dtype=torch.bfloat16, is read by the
    quantizer in row chunks (each through its own mapping of the file) straight into its bf16 tensor, which
    transformers then leaves alone (it would read the tensor whole, then convert it): the values are the fp32 ones
    rounded to bf16, a tied head stays tied, and the loading report is clean."""
    import safetensors

    from qgalore_fx.integrations import transformers as integration

    dense = tiny_llama(vocab=4096)
    dense.config.tie_word_embeddings = tied
    if tied:
        dense.tie_weights()
    dense.save_pretrained(tmp_path)
    monkeypatch.setattr(integration, "CONVERT_MIN_NUMEL", 1 << 16)
    monkeypatch.setattr(integration, "CONVERT_CHUNK_BYTES", 1 << 16)  # 256 rows of 64 fp32
    reads, made = [], []
    real_open, real_read = safetensors.safe_open, integration._read_converted

    class Handle:
        def __init__(self, *args, **kwargs):
            self._h = real_open(*args, **kwargs)

        def __enter__(self):
            self._h.__enter__()
            return self

        def __exit__(self, *exc):
            return self._h.__exit__(*exc)

        def get_slice(self, key):
            part = self._h.get_slice(key)

            class Slice:
                def __getitem__(_, index):
                    reads.append((key, index.start, index.stop))
                    return part[index]
            return Slice()

    def read(stored, dtype, device):
        with monkeypatch.context() as m:
            m.setattr(safetensors, "safe_open", Handle)
            made.append(real_read(stored, dtype, device))
        return made[-1]

    monkeypatch.setattr(integration, "_read_converted", read)
    model, info = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path, dtype=torch.bfloat16, quantization_config=qgalore_fx.QGaLoreQuantizationConfig(**OPTIONS),
        output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    names = ["model.embed_tokens.weight"] + ([] if tied else ["lm_head.weight"])
    assert sorted({key for key, *_ in reads}) == sorted(names)  # nothing else is large enough
    for key in names:
        ranges = [(a, b) for k, a, b in reads if k == key]
        assert ranges == [(start, start + 256) for start in range(0, 4096, 256)]  # one mapping per chunk
    assert [t.data_ptr() for t in made] == [model.get_parameter(n).data_ptr() for n in names]  # kept as read
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        loaded = model.get_parameter(name)
        assert loaded.dtype == torch.bfloat16 and loaded.requires_grad
        assert torch.equal(loaded.detach(), dense.get_parameter(name).detach().to(torch.bfloat16)), name
    assert (model.lm_head.weight is model.model.embed_tokens.weight) == tied
    assert "model.embed_tokens.weight" in model.state_dict()  # shown again once loaded
