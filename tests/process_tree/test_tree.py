"""``gradprobe run`` watches every Python training process the script starts, and the parent
prints one report for the whole tree.

Real process trees (gloo on CPU), each through a real ``python -m gradprobe run``:
``torch.multiprocessing.spawn`` and ``multiprocessing`` with the spawn, fork and forkserver
start methods (NaN on rank 1: attributed to rank 1), a healthy ``mp.spawn`` job bit-identical
with and without gradprobe, Lightning's ``ddp`` strategy, a child started with
``subprocess.run([sys.executable, ...])``, a bash child, and a SIGKILLed tree. The torchrun
forms are in ``tests/distributed/test_ddp.py``. The multi-process jobs are in the slow tier.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

import gradprobe
from tests.robustness import harness as H

SCRIPTS = Path(__file__).with_name("scripts")
MP_DDP = SCRIPTS / "mp_ddp.py"
NAN_RULES = ("nonfinite-inputs", "nonfinite-loss", "nonfinite-gradients", "nonfinite-parameters")
HEALTHY = "nothing in this run looks unhealthy"
NO_STEP = "no training step was recorded"
HOOK_PREFIX = ".gradprobe-hook-"


def gp_run(cwd: Path, *args: str, env: dict[str, str] | None = None, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    """``python -m gradprobe run ARGS`` in ``cwd``."""
    return subprocess.run([sys.executable, "-m", "gradprobe", "run", *args], cwd=cwd, env=env or H.subprocess_env(),
                          capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)


def py(cwd: Path, *args: str, env: dict[str, str] | None = None, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, *args], cwd=cwd, env=env or H.subprocess_env(),
                          capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)


def write(path: Path, source: str) -> Path:
    path.write_text(textwrap.dedent(source).lstrip())
    return path


def tree_report(proc: subprocess.CompletedProcess[str], path: Path) -> dict:
    assert path.exists(), proc.stderr[-3000:]
    return json.loads(path.read_text())


def assert_ranks(logdir: Path, steps: int) -> dict[int, gradprobe.RunLog]:
    """rank0/ and rank1/ and nothing else (no hook folder, no run of a process that never
    trained): each a complete run of its own rank."""
    assert sorted(os.listdir(logdir)) == ["rank0", "rank1"], os.listdir(logdir)
    logs = {r: gradprobe.RunLog.load(str(logdir / f"rank{r}")) for r in (0, 1)}
    for r, log in logs.items():
        assert log.meta["rank"] == r and log.meta["world_size"] == 2, (r, log.meta["rank"], log.meta["world_size"])
        assert log.n_steps == steps and not log.source["skipped"]
    assert logs[0].meta["pid"] != logs[1].meta["pid"]
    return logs


def assert_nan_started_on_rank1(report: dict) -> None:
    assert report["source"]["ranks"] == [0, 1]
    by_rule = {f["rule"]: f for f in report["findings"]}
    gp801 = by_rule["rank-divergence"]
    assert gp801["evidence"]["rank"] == 1 and gp801["first_step"] == 3, gp801
    nan = [by_rule[r] for r in NAN_RULES if r in by_rule]
    assert len(nan) >= 3, sorted(by_rule)
    for f in nan:
        assert f["evidence"]["rank"] == 1 and f["message"].startswith("[rank 1]"), (f["rule"], f["evidence"])


# ---------------------------------------------------------- multiprocessing jobs (slow) ----
@pytest.mark.slow
@pytest.mark.parametrize("launch", ["mp.spawn", "spawn", "fork", "forkserver"])
def test_nan_on_rank1_is_attributed_to_rank1(tmp_path, launch):
    """The parent never trains; its two children are the ranks. Each is watched, writes its
    own rank directory, and the parent's one report names rank 1."""
    proc = gp_run(tmp_path, "--logdir", "log", "--format", "json", "--output", "report.json",
                  str(MP_DDP), "out", "--launch", launch, "--nan-rank", "1")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout == "job done\n"
    assert proc.stderr.count("gradprobe: the script finished; 16 steps recorded by 2 ranks in log") == 1
    assert_ranks(tmp_path / "log", 8)
    assert_nan_started_on_rank1(tree_report(proc, tmp_path / "report.json"))


