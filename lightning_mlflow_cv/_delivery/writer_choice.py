"""Which background writer suits the machine: a child process when there is CPU to spare, a thread otherwise.

MLflow's per-point store work (entities, protobuf/JSON, SQLAlchemy inserts) is pure Python. In a writer thread it
holds the GIL that the training loop needs between kernel launches, so a spare core does not help it; in a child
process it runs on that spare core and the training process never waits for it. When training already keeps every
core busy (torch on all cores, CPU training), a child process only preempts the torch threads and the thread writer
(at lower priority) costs less. Measured in ``benchmarks/README.md``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Literal

WriterKind = Literal["process", "thread"]

#: Accelerators on which the training process keeps about one core busy (the Python thread launching kernels).
ACCELERATORS = ("cuda", "gpu", "mps", "xla", "tpu", "hpu", "xpu")


@dataclass(frozen=True)
class Machine:
    """What the choice depends on."""

    #: CPU cores this process may run on (``os.sched_getaffinity``).
    cores: int
    #: ``torch.get_num_threads()``: cores a CPU training step keeps busy.
    torch_threads: int
    #: ``"cpu"``, ``"cuda"``, ``"mps"``, ... or ``None`` when not known (no Trainer yet).
    accelerator: str | None = None
    #: Training processes on this machine (DDP ranks of the node), each using the cores above.
    processes: int = 1


def training_cores(machine: Machine) -> int:
    """Cores training keeps busy: one per process on an accelerator, ``torch_threads`` per process on the CPU."""
    per_process = 1 if (machine.accelerator or "").lower() in ACCELERATORS else max(machine.torch_threads, 1)
    return max(machine.processes, 1) * per_process


def choose_writer(machine: Machine) -> tuple[WriterKind, str]:
    """``("process", why)`` when at least one core is left beyond what training uses, else ``("thread", why)``.

    Example::

        >>> choose_writer(Machine(cores=16, torch_threads=16, accelerator="cuda"))[0]
        'process'
        >>> choose_writer(Machine(cores=2, torch_threads=2, accelerator="cpu"))[0]
        'thread'
    """
    busy = training_cores(machine)
    spare = machine.cores - busy
    how = (
        f"{machine.cores} usable core(s), training keeps {busy} busy ({machine.processes} process(es) on "
        + (f"{machine.accelerator}" if machine.accelerator else "an unknown accelerator, counted as cpu")
        + (f" x {machine.torch_threads} torch thread(s)" if busy != machine.processes else "")
        + ")"
    )
    if spare >= 1:
        return "process", f"{how}: a core to spare, so MLflow's work runs in a child process"
    return "thread", f"{how}: no core to spare, so MLflow's work runs in a low-priority thread"


def usable_cores() -> int:
    """Cores this process may run on (its CPU affinity, e.g. under ``taskset`` or a container cpuset)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        return os.cpu_count() or 1


def machine_from(trainer: Any = None) -> Machine:
    """The facts for :func:`choose_writer`, from this process and (when known) the Trainer."""
    import torch

    accelerator: str | None = None
    processes = 1
    if trainer is not None:
        name = type(getattr(trainer, "accelerator", None)).__name__.lower()
        accelerator = next((a for a in ("cpu", *ACCELERATORS) if name.startswith(a)), None)
        processes = int(getattr(getattr(trainer, "strategy", None), "num_processes", 1) or 1)
    elif torch.cuda.is_initialized():  # no Trainer, but this process already works on a GPU
        accelerator = "cuda"
    return Machine(usable_cores(), torch.get_num_threads(), accelerator, processes)
