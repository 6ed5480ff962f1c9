"""gradprobe.integrations.optuna: real tiny studies in which some trials get an absurd learning
rate; those trials go NaN/Inf, gradprobe stops them and Optuna records them as pruned (with the
finding in their user attributes) while the study goes on. A multi-objective study, where
``trial.report``/``should_prune`` are not available, is handled the same way."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

optuna = pytest.importorskip("optuna")

from gradprobe.integrations.optuna import (  # noqa: E402
    USER_ATTR_FINDING,
    USER_ATTR_LOGDIR,
    USER_ATTR_STOPPED,
    watch_trial,
)

#: steps per trial: a healthy trial runs them all; an absurd one is stopped long before
STEPS = 1200
SANE_LR, ABSURD_LR = 0.05, 1e4


def _objective(logdir: str, multi: bool = False):
    def objective(trial):
        lr = trial.suggest_float("lr", 1e-3, 1e5, log=True)
        torch.manual_seed(0)
        model = torch.nn.Linear(4, 1)
        opt = torch.optim.SGD(model.parameters(), lr=lr)
        x = torch.randn(16, 4)
        y = x @ torch.tensor([[1.0], [-2.0], [0.5], [3.0]])
        with watch_trial(trial, model, opt, logdir=logdir, profile="light", total_steps=STEPS):
            for _ in range(STEPS):
                loss = torch.nn.functional.mse_loss(model(x), y)
                opt.zero_grad()
                loss.backward()
                opt.step()
        final = float(loss.detach())
        return (final, float(model.weight.abs().sum())) if multi else final

    return objective


def _study(tmp_path: Path, multi: bool):
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    kw = {"directions": ["minimize", "minimize"]} if multi else {"direction": "minimize"}
    study = optuna.create_study(storage=f"sqlite:///{tmp_path / 'study.db'}", **kw)
    for lr in (SANE_LR, ABSURD_LR, SANE_LR / 2, ABSURD_LR * 3):
        study.enqueue_trial({"lr": lr})
    study.optimize(_objective(str(tmp_path / "runs"), multi), n_trials=4)
    return study


def _check(study, tmp_path: Path) -> None:
    trials = study.get_trials(deepcopy=False)
    states = [t.state for t in trials]
    P, C = optuna.trial.TrialState.PRUNED, optuna.trial.TrialState.COMPLETE
    assert states == [C, P, C, P], [(t.params, t.state, t.user_attrs) for t in trials]
    for t in trials:
        assert Path(t.user_attrs[USER_ATTR_LOGDIR]) == tmp_path / "runs" / f"trial-{t.number}"
        if t.state == C:
            assert USER_ATTR_STOPPED not in t.user_attrs
            continue
        stop, finding = t.user_attrs[USER_ATTR_STOPPED], t.user_attrs[USER_ATTR_FINDING]
        assert stop["code"] == finding["code"] in ("GP401", "GP403") and finding["severity"] == "error"
        assert 0 < stop["step"] < STEPS - 1 and stop["total_steps"] == STEPS and stop["steps_left"] > 0
        assert finding["message"] and isinstance(finding["evidence"], dict)
        meta = json.loads(Path(t.user_attrs[USER_ATTR_LOGDIR], "gradprobe.json").read_text())
        assert meta["stopped"]["step"] == stop["step"]  # the trial's run log says the same


def test_absurd_learning_rates_are_pruned_with_their_finding(tmp_path):
    study = _study(tmp_path, multi=False)
    _check(study, tmp_path)
    assert study.best_trial.params["lr"] == SANE_LR / 2 or study.best_trial.params["lr"] == SANE_LR


def test_multi_objective_study_prunes_without_report_or_should_prune(tmp_path):
    study = _study(tmp_path, multi=True)
    _check(study, tmp_path)
    pruned = [t for t in study.trials if t.state == optuna.trial.TrialState.PRUNED]
    assert all(t.values is None and not t.intermediate_values for t in pruned)
    assert study.best_trials and all(t.state == optuna.trial.TrialState.COMPLETE for t in study.best_trials)


def test_an_exception_of_the_objective_still_fails_the_trial(tmp_path):
    """Only a gradprobe stop prunes; the user's own error fails the trial as without gradprobe."""
    def objective(trial):
        model = torch.nn.Linear(2, 1)
        with watch_trial(trial, model, torch.optim.SGD(model.parameters(), lr=0.1), logdir=str(tmp_path)):
            raise ValueError("the user's bug")

    optuna.logging.set_verbosity(optuna.logging.ERROR)
    study = optuna.create_study()
    study.optimize(objective, n_trials=1, catch=(ValueError,))
    assert study.trials[0].state == optuna.trial.TrialState.FAIL
    assert USER_ATTR_STOPPED not in study.trials[0].user_attrs
