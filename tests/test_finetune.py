"""``qgalore-fx finetune``: a tiny pretrained LLaMA saved as safetensors + a BPE tokenizer in a tmp dir.

Every test runs the command through ``cli.main`` on a few steps of a synthetic corpus (one CPU thread).
"""

import json
import logging
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


@pytest.fixture(autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(autouse=True)
def no_stray_log_handlers():
    """cli.main installs a stderr handler when none exists; pytest closes that stream after the test."""
    root = logging.getLogger()
    before = root.handlers[:]
    yield
    root.handlers[:] = before


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
