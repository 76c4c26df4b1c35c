"""``pkm-ref reproduce``: rebuild every figure and table of the study with one command, and set
your numbers beside the committed reference.

For one runtime profile it runs, in order: the language-model comparison (``pkm-ref compare``),
the benchmarks (``pkm-ref bench retrieval|layer|model``), the knowledge-capacity study
(``pkm-ref capacity``), every notebook (executed top to bottom in a fresh kernel); then it writes
``RESULTS.md`` (``pkm_ref.report``) and ``vs_reference.md``, your numbers and verdicts beside
the committed reference's (``pkm_ref.reference``), and prints a summary of the latter.

* **Where.** Into ``results/<profile>/`` under the current folder (``--out`` picks another; git
  ignores ``results/``): result tables, figures, RESULTS.md, the comparison and the executed
  notebooks (``notebooks/``). No file that git tracks changes.
  ``--update-reference`` (for maintainers) writes the committed reference instead: ``figures/``
  (cpu) or ``figures/gpu/`` (gpu), the notebooks in place, and the README's generated blocks. At
  ``smoke``, which commits nothing, scratch folders stand in for the figures and notebooks.
* **Cost.** Each step runs in a child process of its own, so that the peak resident memory it
  reports (``ru_maxrss`` of the process and of the children it waited for: a notebook's kernel)
  is that step's alone, not what earlier steps left behind in one long-lived process.
  ``reproduce_steps.{md,json}`` records each step's time, peak RAM and, on CUDA, peak GPU memory
  (``torch.cuda.max_memory_allocated``; a notebook's is read from its kernel).
* **Resuming.** A step whose inputs (the package's code, its arguments such as corpus and device,
  and a notebook's own cells) have not changed since it last finished for this profile, and whose
  results are still in place, is skipped, unless ``--force``. The record lives in
  ``<runs>/<profile>/reproduce_state.json``; the language-model comparison keeps checkpoints and
  finished models under ``<runs>/<profile>/``, so an interrupted run resumes where it stopped.
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import json
import multiprocessing
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from pkm_ref import figures
from pkm_ref._files import atomic_write, check_writable
from pkm_ref.cli import CommandError, Interrupted, require_packages
from pkm_ref.profiles import (
    ENV_VAR,
    add_device_argument,
    add_profile_argument,
    by_profile,
    current_profile,
    profile_device,
)

# What running the notebooks needs beyond the study extra: from the dev extra (a test keeps
# these in it).
NOTEBOOK_PACKAGES = ("nbformat", "nbclient", "ipykernel", "ipywidgets")

PACKAGE_DIR = Path(__file__).resolve().parent
NOTEBOOKS_DIR = PACKAGE_DIR.parent / "notebooks"
STEPS = "reproduce_steps"


@dataclass(frozen=True)
class Step:
    """One unit of work: ``run`` does it; ``seconds`` estimates it for the progress display.

    ``run`` is a module-level function or a ``functools.partial`` of one, so that it can run in a
    child process; what it returns is the peak GPU memory it saw outside that process, in bytes
    (a notebook's kernel), or None.
    """

    name: str
    run: Callable[[], int | None]
    seconds: float
    inputs: tuple[Path, ...] = ()  # files besides the package code whose change reruns it
    arguments: tuple[str, ...] = ()  # its command line: another corpus or device reruns it
    outputs: tuple[Path, ...] = ()  # what it writes: a step whose results are gone reruns


class StepFailed(CommandError):
    """A step's child process ended with an error; the step printed its own message first."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_profile_argument(parser)
    add_device_argument(parser, "for training and benchmarks (notebooks: the profile's device): ")
    parser.add_argument("--corpus", default="sotu", help="corpus of the language-model comparison")
    parser.add_argument("--runs", default="runs", help="folder for checkpoints and the step record")
    parser.add_argument(
        "--out", type=Path, default=None,
        help="folder for your results (default: results/<profile> under the current folder)",
    )  # fmt: skip
    parser.add_argument(
        "--update-reference", action="store_true",
        help="maintainers: write the committed reference (figures/ or figures/gpu/, the notebooks "
        "in place, the README's generated blocks) instead of your results folder",
    )  # fmt: skip
    parser.add_argument("--force", action="store_true", help="redo steps that are up to date")
    parser.add_argument(
        "--only", nargs="+", default=None, metavar="STEP",
        help="run only these steps (names as listed by --list)",
    )  # fmt: skip
    parser.add_argument("--list", action="store_true", help="list the steps and exit")


def run(args: argparse.Namespace) -> int:
    profile = args.profile or current_profile()
    device = str(profile_device(profile, args.device))
    runs_dir = Path(args.runs) / profile
    out = _results_dir(profile, args.out, args.update_reference)

    steps = _steps(profile, device, args.corpus, runs_dir, out, args.update_reference)
    if args.list:
        for step in steps:
            print(f"{step.name:28s} ~{step.seconds / 60:.1f} min")
        return 0
    if args.only:
        unknown = sorted(set(args.only) - {s.name for s in steps})
        if unknown:
            names = ", ".join(s.name for s in steps)
            raise ValueError(f"unknown step(s) {unknown}; steps: {names}")
        steps = [s for s in steps if s.name in args.only]
    _check_corpus(args.corpus)
    check_writable(runs_dir, "choose another --runs")
    check_writable(out, "choose another --out")
    if any(s.name.startswith("notebook-") for s in steps):
        require_packages(NOTEBOOK_PACKAGES, "dev", "running the notebooks")
    out.mkdir(parents=True, exist_ok=True)

    state_path = runs_dir / "reproduce_state.json"
    state = json.loads(state_path.read_text()) if state_path.exists() else {}
    print(f"reproduce: profile {profile}, device {device}, results in {out}")
    with _reference_before(profile) as reference:
        try:  # the steps find the results folder here; notebook kernels inherit it too
            with _environment(**{figures.ENV_VAR: str(out)}):
                _run_steps(steps, state, state_path, force=args.force)
        except KeyboardInterrupt:
            raise Interrupted(
                "run the same command to continue: finished steps are skipped and an "
                "interrupted training resumes from its last checkpoint"
            ) from None
        _record_steps(steps, state, out, profile, device)
        from pkm_ref.reference import write_comparison
        from pkm_ref.report import refresh_readme, write_results

        print(f"results: {write_results(profile, out)}")
        if args.update_reference and profile != "smoke":
            refresh_readme(figures.reference_dir("cpu"))
            print(f"README.md: generated blocks refreshed from {out}")
        print(write_comparison(out, reference, figures.reference_dir(profile))[1])
    return 0


def _results_dir(profile: str, out: Path | None, update_reference: bool) -> Path:
    """``out``, else ``results/<profile>`` under the current folder; with ``update_reference``,
    the committed reference of ``profile`` (an absolute path: notebook kernels run elsewhere)."""
    if not update_reference:
        return (Path("results") / profile if out is None else Path(out)).resolve()
    if out is not None:
        raise ValueError("--update-reference writes the committed reference: leave out --out")
    reference = figures.reference_dir(profile)
    if reference is None:
        raise ValueError(
            f"--update-reference rewrites the committed results of a clone of the repository, "
            f"but pkm_ref runs from {PACKAGE_DIR}, which is not one; run it from a clone"
        )
    return reference


@contextmanager
def _reference_before(profile: str):
    """The committed reference of ``profile`` as it was before this run: a snapshot of its result
    files (``--update-reference`` is about to overwrite them), or None when there is none."""
    reference = figures.reference_dir(profile)
    if reference is None or not reference.exists():
        yield None
        return
    with tempfile.TemporaryDirectory(prefix="pkm_ref_reference_") as snapshot:
        for path in reference.glob("*.json"):
            shutil.copy2(path, snapshot)
        yield Path(snapshot)


def _steps(
    profile: str,
    device: str,
    corpus: str,
    runs_dir: Path,
    out: Path,
    update_reference: bool = False,
) -> list[Step]:
    """The study, in order. Every step goes through the same CLI a user would type; its results
    land in ``out`` (``$PKM_REF_FIGURES`` while the steps run)."""

    def command(name: str, argv: tuple[str, ...], seconds: float, result: str) -> Step:
        """A step that runs ``pkm-ref *argv`` and writes ``result`` into the results folder."""
        run = functools.partial(_run_command, argv)
        return Step(name, run, seconds, arguments=argv, outputs=(out / result,))

    common = ("--profile", profile, "--device", device)
    compare = ("compare", *common, "--corpus", corpus, "--runs", str(runs_dir.parent))
    steps = [
        command("lm-comparison", compare, by_profile(60, 720, 900, profile), "lm_comparison.json")
    ]
    benches = [("retrieval", 60), ("layer", 90), ("model", 40)]
    if profile != "cpu":  # at the paper's width a GPU measurement; `pkm-ref bench paper` runs
        benches.append(("paper", 60))  # a cpu rehearsal (d_model 256) in about two minutes
    for kind, seconds in benches:
        bench = ("bench", kind, *common)
        seconds = by_profile(20, seconds, 2 * seconds, profile)
        steps.append(command(f"bench-{kind}", bench, seconds, f"bench_{kind}.json"))
    capacity = ("capacity", *common, "--runs", str(runs_dir.parent))
    # cpu: about 10 minutes from its step counts (capacity.study_sizes), 12 with a margin, within
    # the 15; smoke: about 45 s on a loaded 2-core machine.
    seconds = by_profile(45, 720, 1200, profile)
    steps.append(command("capacity", capacity, seconds, "capacity.json"))
    from pkm_ref.report import FIGURES

    for notebook in sorted(NOTEBOOKS_DIR.glob("[0-9][0-9]_*.ipynb")):
        number = notebook.stem[:3]  # "04_": the prefix of the figures it writes
        pngs = tuple(out / f"{name}.png" for name in FIGURES if name.startswith(number))
        target = _executed_path(notebook, profile, out, update_reference)
        steps.append(
            Step(
                f"notebook-{notebook.stem}",
                functools.partial(execute_notebook, notebook, profile, target),
                by_profile(45, 180, 90, profile),
                inputs=(notebook,),
                outputs=(target, *pngs),
            )
        )
    return steps


def _run_command(argv: tuple[str, ...]) -> None:
    """``pkm-ref *argv`` in this (child) process; its exit status ends the process if not 0."""
    from pkm_ref.cli import main

    code = main(list(argv))
    if code:
        sys.exit(code)


def _run_steps(
    steps: list[Step],
    state: dict,
    state_path: Path,
    force: bool,
    run: Callable[[Step], dict] | None = None,
) -> None:
    """Run the steps that are not up to date, with one overall progress bar (time-weighted).

    ``run(step)`` runs one and returns its peak memory (default: ``_run_in_child``).
    """
    from tqdm import tqdm

    run = _run_in_child if run is None else run
    code = _code_version()
    total = sum(s.seconds for s in steps)
    with tqdm(total=round(total), unit="s", desc="reproduce", dynamic_ncols=True) as bar:
        for index, step in enumerate(steps, 1):
            version = _step_version(code, step)
            bar.set_postfix_str(f"step {index}/{len(steps)}: {step.name}")
            in_place = all(path.exists() for path in step.outputs)
            if not force and in_place and state.get(step.name, {}).get("version") == version:
                bar.write(f"[{index}/{len(steps)}] {step.name}: up to date, skipped")
            else:
                bar.write(f"[{index}/{len(steps)}] {step.name} ...")
                start = time.perf_counter()
                peaks = run(step)
                seconds = time.perf_counter() - start
                bar.write(f"[{index}/{len(steps)}] {step.name}: {seconds:.0f} s, "
                          f"{_describe(peaks)}")  # fmt: skip
                state[step.name] = {"version": version, "seconds": round(seconds, 1), **peaks}
                atomic_write(
                    state_path, lambda tmp: tmp.write_text(json.dumps(state, indent=2) + "\n")
                )
            bar.update(round(step.seconds))


def _run_in_child(step: Step) -> dict:
    """Run ``step`` in a fresh child process; its peak memory (``_peak_memory``).

    Raises StepFailed when the child fails (it has printed its message), KeyboardInterrupt when
    it was interrupted.
    """
    context = multiprocessing.get_context("spawn")  # a fresh interpreter: nothing inherited
    receiver, sender = context.Pipe(duplex=False)
    process = context.Process(target=_child, args=(step.run, sender), name=step.name)
    process.start()
    sender.close()  # the child holds the only sending end: its exit ends the receive below
    try:
        peaks = receiver.recv()
    except EOFError:  # the child ended without reporting
        peaks = None
    except BaseException:  # Ctrl-C here: the child, which got it too, has a moment to say so
        process.join(timeout=10)
        process.terminate()
        raise
    process.join()
    if process.exitcode == 130:  # the step's own Ctrl-C message is printed
        raise KeyboardInterrupt
    if process.exitcode != 0 or peaks is None:
        raise StepFailed(
            f"step {step.name} failed (exit status {process.exitcode}); its message is above"
        )
    return peaks


def _child(run: Callable[[], int | None], connection) -> None:
    """A step's child process: run it, then send back its peak memory."""
    try:
        outside_gpu_bytes = run()
    except KeyboardInterrupt:  # Ctrl-C reaches the parent too, which says how to resume
        sys.exit(130)
    connection.send(_peak_memory(outside_gpu_bytes))


def _peak_memory(outside_gpu_bytes: int | None = None) -> dict:
    """Peak resident memory of this process and of every child it waited for (a notebook's
    kernel), and peak GPU memory allocated by torch here or outside (``outside_gpu_bytes``), in
    GiB; None where not measured (no ``resource`` module on Windows; no CUDA)."""
    ram = None
    try:
        import resource
    except ImportError:  # Windows
        pass
    else:
        usage = max(resource.getrusage(who).ru_maxrss
                    for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN))  # fmt: skip
        ram = usage * (1 if sys.platform == "darwin" else 1024)  # macOS: bytes; Linux: KiB
    gpu = [outside_gpu_bytes] if outside_gpu_bytes else []
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_initialized():
        gpu.append(torch.cuda.max_memory_allocated())
    return {
        "peak_ram_gib": None if ram is None else round(ram / 2**30, 2),
        "peak_gpu_gib": round(max(gpu) / 2**30, 2) if gpu else None,
    }


