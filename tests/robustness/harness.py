"""The robustness suite's measurements, shared by the tests in ``tests/robustness/`` and by
``benchmarks/robustness.py`` (which runs them at a larger scale and prints the figures).

* :func:`analyze_in_process` / :func:`analyze_subprocess` run ``gradprobe analyze`` and
  check its contract: exit 0/1 with a valid report, or exit 2 with one line on
  stderr; never a traceback, never a hang (a watchdog interrupts a call that runs too long).
* :func:`template_run` records a small real run (every file a run directory can hold) that
  the fuzz targets (:mod:`tests.robustness.fuzz`) cut, corrupt and mutate.
* :func:`kill_trial` SIGKILLs a watched run at a random moment and checks that the log holds
  every step closed more than ``KILL_SLACK`` seconds before the kill.
* :func:`leak_report` and :func:`long_run` check that a closed probe leaves nothing behind
  and that gradprobe's own memory stays bounded over a long run.
"""

from __future__ import annotations

import atexit
import gc
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
import traceback
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

REPO = Path(__file__).resolve().parents[2]
#: Longest a single in-process ``analyze`` of a small fuzzed input may take before it is
#: declared hung (typical: 0.1-0.3 s; generous for a loaded 2-core machine).
ANALYZE_TIMEOUT = 60.0
KINDS = ("gradprobe", "tensorboard", "hf-trainer-state", "lightning-csv", "mlflow")
FORMATS = ("json", "text", "markdown", "html")
TRACEBACK = "Traceback (most recent call last)"
#: what ``gradprobe analyze`` prints when an unexpected exception reached its catch-all
#: (exit 2 is only for input that is not a readable log)
INTERNAL_ERRORS = (": cannot analyze (", "cannot render the report (")


def subprocess_env() -> dict[str, str]:
    env = dict(os.environ)
    env["OMP_NUM_THREADS"] = "1"  # the CPU is shared
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    return env


# ------------------------------------------------------------------ analyze contract ----
class AnalyzeContractError(AssertionError):
    """``gradprobe analyze`` broke its contract on an input."""


@dataclass
class AnalyzeResult:
    exit_code: int
    stdout: str
    stderr: str
    seconds: float
    report: dict[str, Any] | None = None


_SCHEMA: Any = None


def _report_validator() -> Any:
    global _SCHEMA
    if _SCHEMA is None:
        import jsonschema

        with open(REPO / "gradprobe" / "schemas" / "report.schema.json", encoding="utf-8") as f:
            _SCHEMA = jsonschema.Draft202012Validator(json.load(f))
    return _SCHEMA


def _strict_json(text: str) -> Any:
    def bad_constant(name: str) -> Any:
        raise ValueError(f"non-standard JSON constant {name}")

    return json.loads(text, parse_constant=bad_constant)


def check_contract(path: str, fmt: str, code: int, stdout: str, stderr: str, seconds: float) -> AnalyzeResult:
    """Checks one ``gradprobe analyze`` outcome against that contract; returns it parsed."""
    where = f"gradprobe analyze {path!r} --format {fmt}"
    if TRACEBACK in stdout or TRACEBACK in stderr:
        raise AnalyzeContractError(f"{where}: printed a traceback:\n{stderr[-3000:]}")
    if code not in (0, 1, 2):
        raise AnalyzeContractError(f"{where}: exit status {code}\nstderr: {stderr[-2000:]}")
    res = AnalyzeResult(code, stdout, stderr, seconds)
    if code == 2:
        lines = stderr.splitlines()
        if len(lines) != 1 or not lines[0].startswith("gradprobe: ") or not stderr.endswith("\n"):
            raise AnalyzeContractError(f"{where}: exit 2 must print exactly one 'gradprobe: ...' line, got {stderr!r}")
        if any(m in stderr for m in INTERNAL_ERRORS):
            # the command's catch-all: an unexpected exception, not an unreadable log
            raise AnalyzeContractError(f"{where}: an internal error surfaced as exit 2: {stderr.strip()}")
        if stdout:
            raise AnalyzeContractError(f"{where}: exit 2 but printed a report: {stdout[:300]!r}")
        return res
    if not stdout.strip():
        raise AnalyzeContractError(f"{where}: exit {code} with no report")
    if fmt == "json":
        try:
            report = _strict_json(stdout)
        except ValueError as exc:
            raise AnalyzeContractError(f"{where}: the JSON report is not strict JSON ({exc})") from None
        errors = sorted(_report_validator().iter_errors(report), key=lambda e: list(e.path))
        if errors:
            raise AnalyzeContractError(f"{where}: report violates the schema: {errors[0].message} at {list(errors[0].path)}")
        if report["source"]["kind"] not in KINDS:
            raise AnalyzeContractError(f"{where}: unknown source kind {report['source']['kind']!r}")
        has_error = any(f["severity"] == "error" for f in report["findings"])
        if has_error != (code == 1):
            raise AnalyzeContractError(f"{where}: exit {code} does not match the findings (error present: {has_error})")
        res.report = report
    elif fmt == "html":
        if not stdout.lstrip().startswith("<!DOCTYPE html>") or not stdout.rstrip().endswith("</html>"):
            raise AnalyzeContractError(f"{where}: not a complete HTML page")
    return res


