"""pkm_ref.notebook.reference_file: the committed results, in a clone and outside one (Colab)."""

import http.client
import io
import urllib.request
from urllib.error import HTTPError, URLError

from pkm_ref import figures, notebook


def test_a_clone_reads_the_committed_files():
    for gpu, folder in ((False, "figures"), (True, "figures/gpu")):
        data = notebook.reference_file("lm_comparison.json", gpu=gpu)
        assert data == (figures.CHECKOUT / folder / "lm_comparison.json").read_bytes()


def test_a_clone_without_the_file_says_so(tmp_path, monkeypatch, capsys):
    (tmp_path / "pyproject.toml").write_text("")
    monkeypatch.setattr(figures, "CHECKOUT", tmp_path)
    monkeypatch.setattr(urllib.request, "urlopen", _refuse)  # a clone never downloads
    assert notebook.reference_file("bench_layer.json") is None
    assert "figures/bench_layer.json is not committed yet" in capsys.readouterr().out


def test_outside_a_clone_the_files_come_from_github(tmp_path, monkeypatch):
    """Colab installs the package alone: the results are downloaded from the repository."""
    monkeypatch.setattr(figures, "CHECKOUT", tmp_path)  # no pyproject.toml: not a clone
    asked = []

    def urlopen(url, timeout):
        asked.append(url)
        return io.BytesIO(b'{"rows": []}')

    monkeypatch.setattr(urllib.request, "urlopen", urlopen)
    assert notebook.reference_file("bench_model.json", gpu=True) == b'{"rows": []}'
    assert asked == [f"{notebook.RAW_FILES}/figures/gpu/bench_model.json"]


def test_offline_or_missing_downloads_end_in_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(figures, "CHECKOUT", tmp_path)
    monkeypatch.setattr(urllib.request, "urlopen", _refuse)
    assert notebook.reference_file("lm_comparison.json") is None
    printed = capsys.readouterr().out
    assert "could not be downloaded (no network)" in printed and "clone" in printed

    def not_found(url, timeout):
        raise HTTPError(url, 404, "Not Found", {}, None)

    monkeypatch.setattr(urllib.request, "urlopen", not_found)
    assert notebook.reference_file("missing.json") is None
    assert "(404 Not Found)" in capsys.readouterr().out

    def cut_mid_read(url, timeout):  # the connection ends mid-file: http.client, not urllib, raises
        raise http.client.IncompleteRead(b"partial")

    monkeypatch.setattr(urllib.request, "urlopen", cut_mid_read)
    assert notebook.reference_file("lm_comparison.json") is None
    assert "(IncompleteRead(7 bytes read))" in capsys.readouterr().out


def _refuse(url, timeout):
    raise URLError("no network")
