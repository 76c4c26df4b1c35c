"""`pkm-ref reproduce`: bad input fails at once with a message; steps are listed and skipped."""

import json

import pytest
import torch

import pkm_ref.data
from pkm_ref import reproduce
from pkm_ref.cli import main


def test_lists_every_step_in_order(capsys):
    assert main(["reproduce", "--profile", "smoke", "--list"]) == 0
    names = [line.split()[0] for line in capsys.readouterr().out.splitlines()]
    assert names[0] == "lm-comparison"
    assert names[1:4] == ["bench-retrieval", "bench-layer", "bench-model"]
    notebooks = sorted(p.stem for p in reproduce.NOTEBOOKS_DIR.glob("[0-9][0-9]_*.ipynb"))
    assert names[4:] == [f"notebook-{n}" for n in notebooks]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message shown without CUDA")
def test_cuda_without_a_gpu_fails_at_once(capsys):
    assert main(["reproduce", "--profile", "smoke", "--device", "cuda"]) == 2
    assert "device 'cuda' was asked for" in capsys.readouterr().err


def test_steps_run_on_the_profiles_device(tmp_path, monkeypatch):
    """A cpu reproduce on a machine with a GPU measures the CPU, like ``pkm-ref bench --profile
    cpu``: its results land in figures/, the CPU results."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setenv("PKM_REF_FIGURES", str(tmp_path / "figures"))
    devices = []
    steps = reproduce._steps

    def recording_steps(profile, device, *rest):
        devices.append(device)
        return steps(profile, device, *rest)

    monkeypatch.setattr(reproduce, "_steps", recording_steps)
    runs = str(tmp_path / "runs")
    for profile in ("cpu", "gpu"):
        assert main(["reproduce", "--profile", profile, "--runs", runs, "--list"]) == 0
    assert (
        main(["reproduce", "--profile", "cpu", "--device", "cuda", "--runs", runs, "--list"]) == 0
    )
    assert devices == ["cpu", "cuda", "cuda"]


def test_unwritable_folder_fails_at_once(tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    assert main(["reproduce", "--profile", "smoke", "--runs", str(blocker / "runs")]) == 2
    assert "cannot write to" in capsys.readouterr().err


def test_unknown_corpus_fails_at_once(capsys):
    assert main(["reproduce", "--profile", "smoke", "--corpus", "nope"]) == 2
    assert "nope" in capsys.readouterr().err


def test_offline_corpus_fails_at_once(monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("PKM_REF_CACHE", str(tmp_path))
    unreachable = {"input.txt": ("http://127.0.0.1:9/input.txt", 1_115_394)}
    monkeypatch.setitem(pkm_ref.data._REMOTES, "tiny-shakespeare", unreachable)
    code = main(["reproduce", "--profile", "smoke", "--corpus", "tiny-shakespeare"])
    assert code == 2
    assert "tiny-shakespeare" in capsys.readouterr().err


def test_unknown_step_is_named(capsys):
    assert main(["reproduce", "--profile", "smoke", "--only", "bench-everything"]) == 2
    assert "bench-everything" in capsys.readouterr().err


def test_up_to_date_steps_are_skipped_and_force_reruns(tmp_path):
    calls = []
    steps = [reproduce.Step("a", lambda: calls.append("a"), 1.0)]
    state_path = tmp_path / "state.json"
    state = {}
    reproduce._run_steps(steps, state, state_path, force=False)
    reproduce._run_steps(steps, state, state_path, force=False)
    assert calls == ["a"]
    assert json.loads(state_path.read_text())["a"]["version"] == state["a"]["version"]
    reproduce._run_steps(steps, state, state_path, force=True)
    assert calls == ["a", "a"]


def test_a_step_reruns_when_its_arguments_change_or_its_results_are_gone(tmp_path):
    """Another corpus or device is another result; a wiped figures folder is no result at all."""
    calls = []
    result = tmp_path / "figures" / "lm_comparison.json"

    def step(corpus: str) -> reproduce.Step:
        def run() -> None:
            calls.append(corpus)
            result.parent.mkdir(exist_ok=True)
            result.write_text(corpus)

        return reproduce.Step("lm", run, 1.0, arguments=("--corpus", corpus), outputs=(result,))

    state, state_path = {}, tmp_path / "state.json"
    for corpus in ("sotu", "sotu", "shakespeare-plays"):
        reproduce._run_steps([step(corpus)], state, state_path, force=False)
    assert calls == ["sotu", "shakespeare-plays"]
    result.unlink()
    reproduce._run_steps([step("shakespeare-plays")], state, state_path, force=False)
    assert calls == ["sotu", "shakespeare-plays", "shakespeare-plays"] and result.exists()


def test_a_notebook_step_owns_the_figures_it_writes(tmp_path):
    """A notebook whose figures are missing from the figures folder (a new PKM_REF_FIGURES, a
    deleted PNG) reruns, although the executed notebook itself is still in place."""
    figures_dir = tmp_path / "figures"
    steps = {s.name: s for s in reproduce._steps("cpu", "cpu", "sotu", tmp_path, figures_dir)}
    outputs = steps["notebook-04_multihead_memory_gpu"].outputs
    assert outputs[0] == reproduce.NOTEBOOKS_DIR / "04_multihead_memory_gpu.ipynb"
    assert figures_dir / "04_layer_scaling.png" in outputs
    assert all(p.name.startswith("04_") for p in outputs[1:]) and len(outputs) == 5


def test_a_failed_step_is_not_recorded(tmp_path):
    def fail():
        raise RuntimeError("boom")

    state_path = tmp_path / "state.json"
    with pytest.raises(RuntimeError, match="boom"):
        reproduce._run_steps([reproduce.Step("bad", fail, 1.0)], {}, state_path, force=False)
    assert not state_path.exists()


def test_notebook_step_is_stale_when_its_cells_change(tmp_path):
    notebook = tmp_path / "00_x.ipynb"
    cells = [{"cell_type": "code", "source": ["print(1)"], "outputs": [], "metadata": {}}]
    notebook.write_text(json.dumps({"cells": cells}))
    step = reproduce.Step("notebook-00_x", lambda: None, 1.0, inputs=(notebook,))
    before = reproduce._step_version("code", step)
    cells[0]["outputs"] = [{"output_type": "stream", "text": "1"}]  # executing it: still fresh
    notebook.write_text(json.dumps({"cells": cells}))
    assert reproduce._step_version("code", step) == before
    cells[0]["source"] = ["print(2)"]  # editing it: stale
    notebook.write_text(json.dumps({"cells": cells}))
    assert reproduce._step_version("code", step) != before


def test_step_times_of_an_only_run_keep_the_earlier_ones(tmp_path, monkeypatch):
    """`--only` reruns some steps; the other steps' recorded times must not be lost."""
    monkeypatch.setenv("PKM_REF_FIGURES", str(tmp_path))
    steps = [reproduce.Step(name, lambda: None, 1.0) for name in ("a", "b")]
    reproduce._record_timings(steps, {"a": {"seconds": 1.5}, "b": {"seconds": 2.5}}, "smoke", "cpu")
    reproduce._record_timings(steps[1:], {"b": {"seconds": 3.0}}, "smoke", "cpu")
    rows = json.loads((tmp_path / "reproduce_steps.json").read_text())["rows"]
    assert rows == [{"step": "a", "seconds": 1.5}, {"step": "b", "seconds": 3.0}]


