"""Bad input fails at once with an error that names the parameter and the value."""

import numpy as np
import pytest
import torch

from pkm_ref import (
    FlatKeyMemory,
    MaskedBatchNorm1d,
    ProductKeyMemory,
    QueryNetwork,
    cli,
    flat_topk,
    product_topk,
)
from pkm_ref.cost import product_memory_cost
from pkm_ref.model import MemoryConfig, ModelConfig
from pkm_ref.profiles import default_device, profile_device, resolve_device
from pkm_ref.train import TrainConfig


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
    assert "no CUDA device here" in capsys.readouterr().err
    with pytest.raises(SystemExit, match="no CUDA device here"):
        cli.main(["bench", "retrieval", "--profile", "smoke", "--device", "cuda"])