@pytest.mark.slow
def test_healthy_spawn_job_is_clean_and_bit_identical(tmp_path):
    plain = py(tmp_path, str(MP_DDP), "plain")
    assert plain.returncode == 0, plain.stderr[-3000:]
    proc = gp_run(tmp_path, "--logdir", "log", str(MP_DDP), "watched")
    assert proc.returncode == 0, proc.stderr[-3000:]
    for r in (0, 1):
        a = json.loads((tmp_path / "plain" / f"rank{r}.json").read_text())
        b = json.loads((tmp_path / "watched" / f"rank{r}.json").read_text())
        assert a["checksum"] == b["checksum"] and a["losses"] == b["losses"], "gradprobe run changed the training"
    logs = assert_ranks(tmp_path / "log", 8)
    for r in (0, 1):
        want = json.loads((tmp_path / "watched" / f"rank{r}.json").read_text())["losses"]
        assert logs[r].steps["loss"].tolist() == pytest.approx(want, rel=1e-6)
    assert proc.stderr.count("gradprobe report:") == 1
    res = H.analyze_subprocess(tmp_path / "log", "json", extra=("--fail-on", "warning"))
    assert res.exit_code == 0, [(f["code"], f["message"]) for f in res.report["findings"]]
    assert HEALTHY in proc.stderr


@pytest.mark.slow
def test_lightning_ddp_records_both_processes(tmp_path):
    """Lightning starts the second process itself (``LOCAL_RANK=1``, no ``RANK``); the
    ``gradprobe run`` process is rank 0."""
    proc = gp_run(tmp_path, "--logdir", "log", "--format", "json", "--output", "report.json",
                  str(SCRIPTS / "lightning_ddp.py"), "--nan-rank", "1")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert sorted(p.name for p in tmp_path.glob("fit-done-rank*")) == ["fit-done-rank0", "fit-done-rank1"]
    logs = assert_ranks(tmp_path / "log", 6)
    assert logs[0].meta["tree"]["root"] and not logs[1].meta["tree"]["root"]
    assert logs[0].meta["pid"] == json.loads((tmp_path / "log" / "rank0" / "gradprobe.json").read_text())["pid"]
    assert_nan_started_on_rank1(tree_report(proc, tmp_path / "report.json"))


# ------------------------------------------------------------------ a child script -----
CHILD_TRAIN = """
    import sys
    import torch, torch.nn as nn

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for step in range(6):
        x, y = torch.randn(16, 4), torch.randn(16, 1)
        if step == 2:
            x[0, 0] = float("nan")
        loss = nn.functional.mse_loss(model(x), y)
        opt.zero_grad(); loss.backward(); opt.step()
    print("child trained", flush=True)
"""

PARENT_TRAINS_TOO = """
    import subprocess, sys
    import torch, torch.nn as nn

    torch.manual_seed(0)
    model = nn.Linear(4, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    for _ in range(4):
        loss = model(torch.randn(8, 4)).pow(2).mean()
        opt.zero_grad(); loss.backward(); opt.step()
    status = subprocess.run([sys.executable, "child_train.py"]).returncode
    print("parent done", status, flush=True)
"""


