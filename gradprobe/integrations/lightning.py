"""gradprobe for Lightning: a ``Callback`` that watches the fit (``pip install gradprobe[lightning]``).

>>> from gradprobe.integrations.lightning import GradprobeCallback
>>> probe_cb = GradprobeCallback(logdir="runs/exp1")
>>> trainer = lightning.pytorch.Trainer(callbacks=[probe_cb])
>>> trainer.fit(model, train_loader)
>>> print(probe_cb.report())

On ``on_fit_start`` (after the strategy has set up the module and its optimizers) the callback
calls :func:`gradprobe.watch` with the LightningModule, ``trainer.optimizers`` and the precision
plugin's ``GradScaler`` (``precision="16-mixed"`` on GPU; None otherwise, and a scaler the
plugin creates later is still adopted by the probe when it scales a loss). The probe is
closed on ``on_fit_end``, on ``on_exception`` (the exception is recorded in the run log
first) and at ``teardown`` at the latest. ``report()`` analyzes the recorded run (and writes
the findings into the run's TensorBoard text).

Where the log goes: ``logdir`` if given, else ``<trainer.log_dir or default_root_dir>/gradprobe``.
A second ``fit`` with the same callback writes to ``<logdir>-2`` (and so on), so runs never mix.
Under multi-process strategies each rank records its own log in ``<logdir>/rank<k>``.

``mlflow=True`` logs the report to the fit's MLflow run when the probe closes (normally or
on an exception): the run of the trainer's ``MLFlowLogger``, else the run active at
``on_fit_start`` (tags ``gradprobe.*`` and ``artifacts/gradprobe/``; see
:mod:`gradprobe.integrations.mlflow`). Only global rank 0 logs. ``mlflow="<run id>"`` logs to
that run.

``stop_on="error"`` (or ``"warning"``) ends a doomed fit gracefully: once the probe confirms a
final finding (parameters that stayed NaN, a loss non-finite for a sustained stretch...; see
:mod:`gradprobe.live`), the callback sets ``trainer.should_stop = True`` at the end of that
batch, with no exception. Lightning honours it only once ``min_steps``/``min_epochs`` are met
(it keeps training until then, and says so), and runs a last validation first. ``stopped``
holds the :class:`~gradprobe.live.StopDecision`; the report says where the fit stopped and how
many of its steps (``max_steps``, else ``estimated_stepping_batches``) were left. Under a
multi-process strategy each rank decides from its own log (no collective is added): a NaN that
reaches the parameters through the gradient all-reduce stops every rank at the same step; a
fault on one rank alone would leave the others waiting at their next collective, so stop such
jobs with ``gradprobe run --stop-on``, whose stopped rank exits and lets the launcher end the job.

Works with the ``lightning`` package (``lightning.pytorch``) and with the standalone
``pytorch_lightning`` package.
"""

from __future__ import annotations

import os
from typing import Any

try:  # the unified package first, then the standalone one
    from lightning.pytorch import Callback as _Callback
except ImportError:  # pragma: no cover - depends on what is installed
    try:
        from pytorch_lightning import Callback as _Callback  # type: ignore[no-redef]
    except ImportError as exc:  # pragma: no cover
        raise ImportError(
            "gradprobe.integrations.lightning needs Lightning: pip install 'gradprobe[lightning]'"
        ) from exc

__all__ = ["GradprobeCallback"]

#: what Lightning does with ``should_stop`` (the stop record's ``note``)
STOP_NOTE = ("Lightning sets should_stop: the fit ends after this batch (and a last validation), once "
             "min_steps/min_epochs are met")


def _scaler_of(trainer: Any) -> Any:
    plugin = getattr(trainer, "precision_plugin", None)
    if plugin is None:
        plugin = getattr(getattr(trainer, "strategy", None), "precision_plugin", None)
    scaler = getattr(plugin, "scaler", None)
    return scaler if scaler is not None and getattr(scaler, "is_enabled", lambda: True)() else None


def _mlflow_logger_target(trainer: Any) -> Any:
    """The run of the trainer's ``MLFlowLogger`` (its id and tracking URI), or None."""
    from gradprobe.integrations.mlflow import Target

    for logger in getattr(trainer, "loggers", None) or []:
        if type(logger).__name__ == "MLFlowLogger":
            import mlflow

            return Target(logger.run_id, getattr(logger, "_tracking_uri", None) or mlflow.get_tracking_uri())
    return None


def _unwrap_optimizer(opt: Any) -> Any:
    """``LightningOptimizer`` wraps the real optimizer as ``_optimizer``."""
    import torch

    seen = 0
    while not isinstance(opt, torch.optim.Optimizer) and seen < 5:
        inner = getattr(opt, "_optimizer", None) or getattr(opt, "optimizer", None)
        if inner is None:
            break
        opt = inner
        seen += 1
    return opt


