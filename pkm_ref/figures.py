"""The one place that writes figures and result tables, and says where they go.

Every figure and table of the project goes through ``save_figure`` / ``save_results``, which
record the machine, device, profile, versions and date beside them.

* Your results (``output_dir``): ``results/<profile>/`` under the current folder, which git
  ignores; ``smoke`` runs write into a scratch folder, so tests and CI leave no files behind.
  ``PKM_REF_FIGURES`` overrides the folder (``pkm-ref reproduce`` sets it for its steps).
* The committed reference (``reference_dir``): the repository's ``figures/`` for ``cpu`` and
  ``figures/gpu/`` for ``gpu``. Only ``pkm-ref reproduce --update-reference`` writes there.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import tempfile
from pathlib import Path
from typing import Any

import torch

from pkm_ref import stats
from pkm_ref._files import check_writable
from pkm_ref.profiles import current_profile

CHECKOUT = Path(__file__).resolve().parent.parent  # the repository, when pkm_ref runs from one
ENV_VAR = "PKM_REF_FIGURES"


def output_dir(profile: str | None = None) -> Path:
    """Where results of ``profile`` go: ``$PKM_REF_FIGURES``, else ``./results/<profile>/``
    relative to the current folder (smoke: a scratch folder). Created if missing.

    A notebook's kernel runs in the notebook's folder, so a notebook opened by hand writes into
    ``notebooks/results/<profile>/`` (git-ignored too), never into the committed ``figures/``.
    """
    profile = current_profile() if profile is None else profile
    if os.environ.get(ENV_VAR):
        folder = Path(os.environ[ENV_VAR])
    elif profile == "smoke":
        folder = smoke_dir()
    else:
        folder = Path.cwd() / "results" / profile
    check_writable(folder, "set PKM_REF_FIGURES to a folder you can write")
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def smoke_dir() -> Path:
    """The scratch folder of ``smoke`` results (also their stand-in reference)."""
    return Path(tempfile.gettempdir()) / "pkm_ref_smoke_figures"


def reference_dir(profile: str) -> Path | None:
    """Where the committed reference of ``profile`` lives: the repository's ``figures/`` (cpu) or
    ``figures/gpu/`` (gpu); smoke, which commits nothing, has its scratch folder instead. None
    when pkm_ref does not run from a clone of the repository (a pip install has no reference)."""
    if profile == "smoke":
        return smoke_dir()
    if not (CHECKOUT / "pyproject.toml").exists():
        return None
    return CHECKOUT / "figures" if profile == "cpu" else CHECKOUT / "figures" / profile


def device_name(device: torch.device | str | None = None) -> str:
    """A human name for ``device``: the GPU model, or the CPU with its thread count."""
    device = torch.device(device) if device is not None else torch.device("cpu")
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"


def machine_name() -> str:
    """The machine a result came from: CPU model, cores, memory (``Linux``: /proc/cpuinfo) and the
    vector instructions torch's CPU kernels use (``AVX512``, ``AVX2``, ...: their rounding and
    speed differ, and ``ATEN_CPU_CAPABILITY`` can lower them)."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:  # not Linux
        pass
    try:
        memory = f", {os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30:.0f} GiB"
    except (AttributeError, ValueError, OSError):  # Windows has no sysconf
        memory = ""
    return f"{cpu}, {os.cpu_count()} cores{memory}, {torch.backends.cpu.get_cpu_capability()}"


def run_metadata(profile: str | None = None, device: torch.device | str | None = None) -> dict:
    """Machine, device, profile, versions and date: recorded beside every result."""
    return {
        "profile": current_profile() if profile is None else profile,
        "device": device_name(device),
        "machine": machine_name(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    }


def save_figure(
    fig: Any,
    name: str,
    profile: str | None = None,
    device: torch.device | str | None = None,
    **metadata: Any,
) -> Path:
    """Save a matplotlib figure as ``<output_dir>/<name>.png`` and return the path.

    The PNG carries the run metadata (profile, ``device`` that measured it, date) in its text
    chunks.
    """
    path = output_dir(profile) / f"{name}.png"
    info = {k: str(v) for k, v in {**run_metadata(profile, device), **metadata}.items()}
    fig.savefig(path, dpi=120, bbox_inches="tight", metadata=info)
    return path


def save_results(
    name: str,
    rows: list[dict],
    profile: str | None = None,
    device: torch.device | str | None = None,
    title: str = "",
    notes: str = "",
    meta: dict | None = None,
    folder: Path | None = None,
) -> Path:
    """Write ``rows`` as ``<name>.json`` (with metadata) and ``<name>.md`` (a Markdown table) into
    ``folder`` (default: ``output_dir(profile)``).

    ``meta`` adds fields to the recorded ``run_metadata`` (settings such as dtype or thread count,
    measured machine limits). Returns the JSON path. Column order follows the first row.
    """
    folder = output_dir(profile) if folder is None else Path(folder)
    meta = {**run_metadata(profile, device), **(meta or {})}
    (folder / f"{name}.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    columns = list(rows[0]) if rows else []
    lines = [f"# {title or name}", ""]
    lines += [f"{k}: {v}  " for k, v in meta.items()] + [""]
    lines += ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_cell(row.get(c)) for c in columns) + " |" for row in rows]
    if notes:
        lines += ["", notes]
    (folder / f"{name}.md").write_text("\n".join(lines) + "\n")
    return folder / f"{name}.json"


def load_results(name: str, folder: Path) -> dict | None:
    """Read back ``<folder>/<name>.json`` written by ``save_results``: ``{"meta": ..., "rows":
    [...]}``, or None when there is none."""
    path = Path(folder) / f"{name}.json"
    return json.loads(path.read_text()) if path.exists() else None


def _cell(value: Any) -> str:
    if isinstance(value, dict):  # a stats.Estimate: mean ± 95 % interval
        return stats.describe(value)
    if isinstance(value, float):
        return f"{value:.4g}"
    return "" if value is None else str(value)
