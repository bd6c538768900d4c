import os
import random

import numpy as np
import pytest
import torch

# Triton kernels run on a CPU only under the interpreter, and only if this is set before triton is imported
# (importing qgalore_fx imports triton). On a GPU machine the kernels run for real.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(autouse=True)
def _seed_and_restore():
    """Every test starts from the same RNG state and leaves global torch, Python and numpy state as it found it."""
    state = torch.random.get_rng_state()
    py, npy = random.getstate(), np.random.get_state()
    threads = torch.get_num_threads()
    torch.manual_seed(0)
    yield
    torch.random.set_rng_state(state)
    random.setstate(py)
    np.random.set_state(npy)
    torch.set_num_threads(threads)


@pytest.fixture
def one_thread():
    """The models of the CLI tests are tiny: one intra-op thread is faster, and far faster when other
    processes share the cores (OpenMP workers then spin waiting for each other)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def no_stray_log_handlers():
    """cli.main installs a stderr handler when none exists; pytest closes that stream after the test."""
    import logging

    root = logging.getLogger()
    before = root.handlers[:]
    yield
    root.handlers[:] = before


def tiny_llama(arch: str = "llama", hidden: int = 64, layers: int = 2, vocab: int = 128, intermediate: int = 160):
    """A small HF causal LM built from a config (no weights downloaded)."""
    import transformers

    kw = dict(hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers, num_attention_heads=4,
              num_key_value_heads=2, vocab_size=vocab, max_position_embeddings=128, tie_word_embeddings=False)
    cfg_cls, model_cls = {
        "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
        "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM),
        "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
    }[arch]
    torch.manual_seed(0)
    return model_cls(cfg_cls(**kw)).eval()


@pytest.fixture
def llama():
    return tiny_llama()
