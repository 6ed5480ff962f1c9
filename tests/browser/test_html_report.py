"""The HTML report, checked in a real headless Chromium on a real run's report.

A tiny run with ``gradprobe.watch`` gets a NaN batch at step 30 (two findings start at that
same step: the NaN input and the non-finite loss) and a validation loss logged twice (a short
series). Its HTML report is opened from disk with Selenium driving Debian's ``chromium`` /
``chromium-driver`` (``.ci/run`` installs them), and the page must show: no console error and
no network request, one plot per group of signals the run has with each of its series in the
legend, one marker per finding on every plot over steps, marker labels that do not overlap
(the two at step 30 are stacked), and a legend box that overlaps no plot area or axis. A
screenshot goes to ``artifacts/browser/html_report.png`` (git-ignored).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from typing import Any

import pytest
import torch

import gradprobe
from tests.browser.test_tensorboard_dashboard import ARTIFACTS, CHROMEDRIVER, CHROMIUM, CHROMIUM_FLAGS, _browser_available, _wait

pytestmark = pytest.mark.slow

#: the HTML report of a typical run stays far below this (issue: at most 1.5 MB)
MAX_BYTES = int(1.5 * 2**20)


def _record(logdir: str) -> Any:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.ReLU(), torch.nn.Linear(32, 1))
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    g = torch.Generator().manual_seed(0)
    w = torch.randn(8, 1, generator=g)
    with gradprobe.watch(model, opt, logdir=logdir) as probe:
        for i in range(60):
            x = torch.randn(32, 8, generator=g)
            if i == 30:
                x[0, 0] = float("nan")
            opt.zero_grad()
            loss = torch.nn.functional.mse_loss(model(x), x @ w)
            if not torch.isfinite(loss):
                continue  # the loop's own guard: the NaN never reaches the weights
            loss.backward()
            opt.step()
            if i in (20, 50):
                with torch.no_grad():
                    probe.log(val_loss=float(torch.nn.functional.mse_loss(model(x), x @ w)))
    return probe.report()


@pytest.fixture(scope="module")
def page(tmp_path_factory) -> tuple[str, Any]:
    why = _browser_available()
    if why:
        if os.environ.get("CI"):
            pytest.fail(f"browser test cannot run in CI: {why}")
        pytest.skip(why)
    root = tmp_path_factory.mktemp("html")
    report = _record(str(root / "run"))
    path = root / "report.html"
    path.write_text(report.render("html"), encoding="utf-8")
    return str(path), report


@pytest.fixture(scope="module")
def driver(page):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for flag in CHROMIUM_FLAGS:
        opts.add_argument(flag)
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    profile = tempfile.mkdtemp(prefix="gradprobe-chromium-")
    opts.add_argument(f"--user-data-dir={profile}")
    d = webdriver.Chrome(service=Service(CHROMEDRIVER), options=opts)
    try:
        d.get("file://" + page[0])
        _wait("the plots to be drawn", lambda: d.execute_script("return document.querySelectorAll('.uplot').length"))
        yield d
    finally:
        d.quit()
        shutil.rmtree(profile, ignore_errors=True)


#: per plot: its legend's series labels, the boxes of its plot area (axes included), legend and
#: marker labels, and the marker count
LAYOUT_JS = """
function box(e) { const r = e.getBoundingClientRect(); return [r.left, r.top, r.right, r.bottom]; }
return Array.from(document.querySelectorAll('.gp-plot')).map(function(p) {
  return {
    legend: Array.from(p.querySelectorAll('.u-legend .u-series .u-label')).map(e => e.textContent),
    wrap: box(p.querySelector('.u-wrap')),
    legendBox: box(p.querySelector('.u-legend')),
    markers: p.querySelectorAll('.gp-marker').length,
    labels: Array.from(p.querySelectorAll('.gp-marker-label')).map(e => ({text: e.textContent, box: box(e)})),
  };
});
"""


def _overlap(a: list[float], b: list[float]) -> bool:
    return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]


def test_html_report_is_small_and_offline(page, driver) -> None:
    path, report = page
    assert os.path.getsize(path) < MAX_BYTES
    errors = [e for e in driver.get_log("browser") if e.get("level") == "SEVERE"]
    assert not errors, errors
    requests = driver.execute_script("return performance.getEntriesByType('resource').map(e => e.name)")
    assert not [r for r in requests if not r.startswith(("file:", "data:", "blob:"))], requests


def test_one_plot_per_signal_group_with_every_series(page, driver) -> None:
    from gradprobe.render.html import figures

    _, report = page
    figs = figures(report)
    plots = driver.execute_script(LAYOUT_JS)
    assert len(plots) == len(figs) == driver.execute_script("return document.querySelectorAll('.uplot').length")
    for fig, plot in zip(figs, plots):
        assert plot["legend"][1:] == [s["label"] for s in fig["series"]], fig["title"]
    loss = next(f for f in figs if f["title"] == "Loss")
    assert {s["label"]: s["points"] for s in loss["series"]}["val_loss"]  # two points: drawn as points


def test_one_marker_per_finding_and_labels_apart(page, driver) -> None:
    from gradprobe.render.html import figures, markers

    _, report = page
    marks = markers(report)
    assert len(marks) == 2 and marks[0]["step"] == marks[1]["step"] == 30  # two findings at one step
    for fig, plot in zip(figures(report), driver.execute_script(LAYOUT_JS)):
        if not fig["markers"]:
            assert plot["markers"] == 0
            continue
        expected = sum(1 for m in marks if fig["x"][0] <= m["step"] <= fig["x"][-1])
        assert plot["markers"] == expected == len(plot["labels"]), fig["title"]
        assert sorted(lb["text"] for lb in plot["labels"]) == sorted(m["code"] for m in marks if fig["x"][0] <= m["step"] <= fig["x"][-1])
        for i, a in enumerate(plot["labels"]):
            for b in plot["labels"][i + 1:]:
                assert not _overlap(a["box"], b["box"]), (fig["title"], a, b)


def test_legend_does_not_overlap_the_plot_or_its_axes(page, driver) -> None:
    for plot in driver.execute_script(LAYOUT_JS):
        assert plot["legend"] and not _overlap(plot["legendBox"], plot["wrap"]), plot
    driver.execute_script("document.getElementById('gp-plot-0').scrollIntoView()")
    os.makedirs(ARTIFACTS, exist_ok=True)
    shot = os.path.join(ARTIFACTS, "html_report.png")
    assert driver.save_screenshot(shot)
    assert os.path.getsize(shot) > 10_000
