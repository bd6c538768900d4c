"""``qgalore-fx finetune``: a tiny pretrained LLaMA saved as safetensors + a BPE tokenizer in a tmp dir.

Every test runs the command through ``cli.main`` on a few steps of a synthetic corpus (one CPU thread).
"""

import json
import math
import os
import subprocess
import sys

import pytest
import torch
from test_cli import write_corpus

from qgalore_fx.app import cli
from qgalore_fx.app import finetune as ft

# rank 8 fits the tiny model (hidden 64, key/value 32); a refresh every 4 steps so resume crosses refreshes
SMALL = ["--steps", "6", "--batch-size", "2", "--seq-len", "32", "--eval-tokens", "256", "--log-every", "2",
         "--threads", "1"]
QGALORE = ["--rank", "8", "--update-interval", "4"]


pytestmark = pytest.mark.usefixtures("one_thread", "no_stray_log_handlers")  # conftest.py


def save_tiny_model(directory, corpus_dir, tie=True, hidden=64, intermediate=160, layers=2, tokenizer=True):
    """A LlamaForCausalLM from a config (random weights, tied embeddings by default) saved with
    ``save_pretrained(safe_serialization=True)``, plus a byte-level BPE trained on ``corpus_dir`` and saved as a
    ``PreTrainedTokenizerFast``."""
    import transformers
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    vocab = 300
    if tokenizer:
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=["<|endoftext|>"], show_progress=False,
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
        tok.train([str(p) for p in sorted(corpus_dir.glob("*.txt"))], trainer)
        fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>")
        fast.save_pretrained(str(directory))
    config = transformers.LlamaConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=tie)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config)
    model.save_pretrained(str(directory), safe_serialization=True)
    return directory


@pytest.fixture(scope="module")
def corpus_dir(tmp_path_factory):
    return write_corpus(tmp_path_factory.mktemp("ft") / "corpus")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, corpus_dir):
    return save_tiny_model(tmp_path_factory.mktemp("ft") / "model", corpus_dir)


def run(model_dir, corpus_dir, run_dir, *extra):
    argv = ["finetune", "--model", str(model_dir), "--corpus", str(corpus_dir), "--run-dir", str(run_dir),
            *SMALL, *extra]
    assert cli.main(argv) == 0
    return json.loads((run_dir / "summary.json").read_text())


