"""`pkm-ref reproduce`: bad input fails at once with a message; steps are listed and skipped;
each step's time and peak memory are its own; your results never touch tracked files."""

import functools
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import pkm_ref.data
from pkm_ref import figures, reproduce
from pkm_ref.cli import main

ROOT = Path(__file__).resolve().parent.parent


def here(step: reproduce.Step) -> dict:
    """Run a step in this process (the tests' lambdas cannot go to a child); no memory figures."""
    step.run()
    return {}


def test_lists_every_step_in_order(capsys):
    assert main(["reproduce", "--profile", "smoke", "--list"]) == 0
    names = [line.split()[0] for line in capsys.readouterr().out.splitlines()]
    assert names[0] == "lm-comparison"
    assert names[1:6] == [
        "bench-retrieval",
        "bench-layer",
        "bench-model",
        "bench-paper",
        "capacity",
    ]
    notebooks = sorted(p.stem for p in reproduce.NOTEBOOKS_DIR.glob("[0-9][0-9]_*.ipynb"))
    assert names[6:] == [f"notebook-{n}" for n in notebooks]
    # The paper-width comparison is a GPU measurement: the cpu study leaves it out.
    assert main(["reproduce", "--profile", "cpu", "--list"]) == 0
    assert "bench-paper" not in capsys.readouterr().out


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
    reproduce._run_steps(steps, state, state_path, force=False, run=here)
    reproduce._run_steps(steps, state, state_path, force=False, run=here)
    assert calls == ["a"]
    assert json.loads(state_path.read_text())["a"]["version"] == state["a"]["version"]
    reproduce._run_steps(steps, state, state_path, force=True, run=here)
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
        reproduce._run_steps([step(corpus)], state, state_path, force=False, run=here)
    assert calls == ["sotu", "shakespeare-plays"]
    result.unlink()
    reproduce._run_steps([step("shakespeare-plays")], state, state_path, force=False, run=here)
    assert calls == ["sotu", "shakespeare-plays", "shakespeare-plays"] and result.exists()


def test_a_notebook_step_owns_the_figures_it_writes(tmp_path):
    """A notebook whose figures are missing from the figures folder (a new PKM_REF_FIGURES, a
    deleted PNG) reruns, although the executed notebook itself is still in place."""
    figures_dir = tmp_path / "figures"
    steps = {s.name: s for s in reproduce._steps("cpu", "cpu", "sotu", tmp_path, figures_dir)}
    outputs = steps["notebook-04_multihead_memory_gpu"].outputs
    assert outputs[0] == figures_dir / "notebooks" / "04_multihead_memory_gpu.ipynb"
    assert figures_dir / "04_layer_scaling.png" in outputs
    assert all(p.name.startswith("04_") for p in outputs[1:]) and len(outputs) == 5


def test_update_reference_writes_the_committed_files():
    """--update-reference: the cpu results go to figures/, the gpu ones to figures/gpu/, and the
    notebooks are executed in place; without it, nothing lands in the repository."""
    assert reproduce._results_dir("cpu", None, True) == figures.CHECKOUT / "figures"
    assert reproduce._results_dir("gpu", None, True) == figures.CHECKOUT / "figures" / "gpu"
    assert reproduce._results_dir("cpu", None, False) == Path("results", "cpu").resolve()
    with pytest.raises(ValueError, match="leave out --out"):
        reproduce._results_dir("cpu", Path("elsewhere"), True)
    out = figures.CHECKOUT / "figures"
    steps = {s.name: s for s in reproduce._steps("cpu", "cpu", "sotu", Path("runs"), out, True)}
    notebook = reproduce.NOTEBOOKS_DIR / "05_train_pkm_lm.ipynb"
    assert steps["notebook-05_train_pkm_lm"].outputs[0] == notebook
    assert steps["lm-comparison"].outputs == (out / "lm_comparison.json",)


