"""gradprobe for the Hugging Face ``Trainer``: a ``TrainerCallback`` (``pip install gradprobe[hf]``).

>>> from gradprobe.integrations.hf import GradprobeCallback
>>> probe_cb = GradprobeCallback(logdir="runs/exp1")
>>> trainer = transformers.Trainer(model=model, args=args, train_dataset=ds, callbacks=[probe_cb])
>>> trainer.train()
>>> print(probe_cb.report())

On ``on_train_begin`` (the Trainer has built its optimizer and wrapped it with Accelerate) the
callback calls :func:`gradprobe.watch` with the Trainer's model, the real ``torch.optim``
optimizer inside Accelerate's ``AcceleratedOptimizer`` and its ``GradScaler`` (fp16 AMP; None
otherwise). The probe is closed on ``on_train_end``. The Trainer has no exception callback:
if ``train()`` raises, call ``probe_cb.close(exc)`` (or use ``with probe_cb: trainer.train()``)
to record the exception; otherwise the probe is still closed and flushed at interpreter exit.

Where the log goes: ``logdir`` if given, else ``<args.output_dir>/gradprobe``. A second
``train()`` with the same callback writes to ``<logdir>-2`` (and so on). With several
processes each records its own log in ``<logdir>/rank<k>``.

``mlflow=True`` logs the report to the MLflow run in use (``report_to="mlflow"``) when
training ends: the run is captured in ``on_train_begin``, after the Trainer's own
``MLflowCallback`` started it, because that callback ends the run in ``on_train_end`` before
this one runs; the findings are logged to the ended run by its id (tags ``gradprobe.*`` and
``artifacts/gradprobe/``; see :mod:`gradprobe.integrations.mlflow`). Only the main process
logs. ``mlflow="<run id>"`` logs to that run.

``stop_on="error"`` (or ``"warning"``) ends a doomed ``train()`` gracefully: once the probe
confirms a final finding (parameters that stayed NaN, a loss non-finite for a sustained
stretch...; see :mod:`gradprobe.live`), the callback sets ``control.should_training_stop`` at
that step's end, with no exception; the Trainer ends training as it does at ``max_steps``
(``on_train_end`` runs, the probe is closed). ``stopped`` holds the
:class:`~gradprobe.live.StopDecision`; the report says where training stopped and how many of
``state.max_steps`` were left.
"""

from __future__ import annotations

import os
from typing import Any

try:
    from transformers import TrainerCallback as _TrainerCallback
except ImportError as exc:  # pragma: no cover - depends on what is installed
    raise ImportError("gradprobe.integrations.hf needs transformers: pip install 'gradprobe[hf]'") from exc

__all__ = ["GradprobeCallback"]


def _unwrap_optimizer(opt: Any) -> tuple[Any, Any]:
    """(the innermost torch optimizer, the GradScaler of an ``AcceleratedOptimizer``)."""
    import torch

    scaler = None
    for _ in range(5):
        if scaler is None:
            scaler = getattr(opt, "scaler", None)
        inner = getattr(opt, "optimizer", None)
        if isinstance(inner, torch.optim.Optimizer) or (inner is not None and hasattr(inner, "param_groups")):
            opt = inner
        else:
            break
    if scaler is not None and not getattr(scaler, "is_enabled", lambda: True)():
        scaler = None
    return opt, scaler


class GradprobeCallback(_TrainerCallback):  # type: ignore[misc,valid-type]
    """Watches ``Trainer.train()`` with :func:`gradprobe.watch`.

    Args:
        logdir: run directory (default ``<args.output_dir>/gradprobe``).
        mlflow: ``True`` to log the report to the MLflow run in use when training ends, or
            a run id (needs ``gradprobe[mlflow]``).
        stop_on: ``"error"`` or ``"warning"``: end training (``control.should_training_stop``)
            after a final finding of that severity; ``"never"`` (default): record only.
        **watch_options: passed to :func:`gradprobe.watch` (``profile="light"``,
            ``sample_every=50``, ``tensorboard=False``, ...).

    Attributes:
        probe: the live :class:`gradprobe.Probe` during training, the last one after it.
        logdir: the run directory of the last ``train()``.
        mlflow_run_id: the MLflow run the last report was logged to (None: not logged).
        stopped: the :class:`~gradprobe.live.StopDecision` when the last ``train()`` was stopped.
    """

    def __init__(self, logdir: str | os.PathLike[str] | None = None, *, mlflow: bool | str | None = None,
                 stop_on: str = "never", **watch_options: Any) -> None:
        from gradprobe.live import check_stop_on

        self.stop_on = check_stop_on(stop_on)
        self.stopped: Any = None
        self._logdir_arg = os.fspath(logdir) if logdir is not None else None
        self.watch_options = watch_options
        self.probe: Any = None
        self.logdir: str | None = None
        self.mlflow_run_id: str | None = None
        self._mlflow_spec = mlflow or None
        self._mlflow: Any = None
        self._runs = 0
        if self._mlflow_spec is not None:
            from gradprobe.integrations.mlflow import _mlflow

            _mlflow()  # fails now, not when training ends, if MLflow is not installed

    def _choose_logdir(self, args: Any) -> str:
        base = self._logdir_arg or os.path.join(getattr(args, "output_dir", None) or os.getcwd(), "gradprobe")
        if self._runs > 1:
            base = f"{base}-{self._runs}"
        world = int(getattr(args, "world_size", 1) or 1)
        if world > 1:
            base = os.path.join(base, f"rank{int(getattr(args, 'process_index', 0) or 0)}")
        return base

    # ---- TrainerCallback events ------------------------------------------------------------
    def on_train_begin(self, args: Any, state: Any, control: Any, model: Any = None, optimizer: Any = None, **kwargs: Any) -> None:
        import gradprobe

        self.close()
        if model is None:
            raise RuntimeError("GradprobeCallback: the Trainer passed no model to on_train_begin")
        self._runs += 1
        opt, scaler = _unwrap_optimizer(optimizer) if optimizer is not None else (None, None)
        self.logdir = self._choose_logdir(args)
        self.stopped = None
        self.probe = gradprobe.watch(model, opt, scaler=scaler, logdir=self.logdir, stop_on=self.stop_on,
                                     **self.watch_options)
        if self.probe.stopper is not None:  # no exception inside the Trainer's loop: should_training_stop
            self.probe.stopper.raise_at_boundary = False
        max_steps = int(getattr(state, "max_steps", 0) or 0)
        if self.probe.total_steps is None and max_steps > 0:
            self.probe.total_steps = max_steps
            if self.probe.stopper is not None:
                self.probe.stopper.total_from = "Trainer state.max_steps"
        if self._mlflow_spec is not None and getattr(state, "is_world_process_zero", True):
            from gradprobe.integrations.mlflow import ReportLogger

            self._mlflow = ReportLogger(self._mlflow_spec)  # the run MLflowCallback started just before

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self._mlflow is not None and self._mlflow.target is None:
            self._mlflow.capture()  # MLflowCallback set its run up late (at its first log)
        stopper = getattr(self.probe, "stopper", None)
        if stopper is not None and (stopper.checks.pending or stopper.decision is not None):
            decision = stopper.poll()
            if decision is not None:
                self.stopped = decision
                control.should_training_stop = True

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
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

    def __enter__(self) -> "GradprobeCallback":
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        self.close(exc)

    def report(self) -> Any:
        """The :class:`gradprobe.Report` of the last (or current) ``train()``."""
        if self.probe is None:
            raise RuntimeError("GradprobeCallback.report(): training has not started yet")
        return self.probe.report()
