"""Data: reading a line-per-item file, the vocabulary, the examples, the split.

Two layouts of the same items, one per kind of model:

- ``context`` (bigram, mlp, wavenet): one example per character, (the block_size characters
  before it, the character); X is N x T, Y is N.
- ``sequence`` (rnn, gru, bow, transformer; makemore's format): one example per item,
  x = [0, c1 .. cL, 0 ...] and y = [c1 .. cL, 0, -1 ...], both of length block_size = the longest
  item + 1; -1 marks padding, which the loss ignores. X and Y are N x T.

Dimension letters: N examples, T block_size (context length).

Index 0 is the boundary token, shown as '.', that starts and ends every item. The characters of
the data take 1..V-1 in sorted order. The boundary token is not a character of the data, so a
file whose items contain '.' still works: its '.' simply gets an index of its own.
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import torch

from .errors import UserError
from .nn.losses import IGNORE_INDEX  # a padded target: no loss, no gradient

BOUNDARY = "."
SPLIT_FRACTIONS = (0.8, 0.9)  # train | val | test cut points, by item


def default_data_path() -> Path:
    """The bundled names.txt (32,033 US baby names)."""
    return Path(str(resources.files("backprop_ninja") / "data" / "names.txt"))


def read_items(path: str | Path) -> list[str]:
    """Read a UTF-8 text file with one item per line; blank lines and edge whitespace are dropped."""
    return load_items(path)[0]


def load_items(path: str | Path) -> tuple[list[str], str]:
    """``read_items``, and the SHA-256 of the file's bytes (a run records it, to notice edits)."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"input file {path} does not exist; pass an existing file with -i FILE")
    if not path.is_file():
        raise UserError(f"input {path} is not a regular file; pass a text file with -i FILE")
    raw = path.read_bytes()
    if b"\x00" in raw:
        raise UserError(f"input file {path} looks binary (it contains NUL bytes); "
                        "pass a UTF-8 text file with one item per line")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise UserError(f"input file {path} is not valid UTF-8 (byte {e.start}); "
                        "re-encode it as UTF-8 with one item per line") from None
    text = text.removeprefix("\ufeff")
    items = [line.strip() for line in text.splitlines()]
    items = [w for w in items if w]
    if not items:
        raise UserError(f"input file {path} has no items (it is empty or blank); "
                        "it needs one item per line")
    return items, hashlib.sha256(raw).hexdigest()


@dataclass(frozen=True)
class Vocab:
    """The characters of the data; index i+1 is chars[i], index 0 is the boundary token."""

    chars: tuple[str, ...]

    @classmethod
    def from_items(cls, items: list[str]) -> "Vocab":
        return cls(tuple(sorted(set("".join(items)))))

    @property
    def size(self) -> int:
        return len(self.chars) + 1

    def stoi(self) -> dict[str, int]:
        return {ch: i + 1 for i, ch in enumerate(self.chars)}

    def encode(self, item: str, table: dict[str, int] | None = None) -> list[int]:
        table = table or self.stoi()
        try:
            return [table[ch] for ch in item]
        except KeyError as e:
            raise UserError(f"character {e.args[0]!r} is not in the vocabulary; "
                            "use the same data file the model was trained on") from None

    def decode(self, indices) -> str:
        return "".join(self.chars[i - 1] if i > 0 else BOUNDARY for i in indices)


def build_examples(items: list[str], vocab: Vocab, block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """All (context, next) pairs: X is N x T (int64), Y is N (int64)."""
    xs: list[list[int]] = []
    ys: list[int] = []
    table = vocab.stoi()
    for item in items:
        context = [0] * block_size
        for ix in vocab.encode(item, table) + [0]:
            xs.append(context)
            ys.append(ix)
            context = context[1:] + [ix]
    X = torch.tensor(xs, dtype=torch.long).view(len(xs), block_size)
    Y = torch.tensor(ys, dtype=torch.long)
    return X, Y


def build_sequences(items: list[str], vocab: Vocab, block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """makemore's layout: X[i] = [0, item, 0 ...], Y[i] = [item, 0, -1 ...], each N x T."""
    X = torch.zeros(len(items), block_size, dtype=torch.long)
    Y = torch.full((len(items), block_size), IGNORE_INDEX, dtype=torch.long)
    table = vocab.stoi()
    for i, item in enumerate(items):
        ix = torch.tensor(vocab.encode(item, table), dtype=torch.long)
        if len(ix) >= block_size:
            raise UserError(f"an item of {len(ix)} characters does not fit a block of {block_size} "
                            f"(it needs the item and its end token); pass --block-size "
                            f"{len(ix) + 1} or more")
        X[i, 1:1 + len(ix)] = ix
        Y[i, :len(ix)] = ix
        Y[i, len(ix)] = 0
    return X, Y


def longest(items: list[str]) -> int:
    return max(len(w) for w in items)


def split_items(items: list[str], seed: int) -> tuple[list[str], list[str], list[str]]:
    """Shuffle a copy with Python's random.seed(seed) and cut 80/10/10 by item (the lecture's split)."""
    shuffled = list(items)
    random.Random(seed).shuffle(shuffled)
    n1 = int(SPLIT_FRACTIONS[0] * len(shuffled))
    n2 = int(SPLIT_FRACTIONS[1] * len(shuffled))
    parts = shuffled[:n1], shuffled[n1:n2], shuffled[n2:]
    for name, part in zip(("train", "val", "test"), parts):
        if not part:
            raise UserError(f"the 80/10/10 split of {len(items)} item{'' if len(items) == 1 else 's'} "
                            f"leaves the {name} part empty; "
                            "the input file needs at least 10 items")
    return parts


@dataclass
class Dataset:
    """A vocabulary and the train/val/test examples of one file."""

    vocab: Vocab
    block_size: int
    items: list[str]
    splits: dict[str, tuple[torch.Tensor, torch.Tensor]]
    sha256: str  # of the file's bytes

    @classmethod
    def load(cls, path: str | Path, block_size: int = 3, seed: int = 42,
             vocab: Vocab | None = None, layout: str = "context") -> "Dataset":
        """``layout="sequence"``: ``block_size`` None means the longest item + 1."""
        items, sha256 = load_items(path)
        if layout == "sequence":
            need = longest(items) + 1
            if block_size is not None and block_size < need:
                raise UserError(f"--block-size {block_size} is too short: the longest item has "
                                f"{need - 1} characters, and a sequence holds it and its end "
                                f"token; pass --block-size {need} or more, or leave it out")
            block_size = block_size or need
        if block_size < 1:
            raise UserError(f"--block-size must be at least 1, got {block_size}")
        vocab = vocab or Vocab.from_items(items)
        build = build_sequences if layout == "sequence" else build_examples
        train, val, test = split_items(items, seed)
        splits = {name: build(part, vocab, block_size)
                  for name, part in (("train", train), ("val", val), ("test", test))}
        return cls(vocab, block_size, items, splits, sha256)
