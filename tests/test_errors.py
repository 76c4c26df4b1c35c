"""Bad input fails at once with an error that names the parameter and the value; on the command
line, in one line ``pkm-ref <command>: error: ...`` with exit code 2 (130 after Ctrl-C), with
nothing written or lost."""

import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from pkm_ref import (
    FlatKeyMemory,
    MaskedBatchNorm1d,
    ProductKeyMemory,
    QueryNetwork,
    bench,
    cli,
    experiment,
    flat_topk,
    product_topk,
    train_cli,
)
from pkm_ref.cost import product_memory_cost
from pkm_ref.data import load_corpus
from pkm_ref.model import MemoryConfig, ModelConfig
from pkm_ref.profiles import current_profile, default_device, profile_device, resolve_device
from pkm_ref.train import CHECKPOINT, FINAL, NonFiniteLossError, TrainConfig, Trainer, read_log


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        (dict(k_dim=7), ValueError, "k_dim must be even.*got 7"),
        (dict(k_dim=0), ValueError, "k_dim must be >= 1, got 0"),
        (dict(knn=0), ValueError, "knn must be >= 1, got 0"),
        (dict(n_keys=4, knn=17), ValueError, r"knn must be <= .*n_slots \(16\), got 17"),
        (dict(n_keys=0), ValueError, "n_keys must be >= 1, got 0"),
        (dict(heads=-1), ValueError, "heads must be >= 1, got -1"),
        (dict(input_dim=0), ValueError, "input_dim must be >= 1, got 0"),
        (dict(output_dim=2.5), TypeError, "output_dim must be an int, got float 2.5"),
        (dict(query_norm="rmsnorm"), ValueError, "query_norm must be one of .*'rmsnorm'"),
        (dict(value_dropout=1.0), ValueError, r"value_dropout must be in \[0, 1\), got 1.0"),
        (dict(knn=True), TypeError, "knn must be an int, got bool"),
    ],
)
def test_product_key_memory_arguments(kwargs, error, message):
    options = dict(input_dim=8, output_dim=8, n_keys=8, k_dim=8, heads=2, knn=4)
    with pytest.raises(error, match=message):
        ProductKeyMemory(**{**options, **kwargs})


def test_any_exact_integer_is_accepted():
    """numpy and 0-d tensor integers (e.g. from a config array) are sizes too; they become ints."""
    memory = ProductKeyMemory(8, np.int64(8), n_keys=np.int32(4), k_dim=torch.tensor(8), knn=2)
    assert (memory.output_dim, memory.n_keys, memory.k_dim) == (8, 4, 8)
    assert all(type(v) is int for v in (memory.output_dim, memory.n_keys, memory.k_dim))
    assert memory(torch.randn(3, 8)).shape == (3, 8)
    config = ModelConfig(d_model=np.int64(64), memory=MemoryConfig(n_keys=np.int64(8)))
    assert type(config.d_model) is int and type(config.memory.n_keys) is int
    cost = product_memory_cost(64, 64, n_keys=np.int64(8), k_dim=torch.tensor(16), knn=4)
    assert type(cost.multiply_adds) is int
    for not_a_size in (torch.tensor(True), torch.tensor([3]), torch.tensor(3.0)):
        with pytest.raises(TypeError, match="n_keys must be an int, got Tensor"):
            ProductKeyMemory(8, 8, n_keys=not_a_size, k_dim=8, knn=2)


