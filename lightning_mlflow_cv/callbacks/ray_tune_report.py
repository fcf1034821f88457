"""RayTuneReportCallback: report validation metrics to Ray Tune after each validation, once the MLflow logger flushed."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from lightning.pytorch.callbacks import Callback
from typing_extensions import override

from lightning_mlflow_cv.callbacks import _checks

if TYPE_CHECKING:
    import lightning.pytorch as pl

_NAME = "RayTuneReportCallback"


def report_dict(callback_metrics: dict[str, Any], metrics: Sequence[str] | None) -> dict[str, float]:
    """Scalar floats from ``trainer.callback_metrics`` (all, or the keys ``metrics`` names).

    Raises:
        KeyError: a name in ``metrics`` was not logged, with the names that were.
    """
    keys = list(callback_metrics) if metrics is None else list(metrics)
    out: dict[str, float] = {}
    for k in keys:
        if k not in callback_metrics:
            raise KeyError(
                f"{_NAME}: metric {k!r} was not logged this validation epoch; logged: {sorted(callback_metrics)}. "
                "Fix: pass names your LightningModule logs with `self.log(...)`, or `metrics=None` for all."
            )
        v = callback_metrics[k]
        try:
            out[k] = float(v.item() if hasattr(v, "item") else v)
        except (TypeError, ValueError, RuntimeError):
            continue  # not a scalar
    return out


class RayTuneReportCallback(Callback):
    """Report ``trainer.callback_metrics`` to Ray Tune at the end of every validation (``on_validation_end``,
    where Lightning has handed the epoch's metrics to the loggers, as Ray's own callback does).

    Inside a :func:`~lightning_mlflow_cv.hpo.ray_sweep` trial it first flushes the trial's
    ``MLflowCVLogger``, so everything logged so far is in MLflow before Tune's scheduler may stop the trial
    (and its worker); when Tune stops the trial, the run ends KILLED (not FAILED). The last validation of the
    fit is reported after the trial's run is FINISHED, so a scheduler stop at that point (e.g. ASHA's
    ``max_t``) cannot cut ``on_fit_end`` callbacks short. Outside
    ``ray_sweep`` (a plain ``Tuner``) it reports like Ray's own ``TuneReportCallback``.

    Only the global rank 0 reports (as Ray's own callback does).

    Args:
        metrics: Metric names to report (default: every scalar in ``trainer.callback_metrics``).

    Raises:
        TypeError: ``metrics`` is not None or a sequence of strings.

    Example::

        trainer = pl.Trainer(logger=MLflowCVLogger(), callbacks=[RayTuneReportCallback(["val/loss", "val/acc"])])
    """

    def __init__(self, metrics: Sequence[str] | str | None = None) -> None:
        if isinstance(metrics, str):
            metrics = [metrics]
        self.metrics = _checks.check_names(
            _NAME, "metrics", metrics, must="None (all) or a list of metric names", strings=True, error=TypeError,
            fix="e.g. `RayTuneReportCallback(['val/loss'])`",
        )  # fmt: skip

    @override
    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking or trainer.global_rank != 0:
            return
        values = report_dict(dict(trainer.callback_metrics), self.metrics)
        if not values:
            return
        from lightning_mlflow_cv._sweeps.ray_sweep import ACTIVE_RAY_TRIAL

        trial = ACTIVE_RAY_TRIAL.get()
        if trial is not None:
            self._flush(trainer)
            if _last_validation(trainer):
                trial.pending_report = values
                return
            trial.pending_report = None
            trial.reports += 1
        import ray.tune

        try:
            ray.tune.report(values)
        except SystemExit as err:  # Tune's scheduler stopped the trial (Ray exits the trial thread this way)
            if trial is not None and err.code in (0, None):
                trial.stopped = True
            raise

    @override
    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        """A scheduler stop ends the logger's run KILLED (before Lightning finalizes loggers as "failed")."""
        from lightning_mlflow_cv._sweeps.ray_sweep import ACTIVE_RAY_TRIAL

        trial = ACTIVE_RAY_TRIAL.get()
        if trial is None or not trial.stopped or not isinstance(exception, SystemExit):
            return
        from lightning_mlflow_cv.logger import MLflowCVLogger

        for lg in trainer.loggers:
            if isinstance(lg, MLflowCVLogger):
                try:
                    lg.finalize("killed")  # a later finalize("failed") finds the run closed and does nothing
                except Exception:  # noqa: BLE001 - the logger keeps undelivered data in its spool and warns
                    pass

    @staticmethod
    def _flush(trainer: pl.Trainer) -> None:
        from lightning_mlflow_cv.logger import MLflowCVLogger

        for lg in trainer.loggers:
            if isinstance(lg, MLflowCVLogger):
                try:
                    lg.flush()
                except Exception:  # noqa: BLE001 - the logger keeps undelivered data in its spool and warns
                    pass


def _last_validation(trainer: pl.Trainer) -> bool:
    """True at the fit's final validation (last epoch, or ``max_steps`` reached)."""
    max_epochs = trainer.max_epochs
    if max_epochs is not None and max_epochs >= 0 and trainer.current_epoch + 1 >= max_epochs:
        loop = trainer.fit_loop.epoch_loop
        return bool(getattr(getattr(loop, "batch_progress", None), "is_last_batch", True))
    return bool(trainer.max_steps and trainer.max_steps > 0 and trainer.global_step >= trainer.max_steps)
