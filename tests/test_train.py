"""The trainer: optimizer split, schedule, learning, exact resume, atomic saves, CLI commands."""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
from pathlib import Path

import pytest
import torch

from pkm_ref import cli
from pkm_ref.data import CorpusSplits, load_corpus
from pkm_ref.experiment import run_name, variants
from pkm_ref.model import MEMORY_KINDS, ModelConfig
from pkm_ref.train import (
    CHECKPOINT,
    FINAL,
    LOG,
    TrainConfig,
    Trainer,
    evaluate,
    learning_rate,
    read_log,
    train_or_reuse,
)
from pkm_ref.train_cli import build_configs

MEMORY_MODEL = ModelConfig.for_profile("smoke", memory_layers=(1,))
TRAIN = TrainConfig.for_profile("smoke")


@pytest.fixture(scope="module")
def splits() -> CorpusSplits:
    return load_corpus("sotu", max_chars=20_000)


def test_learning_rate_warms_up_then_decays_to_min() -> None:
    config = TrainConfig(max_steps=100, warmup_steps=10, lr=1e-3, min_lr=1e-4)
    rates = [learning_rate(step, config) for step in range(101)]
    assert rates[0] == pytest.approx(1e-4) and rates[9] == pytest.approx(1e-3)
    assert all(a >= b for a, b in itertools.pairwise(rates[9:]))
    assert rates[100] == pytest.approx(1e-4)


def test_value_tables_get_their_own_optimizer(splits: CorpusSplits) -> None:
    trainer = Trainer(MEMORY_MODEL, TRAIN, splits=splits)
    (memory,) = trainer.model.memory_layers()
    dense = {id(p) for g in trainer.optimizer.dense.param_groups for p in g["params"]}
    values = [p for g in trainer.optimizer.values.param_groups for p in g["params"]]
    assert values == [memory.values.weight] and id(memory.values.weight) not in dense
    assert trainer.optimizer.values.param_groups[0]["lr"] == TRAIN.value_lr
    assert len(dense) + 1 == len(list(trainer.model.parameters()))


def test_sparse_values_train_with_sparse_adam(splits: CorpusSplits) -> None:
    memory = dataclasses.replace(MEMORY_MODEL.memory, sparse=True)
    trainer = Trainer(dataclasses.replace(MEMORY_MODEL, memory=memory), TRAIN, splits=splits)
    assert isinstance(trainer.optimizer.sparse_values, torch.optim.SparseAdam)
    before = trainer.model.memory_layers()[0].values.weight.detach().clone()
    trainer.train_step()
    assert not torch.equal(before, trainer.model.memory_layers()[0].values.weight)


@pytest.mark.parametrize("value_dtype", ["float32", "bfloat16"])
def test_a_few_steps_reduce_the_loss(splits: CorpusSplits, value_dtype: str) -> None:
    config = dataclasses.replace(TRAIN, max_steps=30, warmup_steps=3, lr=3e-3)
    memory = dataclasses.replace(MEMORY_MODEL.memory, value_dtype=value_dtype)
    trainer = Trainer(dataclasses.replace(MEMORY_MODEL, memory=memory), config, splits=splits)
    sample = splits.train[:4_097]
    before = evaluate(trainer.model, sample, 8)["loss"]
    for _ in range(30):
        trainer.train_step()
    assert evaluate(trainer.model, sample, 8)["loss"] < before - 1.0


def test_evaluate_reports_bits_per_byte_and_memory_usage(splits: CorpusSplits) -> None:
    trainer = Trainer(MEMORY_MODEL, TRAIN, splits=splits)
    result = evaluate(trainer.model, splits.validation, 8, max_tokens=1_024)
    assert result["tokens"] == 1_024 and result["bpb"] == pytest.approx(
        result["loss"] / math.log(2)
    )
    (usage,) = result["memory"]
    assert 0 < usage["usage"] <= 1 and usage["kl"] >= 0 and usage["weighted_kl"] >= 0
    (memory,) = trainer.model.memory_layers()
    assert not memory.record_usage and memory.last_indices is None and trainer.model.training


@pytest.mark.parametrize(
    "kind, value_dtype", [(kind, "float32") for kind in MEMORY_KINDS] + [("product", "bfloat16")]
)
def test_resume_continues_exactly(
    tmp_path: Path, splits: CorpusSplits, kind: str, value_dtype: str
) -> None:
    """bfloat16 values too: the checkpoint carries their float32 masters."""
    model_config = dataclasses.replace(
        MEMORY_MODEL,
        dropout=0.1,  # draws from the global RNG
        memory=dataclasses.replace(MEMORY_MODEL.memory, kind=kind, value_dtype=value_dtype),
    )
    first = Trainer(model_config, TRAIN, tmp_path, splits)
    for _ in range(4):
        first.train_step()
    first.save_checkpoint()
    uninterrupted = [float(first.train_step()) for _ in range(3)]
    torch.manual_seed(1234)  # a fresh process would start from another RNG state
    resumed = Trainer(model_config, TRAIN, tmp_path, splits)
    resumed.load_checkpoint()
    assert resumed.step == 4
    assert [float(resumed.train_step()) for _ in range(3)] == uninterrupted


