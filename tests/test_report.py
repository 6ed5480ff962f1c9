"""Reports and the rule catalog: JSON per SPEC §2 (validated against the JSON Schema), text,
Markdown, self-contained HTML with every log string escaped, generated catalog and README."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import jsonschema
import numpy as np
import pytest

import gradprobe
from gradprobe.engine import analyze_runlog
from gradprobe.report import Finding, Recommendation, Report
from gradprobe.rules.base import Explanation, registry
from gradprobe.rules.catalog import README_BEGIN, README_END, readme_table

ROOT = Path(__file__).resolve().parents[1]
SCHEMA = json.loads((ROOT / "gradprobe" / "schemas" / "report.schema.json").read_text())
EVIL = '<script>alert("x")</script>&<img src=x onerror=alert(1)>'


def _report_with_everything() -> Report:
    n = 50
    steps = {
        "step": np.arange(n),
        "loss": np.linspace(2, 1, n),
        "grad_norm": np.linspace(1, 3, n),
        "step_grad_norm": np.minimum(np.linspace(1, 3, n), 2.0),
        "clip_max_norm": np.full(n, 2.0),
        "clip_calls": np.ones(n, dtype=np.int32),
        "scale": np.full(n, 1024.0),
        "skipped": [i < 3 for i in range(n)],
        "state_age": np.arange(n),
        "state_age_module": [EVIL] * n,
        "eval_loss": np.where(np.arange(n) % 10 == 0, 1.5, np.nan),
    }
    log = gradprobe.RunLog.build(
        steps,
        meta={"optimizers": [{"class": "SGD", "param_groups": [{"lr": 0.1}]}],
              "recurrent": [{"module": EVIL, "hidden_size": 8, "lookback": 40}]},
        layer_grad={EVIL: np.linspace(1, 2, n), "fc.weight": np.linspace(0.1, 0.2, n)},
        samples=[(10, "bptt", EVIL, "profile", k, 0.5**k) for k in range(20)],
        scalars=[(i, "val_loss", 1.0 + i / 100) for i in range(0, n, 5)],
        path=EVIL,
    )
    report = analyze_runlog(log)
    report.findings.insert(0, Finding(
        rule="undetached-hidden-state", code="GP101", severity="error", confidence=0.9, title=EVIL,
        message=f"state entering {EVIL}", first_step=3, layer=EVIL, evidence={EVIL: EVIL, "age": 12.0, "nan": float("nan")},
        recommendations=[Recommendation.hyperparameter("lookback", 40, 10, EVIL), Recommendation.code(EVIL, EVIL)]))
    report.suggested_hyperparameters["lookback"] = 10
    return report


def test_json_matches_spec_and_schema():
    report = _report_with_everything()
    data = report.to_json()
    jsonschema.validate(data, SCHEMA)
    text = report.render("json")
    assert json.loads(text) == json.loads(json.dumps(data))
    json.loads(text, parse_constant=lambda c: pytest.fail(f"non-strict JSON constant {c}"))
    f = data["findings"][0]
    assert list(f)[:11] == ["rule", "code", "severity", "confidence", "title", "message", "first_step", "layer",
                            "evidence", "caused_by", "recommendations"]
    assert f["recommendations"][0] == {"kind": "hyperparameter", "name": "lookback", "current": 40, "suggested": 10, "reason": EVIL}
    assert data["summary"]["recurrent"] == [{"module": EVIL, "hidden_size": 8, "lookback": 40}]


def test_text_and_markdown_put_the_root_cause_and_fix_first():
    report = _report_with_everything()
    text = str(report)
    assert text.index("GP101") < text.index("fix:") < text.index("evidence:")
    md = report.to_markdown()
    assert md.startswith("# gradprobe report") and "**Fix**" in md and "```python" in md


def test_html_is_self_contained_and_escapes_every_log_string():
    report = _report_with_everything()
    page = report.render("html")
    assert EVIL not in page
    assert "<script>alert" not in page and "<img" not in page  # no tag from the log can form
    assert "&lt;script&gt;" in page and "\\u003cscript\\u003e" in page
    assert "Plotly.newPlot" in page and page.count('class="plot"') >= 4
    # no network: plotly.js is inlined, and nothing outside it references an external resource
    head, bundle_and_rest = page.split("<script>", 1)
    rest = bundle_and_rest.split("</script>", 1)[1]
    for text in (head, rest):
        assert 'src="http' not in text and 'href="http' not in text and "<link" not in text


def test_catalog_every_rule_documented():
    rules = registry()
    for cls in rules:
        assert cls.code.startswith("GP") and cls.slug and cls.title
        assert cls.severity in ("error", "warning", "info")
        ex = cls.explanation
        assert isinstance(ex, Explanation)
        for attr, _ in Explanation.SECTIONS:
            assert getattr(ex, attr).strip(), f"{cls.code} lacks {attr}"
        doc = (cls.__doc__ or "").lower()
        assert "confidence" in doc, f"{cls.code}: the docstring must say how confidence is computed"
        for name, formula in cls.computes.items():
            assert name in gradprobe.report.CANONICAL_HYPERPARAMETERS and formula.strip()


def test_readme_rule_table_is_generated_and_current():
    text = (ROOT / "README.md").read_text()
    a = text.index(README_BEGIN) + len(README_BEGIN)
    b = text.index(README_END)
    assert text[a:b].strip() == readme_table().strip(), "run: python -m gradprobe.rules.catalog --readme README.md"


def test_analysis_does_not_import_torch():
    code = ("import sys, gradprobe, gradprobe.engine, gradprobe.rules, gradprobe.render, gradprobe.readers, gradprobe.cli.app;"
            "print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
