"""Training on two processes (gloo, CPU) follows the one-process run; torchrun trains end to end.

The two processes start once for the module (``two_ranks``): starting them costs seconds.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from ranks import loopback_interface, run_on_ranks

from pkm_ref import cli
from pkm_ref.data import CorpusSplits, load_corpus
from pkm_ref.distributed import World, data_parallel, launcher
from pkm_ref.model import LanguageModel, ModelConfig
from pkm_ref.train import CHECKPOINT, FINAL, LOG, NonFiniteLossError, TrainConfig, Trainer, evaluate
from pkm_ref.train_cli import resume_command

DENSE = ModelConfig.for_profile("smoke")
MEMORY = ModelConfig.for_profile("smoke", memory_layers=(1,))  # batchnorm queries
SPARSE = dataclasses.replace(MEMORY, memory=dataclasses.replace(MEMORY.memory, sparse=True))
MODELS = {"dense": DENSE, "memory": MEMORY, "sparse memory": SPARSE}
TRAIN = TrainConfig.for_profile("smoke")  # global batch of 8: 4 rows per rank
STEPS = 4
# These feed only the memory's query batchnorm, which subtracts them again: their exact gradient
# is zero, and Adam, dividing by the root of the squared gradient, turns the rounding noise in its
# place into full steps, different on 1 and 2 processes. The loss does not depend on them.
ROUNDING_DRIVEN = {
    "blocks.1.ln_2.bias", "blocks.1.ffn.query.proj.bias", "blocks.1.ffn.query.norm.running_mean"
}  # fmt: skip
EVAL_TOKENS = 1_024


def _trajectory(model_config: ModelConfig, splits: CorpusSplits) -> dict:
    """The batch's loss at each of STEPS steps, then the model's state and a validation score."""
    trainer = Trainer(model_config, TRAIN, splits=splits)
    losses = [float(trainer.world.average(trainer.train_step())) for _ in range(STEPS)]
    scores = evaluate(
        trainer.model, splits.validation, TRAIN.batch_size, EVAL_TOKENS, world=trainer.world
    )
    return {
        "losses": losses,
        "state": trainer.model.state_dict(),
        "val_loss": scores["loss"],
        "val_tokens": scores["tokens"],
        "reads": [accumulator.counts for accumulator in scores["reads"]],
    }


def _resume(splits: CorpusSplits, run_dir: Path) -> dict:
    """Losses of steps 3-4 run on, and run again from the checkpoint of step 2 in a new trainer."""
    model_config = dataclasses.replace(MEMORY, dropout=0.1)  # each rank draws its own masks
    first = Trainer(model_config, TRAIN, run_dir, splits)
    for _ in range(2):
        first.train_step()
    first.save_checkpoint()
    uninterrupted = [float(first.train_step()) for _ in range(2)]
    torch.manual_seed(1234)  # a fresh process would start from another random state
    resumed = Trainer(model_config, TRAIN, run_dir, splits)
    resumed.load_checkpoint()
    return {
        "uninterrupted": uninterrupted,
        "resumed": [float(resumed.train_step()) for _ in range(2)],
        "files": sorted(path.name for path in run_dir.iterdir()),
    }


def _nan_on_rank_1(splits: CorpusSplits) -> str:
    """What fit() raises on this rank when rank 1 alone has a NaN weight."""
    trainer = Trainer(MEMORY, TRAIN, splits=splits)
    if trainer.world.rank == 1:
        with torch.no_grad():
            trainer.model.token_embedding.weight[0, 0] = float("nan")
    try:
        trainer.fit(progress=False)
    except NonFiniteLossError as error:
        return str(error)
    return "no error"


def _every_scenario(splits: CorpusSplits, run_dir: Path) -> dict:
    return {
        **{name: _trajectory(config, splits) for name, config in MODELS.items()},
        "resume": _resume(splits, run_dir),
        "nan": _nan_on_rank_1(splits),
    }


@pytest.fixture(scope="module")
def splits() -> CorpusSplits:
    return load_corpus("sotu", max_chars=20_000)


@pytest.fixture(scope="module")
def two_ranks(splits: CorpusSplits, tmp_path_factory: pytest.TempPathFactory) -> list[dict]:
    run_dir = tmp_path_factory.mktemp("run")
    return run_on_ranks(_every_scenario, 2, splits, run_dir)


@pytest.mark.parametrize("name", MODELS)
def test_two_processes_follow_the_one_process_trajectory(
    two_ranks: list[dict], splits: CorpusSplits, name: str
) -> None:
    """The same global batches on 1 and 2 processes: the same losses, up to the order of float
    sums (gradients averaged by DDP, batchnorm statistics over both ranks, sparse gradients
    all-reduced by gloo), and replicas that stay bit-identical."""
    one = _trajectory(MODELS[name], splits)
    rank_0, rank_1 = (result[name] for result in two_ranks)
    assert rank_0["losses"] == rank_1["losses"]  # every rank reads the averaged loss
    assert rank_0["losses"] == pytest.approx(one["losses"], rel=1e-5)
    for key, value in one["state"].items():
        assert torch.equal(rank_0["state"][key], rank_1["state"][key]), key
        if key in ROUNDING_DRIVEN:  # a random walk of Adam steps of at most lr each
            bound = 2 * STEPS * TRAIN.lr
            torch.testing.assert_close(rank_0["state"][key], value, rtol=0, atol=bound, msg=key)
        else:
            torch.testing.assert_close(rank_0["state"][key], value, rtol=1e-4, atol=1e-5, msg=key)


@pytest.mark.parametrize("name", MODELS)
def test_evaluation_is_sharded_and_summed(
    two_ranks: list[dict], splits: CorpusSplits, name: str
) -> None:
    """Each rank scores every other validation batch; the sums are those of one process
    evaluating the same model: the same reads, the same loss up to the order of the sum."""
    rank_0 = two_ranks[0][name]
    model = LanguageModel(MODELS[name])
    model.load_state_dict(rank_0["state"])
    one = evaluate(model, splits.validation, TRAIN.batch_size, EVAL_TOKENS)
    for result in (ranks[name] for ranks in two_ranks):
        assert result["val_tokens"] == one["tokens"] == EVAL_TOKENS
        assert result["val_loss"] == pytest.approx(one["loss"], rel=1e-9)
        for counts, accumulator in zip(result["reads"], one["reads"], strict=True):
            assert torch.equal(counts, accumulator.counts)


def test_resume_on_two_processes_is_exact(two_ranks: list[dict]) -> None:
    """Bit-identical: the same processes, states and reduction order as the run it continues,
    with every rank's own dropout stream restored; rank 0 alone wrote the files."""
    for result in (ranks["resume"] for ranks in two_ranks):
        assert result["resumed"] == result["uninterrupted"]
        assert result["files"] == [CHECKPOINT, LOG]  # and no temporary file
    rank_0, rank_1 = (ranks["resume"]["uninterrupted"] for ranks in two_ranks)
    assert rank_0 != rank_1  # the ranks' own slices (and dropout masks)


