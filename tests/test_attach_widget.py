"""``pkm_ref.notebook.attach_widget`` redraws safely when changes arrive on several threads.

JupyterLab 4.6 and Notebook 7.6 with ipykernel 7 deliver widget messages on more than one thread,
and every widget message ends with matplotlib-inline's figure flush. These tests play both parts
in one process, without a frontend; tests/browser checks the same in a real browser.
"""

import threading
import time

import pytest

ipywidgets = pytest.importorskip("ipywidgets")
plt = pytest.importorskip("matplotlib.pyplot")

from pkm_ref.notebook import attach_widget  # noqa: E402


@pytest.fixture
def inline_backend():
    """matplotlib-inline's backend in interactive mode, as in a notebook kernel."""
    backend_inline = pytest.importorskip("matplotlib_inline.backend_inline")
    previous, was_interactive = plt.get_backend(), plt.isinteractive()
    plt.switch_backend("module://matplotlib_inline.backend_inline")
    plt.ion()
    yield backend_inline
    plt.close("all")
    plt.interactive(was_interactive)
    plt.switch_backend(previous)


def test_a_flush_on_another_thread_leaves_the_figure_being_drawn_alone(inline_backend):
    """The bug of notebooks 02 and 06 in JupyterLab: another thread's post-execution flush showed
    and closed the figure a widget callback was still drawing."""
    drawing, survived = threading.Event(), []

    def draw(n=1):
        figure, ax = plt.subplots()
        drawing.set()
        time.sleep(0.3)  # the flush below runs meanwhile
        ax.plot(range(n))
        survived.append(plt.fignum_exists(figure.number))

    def flush_while_drawing():
        drawing.wait(timeout=10)
        deadline = time.monotonic() + 0.25
        while time.monotonic() < deadline:
            inline_backend.flush_figures()

    slider = ipywidgets.IntSlider(value=1, min=1, max=5)
    attach_widget(draw, n=slider)
    drawing.clear()
    flusher = threading.Thread(target=flush_while_drawing)
    flusher.start()
    slider.value = 2  # redraws on this thread
    flusher.join()
    assert survived == [True, True]
    assert plt.get_fignums() == [], "every figure the widget drew is closed"
    assert plt.isinteractive(), "interactive mode is restored"


def test_redraws_run_one_at_a_time_and_end_on_the_newest_values(inline_backend):
    calls, running, overlaps = [], [], []

    def draw(a=0, b=0):
        running.append(1)
        if len(running) > 1:
            overlaps.append((a, b))
        time.sleep(0.02)
        calls.append((a, b))
        running.pop()

    first, second = ipywidgets.IntSlider(max=100), ipywidgets.IntSlider(max=100)
    attach_widget(draw, a=first, b=second)

    def move(slider):
        for value in range(1, 21):
            slider.value = value

    threads = [threading.Thread(target=move, args=(s,)) for s in (first, second)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not overlaps, f"redraws ran at once: {overlaps}"
    assert calls[-1] == (20, 20), "the last redraw shows the controls' final values"
    assert len(calls) <= 41, "never more redraws than changes (+ the first draw)"


def test_shows_and_closes_the_figures_the_function_leaves_open(inline_backend, capsys):
    def draw(n=3):
        print(f"n = {n}")
        assert not plt.isinteractive(), "the function draws with interactive mode off"
        plt.subplots()[1].plot(range(n))  # no plt.show(): attach_widget shows it

    attach_widget(draw, n=ipywidgets.IntSlider(value=3))
    shown = capsys.readouterr().out  # outside a kernel, display() prints reprs
    assert "n = 3" in shown and "Figure" in shown
    assert plt.get_fignums() == []
