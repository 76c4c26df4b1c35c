"""The one place that writes figures and result tables.

Every figure and table of the project goes through ``save_figure`` / ``save_results``, which
record the device, profile, versions and date beside them. ``cpu`` runs write into the
repository's ``figures/`` and ``gpu`` runs into ``figures/gpu/``, so neither overwrites the other;
``smoke`` runs write into a scratch folder, so tests and CI never overwrite committed results.
``PKM_REF_FIGURES`` overrides the folder.
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

from pkm_ref._files import check_writable
from pkm_ref.profiles import current_profile

_REPO_FIGURES = Path(__file__).resolve().parent.parent / "figures"


def output_dir(profile: str | None = None) -> Path:
    """Where results of ``profile`` go: ``$PKM_REF_FIGURES``, else ``figures/`` (cpu),
    ``figures/gpu/`` (gpu) or a scratch folder (smoke).

    Outside a repository checkout (a pip install), ``./figures`` replaces ``figures/``.
    """
    profile = current_profile() if profile is None else profile
    if os.environ.get("PKM_REF_FIGURES"):
        folder = Path(os.environ["PKM_REF_FIGURES"])
    elif profile == "smoke":
        folder = Path(tempfile.gettempdir()) / "pkm_ref_smoke_figures"
    else:
        in_checkout = _REPO_FIGURES.parent.joinpath("pyproject.toml").exists()
        root = _REPO_FIGURES if in_checkout else Path.cwd() / "figures"
        folder = root if profile == "cpu" else root / profile
    check_writable(folder, "set PKM_REF_FIGURES to a folder you can write")
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def device_name(device: torch.device | str | None = None) -> str:
    """A human name for ``device``: the GPU model, or the CPU with its thread count."""
    device = torch.device(device) if device is not None else torch.device("cpu")
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"


def run_metadata(profile: str | None = None, device: torch.device | str | None = None) -> dict:
    """Device, profile, versions and date: recorded beside every result."""
    return {
        "profile": current_profile() if profile is None else profile,
        "device": device_name(device),
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
) -> Path:
    """Write ``rows`` as ``<name>.json`` (with metadata) and ``<name>.md`` (a Markdown table).

    ``meta`` adds fields to the recorded ``run_metadata`` (settings such as dtype or thread count,
    measured machine limits). Returns the JSON path. Column order follows the first row.
    """
    folder = output_dir(profile)
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


def load_results(name: str, profile: str | None = None) -> dict:
    """Read back ``<name>.json`` written by ``save_results``: ``{"meta": ..., "rows": [...]}``."""
    return json.loads((output_dir(profile) / f"{name}.json").read_text())


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return "" if value is None else str(value)
