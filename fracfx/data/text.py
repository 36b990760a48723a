"""Text corpora for language models: the King James Bible (offline default) and WikiText-103.

    corpus = load_corpus("kjv")                                   # or "wikitext103", datadir=...
    train_loader, valid_loader, info = build_text_loaders("kjv", batch_size=32, context=128, seed=0)
    for x, y in valid_loader: ...                                 # (B, T) ids; y is x shifted by one

kjv: the text `bible "gen1:1-rev22:21"` prints (Debian package bible-kjv), cached on first use
  under --datadir/kjv/ or ~/.cache/fracfx/; a character-level vocabulary over the whole text
  (sorted characters; the alphabet is small and closed, so no <unk>); contiguous 90/5/5
  train/valid/test split by characters.
wikitext103: wiki.train.tokens, wiki.valid.tokens, wiki.test.tokens under --datadir (or
  --datadir/wikitext-103/). Word level, as is standard for it: every line is split on whitespace
  and ends with <eos> (empty lines too); the vocabulary is train's words (the files already
  spell rare words <unk>), most frequent first; words of valid/test not in it read as <unk>.

Windows: a split of N tokens gives (N - 1) // T windows of T inputs and the T next tokens. The
training set is keyed (epoch, index) like fracfx.data's image sets: epoch e shifts every window
boundary by an offset in [0, T) drawn from (seed, e), and fracfx.data.EpochBatchSampler shuffles
the windows from (seed, e), so the batches depend only on the seed and the iteration, and a
resumed run (train_batches(loader, start_iteration)) sees exactly the batches of an
uninterrupted one. Evaluation windows start at 0 and run in order.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import subprocess
from array import array
from collections import Counter
from pathlib import Path
from typing import Iterable, Sequence

import torch
from torch.utils.data import DataLoader, Dataset

from fracfx.data.sampler import EpochBatchSampler, rank_shard
from fracfx.seeding import mix_seed
from fracfx.errors import ConfigError, FracfxError

TEXT_DATASETS = ("kjv", "wikitext103")
KJV_COMMAND = ("bible", "gen1:1-rev22:21")
KJV_SPLIT = (0.90, 0.05)  # train, valid; test is the rest
WIKITEXT_FILES = {"train": "wiki.train.tokens", "valid": "wiki.valid.tokens", "test": "wiki.test.tokens"}
UNK, EOS = "<unk>", "<eos>"


@dataclasses.dataclass(frozen=True, eq=False)
class TextCorpus:
    """Token ids of each split (int64, 1-D) and the vocabulary (id -> token)."""

    name: str
    level: str  # "char" | "word"
    vocab: tuple[str, ...]
    train: torch.Tensor
    valid: torch.Tensor
    test: torch.Tensor

    @property
    def vocab_size(self) -> int:
        return len(self.vocab)

    def split(self, name: str) -> torch.Tensor:
        if name not in ("train", "valid", "test"):
            raise ConfigError(f"unknown split {name!r}; choose train, valid or test")
        return getattr(self, name)

    def encode(self, text: str) -> torch.Tensor:
        index = {token: i for i, token in enumerate(self.vocab)}
        if self.level == "char":
            missing = sorted(set(text) - index.keys())
            if missing:
                raise ConfigError(f"characters not in the {self.name} vocabulary: {missing!r}")
            return torch.tensor([index[c] for c in text], dtype=torch.int64)
        unk = index[UNK]
        return torch.tensor([index.get(w, unk) for w in text.split()], dtype=torch.int64)

    def decode(self, ids: Iterable[int] | torch.Tensor) -> str:
        ids = ids.tolist() if isinstance(ids, torch.Tensor) else ids
        return ("" if self.level == "char" else " ").join(self.vocab[i] for i in ids)


# ---------------------------------------------------------------------------------------------
# kjv


def _cache_dir(datadir) -> Path:
    if datadir is not None:
        return Path(datadir) / "kjv"
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "fracfx"


def kjv_text(datadir: str | os.PathLike | None = None) -> str:
    """The King James Bible as `bible "gen1:1-rev22:21"` prints it, cached after the first call."""
    cache = _cache_dir(datadir) / "kjv.txt"
    if cache.is_file():
        return cache.read_text(encoding="utf-8")
    if shutil.which(KJV_COMMAND[0]) is None:
        raise FracfxError(
            f"the kjv dataset needs the `{KJV_COMMAND[0]}` command (sudo apt-get install bible-kjv), "
            f"or a copy of its output at {cache}"
        )
    try:
        text = subprocess.run(KJV_COMMAND, check=True, capture_output=True, text=True, timeout=300).stdout
    except (subprocess.SubprocessError, OSError) as error:
        raise FracfxError(f"running `{' '.join(KJV_COMMAND)}` failed ({error}); check the bible-kjv package") from error
    if len(text) < 1_000_000:  # the full text is ~4.3M characters; less means a broken install
        raise FracfxError(f"`{' '.join(KJV_COMMAND)}` printed only {len(text)} characters; reinstall bible-kjv (apt-get install --reinstall bible-kjv)")
    cache.parent.mkdir(parents=True, exist_ok=True)
    partial = cache.with_suffix(f".tmp{os.getpid()}")
    partial.write_text(text, encoding="utf-8")
    partial.replace(cache)  # atomic: a concurrent reader sees all of it or nothing
    return text


def char_corpus(name: str, text: str, split: Sequence[float] = KJV_SPLIT) -> TextCorpus:
    """Character-level corpus of `text`, split contiguously (train, valid, rest = test)."""
    vocab = tuple(sorted(set(text)))
    index = {c: i for i, c in enumerate(vocab)}
    ids = torch.tensor([index[c] for c in text], dtype=torch.int64)
    n_train = int(len(ids) * split[0])
    n_valid = int(len(ids) * split[1])
    return TextCorpus(name, "char", vocab, ids[:n_train], ids[n_train:n_train + n_valid], ids[n_train + n_valid:])


# ---------------------------------------------------------------------------------------------
# wikitext103


def _wikitext_paths(datadir) -> dict[str, Path]:
    if datadir is None:
        raise ConfigError("wikitext103 needs --datadir: a folder with wiki.train.tokens, wiki.valid.tokens and wiki.test.tokens")
    root = Path(datadir)
    if not (root / WIKITEXT_FILES["train"]).is_file() and (root / "wikitext-103").is_dir():
        root = root / "wikitext-103"  # where the official zip unpacks
    paths = {split: root / name for split, name in WIKITEXT_FILES.items()}
    for path in paths.values():
        if not path.is_file():
            raise FracfxError(f"wikitext103: {path} is missing; --datadir must hold {', '.join(WIKITEXT_FILES.values())} (the wikitext-103 release)")
    return paths


def _lines(path: Path):
    with open(path, encoding="utf-8") as f:
        for line in f:
            yield line.split() + [EOS]


def _encode_file(path: Path, index: dict[str, int]) -> torch.Tensor:
    unk = index[UNK]
    ids = array("q")
    for words in _lines(path):
        ids.extend(index.get(w, unk) for w in words)
    return torch.frombuffer(ids, dtype=torch.int64).clone() if ids else torch.zeros(0, dtype=torch.int64)


def wikitext_corpus(datadir: str | os.PathLike | None) -> TextCorpus:
    paths = _wikitext_paths(datadir)
    counts: Counter[str] = Counter()
    for words in _lines(paths["train"]):
        counts.update(words)
    for special in (UNK, EOS):
        counts.setdefault(special, 0)
    vocab = tuple(sorted(counts, key=lambda w: (-counts[w], w)))  # most frequent first, ties by spelling
    index = {w: i for i, w in enumerate(vocab)}
    splits = {split: _encode_file(path, index) for split, path in paths.items()}
    return TextCorpus("wikitext103", "word", vocab, splits["train"], splits["valid"], splits["test"])


def load_corpus(name: str, *, datadir: str | os.PathLike | None = None) -> TextCorpus:
    if name == "kjv":
        return char_corpus("kjv", kjv_text(datadir))
    if name == "wikitext103":
        return wikitext_corpus(datadir)
    import difflib

    close = difflib.get_close_matches(name, TEXT_DATASETS, n=1)
    raise ConfigError(f"unknown text dataset {name!r}{f'; did you mean {close[0]!r}?' if close else ''}; choose from {', '.join(TEXT_DATASETS)}")


# ---------------------------------------------------------------------------------------------
# windows and loaders


class TokenWindows(Dataset):
    """(input, target) windows of `context` tokens; target is the input shifted by one token.

    keyed=True (training): items are keyed (epoch, index) and epoch e's windows start at an
    offset in [0, context) drawn from (seed, e). keyed=False: item i starts at i * context.
    """

    def __init__(self, tokens: torch.Tensor, context: int, *, keyed: bool = False, seed: int = 0):
        if isinstance(context, bool) or not isinstance(context, int) or context < 1:
            raise ConfigError(f"context must be a positive int, got {context!r}")
        needed = 2 * context if keyed else context + 1  # keyed: room for one window at any offset
        if tokens.dim() != 1 or len(tokens) < needed:
            raise ConfigError(f"a split of {len(tokens)} tokens is too short for windows of {context} tokens (needs {needed}); use a smaller context")
        self.tokens, self.context, self.keyed, self.seed = tokens, context, keyed, seed
        self._offsets: dict[int, int] = {}
        # the same count at every offset, so an epoch's length does not depend on its offset
        self.windows = (len(tokens) - context) // context if keyed else (len(tokens) - 1) // context

    def __len__(self) -> int:
        return self.windows

    def offset(self, epoch: int) -> int:
        if epoch not in self._offsets:
            generator = torch.Generator().manual_seed(mix_seed(self.seed, epoch, 0x7E47))
            self._offsets[epoch] = int(torch.randint(self.context, (), generator=generator))
        return self._offsets[epoch]

    def __getitem__(self, key):
        if self.keyed:
            epoch, index = key
            start = self.offset(epoch) + index * self.context
        else:
            start = key * self.context
        if not 0 <= start <= len(self.tokens) - self.context - 1:
            raise IndexError(key)
        chunk = self.tokens[start:start + self.context + 1]
        return chunk[:-1], chunk[1:]


@dataclasses.dataclass(frozen=True)
class TextInfo:
    """What a language model needs to know about a text dataset."""

    name: str
    level: str
    vocab_size: int
    context: int
    train_tokens: int
    eval_tokens: int
    eval_split: str

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def build_text_loaders(
    name: str = "kjv",
    *,
    datadir: str | os.PathLike | None = None,
    batch_size: int = 32,
    context: int = 128,
    seed: int = 0,
    eval_split: str = "valid",
    eval_batch_size: int | None = None,
    corpus: TextCorpus | None = None,
    rank: int = 0,
    world_size: int = 1,
) -> tuple[DataLoader, DataLoader, TextInfo]:
    """(train_loader, eval_loader, info), shaped like fracfx.data.build_loaders's result.

    The training loader's batch_sampler is an EpochBatchSampler (iterate with
    fracfx.data.train_batches); eval_split picks "valid" or "test" for the evaluation loader.
    Pass `corpus` to reuse one already loaded. With world_size > 1 both loaders hold this
    rank's share, as the image loaders do: windows rank, rank + world_size, ... of every global
    batch of batch_size windows, and of the evaluation windows (info describes the whole split).
    """
    corpus = load_corpus(name, datadir=datadir) if corpus is None else corpus
    train = TokenWindows(corpus.train, context, keyed=True, seed=seed)
    evaluation = TokenWindows(corpus.split(eval_split), context)
    sampler = EpochBatchSampler(len(train), batch_size, seed=seed, rank=rank, world_size=world_size)
    # its own generator: creating an iterator draws a base seed, and drawing it from the global
    # generator would make a resumed run's random streams differ from an uninterrupted run's
    train_loader = DataLoader(train, batch_sampler=sampler, generator=torch.Generator().manual_seed(mix_seed(seed, 0x5EED)))
    eval_loader = DataLoader(rank_shard(evaluation, rank, world_size), batch_size=eval_batch_size or batch_size, shuffle=False)
    info = TextInfo(corpus.name, corpus.level, corpus.vocab_size, context, len(corpus.train), len(corpus.split(eval_split)), eval_split)
    return train_loader, eval_loader, info
