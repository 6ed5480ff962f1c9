"""gradprobe's findings in the MLflow run they are about (``pip install gradprobe[mlflow]``).

>>> with mlflow.start_run():
...     with gradprobe.watch(model, optimizer, mlflow=True) as probe:
...         ...  # the training loop
>>> # the run now has gradprobe.* tags and the report under artifacts/gradprobe/

The same option on the framework callbacks: ``GradprobeCallback(mlflow=True)`` for Lightning
(the run of its ``MLFlowLogger``, or the active one) and for the Hugging Face ``Trainer``
(the run its ``MLflowCallback`` started). For a report made later, from saved logs,
:func:`log_report` logs it to a run by id.

What is logged, with MLflow's client (so it works on a run that has already ended):

* tags: ``gradprobe.status`` (``error``, ``warning``, ``info`` or ``ok``: the worst
  severity found), ``gradprobe.findings`` (``GP401 nonfinite-loss, GP504 loss-spike``, root
  cause first, or ``none``), ``gradprobe.root_cause`` (the first finding's code, slug and
  title), one ``gradprobe.<code>`` per finding (severity, first step, title),
  ``gradprobe.suggested.<name>`` per suggested hyperparameter, ``gradprobe.steps`` and
  ``gradprobe.version``;
* artifacts: ``gradprobe/report.json`` (the JSON report) and ``gradprobe/report.md``.

Which run: the one in use *when training starts* is captured then (``mlflow=True``), or the
run id given (``mlflow="<run id>"``). It is captured early because the Hugging Face
``MLflowCallback`` ends its run in ``on_train_end``, before any later callback could ask
MLflow for the active run; the client then logs to the ended run by its id. A failure to log
never reaches the training run: it is reported once as a :class:`gradprobe.GradprobeWarning`.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any, Callable

from gradprobe._guard import GradprobeWarning
from gradprobe._version import __version__

__all__ = ["log_report", "report_tags", "ReportLogger", "Target", "active_target", "TAG_PREFIX", "ARTIFACT_DIR"]

TAG_PREFIX = "gradprobe."
ARTIFACT_DIR = "gradprobe"
#: MLflow 3 keeps tag values up to 8000 characters (5000 before); a finding's tag is its
#: one-line title, well below either
TAG_MAX_CHARS = 5000
SEVERITY_ORDER = ("error", "warning", "info")


def _mlflow() -> Any:
    try:
        import mlflow
    except ImportError as exc:  # pragma: no cover - depends on what is installed
        raise ImportError("gradprobe's MLflow logging needs MLflow: pip install 'gradprobe[mlflow]'") from exc
    return mlflow


@dataclass(frozen=True)
class Target:
    """An MLflow run to log to: its id and the tracking URI of its store."""

    run_id: str
    tracking_uri: str


def active_target() -> Target | None:
    """The MLflow run active in this process now (``mlflow.active_run()``), or None."""
    mlflow = _mlflow()
    run = mlflow.active_run()
    if run is None:
        return None
    return Target(run.info.run_id, mlflow.get_tracking_uri())


def _clip(text: str) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= TAG_MAX_CHARS else text[: TAG_MAX_CHARS - 1] + "…"


def report_tags(report: Any) -> dict[str, str]:
    """The tags :func:`log_report` sets for ``report`` (a :class:`gradprobe.Report`)."""
    findings = list(report.findings)
    severities = {f.severity for f in findings}
    status = next((s for s in SEVERITY_ORDER if s in severities), "ok")
    tags = {
        f"{TAG_PREFIX}status": status,
        f"{TAG_PREFIX}findings": ", ".join(f"{f.code} {f.rule}" for f in findings) or "none",
        f"{TAG_PREFIX}steps": str(report.source.get("steps", "")),
        f"{TAG_PREFIX}version": __version__,
    }
    if findings:
        first = findings[0]
        tags[f"{TAG_PREFIX}root_cause"] = _clip(f"{first.code} {first.rule}: {first.title}")
    for f in findings:
        where = f" from step {f.first_step}" if f.first_step is not None else ""
        layer = f" in {f.layer}" if f.layer else ""
        tags[f"{TAG_PREFIX}{f.code}"] = _clip(f"{f.severity}{where}{layer}: {f.title}")
    for name, value in (report.suggested_hyperparameters or {}).items():
        tags[f"{TAG_PREFIX}suggested.{name}"] = _clip(f"{value:.6g}" if isinstance(value, float) else str(value))
    return tags


def log_report(report: Any, run_id: str | None = None, *, tracking_uri: str | None = None) -> str:
    """Logs ``report`` to an MLflow run: the ``gradprobe.*`` tags and the report as the
    artifacts ``gradprobe/report.json`` and ``gradprobe/report.md``.

    Args:
        report: a :class:`gradprobe.Report` (``probe.report()``, ``gradprobe.analyze(...)``).
        run_id: the run; default the active run.
        tracking_uri: the store of the run; default MLflow's current tracking URI.

    Returns:
        The run id logged to.

    Raises:
        ValueError: no ``run_id`` and no active run.
    """
    mlflow = _mlflow()
    from mlflow.entities import RunTag
    from mlflow.tracking import MlflowClient

    if run_id is None:
        target = active_target()
        if target is None:
            raise ValueError("log_report: no run_id given and no MLflow run is active")
        run_id, tracking_uri = target.run_id, tracking_uri or target.tracking_uri
    client = MlflowClient(tracking_uri=tracking_uri or mlflow.get_tracking_uri())
    client.log_batch(run_id, tags=[RunTag(k, v) for k, v in report_tags(report).items()])
    from gradprobe.render import render

    client.log_text(run_id, render(report, "json"), f"{ARTIFACT_DIR}/report.json")  # what analyze --format json prints
    client.log_text(run_id, report.to_markdown(), f"{ARTIFACT_DIR}/report.md")
    return run_id


class ReportLogger:
    """Logs a report to the MLflow run captured when training started (used by
    ``watch(..., mlflow=...)`` and the callbacks).

    Args:
        spec: ``True`` (the run active at :meth:`capture`; :meth:`capture` is called at
            construction and may be called again, e.g. by a callback at training start),
            a run id, or a :class:`Target`.

    Raises:
        ImportError: MLflow is not installed.
    """

    def __init__(self, spec: bool | str | Target) -> None:
        mlflow = _mlflow()
        self.target: Target | None = None
        self.logged_to: str | None = None
        if isinstance(spec, Target):
            self.target = spec
        elif isinstance(spec, str):
            self.target = Target(spec, mlflow.get_tracking_uri())
        elif spec is not True:
            raise ValueError(f"mlflow must be True, a run id or a Target, not {spec!r}")
        self.capture()

    def capture(self, target: Target | None = None) -> Target | None:
        """Remembers ``target``, else the active run, unless a run is already known."""
        if self.target is None:
            self.target = target or active_target()
        return self.target

    def log(self, report_fn: Callable[[], Any]) -> str | None:
        """Computes the report and logs it; never raises (a failure is one warning)."""
        try:
            if self.target is None:
                self.capture()
            if self.target is None:
                warnings.warn("gradprobe: mlflow=True, but no MLflow run was active when training started or "
                              "ended; the findings were not logged to MLflow", GradprobeWarning, stacklevel=2)
                return None
            self.logged_to = log_report(report_fn(), self.target.run_id, tracking_uri=self.target.tracking_uri)
            return self.logged_to
        except Exception as exc:  # noqa: BLE001 - logging the report never breaks training
            warnings.warn(f"gradprobe: could not log the findings to MLflow run "
                          f"{self.target.run_id if self.target else '?'} ({type(exc).__name__}: {exc})".splitlines()[0],
                          GradprobeWarning, stacklevel=2)
            return None
