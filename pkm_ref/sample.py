"""``pkm-ref sample``: generate text from a trained checkpoint.

Taught in ``notebooks/05_train_pkm_lm.ipynb``. ``load_model`` rebuilds the model and its tokeniser
from a run directory (or a checkpoint file) written by ``pkm_ref.train``.
"""

from __future__ import annotations

import argparse
import os

import torch

from pkm_ref.data import CharTokenizer, Tokenizer, get_tokenizer
from pkm_ref.model import LanguageModel, ModelConfig
from pkm_ref.profiles import resolve_device
from pkm_ref.train import load_checkpoint_state


def load_model(
    run: str | os.PathLike[str], device: str | torch.device = "cpu"
) -> tuple[LanguageModel, Tokenizer]:
    """The trained model of ``run`` (a run directory or checkpoint file), in eval mode, and its
    tokeniser."""
    state = load_checkpoint_state(run)
    model = LanguageModel(ModelConfig(**state["model_config"]))
    model.load_state_dict(state["model"])
    saved = state["tokenizer"]
    tokenizer = CharTokenizer(saved["chars"]) if saved["name"] == "char" else get_tokenizer("byte")
    return model.to(device).eval(), tokenizer


def sample_text(
    model: LanguageModel,
    tokenizer: Tokenizer,
    prompt: str,
    max_new_tokens: int,
    temperature: float = 0.8,
    top_k: int | None = None,
    seed: int = 0,
) -> str:
    """The prompt followed by ``max_new_tokens`` sampled tokens, decoded (seeded: repeatable)."""
    device = next(model.parameters()).device
    idx = tokenizer.encode(prompt).long().to(device)[None]  # (1, T)
    if idx.shape[1] == 0:
        raise ValueError("the prompt must contain at least one character")
    generator = torch.Generator(device=device).manual_seed(seed)
    out = model.generate(idx, max_new_tokens, temperature, top_k, generator)  # (1, T + new)
    return tokenizer.decode(out[0].cpu())


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run", help="run directory (e.g. runs/cpu/pkm-2L-n64) or checkpoint file")
    parser.add_argument("--prompt", default="\n", help="text to continue (default: a newline)")
    parser.add_argument("--tokens", type=int, default=200, help="how many tokens to generate")
    parser.add_argument("--temperature", type=float, default=0.8)
    parser.add_argument("--top-k", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu", help='"cpu", "cuda" or "auto"')


def run(args: argparse.Namespace) -> int:
    model, tokenizer = load_model(args.run, resolve_device(args.device))
    text = sample_text(
        model, tokenizer, args.prompt, args.tokens, args.temperature, args.top_k, args.seed
    )
    print(text)
    return 0
