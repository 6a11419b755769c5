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


# A sequence model's block size, when the data sets it (the longest item + 1), is at most this:
# an item longer than MAX_AUTO_BLOCK - 1 characters is refused with a one-line message (how many
# items, how long), unless --block-size asks for a longer block; the memory estimate then says
# whether that fits. names.txt (15) and a word list (39 in Debian's ngerman) are far below it.
MAX_AUTO_BLOCK = 256


def index_dtype(vocab_size: int, signed: bool = False) -> torch.dtype:
    """The smallest integer type that holds indices 0..vocab_size-1 (and -1, the padding, when
    ``signed``). Indices are widened to int64 one batch or chunk at a time (``as_index``)."""
    if signed:
        return torch.int8 if vocab_size <= 128 else torch.int16 if vocab_size <= 32768 else torch.int32
    return torch.uint8 if vocab_size <= 256 else torch.int16 if vocab_size <= 32768 else torch.int32


def encode_all(items: list[str], vocab: Vocab) -> tuple[torch.Tensor, torch.Tensor]:
    """Every item's indices end to end (int64), and each item's length: one lookup over the
    whole text instead of one per character."""
    text = "".join(items)
    lengths = torch.tensor([len(w) for w in items], dtype=torch.long)
    if not text:
        return torch.zeros(0, dtype=torch.long), lengths
    points = torch.frombuffer(bytearray(text.encode("utf-32-le")), dtype=torch.int32).long()
    table = torch.tensor([ord(c) for c in vocab.chars], dtype=torch.long)
    pos = torch.searchsorted(table, points).clamp(max=max(len(table) - 1, 0))
    bad = table[pos] != points if len(table) else torch.ones_like(points, dtype=torch.bool)
    if bool(bad.any()):
        ch = chr(int(points[bad.nonzero()[0, 0]]))
        raise UserError(f"character {ch!r} is not in the vocabulary; "
                        "use the same data file the model was trained on")
    return pos + 1, lengths


def build_examples(items: list[str], vocab: Vocab, block_size: int,
                   dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """All (context, next) pairs: X is N x T, Y is N, in ``dtype`` (default int64).

    Each item is laid out as T boundary tokens, its characters and one boundary token; its
    examples are the windows of T + 1 starting at each of its first L + 1 positions."""
    codes, lengths = encode_all(items, vocab)
    T = block_size
    seg = lengths + T + 1                                    # each item's stretch of the stream
    starts = torch.cumsum(seg, 0) - seg
    stream = torch.zeros(int(seg.sum()), dtype=torch.long)
    item_of_code = torch.repeat_interleave(torch.arange(len(items)), lengths)
    within = torch.arange(len(codes)) - torch.repeat_interleave(torch.cumsum(lengths, 0) - lengths, lengths)
    stream[starts[item_of_code] + T + within] = codes
    n_ex = lengths + 1
    ex_item = torch.repeat_interleave(torch.arange(len(items)), n_ex)
    ex_pos = torch.arange(int(n_ex.sum())) - torch.repeat_interleave(torch.cumsum(n_ex, 0) - n_ex, n_ex)
    first = starts[ex_item] + ex_pos                         # each example's window start
    cols = first.unsqueeze(1) + torch.arange(T + 1)
    windows = stream[cols]
    dtype = dtype or torch.long
    return windows[:, :T].to(dtype).contiguous(), windows[:, T].to(dtype).contiguous()


def build_sequences(items: list[str], vocab: Vocab, block_size: int,
                    dtype: tuple[torch.dtype, torch.dtype] | None = None
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """makemore's layout: X[i] = [0, item, 0 ...], Y[i] = [item, 0, -1 ...], each N x T, in
    ``dtype`` (X's and Y's; default int64)."""
    codes, lengths = encode_all(items, vocab)
    if len(items) and int(lengths.max()) >= block_size:
        L = int(lengths.max())
        raise UserError(f"an item of {L} characters does not fit a block of {block_size} "
                        f"(it needs the item and its end token); pass --block-size "
                        f"{L + 1} or more")
    xdt, ydt = dtype or (torch.long, torch.long)
    N = len(items)
    X = torch.zeros(N, block_size, dtype=xdt)
    Y = torch.full((N, block_size), IGNORE_INDEX, dtype=ydt)
    row = torch.repeat_interleave(torch.arange(N), lengths)
    col = torch.arange(len(codes)) - torch.repeat_interleave(torch.cumsum(lengths, 0) - lengths, lengths)
    X[row, col + 1] = codes.to(xdt)
    Y[row, col] = codes.to(ydt)
    Y[torch.arange(N), lengths] = 0
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
             vocab: Vocab | None = None, layout: str = "context", compact: bool = False,
             check_memory=None) -> "Dataset":
        """``layout="sequence"``: ``block_size`` None means the longest item + 1 (refused above
        ``MAX_AUTO_BLOCK``). ``compact``: the examples in the smallest integer type that holds
        the vocabulary (``index_dtype``), else int64. ``check_memory(vocab, block_size, rows)``,
        when given, is called before the examples are allocated (to refuse what cannot fit)."""
        items, sha256 = load_items(path)
        if layout == "sequence":
            need = longest(items) + 1
            if block_size is not None and block_size < need:
                raise UserError(f"--block-size {block_size} is too short: the longest item has "
                                f"{need - 1} characters, and a sequence holds it and its end "
                                f"token; pass --block-size {need} or more, or leave it out")
            if block_size is None and need > MAX_AUTO_BLOCK:
                over = sum(len(w) >= MAX_AUTO_BLOCK for w in items)
                raise UserError(f"{over:,} item(s) of {len(items):,} are longer than "
                                f"{MAX_AUTO_BLOCK - 1} characters (the longest has {need - 1:,}), "
                                f"and a sequence model pads every item to the longest; remove or "
                                f"split them, or pass --block-size {need} to pad all to it")
            block_size = block_size or need
        if block_size < 1:
            raise UserError(f"--block-size must be at least 1, got {block_size}")
        vocab = vocab or Vocab.from_items(items)
        if check_memory is not None:
            check_memory(vocab, block_size, len(items) if layout == "sequence"
                         else sum(map(len, items)) + len(items))
        train, val, test = split_items(items, seed)
        if layout == "sequence":
            dtype = (index_dtype(vocab.size), index_dtype(vocab.size, signed=True)) if compact else None
            splits = {name: build_sequences(part, vocab, block_size, dtype)
                      for name, part in (("train", train), ("val", val), ("test", test))}
        else:
            dtype = index_dtype(vocab.size) if compact else None
            splits = {name: build_examples(part, vocab, block_size, dtype)
                      for name, part in (("train", train), ("val", val), ("test", test))}
        return cls(vocab, block_size, items, splits, sha256)
