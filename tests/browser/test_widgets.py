"""Every widget of every notebook, moved by a person in JupyterLab, redraws completely.

nbval runs the notebooks without a frontend, so it cannot see what a reader sees when a slider
moves. Here each notebook that calls ``pkm_ref.notebook.attach_widget`` is opened in JupyterLab in
headless Chromium at the smoke profile and run with Run All; then every control is moved (a slider
by an arrow key and by a mouse drag, a dropdown to its next option) and, once the kernel has
answered every request and the widget has stopped changing, the test checks that the control's
value changed, that the widget's output changed, that its text is there and its figure fully drawn
(the size of the figure the cell drew at Run All, with ink across as much of it: not blank, not a
strip), that no traceback appeared, that the page logged no JavaScript error, and that no output
left the widget.
Screenshots of the failing cells are saved under pytest's temporary folder.
"""

from __future__ import annotations

import base64
import io
import json
import re
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

pytestmark = pytest.mark.browser

NOTEBOOKS = Path(__file__).resolve().parents[2] / "notebooks"
RUN_ALL_TIMEOUT_S = 150  # the slowest widget notebook runs in well under a minute at smoke
SETTLE_TIMEOUT_S = 30  # one control change: the smoke callbacks take a second or two
STABLE_FOR_S = 0.75  # settled: nothing unanswered and the output unchanged this long
# A figure redrawn after a change keeps at least this share of the width and height of the figure
# the cell drew at Run All, and of the share of its rows and columns that hold ink (see Figure).
MIN_RATIO = 0.8
WHITE = 245  # a pixel with every channel above this counts as paper, not ink


def widget_notebooks() -> list[Path]:
    """Notebooks with at least one widget: code that calls ``attach_widget``."""
    return [path for path in sorted(NOTEBOOKS.glob("[0-9][0-9]_*.ipynb")) if widget_cells(path)]


def widget_cells(path: Path) -> list[int]:
    """Indices of the cells of ``path`` that attach a widget."""
    cells = json.loads(path.read_text(encoding="utf-8"))["cells"]
    return [
        index
        for index, cell in enumerate(cells)
        if cell["cell_type"] == "code" and "attach_widget(" in "".join(cell["source"])
    ]


def copy_without_outputs(path: Path, folder: Path) -> Path:
    """``path`` copied into ``folder`` with its outputs and execution counts cleared, so that a
    cell shows a count only once this run has executed it."""
    notebook = json.loads(path.read_text(encoding="utf-8"))
    for cell in notebook["cells"]:
        if cell["cell_type"] == "code":
            cell["outputs"], cell["execution_count"] = [], None
    copy = folder / path.name
    copy.write_text(json.dumps(notebook), encoding="utf-8")
    return copy


# JupyterLab's own models (window.jupyterapp) say more than the page does: the notebook panel of
# a path, the kernel's connection and status, and per code cell its execution count and the
# types of its outputs.
PANEL_JS = """
  if (!window.jupyterapp) return null;  // still loading
  const panel = [...window.jupyterapp.shell.widgets('main')]
      .find(w => w.context && w.context.path === path);
  if (!panel || !panel.context.isReady) return null;
"""
NOTEBOOK_STATE_JS = (
    """(path) => {"""
    + PANEL_JS
    + """
  const kernel = panel.sessionContext.session && panel.sessionContext.session.kernel;
  const cells = [];
  const model = panel.content.model;
  for (let i = 0; i < model.cells.length; i++) {
    const cell = model.cells.get(i);
    if (cell.type !== 'code') { cells.push(null); continue; }
    const outputs = [];
    for (let j = 0; j < cell.outputs.length; j++) {
      const output = cell.outputs.get(j);
      outputs.push(output.type + ' ' + Object.keys(output.data).sort().join(','));
    }
    cells.push({count: cell.executionCount, outputs: outputs});
  }
  return {
    connection: kernel ? kernel.connectionStatus : null,
    status: kernel ? kernel.status : null,
    unanswered: window.pkmUnanswered ? window.pkmUnanswered.size : null,
    cells: cells,
  };
}"""
)
# The kernel's status alone says "idle" while a subshell thread is still busy. Instead, count the
# requests the page sent the kernel on its shell channel (execute requests, widget messages) that
# the kernel has not yet closed with an "idle" status: none left means everything asked is done.
TRACK_REQUESTS_JS = (
    """(path) => {"""
    + PANEL_JS
    + """
  const unanswered = new Set();
  window.pkmUnanswered = unanswered;
  panel.sessionContext.session.kernel.anyMessage.connect((_, {msg, direction}) => {
    if (direction === 'send' && msg.channel === 'shell') {
      unanswered.add(msg.header.msg_id);
    } else if (msg.header.msg_type === 'status' && msg.content.execution_state === 'idle') {
      unanswered.delete(msg.parent_header.msg_id);
    }
  });
  return true;
}"""
)


