"""Reports and the rule catalog: JSON as the schema (gradprobe/schemas/report.schema.json)
states, text (wrapped at the terminal's width, code never wrapped, readable numbers, evidence
with units), Markdown, self-contained HTML with every log string escaped, generated catalog
and README."""

from __future__ import annotations

import json
import os
import re
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


def test_json_matches_the_schema():
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
    assert "new uPlot(" in page and page.count('class="gp-plot"') >= 4
    # no network: uPlot is inlined, and nothing references an external resource
    assert 'src="' not in page and 'href="http' not in page and "<link" not in page


def test_html_plots_a_value_within_rounding_of_the_largest_double():
    # 1.7975000000000001e308 rounded to 4 digits is 1.798e308, past the largest double: Inf,
    # which JSON cannot carry (found by the analyze fuzzer)
    n = 19
    log = gradprobe.RunLog.build({"step": list(range(n)), "loss": list(np.linspace(2.0, 1.0, n))},
                                 scalars=[(0, "val_loss", 1.7975000000000001e308), (9, "val_loss", 1.0)])
    from gradprobe.render.html import figures

    report = analyze_runlog(log)
    assert "new uPlot(" in report.render("html")
    ys = [v for f in figures(report) for s in f["series"] for v in s["y"] if v is not None]
    assert max(ys) == 1.7975000000000001e308


def test_rounding_never_overflows_a_finite_number():
    # a recommendation's 2 digits round 1.75e308 to 1.8e308, past the largest double (the
    # report's 6 digits cannot: the largest double is 1.797693e308)
    from gradprobe.analysis.numeric import nice
    from gradprobe.report import clean_number

    assert nice(1.75e308) == 1.75e308 and nice(-1.75e308) == -1.75e308 and nice(1.234e5) == 1.2e5
    assert clean_number(1.7976931348623157e308) == 1.79769e308


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


# ------------------------------------------------------------- reports people paste --
ANSI = re.compile(r"\x1b\[[0-9;]*m")
SAMPLES = sorted(p for p in (ROOT / "sample_runs").iterdir() if p.is_dir())


@pytest.fixture(scope="module")
def sample_reports():
    return {p.name: gradprobe.analyze(str(p)) for p in SAMPLES}


def _text(report: Report, width: int, color: bool = True) -> str:
    return ANSI.sub("", report.render("text", width=width, color=color))


@pytest.mark.parametrize("width", [80, 200])
def test_every_snippet_line_is_whole_in_the_text_report(sample_reports, width):
    """A pasted fix runs: every line of every snippet in the JSON report is one whole line
    of the text report (after its colour codes and indentation are stripped)."""
    checked = 0
    for name, report in sample_reports.items():
        lines = {line.strip() for line in _text(report, width).splitlines()}
        for f in report.to_json()["findings"]:
            for r in f["recommendations"]:
                for sl in (r.get("snippet") or "").splitlines():
                    if sl.strip():
                        assert sl.strip() in lines, f"{name} at {width} columns: snippet line broken: {sl!r}"
                        checked += 1
    assert checked > 50


def test_no_long_digit_strings_in_the_sample_reports(sample_reports):
    for name, report in sample_reports.items():
        for width in (80, 200):
            text = _text(report, width)
            long = re.findall(r"\d{10,}", text)
            assert not long, f"{name}: {long}"


def test_numbers_have_four_significant_digits_and_extremes_are_scientific():
    from gradprobe.render._common import compact, fmt_number, with_unit

    assert fmt_number(4796927521003506688.0) == "4.797e+18"
    assert fmt_number(30762319667075963704320498597888.0) == "3.076e+31"
    assert fmt_number(1.5e-7) == "1.5e-07" and fmt_number(0.000153) == "1.53e-04" and fmt_number(2e6) == "2e+06"
    assert fmt_number(65536.0) == "65536" and fmt_number(3) == "3" and fmt_number(0.12345678) == "0.1235"
    assert fmt_number(float("nan")) == "NaN" and fmt_number(float("inf")) == "inf" and fmt_number(True) == "yes"
    assert with_unit(23, "steps") == "23 steps" and with_unit(1, "steps") == "1 step"
    assert with_unit(12, "step") == "step 12" and with_unit(1.2682, "x") == "1.268x"
    assert with_unit(0.955, "%") == "95.5%" and with_unit(19_700_000, "bytes") == "18.8 MiB"
    assert with_unit(0.25, "s") == "250 ms" and with_unit(3.56, "decades") == "3.56 decades"
    assert compact([5, 7, 10, 15], "step") == "steps 5, 7, 10, 15"
    assert compact({"min": 65536.0, "max": 65536.0}, "scale") == "65536"
    assert compact({"bfloat16": ["body (LSTM)", "head (Linear)"]}) == "bfloat16 (body (LSTM), head (Linear))"
    assert compact([{"probe": "data", "target": "", "steps": 2}]) == "(probe data, steps 2)"
    assert compact(list(range(10))) == "0, 1, 2, 3, 4, 5, ... (10 in all)"
    assert compact({"body.bias_ih_l0": 161.7, "fc_1": 2.0}, "x") == "body.bias_ih_l0 161.7x, fc_1 2x"  # names as they are
    assert compact({"max_factor": 97.84, "first_step": 3}) == "max factor 97.84, first step 3"


