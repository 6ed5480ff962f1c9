"""Fixtures shared by the rule tests."""

from __future__ import annotations

import pytest

import gradprobe
from gradprobe.report import Report
from tests.rules import _runs_training as R


@pytest.fixture(scope="module")
def real(tmp_path_factory):
    """Each real training run of :mod:`tests.rules._runs_training` once per module (several
    tests share one), analyzed."""
    cache: dict[str, Report] = {}

    def get(name: str) -> Report:
        if name not in cache:
            d = str(tmp_path_factory.mktemp(name) / "run")
            (R.HEALTHY.get(name) or getattr(R, name))(d)
            cache[name] = gradprobe.analyze(d)
        return cache[name]

    return get