@dataclass(frozen=True)
class Figure:
    """Size of one PNG, and how far its drawing spreads: the share of its pixel rows and of its
    pixel columns that hold any ink. A complete figure has ink on nearly every row and column
    (axes, labels, titles), however sparse its data; a blank one on none; a half-drawn one only
    on a band."""

    width: int
    height: int
    rows: float
    columns: float

    @classmethod
    def from_data_url(cls, url: str) -> Figure:
        import numpy as np
        from PIL import Image

        data = base64.b64decode(url.split(",", 1)[1])
        pixels = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))  # (H, W, 3)
        ink = (pixels < WHITE).any(axis=-1)  # (H, W) True where anything is drawn
        return cls(
            width=ink.shape[1],
            height=ink.shape[0],
            rows=float(ink.any(axis=1).mean()),
            columns=float(ink.any(axis=0).mean()),
        )

    def problem_against(self, reference: Figure) -> str | None:
        """What is wrong with this figure, drawn after a change, against ``reference``."""
        if min(self.width / reference.width, self.height / reference.height) < MIN_RATIO:
            return f"figure is a strip: {self}; at Run All {reference}"
        if min(self.rows / reference.rows, self.columns / reference.columns) < MIN_RATIO:
            return f"figure is blank or half drawn: {self}; at Run All {reference}"
        return None

    def __str__(self) -> str:
        return (
            f"{self.width}x{self.height} px, ink on {self.rows:.0%} of rows "
            f"and {self.columns:.0%} of columns"
        )


@dataclass(frozen=True)
class WidgetView:
    """What a widget shows: its controls' values and its output (text and figures)."""

    values: tuple[str, ...]
    text: str
    images: tuple[str, ...]  # data: URLs
    html: str  # the whole output, to tell when it stops changing


