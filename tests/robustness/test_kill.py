"""SIGKILL survival (nothing lost): a watched run killed at any moment leaves a
log that ``gradprobe analyze`` reads (exit 0/1, never 2), with steps contiguous from 0 and
every step that closed more than a second before the kill.

The script under test prints each step's index and time right after the step closes, so the
test knows what was due; :func:`tests.robustness.harness.kill_trial` holds the mechanics
(``tests/test_runlog.py`` has the single basic trial).
"""

from __future__ import annotations

import pytest

from tests.robustness import harness as H


def test_kill_while_stuck_between_steps_keeps_every_step(tmp_path):
    """The script closes 20 steps, then hangs (a stuck data loader) and is killed 1.5 s later:
    no step closes to trigger a hand-over, so the probe's flusher thread must have written
    all 20."""
    trial = H.kill_trial(0, str(tmp_path), mode="watch", hang=True, hang_after=20, after_hang=1.5)
    assert trial.survived, trial.problems
    assert trial.closed_steps == trial.required_steps == trial.logged_steps == 20


@pytest.mark.slow
@pytest.mark.parametrize("seed", range(12))
def test_kill_at_a_random_moment(tmp_path, seed):
    """Seeded random kill times (0.05-3 s into training), ``gradprobe.watch`` in the script or
    ``gradprobe run`` around it, running or stuck after a random number of steps."""
    trial = H.kill_trial(seed, str(tmp_path))
    assert trial.survived, (trial, trial.problems)


@pytest.mark.slow
def test_kill_under_gradprobe_run_while_stuck(tmp_path):
    trial = H.kill_trial(1, str(tmp_path), mode="run", hang=True, hang_after=30, after_hang=1.5)
    assert trial.survived, trial.problems
    assert trial.logged_steps == 30
