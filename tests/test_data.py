"""Corpus reading, the train/validation split, tokenizer caching, batching, unigram baseline."""

import math
import random

import pytest
import torch

from qgalore_fx.app import data

WORDS = (
    "the market shares rose fell after company said profits growth government minister "
    "election party vote music film award star team match season player goal coach "
    "phone software users network digital internet record year month week people new "
    "first last more less and of to in on for with by from at said will would could"
).split()


def write_corpus(root, n_docs=60, words_per_doc=150, seed=0):
    """A directory of small English-like .txt documents, two folders deep."""
    rng = random.Random(seed)
    for i in range(n_docs):
        folder = root / ("a" if i % 2 else "b")
        folder.mkdir(parents=True, exist_ok=True)
        sentences = []
        for _ in range(words_per_doc // 10):
            words = rng.choices(WORDS, k=10)
            sentences.append(" ".join(words).capitalize() + ".")
        (folder / f"{i:03d}.txt").write_text(f"Title {i}\n\n" + " ".join(sentences) + "\n")
    return root


@pytest.fixture
def cache(tmp_path, monkeypatch):
    path = tmp_path / "cache"
    monkeypatch.setenv("QGALORE_FX_CACHE", str(path))
    return path


@pytest.fixture
def corpus_dir(tmp_path):
    return write_corpus(tmp_path / "corpus")


# --------------------------------------------------------------------------- reading


def test_bbc_news_reads_every_article_with_the_right_encoding():
    docs = data.read_bbc_news()
    assert len(docs) == 2225
    assert len({d.key for d in docs}) == 2225
    assert {d.key.split("/")[0] for d in docs} == {
        "business", "entertainment", "politics", "sports", "tech"
    }
    by_key = {d.key: d.text for d in docs}
    # The one article that is not UTF-8 holds a Latin-1 pound sign.
    assert "\u00a315.8m" in by_key["sports/199.txt"]
    # UTF-8 pound signs must not turn into mojibake.
    assert sum("\u00a3" in d.text for d in docs) > 500
    assert not any("\u00c2\u00a3" in d.text for d in docs)


def test_decode_text_falls_back_to_latin1():
    assert data.decode_text("caf\u00e9 \u00a35".encode("utf-8")) == "caf\u00e9 \u00a35"
    assert data.decode_text(b"\xa35") == "\u00a35"


def test_read_corpus_directory_keys_are_relative_paths(corpus_dir):
    docs = data.read_corpus(corpus_dir)
    assert len(docs) == 60
    assert docs[0].key == "a/001.txt"
    assert all(d.text.startswith("Title ") for d in docs)
    assert [d.key for d in docs] == sorted(d.key for d in docs)


def test_read_corpus_single_file_is_cut_into_documents(tmp_path):
    paragraphs = [f"Paragraph {i}. " + "word " * 100 for i in range(100)]
    path = tmp_path / "book.txt"
    path.write_text("\n\n".join(paragraphs))
    docs = data.read_corpus(path)
    assert len(docs) > 10
    assert all(len(d.text) >= data.MIN_DOC_CHARS for d in docs)
    assert docs[0].key == "book.txt#000000"
    # No paragraph is lost or split.
    assert "\n\n".join(d.text for d in docs) == "\n\n".join(p.strip() for p in paragraphs)


def test_read_corpus_bad_paths(tmp_path):
    with pytest.raises(FileNotFoundError, match="corpus"):
        data.read_corpus(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no non-empty .txt"):
        data.read_corpus(tmp_path / "empty")


# --------------------------------------------------------------------------- split


def test_bbc_split_is_deterministic_disjoint_and_order_free():
    docs = data.read_bbc_news()
    train, val = data.split_documents(docs)
    train2, val2 = data.split_documents(list(reversed(docs)))
    assert {d.key for d in val} == {d.key for d in val2}
    assert {d.key for d in train} == {d.key for d in train2}
    assert not {d.key for d in train} & {d.key for d in val}
    assert len(train) + len(val) == len(docs)
    assert 0.03 < len(val) / len(docs) < 0.07
    # Whole articles move, so a document's membership depends on its key alone.
    subset_train, subset_val = data.split_documents(docs[::3])
    assert {d.key for d in subset_val} == {d.key for d in val} & {d.key for d in docs[::3]}


def test_split_keeps_both_sides_non_empty():
    docs = [data.Document(f"d{i}", "text") for i in range(2)]
    for fraction in (0.001, 0.999):
        train, val = data.split_documents(docs, fraction)
        assert len(train) == 1 and len(val) == 1


@pytest.mark.parametrize(
    "docs, fraction, match",
    [
        ([data.Document("a", "x")], 0.05, "at least 2 documents"),
        ([data.Document("a", "x"), data.Document("a", "y")], 0.05, "unique"),
        ([data.Document("a", "x"), data.Document("b", "y")], 1.5, "val_fraction"),
    ],
)
def test_split_rejects_bad_input(docs, fraction, match):
    with pytest.raises(ValueError, match=match):
        data.split_documents(docs, fraction)


# --------------------------------------------------------------------------- tokenizer


def test_tokenizer_and_tokens_are_cached_and_reused(corpus_dir, cache, monkeypatch):
    first = data.prepare_corpus(corpus_dir, vocab_size=400)
    assert first.tokenizer_path == cache / "tokenizers" / f"{first.fingerprint}-400.json"
    assert first.tokenizer_path.is_file()
    assert len(list((cache / "tokens").glob(f"{first.fingerprint}-400-*.pt"))) == 1
    assert 257 <= first.vocab_size <= 400

    def no_training(*args, **kwargs):
        raise AssertionError("the cached tokenizer should have been loaded")

    monkeypatch.setattr(data, "train_tokenizer", no_training)
    monkeypatch.setattr(data, "encode_documents", no_training)
    second = data.prepare_corpus(corpus_dir, vocab_size=400)
    assert second.fingerprint == first.fingerprint
    assert torch.equal(second.train_ids, first.train_ids)
    assert torch.equal(second.val_ids, first.val_ids)
    assert second.tokenizer.encode("the market rose").ids == first.tokenizer.encode(
        "the market rose").ids


def test_fingerprint_changes_with_the_text(corpus_dir, cache):
    first = data.prepare_corpus(corpus_dir, vocab_size=300)
    (corpus_dir / "a" / "001.txt").write_text("Something else entirely.\n")
    second = data.prepare_corpus(corpus_dir, vocab_size=300)
    assert second.fingerprint != first.fingerprint
    assert second.tokenizer_path != first.tokenizer_path


def test_streams_end_each_document_with_eot_and_round_trip(corpus_dir, cache):
    corpus = data.prepare_corpus(corpus_dir, vocab_size=400)
    train_docs, val_docs = data.split_documents(data.read_corpus(corpus_dir))
    assert corpus.eot_id == 0
    assert corpus.train_ids.dtype == torch.int32
    assert int((corpus.train_ids == 0).sum()) == len(train_docs) == corpus.n_train_docs
    assert int((corpus.val_ids == 0).sum()) == len(val_docs) == corpus.n_val_docs
    assert corpus.train_ids[-1] == 0 and corpus.val_ids[-1] == 0
    end = int((corpus.train_ids == 0).nonzero()[0])
    assert corpus.tokenizer.decode(corpus.train_ids[:end].tolist()) == train_docs[0].text


def test_vocab_size_too_small_is_rejected(corpus_dir, cache):
    with pytest.raises(ValueError, match="vocab_size must be at least 257"):
        data.prepare_corpus(corpus_dir, vocab_size=100)


# --------------------------------------------------------------------------- batches


def test_random_batches_shapes_shift_and_seed():
    stream = torch.arange(1000, dtype=torch.int32)
    gen = torch.Generator().manual_seed(3)
    batch = next(data.random_batches(stream, batch_size=8, seq_len=16, generator=gen))
    assert batch.input_ids.shape == batch.labels.shape == (8, 16)
    assert batch.input_ids.dtype == batch.labels.dtype == torch.int64
    # Each row is a contiguous window; labels are the next tokens.
    assert torch.equal(batch.input_ids, batch.input_ids[:, :1] + torch.arange(16))
    assert torch.equal(batch.labels, batch.input_ids + 1)
    assert torch.equal(batch.labels[:, :-1], batch.input_ids[:, 1:])
    again = next(data.random_batches(stream, 8, 16, torch.Generator().manual_seed(3)))
    assert torch.equal(again.input_ids, batch.input_ids)
    other = next(data.random_batches(stream, 8, 16, torch.Generator().manual_seed(4)))
    assert not torch.equal(other.input_ids, batch.input_ids)


def test_random_batches_cover_the_whole_stream():
    stream = torch.arange(20, dtype=torch.int32)
    it = data.random_batches(stream, 64, 4, torch.Generator().manual_seed(0))
    starts = torch.cat([next(it).input_ids[:, 0] for _ in range(10)])
    assert set(starts.tolist()) == set(range(16))  # every start with 5 tokens left


def test_validation_batches_are_fixed_and_score_each_token_once():
    stream = torch.arange(1001, dtype=torch.int32)
    batches = list(data.validation_batches(stream, batch_size=16, seq_len=10))
    assert batches[0].input_ids.shape == (16, 10)
    labels = torch.cat([b.labels.flatten() for b in batches])
    assert torch.equal(labels, torch.arange(1, 1001))
    again = list(data.validation_batches(stream, batch_size=16, seq_len=10))
    assert all(torch.equal(a.input_ids, b.input_ids) for a, b in zip(batches, again))


def test_validation_subset_is_spread_over_the_split():
    stream = torch.arange(1001, dtype=torch.int32)
    windows = data.validation_windows(stream, seq_len=10, max_windows=5)
    assert windows[:, 0].tolist() == [0, 250, 500, 740, 990]
    batches = list(data.validation_batches(stream, batch_size=2, seq_len=10, max_batches=2))
    assert sum(b.input_ids.shape[0] for b in batches) == 4


def test_sequence_longer_than_split_is_a_clear_error():
    with pytest.raises(ValueError, match="seq_len=64 needs at least 65 validation tokens"):
        list(data.validation_batches(torch.arange(30), 4, 64))
    with pytest.raises(ValueError, match="seq_len=64 needs at least 65 training tokens"):
        next(data.random_batches(torch.arange(30), 4, 64, torch.Generator()))


# --------------------------------------------------------------------------- unigram


def test_unigram_perplexity_exact_value():
    # counts (2, 1, 0) + 1 over 3 + 3 tokens: p = (1/2, 1/3, 1/6)
    train = torch.tensor([0, 0, 1])
    assert data.unigram_perplexity(train, torch.tensor([0]), 3) == pytest.approx(2.0)
    ppl = data.unigram_perplexity(train, torch.tensor([0, 1, 2]), 3)
    expected = math.exp(-(math.log(1 / 2) + math.log(1 / 3) + math.log(1 / 6)) / 3)
    assert ppl == pytest.approx(expected)
    with pytest.raises(ValueError, match="outside vocab_size"):
        data.unigram_perplexity(train, torch.tensor([5]), 3)


def test_unigram_perplexity_of_a_real_split(corpus_dir, cache):
    corpus = data.prepare_corpus(corpus_dir, vocab_size=400)
    ppl = data.unigram_perplexity(corpus.train_ids, corpus.val_ids, corpus.vocab_size)
    assert math.isfinite(ppl)
    assert 1.0 < ppl < corpus.vocab_size
    # The corpus uses about 70 distinct words, so a unigram model is far from uniform.
    assert ppl < corpus.vocab_size / 2