class GradprobeCallback(_Callback):  # type: ignore[misc,valid-type]
    """Watches a Lightning fit with :func:`gradprobe.watch`.

    Args:
        logdir: run directory (default ``<trainer.log_dir>/gradprobe``).
        mlflow: ``True`` to log the report to the fit's MLflow run, or a run id (needs
            ``gradprobe[mlflow]``).
        stop_on: ``"error"`` or ``"warning"``: end the fit (``trainer.should_stop``) after
            a final finding of that severity; ``"never"`` (default): record only.
        **watch_options: passed to :func:`gradprobe.watch` (``profile="light"``,
            ``sample_every=50``, ``tensorboard=False``, ...).

    Attributes:
        probe: the live :class:`gradprobe.Probe` during a fit, the last one after it.
        logdir: the run directory of the last fit.
        mlflow_run_id: the MLflow run the last report was logged to (None: not logged).
        stopped: the :class:`~gradprobe.live.StopDecision` when the last fit was stopped.
    """

    def __init__(self, logdir: str | os.PathLike[str] | None = None, *, mlflow: bool | str | None = None,
                 stop_on: str = "never", **watch_options: Any) -> None:
        from gradprobe.live import check_stop_on

        super().__init__()
        self.stop_on = check_stop_on(stop_on)
        self.stopped: Any = None
        self._logdir_arg = os.fspath(logdir) if logdir is not None else None
        self.watch_options = watch_options
        self.probe: Any = None
        self.logdir: str | None = None
        self.mlflow_run_id: str | None = None
        self._mlflow_spec = mlflow or None
        self._mlflow: Any = None
        self._fits = 0
        if self._mlflow_spec is not None:
            from gradprobe.integrations.mlflow import _mlflow

            _mlflow()  # fails now, not when the fit ends, if MLflow is not installed

    # ---- lifecycle -------------------------------------------------------------------------
    def _choose_logdir(self, trainer: Any) -> str:
        if self._logdir_arg is not None:
            base = self._logdir_arg
        else:
            root = None
            try:
                root = trainer.log_dir
            except Exception:  # noqa: BLE001 - some loggers raise before setup
                root = None
            base = os.path.join(root or trainer.default_root_dir or os.getcwd(), "gradprobe")
        if self._fits > 1:
            base = f"{base}-{self._fits}"
        world = int(getattr(trainer, "world_size", 1) or 1)
        if world > 1:
            base = os.path.join(base, f"rank{int(getattr(trainer, 'global_rank', 0) or 0)}")
        return base

    def on_fit_start(self, trainer: Any, pl_module: Any) -> None:
        import gradprobe

        self.close()
        self._fits += 1
        optimizers = [_unwrap_optimizer(o) for o in (getattr(trainer, "optimizers", None) or [])]
        self.logdir = self._choose_logdir(trainer)
        self.stopped = None
        self.probe = gradprobe.watch(
            pl_module,
            optimizers or None,
            scaler=_scaler_of(trainer),
            logdir=self.logdir,
            stop_on=self.stop_on,
            **self.watch_options,
        )
        stopper = self.probe.stopper
        if stopper is not None:  # no exception inside Lightning's loop: should_stop at the batch end
            stopper.raise_at_boundary = False
            stopper.note = STOP_NOTE
        if self._mlflow_spec is not None and getattr(trainer, "is_global_zero", True):
            from gradprobe.integrations.mlflow import ReportLogger

            spec = self._mlflow_spec
            self._mlflow = ReportLogger((_mlflow_logger_target(trainer) or spec) if spec is True else spec)

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        if self.probe is not None and self.probe.total_steps is None:
            from gradprobe.live import lightning_total_steps

            self.probe.total_steps = lightning_total_steps(trainer)  # the dataloaders exist by now
            if self.probe.stopper is not None:
                self.probe.stopper.total_from = "Lightning max_steps or estimated_stepping_batches"

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        stopper = getattr(self.probe, "stopper", None)
        if stopper is None or (not stopper.checks.pending and stopper.decision is None):
            return
        decision = stopper.poll()
        if decision is not None:
            self.stopped = decision
            trainer.should_stop = True

    def on_fit_end(self, trainer: Any, pl_module: Any) -> None:
        self.close()

    def on_exception(self, trainer: Any, pl_module: Any, exception: BaseException) -> None:
        self.close(exception)

    def teardown(self, trainer: Any, pl_module: Any, stage: str) -> None:
        if stage == "fit":
            self.close()

    # ---- API -------------------------------------------------------------------------------
    def close(self, exception: BaseException | None = None) -> None:
        """Closes the probe (recording ``exception`` first, if given). Idempotent."""
        probe = self.probe
        if probe is None:
            return
        if exception is not None:
            probe.__exit__(type(exception), exception, exception.__traceback__)
        else:
            probe.close()
        mlflow, self._mlflow = self._mlflow, None
        if mlflow is not None:
            self.mlflow_run_id = mlflow.log(probe.report)

    def report(self) -> Any:
        """The :class:`gradprobe.Report` of the last (or current) fit."""
        if self.probe is None:
            raise RuntimeError("GradprobeCallback.report(): no fit has started yet")
        return self.probe.report()
