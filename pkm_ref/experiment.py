"""``pkm-ref compare``: does a shallow model with a memory beat a deeper one, and faster?

Taught in ``notebooks/05_train_pkm_lm.ipynb``.

The paper's headline: a 12-layer transformer with a product-key memory beats a
24-layer one and is about twice as fast at inference. At compact scale we train, on the same
tokens with the same settings and in the same run:

* ``dense-{L}L``: L dense blocks;
* ``dense-{2L}L``: 2L dense blocks;
* ``pkm-{L}L-n{n}``: L blocks, the middle one's FFN replaced by a product-key memory of n² slots,
  for several n (the memory-size sweep; the profile's default n is the headline model).

Every model trains with several seeds (``--seeds``; 3 in the cpu and gpu profiles), each seed
setting its initial weights and batch order on the same data split, and every number of the table
is the mean over the seeds with its 95 % interval (``pkm_ref.stats``). A claim is judged by
comparing intervals: *agrees*, *does not agree*, or *within noise* when they overlap.

Every run trains into ``runs/<profile>/<name>/seed-<seed>/`` and is skipped when its final metrics
for the same configuration exist (``--force`` retrains), so an interrupted comparison resumes.
Results go through ``pkm_ref.figures``: ``lm_comparison`` (table), ``lm_learning_curves`` and
``lm_memory_sweep`` (figures, with the spread of the seeds).
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from pkm_ref import figures, stats
from pkm_ref._checks import distinct_seeds
from pkm_ref._files import check_writable
from pkm_ref.cli import Interrupted, add_kernels_argument
from pkm_ref.data import available_corpora, load_corpus
from pkm_ref.model import ModelConfig, middle_layer
from pkm_ref.profiles import (
    add_device_argument,
    add_profile_argument,
    add_seed_arguments,
    by_profile,
    current_profile,
    profile_device,
    seeds_from_args,
)
from pkm_ref.sample import load_model
from pkm_ref.train import (
    TrainConfig,
    inference_speeds,
    read_log,
    speed_batch,
    train_or_reuse,
)

RESULTS, CURVES, SWEEP = "lm_comparison", "lm_learning_curves", "lm_memory_sweep"


@dataclass(frozen=True)
class Variant:
    """One model of the comparison: its run name, its role and its configuration."""

    name: str
    role: str  # "shallow", "deep", "memory" (the headline memory model) or "sweep"
    config: ModelConfig


def sweep_n_keys(profile: str) -> tuple[int, ...]:
    """Sub-keys per half of the memory-size sweep (n² slots each)."""
    return by_profile(smoke=(4, 8), cpu=(32, 64, 128), gpu=(128, 256, 512), profile=profile)


def variants(profile: str, vocab_size: int = 256, kernels: str = "auto") -> list[Variant]:
    """The models compared at ``profile``: shallow, deep, shallow + memory, and the sweep.

    ``kernels`` reaches the memory models only (``MemoryConfig.kernels``): the dense runs stay the
    same runs, reused whatever kernels the memories use."""
    base = ModelConfig.for_profile(profile, vocab_size=vocab_size)
    deep = dataclasses.replace(base, n_layer=2 * base.n_layer)
    with_memory = dataclasses.replace(base, memory_layers=(middle_layer(base.n_layer),))
    models = [Variant(run_name(base), "shallow", base), Variant(run_name(deep), "deep", deep)]
    for n_keys in sweep_n_keys(profile):
        config = dataclasses.replace(
            with_memory, memory=dataclasses.replace(base.memory, n_keys=n_keys, kernels=kernels)
        )
        role = "memory" if n_keys == base.memory.n_keys else "sweep"
        models.append(Variant(run_name(config), role, config))
    return models


def run_name(config: ModelConfig) -> str:
    """A run directory's name: ``dense-4L``, ``pkm-2L-n64``, ``flat-2L-n64``; ``-bf16`` added for
    bfloat16 values, ``-torch`` or ``-triton`` for kernels chosen other than "auto" (the same
    model, trained at another speed: its times are its own)."""
    if not config.memory_layers:
        return f"dense-{config.n_layer}L"
    memory = config.memory
    kind = "pkm" if memory.kind == "product" else "flat"
    values = "-bf16" if memory.value_dtype == "bfloat16" else ""
    kernels = "" if memory.kernels == "auto" else f"-{memory.kernels}"
    return f"{kind}-{config.n_layer}L-n{memory.n_keys}{values}{kernels}"


def default_runs_dir() -> Path:
    """``runs/`` of the repository checkout (git-ignored), else ``./runs``."""
    root = Path(__file__).resolve().parent.parent
    return root / "runs" if (root / "pyproject.toml").exists() else Path.cwd() / "runs"


def seed_count(profile: str) -> int:
    """Seeds per model: enough for a 95 % interval (smoke: two, so that the code runs in CI)."""
    return by_profile(smoke=2, cpu=3, gpu=3, profile=profile)


def run_dir(runs_dir: Path, name: str, seed: int) -> Path:
    """``<runs_dir>/<model>/seed-<seed>/``: one run of one model."""
    return Path(runs_dir) / name / f"seed-{seed}"


def result_row(variant: Variant, metrics: list[dict], inference_tokens_per_s: list[float]) -> dict:
    """One line of the comparison table: a model's numbers over its seeds, each a
    ``stats.Estimate`` (mean, 95 % interval, the values) as JSON."""
    config = variant.config
    memories = [m["memory"][0] for m in metrics if m["memory"]]
    return {
        "model": variant.name,
        "role": variant.role,
        "layers": config.n_layer,
        "memory_slots": config.memory.n_slots if config.memory_layers else 0,
        "seeds": len(metrics),
        **{key: stats.to_json(m[key] for m in metrics) for key in ("val_ppl", "val_bpb")},
        **{key: stats.to_json(m[key] for m in metrics) for key in ("test_ppl", "test_bpb")},
        "params_total": metrics[0]["params_total"],
        "params_active": metrics[0]["params_active"],
        "train_tok_s": stats.to_json(m["train_tokens_per_s"] for m in metrics),
        "infer_tok_s": stats.to_json(inference_tokens_per_s),
        "memory_usage": stats.to_json(m["usage"] for m in memories) if memories else None,
        "memory_kl": stats.to_json(m["kl"] for m in memories) if memories else None,
    }


_BEATS = {"lower": "beats", "higher": "is beaten by", stats.WITHIN_NOISE: "is within noise of"}
_FASTER = {"higher": "faster than", "lower": "slower than", stats.WITHIN_NOISE: "within noise of"}


def _versus(a: dict, b: dict, column: str, words: dict[str, str]) -> str:
    """``pkm-2L-n64 beats dense-4L (1.954 ± 0.01 vs 2.242 ± 0.03)``: intervals decide, not means."""
    order = stats.compare(stats.read(a[column]), stats.read(b[column]))
    values = f"{stats.describe(a[column])} vs {stats.describe(b[column])}"
    return f"{a['model']} {words[order]} {b['model']} ({values})"


def headline_claim(rows: list[dict]) -> tuple[stats.Claim, str]:
    """The paper's headline (a shallow model with a memory beats a deeper one and runs faster),
    judged on ``rows``: its status and what the numbers say, in a few sentences.

    It agrees only when the memory model's test bits per byte interval lies below the deep
    model's and its inference speed interval above; it does not agree when either lies on the
    other side; otherwise it is within noise.
    """
    by_role = {row["role"]: row for row in rows}
    shallow, deep, memory = by_role["shallow"], by_role["deep"], by_role["memory"]
    quality = stats.claim(stats.read(memory["test_bpb"]), stats.read(deep["test_bpb"]), "lower")
    speed = stats.claim(
        stats.read(memory["infer_tok_s"]), stats.read(deep["infer_tok_s"]), "higher"
    )
    mean = {role: stats.read(row["infer_tok_s"]).mean for role, row in by_role.items()}
    train = {role: stats.read(row["train_tok_s"]).mean for role, row in by_role.items()}
    text = (
        f"On test bits per byte, {_versus(memory, deep, 'test_bpb', _BEATS)} and "
        f"{_versus(memory, shallow, 'test_bpb', _BEATS)}; "
        f"{_versus(deep, shallow, 'test_bpb', _BEATS)}. Inference: "
        f"{_versus(memory, deep, 'infer_tok_s', _FASTER)} tokens/s "
        f"({mean['memory'] / mean['deep']:.2f}x); training at "
        f"{train['memory'] / train['deep']:.2f}x."
    )
    return stats.all_of([quality, speed]), text


def sweep_claim(rows: list[dict]) -> tuple[stats.Claim | None, str]:
    """The paper's "quality improves with memory size", judged on the memory-size sweep: every
    larger memory's test bits per byte interval must lie below the next smaller one's. None:
    fewer than two sizes, nothing to judge."""
    sweep = sorted((r for r in rows if r["memory_slots"]), key=lambda r: r["memory_slots"])
    if len(sweep) < 2:
        return None, "Fewer than two memory sizes: no verdict on the memory size."
    steps = [
        stats.claim(stats.read(larger["test_bpb"]), stats.read(smaller["test_bpb"]), "lower")
        for smaller, larger in itertools.pairwise(sweep)
    ]
    points = ", ".join(
        f"{r['memory_slots']:,} slots: {stats.describe(r['test_bpb'])}" for r in sweep
    )
    each = "; ".join(
        f"{smaller['memory_slots']:,} -> {larger['memory_slots']:,}: {step}"
        for (smaller, larger), step in zip(itertools.pairwise(sweep), steps, strict=True)
    )
    return stats.all_of(steps), f"Test bits per byte by memory size: {points} ({each})."


def plot_learning_curves(runs: dict[str, list[Path]], profile: str):
    """Validation bits per byte against training tokens: per model, the mean over its seeds'
    runs and a band from the lowest to the highest seed. A matplotlib figure."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for name, run_dirs in runs.items():
        # Step 0 (8 bits per byte, an untrained model) would flatten the differences that matter.
        logs = [[r for r in read_log(run) if r["step"] > 0] for run in run_dirs]
        steps = min(len(log) for log in logs)  # the seeds evaluate at the same steps
        tokens = [logs[0][i]["tokens"] / 1e6 for i in range(steps)]
        mean, low, high = zip(
            *(stats.spread([log[i]["val_bpb"] for log in logs]) for i in range(steps)), strict=True
        )
        (line,) = ax.plot(tokens, mean, marker=".", label=name)
        ax.fill_between(tokens, low, high, color=line.get_color(), alpha=0.2, linewidth=0)
    seeds = min(len(run_dirs) for run_dirs in runs.values())
    ax.set(
        xlabel="training tokens (millions)",
        ylabel="validation bits per byte",
        title=f"Learning curves ({profile}; mean, band: min-max of {seeds} seeds)",
    )
    ax.grid(alpha=0.3)
    ax.legend()
    return fig


