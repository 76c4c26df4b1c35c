"""Run a function on several CPU processes joined by torch.distributed (gloo), for the tests.

``run_on_ranks(function, world_size, *args)`` starts ``world_size`` fresh processes (spawn, as
torchrun does: nothing inherited but the arguments), joins them in one gloo process group that
talks over the loopback interface only, calls ``function(*args)`` on each and returns what each
returned, in rank order. Bounded: a hang, or a rank that dies, fails the test within ``timeout``
seconds instead of blocking CI; an exception on a rank is raised here with that rank's traceback.

``function`` must be importable by the new processes: a module-level function of a test module.
Starting processes costs seconds (each imports torch), so a test module launches once and checks
many things on the result.
"""

from __future__ import annotations

import datetime
import os
import pickle
import queue
import socket
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def loopback_interface() -> str:
    """The name of the loopback network interface ("lo" on Linux, "lo0" on macOS)."""
    names = [name for _, name in socket.if_nameindex()]
    return next((name for name in names if name.startswith("lo")), "lo")


def _rank_main(
    rank: int, world_size: int, store_file: Path, timeout: float, function: Callable, args: tuple,
    results,
) -> None:  # fmt: skip
    os.environ["GLOO_SOCKET_IFNAME"] = loopback_interface()  # gloo: no other interface
    torch.set_num_threads(1)  # the ranks share the machine's cores
    try:
        dist.init_process_group(
            "gloo", init_method=f"file://{store_file}", rank=rank, world_size=world_size,
            timeout=datetime.timedelta(seconds=timeout),
        )  # fmt: skip
        try:
            results.put((rank, pickle.dumps(function(*args)), None))
        finally:
            dist.destroy_process_group()
    except BaseException:
        results.put((rank, None, traceback.format_exc()))


def run_on_ranks(
    function: Callable, world_size: int, *args, timeout: float = 240.0
) -> list[object]:
    """``[function(*args) on rank 0, ..., on rank world_size - 1]``, each in its own process."""
    context = mp.get_context("spawn")
    results = context.Queue()
    with tempfile.TemporaryDirectory() as folder:
        store_file = Path(folder) / "store"  # the rendezvous: a file, no port to collide on
        processes = [
            context.Process(
                target=_rank_main, daemon=True,
                args=(rank, world_size, store_file, timeout, function, args, results),
            )
            for rank in range(world_size)
        ]  # fmt: skip
        for process in processes:
            process.start()
        outputs: dict[int, object] = {}
        deadline = time.monotonic() + timeout
        try:
            while len(outputs) < world_size:
                left = deadline - time.monotonic()
                try:
                    rank, output, error = results.get(timeout=max(left, 0.01))
                except queue.Empty:
                    missing = sorted(set(range(world_size)) - set(outputs))
                    raise TimeoutError(
                        f"ranks {missing} of {world_size} gave no result in {timeout:.0f} s"
                    ) from None
                if error is not None:
                    raise RuntimeError(f"rank {rank} of {world_size} failed:\n{error}")
                outputs[rank] = pickle.loads(output)
        finally:
            for process in processes:
                process.join(timeout=10)
                if process.is_alive():
                    process.kill()
    return [outputs[rank] for rank in range(world_size)]
