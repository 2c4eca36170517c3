"""The training lab's data: text that needs no download, a BPE or byte-level tokenizer, batches.

Texts: "pydoc", the Python reference manual's topics that ship with every CPython
(pydoc_data.topics, about 465k characters); "stdlib", the standard library's own .py sources,
cut at 5 MB; or an uploaded UTF-8 .txt (5 MB cap). Tokens: a byte-level BPE trained on the text
with the `tokenizers` library (cached on disk by text hash and vocabulary), or raw bytes.
The last 10% of the tokens are held out for validation.
"""

from __future__ import annotations

import hashlib
import os
import sysconfig
from dataclasses import dataclass
from pathlib import Path

import torch

from engine.train_fields import BPE_VOCAB
from engine.validation import check_choice, check_int

MAX_TEXT_BYTES = 5 * 2**20
TEXTS = ("pydoc", "stdlib")
TOKENIZERS = ("bpe", "byte")
CLASSES = ("words", "identifiers", "digits", "punctuation", "whitespace")
VAL_SHARE = 0.1
CACHE_DIR = Path(os.environ.get("SCALELAB_CACHE", Path.home() / ".cache" / "scalelab"))


def builtin_text(name: str) -> str:
    """The text of a built-in corpus: "pydoc" (reference manual topics) or "stdlib" (sources)."""
    check_choice("data", name, TEXTS)
    if name == "pydoc":
        from pydoc_data import topics

        return "\n\n".join(topics.topics[k] for k in sorted(topics.topics))
    root = Path(sysconfig.get_paths()["stdlib"])
    parts, size = [], 0
    for path in sorted(root.glob("*.py")):  # top-level modules only: no tests, no site-packages
        part = path.read_text(encoding="utf-8", errors="replace")
        if size + len(part) > MAX_TEXT_BYTES:
            break
        parts.append(part)
        size += len(part)
    return "\n".join(parts)


def decode_upload(data: bytes, name: str = "uploaded text") -> str:
    """UTF-8 text of an upload; ValueError if it is empty, over 5 MB, or not UTF-8 text."""
    if len(data) > MAX_TEXT_BYTES:
        raise ValueError(f"{name} is {len(data) / 2**20:.1f} MB; the limit is 5 MB")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ValueError(f"{name} is not UTF-8 text (byte {exc.start} cannot be decoded)") from None
    if not text.strip():
        raise ValueError(f"{name} is empty")
    if "\x00" in text:
        raise ValueError(f"{name} contains NUL bytes: not a text file")
    return text


@dataclass(frozen=True)
class Corpus:
    """Token ids of one text: train (N_train,) and val (N_val,) int64; `strings[i]` is token i's text."""

    train: torch.Tensor
    val: torch.Tensor
    strings: tuple[str, ...]
    tokenizer: str
    text_sha: str
    chars: int

    @property
    def vocab(self) -> int:
        """Vocabulary size V."""
        return len(self.strings)


_CORPORA: dict[tuple[str, str, int], Corpus] = {}


def _bpe(text: str, sha: str, vocab: int) -> "tokenizers.Tokenizer":  # noqa: F821
    """A byte-level BPE of `vocab` tokens trained on `text`, loaded from the disk cache if there."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    path = CACHE_DIR / f"bpe-{sha[:20]}-{vocab}.json"
    if path.exists():
        return Tokenizer.from_file(str(path))
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    lines = text.splitlines(keepends=True)
    tok.train_from_iterator((lines[i:i + 1000] for i in range(0, len(lines), 1000)), trainer)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    tok.save(str(tmp))
    tmp.replace(path)  # atomic: two sessions training the same BPE never read a half file
    return tok


def tokenize(text: str, tokenizer: str = "bpe", vocab: int = 1024) -> Corpus:
    """Tokenize `text` and split it (last 10% held out); cached in memory by (hash, tokenizer, V)."""
    check_choice("tokenizer", tokenizer, TOKENIZERS)
    if tokenizer == "bpe":
        check_int("vocabulary", vocab, *BPE_VOCAB)
    if not text.strip():
        raise ValueError("the text is empty")
    sha = hashlib.sha256(text.encode("utf-8")).hexdigest()
    key = (sha, tokenizer, vocab if tokenizer == "bpe" else 256)
    if key not in _CORPORA:
        if tokenizer == "bpe":
            tok = _bpe(text, sha, vocab)
            ids = torch.tensor(tok.encode(text).ids, dtype=torch.int64)
            strings = tuple(tok.decode([i]) for i in range(tok.get_vocab_size()))
        else:
            ids = torch.frombuffer(bytearray(text.encode("utf-8")), dtype=torch.uint8).long()
            strings = tuple(bytes([i]).decode("latin-1") for i in range(256))
        n_val = max(1, int(len(ids) * VAL_SHARE))
        if len(_CORPORA) >= 8:  # uploads are up to 5 MB each: keep the 8 latest corpora
            _CORPORA.pop(next(iter(_CORPORA)))
        _CORPORA[key] = Corpus(ids[:-n_val], ids[-n_val:], strings, tokenizer, sha, len(text))
    return _CORPORA[key]


def check_fits(corpus: Corpus, batch: int, seq_len: int, what: str = "the text") -> None:
    """ValueError unless the train split holds one batch and the val split one sequence."""
    need = batch * seq_len + 1
    if corpus.train.numel() < need or corpus.val.numel() < seq_len:
        raise ValueError(f"{what} is too short: {corpus.train.numel()} training and "
                         f"{corpus.val.numel()} validation tokens, but one batch needs {need} "
                         f"and validation {seq_len} (sequence length); upload more text or "
                         "lower batch / sequence length")


def train_batches(corpus: Corpus, batch: int, seq_len: int, steps: int, seed: int
                  ) -> torch.Tensor:
    """(steps, batch, seq_len) int64 windows at seeded random offsets of the train split."""
    check_fits(corpus, batch, seq_len)
    gen = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, corpus.train.numel() - seq_len + 1, (steps, batch), generator=gen)
    return corpus.train[starts[..., None] + torch.arange(seq_len)]


def val_batches(corpus: Corpus, batch: int, seq_len: int, max_batches: int) -> torch.Tensor:
    """(n, b, seq_len) non-overlapping windows of the val split, at most max_batches x batch."""
    n = min(corpus.val.numel() // seq_len, batch * max_batches)
    windows = corpus.val[: n * seq_len].view(n, seq_len)
    b = min(batch, n)
    return windows[: (n // b) * b].view(-1, b, seq_len)


def token_class(s: str) -> int:
    """Index into CLASSES of a token's text: whitespace, digits, punctuation, words (alphabetic),
    identifiers (letters with digits, underscores or inner capitals, as in `sys_path` or `getAttr`)."""
    core = s.strip()
    if not core:
        return CLASSES.index("whitespace")
    if core.isdigit():
        return CLASSES.index("digits")
    if not any(c.isalnum() or c == "_" for c in core):
        return CLASSES.index("punctuation")
    if core.isalpha() and (core.islower() or core.istitle() or core.isupper()):
        return CLASSES.index("words")
    return CLASSES.index("identifiers")