def plot_memory_sweep(rows: list[dict], profile: str):
    """Test bits per byte against memory slots (mean and min-max over seeds as error bars), with
    the dense models as reference lines and bands."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    memory_rows = sorted((r for r in rows if r["memory_slots"]), key=lambda r: r["memory_slots"])
    spreads = [stats.spread(stats.read(r["test_bpb"]).values) for r in memory_rows]
    means = [mean for mean, _, _ in spreads]
    ax.errorbar(
        [r["memory_slots"] for r in memory_rows], means,
        yerr=[[m - lo for m, lo, _ in spreads], [hi - m for m, _, hi in spreads]],
        marker="o", capsize=3, label=f"{memory_rows[0]['layers']} layers + product-key memory",
    )  # fmt: skip
    dense_rows = [r for r in rows if not r["memory_slots"]]  # shallow, deep
    for row, style in zip(dense_rows, ("--", ":"), strict=True):
        mean, low, high = stats.spread(stats.read(row["test_bpb"]).values)
        line = ax.axhline(mean, linestyle=style, color="gray", label=row["model"])
        ax.axhspan(low, high, color=line.get_color(), alpha=0.1, linewidth=0)
    ax.set_xscale("log", base=2)
    ax.set(
        xlabel="memory slots (n_keys²)",
        ylabel="test bits per byte",
        title=f"Memory size ({profile}; bars, bands: min-max of {memory_rows[0]['seeds']} seeds)",
    )
    ax.grid(alpha=0.3)
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=3, frameon=False)
    return fig


def compare(
    profile: str,
    corpus: str = "sotu",
    runs_dir: Path | None = None,
    force: bool = False,
    seeds: Sequence[int] | None = None,
    device: str | None = None,
    progress: bool = True,
    kernels: str = "auto",
) -> list[dict]:
    """Train (or reuse) every variant of ``profile`` with every seed (default:
    ``range(seed_count(profile))``), save the table and figures; the rows.

    ``kernels`` runs the memory models' search and read (``MemoryConfig.kernels``)."""
    import matplotlib.pyplot as plt

    seeds = distinct_seeds(range(seed_count(profile)) if seeds is None else seeds)
    # The run's identity records the device itself, not how it was named ("auto" or None).
    hardware = profile_device(profile, device)
    configs = {
        seed: TrainConfig.for_profile(profile, corpus=corpus, seed=seed, device=str(hardware))
        for seed in seeds
    }
    train_config = configs[seeds[0]]  # every field but the seed is the same
    # One split for every seed: the seeds vary the models, never the text they are scored on.
    splits = load_corpus(corpus, train_config.tokenizer, max_chars=train_config.max_chars)
    runs_dir = (default_runs_dir() if runs_dir is None else Path(runs_dir)) / profile
    check_writable(runs_dir, "choose another --runs")  # both checked before any training
    figures.output_dir(profile)
    models = variants(profile, splits.tokenizer.vocab_size, kernels)
    results: dict[str, list[dict]] = {}
    for variant in models:
        results[variant.name] = []
        for seed in seeds:
            out = run_dir(runs_dir, variant.name, seed)
            metrics = train_or_reuse(variant.config, configs[seed], out, splits, force, progress)
            results[variant.name].append(metrics)
            print(f"{variant.name} seed {seed}: test {metrics['test_bpb']:.3f} bits/byte")
    # Inference speed of every model and seed in turn, in one measurement: fair under a changing
    # load, and each seed's model gives one value of the model's speed.
    trained = {
        f"{v.name}/{seed}": load_model(run_dir(runs_dir, v.name, seed), hardware)[0]
        for v in models
        for seed in seeds
    }
    x = speed_batch(splits.validation, train_config.batch_size, models[0].config.block_size)
    speeds = inference_speeds(
        trained, x.to(hardware), train_config.speed_repeats, train_config.precision
    )
    rows = [
        result_row(v, results[v.name], [speeds[f"{v.name}/{seed}"] for seed in seeds])
        for v in models
    ]

    tokens = train_config.max_steps * train_config.batch_size * models[0].config.block_size
    claims = [headline_claim(rows), sweep_claim(rows)]
    notes = (
        f"Corpus {corpus} ({train_config.tokenizer} tokens), {tokens:,} training tokens per model "
        f"and seed ({train_config.max_steps} steps of {train_config.batch_size} x "
        f"{models[0].config.block_size}); seeds {', '.join(map(str, seeds))} (a seed sets the "
        f"initial weights and the batch order; every seed has the same train/validation/test "
        f"split). Cells: mean ± half-width of the 95 % Student-t interval over the seeds (n = "
        f"`seeds`; one seed: the value alone). Perplexity is per token; bpb = bits per UTF-8 "
        f"byte. Memory usage and KL (nats, to uniform) over the validation text. Training speed: "
        f"the whole run of each model; inference speed: forward passes of {x.shape[0]} x "
        f"{x.shape[1]} tokens, eval mode, every model and seed in turn, median of "
        f"{train_config.speed_repeats} rounds. "
        + " ".join(f"{text} Claim: **{status}**." if status else text for status, text in claims)
    )
    path = figures.save_results(
        RESULTS,
        rows,
        profile,
        hardware,
        title="Shallow + memory vs deep: compact LM",
        notes=notes,
    )
    for status, text in claims:
        print(f"{text} -> {status}")
    print(f"results: {path}")
    headline = {
        v.name: [run_dir(runs_dir, v.name, seed) for seed in seeds]
        for v in models
        if v.role != "sweep"
    }
    for name, fig in (
        (CURVES, plot_learning_curves(headline, profile)),
        (SWEEP, plot_memory_sweep(rows, profile)),
    ):
        print(f"figure: {figures.save_figure(fig, name, profile, hardware)}")
        plt.close(fig)
    return rows


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_profile_argument(parser)
    parser.add_argument("--corpus", choices=list(available_corpora()), default="sotu")
    parser.add_argument(
        "--runs", type=Path, default=None,
        help="where runs go, as <runs>/<profile>/<model> (default: the repository's runs/)",
    )  # fmt: skip
    add_device_argument(parser)
    parser.add_argument(
        "--force", action="store_true", help="retrain models whose final metrics already exist"
    )
    add_seed_arguments(parser, "2 for smoke, 3 for cpu and gpu")
    add_kernels_argument(parser)
    parser.add_argument("--quiet", action="store_true", help="no progress bars")


def run(args: argparse.Namespace) -> int:
    profile = args.profile or current_profile()
    try:
        seeds = seeds_from_args(args, seed_count(profile))
        compare(profile, args.corpus, args.runs, args.force, seeds, args.device, not args.quiet,
                args.kernels)  # fmt: skip
    except KeyboardInterrupt:
        raise Interrupted(
            "run the same command to continue: finished models are reused and the one in "
            "training resumes from its last checkpoint"
        ) from None
    return 0