def test_a_failed_step_is_not_recorded(tmp_path):
    def fail():
        raise RuntimeError("boom")

    state_path = tmp_path / "state.json"
    with pytest.raises(RuntimeError, match="boom"):
        reproduce._run_steps([reproduce.Step("bad", fail, 1.0)], {}, state_path, False, here)
    assert not state_path.exists()


def allocate(mib: int) -> None:
    """A step that holds ``mib`` MiB for a moment (module-level: it runs in a child process)."""
    block = bytearray(mib * 2**20)  # zero-filled: every page resident
    assert len(block) == mib * 2**20


def test_each_step_reports_its_own_peak_memory():
    """Steps run in child processes: a step's peak is its own, not what earlier steps left. (A
    child's peak before its step varies, up to about 1.3 GiB in a full test session, with what
    starting the child imports: the step holds 2 GiB to stand clear of that.)"""
    small = reproduce._run_in_child(reproduce.Step("small", functools.partial(allocate, 0), 1.0))
    large = reproduce._run_in_child(reproduce.Step("large", functools.partial(allocate, 2048), 1.0))
    again = reproduce._run_in_child(reproduce.Step("again", functools.partial(allocate, 0), 1.0))
    assert large["peak_ram_gib"] >= max(small["peak_ram_gib"] + 0.7, 2.0)  # the 2 GiB it held
    assert again["peak_ram_gib"] <= large["peak_ram_gib"] - 0.7  # not what the step before held
    assert large["peak_gpu_gib"] is None  # no CUDA used


def test_a_notebook_step_counts_its_kernels_memory(tmp_path):
    import nbformat

    notebook = nbformat.v4.new_notebook()
    notebook.cells = [nbformat.v4.new_code_cell("block = bytearray(2**30)")]  # 1 GiB, resident
    path = tmp_path / "big.ipynb"
    nbformat.write(notebook, path)
    run = functools.partial(reproduce.execute_notebook, path, "smoke", tmp_path / "done.ipynb")
    peaks = reproduce._run_in_child(reproduce.Step("notebook-big", run, 1.0))
    assert peaks["peak_ram_gib"] >= 1.0  # the kernel's, not only its parent's


def test_a_failing_step_stops_the_run_with_its_name(tmp_path):
    run = functools.partial(reproduce._run_command, ("bench", "retrieval", "--repeat", "0"))
    with pytest.raises(reproduce.StepFailed, match="bench-x failed"):
        reproduce._run_in_child(reproduce.Step("bench-x", run, 1.0))


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


def test_step_records_of_an_only_run_keep_the_earlier_ones(tmp_path):
    """`--only` reruns some steps; the other steps' recorded times and memory must not be lost."""
    steps = [reproduce.Step(name, lambda: None, 1.0) for name in ("a", "b")]
    first = {"a": {"seconds": 1.5, "peak_ram_gib": 0.5}, "b": {"seconds": 2.5}}
    reproduce._record_steps(steps, first, tmp_path, "smoke", "cpu")
    second = {"b": {"seconds": 3.0, "peak_ram_gib": 6.8, "peak_gpu_gib": 1.25}}
    reproduce._record_steps(steps[1:], second, tmp_path, "smoke", "cpu")
    rows = json.loads((tmp_path / "reproduce_steps.json").read_text())["rows"]
    assert rows == [
        {"step": "a", "seconds": 1.5, "peak_ram_gib": 0.5, "peak_gpu_gib": None},
        {"step": "b", "seconds": 3.0, "peak_ram_gib": 6.8, "peak_gpu_gib": 1.25},
    ]
    assert "child process" in (tmp_path / "reproduce_steps.md").read_text()


def test_executed_notebooks_keep_their_figures_under_a_headless_backend(tmp_path, monkeypatch):
    """MPLBACKEND=Agg (a headless GPU run) must not strip the figures from a notebook."""
    import nbformat

    monkeypatch.setenv("MPLBACKEND", "Agg")
    notebook = nbformat.v4.new_notebook()
    code = "import matplotlib.pyplot as plt\nplt.plot([0, 1])\nplt.show()"
    notebook.cells = [nbformat.v4.new_code_cell(code)]
    path = tmp_path / "figure.ipynb"
    nbformat.write(notebook, path)
    gpu_bytes = reproduce.execute_notebook(path, "smoke", tmp_path / "executed.ipynb")
    executed = nbformat.read(tmp_path / "executed.ipynb", as_version=4)
    assert len(executed.cells) == 1 and gpu_bytes == 0  # the GPU probe is not kept; no CUDA
    outputs = executed.cells[0].outputs
    assert any("image/png" in output.get("data", {}) for output in outputs)


