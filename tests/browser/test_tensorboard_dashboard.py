"""The gradprobe TensorBoard dashboard, checked in a real headless Chromium.

Records a tiny run with ``gradprobe.watch``, writes the findings with ``probe.report()``,
starts ``tensorboard --logdir DIR`` on a free local port, and checks with Selenium driving
Debian's ``chromium``/``chromium-driver`` (no download; ``.ci/run`` installs them) that the
Custom Scalars page shows the gradprobe category and charts with data, and the Text page
shows the findings. Screenshots go to ``artifacts/browser/`` (git-ignored).
"""

from __future__ import annotations

import json
import os
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


def _record_run(logdir: str) -> Any:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.ReLU(), torch.nn.Linear(32, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    g = torch.Generator().manual_seed(0)
    w = torch.randn(8, 1, generator=g)
    with gradprobe.watch(model, opt, logdir=logdir) as probe:
        for _ in range(40):
            x = torch.randn(32, 8, generator=g)
            opt.zero_grad()
            loss = torch.nn.functional.mse_loss(model(x), x @ w)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
        report = probe.report()  # writes the findings as TensorBoard text
    return report


@pytest.fixture(scope="module")
def tensorboard_url(tmp_path_factory, browser_ready):
    root = str(tmp_path_factory.mktemp("tb"))
    _record_run(os.path.join(root, "exp1"))
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
              lambda: _get_json(url + "/data/plugin/text/tags").get("exp1"))
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


def test_custom_scalars_dashboard_renders(tensorboard_url: str, driver: Any) -> None:
    from gradprobe.runlog.tensorboard import LAYOUT

    charts = list(LAYOUT["gradprobe"])
    # charts that have data list their series: the gradient norm chart has all three
    series = [f"{tag} (exp1)" for tag in ("gradprobe/grad_norm/preclip", "gradprobe/grad_norm/after_clip",
                                          "gradprobe/grad_norm/max_norm", "gradprobe/loss/train", "gradprobe/lr")]
    text = _open(driver, tensorboard_url, "custom_scalars", ["gradprobe", *charts, *series])
    assert "Matches (3)" in text
    _screenshot(driver, "custom_scalars.png")


def test_findings_text_renders(tensorboard_url: str, driver: Any) -> None:
    text = _open(driver, tensorboard_url, "text", ["gradprobe/findings", "gradprobe report"])
    assert "exp1" in text
    assert "SGD" in text  # the report's summary line
    _screenshot(driver, "findings_text.png")


def test_findings_text_shows_no_raw_html(tensorboard_url: str, driver: Any) -> None:
    text = _open(driver, tensorboard_url, "text", ["gradprobe/findings", "gradprobe report"])
    assert "<details>" not in text and "<summary>" not in text