_COMMAND: Any = None


def _cli() -> Any:
    """The click command behind the typer app, built once (typer rebuilds it, evaluating the
    CLI's string annotations, on every ``typer.testing.CliRunner.invoke``)."""
    global _COMMAND
    if _COMMAND is None:
        import typer

        from gradprobe.cli.app import app

        _COMMAND = typer.main.get_command(app)
    return _COMMAND


def analyze_in_process(path: str | os.PathLike[str], fmt: str = "json", *, timeout: float = ANALYZE_TIMEOUT,
                       extra: tuple[str, ...] = ()) -> AnalyzeResult:
    """``gradprobe analyze PATH --format FMT`` through typer's ``CliRunner`` (no interpreter
    start: fast enough for property tests), under a watchdog: a call still running after
    ``timeout`` seconds is interrupted (a real SIGINT to the main thread, which also breaks
    a blocking ``open``/``read``) and reported as a hang."""
    from click.testing import CliRunner

    path = os.fspath(path)
    done = threading.Event()
    fired: list[bool] = []
    watchdog = None
    if threading.current_thread() is threading.main_thread():
        main_id = threading.main_thread().ident

        def watch() -> None:
            if not done.wait(timeout) and main_id is not None:
                fired.append(True)
                signal.pthread_kill(main_id, signal.SIGINT)

        watchdog = threading.Thread(target=watch, name="analyze-watchdog", daemon=True)
        watchdog.start()
    t0 = time.perf_counter()
    try:
        result = CliRunner().invoke(_cli(), ["analyze", path, "--format", fmt, *extra])
    except KeyboardInterrupt:
        if not fired:
            raise
        result = None
    finally:
        done.set()
        if watchdog is not None:
            watchdog.join()
    seconds = time.perf_counter() - t0
    if fired:
        raise AnalyzeContractError(f"gradprobe analyze {path!r} --format {fmt}: still running after {timeout:.0f} s (hang)")
    assert result is not None
    exc = result.exception
    if exc is not None and not isinstance(exc, SystemExit):
        tb = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
        raise AnalyzeContractError(f"gradprobe analyze {path!r} --format {fmt}: uncaught exception\n{tb}")
    return check_contract(path, fmt, result.exit_code, result.stdout, result.stderr, seconds)


