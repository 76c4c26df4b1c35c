"""One trainer for every language model of ``pkm_ref.model``: dense, product-key or flat memory.

Taught in ``notebooks/05_train_pkm_lm.ipynb``.

* Optimisation: the value tables get their own optimizer (``pkm_ref.SplitOptimizer``: Adam, or
  SparseAdam for sparse tables, at a constant learning rate, as in the authors' code) and their own
  gradient clipping; every other parameter uses AdamW with a linear warm-up and a cosine decay.
* Evaluation: loss, perplexity and bits per byte on the validation and test splits, and how evenly
  each memory's slots are read over the validation split (``pkm_ref.UsageAccumulator``).
* Runs: a run directory holds ``checkpoint.pt`` (everything needed to resume exactly, written
  atomically), ``log.jsonl`` (one line per evaluation) and, once finished, ``final.json``.
  A run that is refused or stopped before its first checkpoint removes the folder it created.
* A non-finite loss stops training (``NonFiniteLossError``) before it reaches a checkpoint.
* Under ``torchrun``, one model trains on every process (``pkm_ref.distributed``): each computes
  its slice of the same global batch, rank 0 alone writes the run's files.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import statistics
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from pkm_ref import _checks
from pkm_ref._files import atomic_write, outermost_missing, remove_created
from pkm_ref.data import CorpusSplits, Tokenizer, iter_eval_batches, load_corpus, random_batch
from pkm_ref.distributed import World, data_parallel, sum_usage
from pkm_ref.model import LanguageModel, ModelConfig
from pkm_ref.optim import SplitOptimizer
from pkm_ref.profiles import by_profile, profile_device_name, resolve_device
from pkm_ref.usage import UsageAccumulator

CHECKPOINT, LOG, FINAL = "checkpoint.pt", "log.jsonl", "final.json"
_CHECKPOINT_FORMAT = 1
# What every checkpoint of this format holds (``Trainer.save_checkpoint``), and its type.
_CHECKPOINT_FIELDS = {
    "model_config": dict, "train_config": dict, "tokenizer": dict, "model": dict,
    "optimizer": dict, "step": int, "train_seconds": float, "history": list, "rng": dict,
}  # fmt: skip


class NonFiniteLossError(FloatingPointError):
    """The loss became NaN or infinite: training stopped, the last checkpoint was kept."""


@dataclass
class TrainConfig:
    """How a model is trained and evaluated. ``TrainConfig.for_profile`` gives sized defaults.

    ``eval_tokens`` caps the tokens of each periodic validation (the learning curve);
    ``final_eval_tokens`` those of the final validation and test evaluation (None: whole split).
    Both read the first tokens of their split, so every model is scored on the same text.
    """

    corpus: str = "sotu"
    tokenizer: str = "byte"
    max_chars: int | None = None  # per split; small values make quick runs
    batch_size: int = 32
    max_steps: int = 1000
    warmup_steps: int = 100
    lr: float = 1e-3  # dense parameters: warm-up to lr, cosine decay to min_lr
    min_lr: float = 1e-4
    value_lr: float = 1e-3  # memory values, constant: Adam 1e-3 (paper §4.3; constant in XLM)
    weight_decay: float = 0.0  # runs stay under one epoch: nothing to regularise
    grad_clip: float = 1.0
    value_grad_clip: float = 1.0
    eval_interval: int = 100
    eval_tokens: int | None = 65_536
    final_eval_tokens: int | None = None
    speed_repeats: int = 5  # inference speed: median of this many timed forward passes
    seed: int = 0
    device: str = "auto"  # "auto": CUDA when available
    precision: str = "float32"  # or "bfloat16" (autocast, CUDA)

    @classmethod
    def for_profile(cls, profile: str, **overrides) -> TrainConfig:
        """Defaults sized for ``profile`` ("smoke", "cpu" or "gpu"), then ``overrides``; the
        device is the profile's own (``profiles.profile_device_name``).

        cpu: 200 steps per run, so that ``pkm-ref compare`` trains its five models with three
        seeds each in about the time one seed of 600 steps took (see the README for what the
        shorter runs cost in evidence).

        Learning rates: short runs of small models learn faster with a dense rate of 3e-3 (cpu,
        600-step runs: 2.14 vs 2.36 bits per byte for the 2-layer model at 1e-3). The values keep
        the paper's principle, a constant rate above the dense one (paper §4.3: 1e-3 for the
        values, 2.5e-4 for the rest of the network); the rates here are ours: at the cpu scale,
        1e-2 instead of 1e-3 took the memory model from 2.09 to 1.97 bits per byte and its slot
        usage from 74 % to 99 % (notebook 05, 600-step runs).
        """
        sizes = by_profile(
            smoke=dict(max_chars=60_000, batch_size=8, max_steps=12, warmup_steps=2,
                       eval_interval=6, eval_tokens=2_048, final_eval_tokens=4_096,
                       speed_repeats=2),
            cpu=dict(batch_size=16, max_steps=200, warmup_steps=20, eval_interval=50,
                     eval_tokens=16_384, final_eval_tokens=65_536,
                     lr=3e-3, min_lr=3e-4, value_lr=1e-2),
            gpu=dict(batch_size=64, max_steps=1000, warmup_steps=100, eval_interval=100,
                     eval_tokens=262_144, final_eval_tokens=None, precision="bfloat16",
                     lr=1e-3, min_lr=1e-4, value_lr=1e-2),
            profile=profile,
        )  # fmt: skip
        sizes["device"] = profile_device_name(profile)
        # A run shorter than the profile's keeps the shape of its schedule: warm-up at most a
        # tenth of the run and an evaluation by its end (unless ``overrides`` set those too).
        steps = overrides.get("max_steps", sizes["max_steps"])
        if steps < sizes["max_steps"]:
            sizes["warmup_steps"] = min(sizes["warmup_steps"], steps // 10)
            sizes["eval_interval"] = min(sizes["eval_interval"], steps)
        # A peak rate given without a floor keeps the profile's floor-to-peak ratio (a tenth).
        if "lr" in overrides and "min_lr" not in overrides:
            peak, floor = sizes.get("lr", cls.lr), sizes.get("min_lr", cls.min_lr)
            sizes["min_lr"] = overrides["lr"] * floor / peak
        return cls(**{**sizes, **overrides})

    def __post_init__(self) -> None:
        if self.precision not in ("float32", "bfloat16"):
            raise ValueError(f"precision must be 'float32' or 'bfloat16', got {self.precision!r}")
        # Checked here, not after an hour of training: speed_repeats=0 failed only at the end.
        self.max_steps = _checks.positive_int("max_steps (--steps)", self.max_steps)
        for name in ("batch_size", "eval_interval", "speed_repeats"):
            setattr(self, name, _checks.positive_int(name, getattr(self, name)))
        for name in ("max_chars", "eval_tokens", "final_eval_tokens"):  # None: no cap
            if getattr(self, name) is not None:
                setattr(self, name, _checks.positive_int(name, getattr(self, name)))
        if not 0 <= self.warmup_steps < self.max_steps:
            raise ValueError(
                f"warmup_steps must be in [0, max_steps={self.max_steps}), got {self.warmup_steps}"
            )
        if not 0 <= self.min_lr <= self.lr or self.lr <= 0:
            raise ValueError(
                f"learning rates must satisfy 0 <= min_lr <= lr and lr > 0, "
                f"got lr={self.lr}, min_lr={self.min_lr}"
            )
        if self.value_lr <= 0:
            raise ValueError(f"value_lr must be > 0, got {self.value_lr}")


def learning_rate(step: int, config: TrainConfig) -> float:
    """Dense learning rate at ``step`` (0-based): linear warm-up, then cosine decay to min_lr."""
    if step < config.warmup_steps:
        return config.lr * (step + 1) / config.warmup_steps
    progress = min(1.0, (step - config.warmup_steps) / (config.max_steps - config.warmup_steps))
    return config.min_lr + 0.5 * (1 + math.cos(math.pi * progress)) * (config.lr - config.min_lr)


def autocast(device: torch.device, precision: str) -> AbstractContextManager:
    """bfloat16 autocast when asked for (the memory still takes its softmax in float32)."""
    return torch.autocast(device.type, torch.bfloat16, enabled=precision == "bfloat16")


def split_optimizer(model: LanguageModel, config: TrainConfig) -> SplitOptimizer:
    """The optimizer of every training run: AdamW on the dense weights (``config.lr``, decayed by
    ``optimization_step``), Adam or SparseAdam on the values at a constant ``config.value_lr``."""
    return SplitOptimizer(model, lr=config.lr, value_lr=config.value_lr,
                          weight_decay=config.weight_decay)  # fmt: skip


def optimization_step(
    forward: Callable[..., tuple[torch.Tensor, torch.Tensor]],
    optimizer: SplitOptimizer,
    x: torch.Tensor,
    y: torch.Tensor,
    step: int,
    config: TrainConfig,
) -> torch.Tensor:
    """One update: the dense rate of ``step`` (``learning_rate``), the loss of ``forward(x, y)``
    (a ``LanguageModel`` or its DDP wrapper; x, y (B, T) on its device) under ``config.precision``,
    the backward, both gradient clips and the step. Returns the loss, detached. The one step of
    ``Trainer`` and of ``pkm_ref.capacity``."""
    for group in optimizer.dense.param_groups:
        group["lr"] = learning_rate(step, config)
    with autocast(x.device, config.precision):
        _, loss = forward(x, y)  # () mean cross-entropy over the targets
    optimizer.zero_grad()
    loss.backward()
    optimizer.clip_grad_norm_(config.grad_clip, config.value_grad_clip)
    optimizer.step()
    return loss.detach()


def bytes_per_token(tokenizer: Tokenizer, tokens: torch.Tensor) -> float:
    """UTF-8 bytes per token of ``tokens`` (1 for the byte tokenizer): turns nats into bits/byte."""
    if tokenizer.name == "byte":
        return 1.0
    return len(tokenizer.decode(tokens).encode("utf-8")) / max(1, len(tokens))


@contextmanager
def recording_usage(model: LanguageModel) -> Iterator[list[UsageAccumulator]]:
    """Eval mode with every memory recording its reads (``last_indices``, ``last_weights``);
    yields one accumulator per memory. Also used by ``pkm_ref.capacity`` (notebook 08)."""
    was_training = model.training
    memories = model.memory_layers()
    model.eval()
    for memory in memories:
        memory.record_usage = True
    try:
        yield [UsageAccumulator(memory.n_slots) for memory in memories]
    finally:
        for memory in memories:
            memory.record_usage, memory.last_indices, memory.last_weights = False, None, None
        model.train(was_training)


@torch.no_grad()
def evaluate(
    model: LanguageModel,
    tokens: torch.Tensor,
    batch_size: int,
    max_tokens: int | None = None,
    tokenizer: Tokenizer | None = None,
    precision: str = "float32",
    world: World | None = None,
) -> dict:
    """Next-token loss of ``model`` on a split, in eval mode, and the usage of its memories.

    Args:
        tokens: (n,) token ids of the split; read in non-overlapping windows of ``block_size``.
        max_tokens: read this many tokens from the start (rounded up to whole windows of
            ``block_size``): the same text at any batch size.
        tokenizer: gives the bytes per token for bits per byte (None: one byte per token).
        world: with several processes (``pkm_ref.distributed``), each scores every W-th batch
            and the results are summed over them: every rank must call it. None: one process.

    Returns:
        ``loss`` (nats/token), ``ppl``, ``bpb`` (bits per UTF-8 byte), ``tokens`` scored;
        ``memory``: per memory layer, the share of slots read (``usage``) and KL(reads || uniform)
        in nats (``kl``), by selection counts and by softmax weight (``weighted_*``); and
        ``reads``: per memory layer, the ``UsageAccumulator`` itself (``counts`` per slot).
    """
    device = next(model.parameters()).device
    block = model.config.block_size
    max_windows = None if max_tokens is None else math.ceil(max_tokens / block)
    world = World() if world is None else world
    total_loss, scored = 0.0, 0
    batches = iter_eval_batches(tokens, batch_size, block, max_windows)
    with recording_usage(model) as accumulators:
        for x, y in itertools.islice(batches, world.rank, None, world.size):  # this rank's
            x, y = x.to(device), y.to(device)  # (b, T) each
            with autocast(device, precision):
                _, loss = model(x, y)
            total_loss += float(loss) * y.numel()
            scored += y.numel()
            for memory, accumulator in zip(model.memory_layers(), accumulators, strict=True):
                accumulator.update(memory.last_indices, memory.last_weights)  # (b*T, H, knn)
        if world.distributed:
            sums = world.sum(torch.tensor([total_loss, scored], dtype=torch.float64))  # (2,)
            total_loss, scored = float(sums[0]), int(sums[1])
            for accumulator in accumulators:
                sum_usage(accumulator, world)
        usages = [accumulator.result() for accumulator in accumulators]
    loss = total_loss / scored
    per_byte = 1.0 if tokenizer is None else bytes_per_token(tokenizer, tokens[: scored + 1])
    return {
        "loss": loss,
        "ppl": math.exp(loss),
        "bpb": loss / math.log(2) / per_byte,
        "tokens": scored,
        "memory": [
            {
                "usage": stats.selected.usage,
                "kl": stats.selected.kl_uniform,
                "weighted_usage": stats.weighted.usage,
                "weighted_kl": stats.weighted.kl_uniform,
            }
            for stats in usages
        ],
        "reads": accumulators,
    }


def speed_batch(tokens: torch.Tensor, batch_size: int, block_size: int) -> torch.Tensor:
    """The fixed batch that speeds are measured on: the first windows of ``tokens``, (B, T)."""
    return next(iter_eval_batches(tokens, batch_size, block_size))[0]


@torch.no_grad()
def inference_speeds(
    models: dict[str, LanguageModel], x: torch.Tensor, repeats: int = 5, precision: str = "float32"
) -> dict[str, float]:
    """Tokens per second of a forward pass over the fixed batch ``x`` (B, T), per model.

    Eval mode, no grad. One untimed warm-up pass each, then ``repeats`` rounds in which every
    model runs once in turn (so a change of machine load hits all models alike); the median of
    each model's timed passes.
    """
    modes = {name: model.training for name, model in models.items()}
    times: dict[str, list[float]] = {name: [] for name in models}
    for _ in range(repeats + 1):
        for name, model in models.items():
            model.eval()
            _synchronize(x.device)
            start = time.perf_counter()
            with autocast(x.device, precision):
                model(x)
            _synchronize(x.device)
            times[name].append(time.perf_counter() - start)
    for name, model in models.items():
        model.train(modes[name])
    return {name: x.numel() / statistics.median(t[1:]) for name, t in times.items()}


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def read_log(run_dir: str | os.PathLike[str]) -> list[dict]:
    """The evaluation records of a run, oldest first (empty if it has none yet)."""
    path = Path(run_dir) / LOG
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def read_final(run_dir: str | os.PathLike[str]) -> dict | None:
    """``final.json`` of a finished run (configs and metrics), or None."""
    path = Path(run_dir) / FINAL
    return json.loads(path.read_text()) if path.exists() else None


def _config_differences(saved: dict, current: dict) -> list[str]:
    return [key for key in sorted(set(saved) | set(current)) if saved.get(key) != current.get(key)]


class Trainer:
    """Trains one ``LanguageModel`` on one corpus; resumable from its run directory.

    ``splits`` may be passed in so that several trainers share one loaded corpus; otherwise it is
    loaded from ``train_config`` (corpus, tokenizer, max_chars). ``train_config.seed`` sets the
    initial weights and the batch order; the split does not depend on it.
    """

    def __init__(
        self,
        model_config: ModelConfig,
        train_config: TrainConfig,
        out_dir: str | os.PathLike[str] | None = None,
        splits: CorpusSplits | None = None,
    ):
        self.model_config, self.config = model_config, train_config
        self.out_dir = None if out_dir is None else Path(out_dir)
        self.world = World.current()  # one process, or all those torchrun started
        self.world.local_batch_size(train_config.batch_size)  # must split evenly over them
        self.device = self.world.device(resolve_device(train_config.device))
        if splits is None:  # the seed is not passed: every seed trains and scores on one split
            splits = load_corpus(
                train_config.corpus, train_config.tokenizer, max_chars=train_config.max_chars
            )
        if splits.tokenizer.vocab_size != model_config.vocab_size:
            raise ValueError(
                f"the {splits.tokenizer_name} tokenizer of {splits.name!r} has "
                f"{splits.tokenizer.vocab_size} tokens but the model's vocab_size is "
                f"{model_config.vocab_size}"
            )
        splits.check_block_size(model_config.block_size)
        self.splits = splits
        torch.manual_seed(train_config.seed)
        self.model = LanguageModel(model_config).to(self.device)
        self.optimizer = split_optimizer(self.model, train_config)
        self._trained_model = data_parallel(self.model, self.world)  # self.model on one process
        if self.world.rank:  # its own dropout masks; rank 0 goes on with the one-process stream
            torch.manual_seed(train_config.seed + self.world.rank)
        # Its own generator: the data order survives a resume and ignores other random draws.
        # The same on every rank: all draw the global batch, each keeps its slice.
        self.data_generator = torch.Generator().manual_seed(train_config.seed)
        self.step = 0
        self.train_seconds = 0.0  # time spent in training steps only, over every resume
        self.history: list[dict] = []  # one record per evaluation, as in log.jsonl
        self.last_checkpoint: tuple[Path, int] | None = None  # (path, step) last saved or loaded
        self._finite_step = 0  # the last step whose loss was read and found finite

    # ------------------------------------------------------------------ training

    def train_step(self) -> torch.Tensor:
        """One optimisation step on a random batch; returns the (detached) training loss (of this
        rank's slice of the batch, under torchrun: ``self.world.average`` gives the batch's)."""
        block = self.model_config.block_size
        x, y = random_batch(self.splits.train, self.config.batch_size, block, self.data_generator)
        x, y = self.world.shard(x).to(self.device), self.world.shard(y).to(self.device)  # (B/W, T)
        self.model.train()
        loss = optimization_step(self._trained_model, self.optimizer, x, y, self.step, self.config)
        self.step += 1
        return loss

    @property
    def tokens_seen(self) -> int:
        """Training tokens consumed so far: steps x batch_size x block_size."""
        return self.step * self.config.batch_size * self.model_config.block_size

    def fit(self, progress: bool = True) -> dict:
        """Train to ``max_steps`` (from wherever a resume left off), then evaluate in full.

        Evaluates on the validation split at step 0 and every ``eval_interval`` steps, appending
        to ``history`` (and, with a run directory, ``log.jsonl`` and ``checkpoint.pt``). Returns the
        final metrics, also written to ``final.json`` when the trainer has a run directory.

        Raises ``NonFiniteLossError`` when a loss is NaN or infinite, before it is logged or
        checkpointed, so the last checkpoint stays a good one. The training loss is checked where
        it is read on the CPU anyway (every 10 steps and at each evaluation), so the check adds no
        GPU synchronisation; the message names the step and the last step found finite.
        """
        self._finite_step = self.step
        if self.step == 0:
            self.history = []
            self._write_log()
            self._log_evaluation(train_loss=None)
        bar = tqdm(
            total=self.config.max_steps, initial=self.step,
            disable=not (progress and self.world.is_main),
            desc=self.out_dir.name if self.out_dir else "train", unit="step",
        )  # fmt: skip
        clock = time.perf_counter()
        while self.step < self.config.max_steps:
            loss = self.train_step()
            bar.update(1)
            evaluate_now = (
                self.step % self.config.eval_interval == 0 or self.step == self.config.max_steps
            )
            if evaluate_now or self.step % 10 == 0:  # reading the loss waits for the GPU
                _synchronize(self.device)
                self.train_seconds += time.perf_counter() - clock
                speed = self.tokens_seen / self.train_seconds
                train_loss = self._finite("training", float(self.world.average(loss)))
                bar.set_postfix(loss=f"{train_loss:.3f}", tok_s=f"{speed:,.0f}")
                if evaluate_now:
                    self._log_evaluation(train_loss=train_loss)
                    if self.out_dir is not None:
                        self.save_checkpoint()
                clock = time.perf_counter()
        bar.close()
        return self.final_metrics()

    # ------------------------------------------------------------------ evaluation

    def _evaluate(self, tokens: torch.Tensor, max_tokens: int | None) -> dict:
        return evaluate(
            self.model, tokens, self.config.batch_size, max_tokens, self.splits.tokenizer,
            self.config.precision, self.world,
        )  # fmt: skip

    @property
    def _writes_files(self) -> bool:
        """Whether this process writes the run's files: it has a run directory and is rank 0."""
        return self.out_dir is not None and self.world.is_main

    def _finite(self, what: str, loss: float) -> float:
        """``loss`` if it is finite, else stop with a message naming the step and what is kept."""
        if math.isfinite(loss):
            self._finite_step = self.step
            return loss
        if self.last_checkpoint is None:
            kept = "no checkpoint was written"
        else:
            path, step = self.last_checkpoint
            kept = f"the last good checkpoint, step {step}, is kept in {path}"
        raise NonFiniteLossError(
            f"the {what} loss is {loss} at step {self.step} (finite when last read, at step "
            f"{self._finite_step}); training stopped and {kept}. Start over (--force) with a "
            "lower learning rate (--lr), or look for bad input"
        )

    def _log_evaluation(self, train_loss: float | None) -> None:
        result = self._evaluate(self.splits.validation, self.config.eval_tokens)
        record = {
            "step": self.step,
            "tokens": self.tokens_seen,
            "train_loss": train_loss,
            "val_loss": self._finite("validation", result["loss"]),
            "val_bpb": result["bpb"],
            "val_memory": result["memory"],
            "train_seconds": self.train_seconds,
        }
        self.history.append(record)
        if self._writes_files:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            with (self.out_dir / LOG).open("a") as log:
                log.write(json.dumps(record) + "\n")

    def _write_log(self) -> None:
        # Rewrites log.jsonl from ``history``: drops records written after the last checkpoint.
        if self._writes_files:
            lines = "".join(json.dumps(record) + "\n" for record in self.history)
            atomic_write(self.out_dir / LOG, lambda path: path.write_text(lines))

    def final_metrics(self) -> dict:
        """Validation and test scores, parameter counts, speeds and memory usage of the model."""
        validation = self._evaluate(self.splits.validation, self.config.final_eval_tokens)
        test = self._evaluate(self.splits.test, self.config.final_eval_tokens)
        counts = self.model.parameter_counts()
        x = speed_batch(
            self.splits.validation, self.config.batch_size, self.model_config.block_size
        )
        speeds = inference_speeds(
            {"this model": self.model}, x.to(self.device), self.config.speed_repeats,
            self.config.precision,
        )  # fmt: skip
        metrics = {
            "steps": self.step,
            "tokens": self.tokens_seen,
            "train_seconds": self.train_seconds,
            "train_tokens_per_s": self.tokens_seen / max(self.train_seconds, 1e-9),
            "inference_tokens_per_s": speeds["this model"],
            **{f"val_{key}": validation[key] for key in ("loss", "ppl", "bpb", "tokens")},
            **{f"test_{key}": test[key] for key in ("loss", "ppl", "bpb", "tokens")},
            "params_total": counts["total"],
            "params_active": counts["active"],
            "memory": [
                {"layer": layer, **usage}
                for layer, usage in zip(
                    sorted(self.model_config.memory_layers), validation["memory"], strict=True
                )
            ],
        }
        if self._writes_files:
            final = {**run_configs(self.model_config, self.config), "metrics": metrics}
            text = json.dumps(final, indent=2) + "\n"
            atomic_write(self.out_dir / FINAL, lambda path: path.write_text(text))
        return metrics

    # ------------------------------------------------------------------ checkpoints

    def save_checkpoint(self, path: str | os.PathLike[str] | None = None) -> Path:
        """Save everything a resume needs (default ``<out_dir>/checkpoint.pt``), atomically.

        Under torchrun every rank calls it (it gathers their random states) and rank 0 writes.
        """
        path = self._checkpoint_path(path)
        ranks = self.world.gather(self._process_rng_state())  # every rank's dropout stream
        rng = {**ranks[0], "data": self.data_generator.get_state()}
        if self.world.distributed:
            rng["ranks"] = ranks
        state = {
            "format": _CHECKPOINT_FORMAT,
            **run_configs(self.model_config, self.config),
            "tokenizer": {
                "name": self.splits.tokenizer.name,
                "chars": getattr(self.splits.tokenizer, "chars", None),
            },
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "step": self.step,
            "train_seconds": self.train_seconds,
            "history": self.history,
            "rng": rng,
        }
        if self.world.is_main:
            atomic_write(path, lambda tmp: torch.save(state, tmp))
        self.world.barrier()  # no rank goes on (or reads it) before it is written
        self.last_checkpoint = (path, self.step)
        return path

    def _process_rng_state(self) -> dict[str, torch.Tensor]:
        """This process's global random state (dropout draws from it), CPU and CUDA."""
        state = {"torch": torch.get_rng_state()}
        if self.device.type == "cuda":
            state["cuda"] = torch.cuda.get_rng_state(self.device)
        return state

    def load_checkpoint(self, path: str | os.PathLike[str] | None = None) -> None:
        """Restore a checkpoint of the same configuration: the run goes on exactly as if never
        stopped (same batches, same learning rates, same random draws)."""
        path = self._checkpoint_path(path)
        state = load_checkpoint_state(path)
        saved = saved_configs(state)
        for key, current in run_configs(self.model_config, self.config).items():
            changed = _config_differences(saved[key], current)
            if changed:
                raise ValueError(
                    f"{path} was written with a different {key.replace('_', ' ')} "
                    f"(fields {', '.join(changed)}); start a new run or use the same settings"
                )
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.step, self.train_seconds = state["step"], state["train_seconds"]
        self.history = list(state["history"])
        self.last_checkpoint = (path, self.step)
        self.data_generator.set_state(state["rng"]["data"])
        # Each rank's own random state; a rank the checkpoint did not have starts a fresh stream.
        ranks = state["rng"].get("ranks", [state["rng"]])
        if self.world.rank < len(ranks):
            own = ranks[self.world.rank]
            torch.set_rng_state(own["torch"])
            if "cuda" in own and self.device.type == "cuda":
                torch.cuda.set_rng_state(own["cuda"], self.device)
        else:
            torch.manual_seed(self.config.seed + self.world.rank)
        self._write_log()

    def _checkpoint_path(self, path: str | os.PathLike[str] | None) -> Path:
        if path is not None:
            return Path(path)
        if self.out_dir is None:
            raise ValueError("this trainer has no out_dir: pass a checkpoint path")
        return self.out_dir / CHECKPOINT