def _describe(peaks: dict) -> str:
    parts = [f"peak {label} {peaks[key]:.1f} GiB"
             for key, label in (("peak_ram_gib", "RAM"), ("peak_gpu_gib", "GPU memory"))
             if peaks.get(key) is not None]  # fmt: skip
    return ", ".join(parts) or "memory not measured"


def _record_steps(steps: list[Step], state: dict, folder: Path, profile: str, device: str) -> None:
    """Write each step's time and peak memory (the README quotes them). Steps that this run left
    out (``--only``) keep what an earlier run recorded in ``folder``."""
    from pkm_ref.figures import load_results, save_results

    columns = ("seconds", "peak_ram_gib", "peak_gpu_gib")
    earlier = load_results(STEPS, folder)
    rows = {row["step"]: row for row in (earlier["rows"] if earlier else [])}
    for step in steps:
        recorded = state.get(step.name, {})
        rows[step.name] = {"step": step.name, **{c: recorded.get(c) for c in columns}}
    notes = (
        "Each step ran in a child process of its own: peak RAM is the largest resident set of "
        "that process and of the processes it waited for (a notebook's kernel), in GiB; peak GPU "
        "memory is torch.cuda.max_memory_allocated of the step (a notebook's: of its kernel). "
        "The reproduce process itself holds a few hundred MB more. Time includes starting the "
        "child (importing torch)."
    )
    save_results(STEPS, list(rows.values()), profile, device, folder=folder,
                 title="Time and peak memory per reproduce step", notes=notes)  # fmt: skip


