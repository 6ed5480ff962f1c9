"""``gradprobe verify``: apply a report's suggested hyperparameters and show before/after.

It runs the script under ``gradprobe run`` (or takes an existing report), turns
``suggested_hyperparameters`` into the script's flags (``max_norm`` -> ``--max-norm`` by
default; ``--map max_norm=--gradient-clip`` for scripts whose flags have other names),
re-runs it, and compares the two runs: findings, the training loss at an equal step budget
(the median of the last 10% of the steps both runs reached, so early stopping or a longer
run cannot flatter either side), and wall time. It is how a user checks the advice, and how
gradprobe's own tests check that following it heals a run.
"""

from __future__ import annotations

import json
import math
import os
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np


@dataclass
class RunResult:
    logdir: str
    report: dict[str, Any]
    returncode: int
    seconds: float
    stderr_tail: str = ""

    @property
    def findings(self) -> list[dict[str, Any]]:
        return list(self.report.get("findings", []))

    def codes(self, *severities: str) -> list[str]:
        return [f"{f['code']} {f['rule']}" for f in self.findings if not severities or f["severity"] in severities]


@dataclass
class Verification:
    before: RunResult
    after: RunResult
    applied: dict[str, Any]
    after_args: list[str]
    budget_steps: int
    loss_before: float | None
    loss_after: float | None
    notes: list[str] = field(default_factory=list)

    @property
    def healthy_after(self) -> bool:
        return not self.after.codes("error", "warning") and self.after.returncode == 0

    def to_json(self) -> dict[str, Any]:
        def side(r: RunResult, loss: float | None) -> dict[str, Any]:
            return {
                "logdir": r.logdir,
                "exit_status": r.returncode,
                "seconds": round(r.seconds, 2),
                "steps": r.report.get("source", {}).get("steps"),
                "loss_at_budget": loss,
                "errors": r.codes("error"),
                "warnings": r.codes("warning"),
                "info": r.codes("info"),
            }

        return {
            "schema": "gradprobe.verify/1",
            "applied": self.applied,
            "after_args": self.after_args,
            "budget_steps": self.budget_steps,
            "before": side(self.before, self.loss_before),
            "after": side(self.after, self.loss_after),
            "healthy_after": self.healthy_after,
            "notes": self.notes,
        }

    def render_text(self) -> str:
        j = self.to_json()
        lines = ["gradprobe verify", ""]
        lines.append("applied: " + (", ".join(f"{k}={v}" for k, v in self.applied.items()) or "nothing (no suggested hyperparameters)"))
        lines.append("after-run arguments: " + shlex.join(self.after_args))
        lines.append("")
        lines.append(f"{'':<22}{'before':>28}{'after':>28}")

        def row(name: str, a: Any, b: Any) -> None:
            lines.append(f"{name:<22}{str(a):>28}{str(b):>28}")

        b, a = j["before"], j["after"]
        row("exit status", b["exit_status"], a["exit_status"])
        row("steps", b["steps"], a["steps"])
        row(f"loss @ {self.budget_steps} steps", _fmt(b["loss_at_budget"]), _fmt(a["loss_at_budget"]))
        row("wall time (s)", b["seconds"], a["seconds"])
        row("errors", len(b["errors"]), len(a["errors"]))
        row("warnings", len(b["warnings"]), len(a["warnings"]))
        lines.append("")
        for label, r in (("before", b), ("after", a)):
            found = r["errors"] + r["warnings"]
            lines.append(f"{label}: " + (", ".join(found) if found else "no error or warning"))
        for n in self.notes:
            lines.append(f"note: {n}")
        lines.append("")
        lines.append("healthy after: " + ("yes" if self.healthy_after else "no"))
        return "\n".join(lines) + "\n"


def _fmt(v: Any) -> str:
    return "n/a" if v is None else f"{v:.5g}"


def flag_for(name: str, mapping: dict[str, str]) -> str:
    return mapping.get(name, "--" + name.replace("_", "-"))


def format_value(v: Any) -> str:
    if isinstance(v, float):
        if v.is_integer() and abs(v) < 1e15:
            return str(int(v)) if abs(v) >= 1 else repr(v)
        return repr(v)
    return str(v)