def test_solution_cells_are_committed_without_their_outputs(tmp_path):
    """An exercise's solution runs with the notebook (so it works), but its answer stays hidden
    until the reader shows and runs the cell; every other cell keeps its output."""
    import nbformat

    from pkm_ref.notebook import SOLUTION_TAG

    lesson = nbformat.v4.new_code_cell("print('lesson')")
    solution = nbformat.v4.new_code_cell("print('answer')", metadata={"tags": [SOLUTION_TAG]})
    path = tmp_path / "solutions.ipynb"
    nbformat.write(nbformat.v4.new_notebook(cells=[lesson, solution]), path)
    reproduce.execute_notebook(path, "smoke", tmp_path / "executed.ipynb")
    executed = nbformat.read(tmp_path / "executed.ipynb", as_version=4)
    assert executed.cells[0].outputs[0]["text"] == "lesson\n"
    assert executed.cells[1].outputs == [] and executed.cells[1].execution_count is None


def test_notebook_kernels_run_without_the_tcp_warning(tmp_path, capfd):
    """The kernel talks over IPC sockets: ipykernel's "Kernel is running over TCP without
    encryption" warning, printed on every notebook run before, is gone (the kernel writes to the
    stderr it inherits, which capfd captures)."""
    import nbformat

    code = "from ipykernel.kernelapp import IPKernelApp\nprint(IPKernelApp.instance().transport)"
    path = tmp_path / f"transport_{tmp_path.name}.ipynb"
    nbformat.write(nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(code)]), path)
    reproduce.execute_notebook(path, "smoke", tmp_path / "executed.ipynb")
    executed = nbformat.read(tmp_path / "executed.ipynb", as_version=4)
    assert executed.cells[0].outputs[0]["text"] == "ipc\n"
    assert "TCP without encryption" not in capfd.readouterr().err


def failing_bench(*args, **kwargs) -> list[reproduce.Step]:
    """In place of reproduce's steps: one whose command refuses its arguments."""
    run = functools.partial(reproduce._run_command, ("bench", "layer", "--repeat", "0"))
    return [reproduce.Step("bench-layer", run, 1.0)]


def test_a_failing_or_interrupted_step_ends_in_one_line(tmp_path, monkeypatch, capfd):
    """A step's error or Ctrl-C reaches reproduce's own command line: one line, exit code 2 or
    130, no traceback (a step used to end in a RuntimeError traceback). The step, in its child
    process, prints its own line first."""
    argv = ["reproduce", "--profile", "smoke", "--runs", str(tmp_path), "--out", str(tmp_path)]
    monkeypatch.setattr(reproduce, "_steps", failing_bench)
    assert main(argv) == 2
    err = capfd.readouterr().err
    assert "pkm-ref bench: error: --repeat must be >= 1, got 0" in err
    assert "pkm-ref reproduce: error: step bench-layer failed (exit status 2)" in err
    assert "Traceback" not in err

    def interrupted(step):
        raise KeyboardInterrupt

    monkeypatch.setattr(reproduce, "_run_in_child", interrupted)
    assert main(argv) == 130
    err = capfd.readouterr().err
    assert "pkm-ref reproduce: interrupted: run the same command" in err and "Traceback" not in err


