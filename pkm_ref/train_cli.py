"""``pkm-ref train``: train one language model, dense or with memory layers, from the command line.

Taught in ``notebooks/05_train_pkm_lm.ipynb``. Sizes default to the runtime profile's
(``ModelConfig.for_profile``, ``TrainConfig.for_profile``); every flag overrides one of them.
The run goes to ``--out`` (default ``runs/<profile>/<model>/seed-<seed>``, where
``pkm-ref compare`` finds it too): ``checkpoint.pt``, ``log.jsonl`` and ``final.json``.
``--resume`` continues an interrupted run exactly; Ctrl-C prints the command that does it. Under
``torchrun --nproc_per_node N -m pkm_ref train ...`` the run trains on N processes
(``pkm_ref.distributed``); ``--batch-size`` stays the global batch.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shlex
from pathlib import Path

from pkm_ref._files import check_writable
from pkm_ref.cli import Interrupted, add_kernels_argument
from pkm_ref.data import available_corpora, load_corpus
from pkm_ref.distributed import World, init_from_environment, launcher
from pkm_ref.experiment import default_runs_dir, run_dir, run_name
from pkm_ref.model import MEMORY_KINDS, VALUE_DTYPES, ModelConfig, middle_layer
from pkm_ref.profiles import (
    add_device_argument,
    add_profile_argument,
    current_profile,
    profile_device,
)
from pkm_ref.query import QUERY_NORMS
from pkm_ref.train import CHECKPOINT, TrainConfig, resumable_step, train


def _layer_list(text: str) -> list[int | str]:
    """``"none"`` -> [], ``"mid"`` -> ["mid"], ``"0,2"`` -> [0, 2]."""
    if text.strip().lower() == "none":
        return []
    try:
        return [part if part == "mid" else int(part) for part in text.replace(" ", "").split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected block indices like 1 or 0,2 (or 'mid', 'none'), got {text!r}"
        ) from None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_profile_argument(parser)
    data = parser.add_argument_group("data")
    data.add_argument("--corpus", choices=list(available_corpora()), default="sotu")
    data.add_argument("--tokenizer", choices=("byte", "char"), default="byte")
    data.add_argument("--max-chars", type=int, default=None, help="keep this much of each split")
    model = parser.add_argument_group("model (default: the profile's)")
    model.add_argument("--layers", type=int, default=None, help="number of blocks")
    model.add_argument("--d-model", type=int, default=None)
    model.add_argument("--n-head", type=int, default=None, help="attention heads")
    model.add_argument("--block-size", type=int, default=None, help="context length")
    model.add_argument(
        "--memory-layers", type=_layer_list, default=[],
        help="blocks whose FFN becomes a memory: indices (1 or 0,2), 'mid' or 'none' (default)",
    )  # fmt: skip
    model.add_argument("--memory-kind", choices=MEMORY_KINDS, default=None)
    model.add_argument("--n-keys", type=int, default=None, help="sub-keys per half: n² slots")
    model.add_argument("--k-dim", type=int, default=None, help="query and key size")
    model.add_argument("--memory-heads", type=int, default=None)
    model.add_argument("--knn", type=int, default=None, help="slots read per memory head")
    model.add_argument("--query-norm", choices=[str(n).lower() for n in QUERY_NORMS], default=None)
    model.add_argument("--value-dropout", type=float, default=None)
    model.add_argument("--sparse", action="store_true", help="sparse value gradients, SparseAdam")
    model.add_argument(
        "--compiled-read", action="store_true",
        help="read the values with torch.compile (GPU: faster; dense gradients, not with --sparse)",
    )  # fmt: skip
    model.add_argument(
        "--value-dtype", choices=VALUE_DTYPES, default=None,
        help="the value table's dtype: bfloat16 halves the bytes read (a float32 master trains it)",
    )  # fmt: skip
    add_kernels_argument(model, default=None)
    run_group = parser.add_argument_group("training (default: the profile's)")
    run_group.add_argument("--steps", type=int, default=None)
    run_group.add_argument("--batch-size", type=int, default=None)
    run_group.add_argument(
        "--lr", type=float, default=None,
        help="peak dense learning rate (the cosine floor keeps the profile's ratio, a tenth)",
    )  # fmt: skip
    run_group.add_argument("--value-lr", type=float, default=None, help="memory values' rate")
    run_group.add_argument("--seed", type=int, default=0)
    add_device_argument(run_group)
    out = parser.add_argument_group("output")
    out.add_argument("--out", type=Path, default=None, help="run directory")
    out.add_argument("--resume", action="store_true", help="continue the checkpoint in --out")
    out.add_argument("--force", action="store_true", help="start over if --out has a checkpoint")
    out.add_argument("--quiet", action="store_true", help="no progress bar")


def _given(args: argparse.Namespace, names: dict[str, str]) -> dict:
    """Config fields set on the command line: {field: value} for every flag not left at None."""
    given = {flag: getattr(args, flag) for flag in names}
    return {names[flag]: value for flag, value in given.items() if value is not None}


def build_configs(args: argparse.Namespace, profile: str) -> tuple[ModelConfig, TrainConfig]:
    """The profile's configurations with the command line's overrides (raises ValueError)."""
    base = ModelConfig.for_profile(profile)
    memory_fields = _given(
        args, {"memory_kind": "kind", "n_keys": "n_keys", "k_dim": "k_dim",
               "memory_heads": "heads", "knn": "knn", "value_dropout": "value_dropout",
               "value_dtype": "value_dtype", "kernels": "kernels"},
    )  # fmt: skip
    if args.query_norm is not None:
        memory_fields["query_norm"] = None if args.query_norm == "none" else args.query_norm
    if args.sparse:
        memory_fields["sparse"] = True
    if args.compiled_read:
        memory_fields["compiled_read"] = True
    if memory_fields and not args.memory_layers:
        raise ValueError("memory options need --memory-layers (e.g. --memory-layers mid)")
    model_fields = _given(
        args, {"layers": "n_layer", "d_model": "d_model", "n_head": "n_head",
               "block_size": "block_size"},
    )  # fmt: skip
    n_layer = model_fields.get("n_layer", base.n_layer)
    layers = tuple(middle_layer(n_layer) if i == "mid" else i for i in args.memory_layers)
    model_config = dataclasses.replace(
        base, **model_fields, memory_layers=layers,
        memory=dataclasses.replace(base.memory, **memory_fields),
    )  # fmt: skip
    train_fields = _given(
        args, {"max_chars": "max_chars", "steps": "max_steps", "batch_size": "batch_size",
               "lr": "lr", "value_lr": "value_lr"},
    )  # fmt: skip
    train_config = TrainConfig.for_profile(
        profile, corpus=args.corpus, tokenizer=args.tokenizer, seed=args.seed,
        device=str(profile_device(profile, args.device)), **train_fields,
    )  # fmt: skip
    return model_config, train_config


def run(args: argparse.Namespace) -> int:
    profile = args.profile or current_profile()
    if args.resume and args.force:
        raise ValueError("--resume continues the run in --out and --force starts it over: "
                         "pass one of them")  # fmt: skip
    model_config, train_config = build_configs(args, profile)
    world = init_from_environment(train_config.device)  # under torchrun: join the others
    splits = load_corpus(args.corpus, args.tokenizer, max_chars=train_config.max_chars)
    model_config = dataclasses.replace(model_config, vocab_size=splits.tokenizer.vocab_size)
    out = args.out or run_dir(default_runs_dir() / profile, run_name(model_config), args.seed)
    check_writable(out, "choose another --out")
    if (out / CHECKPOINT).exists() and not (args.resume or args.force):
        raise ValueError(
            f"{out} already holds a run: pass --resume to continue it or --force to start over"
        )
    if args.resume and not (out / CHECKPOINT).exists():
        raise FileNotFoundError(f"--resume: no checkpoint at {out / CHECKPOINT}")
    if world.is_main:
        print(f"profile {profile}: training {run_name(model_config)} into {out}")
    try:
        metrics = train(model_config, train_config, out, splits, args.resume, not args.quiet)
    except KeyboardInterrupt:
        if not world.is_main:
            raise Interrupted(f"rank {world.rank} of {world.size} stopped; rank 0 says how to "
                              "resume") from None  # fmt: skip
        step = resumable_step(out, model_config, train_config)
        if step is None:
            raise Interrupted(
                "before the first checkpoint of this run, so there is nothing to resume: run the "
                "same command to start again"
            ) from None
        raise Interrupted(
            f"the last checkpoint, step {step}, is in {out / CHECKPOINT}; resume with: "
            f"{resume_command(args, profile, out, world)}"
        ) from None
    if world.is_main:
        print(json.dumps(metrics, indent=2))
    return 0


def resume_command(
    args: argparse.Namespace, profile: str, out: Path, world: World | None = None
) -> str:
    """The command line that continues this run: every option given, the profile and the folder
    spelled out, and ``--resume`` in place of ``--force``; under torchrun on as many processes
    (``world``)."""
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    defaults = vars(parser.parse_args([]))
    words = [*launcher(world or World()), "train", "--profile", profile, "--out", str(out)]
    words.append("--resume")
    for name, value in vars(args).items():
        # Left out: what is spelled out above, defaults, and names that are no option of train.
        if name in ("profile", "out", "resume", "force") or value == defaults.get(name, value):
            continue
        words.append("--" + name.replace("_", "-"))
        if isinstance(value, list):  # --memory-layers: [1, 3] -> "1,3"
            words.append(",".join(map(str, value)))
        elif value is not True:  # a store_true flag is its name alone
            words.append(str(value))
    return shlex.join(words)