def records(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


# --------------------------------------------------------------------------- the run directory


def test_qgalore_run_writes_a_complete_run_directory(model_dir, corpus_dir, tmp_path):
    summary = run(model_dir, corpus_dir, tmp_path / "run", *QGALORE)
    run_dir = tmp_path / "run"
    assert {p.name for p in run_dir.iterdir()} >= {"config.json", "metrics.jsonl", "loss.png", "summary.json",
                                                   "checkpoint"}
    config = json.loads((run_dir / "config.json").read_text())
    assert config["finetune"]["method"] == "qgalore" and config["finetune"]["transform"]["rank"] == 8
    assert config["model"]["tied_embeddings"] is True and config["model"]["source"] == "safetensors"
    recs = records(run_dir)
    assert recs[0]["step"] == 0 and "loss" not in recs[0]  # held-out perplexity before training
    assert [r["step"] for r in recs[1:]] == [2, 4, 6]
    assert all(r["step_s"] > 0 for r in recs[1:])
    assert math.isclose(summary["val_ppl_before"], recs[0]["val_ppl"])
    assert math.isclose(summary["val_ppl"], recs[-1]["val_ppl"])
    assert math.isclose(summary["val_ppl"], math.exp(summary["val_loss"]))
    assert summary["val_tokens"] == 256  # 8 fixed windows of 32 labels
    # a random tiny model learns this corpus quickly: training must lower the held-out perplexity
    assert summary["val_ppl"] < summary["val_ppl_before"] < 1000
    assert summary["refreshes"] >= 14  # 14 projected layers refresh at step 1, again at step 5
    m = summary["memory"]
    assert m["load"]["peak_rss_bytes"] >= m["load"]["rss_after_bytes"] > 0
    assert m["train"]["peak_rss_bytes"] > 0
    assert summary["step_seconds_median"] > 0


def test_gradient_checkpointing_changes_nothing_but_memory(model_dir, corpus_dir, tmp_path):
    """The fused update runs once per step with activations recomputed in backward: same numbers as without."""
    with_ckpt = run(model_dir, corpus_dir, tmp_path / "a", *QGALORE)
    without = run(model_dir, corpus_dir, tmp_path / "b", *QGALORE, "--no-gradient-checkpointing")
    assert json.loads((tmp_path / "a" / "config.json").read_text())["finetune"]["gradient_checkpointing"] is True
    assert with_ckpt["val_ppl"] == without["val_ppl"] and with_ckpt["final_train_loss"] == without["final_train_loss"]


# --------------------------------------------------------------------------- export


def test_export_reloads_with_from_pretrained_and_gives_the_trained_models_logits(model_dir, corpus_dir, tmp_path):
    import transformers

    import qgalore_fx

    run_dir, export = tmp_path / "run", tmp_path / "export"
    run(model_dir, corpus_dir, run_dir, *QGALORE, "--export", str(export))
    reloaded = transformers.LlamaForCausalLM.from_pretrained(str(export)).eval()
    assert reloaded.lm_head.weight is reloaded.model.embed_tokens.weight  # the tie survives the export
    assert transformers.AutoTokenizer.from_pretrained(str(export)).eos_token == "<|endoftext|>"

    # the trained transformed model: rebuilt as the run built it, then the run's final checkpoint
    cfg = ft.recorded_finetune_config(run_dir).resolved()
    trained = ft.load_model(cfg).model
    qgalore_fx.load_checkpoint(run_dir / "checkpoint", trained)
    dense = qgalore_fx.export_dense(trained, dtype=torch.float32).eval()
    x = torch.randint(0, 300, (2, 24))
    with torch.no_grad():
        expected = dense(input_ids=x).logits
        torch.testing.assert_close(reloaded(input_ids=x).logits, expected, rtol=0, atol=0)
        # and the checkpoint is the trained state, not the pretrained one
        pretrained = transformers.LlamaForCausalLM.from_pretrained(str(model_dir)).eval()
        assert (pretrained(input_ids=x).logits - expected).abs().max() > 1e-3


def test_export_refuses_a_non_empty_directory(model_dir, corpus_dir, tmp_path, capsys):
    export = tmp_path / "export"
    export.mkdir()
    (export / "keep.txt").write_text("mine")
    with pytest.raises(SystemExit) as exc:
        cli.main(["finetune", "--model", str(model_dir), "--corpus", str(corpus_dir), "--run-dir",
                  str(tmp_path / "run"), *SMALL, *QGALORE, "--export", str(export)])
    assert exc.value.code == 2 and "--export" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


# --------------------------------------------------------------------------- baselines


@pytest.mark.parametrize("baseline", ["adamw", "adamw8bit", "lora"])
def test_each_baseline_runs_and_exports(baseline, model_dir, corpus_dir, tmp_path):
    import transformers

    export = tmp_path / "export"
    summary = run(model_dir, corpus_dir, tmp_path / "run", "--baseline", baseline, "--lr", "3e-3",
                  "--export", str(export))
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["finetune"]["method"] == baseline and config["finetune"]["transform"] is None
    expected = {"adamw": "torch.optim.adamw.AdamW", "adamw8bit": "bitsandbytes.optim.adamw.AdamW8bit",
                "lora": "torch.optim.adamw.AdamW"}[baseline]
    assert config["optimizer"] == expected
    assert summary["refreshes"] is None
    assert summary["val_ppl"] < summary["val_ppl_before"]
    reloaded = transformers.LlamaForCausalLM.from_pretrained(str(export))
    assert not any("lora" in name for name, _ in reloaded.named_parameters())  # adapters merged
    pretrained = transformers.LlamaForCausalLM.from_pretrained(str(model_dir))
    changed = [n for n, p in reloaded.named_parameters() if not torch.equal(p, pretrained.get_parameter(n))]
    if baseline == "lora":  # only the adapted linears change; embeddings and norms are frozen
        assert changed and all(n.endswith("proj.weight") for n in changed)
    else:
        assert "model.embed_tokens.weight" in changed


def test_lora_trains_only_adapters(model_dir, corpus_dir, tmp_path):
    cfg = ft.FinetuneConfig(model=str(model_dir), method="lora", lora_rank=4, device="cpu").resolved()
    model = ft.load_model(cfg).model
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    assert len(trainable) == 2 * 7 * 2  # A and B for q, k, v, o, gate, up, down in 2 layers


# --------------------------------------------------------------------------- resume

WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "pretrain_worker.py")