def test_a_child_script_is_a_separate_run_in_one_report(tmp_path):
    """``subprocess.run([sys.executable, "child_train.py"])``: the child is no rank; it writes
    ``pid<PID>/`` inside the parent's run directory and the parent's report holds both runs,
    each finding saying whose it is."""
    write(tmp_path / "child_train.py", CHILD_TRAIN)
    write(tmp_path / "parent.py", PARENT_TRAINS_TOO)
    proc = gp_run(tmp_path, "--logdir", "log", "--format", "json", "--output", "report.json", "parent.py")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout == "child trained\nparent done 0\n"
    (child_dir,) = [p for p in (tmp_path / "log").iterdir() if p.name.startswith("pid")]
    assert sorted(p.name for p in (tmp_path / "log").iterdir() if p.is_dir()) == [child_dir.name]  # no hook left
    parent, child = gradprobe.RunLog.load(str(tmp_path / "log")), gradprobe.RunLog.load(str(child_dir))
    assert parent.n_steps == 4 and child.n_steps == 6
    assert child.meta["pid"] == int(child_dir.name[3:]) and child.meta["run"]["ppid"] == parent.meta["pid"]
    report = tree_report(proc, tmp_path / "report.json")
    assert report["source"]["steps"] == 10
    assert sorted(r["name"] for r in report["source"]["runs"]) == [".", child_dir.name]
    nan = [f for f in report["findings"] if f["rule"] in NAN_RULES]
    assert nan and all(f["evidence"]["run"] == f"pid {child.meta['pid']} child_train.py" for f in nan)
    assert all(f["message"].startswith(f"[pid {child.meta['pid']} child_train.py]") for f in nan)
    assert "2 runs under log: script (4 steps); pid" in proc.stderr


GROWING_CHILD = """
    import psutil, torch, torch.nn as nn
    torch.manual_seed(0)
    model = nn.Linear(512, 512)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    kept = []
    for step in range(400):
        out = model(torch.randn(8192, 512))  # 16 MiB of activations per step, kept with their graph
        kept.append(out)
        loss = out.pow(2).mean()
        opt.zero_grad(); loss.backward(); opt.step()
        if psutil.Process().memory_info().rss > 3 * 2**30:
            raise SystemExit(99)  # safety net: the limit did not work
"""


@pytest.mark.slow
def test_memory_limit_holds_for_children(tmp_path):
    """``--memory-limit`` is per process, children included: the child is stopped by a
    MemoryError at a step boundary, and its run shows the limit it hit."""
    write(tmp_path / "grow.py", GROWING_CHILD)
    write(tmp_path / "parent.py", """
        import subprocess, sys
        print("child exited", subprocess.run([sys.executable, "grow.py"]).returncode)
    """)
    proc = gp_run(tmp_path, "--logdir", "log", "--memory-limit", "1200M", "parent.py")
    assert proc.returncode == 0 and proc.stdout == "child exited 1\n", proc.stderr[-3000:]
    assert "MemoryError: gradprobe: process memory" in proc.stderr and "exceeded --memory-limit 1200 MiB" in proc.stderr
    (child,) = [p for p in (tmp_path / "log").iterdir() if p.name.startswith("pid")]
    log = gradprobe.RunLog.load(str(child))
    hit = [e for e in log.events if e["kind"] == "memory_limit"]
    assert len(hit) == 1 and hit[0]["limit"] == 1200 * 2**20 and hit[0]["memory"] > hit[0]["limit"]
    assert log.n_steps >= 5


def test_bash_child_is_untouched(tmp_path):
    """A non-Python child behaves as without gradprobe: same output, status and files; its
    environment differs only by PYTHONPATH, whose first entry is the hook folder inside the
    log directory (removed when the run ends)."""
    write(tmp_path / "shell.py", """
        import subprocess
        status = subprocess.run(["bash", "-c", 'echo "bash says $((6 * 7))"; env | grep -v "^PYTHONPATH=" | sort > env-$1.txt;'
                                 ' printf "%s" "$PYTHONPATH" > pythonpath-$1.txt; exit 3', "bash", __import__("sys").argv[1]]).returncode
        print("bash exited", status)
    """)
    plain = py(tmp_path, "shell.py", "plain")
    watched = gp_run(tmp_path, "--logdir", "log", "shell.py", "watched")
    assert plain.returncode == watched.returncode == 0, watched.stderr[-2000:]
    assert watched.stdout == plain.stdout == "bash says 42\nbash exited 3\n"
    assert (tmp_path / "env-watched.txt").read_text() == (tmp_path / "env-plain.txt").read_text()
    hook_entry = (tmp_path / "pythonpath-watched.txt").read_text().split(os.pathsep)[0]
    assert Path(hook_entry).parent == tmp_path / "log" and Path(hook_entry).name.startswith(HOOK_PREFIX)
    assert (tmp_path / "pythonpath-watched.txt").read_text().split(os.pathsep)[1:] == (tmp_path / "pythonpath-plain.txt").read_text().split(os.pathsep)
    assert not (tmp_path / "log").exists()  # nothing trained: the hook folder went, and the log directory with it