def test_query_network_and_batchnorm_arguments():
    with pytest.raises(ValueError, match="heads must be >= 1, got 0"):
        QueryNetwork(4, 4, heads=0)
    with pytest.raises(TypeError, match=r"k_dim must be an int, got float 4\.0"):
        QueryNetwork(4, 4.0, heads=1)
    norm = MaskedBatchNorm1d(4)
    with pytest.raises(ValueError, match=r"mask must be a bool tensor of shape \(6,\).*\(5,\)"):
        norm(torch.randn(6, 4), torch.ones(5, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"mask must be a bool tensor.*got torch.float32"):
        norm(torch.randn(6, 4), torch.ones(6))


def test_flat_memory_arguments():
    with pytest.raises(ValueError, match="n_slots must be >= 1, got 0"):
        FlatKeyMemory(8, 8, n_slots=0)
    with pytest.raises(ValueError, match=r"knn must be <= .*\(10\), got 11"):
        FlatKeyMemory(8, 8, n_slots=10, k_dim=4, knn=11)


def test_forward_inputs():
    memory = ProductKeyMemory(8, 8, n_keys=4, k_dim=4, heads=1, knn=2)
    with pytest.raises(ValueError, match=r"x must have shape \(\.\.\., input_dim=8\), got \(2, 3"):
        memory(torch.randn(2, 3, 5))
    with pytest.raises(TypeError, match="x must have a floating dtype"):
        memory(torch.ones(2, 8, dtype=torch.long))
    with pytest.raises(TypeError, match=r"x must be a torch\.Tensor"):
        memory([[0.0] * 8])
    with pytest.raises(ValueError, match=r"mask must be a bool tensor of shape \(2, 3\)"):
        memory(torch.randn(2, 3, 8), mask=torch.ones(3, 2, dtype=torch.bool))
    with pytest.raises(ValueError, match="mask must be a bool tensor"):
        memory(torch.randn(2, 3, 8), mask=torch.ones(2, 3))
    with pytest.raises(ValueError, match="at least 2 real"):
        memory(torch.randn(2, 8), mask=torch.tensor([True, False]))


def test_search_inputs():
    subkeys = torch.randn(2, 4, 3)
    with pytest.raises(ValueError, match=r"query must have shape \(..., 6\).*got \(5, 4\)"):
        product_topk(torch.randn(5, 4), subkeys, 2)
    with pytest.raises(ValueError, match="subkeys must have shape"):
        product_topk(torch.randn(5, 6), torch.randn(3, 4, 3), 2)
    with pytest.raises(ValueError, match=r"knn must be <= .*\(16\), got 17"):
        product_topk(torch.randn(5, 6), subkeys, 17)
    with pytest.raises(ValueError, match=r"query must have shape \(..., 2, 6\)"):
        product_topk(torch.randn(5, 6), torch.randn(2, 2, 4, 3), 2)
    with pytest.raises(ValueError, match=r"knn must be <= the number of keys N \(4\), got 5"):
        flat_topk(torch.randn(3, 2), torch.randn(4, 2), 5)
    with pytest.raises(ValueError, match="keys must have shape"):
        flat_topk(torch.randn(3, 2), torch.randn(4), 1)
    with pytest.raises(TypeError, match="query must have a floating dtype"):
        flat_topk(torch.ones(3, 2, dtype=torch.long), torch.randn(4, 2), 1)


def test_keys_must_share_the_query_dtype_outside_autocast():
    """A float64 query against float32 keys fails naming both dtypes; under torch.autocast, where
    a bfloat16 query meets float32 keys on purpose, the search runs."""
    query, subkeys = torch.randn(5, 6, dtype=torch.float64), torch.randn(2, 4, 3)
    with pytest.raises(TypeError, match=r"subkeys \(torch.float32\) .* query \(torch.float64\)"):
        product_topk(query, subkeys, 2)
    with pytest.raises(TypeError, match="subkeys must have a floating dtype"):
        product_topk(query, torch.ones(2, 4, 3, dtype=torch.long), 2)
    with pytest.raises(TypeError, match=r"keys \(torch.float32\) .* query \(torch.float64\)"):
        flat_topk(query, torch.randn(4, 6), 2)
    with torch.autocast("cpu", torch.bfloat16):
        for search, keys in ((product_topk, subkeys), (flat_topk, torch.randn(4, 6))):
            scores, _ = search(query.to(torch.bfloat16), keys, 2)  # (5, 2)
            assert scores.shape == (5, 2)
            with pytest.raises(TypeError, match=r"\(torch.float64\) must have the dtype"):
                search(query.float(), keys.double(), 2)  # autocast leaves float64 alone


def test_devices_are_resolved_in_one_place():
    assert resolve_device(None) == resolve_device("auto") == default_device()
    assert resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(ValueError, match=r"device must be 'auto', 'cpu', 'cuda'.*got 'gpu0'"):
        resolve_device("gpu0")


@pytest.mark.skipif(hasattr(torch, "xpu") and torch.xpu.is_available(), reason="an XPU is here")
def test_a_device_this_torch_cannot_use_is_refused_at_once():
    with pytest.raises(ValueError, match="device 'xpu' was asked for, but this torch cannot use"):
        resolve_device("xpu")
    with pytest.raises(ValueError, match="device 'meta' holds shapes, not numbers"):
        resolve_device("meta")


def test_each_profile_has_its_own_default_device(monkeypatch):
    """On a machine with a GPU, the cpu and smoke profiles still run on the CPU (their results
    are filed as CPU results) and the gpu profile on the GPU; --device overrides."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert profile_device("gpu") == torch.device("cuda")
    assert profile_device("cpu") == profile_device("smoke") == torch.device("cpu")
    assert profile_device("cpu", "cuda") == torch.device("cuda")
    assert profile_device("gpu", "cpu") == torch.device("cpu")
    # A training config of a profile names the same device (notebooks build theirs that way).
    assert TrainConfig.for_profile("cpu").device == TrainConfig.for_profile("smoke").device == "cpu"
    assert profile_device("gpu", TrainConfig.for_profile("gpu").device) == torch.device("cuda")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message shown without CUDA")
def test_every_command_refuses_cuda_without_a_gpu(tmp_path, capsys):
    with pytest.raises(ValueError, match="no CUDA device here"):
        resolve_device("cuda")
    assert (
        cli.main(["train", "--profile", "smoke", "--device", "cuda", "--out", str(tmp_path)]) == 2
    )
    assert "pkm-ref train: error: device 'cuda' was asked for" in capsys.readouterr().err
    assert cli.main(["bench", "retrieval", "--profile", "smoke", "--device", "cuda"]) == 2
    assert "pkm-ref bench: error: device 'cuda' was asked for" in capsys.readouterr().err


def test_an_input_of_another_dtype_than_the_layer_names_both():
    """float16 into a float32 layer, outside autocast: both dtypes and the layer, not torch's
    "mat1 and mat2 must have the same dtype". Under autocast the mix is meant and runs."""
    layers = {
        "ProductKeyMemory": ProductKeyMemory(8, 8, n_keys=4, k_dim=4, heads=1, knn=2),
        "FlatKeyMemory": FlatKeyMemory(8, 8, n_slots=16, k_dim=4, heads=1, knn=2),
        "QueryNetwork": QueryNetwork(8, 4, heads=1),
    }
    for name, layer in layers.items():
        with pytest.raises(
            TypeError,
            match=rf"x \(torch.float16\) must have the dtype of the {name}'s parameters "
            r"\(torch.float32\)",
        ):
            layer(torch.randn(3, 8, dtype=torch.float16))
        with torch.autocast("cpu", torch.bfloat16):
            assert layer(torch.randn(3, 8, dtype=torch.bfloat16)).shape[0] == 3


# --- The command line: one line, exit code 2 -----------------------------------------------------


def _one_error_line(capsys: pytest.CaptureFixture[str], command: str) -> str:
    """The error a command printed: a single line with the command's prefix; returns its text."""
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    assert err.startswith(f"pkm-ref {command}: error: "), err
    return err


def test_a_bad_profile_variable_is_one_line_for_every_command(monkeypatch, capsys, tmp_path):
    """``import pkm_ref`` still works (a library user gets the ValueError when asking for the
    profile); each command prints one line, exit code 2, before any work."""
    monkeypatch.setenv("PKM_REF_PROFILE", "fast")
    with pytest.raises(ValueError, match=r"PKM_REF_PROFILE must be one of .* got 'fast'"):
        current_profile()
    monkeypatch.setattr(experiment, "compare", lambda *a, **k: pytest.fail("compare ran"))
    for argv in (
        ["demo"],
        ["train", "--out", str(tmp_path / "run")],
        ["compare", "--runs", str(tmp_path / "runs")],
        ["bench", "retrieval"],
        ["reproduce", "--list"],
    ):
        assert cli.main(argv) == 2
        line = _one_error_line(capsys, argv[0])
        assert "got 'fast': set it to one of them, or unset it" in line
    assert list(tmp_path.iterdir()) == []
    # End to end, as a user runs it: python -m pkm_ref, no traceback, exit code 2.
    env = {**os.environ, "PKM_REF_PROFILE": "fast"}
    done = subprocess.run(
        [sys.executable, "-m", "pkm_ref", "demo"], env=env, capture_output=True, text=True
    )
    assert done.returncode == 2
    assert done.stderr.startswith("pkm-ref demo: error: PKM_REF_PROFILE must be one of")
    assert done.stderr.count("\n") == 1


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """A real checkpoint of an untrained smoke model."""
    splits = load_corpus("sotu", max_chars=20_000)
    out = tmp_path_factory.mktemp("run")
    model = ModelConfig.for_profile("smoke")
    return Trainer(model, TrainConfig.for_profile("smoke"), out, splits).save_checkpoint()


def _damaged_files(checkpoint: Path, folder: Path) -> dict[str, tuple[Path, str]]:
    """name -> (file, what the message must say)."""
    state = torch.load(checkpoint, weights_only=True)
    files = {
        "empty": (b"", "is empty, not a checkpoint"),
        "truncated": (checkpoint.read_bytes()[:5000], "cannot be read as a checkpoint"),
        "json": (b'{"model": 1}', "cannot be read as a checkpoint"),
        "text": (b"hello", "cannot be read as a checkpoint"),
    }
    made = {name: (folder / f"{name}.pt", message) for name, (_, message) in files.items()}
    for name, (content, _) in files.items():
        made[name][0].write_bytes(content)
    torch_files = {
        "another torch dict": ({101: 1}, "is a torch file but not a pkm_ref checkpoint"),
        "a tensor": (torch.zeros(3), "is a torch file but not a pkm_ref checkpoint"),
        "a later format": ({**state, "format": 2}, "of format 2, but this version reads format 1"),
        "no model": (
            {k: v for k, v in state.items() if k != "model"},
            r"incomplete pkm_ref checkpoint \(missing or damaged: model\)",
        ),
    }
    for name, (content, message) in torch_files.items():
        path = folder / f"{name.replace(' ', '_')}.pt"
        torch.save(content, path)
        made[name] = (path, message)
    return made


def test_sample_names_a_file_that_is_not_a_checkpoint(checkpoint, tmp_path, capsys):
    """Truncated, empty, JSON, text, another torch file, another format, a missing field: each
    is one line naming the file and what to pass (no torch unpickling error)."""
    for name, (path, message) in _damaged_files(checkpoint, tmp_path).items():
        assert cli.main(["sample", str(path)]) == 2, name
        line = _one_error_line(capsys, "sample")
        assert re.search(message, line) and str(path) in line, (name, line)
        if "incomplete" not in message and "format 2" not in message:
            assert "pass a run folder or the checkpoint.pt that `pkm-ref train` wrote" in line
    assert cli.main(["sample", str(checkpoint), "--tokens", "3"]) == 0  # the real one works


def test_resume_validates_the_checkpoint_too(checkpoint, tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / CHECKPOINT).write_bytes(checkpoint.read_bytes()[:5000])
    argv = ["train", "--profile", "smoke", "--out", str(run), "--resume", "--quiet"]
    assert cli.main(argv) == 2
    assert "cannot be read as a checkpoint" in _one_error_line(capsys, "train")


@pytest.fixture
def unwritable(tmp_path) -> Path:
    """A folder in which nothing can be created, also for root (who ignores permissions):
    /sys refuses new entries to everyone; elsewhere a read-only folder."""
    if os.geteuid() == 0 and Path("/sys/kernel").is_dir():
        folder = Path("/sys/kernel/pkm_ref_test")
    else:
        locked = tmp_path / "locked"
        locked.mkdir()
        locked.chmod(0o500)
        folder = locked / "out"
    with pytest.raises(OSError):
        folder.mkdir(parents=True)
    return folder


def _refuse_work(monkeypatch):
    """Fail the test if any training or measuring starts."""
    monkeypatch.setattr(train_cli, "train", lambda *a, **k: pytest.fail("train ran"))
    monkeypatch.setattr(experiment, "train_or_reuse", lambda *a, **k: pytest.fail("train ran"))
    monkeypatch.setattr(bench, "machine_limits", lambda *a, **k: pytest.fail("bench measured"))


def test_an_unwritable_output_folder_is_refused_before_any_work(
    unwritable, tmp_path, monkeypatch, capsys
):
    """train, compare and bench check where they write before training or measuring: bench
    used to measure for minutes, then lose everything on the PermissionError."""
    _refuse_work(monkeypatch)
    smoke = ["--profile", "smoke"]
    assert cli.main(["train", *smoke, "--out", str(unwritable / "run")]) == 2
    line = _one_error_line(capsys, "train")
    assert f"cannot write to {unwritable / 'run'}" in line and "choose another --out" in line
    assert cli.main(["compare", *smoke, "--runs", str(unwritable)]) == 2
    assert "choose another --runs" in _one_error_line(capsys, "compare")
    monkeypatch.setenv("PKM_REF_FIGURES", str(unwritable))
    assert cli.main(["compare", *smoke, "--runs", str(tmp_path / "runs")]) == 2
    assert "set PKM_REF_FIGURES to a folder you can write" in _one_error_line(capsys, "compare")
    assert cli.main(["bench", "retrieval", *smoke]) == 2
    line = _one_error_line(capsys, "bench")
    assert f"cannot write to {unwritable}" in line and "set PKM_REF_FIGURES" in line
    assert list(tmp_path.iterdir()) in ([], [tmp_path / "locked"])  # nothing created


def test_an_output_folder_that_is_a_file_is_refused(tmp_path, monkeypatch, capsys):
    _refuse_work(monkeypatch)
    blocker = tmp_path / "notes.txt"
    blocker.write_text("mine")
    smoke = ["--profile", "smoke"]
    for argv, command, option in (
        (["train", *smoke, "--out", str(blocker)], "train", "--out"),
        (["train", *smoke, "--out", str(blocker / "run")], "train", "--out"),
        (["compare", *smoke, "--runs", str(blocker)], "compare", "--runs"),
    ):
        assert cli.main(argv) == 2
        line = _one_error_line(capsys, command)
        assert f"{blocker} is a file, not a folder; choose another {option}" in line
    monkeypatch.setenv("PKM_REF_FIGURES", str(blocker))
    assert cli.main(["bench", "retrieval", *smoke]) == 2
    assert "is a file, not a folder" in _one_error_line(capsys, "bench")
    assert blocker.read_text() == "mine"


def test_bench_reports_errors_like_every_command(capsys):
    """bench used to exit 1 through SystemExit, without its prefix; now as the others."""
    for flag in ("--repeat", "--threads"):
        assert cli.main(["bench", "retrieval", "--profile", "smoke", flag, "0"]) == 2
        assert f"{flag} must be >= 1, got 0" in _one_error_line(capsys, "bench")


def test_a_refused_run_removes_the_folder_it_created(tmp_path, capsys):
    """--max-chars 10 used to leave an empty run folder behind; a folder that existed before is
    never removed, nor anything in it."""
    new = tmp_path / "new" / "deeper" / "run"
    argv = ["train", "--profile", "smoke", "--max-chars", "10", "--quiet", "--out"]
    assert cli.main([*argv, str(new)]) == 2
    line = _one_error_line(capsys, "train")
    assert "the train split of 'sotu' has 10 tokens" in line and "--max-chars" in line
    assert list(tmp_path.iterdir()) == []
    existing = tmp_path / "existing"
    existing.mkdir()
    (existing / "notes.txt").write_text("mine")
    assert cli.main([*argv, str(existing)]) == 2
    _one_error_line(capsys, "train")
    assert [p.name for p in existing.iterdir()] == ["notes.txt"]


def test_a_non_finite_loss_stops_training_and_keeps_the_last_good_checkpoint(tmp_path):
    """One NaN batch at step 8 poisons the weights; the loss is read at step 10 (every 10 steps,
    where it is read anyway): training stops there, naming the step, and the checkpoint of step
    6 stays, never overwritten by a poisoned one."""
    model = ModelConfig.for_profile("smoke", memory_layers=(1,))
    trainer = Trainer(
        model, TrainConfig.for_profile("smoke"), tmp_path, load_corpus("sotu", max_chars=20_000)
    )

    def nan_loss_at_step_8(module, inputs, output):
        logits, loss = output
        return (logits, loss * float("nan")) if trainer.step == 7 else output

    trainer.model.register_forward_hook(nan_loss_at_step_8)
    with pytest.raises(
        NonFiniteLossError,
        match=r"the training loss is nan at step 10 \(finite when last read, at step 6\); "
        rf"training stopped and the last good checkpoint, step 6, is kept in {tmp_path}",
    ):
        trainer.fit(progress=False)
    state = torch.load(tmp_path / CHECKPOINT, weights_only=True)
    assert state["step"] == 6
    weights = [value for value in state["model"].values() if value.is_floating_point()]
    assert all(value.isfinite().all() for value in weights)
    assert [record["step"] for record in read_log(tmp_path)] == [0, 6]
    assert not (tmp_path / FINAL).exists()


def test_the_train_command_reports_a_non_finite_loss_in_one_line(tmp_path, monkeypatch, capsys):
    step = Trainer.train_step

    def diverging(self):
        loss = step(self)
        return loss * float("inf") if self.step > 6 else loss

    monkeypatch.setattr(Trainer, "train_step", diverging)
    out = tmp_path / "run"
    assert cli.main(["train", "--profile", "smoke", "--out", str(out), "--quiet"]) == 2
    line = _one_error_line(capsys, "train")
    assert "the training loss is inf at step 10" in line and "step 6, is kept in" in line
    assert torch.load(out / CHECKPOINT, weights_only=True)["step"] == 6


# --- Ctrl-C: one line, exit code 130 -------------------------------------------------------------

# ``pkm-ref train`` with each step slowed down, so that Ctrl-C reliably lands mid-run.
_SLOW_TRAIN = """
import sys, time
from pkm_ref import cli, train
step = train.Trainer.train_step
def slow_step(self):
    time.sleep(0.2)
    return step(self)
train.Trainer.train_step = slow_step
sys.exit(cli.main(sys.argv[1:]))
"""


def _interrupt_train(out: Path, when: str) -> subprocess.CompletedProcess:
    """Run a smoke ``pkm-ref train`` into ``out``; send SIGINT (Ctrl-C) once ``when`` exists."""
    argv = ["train", "--profile", "smoke", "--steps", "30", "--memory-layers", "mid"]
    process = subprocess.Popen(
        [sys.executable, "-c", _SLOW_TRAIN, *argv, "--out", str(out), "--quiet"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        # A shell that starts pytest in the background ignores SIGINT, and children inherit it.
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    deadline = time.monotonic() + 300
    while not (out / when).exists() and process.poll() is None:
        assert time.monotonic() < deadline, "the run never got there"
        time.sleep(0.02)
    process.send_signal(signal.SIGINT)
    stdout, stderr = process.communicate(timeout=120)
    return subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)


@pytest.mark.skipif(sys.platform == "win32", reason="SIGINT to a child needs POSIX")
def test_ctrl_c_during_train_says_where_the_checkpoint_is_and_how_to_resume(tmp_path):
    out = tmp_path / "run"
    done = _interrupt_train(out, CHECKPOINT)
    assert done.returncode == 130
    assert done.stderr.count("\n") == 1 and "Traceback" not in done.stderr, done.stderr
    assert done.stderr.startswith(
        f"pkm-ref train: interrupted: the last checkpoint, step 6, is in {out / CHECKPOINT}; "
        "resume with: pkm-ref train --profile smoke "
    )
    command = shlex.split(done.stderr.split("resume with: ")[1])
    assert command[:2] == ["pkm-ref", "train"] and "--resume" in command
    assert cli.main(command[1:]) == 0  # the printed command, as printed, finishes the run
    assert json.loads((out / FINAL).read_text())["metrics"]["steps"] == 30
    assert [record["step"] for record in read_log(out)] == [0, 6, 12, 18, 24, 30]


@pytest.mark.skipif(sys.platform == "win32", reason="SIGINT to a child needs POSIX")
def test_ctrl_c_before_the_first_checkpoint_leaves_no_folder(tmp_path):
    out = tmp_path / "new" / "run"
    done = _interrupt_train(out, "log.jsonl")  # written at step 0, the checkpoint at step 6
    assert done.returncode == 130
    assert done.stderr == (
        "pkm-ref train: interrupted: before the first checkpoint of this run, so there is "
        "nothing to resume: run the same command to start again\n"
    )
    assert list(tmp_path.iterdir()) == []


def test_ctrl_c_in_any_command_is_one_line_and_exit_code_130(monkeypatch, capsys):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(bench, "run_bench", interrupted)
    assert cli.main(["bench", "retrieval", "--profile", "smoke"]) == 130
    assert capsys.readouterr().err == "pkm-ref bench: interrupted: stopped by Ctrl-C\n"
    monkeypatch.setattr(experiment, "compare", interrupted)
    assert cli.main(["compare", "--profile", "smoke"]) == 130
    assert "finished models are reused" in capsys.readouterr().err