def test_evidence_reads_as_phrases_with_units(sample_reports):
    report = sample_reports["000-undetached-state-bf16"]
    text = _text(report, 100, color=False)
    assert "oldest graph reached: 23 steps" in text
    assert "memory growth: 18.8 MiB" in text
    assert "{'" not in text and "[{" not in text  # no Python dict or list printed raw
    md = report.to_markdown()
    assert "| oldest graph reached | 23 steps |" in md
    page = report.render("html")
    assert "<td>oldest graph reached</td><td>23 steps</td>" in page


def test_text_width_follows_the_terminal_columns_and_defaults_to_100(sample_reports, monkeypatch):
    from gradprobe.render.text import terminal_width

    report = sample_reports["001-long-lookback"]
    prose = [line for line in _text(report, 60).splitlines() if not line.startswith("        ")]
    assert max(len(line) for line in prose) <= 60
    monkeypatch.delenv("COLUMNS", raising=False)
    assert terminal_width(None) == 100
    monkeypatch.setenv("COLUMNS", "132")
    assert terminal_width(None) == 132
    assert max(len(line) for line in ANSI.sub("", report.render("text")).splitlines()) <= 132


def test_the_root_cause_and_its_fix_are_on_the_first_screen(sample_reports):
    for name, report in sample_reports.items():
        serious = [f for f in report.findings if f.severity != "info"]
        if not serious or not serious[0].recommendations:
            continue
        first_screen = "\n".join(_text(report, 80).splitlines()[:24])
        assert serious[0].code in first_screen and "fix:" in first_screen, name


def test_a_hyperparameter_not_suggested_says_so():
    from gradprobe.render._common import recommendation_line

    rec = Recommendation.omitted("lr", 0.5, "the healthy part of the run is too short")
    line = recommendation_line(rec)
    assert line == "lr: 0.5, no value suggested (the healthy part of the run is too short)"
    report = Report(source={"path": "x", "kind": "gradprobe", "steps": 10}, summary={}, findings=[Finding(
        rule="lr-too-high", code="GP501", severity="error", confidence=0.9, title="t", message="m", recommendations=[rec])])
    for fmt in ("text", "markdown", "html"):
        assert "no value suggested" in report.render(fmt)
    assert 'class="nosuggest"' in report.render("html")


def test_no_color_and_NO_COLOR(tmp_path):
    env = {**os.environ, "COLUMNS": "90"}
    run = ROOT / "sample_runs" / "002-scaler-skip-update"
    plain = subprocess.run([sys.executable, "-m", "gradprobe", "analyze", str(run), "--no-color"], capture_output=True,
                           text=True, env=env)
    assert plain.returncode == 1 and "\x1b[" not in plain.stdout
    assert max(len(line) for line in plain.stdout.splitlines() if not line.startswith("        ")) <= 90
    from gradprobe.render.text import color_allowed

    class Tty:
        def isatty(self):
            return True

    assert color_allowed(Tty()) and not color_allowed(Tty(), no_color=True)
    os.environ["NO_COLOR"] = "1"
    try:
        assert not color_allowed(Tty())
    finally:
        del os.environ["NO_COLOR"]


