"""The writer follows the machine: a child process with a core to spare, a thread when training uses them all."""

from __future__ import annotations

import pytest
import torch
from mlflow import MlflowClient

from lightning_mlflow_cv import MLflowCVLogger
from lightning_mlflow_cv._delivery.writer_choice import Machine, choose_writer, machine_from, training_cores, usable_cores


@pytest.mark.parametrize(
    ("machine", "expected"),
    [
        (Machine(cores=2, torch_threads=2, accelerator="cpu"), "thread"),  # CPU training on every core
        (Machine(cores=2, torch_threads=1, accelerator="cpu"), "process"),  # `torch.set_num_threads(1)`: one spare
        (Machine(cores=16, torch_threads=16, accelerator="cuda"), "process"),  # GPU node: the CPU mostly launches kernels
        (Machine(cores=1, torch_threads=1, accelerator="cuda"), "thread"),  # a single core: nothing to spare
        (Machine(cores=8, torch_threads=1, accelerator="cuda", processes=8), "thread"),  # 8 DDP ranks on 8 cores
        (Machine(cores=16, torch_threads=1, accelerator="cuda", processes=8), "process"),
        (Machine(cores=8, torch_threads=4, accelerator="cpu", processes=2), "thread"),  # CPU DDP filling the machine
        (Machine(cores=3, torch_threads=2, accelerator=None), "process"),  # accelerator unknown: counted as cpu
        (Machine(cores=2, torch_threads=2, accelerator="mps"), "process"),
    ],
)
def test_choose_writer(machine: Machine, expected: str) -> None:
    kind, why = choose_writer(machine)
    assert kind == expected, why
    assert f"{machine.cores} usable core(s)" in why and f"keeps {training_cores(machine)} busy" in why


def test_default_writer_follows_torch_threads(tracking_uri):
    """Nothing passed: with torch on one thread and a second usable core, the logger starts a child-process writer
    (and still delivers); with torch on every usable core, a thread. `writer=` overrides either way."""
    threads = torch.get_num_threads()
    try:
        for n in (1, usable_cores()):
            torch.set_num_threads(n)
            expected = choose_writer(machine_from(None))[0]
            if n == 1 and usable_cores() >= 2:
                assert expected == "process"
            logger = MLflowCVLogger(tracking_uri=tracking_uri, flush_interval_s=0.2)
            logger.log_metrics({"x": float(n)}, step=0)
            assert logger.writer_choice.startswith(expected), logger.writer_choice
            assert getattr(logger._writer, "is_process", False) == (expected == "process")
            logger.finalize("success")
            assert MlflowClient(tracking_uri).get_run(logger.run_id).data.metrics == {"x": float(n)}
        torch.set_num_threads(1)
        logger = MLflowCVLogger(tracking_uri=tracking_uri, writer="thread")
        logger.log_metrics({"x": 1.0}, step=0)
        assert logger.writer_choice == "thread: writer='thread'" and not getattr(logger._writer, "is_process", False)
        logger.finalize("success")
    finally:
        torch.set_num_threads(threads)


def test_machine_from_a_trainer_reads_its_accelerator_and_processes():
    import lightning.pytorch as pl

    tr = pl.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False)
    m = machine_from(tr)
    assert m.accelerator == "cpu" and m.processes == 1
    assert m.cores == usable_cores() and m.torch_threads == torch.get_num_threads()


def test_writer_process_does_not_import_torch() -> None:
    """The child writer only needs MLflow: importing torch/torchvision/torchmetrics there cost ~6 CPU seconds per
    fit (on the spare core the process writer is for, and on the fit's critical path for short fits)."""
    import subprocess
    import sys

    code = (
        "import sys; from lightning_mlflow_cv._delivery.writer_proc import main; from mlflow import MlflowClient; "
        "print(sorted(m for m in ('torch', 'torchvision', 'torchmetrics', 'lightning') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr[-2000:]