def test_resume_refuses_another_configuration(tmp_path: Path, splits: CorpusSplits) -> None:
    Trainer(MEMORY_MODEL, TRAIN, tmp_path, splits).save_checkpoint()
    other = Trainer(MEMORY_MODEL, dataclasses.replace(TRAIN, lr=5e-3), tmp_path, splits)
    with pytest.raises(ValueError, match=r"different train config.*lr"):
        other.load_checkpoint()


def test_failed_save_leaves_previous_checkpoint_intact(
    tmp_path: Path, splits: CorpusSplits, monkeypatch: pytest.MonkeyPatch
) -> None:
    trainer = Trainer(MEMORY_MODEL, TRAIN, tmp_path, splits)
    trainer.train_step()
    path = trainer.save_checkpoint()
    saved = path.read_bytes()

    def crash_midway(obj, file, *args, **kwargs):
        Path(file).write_bytes(b"half a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", crash_midway)
    trainer.train_step()
    with pytest.raises(OSError, match="disk full"):
        trainer.save_checkpoint()
    assert path.read_bytes() == saved
    assert [p.name for p in tmp_path.iterdir()] == [CHECKPOINT]  # no temporary file left
    monkeypatch.undo()
    restored = Trainer(MEMORY_MODEL, TRAIN, tmp_path, splits)
    restored.load_checkpoint()
    assert restored.step == 1


def test_fit_logs_and_reuses_finished_runs(
    tmp_path: Path, splits: CorpusSplits, monkeypatch: pytest.MonkeyPatch
) -> None:
    metrics = train_or_reuse(MEMORY_MODEL, TRAIN, tmp_path, splits, progress=False)
    log = read_log(tmp_path)
    assert [r["step"] for r in log] == [0, 6, 12] and log[-1]["tokens"] == metrics["tokens"]
    assert {"val_bpb", "test_bpb", "params_active", "inference_tokens_per_s"} <= set(metrics)
    assert json.loads((tmp_path / FINAL).read_text())["metrics"] == metrics

    def no_training(self, progress=True):
        raise AssertionError("a finished run was trained again")

    monkeypatch.setattr(Trainer, "fit", no_training)
    assert train_or_reuse(MEMORY_MODEL, TRAIN, tmp_path, splits) == metrics
    with pytest.raises(AssertionError, match="trained again"):
        train_or_reuse(MEMORY_MODEL, TRAIN, tmp_path, splits, force=True)