# ------------------------------------------------------------ the empty report (CLI) -----
RAISES_EARLY = """
    import subprocess, sys
    import torch
    subprocess.run([sys.executable, "-I", "-c", "print('isolated child')"])
    subprocess.run(["bash", "-c", "echo bash child"])
    model = torch.nn.Linear(4, 1)
    raise RuntimeError("config error before training")
"""

FORWARD_ONLY = """
    import torch
    model = torch.nn.Linear(4, 1)
    with torch.no_grad():
        print(model(torch.ones(2, 4)).shape)
"""


def test_empty_report_says_no_step_and_what_it_saw(tmp_path):
    write(tmp_path / "early.py", RAISES_EARLY)
    plain = py(tmp_path, "early.py")
    proc = gp_run(tmp_path, "--logdir", "log", "early.py")
    assert proc.returncode == plain.returncode == 1  # exits as the script did
    assert HEALTHY not in proc.stderr.lower() and "No findings" not in proc.stderr
    after = proc.stderr[proc.stderr.index("RuntimeError: config error before training"):]
    summary = after.splitlines()[2]
    assert summary == f"gradprobe: the script raised RuntimeError (exit status 1); {NO_STEP} (nothing was written)"
    body = " ".join(after[after.index("gradprobe report:"):].split())  # as one line: the terminal renderer wraps
    assert "(gradprobe, 0 steps) No training step was recorded: there is nothing to judge. - " in body
    assert f"- the script raised RuntimeError at {tmp_path / 'early.py'}:6 before the first training step -" in body
    assert "- no optimizer was found: the script built no torch.optim optimizer" in body
    assert "- 2 child processes were started and not watched: " in body
    assert " -I -c " in body and "`bash -c 'echo bash child'`" in body
    assert not (tmp_path / "log").exists()

    proc = gp_run(tmp_path, "--logdir", "log", "--format", "json", "early.py")
    report = json.loads(proc.stdout[proc.stdout.index("{"):])
    no_step = report["source"]["no_step"]
    assert report["source"]["steps"] == 0 and not report["findings"]
    assert no_step["reason"] == NO_STEP and no_step["script"]["exception"] == "RuntimeError"
    assert no_step["optimizers"] == [] and no_step["models"] == []
    assert [c[1:3] for c in no_step["unwatched_children"]] == [["-I", "-c"], ["-c", "echo bash child"]]
    assert no_step["observed"][0].startswith("the script raised RuntimeError at ")


def test_empty_report_of_a_run_without_optimizer(tmp_path):
    write(tmp_path / "fwd.py", FORWARD_ONLY)
    proc = gp_run(tmp_path, "--format", "markdown", "fwd.py")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.startswith("torch.Size([2, 1])\n")
    assert f"gradprobe: the script finished; {NO_STEP} (nothing was written)" in proc.stderr
    assert "**No training step was recorded:** there is nothing to judge." in proc.stdout
    assert "- the script ended without a training step" in proc.stdout
    assert "- no optimizer was found: the script built no torch.optim optimizer" in proc.stdout
    assert HEALTHY not in proc.stdout.lower()
    assert not (tmp_path / "gradprobe_runs").exists()  # the default log directory was not left behind


# ----------------------------------------------------------- start-up hook hygiene -----
SHOW_CHILD = """
    import subprocess, sys
    out = subprocess.run([sys.executable, "-c", "import json, sys, sitecustomize; print(json.dumps([sys.path, sitecustomize.__file__]))"],
                         capture_output=True, text=True)
    sys.stdout.write(out.stdout)
    sys.stderr.write(out.stderr)
"""


