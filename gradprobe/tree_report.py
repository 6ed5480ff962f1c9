"""One report for a whole ``gradprobe run`` process tree.

The runs of one tree (:mod:`gradprobe.tree`) are found by the tree id in their
``gradprobe.json``. Ranks (``rank<N>/``) are merged by the engine as ``gradprobe analyze``
always merged them (:func:`gradprobe.engine.analyze_ranks`); every other run (the script's
own, a child training on its own) is analyzed on its own. With more than one of those
groups, the report holds them all: each finding says whose it is (``[pid 4242 child.py]``,
evidence ``run``), ``source.runs`` lists the runs, and the summary, the merged
hyperparameters and the skipped rules are those of the main group (the ranks, else the run
with the most steps).

A tree that recorded no step gets :func:`empty_report`: it says so, and what was seen
instead (how the script ended, whether an optimizer was built, child processes watched and
not watched), in ``source.no_step``; the renderers say "no training step was recorded" and
never that the run looks healthy.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from typing import Any

from gradprobe.report import Report

#: what a run with no step says first, in the report and in ``source.no_step.reason``
NO_STEP = "no training step was recorded"
#: child commands named in an empty report (the rest are counted)
SHOWN_COMMANDS = 4
#: The longest the report waits for other processes of the tree still writing their runs: a
#: launcher that does not join its workers (Lightning's rank 0 returns from ``fit`` and ends
#: while rank 1 is still closing its log) would otherwise have its children's logs read
#: mid-write (their last steps, the NaN that started there, missing).
CHILD_CLOSE_WAIT_S = 30.0


@dataclasses.dataclass
class TreeRun:
    """One run directory of the tree."""

    name: str  # relative to the tree directory; "" for the tree directory itself
    path: str
    meta: dict[str, Any]

    @property
    def steps(self) -> int:
        return int(self.meta.get("steps") or 0)

    @property
    def rank(self) -> int | None:
        base = self.name
        return int(base[4:]) if base.startswith("rank") and base[4:].isdigit() else None

    @property
    def label(self) -> str:
        if self.rank is not None:
            return f"rank {self.rank}"
        if (self.meta.get("tree") or {}).get("root"):
            return "script"
        argv = self.meta.get("argv") or []
        script = os.path.basename(str(argv[0])) if argv else ""
        return f"pid {self.meta.get('pid')}" + (f" {script}" if script else "")

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name or ".", "label": self.label, "steps": self.steps, "pid": self.meta.get("pid"),
                "rank": self.meta.get("rank"), "world_size": self.meta.get("world_size"), "argv": self.meta.get("argv")}


def find_runs(tree_dir: str, token: str) -> list[TreeRun]:
    """Run directories of the tree ``token``: the tree directory and its direct subfolders."""
    from gradprobe.runlog.runlog import is_run_dir

    candidates = [("", tree_dir)]
    try:
        entries = sorted(os.listdir(tree_dir))
    except OSError:
        entries = []
    candidates += [(e, os.path.join(tree_dir, e)) for e in entries if not e.startswith(".")]
    runs = []
    for name, path in candidates:
        if not is_run_dir(path):
            continue
        try:
            with open(os.path.join(path, "gradprobe.json"), encoding="utf-8") as f:
                meta = json.load(f)
        except (OSError, ValueError):
            continue
        if isinstance(meta, dict) and (meta.get("tree") or {}).get("id") == token:
            runs.append(TreeRun(name, path, meta))
    return runs


def _running(pid: int) -> bool:
    """The process exists and is not a zombie (exited, waiting for its parent to reap it)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as f:
            return f.read().rsplit(")", 1)[-1].split()[0] != "Z"
    except (OSError, IndexError):
        return True  # no /proc (macOS): alive as far as we can tell