def test_a_killed_run_resumes_to_the_numbers_of_an_uninterrupted_one(model_dir, corpus_dir, tmp_path):
    import signal

    from qgalore_fx.checkpoint import read_checkpoint

    args = [*SMALL, *QGALORE, "--steps", "10", "--corpus", str(corpus_dir), "--model", str(model_dir)]
    straight, stopped = tmp_path / "straight", tmp_path / "stopped"
    assert cli.main(["finetune", *args, "--run-dir", str(straight)]) == 0

    log = (tmp_path / "worker.log").open("w")
    proc = subprocess.Popen([sys.executable, WORKER, "8", "finetune", *args, "--run-dir", str(stopped),
                             "--save-every", "3"], stdout=subprocess.PIPE, stderr=log, text=True)
    try:
        line = proc.stdout.readline()  # steps 1..7 done; the checkpoint of step 6 is the last one
        assert line.startswith("paused before step 8 "), (tmp_path / "worker.log").read_text()[-3000:]
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        log.close()
    assert not (stopped / "summary.json").exists()
    assert read_checkpoint(stopped / "checkpoint")["extra"]["step"] == 6

    assert cli.main(["finetune", "--resume", str(stopped), "--threads", "1"]) == 0
    a = json.loads((straight / "summary.json").read_text())
    b = json.loads((stopped / "summary.json").read_text())
    for key in ("val_ppl_before", "val_ppl", "final_train_loss", "refreshes"):
        assert a[key] == b[key], key  # exact
    assert (a["resumed_at"], b["resumed_at"]) == ([], [6])
    timing = ("step_s", "tokens_per_s")
    strip = lambda recs: [{k: v for k, v in r.items() if k not in timing} for r in recs]  # noqa: E731
    assert strip(records(stopped)) == strip(records(straight))


def test_resume_refuses_other_options(model_dir, corpus_dir, tmp_path, capsys):
    run(model_dir, corpus_dir, tmp_path / "run", *QGALORE)
    with pytest.raises(SystemExit) as exc:
        cli.main(["finetune", "--resume", str(tmp_path / "run"), "--lr", "1e-2"])
    assert exc.value.code == 2 and "drop --lr" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:  # a finished run
        cli.main(["finetune", "--resume", str(tmp_path / "run")])
    assert exc.value.code == 2 and "finished" in capsys.readouterr().err


# --------------------------------------------------------------------------- bad input


@pytest.fixture(scope="module")
def no_tokenizer_dir(tmp_path_factory, corpus_dir):
    return save_tiny_model(tmp_path_factory.mktemp("ft") / "bare", corpus_dir, tokenizer=False)


@pytest.mark.parametrize("argv, message", [
    (["--model", "{tmp}/missing"], "--model {tmp}/missing: no such file or directory"),
    (["--model", "{corpus}"], "has no config.json"),
    (["--model", "{corpus}/000.txt"], "a file must be a .gguf model"),
    (["--model", "{bare}"], "has no tokenizer"),
    (["--model", "{model}", "--baseline", "sgd"], "argument --baseline: invalid choice: 'sgd'"),
    (["--model", "{model}", "--steps", "0"], "argument --steps: expected a positive integer, got 0"),
    (["--model", "{model}", "--lr", "nan"], "argument --lr: expected a positive finite number"),
    (["--model", "{model}", "--seq-len", "x"], "argument --seq-len: expected a positive integer, got 'x'"),
    (["--model", "{model}", "--rank", "0"], "rank"),
    (["--model", "{model}", "--rank", "100"], "rank"),  # larger than every projected layer (hidden 64)
    (["--model", "{model}", "--baseline", "adamw", "--rank", "8"], "--rank has no effect with --baseline adamw"),
    (["--model", "{model}", "--lora-rank", "4"], "--lora-rank applies only to --baseline lora"),
    (["--model", "{model}", "--warmup", "99"], "warmup must be an integer in [0, steps=6]"),
    (["--model", "{model}", "--seq-len", "512"], "--seq-len 512"),
    ([], "--model PATH is required"),
    (["--model", "{model}", "--resume", "{tmp}"], "--resume"),
])
def test_bad_input_names_the_argument(argv, message, model_dir, corpus_dir, no_tokenizer_dir, tmp_path, capsys):
    subst = dict(tmp=tmp_path, corpus=corpus_dir, model=model_dir, bare=no_tokenizer_dir)
    argv = [a.format(**subst) for a in argv]
    with pytest.raises(SystemExit) as exc:
        cli.main(["finetune", *SMALL, "--corpus", str(corpus_dir), "--run-dir", str(tmp_path / "run"), *argv])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert message.format(**subst) in err, err
    assert not (tmp_path / "run" / "summary.json").exists()


