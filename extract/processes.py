"""The processes of a run: one plain process, or those `accelerate launch` starts.

The main process decides (locks, plans, consolidation) and every process encodes its share;
what one process computes reaches the others only through `on_every_process` (a gather,
which is also a barrier) or through files.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import TypeVar

import torch
from accelerate import PartialState
from accelerate.utils import gather_object, parse_flag_from_env

from pipeline.errors import UserError

# Set by every launcher that starts several processes (torchrun, mpirun).
_RANK_VARS = ("WORLD_SIZE", "LOCAL_RANK", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE")
Result = TypeVar("Result")


def process_state(device_name: str) -> PartialState:
    """This process's place among the processes of a launch.

    Raises:
        UserError: `accelerate launch --cpu --num_processes N` (N > 1) started this one
            process alone: accelerate's --cpu launcher starts N processes only through
            mpirun (--mpirun_hostfile); it tells the process nothing but MASTER_ADDR,
            so a run would silently use one process.
    """
    launched_cpu = parse_flag_from_env("ACCELERATE_USE_CPU")
    if launched_cpu and "MASTER_ADDR" in os.environ and not any(map(os.environ.get, _RANK_VARS)):
        raise UserError(
            "accelerate launch --cpu starts one process whatever --num_processes says (it "
            "needs mpirun for more); for several CPU processes use accelerate launch "
            "--multi_gpu --num_processes N ... --device cpu (torchrun processes joined "
            "with gloo), or drop --num_processes"
        )
    # Told it runs on the CPU, accelerate joins the processes of a multi-process launch with
    # gloo; otherwise, on a machine without GPUs, each process would think it is alone.
    on_cpu = device_name == "cpu" or (
        device_name == "auto" and (launched_cpu or not torch.cuda.is_available())
    )
    return PartialState(cpu=on_cpu)


def device_of(name: str, state: PartialState) -> torch.device:
    """The --device `name` as a torch device; auto: this process's.

    Raises:
        UserError: a name torch does not know.
    """
    if name == "auto":
        return state.device
    try:
        return torch.device(name)
    except RuntimeError:
        raise UserError(f"--device {name}: expected auto, cpu, cuda or cuda:N") from None


def on_every_process(action: Callable[[], Result]) -> list[Result]:
    """Run `action` on every process and return every process's result, in rank order.

    Also a barrier. A process whose action fails still takes part, so that the others
    stop with its error instead of waiting for it forever.
    """
    result, failure = None, None
    try:
        result = action()
    except Exception as error:  # noqa: BLE001 (re-raised below, after the others learn of it)
        failure = error
    outcomes = gather_object([(result, None if failure is None else str(failure))])
    if failure is not None:
        raise failure
    for rank, (_, message) in enumerate(outcomes):
        if message is not None:
            raise UserError(message if rank == 0 else f"process {rank}: {message}")
    return [outcome for outcome, _ in outcomes]


def on_main_process(state: PartialState, action: Callable[[], Result]) -> Result:
    """Run `action` on the main process only; every process gets its result (or error)."""
    return on_every_process(action if state.is_main_process else lambda: None)[0]