def analyze_subprocess(path: str | os.PathLike[str], fmt: str = "json", *, timeout: float = 120.0,
                       extra: tuple[str, ...] = ()) -> AnalyzeResult:
    """The same through a real ``python -m gradprobe analyze`` process."""
    path = os.fspath(path)
    t0 = time.perf_counter()
    try:
        proc = subprocess.run([sys.executable, "-m", "gradprobe", "analyze", path, "--format", fmt, *extra],
                              capture_output=True, text=True, timeout=timeout, env=subprocess_env(), stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        raise AnalyzeContractError(f"gradprobe analyze {path!r}: still running after {timeout:.0f} s (hang)") from None
    return check_contract(path, fmt, proc.returncode, proc.stdout, proc.stderr, time.perf_counter() - t0)


# -------------------------------------------------------------------- template runs ----
RUN_FILES = ("gradprobe.json", "steps.arrow", "layers-0.arrow", "events.jsonl", "samples.arrow", "scalars.arrow")


def record_run(logdir: str, *, steps: int = 24, names: dict[str, str] | None = None, message: str = "loss guard tripped",
               nan_at: int | None = None, flush_steps: int = 6, tensorboard: bool = True) -> None:
    """Records a small real run with every kind of file a run directory holds.

    An LSTM and an MLP head (deep probes: gates, gradient through time, activations), Adam,
    clipping, a bfloat16 autocast region (``autocast`` events), ``probe.log`` scalars, and an
    exception recorded at the end (``exception`` event carrying ``message``). ``names`` renames
    the submodules (any string without a dot, e.g. unicode or markup), ``nan_at`` puts a NaN in
    that step's input. ``flush_steps`` small: several record batches per stream.
    """
    import torch
    import torch.nn as nn

    import gradprobe

    names = names or {}
    rnn_name, head_name, act_name = names.get("rnn", "lstm"), names.get("head", "head"), names.get("act", "act")

    class Model(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.add_module(rnn_name, nn.LSTM(3, 8, batch_first=True))
            self.add_module(head_name, nn.Linear(8, 8))
            self.add_module(act_name, nn.Tanh())
            self.add_module("out", nn.Linear(8, 1))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h, _ = getattr(self, rnn_name)(x)
            with torch.autocast("cpu", dtype=torch.bfloat16):
                z = getattr(self, head_name)(h[:, -1])
            return self.out(getattr(self, act_name)(z.float()))

    g = torch.Generator().manual_seed(7)
    with torch.random.fork_rng():
        torch.manual_seed(7)
        model = Model()
        opt = torch.optim.Adam(model.parameters(), lr=1e-2)
        # hand-overs every flush_steps steps only (no timer): record batches of a known size
        with gradprobe.watch(model, opt, logdir=logdir, sample_every=4, flush_steps=flush_steps, flush_seconds=3600.0,
                             tensorboard=tensorboard) as probe:
            for step in range(steps):
                x, y = torch.randn(8, 6, 3, generator=g), torch.randn(8, 1, generator=g)
                if nan_at is not None and step == nan_at:
                    x[0, 0, 0] = float("nan")
                loss = nn.functional.mse_loss(model(x), y)
                opt.zero_grad()
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                opt.step()
                probe.log(**{names.get("scalar", "val_loss"): float(loss.detach()) * 1.1})
            probe.record_exception(RuntimeError(message), where="script")


_TEMPLATES: dict[str, Any] = {}


def _tmp_root() -> str:
    root = _TEMPLATES.get("__root__")
    if root is None:
        root = _TEMPLATES["__root__"] = tempfile.mkdtemp(prefix="gradprobe-robustness-")
        atexit.register(shutil.rmtree, root, True)
    return root


def template_run() -> str:
    """A small real run directory, recorded once per process (do not modify it: copy it)."""
    path = _TEMPLATES.get("run")
    if path is None:
        path = os.path.join(_tmp_root(), "template")
        record_run(path)
        _TEMPLATES["run"] = path
    return path


def template_files() -> dict[str, bytes]:
    """File name -> bytes of every file of :func:`template_run` (``tfevents`` for the
    TensorBoard event file)."""
    cached = _TEMPLATES.get("files")
    if cached is None:
        d = template_run()
        cached = {}
        for name in sorted(os.listdir(d)):
            with open(os.path.join(d, name), "rb") as f:
                cached["tfevents" if "tfevents" in name else name] = f.read()
        _TEMPLATES["files"] = cached
    return dict(cached)


def copy_template(dest: str) -> str:
    """A fresh copy of :func:`template_run` at ``dest``, written from the bytes read once
    (so nothing a test does to a copy, or through a link, reaches the next copy)."""
    os.makedirs(dest)
    for name, data in template_files().items():
        with open(os.path.join(dest, tfevents_name() if name == "tfevents" else name), "wb") as f:
            f.write(data)
    return dest


def tfevents_name() -> str:
    """The file name of the template's TensorBoard event file."""
    name = _TEMPLATES.get("tfevents")
    if name is None:
        name = _TEMPLATES["tfevents"] = next(n for n in os.listdir(template_run()) if "tfevents" in n)
    return name


# ---------------------------------------------------------------------- kill trials ----
#: A step that closed more than this long before the SIGKILL must be on disk: the probe hands
#: records to its writer at least every 0.5 s (flush_seconds) and the writer writes them at
#: once; the rest is scheduling slack on a loaded machine (at most the last second is lost).
KILL_SLACK = 1.0

KILL_SCRIPT = textwrap.dedent(
    """
    import os, sys, time
    import torch, torch.nn as nn
    mode, logdir, hang_after = sys.argv[1], sys.argv[2], int(sys.argv[3])
    torch.manual_seed(0)
    torch.set_num_threads(1)
    model = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    probe = None
    if mode == "watch":
        import gradprobe
        probe = gradprobe.watch(model, opt, logdir=logdir, sample_every=5)
    print("ready", time.time(), flush=True)
    for i in range(1_000_000):
        x, y = torch.randn(16, 6), torch.randn(16, 1)
        loss = nn.functional.mse_loss(model(x), y)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        # the step closed at opt.step() (the probe's post-step hook): report it
        print(i, time.time(), flush=True)
        if i + 1 == hang_after:
            print("hang", time.time(), flush=True)
            time.sleep(3600)  # a stuck data loader: only the flusher thread hands records over
        time.sleep(0.004)
    """
)


@dataclass
class KillTrial:
    seed: int
    mode: str  # "watch" (gradprobe.watch in the script) or "run" (gradprobe run)
    hang: bool
    delay: float  # seconds after the script's first step at which it was killed
    closed_steps: int = 0  # steps the script reported closed before the kill
    required_steps: int = 0  # steps closed more than KILL_SLACK s before the kill
    logged_steps: int = 0
    lost_seconds: float = 0.0  # kill time minus the close time of the oldest step not on disk
    exit_code: int | None = None
    problems: list[str] = field(default_factory=list)

    @property
    def survived(self) -> bool:
        return not self.problems


def kill_trial(seed: int, workdir: str, *, mode: str | None = None, hang: bool | None = None,
               hang_after: int | None = None, delay: float | None = None, after_hang: float | None = None) -> KillTrial:
    """Starts a watched training script, SIGKILLs it at a random moment (seeded), and checks
    the log: ``gradprobe analyze`` exits 0/1 (a readable log), its steps are contiguous from
    0, and every step closed more than :data:`KILL_SLACK` s before the kill is there.

    Half the trials (``hang``) stop stepping after a random number of steps, as a stuck data
    loader would: then only the probe's flusher thread can hand the last records over.
    """
    rng = random.Random(seed)
    mode = mode or rng.choice(["watch", "run"])
    hang = rng.random() < 0.5 if hang is None else hang
    delay = rng.uniform(0.05, 3.0) if delay is None else delay
    hang_after = (rng.randint(1, 150) if hang_after is None else hang_after) if hang else 0
    trial = KillTrial(seed=seed, mode=mode, hang=hang, delay=delay)
    os.makedirs(workdir, exist_ok=True)
    script = os.path.join(workdir, "kill_me.py")
    with open(script, "w", encoding="utf-8") as f:
        f.write(KILL_SCRIPT)
    logdir = os.path.join(workdir, "log")
    if mode == "watch":
        cmd = [sys.executable, script, "watch", logdir, str(hang_after)]
    else:
        cmd = [sys.executable, "-m", "gradprobe", "run", "--logdir", logdir, "--sample-every", "5", script, "plain", "-", str(hang_after)]
    proc = subprocess.Popen(cmd, cwd=workdir, env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    closed: list[tuple[int, float]] = []
    assert proc.stdout is not None
    lines: list[str] = []

    def reader() -> None:
        for line in proc.stdout:  # type: ignore[union-attr]
            lines.append(line)

    t = threading.Thread(target=reader, daemon=True)
    t.start()
    deadline = time.time() + 120
    first_step_at = hung_at = None
    while time.time() < deadline and proc.poll() is None:
        if first_step_at is None or (after_hang is not None and hung_at is None):
            for line in list(lines):
                parts = line.split()
                if first_step_at is None and len(parts) == 2 and parts[0].isdigit():
                    first_step_at = float(parts[1])
                if parts and parts[0] == "hang":
                    hung_at = float(parts[1])
        if after_hang is not None:  # kill a fixed time after the script got stuck
            if hung_at is not None and time.time() >= hung_at + after_hang:
                break
        elif first_step_at is not None and time.time() >= first_step_at + delay:
            break
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    kill_time = time.time()
    trial.exit_code = proc.wait(timeout=60)
    t.join(timeout=10)
    for line in lines:
        parts = line.split()
        if len(parts) == 2 and parts[0].isdigit():
            closed.append((int(parts[0]), float(parts[1])))
    if first_step_at is None:
        trial.problems.append("the script never reached its first step")
        return trial
    trial.closed_steps = len(closed)
    must = [i for i, ts in closed if ts < kill_time - KILL_SLACK]
    trial.required_steps = max(must) + 1 if must else 0
    try:
        res = analyze_subprocess(logdir) if seed % 4 == 0 else analyze_in_process(logdir)
    except AnalyzeContractError as exc:
        trial.problems.append(str(exc).splitlines()[0])
        return trial
    if res.exit_code == 2:  # the probe wrote gradprobe.json before the first step: a log
        trial.problems.append(f"analyze exit 2 on a killed run ({trial.closed_steps} steps closed): {res.stderr.strip()}")
        return trial
    from gradprobe.runlog import RunLog

    log = RunLog.load(logdir)
    steps = log.steps["step"].tolist()
    trial.logged_steps = len(steps)
    if steps != list(range(len(steps))):
        trial.problems.append(f"steps not contiguous from 0: {steps[:5]}...{steps[-5:]}")
    if len(steps) < trial.required_steps:
        trial.problems.append(f"{len(steps)} steps on disk, but {trial.required_steps} closed more than {KILL_SLACK} s before the kill")
    if len(steps) < len(closed):
        trial.lost_seconds = max(0.0, kill_time - closed[len(steps)][1])
    if len(steps) > trial.closed_steps + 1:
        trial.problems.append(f"{len(steps)} steps on disk, more than the {trial.closed_steps} the script closed")
    return trial


# ---------------------------------------------------------------------------- leaks ----
def _module_hook_counts(model: Any) -> dict[str, int]:
    out: dict[str, int] = {}
    for name, m in model.named_modules():
        for attr in ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks",
                     "_state_dict_hooks", "_load_state_dict_pre_hooks", "_forward_hooks_with_kwargs",
                     "_forward_pre_hooks_with_kwargs", "_forward_hooks_always_called"):
            n = len(getattr(m, attr, {}) or {})
            if n:
                out[f"{name or '<root>'}.{attr}"] = n
    for name, p in model.named_parameters():
        hooks = getattr(p, "_post_accumulate_grad_hooks", None)
        if hooks:
            out[f"{name}._post_accumulate_grad_hooks"] = len(hooks)
        if getattr(p, "_backward_hooks", None):
            out[f"{name}._backward_hooks"] = len(p._backward_hooks)
    return out


def _optimizer_hook_counts(opt: Any) -> dict[str, int]:
    out = {}
    for attr in ("_optimizer_step_pre_hooks", "_optimizer_step_post_hooks", "_optimizer_state_dict_pre_hooks",
                 "_optimizer_state_dict_post_hooks", "_optimizer_load_state_dict_pre_hooks", "_optimizer_load_state_dict_post_hooks"):
        n = len(getattr(opt, attr, {}) or {})
        if n:
            out[attr] = n
    return out


def global_state() -> dict[str, Any]:
    """Everything global gradprobe could leave behind: global module/optimizer hooks, the
    functions it patches (by identity), saved-tensors hooks, its threads, open files."""
    import torch
    import torch.nn.functional as F
    from torch.nn.modules import module as m
    from torch.optim import optimizer as o

    from gradprobe.probe import patches

    GS = torch.amp.GradScaler
    funcs = {
        "torch.autograd.backward": torch.autograd.backward,
        "torch.Tensor.backward": torch.Tensor.backward,
        "clip_grad._clip_grads_with_norm_": getattr(torch.nn.utils.clip_grad, "_clip_grads_with_norm_", None),
        "clip_grad.clip_grad_norm_": torch.nn.utils.clip_grad.clip_grad_norm_,
        "nn.utils.clip_grad_norm_": torch.nn.utils.clip_grad_norm_,
        "Optimizer.__init__": torch.optim.Optimizer.__init__,
        **{f"GradScaler.{k}": GS.__dict__.get(k) for k in ("__init__", "scale", "unscale_", "step", "update")},
        **{f"F.{k}": getattr(F, k, None) for k in patches.LOSS_FUNCTIONS},
    }
    try:
        saved = torch._C._autograd._top_saved_tensors_default_hooks(False)
    except Exception:  # noqa: BLE001 - private API moved
        saved = None
    try:
        fds = len(os.listdir("/proc/self/fd"))
    except OSError:
        fds = -1
    return {
        "global_hooks": (len(m._global_forward_pre_hooks), len(m._global_forward_hooks), len(m._global_backward_hooks),
                         len(m._global_backward_pre_hooks), len(o._global_optimizer_pre_hooks), len(o._global_optimizer_post_hooks)),
        "functions": {k: id(v) for k, v in funcs.items()},
        "installed_patches": len(patches.installed_patches()),
        "active_probes": len(patches.active_probes()),
        "saved_tensors_hooks": saved,
        "threads": sorted(t.name for t in threading.enumerate() if t.name.startswith("gradprobe")),
        "fds": fds,
        "signals": {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)},
        "signal.signal": signal.signal,
    }


def wait_threads_gone(timeout: float = 10.0) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline and any(t.name.startswith("gradprobe") and t.is_alive() for t in threading.enumerate()):
        time.sleep(0.01)


def diff_state(before: dict[str, Any], after: dict[str, Any]) -> list[str]:
    problems = []
    for k in before:
        if k == "fds":
            if after[k] > before[k]:
                problems.append(f"file descriptors: {before[k]} before, {after[k]} after")
            continue
        if k == "functions":
            changed = [n for n in before[k] if before[k][n] != after[k][n]]
            if changed:
                problems.append(f"functions not restored: {changed}")
            continue
        if before[k] != after[k]:
            problems.append(f"{k}: {before[k]!r} before, {after[k]!r} after")
    return problems


@dataclass
class LeakCheck:
    name: str
    problems: list[str]

    @property
    def passed(self) -> bool:
        return not self.problems


def _collectable(refs: dict[str, weakref.ref]) -> list[str]:
    for _ in range(3):
        gc.collect()
    return [f"{name} still alive after close() and del (referrers: {[type(r).__name__ for r in gc.get_referrers(ref())][:6]})"
            for name, ref in refs.items() if ref() is not None]


def leak_report(workdir: str) -> list[LeakCheck]:
    """Runs every leak scenario; each returns the problems it found (none: passed)."""
    checks = []
    for name, fn in LEAK_SCENARIOS.items():
        d = os.path.join(workdir, name)
        try:
            problems = fn(d)
        except Exception as exc:  # noqa: BLE001 - a crash is a failed check, with its reason
            problems = [f"crashed: {type(exc).__name__}: {exc}"]
        checks.append(LeakCheck(name, problems))
    return checks


def _train(model: Any, opt: Any, steps: int, *, scaler: Any = None, clip: bool = True, seq: bool = False) -> None:
    import torch
    import torch.nn as nn

    for _ in range(steps):
        x = torch.randn(4, 5, 3) if seq else torch.randn(8, 3)
        out = model(x)
        out = out[0] if isinstance(out, tuple) else out
        loss = nn.functional.mse_loss(out.float(), torch.zeros_like(out, dtype=torch.float32))
        opt.zero_grad()
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.unscale_(opt)
        else:
            loss.backward()
        if clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        if scaler is not None:
            scaler.step(opt)
            scaler.update()
        else:
            opt.step()


def _leak_watch(d: str) -> list[str]:
    """gradprobe.watch on an LSTM model with GradScaler, deep probes every step."""
    import torch
    import torch.nn as nn

    import gradprobe

    before = global_state()
    model = nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 2))
    rnn = nn.GRU(3, 4, batch_first=True)
    opt = torch.optim.AdamW(list(model.parameters()) + list(rnn.parameters()), lr=1e-3)
    scaler = torch.amp.GradScaler("cpu")
    hooks_before = (_module_hook_counts(model), _module_hook_counts(rnn), _optimizer_hook_counts(opt))
    probe = gradprobe.watch([model, rnn], opt, scaler=scaler, logdir=d, profile="full")
    _train(model, opt, 6, scaler=scaler)
    _train(rnn, opt, 3, seq=True)
    probe.log(val_loss=1.0)
    probe.close()
    wait_threads_gone()
    problems = diff_state(before, global_state())
    hooks_after = (_module_hook_counts(model), _module_hook_counts(rnn), _optimizer_hook_counts(opt))
    if hooks_after != hooks_before:
        problems.append(f"module/optimizer hooks left: {hooks_after}")
    refs = {"model": weakref.ref(model), "rnn": weakref.ref(rnn), "optimizer": weakref.ref(opt), "scaler": weakref.ref(scaler)}
    del model, rnn, opt, scaler
    problems += _collectable(refs)  # the closed probe (still referenced here) must not pin them
    pref = weakref.ref(probe)
    del probe
    problems += _collectable({"probe": pref})
    return problems


