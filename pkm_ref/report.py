"""The study's report: ``RESULTS.md`` beside the figures, and the generated blocks of the README.

``write_results(profile, folder)`` is the last step of ``pkm-ref reproduce``. It lists every
figure and result table in the run's results folder with a paragraph each: what it shows, where
it comes from, and, where the paper makes a claim, whether this run agrees. Every figure the
project makes is registered in ``FIGURES`` below; a figure that is not is listed as unregistered
(and a test fails), so no figure is ever orphaned.

Every claim and speed goal is judged on intervals (``pkm_ref.stats``): *agrees* / *met* only when
the 95 % intervals are separated the right way, *does not agree* / *not met* when they are
separated the wrong way, *within noise* otherwise. ``verdicts(folder)`` lists them all, so that
``pkm_ref.reference`` can set a run's verdicts beside the reference's.

When ``pkm-ref reproduce --update-reference`` rewrites the committed results, ``refresh_readme``
rewrites the blocks of README.md between ``<!-- BEGIN generated: NAME -->`` and
``<!-- END generated: NAME -->`` from them, so the numbers the README quotes always come from the
result files.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from pkm_ref import stats
from pkm_ref.figures import load_results, run_metadata
from pkm_ref.notebook import REPOSITORY

ROOT = Path(__file__).resolve().parent.parent
COLAB = "https://colab.research.google.com"


@dataclass(frozen=True)
class Verdict:
    """A claim of the paper judged on one folder of results; ``status`` is None when the results
    cannot judge it (e.g. too few sizes measured)."""

    status: str | None  # "agrees", "does not agree" or "within noise"
    text: str


@dataclass(frozen=True)
class Figure:
    """A registered figure: its section, its source, what it shows, and its claim check."""

    section: str
    source: str  # the notebook or command that writes it
    shows: str
    claim: str = ""  # the paper's claim that ``verdict`` judges
    verdict: Callable[[Path], Verdict | None] | None = None  # None: no results in the folder


def _rows(folder: Path, name: str) -> list[dict] | None:
    data = load_results(name, folder)
    return None if data is None else data["rows"]


def _claim_verdict(
    folder: Path,
    table: str,
    figure: str,
    judge: Callable[[list[dict], dict], tuple[stats.Claim | None, str]],
    scale: str = " at this scale",
) -> Verdict | None:
    """The verdict of ``judge(rows, meta) -> (status, text)`` on the result table ``table`` of
    ``folder``, naming the claim of ``FIGURES[figure]``; None without results. A None status (the
    results cannot judge the claim) keeps the text alone."""
    data = load_results(table, folder)
    if data is None or not data["rows"]:
        return None
    status, text = judge(data["rows"], data["meta"])
    if status is None:
        return Verdict(None, text)
    return Verdict(status, f"{text} {FIGURES[figure].claim}: **{status}**{scale}.")


def _retrieval_verdict(folder: Path) -> Verdict | None:
    from pkm_ref.bench import lookup

    rows = _rows(folder, "bench_retrieval")
    if not rows:
        return None
    # Sizes where both searches were timed: beyond the flat-key limit (or after running out of
    # GPU memory) the bench keeps a flat row without a time.
    timed = {
        case: {r["slots"] for r in rows if r["case"] == case and r["median_ms"] is not None}
        for case in ("flat keys", "product keys")
    }
    common = sorted(timed["flat keys"] & timed["product keys"])
    if len(common) < 2:
        return Verdict(
            None, "Flat and product keys were timed together at fewer than two sizes: no verdict."
        )
    small, large = common[0], common[-1]
    flat, product = (
        {size: lookup(rows, case, size) for size in (small, large)}
        for case in ("flat keys", "product keys")
    )
    flat_growth = stats.ratio(flat[large], flat[small])  # within each round
    product_growth = stats.ratio(product[large], product[small])
    relative = stats.ratio(flat_growth, product_growth)
    gap = stats.ratio(flat[large], product[large])
    status = stats.claim(relative, 10, "higher")
    return Verdict(
        status,
        f"From {small:,} to {large:,} slots ({large // small}x), flat-key retrieval got "
        f"{flat_growth.mean:.0f}x slower and product-key retrieval {product_growth.mean:.1f}x "
        f"slower; at {large:,} slots flat keys take {gap.mean:.0f}x as long. Judged as: flat keys "
        f"slow down at least 10x more than product keys (measured: {relative.describe()}x over "
        f"{relative.n} rounds, 95 % interval). "
        f"{FIGURES['bench_retrieval'].claim}: **{status}**.",
    )


def _lm_verdict(folder: Path) -> Verdict | None:
    from pkm_ref.experiment import headline_claim

    return _claim_verdict(
        folder, "lm_comparison", "lm_learning_curves", lambda rows, _: headline_claim(rows)
    )


def _sweep_verdict(folder: Path) -> Verdict | None:
    from pkm_ref.experiment import sweep_claim

    return _claim_verdict(
        folder, "lm_comparison", "lm_memory_sweep", lambda rows, _: sweep_claim(rows)
    )


def _paper_verdict(folder: Path) -> Verdict | None:
    from pkm_ref.bench import DEEP, PAPER_KERNELS, lookup, memory_case

    rows = _rows(folder, "bench_paper")
    if not rows:
        return None
    slots = {row["case"]: row["slots"] for row in rows}
    deep = {column: lookup(rows, DEEP, None, column) for column in ("median_ms", "train_ms")}
    # The fastest memory model measured here (Triton's on a GPU), for inference and training.
    ratios = {
        kernels: {column: stats.ratio(lookup(rows, case, slots[case], column), deep[column])
                  for column in deep}
        for kernels in PAPER_KERNELS if (case := memory_case(kernels)) in slots
    }  # fmt: skip
    best = min(ratios, key=lambda kernels: ratios[kernels]["median_ms"].mean)
    inference, training = ratios[best]["median_ms"], ratios[best]["train_ms"]
    status = stats.claim(inference, 0.55, "lower")
    return Verdict(
        status,
        f"{memory_case(best)}, the fastest memory model here, infers in {inference.describe()} "
        f"the time of {DEEP} and trains in {training.describe()} of its step time (95 % "
        f"intervals over {inference.n} rounds). Judged as: inference within 0.55 of 2L dense "
        f"blocks (half, with a tenth of slack). {FIGURES['bench_paper'].claim}: **{status}**.",
    )


def _capacity_verdict(folder: Path) -> Verdict | None:
    from pkm_ref.capacity import headline_claim

    return _claim_verdict(folder, "capacity", "capacity_bits", lambda rows, _: headline_claim(rows))


def _published_capacity_verdict(folder: Path) -> Verdict | None:
    from pkm_ref.capacity import published_claim

    return _claim_verdict(
        folder, "capacity", "capacity_growth",
        lambda rows, meta: published_claim(rows, meta["exposures"]), scale="",
    )  # fmt: skip


# name (file stem) -> Figure. Sections appear in RESULTS.md in this order.
SECTIONS = ("Language model", "Knowledge capacity", "Speed and complexity", "Notebooks")
FIGURES: dict[str, Figure] = {
    "lm_learning_curves": Figure(
        "Language model",
        "pkm-ref compare",
        "Validation bits per byte against training tokens for the dense L-layer model, the dense "
        "2L-layer model and the L-layer model with a product-key memory at mid-depth, all trained "
        "on the same tokens: the mean over the seeds, with a band from the lowest to the highest "
        "seed.",
        "The paper's claim (a shallow model with a memory beats a deeper one and runs faster)",
        _lm_verdict,
    ),
    "lm_memory_sweep": Figure(
        "Language model",
        "pkm-ref compare",
        "Test bits per byte of the L-layer model with a memory against the number of memory "
        "slots (the dense models as horizontal lines), the mean over the seeds with bars and bands "
        "from the lowest to the highest seed. The paper reports perplexity improving with memory "
        "size.",
        "The paper's claim (quality improves with memory size)",
        _sweep_verdict,
    ),
    "capacity_bits": Figure(
        "Knowledge capacity",
        "pkm-ref capacity",
        "Bits of knowledge stored (from the loss on the values of a synthetic knowledge base, "
        "Allen-Zhu & Li 2024) against total and against active parameters: a model with a "
        "product-key memory, a dense model of equal active and one of equal total parameters, "
        "each on bases of growing size, with the 1 and 2 bits-per-parameter lines; bars from the "
        "lowest to the highest seed.",
        "The capacity hypothesis (a product-key memory stores at least 5x the bits of a dense "
        "model of equal active parameters)",
        _capacity_verdict,
    ),
    "capacity_growth": Figure(
        "Knowledge capacity",
        "pkm-ref capacity",
        "Bits stored against the number of individuals in the base, per model (mean and min-max "
        "band over the seeds), under the base's information content: a model that stores all it "
        "sees follows the dashed line, a full one levels off.",
        "The published capacity of dense models (Allen-Zhu & Li 2024: about 1 bit per parameter "
        "at 100 exposures per fact, 2 at 1,000)",
        _published_capacity_verdict,
    ),
    "capacity_usage": Figure(
        "Knowledge capacity",
        "pkm-ref capacity",
        "Where the memory model files its facts (largest base, first seed): reads per slot over "
        "every question on the grid of sub-key pairs, and the slots read by the questions about "
        "four individuals.",
    ),
    "bench_retrieval": Figure(
        "Speed and complexity",
        "pkm-ref bench retrieval",
        "Time to search 4,096 queries (4 heads, knn 32, k_dim 128) and read their values, flat "
        "keys against product keys (torch, and on a GPU the fused Triton search and read), and "
        "the value read alone, as the memory grows; the analytic O(N) and O(sqrt(N) + k^2) "
        "curves are scaled to the measurements. Bars: min-max of the bench's rounds.",
        "The paper's claim (its complexity analysis, section 3.2: flat-key search slows in "
        "proportion to the memory, product keys barely change)",
        _retrieval_verdict,
    ),
    "bench_layer": Figure(
        "Speed and complexity",
        "pkm-ref bench layer",
        "A ProductKeyMemory layer's forward and forward+backward time against the dense FFN it "
        "replaces and against its lower bound, across memory sizes, on the torch kernels, under "
        "torch.compile (one size) and on a GPU the Triton kernels; and the cost of a sparse "
        "(SparseAdam) against a dense (Adam) value update. Bars: min-max of the bench's rounds.",
    ),
    "bench_paper": Figure(
        "Speed and complexity",
        "pkm-ref bench paper",
        "The paper's speed comparison at its width (gpu: d_model 1024, 16 heads, 12 against 24 "
        "blocks, a 512²-slot memory in block 6, bf16 autocast, 64 x 256 tokens), at random "
        "initialisation: inference and one training step of each model, the memory on each of "
        "its kernel paths (torch, torch with the compiled read, Triton with float32 and bfloat16 "
        "values), and one memory layer's forward against one dense block's, with the goals' "
        "budgets (0.55, 0.65 and 1.5x) as dashed lines. Bars: min-max of the bench's rounds.",
        "The paper's speed claim (12 layers + a memory run in about half the time of 24 layers)",
        _paper_verdict,
    ),
    "bench_model": Figure(
        "Speed and complexity",
        "pkm-ref bench model",
        "Inference tokens/s of the language model as the memory grows, with flat and with product "
        "keys (what the paper's complexity analysis predicts), and dense L / dense 2L / L + memory "
        "at equal settings. "
        "Bars: min-max of the bench's rounds.",
    ),
    "00_memory_layer_diagram": Figure(
        "Notebooks",
        "notebooks/00_overview.ipynb",
        "Where a memory layer sits in a transformer block and the steps of a read.",
    ),
    "00_cost_per_token": Figure(
        "Notebooks",
        "notebooks/00_overview.ipynb",
        "Analytic multiply-adds per token of flat keys, product keys and an FFN against memory "
        "size.",
    ),
    "01_recall_training": Figure(
        "Notebooks",
        "notebooks/01_flat_key_memory.ipynb",
        "A flat-key memory learning a key-to-value recall task, against an MLP of the same "
        "multiply-adds.",
    ),
    "01_flat_cost_scaling": Figure(
        "Notebooks",
        "notebooks/01_flat_key_memory.ipynb",
        "Flat-key memory cost grows linearly with the number of slots: measured time beside the "
        "analytic multiply-adds.",
    ),
    "02_candidate_grid": Figure(
        "Notebooks",
        "notebooks/02_product_keys.ipynb",
        "The product-key search on the n x n grid of keys: the k x k candidate block, and the "
        "chosen slots equal to brute force.",
    ),
    "02_staircase": Figure(
        "Notebooks",
        "notebooks/02_product_keys.ipynb",
        "The exact staircase bound: candidates at ranks (i, j) with i*j > k can never win, so "
        "about k ln k candidates suffice instead of k^2.",
    ),
    "02_search_cost": Figure(
        "Notebooks",
        "notebooks/02_product_keys.ipynb",
        "Flat against product-key search time as the number of keys grows, measured and analytic.",
    ),
    "02_layer_recall": Figure(
        "Notebooks",
        "notebooks/02_product_keys.ipynb",
        "The product-key layer written from scratch learning notebook 01's recall task beside a "
        "flat-key memory with as many slots, the same k, batchnorm queries and learning rates.",
    ),
    "03_training_loss": Figure(
        "Notebooks",
        "notebooks/03_batchnorm_queries.ipynb",
        "Training loss of the same memory with no query norm, LayerNorm and BatchNorm.",
    ),
    "03_usage_maps": Figure(
        "Notebooks",
        "notebooks/03_batchnorm_queries.ipynb",
        "How often each slot is read after training, per query norm, with usage and KL: the "
        "paper reports batchnorm queries using more of the memory (lower KL).",
    ),
    "04_bag_vs_gather": Figure(
        "Notebooks",
        "notebooks/04_multihead_memory_gpu.ipynb",
        "EmbeddingBag with per-sample weights against gather-then-sum: same numbers, different "
        "time and memory.",
    ),
    "04_optimizer_step_time": Figure(
        "Notebooks",
        "notebooks/04_multihead_memory_gpu.ipynb",
        "Time of one value-table update, SparseAdam against dense Adam, as the table grows.",
    ),
    "04_heads_quality": Figure(
        "Notebooks",
        "notebooks/04_multihead_memory_gpu.ipynb",
        "Loss and slot usage against the number of heads; the paper reports more heads helping.",
    ),
    "04_layer_scaling": Figure(
        "Notebooks",
        "notebooks/04_multihead_memory_gpu.ipynb",
        "The multi-head layer's time as the memory grows, on the notebook's device.",
    ),
    "05_learning_rates": Figure(
        "Notebooks",
        "notebooks/05_train_pkm_lm.ipynb",
        "The two learning rates of the comparison runs: warm-up and cosine decay for the dense "
        "parameters, a constant rate for the memory values (their own optimizer).",
    ),
    "05_usage_map": Figure(
        "Notebooks",
        "notebooks/05_train_pkm_lm.ipynb",
        "Reads per slot of the trained language model's memory over the validation text, as an "
        "n_keys x n_keys grid of sub-key pairs (collapse shows as dark rows or columns).",
    ),
    "06_cost_model": Figure(
        "Notebooks",
        "notebooks/06_complexity_and_speed.ipynb",
        "Analytic multiply-adds and parameters per token of flat keys, product keys and the FFN "
        "from 2^10 to 2^30 slots (pkm_ref.cost, checked against the modules' parameter counts).",
    ),
    "06_time_breakdown": Figure(
        "Notebooks",
        "notebooks/06_complexity_and_speed.ipynb",
        "Where a product-key search spends its time at 2^20 slots, stage by stage (half scores, "
        "top-k's, k^2 candidates, value read), against the fast exact path.",
    ),
    "06_retrieval_live": Figure(
        "Notebooks",
        "notebooks/06_complexity_and_speed.ipynb",
        "The retrieval benchmark re-measured at small sizes on the notebook's device: flat keys, "
        "reference and fast product keys, value read.",
    ),
    "07_staircase_registers": Figure(
        "Notebooks",
        "notebooks/07_gpu_kernels.ipynb",
        "The staircase candidates of the fused Triton search on the rank grid, and their number C "
        "(and C padded to a power of two, the int64 places a query holds in registers) against "
        "k, with the kernel's register budget: beyond it the search takes the torch path.",
    ),
    "07_gpu_measured": Figure(
        "Notebooks",
        "notebooks/07_gpu_kernels.ipynb",
        "The committed GPU benchmark results (figures/gpu/) replotted: search + read time, the "
        "read's bandwidth against the measured one and the 70 % goal, the layer's forward "
        "against its lower bound; the Triton kernels' rows beside the torch ones once measured.",
    ),
    "08_bits_while_learning": Figure(
        "Notebooks",
        "notebooks/08_what_memory_remembers.ipynb",
        "Bits of knowledge stored against exposures per fact, for the memory model and the dense "
        "models of equal active and equal total parameters trained on the same base, with the "
        "base's information content as the ceiling.",
    ),
    "08_slots_of_people": Figure(
        "Notebooks",
        "notebooks/08_what_memory_remembers.ipynb",
        "The memory slots that the questions about a few people read, on the grid of sub-key "
        "pairs (marker: the attribute asked, size: the read's weight): whether one person's "
        "facts share slots.",
    ),
}
# Result tables (``<name>.md`` written by pkm_ref.figures.save_results) shown in RESULTS.md.
TABLES = {
    "lm_comparison": "Language model",
    "capacity": "Knowledge capacity",
    "bench_retrieval": "Speed and complexity",
    "bench_layer": "Speed and complexity",
    "bench_model": "Speed and complexity",
    "bench_paper": "Speed and complexity",
    "reproduce_steps": "Notebooks",
}


# notebook -> what the reader learns, one line (the README's notebook table).
NOTEBOOK_SUMMARIES = {
    "00_overview": "What a memory layer is, where it sits, what it costs; the roadmap.",
    "01_flat_key_memory": "A key-value memory from scratch; it learns a recall task; its cost is "
    "linear in the slots.",
    "02_product_keys": "Why the product-key search is exact and O(sqrt(N) + k^2); the staircase "
    "bound; measured against brute force.",
    "03_batchnorm_queries": "Why batchnorm queries keep the whole memory in use; padding, the "
    "wrong axis and the causal leak.",
    "04_multihead_memory_gpu": "Heads sharing one value table, EmbeddingBag, sparse value "
    "updates, the layer at GPU scale.",
    "05_train_pkm_lm": "Train a byte-level LM with a memory; shallow + memory vs a deeper dense "
    "model.",
    "06_complexity_and_speed": "The analytic cost model and the measured speed: flat vs product "
    "keys, layer vs FFN, model tokens/s.",
    "07_gpu_kernels": "The Triton kernels beside their torch references: packed top-k keys, the "
    "staircase in registers, the bag read, a deterministic backward; measured GPU numbers.",
    "08_what_memory_remembers": "Bits of facts a model stores, from its loss; a memory against "
    "dense models of equal active and total parameters; where it files each person.",
}


def write_results(profile: str, folder: Path) -> Path:
    """Write ``RESULTS.md`` into ``folder`` (a run's results) and return its path."""
    folder = Path(folder)
    meta = run_metadata(profile)
    lines = [
        "# Results",
        "",
        f"Assembled from the result files of the `{profile}` profile by `pkm-ref reproduce "
        f"--profile {profile}` ({meta['date']}). Each table below records the machine, device, "
        "versions and date of its own run. Numbers are means with the half-width of their 95 % "
        "interval over seeds (language model) or rounds (benchmarks); a claim agrees or does not "
        "only when the intervals are separated, and is *within noise* when they overlap.",
        "",
    ]
    for section in SECTIONS:
        lines += [f"## {section}", ""]
        for name, table_section in TABLES.items():
            if table_section == section and (folder / f"{name}.md").exists():
                lines += _table_block(folder / f"{name}.md")
        for name, figure in FIGURES.items():
            if figure.section != section:
                continue
            if not (folder / f"{name}.png").exists():
                lines += [f"### {name}", "", f"Not produced in this run (`{figure.source}`).", ""]
                continue
            lines += [f"### {name}", "", f"![{name}]({name}.png)", "", figure.shows,
                      f"Source: `{figure.source}`.", ""]  # fmt: skip
            verdict = figure.verdict(folder) if figure.verdict is not None else None
            if verdict is not None:
                lines += [verdict.text, ""]
    orphans = sorted(p.stem for p in folder.glob("*.png") if p.stem not in FIGURES)
    if orphans:
        lines += ["## Unregistered figures", "", *[f"- {name}.png" for name in orphans], ""]
    path = folder / "RESULTS.md"
    path.write_text("\n".join(lines))
    return path


def verdicts(folder: Path) -> dict[str, str | None]:
    """Every judgement the results in ``folder`` support, by name: the paper's claims
    (``agrees`` / ``does not agree`` / ``within noise``) and the speed goals (``met`` /
    ``not met`` / ``within noise``); None where the results cannot judge."""
    from pkm_ref.bench import BENCH_PARTS

    judged: dict[str, str | None] = {}
    for figure in FIGURES.values():
        verdict = figure.verdict(folder) if figure.verdict is not None else None
        if verdict is not None:
            judged[figure.claim] = verdict.status
    for name, (_, goals_of, _, _) in BENCH_PARTS.items():
        data = load_results(f"bench_{name}", folder)
        if data is not None:
            for goal in goals_of(data["rows"], data["meta"]):
                judged[f"goal: {goal.text} {'<=' if goal.at_most else '>='} {goal.target:g}"] = (
                    goal.status
                )
    return judged


def _table_block(path: Path) -> list[str]:
    """A result table's Markdown, its title demoted to a level-3 heading."""
    text = path.read_text().strip().splitlines()
    return ["#" * 2 + text[0], *text[1:], ""]


def refresh_readme(folder: Path) -> None:
    """Rewrite the README's generated blocks from the committed results: ``folder`` (the
    repository's ``figures/``, the cpu reference) and ``folder/gpu``."""
    readme = ROOT / "README.md"
    text = readme.read_text()
    blocks = {
        "speed-figure": _speed_block(folder),
        "speed-goals": _goals_block(folder),
        "headline": _headline_block(folder),
        "capacity": _capacity_block(folder),
        "profile-costs": _costs_block(folder),
        "notebook-table": _notebook_table(folder),
    }
    for name, body in blocks.items():
        pattern = re.compile(
            rf"(<!-- BEGIN generated: {name} -->\n).*?(<!-- END generated: {name} -->)", re.S
        )
        text = pattern.sub(lambda m, body=body: m.group(1) + body + m.group(2), text)
    readme.write_text(text)


def _speed_block(folder: Path) -> str:
    verdict = _retrieval_verdict(folder)
    if not (folder / "bench_retrieval.png").exists() or verdict is None:
        return ""
    return (
        "![Retrieval time against memory size, flat vs product keys](figures/bench_retrieval.png)"
        f"\n\n{verdict.text} (source: "
        "[figures/bench_retrieval.md](figures/bench_retrieval.md))\n"
    )


def _goals_block(folder: Path) -> str:
    """The speed goals, recomputed from the committed cpu results and, when present, the gpu
    results beside them (``folder/gpu``): one line per goal, each run's device and date named."""
    from pkm_ref.bench import BENCH_PARTS

    lines = []
    for results in (folder, folder / "gpu"):
        for name in ("retrieval", "layer", "paper"):
            data = load_results(f"bench_{name}", results)
            if data is None:
                continue
            meta, source = data["meta"], os.path.relpath(results / f"bench_{name}.md", ROOT)
            run = f"{meta['device']} ({meta['profile']} profile, {meta['date']})"
            for goal in BENCH_PARTS[name][1](data["rows"], meta):
                text = goal.line().removeprefix("goal ")
                lines.append(f"- {run}: {text} ([{source}]({source}))")
    if not lines:
        return ""
    return (
        "**Speed goals**, as ratios within each round of one benchmark run; met only when the "
        "whole 95 % interval over the rounds clears the target:\n\n" + "\n".join(lines) + "\n"
    )


def _headline_block(folder: Path) -> str:
    """The language-model comparison of the cpu results and, when present, of the gpu results
    beside them (``folder/gpu``), each with its device, date, source and verdict."""
    blocks = []
    for results in (folder, folder / "gpu"):
        path = results / "lm_comparison.md"
        verdict = _lm_verdict(results)
        if not path.exists() or verdict is None:
            continue
        table = [line for line in path.read_text().splitlines() if line.startswith("|")]
        meta = load_results("lm_comparison", results)["meta"]
        source = os.path.relpath(path, ROOT)
        blocks.append(
            f"**Shallow + memory vs deep** ({meta['profile']} profile, {meta['device']}, "
            f"{meta['date']}; source: [{source}]({source})):\n\n"
            + "\n".join(table)
            + f"\n\n{verdict.text}\n"
        )
    return "\n".join(blocks)


def _capacity_block(folder: Path) -> str:
    """The knowledge-capacity figure of the cpu results and, when present, of the gpu results
    beside them (``folder/gpu``), each with its device, date, source and both verdicts."""
    blocks = []
    for results in (folder, folder / "gpu"):
        data = load_results("capacity", results)
        if data is None or not (results / "capacity_bits.png").exists():
            continue
        meta = data["meta"]
        figure, source = (os.path.relpath(results / name, ROOT)
                          for name in ("capacity_bits.png", "capacity.md"))  # fmt: skip
        verdicts = [v for v in (_capacity_verdict(results), _published_capacity_verdict(results))
                    if v is not None]  # fmt: skip
        blocks.append(
            f"![Bits stored against parameters, dense vs product-key memory]({figure})\n\n"
            f"**Knowledge capacity** ({meta['profile']} profile, {meta['device']}, {meta['date']};"
            f" {meta['exposures']} exposures per fact; source: [{source}]({source})): "
            + " ".join(v.text for v in verdicts)
            + "\n"
        )
    return "\n".join(blocks)


def _costs_block(folder: Path) -> str:
    """Time and peak memory of ``pkm-ref reproduce`` per profile, from ``reproduce_steps.json``
    of the cpu and gpu results: the sum of the steps' times and the largest step's peak."""
    lines = [
        "| profile | machine | steps recorded | time | peak RAM (largest step) | peak GPU memory |",
        "|---|---|---|---|---|---|",
    ]
    for results in (folder, folder / "gpu"):
        data = load_results("reproduce_steps", results)
        if data is None:
            continue
        meta, rows = data["meta"], data["rows"]
        machine = ", ".join(filter(None, (meta["device"], meta.get("machine"))))
        seconds = [row["seconds"] for row in rows if row.get("seconds") is not None]
        source = os.path.relpath(results / "reproduce_steps.md", ROOT)
        lines.append(
            f"| [{meta['profile']}]({source}) | {machine} | {len(seconds)} | "
            f"{_minutes(sum(seconds))} | {_peak(rows, 'peak_ram_gib')} | "
            f"{_peak(rows, 'peak_gpu_gib')} |"
        )
    return "\n".join(lines) + "\n" if len(lines) > 2 else ""


def _peak(rows: list[dict], column: str) -> str:
    """The largest ``column`` of the steps, and which step it was, in GiB."""
    measured = [row for row in rows if row.get(column) is not None]
    if not measured:
        return "not measured"
    top = max(measured, key=lambda row: row[column])
    return f"{top[column]:.1f} GiB ({top['step']})"


def _notebook_table(folder: Path) -> str:
    timings = {row["step"]: row["seconds"] for row in (_rows(folder, "reproduce_steps") or [])}
    gpu_timings = {
        row["step"]: row["seconds"] for row in (_rows(folder / "gpu", "reproduce_steps") or [])
    }
    lines = [
        "| notebook | what you learn | Colab | time cpu / gpu |",
        "|---|---|---|---|",
    ]
    for path in sorted((ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb")):
        cells = json.loads(path.read_text())["cells"]
        first_line = "".join(cells[0]["source"]).splitlines()[0]
        title = first_line.lstrip("# ").strip()
        summary = NOTEBOOK_SUMMARIES.get(path.stem, "")
        badge = (
            f"[![Open In Colab]({COLAB}/assets/colab-badge.svg)]"
            f"({COLAB}/github/{REPOSITORY}/blob/main/notebooks/{path.name})"
        )
        cpu, gpu = (_minutes(t.get(f"notebook-{path.stem}")) for t in (timings, gpu_timings))
        lines.append(f"| [{title}](notebooks/{path.name}) | {summary} | {badge} | {cpu} / {gpu} |")
    return "\n".join(lines) + "\n"


def _minutes(seconds: float | None) -> str:
    if seconds is None:
        return "not measured"
    return f"{seconds / 60:.1f} min" if seconds >= 60 else f"{seconds:.0f} s"