def wait_for_children(tree_dir: str, token: str, timeout: float = CHILD_CLOSE_WAIT_S) -> list[int]:
    """Waits, at most ``timeout`` seconds, until every other process writing a run of the tree
    has closed it (``closed`` in its metadata, written after its last steps) or exited; returns
    the pids still writing then."""
    deadline = time.monotonic() + timeout
    me = os.getpid()
    while True:
        writing = [int(r.meta["pid"]) for r in find_runs(tree_dir, token)
                   if isinstance(r.meta.get("pid"), int) and r.meta["pid"] != me and not r.meta.get("closed")
                   and _running(int(r.meta["pid"]))]
        if not writing or time.monotonic() >= deadline:
            return writing
        time.sleep(0.05)


def rank_group(runs: list[TreeRun]) -> dict[int, str]:
    return {r.rank: r.path for r in runs if r.rank is not None}  # type: ignore[misc]


def analyze_tree(tree_dir: str, runs: list[TreeRun]) -> Report:
    """The report of a tree with at least one run (see the module docstring)."""
    from gradprobe import engine

    ranks = rank_group(runs)
    groups: list[tuple[str, Report, int]] = []
    if ranks:
        rep = engine.analyze_ranks(tree_dir, ranks)
        groups.append(("ranks", rep, int(rep.source.get("steps") or 0)))
    for run in runs:
        if run.rank is None:
            rep = engine.analyze(run.path)
            groups.append((run.label, rep, int(rep.source.get("steps") or 0)))
    if len(groups) == 1:
        label, rep, _ = groups[0]
        if label != "ranks" and isinstance(rep.source.get("stopped"), dict):  # --stop-on: whose run stopped
            rep.source["stopped"]["run"] = label
        return rep
    # the main group first: the ranks, else the run with the most steps
    groups.sort(key=lambda g: (g[0] != "ranks", -g[2]))
    main = groups[0][1]
    findings = []
    skipped: list[str] = []
    for label, rep, _ in groups:
        # several ranks: the engine already wrote "[rank r]" into each message
        of_ranks = rep.source.get("ranks") or [] if label == "ranks" else []
        tag = label if label != "ranks" else (f"rank {of_ranks[0]}" if len(of_ranks) == 1 else None)
        for f in rep.findings:
            if tag:
                f.message = f"[{tag}] {f.message}"
            f.evidence = {"run": tag or "ranks", **f.evidence}
            findings.append(f)
        skipped += [f"{label}: {s}" for s in rep.source.get("skipped") or []]
    source = {
        "path": tree_dir,
        "kind": "gradprobe",
        "steps": sum(g[2] for g in groups),
        "runs": [r.to_json() for r in runs],
        "skipped": skipped,
    }
    if ranks:
        source["ranks"] = sorted(ranks)
    stops = [dict(rep.source["stopped"], run=label if label != "ranks" else f"rank {rep.source['stopped'].get('rank')}")
             for label, rep, _ in groups if isinstance(rep.source.get("stopped"), dict)]
    if stops:  # --stop-on: the first run stopped
        source["stopped"] = min(stops, key=lambda s: float(s.get("wall_time") or 0.0))
    return Report(source=source, summary=dict(main.summary), findings=findings,
                  suggested_hyperparameters=dict(main.suggested_hyperparameters),
                  skipped_rules=list(main.skipped_rules), runlog=main.runlog)