def _leak_auto(d: str) -> list[str]:
    """gradprobe run's in-process API (auto mode: global hooks, optimizers found as created)."""
    from gradprobe.runner import run_script

    script = os.path.join(d, "train.py")
    os.makedirs(d, exist_ok=True)
    with open(script, "w", encoding="utf-8") as f:
        f.write(textwrap.dedent("""
            import signal, sys, torch, torch.nn as nn
            def on_term(*args): pass
            signal.signal(signal.SIGTERM, on_term)   # the script's own handler
            sys._gp_test_handler = on_term
            model = nn.Sequential(nn.Linear(3, 8), nn.ReLU(), nn.Linear(8, 1))
            opt = torch.optim.SGD(model.parameters(), lr=0.01)
            for _ in range(5):
                loss = nn.functional.mse_loss(model(torch.randn(8, 3)), torch.zeros(8, 1))
                opt.zero_grad(); loss.backward(); opt.step()
            import __main__; __main__.MODEL = model
        """))
    before = global_state()
    argv, path0 = list(sys.argv), list(sys.path)
    outcome, _report = run_script(script, [], logdir=os.path.join(d, "log"))
    wait_threads_gone()
    after = global_state()
    # the script's own SIGTERM handler stays installed, as it would for the rest of a
    # `python script.py` process; gradprobe's own handler must not
    handler = getattr(sys, "_gp_test_handler", None)
    problems = []
    if after["signals"][signal.SIGTERM] is not handler:
        problems.append(f"SIGTERM handler after the run: {after['signals'][signal.SIGTERM]!r}, not the script's")
    signal.signal(signal.SIGTERM, before["signals"][signal.SIGTERM])
    after["signals"] = global_state()["signals"]
    problems += diff_state(before, after)
    if outcome.status != 0:
        problems.append(f"the script ended with status {outcome.status} ({outcome.how})")
    if sys.argv != argv or sys.path != path0:
        problems.append("sys.argv or sys.path not restored")
    del _report
    return problems