def run_configs(model_config: ModelConfig, train_config: TrainConfig) -> dict:
    """Both configurations as they read back from JSON (tuples become lists), so saved and
    current configurations compare equal."""
    configs = {"model_config": asdict(model_config), "train_config": asdict(train_config)}
    return json.loads(json.dumps(configs))


def saved_configs(saved: dict) -> dict:
    """The configurations of a checkpoint or ``final.json``, rebuilt through their dataclasses
    and written as ``run_configs`` writes them: a field added since the run was saved (such as
    ``MemoryConfig.value_dtype``) reads back at its default, so the run still matches."""
    try:
        model_config = ModelConfig(**saved["model_config"])
        train_config = TrainConfig(**saved["train_config"])
    except (TypeError, ValueError):  # a field this version no longer has: as saved, no match
        return {key: saved[key] for key in ("model_config", "train_config")}
    return run_configs(model_config, train_config)


def load_checkpoint_state(path: str | os.PathLike[str]) -> dict:
    """The saved state of ``path`` (a checkpoint file or a run directory), on the CPU.

    Validated before use: a missing, empty, truncated or foreign file (another torch file, a
    JSON) raises ``FileNotFoundError`` or ``ValueError`` naming the file and what to pass instead,
    never torch's unpickling errors.
    """
    path = Path(path)
    if path.is_dir():
        path = path / CHECKPOINT
    remedy = "pass a run folder or the checkpoint.pt that `pkm-ref train` wrote"
    if not path.exists():
        raise FileNotFoundError(f"no checkpoint at {path}; {remedy}")
    if path.stat().st_size == 0:
        raise ValueError(f"{path} is empty, not a checkpoint; {remedy}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # zip, pickle, EOF, key errors...: each means "cannot be read"
        raise ValueError(
            f"{path} cannot be read as a checkpoint: it is truncated or another kind of file "
            f"(torch.load: {type(error).__name__}); {remedy}"
        ) from None
    if not isinstance(state, dict) or "format" not in state:
        raise ValueError(f"{path} is a torch file but not a pkm_ref checkpoint; {remedy}")
    if state["format"] != _CHECKPOINT_FORMAT:
        raise ValueError(
            f"{path} is a pkm_ref checkpoint of format {state['format']!r}, but this version "
            f"reads format {_CHECKPOINT_FORMAT}; use the version that wrote it, or train again"
        )
    wrong = [k for k, kind in _CHECKPOINT_FIELDS.items() if not isinstance(state.get(k), kind)]
    if wrong:
        raise ValueError(
            f"{path} is an incomplete pkm_ref checkpoint (missing or damaged: {', '.join(wrong)});"
            f" {remedy}"
        )
    return state


def resumable_step(
    out_dir: str | os.PathLike[str], model_config: ModelConfig, train_config: TrainConfig
) -> int | None:
    """The step of the checkpoint in ``out_dir`` if it is a run of these configurations (which
    ``train(..., resume=True)`` continues), else None."""
    checkpoint = Path(out_dir) / CHECKPOINT
    if not checkpoint.exists():
        return None
    state = load_checkpoint_state(checkpoint)
    matches = saved_configs(state) == run_configs(model_config, train_config)
    return state["step"] if matches else None


def train(
    model_config: ModelConfig,
    train_config: TrainConfig,
    out_dir: str | os.PathLike[str],
    splits: CorpusSplits | None = None,
    resume: bool = False,
    progress: bool = True,
) -> dict:
    """Train a model into ``out_dir`` (resuming its checkpoint if ``resume``); final metrics.

    If the run fails or is interrupted before its first checkpoint, the folders it created are
    removed; a folder that existed before, or one holding a checkpoint to resume, stays.
    """
    out_dir = Path(out_dir)
    created = outermost_missing(out_dir)
    main = World.current().is_main  # under torchrun, rank 0 alone writes and removes files
    try:
        trainer = Trainer(model_config, train_config, out_dir, splits)
        if resume:
            trainer.load_checkpoint()
        elif main:
            (out_dir / FINAL).unlink(missing_ok=True)
        return trainer.fit(progress)
    except BaseException:  # Ctrl-C too
        if main and not (out_dir / CHECKPOINT).exists():
            remove_created(out_dir, created)
        raise


def train_or_reuse(
    model_config: ModelConfig,
    train_config: TrainConfig,
    out_dir: str | os.PathLike[str],
    splits: CorpusSplits | None = None,
    force: bool = False,
    progress: bool = True,
) -> dict:
    """Final metrics of this configuration in ``out_dir``: reused if it finished, resumed if it
    was interrupted, else trained. ``force`` always trains from scratch."""
    out_dir = Path(out_dir)
    configs = run_configs(model_config, train_config)
    final = read_final(out_dir)
    if not force and final is not None and saved_configs(final) == configs:
        return final["metrics"]
    resume = not force and resumable_step(out_dir, model_config, train_config) is not None
    return train(model_config, train_config, out_dir, splits, resume, progress)
