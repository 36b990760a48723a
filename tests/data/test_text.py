"""Text corpora (WikiText-103 layout on files the test writes, the KJV if installed) and token windows."""

import shutil

import pytest
import torch

from fracfx.data import text as text_data
from fracfx.data import train_batches
from fracfx.errors import ConfigError, FracfxError
from fracfx.data.text import EOS, UNK, TokenWindows, build_text_loaders, char_corpus, load_corpus

WIKI = {
    "wiki.train.tokens": " = Title = \n\n the cat sat on the mat . \n the <unk> ran \n",
    "wiki.valid.tokens": " the dog sat \n",
    "wiki.test.tokens": "\n the mat \n",
}


def _write_wikitext(folder):
    folder.mkdir(parents=True, exist_ok=True)
    for name, text in WIKI.items():
        (folder / name).write_text(text, encoding="utf-8")


def test_wikitext_word_vocabulary_eos_per_line_and_unk(tmp_path):
    _write_wikitext(tmp_path)
    corpus = load_corpus("wikitext103", datadir=tmp_path)
    # train words + one <eos> per line (4 lines, one empty); most frequent first, ties by spelling
    assert corpus.vocab[:2] == (EOS, "the") and UNK in corpus.vocab
    assert corpus.decode(corpus.train) == "= Title = <eos> <eos> the cat sat on the mat . <eos> the <unk> ran <eos>"
    assert corpus.decode(corpus.valid) == "the <unk> sat <eos>"  # "dog" never occurs in train
    assert corpus.decode(corpus.test) == "<eos> the mat <eos>"
    assert corpus.level == "word" and corpus.train.dtype == torch.int64
    assert torch.equal(corpus.encode("the mat zebra"), torch.tensor([corpus.vocab.index(w) for w in ("the", "mat", UNK)]))


def test_wikitext_release_folder_and_missing_files(tmp_path):
    _write_wikitext(tmp_path / "wikitext-103")
    assert load_corpus("wikitext103", datadir=tmp_path).vocab_size > 5  # the folder the zip unpacks to
    (tmp_path / "wikitext-103" / "wiki.valid.tokens").unlink()
    with pytest.raises(FracfxError, match="wiki.valid.tokens is missing"):
        load_corpus("wikitext103", datadir=tmp_path)
    with pytest.raises(ConfigError, match="--datadir"):
        load_corpus("wikitext103")
    with pytest.raises(ConfigError, match="did you mean 'wikitext103'"):
        load_corpus("wikitext-103")


def test_char_corpus_splits_contiguously():
    text = "".join(chr(97 + i % 26) for i in range(1000))
    corpus = char_corpus("abc", text)
    assert (len(corpus.train), len(corpus.valid), len(corpus.test)) == (900, 50, 50)
    assert corpus.decode(torch.cat([corpus.train, corpus.valid, corpus.test])) == text
    assert corpus.vocab == tuple("abcdefghijklmnopqrstuvwxyz")


@pytest.mark.skipif(shutil.which("bible") is None, reason="the `bible` command (Debian package bible-kjv) is not installed")
def test_kjv_from_the_bible_command_is_cached(tmp_path, monkeypatch):
    corpus = load_corpus("kjv", datadir=tmp_path)
    total = len(corpus.train) + len(corpus.valid) + len(corpus.test)
    assert total > 4_000_000 and corpus.level == "char" and 40 < corpus.vocab_size < 100
    assert abs(len(corpus.train) / total - 0.90) < 1e-6 and abs(len(corpus.valid) / total - 0.05) < 1e-6
    assert corpus.decode(corpus.train[:200]).strip().startswith("Genesis 1")
    assert "In the beginning God created the heaven and the earth." in corpus.decode(corpus.train[:200])
    assert (tmp_path / "kjv" / "kjv.txt").is_file()
    monkeypatch.setenv("PATH", "")  # the second load must come from the cache
    again = load_corpus("kjv", datadir=tmp_path)
    assert torch.equal(again.test, corpus.test) and again.vocab == corpus.vocab


def test_kjv_without_the_command_names_the_package(tmp_path, monkeypatch):
    monkeypatch.setattr(text_data.shutil, "which", lambda name: None)
    with pytest.raises(FracfxError, match="apt-get install bible-kjv"):
        load_corpus("kjv", datadir=tmp_path)


def test_windows_are_shifted_pairs_and_evaluation_covers_the_split_in_order():
    tokens = torch.arange(101)
    windows = TokenWindows(tokens, 10)
    assert len(windows) == 10
    x, y = windows[3]
    assert torch.equal(x, torch.arange(30, 40)) and torch.equal(y, torch.arange(31, 41))
    with pytest.raises(IndexError):
        windows[10]
    with pytest.raises(ConfigError, match="too short"):
        TokenWindows(torch.arange(15), 10, keyed=True)


def test_training_batches_are_seeded_resumable_and_shift_each_epoch():
    corpus = char_corpus("digits", "".join(str(i % 10) for i in range(2000)))

    def batches(seed, start=0, count=8):
        loader, _, info = build_text_loaders(corpus=corpus, batch_size=4, context=8, seed=seed)
        stream = train_batches(loader, start)
        return [next(stream)[1:] for _ in range(count)], loader, info

    first, loader, info = batches(seed=3)
    assert info.vocab_size == 10 and info.eval_split == "valid" and first[0][0].shape == (4, 8)
    again, _, _ = batches(seed=3)
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(first, again))
    other, _, _ = batches(seed=4)
    assert not all(torch.equal(a[0], b[0]) for a, b in zip(first, other))
    resumed, _, _ = batches(seed=3, start=5, count=3)  # a restart at iteration 5 sees batches 5, 6, 7
    assert all(torch.equal(a[0], b[0]) for a, b in zip(first[5:], resumed))
    for x, y in zip(*first[0]):
        assert torch.equal(x[1:], y[:-1])
    windows = loader.dataset
    offsets = {windows.offset(epoch) for epoch in range(20)}
    assert len(offsets) > 1 and all(0 <= o < 8 for o in offsets)  # window boundaries move between epochs