def test_executed_notebooks_keep_their_figures_under_a_headless_backend(tmp_path, monkeypatch):
    """MPLBACKEND=Agg (a headless GPU run) must not strip the figures from a notebook."""
    import nbformat

    monkeypatch.setenv("MPLBACKEND", "Agg")
    notebook = nbformat.v4.new_notebook()
    code = "import matplotlib.pyplot as plt\nplt.plot([0, 1])\nplt.show()"
    notebook.cells = [nbformat.v4.new_code_cell(code)]
    path = tmp_path / "figure.ipynb"
    nbformat.write(notebook, path)
    executed = nbformat.read(reproduce.execute_notebook(path, "smoke"), as_version=4)
    outputs = executed.cells[0].outputs
    assert any("image/png" in output.get("data", {}) for output in outputs)


def test_notebook_kernels_run_without_the_tcp_warning(tmp_path, capfd):
    """The kernel talks over IPC sockets: ipykernel's "Kernel is running over TCP without
    encryption" warning, printed on every notebook run before, is gone (the kernel writes to the
    stderr it inherits, which capfd captures)."""
    import nbformat

    code = "from ipykernel.kernelapp import IPKernelApp\nprint(IPKernelApp.instance().transport)"
    path = tmp_path / f"transport_{tmp_path.name}.ipynb"
    nbformat.write(nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(code)]), path)
    executed = nbformat.read(reproduce.execute_notebook(path, "smoke"), as_version=4)
    assert executed.cells[0].outputs[0]["text"] == "ipc\n"
    assert "TCP without encryption" not in capfd.readouterr().err


def test_a_failing_or_interrupted_step_ends_in_one_line(tmp_path, monkeypatch, capsys):
    """A step's error or Ctrl-C reaches reproduce's own command line: one line, exit code 2 or
    130, no traceback (a step used to end in a RuntimeError traceback)."""
    from pkm_ref import bench

    monkeypatch.setenv("PKM_REF_FIGURES", str(tmp_path / "figures"))
    argv = ["reproduce", "--profile", "smoke", "--runs", str(tmp_path), "--only", "bench-layer"]
    for error, code, line in (
        (ValueError("no memory left"), 2, "pkm-ref reproduce: error: no memory left\n"),
        (KeyboardInterrupt(), 130, "pkm-ref reproduce: interrupted: run the same command"),
    ):

        def fail(*args, error=error, **kwargs):
            raise error

        monkeypatch.setattr(bench, "run_bench", fail)
        assert main(argv) == code
        err = capsys.readouterr().err
        assert line in err and "Traceback" not in err