_INLINE_BACKEND = "module://matplotlib_inline.backend_inline"
# Run after a notebook's last cell, in its kernel: the GPU memory the notebook used at most.
_GPU_PEAK_PROBE = (
    "import sys\n"
    "_torch = sys.modules.get('torch')\n"
    "print(_torch.cuda.max_memory_allocated() "
    "if _torch is not None and _torch.cuda.is_initialized() else 0)"
)


def execute_notebook(path: Path, profile: str, target: Path) -> int:
    """Run ``path`` top to bottom in a fresh kernel with ``PKM_REF_PROFILE=profile`` and write the
    executed notebook to ``target``, its exercises' solution cells without their outputs. Returns
    the peak GPU memory of the kernel in bytes (0 without CUDA).

    The kernel runs in the folder of ``path`` (the notebooks' relative paths hold), and writes
    its figures to ``pkm_ref.figures.output_dir``, which ``$PKM_REF_FIGURES`` sets.
    """
    import nbformat
    from nbclient import NotebookClient

    notebook = nbformat.read(path, as_version=4)
    probe = nbformat.v4.new_code_cell(_GPU_PEAK_PROBE)
    notebook.cells.append(probe)
    # The inline backend, whatever the caller's MPLBACKEND: a headless run with MPLBACKEND=Agg
    # would otherwise commit a notebook whose plt.show() cells have no figure.
    with (
        _environment(**{ENV_VAR: profile, "MPLBACKEND": _INLINE_BACKEND}),
        _kernel_config() as config,
    ):
        client = NotebookClient(
            notebook,
            timeout=by_profile(300, 1800, 1800, profile),
            kernel_name="python3",
            resources={"metadata": {"path": str(path.parent)}},
            config=config,
        )
        # nbclient plays a frontend for ipywidgets' Output widget: while a cell runs it sends the
        # widget's outputs back to the kernel on the shell channel, which ipykernel 7 handles
        # beside the cell, and now and then the cell's reply never came: the run hung in a widget
        # cell until the cell's time limit (jupyter/nbclient#312; notebook 06, three times in a
        # few runs). Without a frontend nothing moves the widgets: their outputs land in the cell.
        client.comm_open_handlers = {"jupyter.widget": lambda msg: None}
        client.execute()
    notebook.cells.pop()  # the probe is not part of the notebook
    printed = "".join(output.get("text", "") for output in probe.outputs).strip()
    _clear_solutions(notebook)
    target.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(target, lambda tmp: tmp.write_text(nbformat.writes(notebook) + "\n"))
    return int(printed or 0)


