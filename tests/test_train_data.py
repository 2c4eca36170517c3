"""The training lab's data: built-in text, uploads refused when not usable, split, classes."""

from __future__ import annotations

import pytest
import torch

from engine.train_data import (CLASSES, builtin_text, decode_upload, token_class, tokenize,
                               train_batches, val_batches)


def test_pydoc_text_and_bpe_split() -> None:
    text = builtin_text("pydoc")
    assert len(text) > 100_000 and "assert" in text
    c = tokenize(text, "bpe", 512)
    n = c.train.numel() + c.val.numel()
    assert c.vocab == 512 and c.val.numel() == int(n * 0.1)
    assert int(c.train.max()) < 512
    # The held-out tail decodes back to the end of the text.
    assert text.endswith("".join(c.strings[i] for i in c.val[-50:]))


def test_byte_tokens_are_the_utf8_bytes() -> None:
    c = tokenize("héllo wörld " * 20, "byte")
    assert torch.equal(torch.cat([c.train, c.val]),
                       torch.tensor(list(("héllo wörld " * 20).encode()), dtype=torch.int64))


@pytest.mark.parametrize("data, msg", [(b"\xff\xfe\x00bad", "not UTF-8"), (b"   \n", "empty"),
                                       (b"a" * (5 * 2**20 + 1), "5 MB"), (b"ab\x00cd", "NUL")])
def test_bad_uploads(data: bytes, msg: str) -> None:
    with pytest.raises(ValueError, match=msg):
        decode_upload(data)


def test_batches_same_for_same_seed_and_inside_train() -> None:
    c = tokenize("abcdefghij" * 100, "byte")
    a, b = train_batches(c, 4, 8, 5, seed=1), train_batches(c, 4, 8, 5, seed=1)
    assert torch.equal(a, b) and a.shape == (5, 4, 8)
    assert not torch.equal(a, train_batches(c, 4, 8, 5, seed=2))
    # Consecutive bytes of the text: each window steps by one letter.
    assert bool(((a[..., 1:] - a[..., :-1]) % 10 == 1).all() | ((a[..., 1:] - a[..., :-1]) == -9).all())
    v = val_batches(c, 4, 8, 2)
    assert v.shape[1:] == (4, 8) and torch.equal(v.reshape(-1)[:8], c.val[:8])


@pytest.mark.parametrize("s, cls", [(" the", "words"), ("Python", "words"), (" sys_path", "identifiers"),
                                    ("getAttr", "identifiers"), (" 42", "digits"), (" ==", "punctuation"),
                                    ("\n\n", "whitespace"), ("x2", "identifiers")])
def test_token_classes(s: str, cls: str) -> None:
    assert CLASSES[token_class(s)] == cls
