"""Your run against the committed reference: every number beside its reference, and the verdicts.

``pkm-ref reproduce`` ends with ``write_comparison(results, reference)``: it writes
``<results>/vs_reference.md`` and returns a short summary to print. The reference is the committed
result folder of the same profile (``pkm_ref.figures.reference_dir``: ``figures/`` for cpu,
``figures/gpu/`` for gpu), which records the machine it was measured on.

For every number of every result table found in both folders, the report gives your value and the
reference's (means with their 95 % intervals), the difference, and whether the two intervals are
separated (``higher`` / ``lower``) or overlap (``within noise``); then every verdict of the two runs
(the paper's claims, the speed goals: ``pkm_ref.report.verdicts``) and whether they match.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass
from pathlib import Path

from pkm_ref import stats
from pkm_ref.figures import load_results
from pkm_ref.report import verdicts

REPORT = "vs_reference.md"

# result table -> its groups of (columns that name a row, columns compared). A number measured
# once per model and copied into each of its rows (capacity's step time, measured on the largest
# base) is compared once, under the model's name alone.
NUMBERS: dict[str, tuple[tuple[tuple[str, ...], tuple[str, ...]], ...]] = {
    "lm_comparison": (
        (
            ("model",),
            (
                "test_bpb",
                "val_bpb",
                "test_ppl",
                "val_ppl",
                "train_tok_s",
                "infer_tok_s",
                "memory_usage",
                "memory_kl",
            ),
        ),
    ),
    "capacity": (
        (("model", "individuals"), ("bits", "recall", "bits_per_param", "memory_usage")),
        (("model",), ("step_ms",)),
    ),
    "bench_retrieval": ((("case", "slots"), ("median_ms", "GBps")),),
    "bench_layer": ((("case", "slots"), ("median_ms",)),),
    "bench_model": ((("case", "slots"), ("median_ms", "tokens_per_s")),),
    "reproduce_steps": ((("step",), ("seconds", "peak_ram_gib", "peak_gpu_gib")),),
}


@dataclass(frozen=True)
class Difference:
    """One number of your run beside the same number of the reference."""

    table: str
    row: str
    column: str
    yours: stats.Estimate
    reference: stats.Estimate

    @property
    def difference(self) -> float:
        return self.yours.mean - self.reference.mean

    @property
    def relative(self) -> float | None:
        """The difference as a fraction of the reference (None when the reference is 0)."""
        return self.difference / abs(self.reference.mean) if self.reference.mean else None

    @property
    def order(self) -> str:
        """``higher`` / ``lower`` when the two intervals are separated, else ``within noise``. A
        reference of one run (no interval) is compared as an exact number with your interval;
        with no interval on either side: ``no interval``."""
        if self.yours.n < 2 and self.reference.n < 2:
            return "no interval"
        if self.reference.n < 2:
            return stats.compare(self.yours, self.reference.mean)
        return stats.compare(self.yours, self.reference)


def differences(results: Path, reference: Path) -> list[Difference]:
    """Every number that both folders hold, paired by table, row and column."""
    found = []
    for table, groups in NUMBERS.items():
        yours, theirs = load_results(table, results), load_results(table, reference)
        if yours is None or theirs is None:
            continue
        for keys, columns in groups:
            reference_rows = {tuple(row.get(k) for k in keys): row for row in theirs["rows"]}
            mine_rows = {tuple(row.get(k) for k in keys): row for row in yours["rows"]}
            for key, row in mine_rows.items():  # each row name once
                other = reference_rows.get(key)
                if other is None:
                    continue
                for column in columns:
                    mine, base = stats.read(row.get(column)), stats.read(other.get(column))
                    if mine is not None and base is not None:
                        found.append(Difference(table, _label(row, keys), column, mine, base))
    return found


def write_comparison(
    results: Path, reference: Path | None, name: Path | None = None
) -> tuple[Path, str]:
    """Write ``<results>/vs_reference.md``, your results against those in ``reference``; return
    its path and a few lines of summary. ``name``: the folder to name as the reference (when
    ``reference`` is a snapshot of it)."""
    results = Path(results)
    path = results / REPORT
    name = reference if name is None else name
    if reference is None or not any(Path(reference).glob("*.json")):
        where = "no reference folder" if name is None else f"no results in {name}"
        text = (
            f"# Your run vs the reference\n\nNo committed reference to compare with ({where}). "
            "A clone of the repository holds one in `figures/` (cpu) and `figures/gpu/` (gpu).\n"
        )
        path.write_text(text)
        return path, f"no reference to compare with ({where}); report: {path}"
    reference = Path(reference)
    numbers = differences(results, reference)
    judged = _verdict_pairs(verdicts(results), verdicts(reference))
    lines = [
        "# Your run vs the reference",
        "",
        f"Yours: `{results}` ({_machine(results)}).  ",
        f"Reference: `{name}` ({_machine(reference)}).",
        "",
        "Numbers are means ± the half-width of their 95 % interval over seeds or rounds (a number "
        "without ± is a single run). *vs reference*: `higher` or `lower` when the two intervals "
        "are separated (a single reference value counts as exact), `within noise` when they "
        "overlap. Speeds and times depend on the machine; bits per byte should not, beyond the "
        "noise of the seeds.",
        "",
        "## Verdicts",
        "",
        "| verdict | yours | reference | |",
        "|---|---|---|---|",
    ]
    lines += [f"| {name} | {mine} | {base} | {_match(mine, base)} |" for name, mine, base in judged]
    for table in NUMBERS:
        rows = [d for d in numbers if d.table == table]
        if not rows:
            continue
        lines += ["", f"## {table}", "",
                  "| row | number | yours | reference | difference | relative | vs reference |",
                  "|---|---|---|---|---|---|---|"]  # fmt: skip
        lines += [
            f"| {d.row} | {d.column} | {d.yours.describe()} | {d.reference.describe()} | "
            f"{d.difference:+.4g} | {_percent(d.relative)} | {d.order} |"
            for d in rows
        ]
    path.write_text("\n".join(lines) + "\n")
    return path, _summary(reference, name, judged, numbers, path)


def _summary(
    reference: Path,
    name: Path,
    judged: list[tuple[str, str, str]],
    numbers: list[Difference],
    path: Path,
) -> str:
    both = [(verdict, mine, base) for verdict, mine, base in judged if _match(mine, base) != "-"]
    matching = sum(mine == base for _, mine, base in both)
    lines = [
        f"your run vs the reference in {name} ({_machine(reference)}):",
        f"  verdicts: {matching} of the {len(both)} that both runs judged match the reference",
    ]
    lines += [
        f"    differs: {verdict}: yours {mine}, reference {base}"
        for verdict, mine, base in both
        if mine != base
    ]
    if numbers:
        noise = sum(d.order == stats.WITHIN_NOISE for d in numbers)
        relative = [abs(d.relative) for d in numbers if d.relative is not None]
        median = f"; median |difference| {statistics.median(relative):.1%}" if relative else ""
        lines.append(
            f"  numbers: {len(numbers)} compared, {noise} within noise of the reference{median}"
        )
    lines.append(f"  report: {path}")
    return "\n".join(lines)


def _verdict_pairs(
    yours: dict[str, str | None], reference: dict[str, str | None]
) -> list[tuple[str, str, str]]:
    names = list(yours) + [name for name in reference if name not in yours]
    return [(name, _status(yours, name), _status(reference, name)) for name in names]


def _status(judged: dict[str, str | None], name: str) -> str:
    if name not in judged:
        return "not run"
    return judged[name] or "no verdict"


def _match(mine: str, base: str) -> str:
    """``matches`` / ``differs``; ``-`` when either run did not judge it."""
    if {"not run", "no verdict"} & {mine, base}:
        return "-"
    return "matches" if mine == base else "differs"


def _label(row: dict, keys: tuple[str, ...]) -> str:
    parts = []
    for key in keys:
        value = row.get(key)
        if key == "slots" and isinstance(value, int):
            parts.append(f"2^{value.bit_length() - 1} slots")
        elif value is not None:
            parts.append(str(value))
    return ", ".join(parts)


def _machine(folder: Path) -> str:
    """The device and machine that the folder's results record (the first table that has them)."""
    for table in NUMBERS:
        data = load_results(table, folder)
        if data is not None:
            meta = data["meta"]
            parts = (meta.get("device"), meta.get("machine"), meta.get("date"))
            return ", ".join(str(part) for part in parts if part)
    return "no results"


def _percent(fraction: float | None) -> str:
    return "" if fraction is None else f"{fraction:+.1%}"