def test_config_errors_name_the_field(model_dir):
    for kwargs, name in [({"method": "sgd"}, "method"), ({"eval_tokens": 0}, "eval_tokens"),
                         ({"lora_alpha": -1.0}, "lora_alpha"), ({"rest_lr": 1e-3, "method": "adamw"}, "rest_lr"),
                         ({"val_fraction": 1.0}, "val_fraction"), ({"model": ""}, "model")]:
        with pytest.raises(ValueError, match=f"^{name} must be"):
            ft.FinetuneConfig(**{"model": str(model_dir), **kwargs})


# --------------------------------------------------------------------------- materialization


class LiveFloat32Bytes:
    """A dispatch mode that tracks the fp32 tensors of the given 2-D ``shapes`` (a projected layer's weight) any
    op takes or makes, and the peak of their bytes alive at once (tensors over the same bytes count once, until
    the last of them is freed)."""

    def __init__(self, shapes):
        import weakref

        from torch.utils._python_dispatch import TorchDispatchMode

        outer = self
        self.shapes, self.live, self.peak, self._weakref = set(shapes), {}, 0, weakref

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                out = func(*args, **(kwargs or {}))
                for t in torch.utils._pytree.tree_leaves((args, kwargs, out)):
                    outer._track(t)
                return out

        self.mode = Mode()

    def _track(self, t):
        if not isinstance(t, torch.Tensor) or t.dtype != torch.float32 or t.is_meta or tuple(t.shape) not in self.shapes:
            return
        key = (t.data_ptr(), t.nbytes)  # the tensor's own bytes: a storage may be a larger slab of a mapped file
        entry = self.live.setdefault(key, [t.nbytes, set()])
        if id(t) in entry[1]:
            return
        entry[1].add(id(t))
        self._weakref.finalize(t, self._release, key, id(t))
        self.peak = max(self.peak, sum(n for n, _ in self.live.values()))

    def _release(self, key, ident):
        entry = self.live.get(key)
        if entry is not None:
            entry[1].discard(ident)
            if not entry[1]:
                del self.live[key]


@pytest.fixture(scope="module")
def wide_model_dir(tmp_path_factory, corpus_dir):
    """Projected layers: 4 layers x 7 linears, the largest 512 x 128 (256 KiB in fp32), 4 MiB in all."""
    return save_tiny_model(tmp_path_factory.mktemp("ft") / "wide", corpus_dir, hidden=128, intermediate=512,
                           layers=4)


def fp32_parameters_registered(shapes):
    """Names of the real fp32 Parameters of ``shapes`` registered on any module while the context is open
    (``torch.nn.modules.module.register_module_parameter_registration_hook``)."""
    import contextlib

    from torch.nn.modules.module import register_module_parameter_registration_hook

    @contextlib.contextmanager
    def ctx():
        names = []

        def hook(module, name, p):
            if p is not None and not p.is_meta and p.dtype == torch.float32 and tuple(p.shape) in shapes:
                names.append(name)

        handle = register_module_parameter_registration_hook(hook)
        try:
            yield names
        finally:
            handle.remove()

    return ctx()


def test_materialization_from_safetensors_never_holds_the_projected_layers_in_fp32(wide_model_dir):
    import transformers

    import qgalore_fx

    cfg = ft.FinetuneConfig(model=str(wide_model_dir), rank=8, device="cpu").resolved()
    largest = 512 * 128 * 4
    shapes = {(128, 128), (64, 128), (512, 128), (128, 512)}  # q/o, k/v, gate/up, down
    with (tracker := LiveFloat32Bytes(shapes)).mode, fp32_parameters_registered(shapes) as registered:
        model = ft.load_model(cfg).model
    assert len(qgalore_fx.projected_layers(model)) == 28
    assert registered == []  # no module ever held a projected layer's fp32 weight
    # each projected weight passed through fp32 once, one layer at a time (+ a temporary)
    assert 0 < tracker.peak <= 2 * largest, (tracker.peak, largest)

    # the baselines' loader does build them (the check can fail)
    with fp32_parameters_registered(shapes) as registered:
        transformers.AutoModelForCausalLM.from_pretrained(str(wide_model_dir), dtype=torch.float32)
    assert len(registered) == 28