@pytest.mark.parametrize("broken", [False, True], ids=["system-sitecustomize", "failing-sitecustomize"])
def test_the_hook_chains_to_the_sitecustomize_it_shadows(tmp_path, broken):
    """A child sees the ``sys.path`` and the ``sitecustomize`` it would see without gradprobe:
    the one further down PYTHONPATH (as Debian's in the standard library) still runs, and
    its errors are reported by ``site`` as usual."""
    site = tmp_path / "site_other"
    site.mkdir()
    write(site / "sitecustomize.py", textwrap.dedent("""
        import os, uuid
        with open(os.path.join(os.environ["SITE_MARK"], f"ran-{uuid.uuid4().hex}"), "w"):
            pass
    """) + ("raise ValueError('broken on purpose')\n" if broken else ""))
    write(tmp_path / "show.py", SHOW_CHILD)
    env = H.subprocess_env()
    env["PYTHONPATH"] = str(site) + os.pathsep + env["PYTHONPATH"]
    runs = {}
    for name in ("plain", "watched"):
        (tmp_path / name).mkdir()
        env["SITE_MARK"] = str(tmp_path / name)
        runs[name] = py(tmp_path, "show.py", env=env) if name == "plain" else gp_run(tmp_path, "--no-report", "show.py", env=env)
    plain, watched = runs["plain"], runs["watched"]
    assert plain.returncode == watched.returncode == 0, watched.stderr
    assert watched.stdout == plain.stdout
    # it ran as often: in the parent (plain python / gradprobe's own process) and in the child
    assert len(os.listdir(tmp_path / "watched")) == len(os.listdir(tmp_path / "plain")) >= 2
    if broken:
        # site reports it and goes on; the child's own `import sitecustomize` then fails
        assert plain.stdout == ""
        line = "Error in sitecustomize; set PYTHONVERBOSE for traceback:\nValueError: broken on purpose\n"
        assert plain.stderr.count(line) == watched.stderr.count(line) == 2
        assert plain.stderr.splitlines()[-1] == watched.stderr.splitlines()[-1] == "ValueError: broken on purpose"
    else:
        assert json.loads(watched.stdout)[1] == str(site / "sitecustomize.py")


def test_in_process_run_leaves_nothing_behind(tmp_path, monkeypatch):
    """A run in this process: the environment, ``sys.path``, ``sys.meta_path`` and
    ``Optimizer.__init__`` are as before, no hook folder is left, and a Python child
    started meanwhile was watched (it left a marker) but, never training, wrote nothing."""
    import torch

    from gradprobe import subprocess_hook
    from gradprobe.runner import ScriptRunner, resolve_target

    monkeypatch.chdir(tmp_path)
    write(tmp_path / "s.py", """
        import subprocess, sys
        import torch
        subprocess.run([sys.executable, "-c", "import torch; torch.nn.Linear(2, 2)"], check=True)
        model = torch.nn.Linear(2, 1)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        for _ in range(2):
            model(torch.ones(1, 2)).sum().backward(); opt.step(); opt.zero_grad()
    """)
    env = {k: v for k, v in os.environ.items() if not k.startswith("TORCHINDUCTOR_")}
    path, init = list(sys.path), torch.optim.Optimizer.__init__
    runner = ScriptRunner(resolve_target("s.py", [], module=False), logdir=str(tmp_path / "log"))
    outcome = runner.run()
    assert outcome.status == 0 and outcome.steps == 2
    # (torch itself may set TORCHINDUCTOR_CACHE_DIR on first use of its compiler machinery)
    assert {k: v for k, v in os.environ.items() if not k.startswith("TORCHINDUCTOR_")} == env
    assert sys.path == path
    assert not [f for f in sys.meta_path if isinstance(f, subprocess_hook._TorchFinder)]  # (tensorboard's absl adds its own)
    assert torch.optim.Optimizer.__init__ is init and not subprocess_hook.in_tree()
    assert not [n for n in os.listdir(tmp_path / "log") if n.startswith((HOOK_PREFIX, "pid"))]
    (child,) = runner.tree.watched()
    assert child["torch"] and not child["optimizer"] and child["ppid"] == os.getpid()
    report = runner.report()
    assert report.source["steps"] == 2 and report.source["path"] == str(tmp_path / "log")