# ----------------------------------------------------------------------- no step -----
def observations(outcome: Any, root_meta: dict[str, Any], tree: Any) -> dict[str, Any]:
    """What a tree that recorded no step saw instead, as sentences and as data.

    Args:
        outcome: the script's :class:`~gradprobe.runner.Outcome`.
        root_meta: the parent's probe metadata (its optimizers and models), {} if none.
        tree: the :class:`~gradprobe.tree.ProcessTree` (None: children were not watched).
    """
    said: list[str] = []
    how = getattr(outcome, "how", "returned")
    status = getattr(outcome, "status", 0)
    exc = getattr(outcome, "exception", None)
    script: dict[str, Any] = {"how": how, "status": status}
    if how == "exception":
        name = type(exc).__name__ if exc is not None else "an exception"
        where = f" at {outcome.location}" if getattr(outcome, "location", None) else ""
        said.append(f"the script raised {name}{where} before the first training step")
        script["exception"] = name
        if getattr(outcome, "location", None):
            script["location"] = outcome.location
    elif how in ("signal", "keyboard_interrupt"):
        said.append(f"{outcome.describe()} before the first training step")
    elif status:
        said.append(f"the script exited with status {status} before the first training step")
    else:
        said.append("the script ended without a training step")

    watched = tree.watched() if tree is not None else []
    with_torch = [m for m in watched if m.get("torch")]
    child_opts = [m for m in with_torch if m.get("optimizer")]
    root_opts = [o.get("class") for o in root_meta.get("optimizers") or []]
    models = [m.get("name") for m in root_meta.get("models") or []]
    if not root_opts and not child_opts:
        nor = ""
        if with_torch:
            n = len(with_torch)
            nor = f", nor did {'its' if n == 1 else f'any of its {n}'} watched child process{'es' if n != 1 else ''} that imported torch"
        forward = "" if models else "; no model of the script ran a forward pass either"
        said.append(f"no optimizer was found: the script built no torch.optim optimizer{nor}{forward}")
    else:
        if root_opts:
            said.append(f"the script built {', '.join(root_opts)} but no step of it was recorded")
        if child_opts:
            n = len(child_opts)
            said.append(f"{n} watched child process{'es' if n != 1 else ''} built an optimizer and recorded no step")
    if with_torch:
        said.append(f"watched child processes that imported torch: {_listed([_marker_label(m) for m in with_torch])}")
    unwatched = tree.unwatched_commands() if tree is not None else []
    extra = max(0, (tree.commands_seen if tree is not None else 0) - len(tree.commands if tree is not None else []))
    if unwatched or extra:
        n = len(unwatched) + extra
        shown = ", ".join(f"`{c.shown()}`" for c in unwatched[:SHOWN_COMMANDS])
        more = n - min(len(unwatched), SHOWN_COMMANDS)
        why = ("not Python, or Python started with -I, -E or -S, or given an environment without gradprobe's "
               "PYTHONPATH entry")
        if any(c.env_dropped for c in unwatched):
            why = "some were given an environment without gradprobe's PYTHONPATH entry; others are not Python or skip it"
        said.append(f"{n} child process{'es were' if n != 1 else ' was'} started and not watched: "
                    f"{shown}{f' and {more} more' if more > 0 else ''} ({why})")
    if tree is not None and tree.note:
        said.append(tree.note)
    return {
        "reason": NO_STEP,
        "observed": said,
        "script": script,
        "optimizers": root_opts,
        "models": models,
        "watched_children": [{"pid": m.get("pid"), "argv": m.get("argv"), "torch": bool(m.get("torch")),
                              "optimizer": bool(m.get("optimizer"))} for m in watched],
        "unwatched_children": [c.argv for c in unwatched],
    }


def _marker_label(m: dict[str, Any]) -> str:
    """``pid 4242 (python child.py)``; a multiprocessing child by the script it re-runs."""
    import shlex

    orig = [str(a) for a in m.get("orig_argv") or []]
    argv = [str(a) for a in m.get("argv") or []]
    if m.get("mp") or any("multiprocessing" in a for a in orig):
        text = "multiprocessing child" + (f" of {os.path.basename(argv[0])}" if argv and argv[0] != "-c" else "")
    else:
        text = shlex.join([os.path.basename(orig[0]), *orig[1:]]) if orig else "python"
    return f"pid {m.get('pid')} ({text[:100]})"


def _listed(items: list[str]) -> str:
    if len(items) <= SHOWN_COMMANDS:
        return ", ".join(items)
    return ", ".join(items[:SHOWN_COMMANDS]) + f" and {len(items) - SHOWN_COMMANDS} more"


def empty_report(tree_dir: str, no_step: dict[str, Any]) -> Report:
    """The report of a tree that recorded no step: nothing to judge, and why."""
    source = {"path": tree_dir, "kind": "gradprobe", "steps": 0, "no_step": no_step}
    return Report(source=source, summary={"optimizer": None, "lr": None, "max_norm": None, "amp": None, "recurrent": []})


__all__ = ["NO_STEP", "TreeRun", "analyze_tree", "empty_report", "find_runs", "observations", "rank_group",
           "wait_for_children"]
