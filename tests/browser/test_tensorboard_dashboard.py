"""The gradprobe TensorBoard dashboard, checked in a real headless Chromium.

Records two tiny runs with ``gradprobe.watch`` (a healthy one, and one whose loss is blown up
by 1e30 at one step, so the gradient norm spikes and the weights then go NaN), writes the
findings with ``probe.report()``, starts ``tensorboard --logdir DIR`` on a free local port,
and checks with Selenium driving Debian's ``chromium``/``chromium-driver`` (no download;
``.ci/run`` installs them) that the Custom Scalars page shows the gradprobe category with
only the charts the runs have data for, every axis readable (no tick at 1e20 or beyond: the
spike is 30 on a log10 chart, not a flattening 1e30), and that the Text page shows each
run's findings. Screenshots go to ``artifacts/browser/`` (git-ignored).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from typing import Any, Callable

import pytest
import torch

import gradprobe

pytestmark = pytest.mark.slow

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
ARTIFACTS = os.path.join(REPO, "artifacts", "browser")
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"
CHROMIUM_FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--window-size=1400,1100",
]

#: visible text of the page, shadow DOMs included (TensorBoard's dashboards are Polymer
#: elements), without style/script contents
DEEP_TEXT_JS = """
const out = [];
function walk(n) {
  if (!n) return;
  if (n.nodeType === 3) {
    const p = n.parentNode;
    if (!p || !['STYLE', 'SCRIPT', 'NOSCRIPT', 'TEMPLATE'].includes(p.nodeName)) out.push(n.textContent);
    return;
  }
  if (n.shadowRoot) walk(n.shadowRoot);
  for (const c of n.childNodes) walk(c);
}
walk(document.body);
return out.join(' ').replace(/\\s+/g, ' ');
"""


def _browser_available() -> str | None:
    missing = [p for p in (CHROMIUM, CHROMEDRIVER) if not os.path.exists(p)]
    if missing:
        return f"not installed: {', '.join(missing)} (apt-get install chromium chromium-driver)"
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "selenium is not installed (pip install -e '.[dev]')"
    return None


@pytest.fixture(scope="module")
def browser_ready() -> None:
    why = _browser_available()
    if why:
        if os.environ.get("CI"):
            pytest.fail(f"browser test cannot run in CI: {why}")
        pytest.skip(why)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _get_json(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=5) as r:  # noqa: S310 - loopback only
        return json.loads(r.read().decode())


def _wait(what: str, check: Callable[[], Any], timeout: float = 60.0) -> Any:
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        try:
            last = check()
            if last:
                return last
        except Exception as exc:  # noqa: BLE001 - not up yet
            last = exc
        time.sleep(0.5)
    raise AssertionError(f"timed out waiting for {what} (last: {str(last)[:500]})")


def _record_run(logdir: str, blow_up_at: int | None = None) -> Any:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.ReLU(), torch.nn.Linear(32, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    g = torch.Generator().manual_seed(0)
    w = torch.randn(8, 1, generator=g)
    with gradprobe.watch(model, opt, logdir=logdir) as probe:
        for i in range(40):
            x = torch.randn(32, 8, generator=g)
            opt.zero_grad()
            loss = torch.nn.functional.mse_loss(model(x), x @ w)
            if i == blow_up_at:
                loss = loss * 1e30  # a finite spike; the step it feeds sends the weights to NaN
            loss.backward()
            if blow_up_at is None:
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
        report = probe.report()  # writes the findings as TensorBoard text
    return report


@pytest.fixture(scope="module")
def tensorboard_url(tmp_path_factory, browser_ready):
    root = str(tmp_path_factory.mktemp("tb"))
    _record_run(os.path.join(root, "exp1"))
    _record_run(os.path.join(root, "blowup"), blow_up_at=20)
    port = _free_port()
    exe = os.path.join(os.path.dirname(sys.executable), "tensorboard")
    cmd = [exe] if os.path.exists(exe) else [sys.executable, "-m", "tensorboard.main"]
    log = open(os.path.join(root, "tensorboard.log"), "w")
    proc = subprocess.Popen(cmd + ["--logdir", root, "--port", str(port), "--host", "127.0.0.1"],
                            stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        _wait("tensorboard to list the run", lambda: "exp1" in _get_json(url + "/data/runs"))
        _wait("the findings text to be loaded",
              lambda: all(_get_json(url + "/data/plugin/text/tags").get(r) for r in ("exp1", "blowup")))
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
        log.close()


@pytest.fixture(scope="module")
def driver(browser_ready):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for flag in CHROMIUM_FLAGS:
        opts.add_argument(flag)
    profile = tempfile.mkdtemp(prefix="gradprobe-chromium-")
    opts.add_argument(f"--user-data-dir={profile}")
    d = webdriver.Chrome(service=Service(CHROMEDRIVER), options=opts)
    try:
        yield d
    finally:
        d.quit()
        shutil.rmtree(profile, ignore_errors=True)


def _open(driver: Any, url: str, page: str, expected: list[str]) -> str:
    driver.get("about:blank")  # a fresh document: text of the previous dashboard is gone
    driver.get(f"{url}/#{page}")

    def shown() -> str | None:
        text = driver.execute_script(DEEP_TEXT_JS)
        return text if all(e in text for e in expected) else None

    return _wait(f"{page} to show {expected}", shown)


def _screenshot(driver: Any, name: str) -> str:
    os.makedirs(ARTIFACTS, exist_ok=True)
    path = os.path.join(ARTIFACTS, name)
    assert driver.save_screenshot(path)
    with open(path, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    assert os.path.getsize(path) > 10_000  # a rendered page, not a blank one
    return path


#: an axis tick at 1e20 or beyond: a chart flattened by a spike (TensorBoard prints 1e30 as 1e+30)
HUGE_TICK = re.compile(r"\de\+(?:[2-9]\d|\d{3})")


def test_custom_scalars_dashboard_renders(tensorboard_url: str, driver: Any) -> None:
    from gradprobe.runlog.tensorboard import CHARTS

    shown = ["Gradient norm vs max_norm (log10)", "Loss (log10)", "Learning rate", "Per-layer gradient norms (log10)",
             "Update-to-weight ratio (log10)", "Non-finite layers", "Step and backward time (s)", "Memory (bytes)"]
    # charts that have data list their series: the gradient norm chart has all three
    series = [f"{tag} (exp1)" for tag in ("gradprobe/log10/grad_norm/preclip", "gradprobe/log10/grad_norm/after_clip",
                                          "gradprobe/log10/grad_norm/max_norm", "gradprobe/log10/loss/train", "gradprobe/lr")]
    text = _open(driver, tensorboard_url, "custom_scalars", ["gradprobe", *shown, *series, "gradprobe/log10/loss/train (blowup)"])
    assert "Matches (5)" in text  # the gradient norm chart: 3 series of exp1, 2 of blowup (no clip there)
    # neither run has a GradScaler, a carried state or user scalars: no chart for them
    for absent in ("GradScaler scale (log10) and skipped steps", "State age (steps a carried graph reaches back)", "User scalars",
                   "Gradient horizon through time"):
        assert absent in CHARTS and absent not in text, absent
    time.sleep(3)  # the charts draw their axes after the data arrives
    text = driver.execute_script(DEEP_TEXT_JS)
    assert not HUGE_TICK.search(text), HUGE_TICK.findall(text)
    _screenshot(driver, "custom_scalars.png")


def test_findings_text_renders(tensorboard_url: str, driver: Any) -> None:
    text = _open(driver, tensorboard_url, "text", ["gradprobe/findings", "gradprobe report"])
    assert "exp1" in text and "blowup" in text
    assert "SGD" in text  # the report's summary line
    assert "GP4" in text  # the blown-up run's non-finite findings
    _screenshot(driver, "findings_text.png")


def test_findings_text_shows_no_raw_html(tensorboard_url: str, driver: Any) -> None:
    text = _open(driver, tensorboard_url, "text", ["gradprobe/findings", "gradprobe report"])
    assert "<details>" not in text and "<summary>" not in text
