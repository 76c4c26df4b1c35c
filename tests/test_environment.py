"""environment.yml (conda) and pyproject.toml (pip) name the same dependencies."""

import re
from pathlib import Path

import pytest
import tomllib

ROOT = Path(__file__).resolve().parent.parent
# conda-forge spells a few packages differently from PyPI.
CONDA_NAMES = {"torch": "pytorch"}


def _name(requirement: str) -> str:
    return re.split(r"[<>=!~\[ ;@]", requirement.strip(), maxsplit=1)[0].lower().replace("_", "-")


def _project() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def _pyproject_names() -> set[str]:
    """Every requirement of the package and of all its extras (the conda environment has all)."""
    project = _project()
    extras = project["optional-dependencies"].values()
    requirements = project["dependencies"] + [r for extra in extras for r in extra]
    names = {CONDA_NAMES.get(_name(r), _name(r)) for r in requirements}
    return names - {"pkm-ref"}  # an extra that includes another one, e.g. pkm_ref[study]


def _environment_names() -> set[str]:
    text = (ROOT / "environment.yml").read_text()
    names = set()
    for line in text.split("dependencies:", 1)[1].splitlines():
        stripped = line.split("#")[0].strip()
        if stripped.startswith("- ") and not stripped.startswith(("- -e", "- pip:")):
            names.add(_name(stripped[2:]))
    return names - {"python", "pip"}


def test_environment_matches_pyproject():
    in_pyproject, in_environment = _pyproject_names(), _environment_names()
    assert in_pyproject - in_environment == set(), "missing from environment.yml"
    assert in_environment - in_pyproject == set(), "missing from pyproject.toml"


def test_torch_is_a_loose_lower_bound():
    """Never a pin: installing pkm_ref must not replace Colab's (or the user's) torch."""
    project = _project()
    torch_requirement = next(r for r in project["dependencies"] if _name(r) == "torch")
    assert torch_requirement.replace(" ", "").startswith("torch>=")
    assert "<" not in torch_requirement and "==" not in torch_requirement


def test_the_layers_need_torch_alone():
    """``pip install pkm_ref`` brings torch only; the study's packages are the ``study`` extra."""
    project = _project()
    assert [_name(r) for r in project["dependencies"]] == ["torch"]
    assert "pkm_ref[study]" in project["optional-dependencies"]["dev"]


def test_the_command_names_the_study_extra(monkeypatch, capsys):
    """``pkm-ref`` tells a user who installed the layers alone which extra it needs."""
    from pkm_ref import cli

    study = {_name(r) for r in _project()["optional-dependencies"]["study"]}
    assert set(cli.STUDY_PACKAGES) == study
    monkeypatch.setattr(cli, "STUDY_PACKAGES", (*cli.STUDY_PACKAGES, "no_such_package_pkm"))
    assert cli.main(["demo", "--help"]) == 2
    assert capsys.readouterr().err == (
        "pkm-ref demo: error: pkm-ref needs no_such_package_pkm, from the study extra: "
        'pip install "pkm_ref[study]"\n'
    )


def test_bench_needs_no_corpus_package(monkeypatch, capsys):
    """A lent GPU has torch, tqdm and matplotlib but not the corpora: ``pkm-ref bench`` runs."""
    from pkm_ref import cli

    assert set(cli.COMMAND_PACKAGES["bench"]) < set(cli.STUDY_PACKAGES)
    monkeypatch.setattr(cli, "STUDY_PACKAGES", (*cli.STUDY_PACKAGES, "no_such_package_pkm"))
    with pytest.raises(SystemExit) as stopped:  # argparse's --help: the packages were enough
        cli.main(["bench", "--help"])
    assert stopped.value.code == 0 and "--kernels" in capsys.readouterr().out
    monkeypatch.setitem(cli.COMMAND_PACKAGES, "bench", ("tqdm", "no_such_package_pkm"))
    assert cli.main(["bench", "--help"]) == 2


def test_reproduce_checks_the_notebook_packages_before_any_step(tmp_path, monkeypatch, capsys):
    """Notebook steps need the dev extra: a missing package is named before the hour of training
    and benchmarks that runs first, not at the first notebook."""
    from pkm_ref import cli, reproduce

    dev = {_name(r) for r in _project()["optional-dependencies"]["dev"]}
    assert set(reproduce.NOTEBOOK_PACKAGES) <= dev
    missing = (*reproduce.NOTEBOOK_PACKAGES, "no_such_package_pkm")
    monkeypatch.setattr(reproduce, "NOTEBOOK_PACKAGES", missing)
    monkeypatch.setenv("PKM_REF_FIGURES", str(tmp_path / "figures"))
    monkeypatch.setattr(reproduce, "_run_steps", lambda *a, **k: pytest.fail("a step ran"))
    argv = ["reproduce", "--profile", "smoke", "--runs", str(tmp_path / "runs")]
    assert cli.main(argv) == 2
    assert "running the notebooks needs no_such_package_pkm, from the dev" in capsys.readouterr()[1]


def test_readme_example_runs():
    """The README's package example is real code: run it."""
    readme = (ROOT / "README.md").read_text()
    example = next(block for block in readme.split("```python\n")[1:]).split("```")[0]
    namespace: dict = {}
    exec(compile(example, "README.md", "exec"), namespace)
    assert namespace["loss"].item() > 0
