"""Training on more than one process: ``torchrun`` and DistributedDataParallel.

Not taught in a notebook (a notebook is one process): see the README's "More than one GPU".

    torchrun --nproc_per_node 2 -m pkm_ref train --profile smoke

starts one process per device; ``pkm-ref train`` joins them (``init_from_environment``: gloo on
CPU, NCCL on CUDA with rank r on ``cuda:LOCAL_RANK``) and ``pkm_ref.train.Trainer`` trains one
model on all of them:

* **Batches.** Every rank draws the same global batch from the same data generator and keeps its
  slice of ``batch_size / W`` rows (``World.shard``). The global batch, and with it the run, is the
  single-process run's: 1 and W processes follow the same trajectory, up to the order of
  floating-point sums (a test checks it).
* **Gradients.** ``DistributedDataParallel`` averages the gradients over the ranks during the
  backward pass. Each rank's loss is the mean over its slice, so the average is the gradient of
  the global batch's mean loss. The optimizer clips after it: clipping sees the global gradient.
* **Value tables.** Dense value gradients are all-reduced with the others. Sparse ones
  (``sparse=True``, SparseAdam) need an all-reduce of sparse tensors: gloo has one (an all-gather
  of indices and values; torch PR 22036), NCCL none (``ProcessGroupNCCL::allreduce_sparse``
  raises "allreduce_sparse is only available in the NCCL experimental branch"; pytorch/pytorch
  issue 22400 is still open). So sparse tables train on CPU processes and are refused on GPUs
  before anything starts (``data_parallel``). ``pkm_ref.sharded_values`` splits a table over the
  ranks instead of copying it.
* **Batchnorm queries.** Statistics of a slice are not those of the batch: the memories'
  ``MaskedBatchNorm1d`` take theirs over every rank (``process_group``), as SyncBatchNorm does, so
  the running averages are also the same on every rank.
* **Evaluation** is sharded: rank r scores evaluation batches r, r + W, ...; the losses and the
  memories' reads are summed over the ranks (``sum_usage``).
* **Files.** Rank 0 alone writes the log, the checkpoints (atomically) and ``final.json``, and
  shows the progress bar. A checkpoint holds every rank's random state (dropout), so a resume on
  the same number of processes continues exactly.
* **Failures.** Every rank reads the same averaged training loss and the same summed validation
  loss, so a NaN stops all of them at the same step, each with ``NonFiniteLossError``. An error on
  one rank alone ends its process; the others fail at their next collective (gloo: the connection
  closes) and torchrun stops every worker when one fails. Ctrl-C reaches every process: rank 0
  names the checkpoint and the command that resumes it, the others say they stopped.
"""

from __future__ import annotations

import atexit
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from pkm_ref.profiles import resolve_device
from pkm_ref.query import MaskedBatchNorm1d
from pkm_ref.usage import UsageAccumulator

BACKENDS = {"cpu": "gloo", "cuda": "nccl"}  # device type -> torch.distributed backend


@dataclass(frozen=True)
class World:
    """Where this process stands among those training together (one process: the defaults).

    ``rank``: 0 to ``size - 1``; ``local_rank``: its index on its machine (its GPU);
    ``backend``: "gloo", "nccl", or None for a single process.
    """

    rank: int = 0
    size: int = 1
    local_rank: int = 0
    backend: str | None = None

    @classmethod
    def current(cls) -> World:
        """This process's world: from ``torch.distributed`` once initialised, else one process."""
        if not (dist.is_available() and dist.is_initialized()):
            return cls()
        rank = dist.get_rank()
        local_rank = int(os.environ.get("LOCAL_RANK", rank))
        return cls(rank, dist.get_world_size(), local_rank, dist.get_backend())

    @property
    def is_main(self) -> bool:
        """Rank 0: the process that writes files and prints."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1

    def device(self, device: torch.device) -> torch.device:
        """The device this rank trains on: ``cuda:local_rank`` for CUDA, else ``device``."""
        if not self.distributed or device.type != "cuda":
            return device
        if device.index is not None:
            raise ValueError(
                f"device {str(device)!r} names one GPU, but under torchrun each process takes "
                "its own (cuda:LOCAL_RANK): pass --device cuda"
            )
        return torch.device("cuda", self.local_rank)

    def local_batch_size(self, batch_size: int) -> int:
        """Rows of a global batch of ``batch_size`` that each rank computes."""
        if batch_size % self.size:
            raise ValueError(
                f"batch_size {batch_size} is the global batch and must split evenly over the "
                f"{self.size} processes: use a multiple of {self.size}"
            )
        return batch_size // self.size

    def shard(self, batch: torch.Tensor) -> torch.Tensor:
        """This rank's rows of a global batch (B, ...): rows rank * B/W to (rank + 1) * B/W."""
        rows = self.local_batch_size(batch.shape[0])
        return batch[self.rank * rows : (self.rank + 1) * rows]  # (B / W, ...)

    def sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """The sum of ``tensor`` over the ranks, on ``tensor``'s device: a collective (on one
        process, ``tensor`` itself)."""
        if not self.distributed:
            return tensor
        home = torch.device("cuda", self.local_rank) if self.backend == "nccl" else "cpu"
        total = tensor.detach().to(home, copy=True)  # NCCL reduces CUDA tensors only
        dist.all_reduce(total)
        return total.to(tensor.device)

    def average(self, tensor: torch.Tensor) -> torch.Tensor:
        """The mean of ``tensor`` over the ranks: a collective."""
        return self.sum(tensor) / self.size

    def gather(self, value: object) -> list:
        """Every rank's ``value`` (picklable), in rank order, on every rank: a collective."""
        if not self.distributed:
            return [value]
        values: list = [None] * self.size
        dist.all_gather_object(values, value)
        return values

    def barrier(self) -> None:
        """Wait until every rank gets here."""
        if self.distributed:
            dist.barrier()