def test_runs_saved_before_a_config_field_existed_still_match(
    tmp_path: Path, splits: CorpusSplits, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A final.json or checkpoint without ``value_dtype`` and ``kernels`` (older runs) is the run
    with float32 values and "auto" kernels: reused and resumable, not retrained; a bfloat16 run,
    or one with kernels chosen, of the same model is another run."""
    metrics = train_or_reuse(MEMORY_MODEL, TRAIN, tmp_path, splits, progress=False)
    final = json.loads((tmp_path / FINAL).read_text())
    state = torch.load(tmp_path / CHECKPOINT, weights_only=True)
    for saved in (final, state):
        del saved["model_config"]["memory"]["value_dtype"]
        del saved["model_config"]["memory"]["kernels"]
    (tmp_path / FINAL).write_text(json.dumps(final))
    torch.save(state, tmp_path / CHECKPOINT)
    trainer = Trainer(MEMORY_MODEL, TRAIN, tmp_path, splits)
    trainer.load_checkpoint()  # no "different model config" error
    assert trainer.step == TRAIN.max_steps

    def no_training(self, progress=True):
        raise AssertionError("a finished run was trained again")

    monkeypatch.setattr(Trainer, "fit", no_training)
    assert train_or_reuse(MEMORY_MODEL, TRAIN, tmp_path, splits) == metrics
    bfloat16 = dataclasses.replace(
        MEMORY_MODEL, memory=dataclasses.replace(MEMORY_MODEL.memory, value_dtype="bfloat16")
    )
    torch_kernels = dataclasses.replace(
        MEMORY_MODEL, memory=dataclasses.replace(MEMORY_MODEL.memory, kernels="torch")
    )
    for other in (bfloat16, torch_kernels):
        with pytest.raises(AssertionError, match="trained again"):
            train_or_reuse(other, TRAIN, tmp_path, splits)


def test_train_and_sample_commands_end_to_end(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "run"
    argv = ["train", "--profile", "smoke", "--memory-layers", "mid", "--out", str(out), "--quiet"]
    assert cli.main(argv) == 0
    assert (out / CHECKPOINT).exists() and (out / LOG).exists() and (out / FINAL).exists()
    assert json.loads((out / FINAL).read_text())["model_config"]["memory_layers"] == [1]
    assert cli.main(argv) == 2  # a second run into the same folder must be asked for
    assert "--resume" in capsys.readouterr().err
    assert cli.main(["sample", str(out), "--prompt", "The Congress", "--tokens", "30"]) == 0
    text = capsys.readouterr().out
    assert text.startswith("The Congress") and len(text) > len("The Congress")


@pytest.mark.parametrize("steps", [1, 2, 50])
def test_short_runs_shrink_warmup_and_eval_interval(steps: int) -> None:
    """``--steps`` below the profile's warm-up must give a valid schedule, not an error."""
    args = cli.build_parser().parse_args(
        ["train", "--profile", "smoke", "--memory-layers", "mid", "--compiled-read",
         "--steps", str(steps)]
    )  # fmt: skip
    model_config, train_config = build_configs(args, "smoke")
    assert train_config.max_steps == steps and model_config.memory.compiled_read
    assert model_config.memory.value_dtype == "float32"
    assert 0 <= train_config.warmup_steps < steps and train_config.eval_interval <= steps
    assert train_config.warmup_steps == min(TRAIN.warmup_steps, steps // 10)
    assert TrainConfig.for_profile("smoke", max_steps=steps) == train_config  # the same rule
    assert TrainConfig.for_profile("smoke", max_steps=2, warmup_steps=1).warmup_steps == 1
    with pytest.raises(ValueError, match=r"max_steps \(--steps\) must be >= 1, got 0"):
        TrainConfig.for_profile("smoke", max_steps=0)


def test_value_dtype_flag_names_its_own_run() -> None:
    """``--value-dtype bfloat16`` reaches MemoryConfig and trains into its own directory."""
    argv = ["train", "--profile", "smoke", "--memory-layers", "mid", "--value-dtype", "bfloat16"]
    model_config, _ = build_configs(cli.build_parser().parse_args(argv), "smoke")
    assert model_config.memory.value_dtype == "bfloat16"
    assert run_name(model_config) == "pkm-2L-n8-bf16" and run_name(MEMORY_MODEL) == "pkm-2L-n8"
    with pytest.raises(SystemExit):  # argparse: invalid choice
        cli.build_parser().parse_args([*argv[:-1], "float16"])


def test_kernels_flag_reaches_the_memory_and_names_its_run() -> None:
    """``--kernels triton`` reaches MemoryConfig and trains into its own directory; "auto" keeps
    the name runs had before the option existed; a dense model has no kernels to choose."""
    argv = ["train", "--profile", "smoke", "--memory-layers", "mid", "--kernels", "triton"]
    model_config, _ = build_configs(cli.build_parser().parse_args(argv), "smoke")
    assert model_config.memory.kernels == "triton"
    assert run_name(model_config) == "pkm-2L-n8-triton"
    auto = cli.build_parser().parse_args([*argv[:-2], "--value-dtype", "bfloat16"])
    model_config, _ = build_configs(auto, "smoke")
    assert model_config.memory.kernels == "auto" and run_name(model_config) == "pkm-2L-n8-bf16"
    dense = cli.build_parser().parse_args(["train", "--profile", "smoke", "--kernels", "torch"])
    with pytest.raises(ValueError, match="memory options need --memory-layers"):
        build_configs(dense, "smoke")


def test_compare_gives_the_kernels_to_the_memory_models_only() -> None:
    """``compare --kernels``: the dense runs stay the runs of any other kernels (reused)."""
    models = {v.role: v for v in variants("smoke", kernels="torch")}
    assert models["memory"].config.memory.kernels == "torch"
    assert models["memory"].name == "pkm-2L-n8-torch"
    plain = {v.role: v for v in variants("smoke")}
    for role in ("shallow", "deep"):
        assert models[role] == plain[role]
    assert plain["memory"].name == "pkm-2L-n8"


def test_a_shorter_run_keeps_the_shape_of_the_schedule() -> None:
    """Warm-up is at most a tenth of a run shorter than the profile's, with no jump in between
    (74 steps had 7 steps of warm-up and 75 steps 60), and the profile's own run is unchanged."""
    full = TrainConfig.for_profile("cpu")
    steps, warmup = full.max_steps, full.warmup_steps
    assert warmup == steps // 10
    warmups = [TrainConfig.for_profile("cpu", max_steps=s).warmup_steps for s in range(1, steps)]
    assert warmups == [min(warmup, s // 10) for s in range(1, steps)]
    assert TrainConfig.for_profile("cpu", max_steps=2 * steps).warmup_steps == warmup


def test_the_peak_learning_rate_is_the_peak() -> None:
    """``--lr`` below the profile's floor once made the rate climb above the peak: the floor
    now keeps its ratio to the peak, and a floor above the peak is refused."""
    config = TrainConfig.for_profile("cpu", lr=1e-4)
    assert config.min_lr == pytest.approx(1e-5)  # the cpu profile's 3e-3 -> 3e-4 is a tenth
    assert max(learning_rate(s, config) for s in range(config.max_steps)) == pytest.approx(1e-4)
    assert TrainConfig.for_profile("cpu", lr=1e-4, min_lr=0.0).min_lr == 0.0
    with pytest.raises(ValueError, match=r"0 <= min_lr <= lr .* lr=0.0001, min_lr=0.0003"):
        TrainConfig.for_profile("cpu", lr=1e-4, min_lr=3e-4)


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("batch_size", 0, "batch_size must be >= 1, got 0"),
        ("eval_interval", 0, "eval_interval must be >= 1, got 0"),
        ("speed_repeats", 0, "speed_repeats must be >= 1, got 0"),
        ("eval_tokens", 0, "eval_tokens must be >= 1, got 0"),
        ("final_eval_tokens", -5, "final_eval_tokens must be >= 1, got -5"),
        ("max_chars", 0, "max_chars must be >= 1, got 0"),
        ("value_lr", 0.0, "value_lr must be > 0, got 0.0"),
    ],
)
def test_train_config_refuses_bad_values_before_training(field, value, message) -> None:
    with pytest.raises(ValueError, match=message):
        TrainConfig.for_profile("smoke", **{field: value})


def test_commands_explain_bad_input(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = str(tmp_path / "run")
    assert cli.main(["train", "--profile", "smoke", "--memory-layers", "7", "--out", out]) == 2
    assert "memory layer index 7 is out of range" in capsys.readouterr().err
    assert cli.main(["train", "--profile", "smoke", "--out", out, "--resume"]) == 2
    assert "no checkpoint" in capsys.readouterr().err
    assert cli.main(["train", "--profile", "smoke", "--out", out, "--resume", "--force"]) == 2
    assert "pass one of them" in capsys.readouterr().err
    assert cli.main(["train", "--profile", "smoke", "--out", out, "--batch-size", "0"]) == 2
    assert "batch_size must be >= 1, got 0" in capsys.readouterr().err
    both = ["--memory-layers", "mid", "--sparse", "--compiled-read", "--steps", "2"]
    assert cli.main(["train", "--profile", "smoke", "--out", out, *both]) == 2
    assert "cannot be combined with sparse=True" in capsys.readouterr().err
    assert cli.main(["sample", str(tmp_path / "missing")]) == 2
    assert "no checkpoint" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main(["train", "--corpus", "ptb"])
    assert "invalid choice: 'ptb'" in capsys.readouterr().err


def test_compare_smoke_writes_results_and_skips_finished_models(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PKM_REF_FIGURES", str(tmp_path / "figures"))
    argv = ["compare", "--profile", "smoke", "--runs", str(tmp_path / "runs"), "--quiet"]
    assert cli.main(argv) == 0
    results = json.loads((tmp_path / "figures" / "lm_comparison.json").read_text())
    roles = [row["role"] for row in results["rows"]]
    assert roles == ["shallow", "deep", "sweep", "memory"] and results["meta"]["profile"] == "smoke"
    for row in results["rows"]:  # two seeds at smoke: every number a mean with its interval
        assert row["seeds"] == 2 and row["test_bpb"]["n"] == 2 and row["infer_tok_s"]["n"] == 2
        assert row["test_bpb"]["low"] <= row["test_bpb"]["mean"] <= row["test_bpb"]["high"]
    table = (tmp_path / "figures" / "lm_comparison.md").read_text()
    assert " ± " in table and table.count("Claim: **") == 2
    for name in ("lm_comparison.md", "lm_learning_curves.png", "lm_memory_sweep.png"):
        assert (tmp_path / "figures" / name).exists()
    runs = tmp_path / "runs" / "smoke"
    assert sorted(p.parent.name for p in runs.glob("dense-2L/*/final.json")) == ["seed-0", "seed-1"]
    monkeypatch.setattr(Trainer, "fit", lambda *a, **k: pytest.fail("finished model retrained"))
    assert cli.main(argv) == 0
    # `pkm-ref train` with the same settings records the same run identity, so the two commands
    # reuse each other's runs (the command once recorded the device as typed, "auto").
    final = json.loads(next(runs.glob("*/seed-0/final.json")).read_text())
    _, train_config = build_configs(
        cli.build_parser().parse_args(["train", "--profile", "smoke"]), "smoke"
    )
    assert final["train_config"] == dataclasses.asdict(train_config)
