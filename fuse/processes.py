"""The processes of one protocol run: which jobs this process takes, and the main one's table.

`torchrun --nproc-per-node N -m fuse protocol ...` or `accelerate launch --num_processes N
-m fuse protocol ...` (the launchers extraction uses) start N copies of the protocol; both
set RANK, WORLD_SIZE and LOCAL_WORLD_SIZE. Every process plans the same jobs from the same
data and seeds, takes the next job no process has taken whenever it is free (so one
with small heads does not wait idle while another fits large ones), and sends what it
fitted to the main process, which writes the one table. Which process fits a job does not
change the job's result. Without a launcher there is one process and nothing here starts a
process group.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from tqdm import tqdm

Item = TypeVar("Item")
# A head can take minutes on a large protocol; a process waits for the slowest one's share.
_GATHER_TIMEOUT = timedelta(hours=24)
# The store's counters of items taken and finished (one claimed sequence per process group).
_CLAIMED, _FINISHED = "fuse.processes.claimed", "fuse.processes.finished"


@dataclass(frozen=True)
class Processes:
    """This process's place among those of the run (rank 0 writes the outputs)."""

    rank: int = 0
    world: int = 1

    @property
    def main(self) -> bool:
        """Whether this process writes the outputs."""
        return self.rank == 0

    def claim(
        self, items: Sequence[Item], progress: tqdm | None = None
    ) -> Iterator[tuple[int, Item]]:
        """The items this process takes, with their positions: each in turn to the first
        process that asks (the process group's store counts them out), each to one process.

        Args:
            items: the same sequence on every process.
            progress: a bar over all the items; it counts every process's finished ones.
        """
        if self.world == 1:
            for position, item in enumerate(items):
                yield position, item
                if progress is not None:
                    progress.update()
            return
        store = dist.distributed_c10d._get_default_store()
        while (position := store.add(_CLAIMED, 1) - 1) < len(items):
            yield position, items[position]
            if progress is not None:
                progress.update(store.add(_FINISHED, 1) - progress.n)

    def gather(self, value: Any) -> list[Any] | None:
        """Every process's `value`, in rank order, on the main process; None elsewhere."""
        if self.world == 1:
            return [value]
        gathered = [None] * self.world if self.main else None
        dist.gather_object(value, gathered, dst=0)
        return gathered

    def describe(self) -> str:
        """'' alone; ' (process R+1 of N)' among several."""
        return "" if self.world == 1 else f" (process {self.rank + 1} of {self.world})"


def start_processes() -> Processes:
    """This process's place, from the launcher's environment; joins the process group and
    shares the cores between the machine's processes when there are several.

    Each process gets cores / processes-on-this-machine threads unless OMP_NUM_THREADS
    says otherwise (torchrun sets it to 1): small heads run faster on one core each than
    on several threads that wait on each other.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return Processes()
    if not dist.is_initialized():
        dist.init_process_group("gloo", timeout=_GATHER_TIMEOUT)
    if "OMP_NUM_THREADS" not in os.environ:
        local = int(os.environ.get("LOCAL_WORLD_SIZE", world))
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // local))
    return Processes(rank=dist.get_rank(), world=dist.get_world_size())


def stop_processes(processes: Processes) -> None:
    """Leave the process group (a no-op for one process)."""
    if processes.world > 1 and dist.is_initialized():
        dist.destroy_process_group()