def apply_flags(args: list[str], suggested: dict[str, Any], mapping: dict[str, str]) -> tuple[list[str], dict[str, Any]]:
    """Replaces or appends ``--flag value`` for each suggested hyperparameter."""
    out = list(args)
    applied = {}
    for name, value in suggested.items():
        flag = flag_for(name, mapping)
        text = format_value(value)
        applied[name] = value
        replaced = False
        for i, a in enumerate(out):
            if a == flag and i + 1 < len(out):
                out[i + 1] = text
                replaced = True
            elif a.startswith(flag + "="):
                out[i] = f"{flag}={text}"
                replaced = True
        if not replaced:
            out += [flag, text]
    return out, applied


def run_watched(script: list[str], logdir: str, *, module: bool = False, timeout: float | None = None,
                extra: list[str] | None = None) -> RunResult:
    """Runs ``gradprobe run`` in a subprocess and reads its JSON report."""
    os.makedirs(logdir, exist_ok=True)
    report_path = os.path.join(logdir, "report.json")
    cmd = [sys.executable, "-m", "gradprobe", "run", "--logdir", os.path.join(logdir, "run"), "--format", "json",
           "--output", report_path, *(extra or [])]
    cmd += (["-m"] if module else []) + script
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, timeout=timeout)
    seconds = time.perf_counter() - t0
    report: dict[str, Any] = {}
    if os.path.exists(report_path):
        with open(report_path, encoding="utf-8") as f:
            report = json.load(f)
    return RunResult(os.path.join(logdir, "run"), report, proc.returncode, seconds, proc.stderr[-4000:])


def loss_at_budget(logdir: str, budget: int) -> float | None:
    """Median training loss over the last 10% of the first ``budget`` steps."""
    from gradprobe.analysis import RunContext
    from gradprobe.readers import load

    try:
        ctx = RunContext(load(logdir))
    except Exception:  # noqa: BLE001
        return None
    loss = ctx.loss[: max(budget, 0)]
    if loss.size == 0:
        return None
    k = max(1, budget // 10)
    tail = loss[-k:]
    tail = tail[np.isfinite(tail)]
    if tail.size == 0:
        return math.inf if loss.size else None
    return float(np.median(tail))


def verify(script: list[str], workdir: str, *, module: bool = False, mapping: dict[str, str] | None = None,
           before_report: str | None = None, after_extra_args: list[str] | None = None,
           timeout: float | None = None) -> Verification:
    mapping = mapping or {}
    notes: list[str] = []
    if before_report:
        with open(before_report, encoding="utf-8") as f:
            rep = json.load(f)
        before = RunResult(str(rep.get("source", {}).get("path", "")), rep, 0, math.nan)
    else:
        before = run_watched(script, os.path.join(workdir, "before"), module=module, timeout=timeout)
        if not before.report:
            raise RuntimeError(f"the first run produced no report (exit {before.returncode}): {before.stderr_tail.strip().splitlines()[-1:] or ''}")
    suggested = dict(before.report.get("suggested_hyperparameters", {}))
    target, args = script[0], script[1:]
    new_args, applied = apply_flags(args, suggested, mapping)
    new_args += list(after_extra_args or [])
    if not applied and not after_extra_args:
        notes.append("the report suggests no hyperparameter: the after run repeats the before run")
    after = run_watched([target, *new_args], os.path.join(workdir, "after"), module=module, timeout=timeout)
    if after.returncode == 2 and "unrecognized arguments" in after.stderr_tail:
        notes.append("the script rejected a flag: map the names with --map name=--its-flag")
    sb = int(before.report.get("source", {}).get("steps") or 0)
    sa = int(after.report.get("source", {}).get("steps") or 0)
    budget = min(sb, sa) if sb and sa else max(sb, sa)
    return Verification(
        before=before,
        after=after,
        applied=applied,
        after_args=[target, *new_args],
        budget_steps=budget,
        loss_before=loss_at_budget(before.logdir, budget) if before.logdir else None,
        loss_after=loss_at_budget(after.logdir, budget),
        notes=notes,
    )
