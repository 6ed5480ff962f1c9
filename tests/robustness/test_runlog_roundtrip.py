"""``RunLog`` save/load round trips over every column, wild values and unicode names
(``tests/test_runlog.py`` has the basic round trip of a recorded run and of a few columns).

Found by these properties: a string column with a missing value (``state_age_module`` None,
held by pandas as NaN) could not be saved; an event message reading "NaN" came back as a
float; a NaN (non-finite) weight norm was saved as "not measured".
"""

from __future__ import annotations

import math
import tempfile

import numpy as np
import pandas as pd
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import gradprobe
from tests.robustness import fuzz as FZ

text = st.text(st.characters(blacklist_categories=("Cs",)), max_size=12)
finite_json = st.recursive(st.none() | st.booleans() | st.integers(-(2**53), 2**53) | st.floats(allow_nan=False, allow_infinity=False)
                           | text, lambda c: st.lists(c, max_size=3) | st.dictionaries(text, c, max_size=3), max_leaves=8)
any_float = st.floats(allow_nan=True, allow_infinity=True)
meta_ok = st.fixed_dictionaries({}, optional={
    "models": st.lists(st.fixed_dictionaries({"name": text, "class": text, "parameters": st.integers(0, 10**9)}), max_size=2),
    "optimizers": st.lists(st.fixed_dictionaries({"index": st.integers(0, 3), "class": text,
                                                  "param_groups": st.lists(st.dictionaries(text, finite_json, max_size=3), max_size=2)}),
                           max_size=2),
    "recurrent": st.lists(st.fixed_dictionaries({"module": text, "hidden_size": st.integers(0, 4096)}), max_size=2),
    "autocast": st.dictionaries(text, st.fixed_dictionaries({"enabled": st.booleans(), "dtype": text}), max_size=2),
    "world_size": st.integers(1, 64),
    "rank": st.integers(0, 63),
    "extra": finite_json,
})
event = st.fixed_dictionaries({"kind": text}, optional={
    "message": text, "module": text,  # text fields stay text, even "NaN"
    **{k: st.one_of(text, any_float, st.lists(any_float, max_size=3), st.integers(-(2**53), 2**53)) for k in ("step", "value", "nested")},
})
case = st.fixed_dictionaries({
    "n": st.integers(0, 30),
    "steps": FZ._step_columns(),
    "layers": st.dictionaries(text.filter(bool), st.lists(any_float, min_size=1, max_size=30), max_size=4),
    "weights": st.booleans(),
    "samples": st.lists(st.tuples(st.integers(-(2**62), 2**62), text, text, text, st.integers(-(2**31), 2**31 - 1), any_float),
                        max_size=20),
    "scalars": st.lists(st.tuples(st.integers(-(2**62), 2**62), text, any_float), max_size=10),
    "events": st.lists(event, max_size=4),
    "meta": meta_ok,
})


def _same_value(a, b) -> bool:
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same_value(x, y) for x, y in zip(a, b))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same_value(a[k], b[k]) for k in a)
    return a == b


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(case=case)
def test_save_load_round_trip(case):
    # step indices as the recorder writes them (0..n-1): duplicated steps are merged on load
    steps = {k: v for k, v in case["steps"].items() if k != "step"}
    log = FZ.synthetic_log({**case, "steps": steps, "fmt": "json"})
    with tempfile.TemporaryDirectory() as d:
        log.save(d)
        back = gradprobe.RunLog.load(d)
    assert not back.source["skipped"], back.source["skipped"]
    pd.testing.assert_frame_equal(log.steps, back.steps)
    if log.n_steps and len(log.layer_grad.columns):
        pd.testing.assert_frame_equal(log.layer_grad, back.layer_grad, check_names=False)
        if case["weights"]:
            pd.testing.assert_frame_equal(log.layer_weight, back.layer_weight, check_names=False)
    assert _same_value(log.samples.to_numpy().tolist(), back.samples.to_numpy().tolist())
    assert _same_value(log.scalars.to_numpy().tolist(), back.scalars.to_numpy().tolist())
    assert _same_value(log.events, back.events)
    for k, v in case["meta"].items():
        assert _same_value(back.meta[k], v), k


def test_round_trip_of_a_recorded_run_is_a_fixed_point(tmp_path):
    """Loading a real log, saving it and loading it again changes nothing (twice)."""
    from tests.robustness import harness as H

    a = gradprobe.RunLog.load(H.template_run())
    a.save(str(tmp_path / "b"))
    b = gradprobe.RunLog.load(str(tmp_path / "b"))
    b.save(str(tmp_path / "c"))
    c = gradprobe.RunLog.load(str(tmp_path / "c"))
    for x, y in ((a, b), (b, c)):
        pd.testing.assert_frame_equal(x.steps, y.steps)
        pd.testing.assert_frame_equal(x.layer_grad, y.layer_grad)
        pd.testing.assert_frame_equal(x.layer_weight, y.layer_weight)
        assert _same_value(x.events, y.events)
        assert len(x.samples) == len(y.samples) and np.allclose(x.samples["value"], y.samples["value"], equal_nan=True)
    assert gradprobe.analyze(a).to_json()["findings"] == gradprobe.analyze(c).to_json()["findings"]
