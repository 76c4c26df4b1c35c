"""``pkm-ref reproduce``: rebuild every figure and table of the study with one command.

For one runtime profile it runs, in order: the language-model comparison (``pkm-ref compare``),
the benchmarks (``pkm-ref bench retrieval|layer|model``), every notebook (executed top to bottom
in a fresh kernel), and finally writes ``figures/RESULTS.md`` (``pkm_ref.report``).

* ``cpu`` and ``gpu`` execute the notebooks in place, so the committed notebooks carry this run's
  outputs; ``smoke`` executes copies in a scratch folder and never touches committed notebooks or
  figures (``pkm_ref.figures`` sends smoke results to scratch as well).
* A step whose inputs (the package's code, its arguments such as corpus and device, and a
  notebook's own cells) have not changed since it last finished for this profile, and whose
  results are still in place, is skipped, unless ``--force``. The record lives in
  ``<runs>/<profile>/reproduce_state.json``; the language-model comparison keeps checkpoints and
  finished models under ``<runs>/<profile>/``, so an interrupted run resumes where it stopped.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import tempfile
import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from pkm_ref._files import atomic_write, check_writable
from pkm_ref.cli import CommandError, Interrupted, dispatch, require_packages
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


@dataclass(frozen=True)
class Step:
    """One unit of work: ``run`` does it; ``seconds`` estimates it for the progress display."""

    name: str
    run: Callable[[], None]
    seconds: float
    inputs: tuple[Path, ...] = ()  # files besides the package code whose change reruns it
    arguments: tuple[str, ...] = ()  # its command line: another corpus or device reruns it
    outputs: tuple[Path, ...] = ()  # what it writes: a step whose results are gone reruns


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_profile_argument(parser)
    add_device_argument(parser, "for training and benchmarks (notebooks: the profile's device): ")
    parser.add_argument("--corpus", default="sotu", help="corpus of the language-model comparison")
    parser.add_argument("--runs", default="runs", help="folder for checkpoints and the step record")
    parser.add_argument("--force", action="store_true", help="redo steps that are up to date")
    parser.add_argument(
        "--only", nargs="+", default=None, metavar="STEP",
        help="run only these steps (names as listed by --list)",
    )  # fmt: skip
    parser.add_argument("--list", action="store_true", help="list the steps and exit")


def run(args: argparse.Namespace) -> int:
    profile = args.profile or current_profile()
    device = str(profile_device(profile, args.device))
    _check_corpus(args.corpus)
    runs_dir = check_writable(Path(args.runs) / profile, "choose another --runs")
    figures_dir = _figures_dir(profile)

    steps = _steps(profile, device, args.corpus, runs_dir, figures_dir)
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
    if any(s.name.startswith("notebook-") for s in steps):
        require_packages(NOTEBOOK_PACKAGES, "dev", "running the notebooks")

    state_path = runs_dir / "reproduce_state.json"
    state = json.loads(state_path.read_text()) if state_path.exists() else {}
    print(f"reproduce: profile {profile}, device {device}, results in {figures_dir}")
    try:
        _run_steps(steps, state, state_path, force=args.force)
    except KeyboardInterrupt:
        raise Interrupted(
            "run the same command to continue: finished steps are skipped and an interrupted "
            "training resumes from its last checkpoint"
        ) from None
    _record_timings(steps, state, profile, device)
    from pkm_ref.report import write_results

    print(f"done: see {write_results(profile)}")
    return 0


def _steps(profile: str, device: str, corpus: str, runs_dir: Path, figures_dir: Path) -> list[Step]:
    """The study, in order. Every step goes through the same CLI a user would type."""

    def command(name: str, argv: tuple[str, ...], seconds: float, result: str) -> Step:
        """A step that runs ``pkm-ref *argv`` and writes ``result`` into the figures folder; its
        errors and Ctrl-C reach reproduce's own command line."""

        def run_command() -> None:
            if dispatch(list(argv)) != 0:
                raise CommandError(f"`pkm-ref {' '.join(argv)}` failed")

        return Step(name, run_command, seconds, arguments=argv, outputs=(figures_dir / result,))

    common = ("--profile", profile, "--device", device)
    compare = ("compare", *common, "--corpus", corpus, "--runs", str(runs_dir.parent))
    steps = [
        command("lm-comparison", compare, by_profile(60, 900, 480, profile), "lm_comparison.json")
    ]
    for kind in ("retrieval", "layer", "model"):
        bench = ("bench", kind, *common)
        seconds = by_profile(30, 240, 120, profile)
        steps.append(command(f"bench-{kind}", bench, seconds, f"bench_{kind}.json"))
    from pkm_ref.report import FIGURES

    for notebook in sorted(NOTEBOOKS_DIR.glob("[0-9][0-9]_*.ipynb")):
        number = notebook.stem[:3]  # "04_": the prefix of the figures it writes
        pngs = tuple(figures_dir / f"{name}.png" for name in FIGURES if name.startswith(number))
        steps.append(
            Step(
                f"notebook-{notebook.stem}",
                lambda nb=notebook: execute_notebook(nb, profile),
                by_profile(45, 180, 90, profile),
                inputs=(notebook,),
                outputs=(_executed_path(notebook, profile), *pngs),
            )
        )
    return steps