# --------------------------------------------------------------------------- GGUF


def write_gguf(model_dir, path):
    """``model_dir`` (a tiny LLaMA + BPE tokenizer) as an F32 GGUF file the way llama.cpp lays it out (q/k rows
    permuted per head, tied head omitted), for transformers' GGUF reader; returns the original model."""
    import gguf
    import numpy as np
    import transformers

    model = transformers.LlamaForCausalLM.from_pretrained(str(model_dir))
    cfg = model.config
    tok = json.loads((model_dir / "tokenizer.json").read_text())
    vocab = sorted(tok["model"]["vocab"].items(), key=lambda kv: kv[1])
    merges = [" ".join(m) if isinstance(m, list) else m for m in tok["model"]["merges"]]
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name("tiny")
    w.add_context_length(cfg.max_position_embeddings); w.add_embedding_length(cfg.hidden_size)
    w.add_block_count(cfg.num_hidden_layers); w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads); w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_rope_freq_base(cfg.rope_parameters["rope_theta"] if hasattr(cfg, "rope_parameters") else cfg.rope_theta)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps); w.add_vocab_size(cfg.vocab_size)
    w.add_tokenizer_model("gpt2"); w.add_token_list([t for t, _ in vocab])
    w.add_token_types([1] * len(vocab)); w.add_token_merges(merges)
    w.add_eos_token_id(0); w.add_bos_token_id(0)
    def permute(t, n_head):
        return t.reshape(n_head, 2, t.shape[0] // n_head // 2, *t.shape[1:]).swapaxes(1, 2).reshape(t.shape)
    names = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
             "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
             "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}
    sd = model.state_dict()
    w.add_tensor("token_embd.weight", sd["model.embed_tokens.weight"].numpy())
    w.add_tensor("output_norm.weight", sd["model.norm.weight"].numpy())
    for i in range(cfg.num_hidden_layers):
        for hf, g in names.items():
            t = sd[f"model.layers.{i}.{hf}.weight"].numpy()
            if g == "attn_q": t = permute(t, cfg.num_attention_heads)
            if g == "attn_k": t = permute(t, cfg.num_key_value_heads)
            w.add_tensor(f"blk.{i}.{g}.weight", np.ascontiguousarray(t))
    w.write_header_to_file(); w.write_kv_data_to_file(); w.write_tensors_to_file(); w.close()
    return model


def test_finetune_from_a_gguf_file_and_convert_it(model_dir, corpus_dir, tmp_path):
    import transformers

    gguf_dir = tmp_path / "gguf"
    gguf_dir.mkdir()
    original = write_gguf(model_dir, gguf_dir / "tiny.gguf").eval()
    summary = run(gguf_dir / "tiny.gguf", corpus_dir, tmp_path / "run", *QGALORE, "--export", str(tmp_path / "exp"))
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["model"]["source"] == "gguf" and config["model"]["tied_embeddings"] is True
    assert summary["val_ppl"] < summary["val_ppl_before"]
    assert "quantization_config" not in json.loads((tmp_path / "exp" / "config.json").read_text())

    converted = ft.convert_gguf(gguf_dir / "tiny.gguf", tmp_path / "converted")
    reloaded = transformers.LlamaForCausalLM.from_pretrained(str(converted)).eval()
    x = torch.randint(0, 300, (2, 16))
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=x).logits, original(input_ids=x).logits)
    assert transformers.AutoTokenizer.from_pretrained(str(converted)).eos_token == "<|endoftext|>"


@pytest.mark.parametrize("baseline", ["adamw", "lora"])
def test_baselines_fine_tune_from_a_gguf_file(baseline, model_dir, corpus_dir, tmp_path):
    gguf_dir = tmp_path / "gguf"
    gguf_dir.mkdir()
    write_gguf(model_dir, gguf_dir / "tiny.gguf")
    summary = run(gguf_dir / "tiny.gguf", corpus_dir, tmp_path / "run", "--baseline", baseline, "--lr", "3e-3")
    assert summary["val_ppl"] < summary["val_ppl_before"]
    assert json.loads((tmp_path / "run" / "config.json").read_text())["model"]["tied_embeddings"] is True
