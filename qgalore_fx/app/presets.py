"""Model shapes for the main job: the paper's LLaMA sizes plus small CPU sizes.

The ``60m`` … ``7b`` rows are the LLaMA configurations of the GaLore / Q-GaLore
pre-training tables (sequence length 256, vocabulary 32,000, SiLU MLP, RMSNorm,
untied embeddings), with the low-rank ``rank`` those papers used at each size.
The 1B row has 32 heads and 24 layers, as in GaLore's released ``llama_1b.json``;
GaLore's printed table swaps the two, and 2048 is not divisible by 24 heads.
``tiny`` is the default of ``qgalore-fx pretrain``: about 7.4 M parameters with
an 8k vocabulary, small enough to train to a useful perplexity on two CPU cores
in a few minutes. ``nano`` exists for smoke tests only. ``13b`` and ``70b`` are
LLaMA-2's shapes (70B with grouped-query attention: 8 key/value heads, so its
k/v projections are [1024, 8192]), with the 7B's rank 1024 (the 70B's k/v
projections allow no more), for planning sharded runs (``qgalore-fx memory
--world-size``).

A preset's ``vocab_size`` of ``None`` means "the tokenizer's": the bundled corpus
trains its own BPE, so the embedding follows it. The paper sizes keep 32,000 unless
a vocabulary size is passed, which is what memory accounting on the ``meta``
device wants.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["PRESETS", "Preset", "build_model", "get_preset", "llama_config"]


@dataclass(frozen=True)
class Preset:
    """One LLaMA shape and the training defaults that go with it."""

    name: str
    hidden_size: int
    intermediate_size: int
    num_attention_heads: int
    num_hidden_layers: int
    vocab_size: int | None  # None: take the tokenizer's
    seq_len: int
    rank: int  # default low-rank projection rank for this size
    num_key_value_heads: int | None = None  # grouped-query attention: k/v heads (None: as many as query heads)

    @property
    def kv_heads(self) -> int:
        return self.num_attention_heads if self.num_key_value_heads is None else self.num_key_value_heads

    def __post_init__(self) -> None:
        for field in ("hidden_size", "intermediate_size", "num_attention_heads",
                      "num_hidden_layers", "seq_len", "rank"):
            if getattr(self, field) < 1:
                raise ValueError(f"preset {self.name!r}: {field} must be positive")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"preset {self.name!r}: hidden_size {self.hidden_size} is not divisible "
                f"by num_attention_heads {self.num_attention_heads}"
            )
        if self.kv_heads < 1 or self.num_attention_heads % self.kv_heads:
            raise ValueError(
                f"preset {self.name!r}: num_key_value_heads {self.num_key_value_heads} must be positive and divide "
                f"num_attention_heads {self.num_attention_heads}"
            )
        if self.rank > self.hidden_size:
            raise ValueError(f"preset {self.name!r}: rank {self.rank} exceeds hidden_size")


PRESETS: dict[str, Preset] = {
    p.name: p
    for p in (
        Preset("nano", 64, 172, 2, 2, None, 64, 16),
        Preset("tiny", 256, 688, 4, 4, None, 128, 64),
        Preset("60m", 512, 1376, 8, 8, 32000, 256, 128),
        Preset("130m", 768, 2048, 12, 12, 32000, 256, 256),
        Preset("350m", 1024, 2736, 16, 24, 32000, 256, 256),
        Preset("1b", 2048, 5461, 32, 24, 32000, 256, 512),
        Preset("7b", 4096, 11008, 32, 32, 32000, 256, 1024),
        Preset("13b", 5120, 13824, 40, 40, 32000, 256, 1024),
        Preset("70b", 8192, 28672, 64, 80, 32000, 256, 1024, num_key_value_heads=8),
    )
}


def get_preset(preset: str | Preset) -> Preset:
    """Look a preset up by name (a :class:`Preset` passes through)."""
    if isinstance(preset, Preset):
        return preset
    try:
        return PRESETS[preset]
    except KeyError:
        raise ValueError(
            f"preset must be one of {', '.join(PRESETS)}; got {preset!r}"
        ) from None


def llama_config(
    preset: str | Preset, vocab_size: int | None = None, seq_len: int | None = None
):
    """The ``transformers.LlamaConfig`` of a preset.

    ``vocab_size`` overrides the preset's (and is required for presets that take
    the tokenizer's). ``max_position_embeddings`` is the training sequence length.
    The KV cache is off (``use_cache=False``): training never needs it, and graph
    capture of the model rejects the cache object.
    """
    from transformers import LlamaConfig

    p = get_preset(preset)
    vocab = vocab_size if vocab_size is not None else p.vocab_size
    if vocab is None:
        raise ValueError(f"preset {p.name!r} takes the tokenizer's vocabulary: pass vocab_size")
    if vocab < 1:
        raise ValueError(f"vocab_size must be positive, got {vocab}")
    return LlamaConfig(
        vocab_size=vocab,
        hidden_size=p.hidden_size,
        intermediate_size=p.intermediate_size,
        num_attention_heads=p.num_attention_heads,
        num_key_value_heads=p.kv_heads,
        num_hidden_layers=p.num_hidden_layers,
        max_position_embeddings=seq_len if seq_len is not None else p.seq_len,
        hidden_act="silu",
        rms_norm_eps=1e-6,
        initializer_range=0.02,
        tie_word_embeddings=False,
        use_cache=False,
        bos_token_id=0,
        eos_token_id=0,
        pad_token_id=None,
    )


def build_model(
    preset: str | Preset,
    vocab_size: int | None = None,
    device: str | torch.device = "cpu",
    seq_len: int | None = None,
):
    """A freshly initialised ``LlamaForCausalLM`` of ``preset``.

    ``device="meta"`` builds it without allocating weights (for memory accounting of
    the large presets). The random initialisation follows ``torch``'s global RNG, so
    seed with ``torch.manual_seed`` first for a reproducible model.
    """
    from transformers import LlamaForCausalLM

    config = llama_config(preset, vocab_size, seq_len)
    with torch.device(device):
        model = LlamaForCausalLM(config)
    return model