class NotebookPage:
    """One notebook open in JupyterLab, driven as a reader would."""

    def __init__(self, page, server, path: str, screenshots: Path):
        self.page, self.server, self.path, self.screenshots = page, server, path, screenshots
        self.errors: list[str] = []  # JavaScript errors the page logged
        page.on("pageerror", lambda error: self.errors.append(f"uncaught: {error}"))
        page.on(
            "console",
            lambda message: (
                self.errors.append(f"console.error: {message.text}")
                if message.type == "error"
                else None
            ),
        )

    def state(self) -> dict | None:
        return self.page.evaluate(NOTEBOOK_STATE_JS, self.path)

    def wait(self, condition, timeout_s: float, what: str):
        """Poll ``condition()`` until it returns something true; fail after ``timeout_s``."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            result = condition()
            if result:
                return result
            time.sleep(0.25)
        pytest.fail(f"{self.path}: {what} within {timeout_s} s")

    def open(self) -> None:
        self.page.goto(f"{self.server.url}/lab/tree/{self.path}?token={self.server.token}&reset")
        # The status bar shows "Idle" before the kernel is connected: ask the kernel connection.
        self.wait(
            lambda: (
                (s := self.state()) and s["connection"] == "connected" and s["status"] == "idle"
            ),
            90,
            "the kernel did not connect",
        )
        self.page.evaluate(TRACK_REQUESTS_JS, self.path)

    def run_all(self) -> dict:
        """Run All, and wait until every code cell has run and the kernel is idle."""
        self.page.evaluate("window.jupyterapp.commands.execute('notebook:run-all-cells')")

        def finished():
            state = self.state()
            cells = [c for c in state["cells"] if c is not None]
            failed = any(o.startswith("error") for c in cells for o in c["outputs"])  # stops it
            done = failed or all(c["count"] is not None for c in cells)
            return state if done and state["unanswered"] == 0 else None

        return self.wait(finished, RUN_ALL_TIMEOUT_S, "Run All did not finish")

    def cell(self, index: int):
        return self.page.locator(".jp-Notebook .jp-Cell").nth(index)

    def controls(self, cell):
        widget = cell.locator(".widget-interact").first
        return widget.locator(":scope > .widget-slider, :scope > .widget-dropdown")

    def view(self, cell) -> WidgetView:
        widget = cell.locator(".widget-interact").first
        values = []
        for control in self.controls(cell).all():
            readout = control.locator(".widget-readout, select").first
            tag = readout.evaluate("node => node.tagName")
            values.append(readout.input_value() if tag == "SELECT" else readout.text_content())
        output = widget.locator(":scope > .widget-output").first
        texts = output.locator(".jp-RenderedText").all_text_contents()
        images = output.locator("img").evaluate_all("nodes => nodes.map(n => n.src)")
        return WidgetView(tuple(values), "".join(texts), tuple(images), output.inner_html())

    def settle(self, cell) -> WidgetView:
        """Wait until the kernel has answered every request and the widget's output has stopped
        changing (a change's first message may leave the page a moment after the move)."""
        last, since = None, time.monotonic()

        def settled():
            nonlocal last, since
            view = self.view(cell)
            if view != last or self.state()["unanswered"]:
                last, since = view, time.monotonic()
                return None
            return view if time.monotonic() - since >= STABLE_FOR_S else None

        return self.wait(settled, SETTLE_TIMEOUT_S, "a widget did not settle")

    def screenshot(self, cell, name: str) -> Path:
        """A picture of the cell's output (JupyterLab scrolls inside its own panel: a picture of
        the page would show whatever is in view)."""
        slug = re.sub(r"\W+", "_", f"{Path(self.path).stem} {name}").strip("_")
        path = self.screenshots / f"{slug}.png"
        output = cell.locator(".jp-Cell-outputArea")
        output.evaluate("node => node.scrollIntoView({block: 'start'})")
        output.screenshot(path=str(path))
        return path


def move(page, control, how: str) -> None:
    """Change one control as a reader does: ``key`` or ``drag`` a slider, ``select`` a dropdown."""
    if how == "select":
        select = control.locator("select")
        options = select.locator("option").evaluate_all("nodes => nodes.map(n => n.value)")
        current = options.index(select.input_value())
        select.select_option(options[(current + 1) % len(options)])
        return
    handle = control.locator(".noUi-handle")
    low, high, now = (
        float(handle.get_attribute(name))
        for name in ("aria-valuemin", "aria-valuemax", "aria-valuenow")
    )
    forward = now <= (low + high) / 2  # towards the side with room
    if how == "key":
        handle.focus()
        page.keyboard.press("ArrowRight" if forward else "ArrowLeft")
        return
    handle.scroll_into_view_if_needed()  # a drag needs the handle on screen
    box, track = handle.bounding_box(), control.locator(".noUi-base").bounding_box()
    x, y = box["x"] + box["width"] / 2, box["y"] + box["height"] / 2
    distance = track["width"] / 4 * (1 if forward else -1)
    page.mouse.move(x, y)
    page.mouse.down()
    page.mouse.move(x + distance, y, steps=8)  # eight updates in quick succession
    page.mouse.up()


def problems_after_move(
    position: int, before: WidgetView, after: WidgetView, at_run_all: WidgetView
) -> list[str]:
    """What is wrong with a widget after its control ``position`` moved from ``before``."""
    problems = []
    if after.values[position] == before.values[position]:
        problems.append(f"value stayed {before.values[position]}")
    if (after.text, after.images) == (before.text, before.images):
        problems.append("output did not change")
    if at_run_all.text and not after.text:
        problems.append("text output missing")
    if "Traceback" in after.text:
        problems.append(f"traceback: {after.text[-300:]!r}")
    if len(after.images) != len(at_run_all.images):
        problems.append(f"{len(after.images)} figures, {len(at_run_all.images)} at Run All")
    for url, reference in zip(after.images, at_run_all.images, strict=False):
        figure = Figure.from_data_url(url)
        if problem := figure.problem_against(Figure.from_data_url(reference)):
            problems.append(problem)
    return problems


@pytest.mark.parametrize("notebook", widget_notebooks(), ids=lambda path: path.stem)
def test_every_widget_redraws_in_jupyterlab(
    notebook, lab_server, browser_context, failure_screenshots
):
    copy_without_outputs(notebook, lab_server.root / "notebooks")
    page = browser_context.new_page()
    lab = NotebookPage(page, lab_server, f"notebooks/{notebook.name}", failure_screenshots)
    failures: list[str] = []
    moves = 0
    try:
        lab.open()
        ran = lab.run_all()
        tracebacks = [
            index
            for index, cell in enumerate(ran["cells"])
            if cell and any(output.startswith("error") for output in cell["outputs"])
        ]
        assert not tracebacks, f"Run All raised in cells {tracebacks}"
        assert not lab.errors, f"JavaScript errors while running: {lab.errors}"
        for index in widget_cells(notebook):
            cell = lab.cell(index)
            widgets = cell.locator(".widget-interact").count()
            assert widgets == 1, (
                f"cell {index}: {widgets} widgets rendered, not 1 (no widget: is the ipywidgets "
                "JupyterLab extension installed?)"
            )
            at_run_all = lab.settle(cell)
            outputs_at_run_all = lab.state()["cells"]
            assert at_run_all.html and all(
                Figure.from_data_url(url).rows > 0 for url in at_run_all.images
            ), f"cell {index}: the widget drew nothing at Run All"
            controls = lab.controls(cell).all()
            assert controls, f"cell {index}: the widget shows no slider or dropdown"
            for position, control in enumerate(controls):
                label = control.locator(".widget-label").text_content()
                is_slider = "widget-slider" in (control.get_attribute("class") or "")
                for how in ("key", "drag") if is_slider else ("select",):
                    before, errors_before = lab.view(cell), len(lab.errors)
                    move(page, control, how)
                    after = lab.settle(cell)
                    moves += 1
                    problems = problems_after_move(position, before, after, at_run_all)
                    if lab.state()["cells"] != outputs_at_run_all:
                        problems.append("an output escaped the widget")
                    problems += lab.errors[errors_before:]
                    if problems:
                        name = f"cell {index} '{label}' ({how})"
                        shot = lab.screenshot(cell, name)
                        failures.append(f"{name}: {'; '.join(problems)} [{shot.name}]")
    finally:
        page.close()
        lab_server.shutdown_kernels()
    print(f"{notebook.name}: {moves} moves, {len(failures)} failed")
    if failures:
        print(f"screenshots of the failing cells: {failure_screenshots}")
    assert not failures, f"{notebook.name}:\n" + "\n".join(failures)


def test_widget_notebooks_are_found():
    """The scan finds the widget notebooks (a rename of attach_widget would hide them all)."""
    names = {path.stem[:2] for path in widget_notebooks()}
    assert {"01", "02", "03", "06"} <= names
