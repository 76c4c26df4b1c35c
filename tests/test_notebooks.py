"""The committed notebooks keep the conventions of CONTRIBUTING.md, as GitHub shows them."""

import json
from pathlib import Path

import pytest

NOTEBOOKS = sorted(
    (Path(__file__).resolve().parent.parent / "notebooks").glob("[0-9][0-9]_*.ipynb")
)


def _cells(path: Path) -> list[dict]:
    return json.loads(path.read_text(encoding="utf-8"))["cells"]


def _source(cell: dict) -> str:
    return "".join(cell["source"])


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_every_figure_is_embedded_in_its_cell(path):
    """A cell that shows a figure carries the image: readers on GitHub and Colab see the outputs."""
    for index, cell in enumerate(_cells(path)):
        if cell["cell_type"] != "code" or "notebook.show(" not in _source(cell):
            continue
        images = [o for o in cell["outputs"] if "image/png" in o.get("data", {})]
        assert images, f"{path.name} cell {index} shows a figure but its output has no image"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_badge_summary_and_exercises(path):
    cells = _cells(path)
    assert "colab.research.google.com/github" in _source(cells[0]), "the first cell has the badge"
    lines = {
        line for c in cells if c["cell_type"] == "markdown" for line in _source(c).splitlines()
    }
    headings = {line for line in lines if line.startswith("## ")}
    assert "## Summary" in headings and "## Exercises" in headings


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_a_static_figure_comes_before_every_widget(path):
    """Where widgets do not render (GitHub, nbval, a headless run) the figure is still there."""
    cells = [_source(c) if c["cell_type"] == "code" else "" for c in _cells(path)]
    for index, source in enumerate(cells):
        if "attach_widget(" in source:
            assert any("notebook.show(" in earlier for earlier in cells[:index]), (
                f"{path.name} cell {index} attaches a widget before any static figure"
            )


def test_show_embeds_the_figure_under_a_headless_backend(tmp_path, monkeypatch):
    """``pkm_ref.notebook.show`` puts the PNG in the cell's output even with MPLBACKEND=Agg."""
    import nbformat
    from nbclient import NotebookClient

    monkeypatch.setenv("MPLBACKEND", "Agg")
    monkeypatch.setenv("PKM_REF_FIGURES", str(tmp_path))
    code = (
        "import matplotlib.pyplot as plt\nimport pkm_ref.notebook\n"
        "fig, ax = plt.subplots()\nax.plot([0, 1])\npkm_ref.notebook.show(fig, 'headless')"
    )
    notebook = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(code)])
    NotebookClient(notebook, kernel_name="python3").execute()
    outputs = notebook.cells[0].outputs
    assert any("image/png" in output.get("data", {}) for output in outputs)
    assert (tmp_path / "headless.png").exists()