def _run_steps(steps: list[Step], state: dict, state_path: Path, force: bool) -> None:
    """Run the steps that are not up to date, with one overall progress bar (time-weighted)."""
    from tqdm import tqdm

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
                step.run()
                seconds = time.perf_counter() - start
                bar.write(f"[{index}/{len(steps)}] {step.name}: {seconds:.0f} s")
                state[step.name] = {"version": version, "seconds": round(seconds, 1)}
                atomic_write(
                    state_path, lambda tmp: tmp.write_text(json.dumps(state, indent=2) + "\n")
                )
            bar.update(round(step.seconds))


def _record_timings(steps: list[Step], state: dict, profile: str, device: str) -> None:
    """Write how long each step took (the README's notebook table quotes these). Steps that this
    run left out (``--only``) keep the time recorded by an earlier run."""
    from pkm_ref.figures import load_results, save_results

    try:
        earlier = {
            row["step"]: row["seconds"] for row in load_results("reproduce_steps", profile)["rows"]
        }
    except FileNotFoundError:
        earlier = {}
    seconds = {**earlier, **{s.name: state.get(s.name, {}).get("seconds") for s in steps}}
    rows = [{"step": name, "seconds": value} for name, value in seconds.items()]
    save_results("reproduce_steps", rows, profile, device, title="Time per reproduce step")


_INLINE_BACKEND = "module://matplotlib_inline.backend_inline"


def execute_notebook(path: Path, profile: str) -> Path:
    """Run ``path`` top to bottom in a fresh kernel with ``PKM_REF_PROFILE=profile``.

    ``cpu``/``gpu``: the executed notebook replaces ``path``. ``smoke``: it is written to a scratch
    copy, and the committed notebook is left alone. Returns the written path.
    """
    import nbformat
    from nbclient import NotebookClient

    notebook = nbformat.read(path, as_version=4)
    # The inline backend, whatever the caller's MPLBACKEND: a headless run with MPLBACKEND=Agg
    # would otherwise commit a notebook whose plt.show() cells have no figure.
    with (
        _environment(**{ENV_VAR: profile, "MPLBACKEND": _INLINE_BACKEND}),
        _kernel_config() as config,
    ):
        NotebookClient(
            notebook,
            timeout=by_profile(300, 1800, 1800, profile),
            kernel_name="python3",
            resources={"metadata": {"path": str(path.parent)}},
            config=config,
        ).execute()
    target = _executed_path(path, profile)
    target.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(target, lambda tmp: tmp.write_text(nbformat.writes(notebook) + "\n"))
    return target


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


def _executed_path(path: Path, profile: str) -> Path:
    """Where ``execute_notebook`` writes ``path``: in place, or a scratch copy at smoke."""
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


def _figures_dir(profile: str) -> Path:
    from pkm_ref.figures import output_dir

    return output_dir(profile)


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