def _clear_solutions(notebook) -> None:
    """Keep the solution cells of the exercises (tagged ``pkm_ref.notebook.SOLUTION_TAG``) without
    their outputs: they ran, so every solution works, but a reader sees an answer only by choosing
    to show the cell and run it."""
    from pkm_ref.notebook import SOLUTION_TAG

    for cell in notebook.cells:
        if SOLUTION_TAG in cell.get("metadata", {}).get("tags", []):
            cell.outputs, cell.execution_count = [], None


@contextmanager
def _kernel_config():
    """Configuration for ``nbclient.NotebookClient(config=...)``: the kernel talks over Unix
    sockets in a private temporary folder (IPC transport), so ipykernel has no reason to warn
    "Kernel is running over TCP without encryption" on every run. Windows has no IPC transport:
    there the default (TCP on localhost) stays."""
    from traitlets.config import Config

    if sys.platform == "win32":
        yield Config()
        return
    with tempfile.TemporaryDirectory(prefix="pkm_ref_kernel_") as sockets:
        # Socket paths are limited to about 100 characters: keep the folder's name short.
        yield Config({"KernelManager": {"transport": "ipc", "ip": str(Path(sockets) / "k")}})


def _executed_path(path: Path, profile: str, out: Path, update_reference: bool) -> Path:
    """Where ``path`` goes once executed: ``<out>/notebooks/``; with ``update_reference``, in
    place (smoke: a scratch folder stands in for ``notebooks/``)."""
    if not update_reference:
        return out / "notebooks" / path.name
    if profile == "smoke":
        return Path(tempfile.gettempdir()) / "pkm_ref_smoke_notebooks" / path.name
    return path


