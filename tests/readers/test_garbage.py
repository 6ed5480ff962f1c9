"""Garbage in, one clear line out: whatever bytes sit behind a path, :func:`load` either
returns a RunLog or raises :class:`LogError` (never another exception)."""

from __future__ import annotations

import json
import os
import tempfile

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gradprobe.readers import load
from gradprobe.runlog import LogError, RunLog

NAMES = ["trainer_state.json", "metrics.csv", "events.out.tfevents.1.host", "log", "mlflow.db", "meta.yaml"]


def _load_bytes(name: str, data: bytes) -> None:
    with tempfile.TemporaryDirectory() as d:
        p = os.path.join(d, name)
        with open(p, "wb") as f:
            f.write(data)
        for target in (p, d):
            try:
                log = load(target)
            except LogError as exc:
                assert str(exc) and "\n" not in str(exc)
            else:
                assert isinstance(log, RunLog)


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(name=st.sampled_from(NAMES), data=st.binary(max_size=400))
def test_random_bytes(name: str, data: bytes) -> None:
    _load_bytes(name, data)


_scalar = st.one_of(st.none(), st.booleans(), st.integers(-5, 10**6), st.floats(allow_nan=True, allow_infinity=True),
                    st.text(max_size=5))
_entry = st.dictionaries(st.sampled_from(["step", "loss", "grad_norm", "learning_rate", "eval_loss", "epoch", "x"]),
                         _scalar, max_size=6)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(history=st.lists(st.one_of(_entry, _scalar), max_size=12), cut=st.integers(0, 2000))
def test_random_trainer_states(history: list, cut: int) -> None:
    text = json.dumps({"global_step": 3, "log_history": history}, indent=2)
    _load_bytes("trainer_state.json", text.encode())
    _load_bytes("trainer_state.json", text[:cut].encode())


_cell = st.one_of(st.just(""), st.integers(-3, 100).map(str), st.floats(allow_nan=True).map(repr), st.text(max_size=3))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(header=st.lists(st.sampled_from(["step", "epoch", "train_loss", "val_loss", "lr-Adam", "grad_2.0_norm/a", "x"]),
                       min_size=1, max_size=6),
       rows=st.lists(st.lists(_cell, max_size=7), max_size=10), cut=st.integers(0, 400))
def test_random_metrics_csv(header: list[str], rows: list[list[str]], cut: int) -> None:
    text = "\r\n".join(",".join(r) for r in [header] + rows) + "\r\n"
    _load_bytes("metrics.csv", text.encode())
    _load_bytes("metrics.csv", text[:cut].encode())
