"""``pkm-ref compare``: does a shallow model with a memory beat a deeper one, and faster?

Taught in ``notebooks/05_train_pkm_lm.ipynb``.

The paper's headline: a 12-layer transformer with a product-key memory beats a
24-layer one and is about twice as fast at inference. At compact scale we train, on the same
tokens with the same settings and in the same run:

* ``dense-{L}L``: L dense blocks;
* ``dense-{2L}L``: 2L dense blocks;
* ``pkm-{L}L-n{n}``: L blocks, the middle one's FFN replaced by a product-key memory of n² slots,
  for several n (the memory-size sweep; the profile's default n is the headline model).

Every model trains into ``runs/<profile>/<name>/`` and is skipped when its final metrics for the
same configuration exist (``--force`` retrains), so an interrupted comparison resumes. Results go
through ``pkm_ref.figures``: ``lm_comparison`` (table), ``lm_learning_curves`` and
``lm_memory_sweep`` (figures).
"""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass
from pathlib import Path

from pkm_ref import figures
from pkm_ref._files import check_writable
from pkm_ref.cli import Interrupted
from pkm_ref.data import available_corpora, load_corpus
from pkm_ref.model import ModelConfig, middle_layer
from pkm_ref.profiles import (
    add_device_argument,
    add_profile_argument,
    by_profile,
    current_profile,
    profile_device,
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


def variants(profile: str, vocab_size: int = 256) -> list[Variant]:
    """The models compared at ``profile``: shallow, deep, shallow + memory, and the sweep."""
    base = ModelConfig.for_profile(profile, vocab_size=vocab_size)
    deep = dataclasses.replace(base, n_layer=2 * base.n_layer)
    with_memory = dataclasses.replace(base, memory_layers=(middle_layer(base.n_layer),))
    models = [Variant(run_name(base), "shallow", base), Variant(run_name(deep), "deep", deep)]
    for n_keys in sweep_n_keys(profile):
        config = dataclasses.replace(
            with_memory, memory=dataclasses.replace(base.memory, n_keys=n_keys)
        )
        role = "memory" if n_keys == base.memory.n_keys else "sweep"
        models.append(Variant(run_name(config), role, config))
    return models


def run_name(config: ModelConfig) -> str:
    """``dense-4L``, ``pkm-2L-n64``, ``flat-2L-n64``, or ``pkm-2L-n64-bf16`` for bfloat16 values:
    a run directory's name."""
    if not config.memory_layers:
        return f"dense-{config.n_layer}L"
    kind = "pkm" if config.memory.kind == "product" else "flat"
    values = "-bf16" if config.memory.value_dtype == "bfloat16" else ""
    return f"{kind}-{config.n_layer}L-n{config.memory.n_keys}{values}"


def default_runs_dir() -> Path:
    """``runs/`` of the repository checkout (git-ignored), else ``./runs``."""
    root = Path(__file__).resolve().parent.parent
    return root / "runs" if (root / "pyproject.toml").exists() else Path.cwd() / "runs"


def result_row(variant: Variant, metrics: dict, inference_tokens_per_s: float) -> dict:
    """One line of the comparison table."""
    config = variant.config
    memory = metrics["memory"][0] if metrics["memory"] else {}
    return {
        "model": variant.name,
        "role": variant.role,
        "layers": config.n_layer,
        "memory_slots": config.memory.n_slots if config.memory_layers else 0,
        "val_ppl": metrics["val_ppl"],
        "val_bpb": metrics["val_bpb"],
        "test_ppl": metrics["test_ppl"],
        "test_bpb": metrics["test_bpb"],
        "params_total": metrics["params_total"],
        "params_active": metrics["params_active"],
        "train_tok_s": round(metrics["train_tokens_per_s"]),
        "infer_tok_s": round(inference_tokens_per_s),
        "memory_usage": memory.get("usage"),
        "memory_kl": memory.get("kl"),
    }


def verdict(rows: list[dict]) -> str:
    """What the numbers say about the headline claim, in a few sentences."""
    by_role = {row["role"]: row for row in rows}
    shallow, deep, memory = by_role["shallow"], by_role["deep"], by_role["memory"]

    def versus(a: dict, b: dict) -> str:
        beats = "beats" if a["test_bpb"] < b["test_bpb"] else "does not beat"
        return f"{beats} {b['model']} ({a['test_bpb']:.3f} vs {b['test_bpb']:.3f})"

    text = (
        f"On test bits per byte, {memory['model']} {versus(memory, deep)} and "
        f"{versus(memory, shallow)}; {deep['model']} {versus(deep, shallow)}. "
    )
    return text + (
        f"Inference: {memory['model']} runs at {memory['infer_tok_s'] / deep['infer_tok_s']:.2f}x "
        f"the speed of {deep['model']} ({memory['infer_tok_s']:,} vs {deep['infer_tok_s']:,} "
        f"tokens/s); training at {memory['train_tok_s'] / deep['train_tok_s']:.2f}x."
    )


def plot_learning_curves(runs: dict[str, Path], profile: str):
    """Validation bits per byte against training tokens, one line per run: a matplotlib figure."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for name, run_dir in runs.items():
        # Step 0 (8 bits per byte, an untrained model) would flatten the differences that matter.
        log = [record for record in read_log(run_dir) if record["step"] > 0]
        tokens = [record["tokens"] / 1e6 for record in log]
        ax.plot(tokens, [record["val_bpb"] for record in log], marker=".", label=name)
    ax.set(
        xlabel="training tokens (millions)",
        ylabel="validation bits per byte",
        title=f"Learning curves ({profile})",
    )
    ax.grid(alpha=0.3)
    ax.legend()
    return fig


def plot_memory_sweep(rows: list[dict], profile: str):
    """Test bits per byte against memory slots, with the dense models as reference lines."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    memory_rows = sorted((r for r in rows if r["memory_slots"]), key=lambda r: r["memory_slots"])
    ax.plot(
        [r["memory_slots"] for r in memory_rows], [r["test_bpb"] for r in memory_rows],
        marker="o", label=f"{memory_rows[0]['layers']} layers + product-key memory",
    )  # fmt: skip
    dense_rows = [r for r in rows if not r["memory_slots"]]  # shallow, deep
    for row, style in zip(dense_rows, ("--", ":"), strict=True):
        ax.axhline(row["test_bpb"], linestyle=style, color="gray", label=row["model"])
    ax.set_xscale("log", base=2)
    ax.set(
        xlabel="memory slots (n_keys²)",
        ylabel="test bits per byte",
        title=f"Memory size ({profile})",
    )
    ax.grid(alpha=0.3)
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=3, frameon=False)
    return fig