def _copy_of_the_repository(target: Path) -> Path:
    """The working tree as a fresh git repository: every file git tracks or would track, as it
    is now (uncommitted changes included), committed there."""
    files = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT, capture_output=True, check=True,
    ).stdout.split(b"\0")  # fmt: skip
    for name in filter(None, files):
        source = ROOT / name.decode()
        if source.is_file():  # a deleted file is still in the index
            (target / name.decode()).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target / name.decode())
    git = ["git", "-c", "user.name=test", "-c", "user.email=test@example.com"]
    for command in (["init", "-q"], ["add", "-A"], ["commit", "-q", "-m", "copy"]):
        subprocess.run([*git, *command], cwd=target, check=True, capture_output=True)
    return target


@pytest.mark.skipif(
    shutil.which("git") is None or not (ROOT / ".git").exists(),
    reason="copies the repository with git",
)
def test_a_users_reproduce_leaves_tracked_files_alone_and_compares_with_the_reference(tmp_path):
    """From a copy of the repository, as a user runs it: first a maintainer's --update-reference
    (at smoke, scratch folders stand in for figures/ and notebooks/), then a plain reproduce,
    whose results land in results/smoke/ with a comparison against that reference; git sees no
    change at all."""
    clone = _copy_of_the_repository(tmp_path / "clone")
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    env = {**os.environ, "PYTHONPATH": str(clone), "TMPDIR": str(scratch)}
    env["PKM_REF_PROFILE"] = "smoke"
    env.pop(figures.ENV_VAR, None)
    command = [sys.executable, "-m", "pkm_ref", "reproduce", "--profile", "smoke",
               "--runs", str(tmp_path / "runs"),
               "--only", "lm-comparison", "bench-model", "notebook-00_overview"]  # fmt: skip

    def reproduce_in_clone(*extra: str) -> str:
        done = subprocess.run([*command, *extra], cwd=clone, env=env, text=True,
                              capture_output=True)  # fmt: skip
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
        return done.stdout

    reproduce_in_clone("--update-reference")
    reference = scratch / "pkm_ref_smoke_figures"
    for name in ("lm_comparison.json", "bench_model.json", "00_cost_per_token.png", "RESULTS.md"):
        assert (reference / name).exists(), name
    assert (scratch / "pkm_ref_smoke_notebooks" / "00_overview.ipynb").exists()

    printed = reproduce_in_clone()
    results = clone / "results" / "smoke"
    for name in ("lm_comparison.json", "bench_model.json", "00_cost_per_token.png", "RESULTS.md",
                 "notebooks/00_overview.ipynb", "reproduce_steps.json"):  # fmt: skip
        assert (results / name).exists(), name
    comparison = (results / "vs_reference.md").read_text()
    assert "| dense-2L | test_bpb |" in comparison  # your number beside the reference's
    assert "| dense, 4 layers | tokens_per_s |" in comparison
    assert "| verdict | yours | reference | |" in comparison
    assert "your run vs the reference" in printed and "vs_reference.md" in printed
    steps = json.loads((results / "reproduce_steps.json").read_text())["rows"]
    assert [row["step"] for row in steps] == command[-3:]  # the --only steps
    assert all(row["seconds"] > 0 and row["peak_ram_gib"] > 0 for row in steps)
    status = subprocess.run(["git", "status", "--porcelain"], cwd=clone, capture_output=True,
                            text=True, check=True).stdout  # fmt: skip
    assert status == "", status


def test_a_notebook_runs_headless_without_playing_the_widgets_frontend(tmp_path):
    """nbclient would answer an Output widget over the kernel's shell channel while the cell runs
    (the cause of runs that hung in a widget cell, jupyter/nbclient#312); the executor leaves the
    widgets alone, so what a widget shows lands in the cell itself."""
    import nbformat

    code = (
        "import ipywidgets\nfrom IPython.display import display\nout = ipywidgets.Output()\n"
        "display(out)\nwith out:\n    print('inside the widget')"
    )
    path = tmp_path / "widget.ipynb"
    nbformat.write(nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(code)]), path)
    reproduce.execute_notebook(path, "smoke", tmp_path / "executed.ipynb")
    outputs = nbformat.read(tmp_path / "executed.ipynb", as_version=4).cells[0].outputs
    assert any("inside the widget" in output.get("text", "") for output in outputs)