@pytest.mark.parametrize("noted", [True, False], ids=["reader's note", "no loss recorded"])
def test_a_log_without_loss_is_not_called_healthy_in_any_format(noted):
    """Gradient norms only, healthy: no finding, but what was not observed is not judged."""
    log = gradprobe.RunLog.build({"step": np.arange(20), "grad_norm": np.full(20, 1.0)})
    if noted:  # a foreign log: its reader says why
        log.source["skipped"] = ["no training loss in this log (read: grad_norm from 'g'): the rules that judge the loss "
                                 "did not run, so this report cannot call the run healthy"]
    report = analyze_runlog(log)
    assert not report.findings
    for fmt in ("text", "markdown", "html"):
        out = " ".join(report.render(fmt).split())
        assert "nothing in this run looks unhealthy" not in out, fmt
        assert "not judged healthy" in out and "training loss" in out and "Judged:" in out, fmt
    healthy = analyze_runlog(gradprobe.RunLog.build({"step": np.arange(20), "grad_norm": np.full(20, 1.0),
                                                     "loss": np.linspace(2, 1, 20)}))
    assert not healthy.findings and "nothing in this run looks unhealthy" in healthy.render("text")


def test_html_report_is_small(sample_reports):
    from gradprobe.render.html import MAX_POINTS

    for name, report in sample_reports.items():
        assert len(report.render("html").encode()) < 200_000, name
    # a long run: 100k steps of every per-step signal and 30 layers stays under 1.5 MB
    n = 100_000
    rng = np.random.default_rng(0)
    steps = {"step": np.arange(n), "loss": np.exp(-np.arange(n) / 3e4) + rng.random(n) * 0.01,
             "grad_norm": rng.lognormal(size=n), "step_grad_norm": np.minimum(rng.lognormal(size=n), 1.0),
             "clip_max_norm": np.ones(n), "scale": np.full(n, 65536.0), "skipped": rng.random(n) < 0.001,
             "state_age": np.ones(n, dtype=int), "eval_loss": np.where(np.arange(n) % 1000 == 0, 0.5, np.nan)}
    steps["grad_norm"][5000] = np.nan
    log = gradprobe.RunLog.build(steps, layer_grad={f"layer{i}.weight": rng.lognormal(size=n) for i in range(30)})
    page = analyze_runlog(log).render("html")
    assert len(page.encode()) < 1.5 * 2**20, len(page)
    assert MAX_POINTS <= 2000


def test_vendored_plot_library_is_the_pinned_release():
    import hashlib

    from gradprobe.render.html import VENDOR, VENDORED

    for name, digest in VENDORED.items():
        with open(os.path.join(VENDOR, name), "rb") as f:
            assert hashlib.sha256(f.read()).hexdigest() == digest, name
    assert "uplot@1.6.32" in (Path(VENDOR) / "README.md").read_text() and "MIT" in (Path(VENDOR) / "uPlot.LICENSE").read_text()


def test_html_short_series_are_points_and_markers_are_one_per_finding():
    from gradprobe.render.html import SHORT_SERIES, figures, markers

    report = _report_with_everything()
    figs = figures(report)
    loss = next(f for f in figs if f["title"] == "Loss")
    by_label = {s["label"]: s for s in loss["series"]}
    assert by_label["val_loss"]["points"] and not by_label["training loss"]["points"]
    assert sum(v is not None for v in by_label["val_loss"]["y"]) <= SHORT_SERIES
    marks = markers(report)
    assert len(marks) == sum(1 for f in report.findings if f.first_step is not None and f.severity != "info")


def test_html_names_each_no_grad_loss_stream_by_the_line_that_computed_it():
    # a script evaluating the training set (line 47) and the validation set (line 48) under no_grad
    from gradprobe.render.html import figures

    n = 60
    log = gradprobe.RunLog.build(
        {"step": np.arange(n), "loss": np.linspace(2, 0.1, n),
         "eval_loss": np.where(np.arange(n) % 10 == 9, np.linspace(2, 0.1, n), np.nan)},
        meta={"eval_streams": [
            {"name": "eval_loss/0", "site": ["train.py:12", "train.py:47"], "first_step": 9},
            {"name": "eval_loss/1", "site": ["train.py:12", "train.py:48"], "first_step": 9}]},
        scalars=[(i, "eval_loss/1", 1.0 + i / 100) for i in range(9, n, 10)],
    )
    loss = next(f for f in figures(analyze_runlog(log)) if f["title"] == "Loss")
    labels = [s["label"] for s in loss["series"]]
    assert "no-grad loss at train.py:47" in labels and "no-grad loss at train.py:48" in labels
    assert "eval_loss/1" not in labels