def _leak_exception(d: str) -> list[str]:
    """A loop that raises inside the with block: hooks and patches still go."""
    import torch
    import torch.nn as nn

    import gradprobe

    before = global_state()
    model = nn.Linear(3, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    try:
        with gradprobe.watch(model, opt, logdir=d):
            _train(model, opt, 2)
            raise ValueError("user error")
    except ValueError:
        pass
    wait_threads_gone()
    problems = diff_state(before, global_state())
    if _module_hook_counts(model) or _optimizer_hook_counts(opt):
        problems.append("hooks left after an exception in the with block")
    ref = weakref.ref(model)
    del model, opt
    return problems + _collectable({"model": ref})


def _leak_nested(d: str) -> list[str]:
    """Two probes at once, closed in either order: patches stay until the last one closes."""
    import torch
    import torch.nn as nn

    import gradprobe
    from gradprobe.probe import patches

    before = global_state()
    a, b = nn.Linear(3, 1), nn.Linear(3, 1)
    oa, ob = torch.optim.SGD(a.parameters(), lr=0.1), torch.optim.SGD(b.parameters(), lr=0.1)
    pa = gradprobe.watch(a, oa, logdir=os.path.join(d, "a"))
    pb = gradprobe.watch(b, ob, logdir=os.path.join(d, "b"))
    _train(a, oa, 2)
    _train(b, ob, 2)
    pa.close()
    problems = []
    if not patches.installed_patches():
        problems.append("closing the first of two probes removed the patches the second needs")
    _train(b, ob, 2)
    pb.close()
    wait_threads_gone()
    return problems + diff_state(before, global_state())


def _leak_compiled(d: str) -> list[str]:
    """A torch.compile'd model (eager backend): no hook survives on the wrapper or the module."""
    import torch
    import torch.nn as nn

    import gradprobe

    before = global_state()
    model = nn.Sequential(nn.Linear(3, 8), nn.ReLU(), nn.Linear(8, 1))
    compiled = torch.compile(model, backend="eager")
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with gradprobe.watch(compiled, opt, logdir=d):
        _train(compiled, opt, 3)
    wait_threads_gone()
    problems = diff_state(before, global_state())
    if _module_hook_counts(model) or _module_hook_counts(compiled) or _optimizer_hook_counts(opt):
        problems.append("hooks left on a compiled model")
    torch._dynamo.reset()
    return problems


LEAK_SCENARIOS: dict[str, Callable[[str], list[str]]] = {
    "watch": _leak_watch,
    "gradprobe-run": _leak_auto,
    "exception-in-loop": _leak_exception,
    "two-probes": _leak_nested,
    "compiled-model": _leak_compiled,
}


# ------------------------------------------------------------------------- long run ----
LONG_RUN_SCRIPT = textwrap.dedent(
    """
    import json, os, sys, time, tracemalloc
    import torch, torch.nn as nn
    steps, logdir, trace = int(sys.argv[1]), sys.argv[2], sys.argv[3] == "1"
    torch.manual_seed(0)
    torch.set_num_threads(1)
    import gradprobe
    from gradprobe.probe import core

    def rss():
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def gradprobe_bytes():
        snap = tracemalloc.take_snapshot().filter_traces([tracemalloc.Filter(True, os.path.dirname(gradprobe.__file__) + "/*")])
        return sum(s.size for s in snap.statistics("filename"))

    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    x, y = torch.randn(16, 4), torch.randn(16, 1)
    checkpoints = sorted({min(steps, s) for s in (steps // 10, steps // 4, steps // 2, 3 * steps // 4, steps)})
    out = {"steps": steps, "points": []}
    if trace:
        tracemalloc.start(1)
    t0 = time.perf_counter()
    max_pending = 0
    with gradprobe.watch(model, opt, logdir=logdir) as probe:
        for i in range(1, steps + 1):
            loss = nn.functional.mse_loss(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            if i % 97 == 0:
                max_pending = max(max_pending, len(probe._records))
            if i in checkpoints:
                gc_pending = len(probe._records)
                if trace:  # in-flight records (a writer lagging under load) are not retained memory
                    probe.flush()
                out["points"].append({"step": i, "rss": rss(), "gradprobe_bytes": gradprobe_bytes() if trace else None,
                                      "seconds": time.perf_counter() - t0, "pending_records": gc_pending,
                                      "writer_queue": probe.writer._q.qsize(), "sentinels": len(probe._sentinels)})
    out["max_pending_records"] = max_pending
    out["flush_steps"] = probe.config.flush_steps
    print(json.dumps(out))
    """
)


def long_run(steps: int, workdir: str, *, trace: bool = True, timeout: float = 3000.0) -> dict[str, Any]:
    """Trains a tiny model for ``steps`` steps under ``gradprobe.watch`` in a subprocess and
    returns RSS and gradprobe's own traced allocations (``tracemalloc`` filtered to
    ``gradprobe/``) at checkpoints, plus the most records the probe held between hand-overs.

    ``growth``: RSS and gradprobe-allocation growth from the first checkpoint (10% of the
    run, after warm-up) to the end.
    """
    os.makedirs(workdir, exist_ok=True)
    script = os.path.join(workdir, "long_run.py")
    with open(script, "w", encoding="utf-8") as f:
        f.write(LONG_RUN_SCRIPT)
    proc = subprocess.run([sys.executable, script, str(steps), os.path.join(workdir, "log"), "1" if trace else "0"],
                          capture_output=True, text=True, timeout=timeout, env=subprocess_env())
    if proc.returncode != 0:
        raise RuntimeError(f"long run failed ({proc.returncode}): {proc.stderr[-2000:]}")
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    first, last = out["points"][0], out["points"][-1]
    out["rss_growth"] = last["rss"] - first["rss"]
    out["gradprobe_growth"] = (last["gradprobe_bytes"] - first["gradprobe_bytes"]) if trace else None
    out["log_bytes"] = sum(os.path.getsize(os.path.join(workdir, "log", n)) for n in os.listdir(os.path.join(workdir, "log")))
    return out