def _code_version() -> str:
    """A hash of the package's code: results computed by other code are stale."""
    digest = hashlib.sha256()
    for source in sorted(PACKAGE_DIR.glob("*.py")):
        digest.update(source.name.encode() + source.read_bytes())
    return digest.hexdigest()[:16]


def _step_version(code: str, step: Step) -> str:
    digest = hashlib.sha256(code.encode())
    digest.update("\0".join(step.arguments).encode())
    for path in step.inputs:
        digest.update(_notebook_sources(path).encode())
    return digest.hexdigest()[:16]


def _notebook_sources(path: Path) -> str:
    """A notebook's cell sources only: executing it (new outputs) must not make it stale."""
    cells = json.loads(path.read_text())["cells"]
    return "\n".join("".join(cell["source"]) for cell in cells)


def _check_corpus(corpus: str) -> None:
    """Fail now, not after an hour, if the corpus cannot be loaded on this machine."""
    from pkm_ref.data import CorpusUnavailableError, load_corpus

    try:
        load_corpus(corpus, max_chars=10_000)
    except CorpusUnavailableError as error:
        raise ValueError(str(error)) from None


@contextmanager
def _environment(**variables: str):
    """Set environment variables for the block (notebook kernels inherit them)."""
    saved = {name: os.environ.get(name) for name in variables}
    os.environ.update(variables)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
