"""gradprobe for Optuna: a trial diagnosed as doomed is pruned (``pip install gradprobe[optuna]``).

>>> from gradprobe.integrations.optuna import watch_trial
>>> def objective(trial):
...     lr = trial.suggest_float("lr", 1e-4, 10.0, log=True)
...     model = make_model()
...     optimizer = torch.optim.SGD(model.parameters(), lr=lr)
...     with watch_trial(trial, model, optimizer, logdir="runs/study"):
...         for x, y in loader:
...             ...                  # the unchanged training loop
...     return evaluate(model)
>>> study.optimize(objective, n_trials=50)

``watch_trial`` is :func:`gradprobe.watch` with ``stop_on="error"`` for one trial. When the
probe stops the trial (a final finding: parameters that stayed NaN, a loss non-finite for a
sustained stretch...), the ``with`` block ends by raising ``optuna.TrialPruned``: Optuna
records the trial as pruned and goes on with the study. Any other exception would fail the
trial, and gradprobe's own :class:`~gradprobe.RunStopped` (a ``SystemExit``, which Optuna's
``optimize`` does not catch) would end the whole study.

The finding is kept in the trial's user attributes (``trial.user_attrs``):
``gradprobe_stopped`` (the step, the rule, how many steps were left, as in the run log's
``stopped``), ``gradprobe_finding`` (code, rule, severity, message, first step, evidence) and
``gradprobe_logdir`` (the trial's run directory; set for every trial).

Multi-objective studies are handled the same way: ``trial.report`` and ``should_prune`` are
not available there (Optuna raises ``NotImplementedError``), and none is used; raising
``TrialPruned`` is, and the trial is recorded as pruned without values. No intermediate value
is reported in any study, so a study's own pruner sees nothing from gradprobe.

Trials of one process run one at a time (``n_jobs=1``): a probe watches the process's
autograd and optimizers.
"""

from __future__ import annotations

import json
import os
from typing import Any

try:
    import optuna as _optuna
except ImportError as exc:  # pragma: no cover - depends on what is installed
    raise ImportError("gradprobe.integrations.optuna needs Optuna: pip install 'gradprobe[optuna]'") from exc

from gradprobe.live import RunStopped, check_stop_on
from gradprobe.report import clean_number

__all__ = ["watch_trial", "USER_ATTR_STOPPED", "USER_ATTR_FINDING", "USER_ATTR_LOGDIR"]

#: user attributes of a trial gradprobe watched
USER_ATTR_STOPPED = "gradprobe_stopped"
USER_ATTR_FINDING = "gradprobe_finding"
USER_ATTR_LOGDIR = "gradprobe_logdir"


class watch_trial:  # noqa: N801 - used like the function gradprobe.watch
    """Watches one Optuna trial; prunes it when gradprobe stops it.

    Args:
        trial: the ``optuna.Trial`` the objective received.
        model, optimizer: as for :func:`gradprobe.watch`.
        stop_on: ``"error"`` (default) or ``"warning"``: the least severe final finding that
            prunes the trial; ``"never"`` only records.
        logdir: the study's log directory: each trial writes ``<logdir>/trial-<number>``
            (default: a new folder under ``./gradprobe_runs/`` per trial).
        **watch_options: passed to :func:`gradprobe.watch` (``scaler=``, ``profile=``,
            ``total_steps=``...).

    ``with watch_trial(...) as probe:`` gives the :class:`gradprobe.Probe`.
    """

    def __init__(self, trial: Any, model: Any, optimizer: Any = None, *, stop_on: str = "error",
                 logdir: str | os.PathLike[str] | None = None, **watch_options: Any) -> None:
        self.trial = trial
        self.model = model
        self.optimizer = optimizer
        self.stop_on = check_stop_on(stop_on)
        number = getattr(trial, "number", None)
        self.logdir = (os.path.join(os.fspath(logdir), f"trial-{number}") if logdir is not None else None)
        self.watch_options = watch_options
        self.probe: Any = None

    def __enter__(self) -> Any:
        import gradprobe

        self.probe = gradprobe.watch(self.model, self.optimizer, logdir=self.logdir, stop_on=self.stop_on,
                                     **self.watch_options)
        self.trial.set_user_attr(USER_ATTR_LOGDIR, str(self.probe.logdir))
        return self.probe

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> bool:
        probe = self.probe
        if probe is not None:
            probe.__exit__(exc_type, exc, tb)
            self.trial.set_user_attr(USER_ATTR_LOGDIR, str(probe.logdir))
        if not isinstance(exc, RunStopped):
            return False
        decision = exc.decision
        f = decision.finding
        self.trial.set_user_attr(USER_ATTR_STOPPED, _plain(decision.to_json()))
        self.trial.set_user_attr(USER_ATTR_FINDING, _plain({
            "code": f.code, "rule": f.rule, "severity": f.severity, "title": f.title, "message": f.message,
            "first_step": f.first_step, "evidence": f.to_json()["evidence"],
        }))
        raise _optuna.TrialPruned(f"{decision.describe()}. {f.message}") from exc


def _plain(obj: Any) -> Any:
    """JSON-safe, NaN/Inf as null (Optuna's database storages keep user attributes as JSON)."""
    return json.loads(json.dumps(clean_number(obj), default=str))
