import pytest
import torch

from backprop_ninja.data import Dataset, Vocab, build_examples, read_items, split_items
from backprop_ninja.errors import UserError


def test_lecture_split_sizes(names):
    sizes = {k: v[0].shape[0] for k, v in names.splits.items()}
    assert sizes == {"train": 182625, "val": 22655, "test": 22866}
    assert names.vocab.size == 27 and len(names.items) == 32033
    X, Y = names.splits["train"]
    assert X.shape == (182625, 3) and X.dtype == torch.long and Y.shape == (182625,)


def test_examples_for_one_item():
    vocab = Vocab.from_items(["emma"])
    X, Y = build_examples(["emma"], vocab, block_size=3)
    e, m, a = (vocab.stoi()[c] for c in "ema")
    assert X.tolist() == [[0, 0, 0], [0, 0, e], [0, e, m], [e, m, m], [m, m, a]]
    assert Y.tolist() == [e, m, m, a, 0]
    X1, _ = build_examples(["emma"], vocab, block_size=1)
    assert X1.shape == (5, 1)


def test_split_is_by_item_and_seeded():
    items = [f"item{i}" for i in range(50)]
    a, b = split_items(items, 42), split_items(items, 42)
    assert a == b and split_items(items, 1) != a
    assert [len(p) for p in a] == [40, 5, 5]
    assert sorted(sum(a, [])) == sorted(items)


def test_any_alphabet(tmp_path):
    f = tmp_path / "w.txt"
    words = ["Zoë", "José", "北京", "a.b", "x-y!", "Ñandú", "東京", "O'Neil", "ÅSA", "ß"] * 3
    f.write_text("\n".join(words) + "\n", encoding="utf-8")
    d = Dataset.load(f, block_size=4)
    assert "." in d.vocab.chars  # a '.' in the data gets its own index, not the boundary's
    assert d.vocab.decode(d.vocab.encode("a.b")) == "a.b"
    assert d.vocab.stoi()["."] != 0
    assert sum(x.shape[0] for x, _ in d.splits.values()) == sum(len(w) + 1 for w in words)


@pytest.mark.parametrize("content,message", [
    (b"", "no items"),
    (b"\n  \n\t\n", "no items"),
    (b"\x00\x01\x02binary", "binary"),
    (b"caf\xe9\n", "not valid UTF-8"),
])
def test_bad_files(tmp_path, content, message):
    f = tmp_path / "bad.txt"
    f.write_bytes(content)
    with pytest.raises(UserError, match=message):
        read_items(f)


def test_missing_file_and_too_few_items(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        read_items(tmp_path / "nope.txt")
    f = tmp_path / "few.txt"
    f.write_text("a\nb\nc\n")
    with pytest.raises(UserError, match="leaves the val part empty"):
        Dataset.load(f)


def test_crlf_and_bom(tmp_path):
    f = tmp_path / "w.txt"
    f.write_bytes("\ufeffanna\r\nbob\r\n".encode("utf-8"))
    assert read_items(f) == ["anna", "bob"]


def test_compact_examples_are_the_same_indices_in_a_smaller_type(tmp_path):
    path = tmp_path / "items.txt"
    path.write_text("\n".join(f"item{i}x" for i in range(40)) + "\n")
    for layout, block, types in (("context", 3, (torch.uint8, torch.uint8)),
                                 ("sequence", None, (torch.uint8, torch.int8))):
        wide = Dataset.load(path, block_size=block, layout=layout)
        small = Dataset.load(path, block_size=block, layout=layout, compact=True)
        for (Xw, Yw), (Xs, Ys) in zip(wide.splits.values(), small.splits.values()):
            assert (Xs.dtype, Ys.dtype) == types and Xw.dtype == torch.long
            assert torch.equal(Xs.long(), Xw) and torch.equal(Ys.long(), Yw)


def test_index_dtype_holds_the_vocabulary_and_the_padding():
    from backprop_ninja.data import index_dtype
    assert index_dtype(256) == torch.uint8 and index_dtype(257) == torch.int16
    assert index_dtype(128, signed=True) == torch.int8 and index_dtype(129, signed=True) == torch.int16
    assert index_dtype(40_000) == torch.int32


def test_sequences_of_unknown_characters_are_refused():
    from backprop_ninja.data import build_sequences
    with pytest.raises(UserError, match="'z' is not in the vocabulary"):
        build_sequences(["abz"], Vocab.from_items(["ab"]), 5)