def compare(
    profile: str,
    corpus: str = "sotu",
    runs_dir: Path | None = None,
    force: bool = False,
    seed: int = 0,
    device: str | None = None,
    progress: bool = True,
) -> list[dict]:
    """Train (or reuse) every variant of ``profile``, save the table and figures; the rows."""
    import matplotlib.pyplot as plt

    # The run's identity records the device itself, not how it was named ("auto" or None).
    hardware = profile_device(profile, device)
    train_config = TrainConfig.for_profile(profile, corpus=corpus, seed=seed, device=str(hardware))
    splits = load_corpus(corpus, train_config.tokenizer, seed, train_config.max_chars)
    runs_dir = (default_runs_dir() if runs_dir is None else Path(runs_dir)) / profile
    check_writable(runs_dir, "choose another --runs")  # both checked before any training
    figures.output_dir(profile)
    models = variants(profile, splits.tokenizer.vocab_size)
    results = {}
    for variant in models:
        results[variant.name] = train_or_reuse(
            variant.config, train_config, runs_dir / variant.name, splits, force, progress
        )
        print(f"{variant.name}: test {results[variant.name]['test_bpb']:.3f} bits/byte")
    # Inference speed of every model in turn, in one measurement: fair under a changing load.
    trained = {v.name: load_model(runs_dir / v.name, hardware)[0] for v in models}
    x = speed_batch(splits.validation, train_config.batch_size, models[0].config.block_size)
    speeds = inference_speeds(
        trained, x.to(hardware), train_config.speed_repeats, train_config.precision
    )
    rows = [result_row(v, results[v.name], speeds[v.name]) for v in models]

    tokens = train_config.max_steps * train_config.batch_size * models[0].config.block_size
    notes = (
        f"Corpus {corpus} ({train_config.tokenizer} tokens), {tokens:,} training tokens per model "
        f"({train_config.max_steps} steps of {train_config.batch_size} x "
        f"{models[0].config.block_size}), seed {seed}. Perplexity is per token; bpb = bits per "
        f"UTF-8 byte. Memory usage and KL (nats, to uniform) over the validation text. Training "
        f"speed: the whole run of each model; inference speed: forward passes of {x.shape[0]} x "
        f"{x.shape[1]} tokens, eval mode, every model in turn, median of "
        f"{train_config.speed_repeats} rounds. "
        f"{verdict(rows)}"
    )
    path = figures.save_results(
        RESULTS,
        rows,
        profile,
        hardware,
        title="Shallow + memory vs deep: compact LM",
        notes=notes,
    )
    print(f"{verdict(rows)}\nresults: {path}")
    headline = {v.name: runs_dir / v.name for v in models if v.role != "sweep"}
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
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quiet", action="store_true", help="no progress bars")


def run(args: argparse.Namespace) -> int:
    profile = args.profile or current_profile()
    try:
        compare(profile, args.corpus, args.runs, args.force, args.seed, args.device, not args.quiet)
    except KeyboardInterrupt:
        raise Interrupted(
            "run the same command to continue: finished models are reused and the one in "
            "training resumes from its last checkpoint"
        ) from None
    return 0