def init_from_environment(device: str) -> World:
    """Join the processes that ``torchrun`` started, once; a single process is left alone.

    ``torchrun`` sets ``WORLD_SIZE``, ``RANK``, ``LOCAL_RANK``, ``MASTER_ADDR`` and
    ``MASTER_PORT``. The backend follows ``device`` (a ``TrainConfig.device``): gloo for the CPU,
    NCCL for CUDA (and this process's GPU becomes ``cuda:LOCAL_RANK``). The process group is
    destroyed when the process exits.
    """
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size == 1 or dist.is_initialized():
        return World.current()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    own = World(size=size, local_rank=local_rank).device(resolve_device(device))
    if own.type not in BACKENDS:
        raise ValueError(
            f"training on several processes runs on the CPU (gloo) or on CUDA GPUs (NCCL), not "
            f"on {own.type!r}: pass --device cpu or --device cuda"
        )
    if own.type == "cuda":
        torch.cuda.set_device(resolve_device(str(own)))  # checks that this GPU exists
    dist.init_process_group(BACKENDS[own.type])
    atexit.register(dist.destroy_process_group)
    return World.current()


def data_parallel(model: nn.Module, world: World) -> nn.Module:
    """``model`` ready to train on every rank of ``world``: wrapped in DistributedDataParallel,
    its batchnorm queries taking statistics over all ranks. ``model`` itself on one process.

    Raises ``ValueError`` before any communication when the backend cannot train the model:
    sparse gradients under NCCL (see the module docstring).
    """
    if not world.distributed:
        return model
    sparse = [
        name
        for name, m in model.named_modules()
        if isinstance(m, (nn.Embedding, nn.EmbeddingBag)) and m.sparse
    ]
    if sparse and world.backend == "nccl":
        raise ValueError(
            f"sparse value gradients ({', '.join(sparse)}: --sparse) cannot be trained on "
            "several GPUs: NCCL has no all-reduce for sparse tensors. Drop --sparse (the dense "
            "value gradients are all-reduced), or train on CPU processes (gloo has one)"
        )
    for module in model.modules():
        if isinstance(module, MaskedBatchNorm1d):
            module.process_group = dist.group.WORLD
    device = next(model.parameters()).device
    # DDP also broadcasts rank 0's buffers (the batchnorm averages) before each forward pass:
    # they are equal on every rank already, so that changes nothing.
    return DistributedDataParallel(
        model, device_ids=[device.index] if device.type == "cuda" else None
    )


def sum_usage(accumulator: UsageAccumulator, world: World) -> None:
    """Add up, in place, what every rank's ``accumulator`` recorded: a collective."""
    accumulator.counts = world.sum(accumulator.counts)
    accumulator.weight_sums = world.sum(accumulator.weight_sums)
    accumulator.n_reads = int(world.sum(torch.tensor(accumulator.n_reads)))


def launcher(world: World) -> list[str]:
    """The words that start a command on as many processes as ``world``: ``pkm-ref``, or
    ``torchrun --nproc_per_node N -m pkm_ref`` (plus ``--nnodes`` over several machines, whose
    rendezvous options are yours to add)."""
    if not world.distributed:
        return ["pkm-ref"]
    per_node = int(os.environ.get("LOCAL_WORLD_SIZE", world.size))
    nodes = ["--nnodes", str(world.size // per_node)] if per_node < world.size else []
    return ["torchrun", *nodes, "--nproc_per_node", str(per_node), "-m", "pkm_ref"]