# ------------------------------------------------------------------ SIGKILL (slow) -----
def _tree_processes(root_pid: int) -> list:
    import psutil

    root = psutil.Process(root_pid)
    return [root, *root.children(recursive=True)]


def _snapshot(*folders: Path) -> dict[str, set[str]]:
    out = {}
    for folder in folders:
        try:
            out[str(folder)] = {str(p.relative_to(folder)) for p in folder.rglob("*")} if folder.is_dir() else set()
        except OSError:
            out[str(folder)] = set()
    return out


@pytest.mark.slow
def test_sigkilled_tree_leaves_nothing_outside_the_logdir(tmp_path):
    """SIGKILL to every process of a training tree (parent and both ranks) while steps are
    being written: nothing of gradprobe is left outside the log directory (no file in the
    working directory, the temp directory or site-packages; no process carrying the hook;
    this environment unchanged); the ranks' logs are read; the next run there removes the
    hook folder the killed one left inside it."""
    import sysconfig
    import tempfile

    import psutil

    work = tmp_path / "work"
    work.mkdir()
    site = Path(sysconfig.get_paths()["purelib"])
    temp = Path(tempfile.gettempdir())
    shm = Path("/dev/shm")
    before = _snapshot(site)
    temp_before = {p.name for p in temp.iterdir()}
    shm_before = {p.name for p in shm.iterdir()} if shm.is_dir() else set()
    env_before = dict(os.environ)
    proc = subprocess.Popen([sys.executable, "-m", "gradprobe", "run", "--logdir", "log", str(MP_DDP), "out",
                             "--steps", "100000", "--delay", "0.02"],
                            cwd=work, env=H.subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:
            sizes = [(work / "log" / f"rank{r}" / "steps.arrow") for r in (0, 1)]
            if all(p.exists() and p.stat().st_size > 20_000 for p in sizes):
                break
            assert proc.poll() is None, proc.communicate()[1][-3000:]
            time.sleep(0.5)
        else:
            pytest.fail("the ranks wrote no steps in time")
        victims = _tree_processes(proc.pid)
        assert len(victims) >= 3, victims  # gradprobe run, its two ranks (and multiprocessing's helpers)
        hook_dirs = [p for p in (work / "log").iterdir() if p.name.startswith(HOOK_PREFIX)]
        assert len(hook_dirs) == 1
        for v in victims:
            try:
                v.kill()
            except psutil.NoSuchProcess:
                pass
        proc.wait(timeout=60)  # the root through Popen (psutil would reap it: Popen would then read 0)
        psutil.wait_procs(victims[1:], timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    # nothing outside the log directory
    assert sorted(os.listdir(work)) == ["log"]
    assert _snapshot(site) == before, "something was written into site-packages"
    new_temp = {p.name for p in temp.iterdir()} - temp_before
    assert not [n for n in new_temp if HOOK_PREFIX in n or "sitecustomize" in n], new_temp
    if shm.is_dir():
        assert not [n for n in {p.name for p in shm.iterdir()} - shm_before if HOOK_PREFIX in n or "sitecustomize" in n]
    assert dict(os.environ) == env_before
    hook_dir = str(hook_dirs[0])
    for p in psutil.process_iter(["pid"]):
        try:
            assert hook_dir not in p.environ().get("PYTHONPATH", ""), f"pid {p.pid} still carries the hook"
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
    # the killed ranks' logs are read (a torn last batch at most)
    for r in (0, 1):
        log = gradprobe.RunLog.load(str(work / "log" / f"rank{r}"))
        assert log.n_steps >= 10 and log.steps["step"].tolist() == list(range(log.n_steps))
    res = H.analyze_subprocess(work / "log", "json")
    assert res.report["source"]["ranks"] == [0, 1]
    # the next run in that directory removes the folder the killed run left
    write(work / "noop.py", "print('noop')\n")
    again = gp_run(work, "--logdir", "log", "--no-report", "noop.py")
    assert again.returncode == 0 and again.stdout == "noop\n"
    assert not [p for p in (work / "log").iterdir() if p.name.startswith(HOOK_PREFIX)]