def test_a_nan_on_one_rank_stops_every_rank(two_ranks: list[dict]) -> None:
    """The validation loss is summed over the ranks: both see the NaN and stop, no rank hangs."""
    for result in two_ranks:
        assert result["nan"].startswith("the validation loss is nan at step 0")


def test_sparse_gradients_are_refused_under_nccl() -> None:
    """NCCL has no sparse all-reduce: refused before DistributedDataParallel or any collective."""
    model = LanguageModel(SPARSE)
    with pytest.raises(
        ValueError, match=r"sparse value gradients \(blocks.1.ffn.values: --sparse\).*NCCL"
    ):
        data_parallel(model, World(rank=0, size=2, backend="nccl"))


def test_a_global_batch_must_split_evenly() -> None:
    world = World(rank=1, size=4, backend="gloo")
    batch = torch.arange(24).view(8, 3)  # (B, T)
    assert torch.equal(world.shard(batch), batch[2:4])
    with pytest.raises(ValueError, match=r"batch_size 6 is the global batch.*multiple of 4"):
        world.local_batch_size(6)
    with pytest.raises(ValueError, match=r"names one GPU.*--device cuda"):
        world.device(torch.device("cuda:1"))


def test_resume_command_starts_as_many_processes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)  # one machine
    args = cli.build_parser().parse_args(["train", "--memory-layers", "mid", "--steps", "50"])
    command = resume_command(args, "cpu", tmp_path, World(rank=0, size=4))
    assert command.startswith("torchrun --nproc_per_node 4 -m pkm_ref train --profile cpu")
    assert "--resume" in command and "--steps 50" in command
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")  # two machines of two
    assert launcher(World(rank=0, size=4)) == [
        "torchrun", "--nnodes", "2", "--nproc_per_node", "2", "-m", "pkm_ref"
    ]  # fmt: skip
    assert launcher(World()) == ["pkm-ref"]


def test_other_commands_refuse_torchrun(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert cli.main(["sample", "missing"]) == 2
    assert "sample runs in one process; under torchrun only train" in capsys.readouterr().err


def test_torchrun_trains_from_the_command_line(tmp_path: Path) -> None:
    """The README's command, two CPU processes: rank 0 alone prints and writes the run."""
    out = tmp_path / "run"
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
        "-m", "pkm_ref", "train", "--profile", "smoke", "--memory-layers", "mid", "--steps", "4",
        "--out", str(out), "--quiet",
    ]  # fmt: skip
    loopback = {"GLOO_SOCKET_IFNAME": loopback_interface(), "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        command, env={**os.environ, **loopback}, capture_output=True, text=True, timeout=240
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("profile smoke: training") == 1
    metrics = json.loads(done.stdout[done.stdout.index("{") :])
    assert metrics["steps"] == 4 and metrics["tokens"] == 4 * TRAIN.batch_size * 32
    assert sorted(path.name for path in out.iterdir()) == [CHECKPOINT, FINAL, LOG]
    assert json.loads((out / FINAL).read_text())["metrics"] == metrics
