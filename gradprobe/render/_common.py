"""Text pieces shared by the terminal, Markdown and HTML renderers: numbers people can read,
evidence as short phrases with units, recommendation lines, and the verdict when there is no
finding (which says what was judged and what was not)."""

from __future__ import annotations

import math
import re
from typing import Any

from gradprobe.report import Finding, Recommendation, Report

ICON = {"error": "✖", "warning": "▲", "info": "ℹ"}

#: significant digits of every number a report prints (a reader compares magnitudes; the
#: JSON report keeps 6)
DIGITS = 4
#: magnitudes printed in scientific notation: past these, fixed notation is a long digit
#: string (a 1e30 spike, a 1e-8 learning rate)
SCI_ABOVE = 1e6
SCI_BELOW = 1e-3
#: items of a list shown before "... (N in all)"
LIST_ITEMS = 6
#: dicts inside a list shown before "... (N in all)"
RECORDS = 3
#: characters of one evidence value (a long exception message, a deeply nested record)
VALUE_CHARS = 160

_BINARY = (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10))
#: units printed after the number with a space, singular when the number is 1
_COUNT_UNITS = {"steps": "step", "decades": "decade", "halvings": "halving", "nats": "nat", "binades": "binade"}


def fmt_number(v: Any) -> str:
    """A number with at most :data:`DIGITS` significant digits, in scientific notation
    (``4.797e+18``, ``1.5e-07``) outside [:data:`SCI_BELOW`, :data:`SCI_ABOVE`); integers
    below that are printed whole (65536)."""
    if isinstance(v, bool):
        return "yes" if v else "no"
    try:
        import numpy as np

        if isinstance(v, np.generic):
            v = v.item()
    except ImportError:  # pragma: no cover
        pass
    if isinstance(v, int):
        if abs(v) < SCI_ABOVE:
            return str(v)
        v = float(v)
    if not isinstance(v, float):
        return str(v)
    if math.isnan(v):
        return "NaN"
    if math.isinf(v):
        return "inf" if v > 0 else "-inf"
    if v == 0:
        return "0"
    a = abs(v)
    if a >= SCI_ABOVE or a < SCI_BELOW:  # Python's own notation, as the rules' messages write it
        mant, exp = f"{v:.{DIGITS - 1}e}".split("e")
        mant = mant.rstrip("0").rstrip(".") if "." in mant else mant
        return f"{mant}e{exp}"
    if v.is_integer():
        return str(int(v))
    return f"{v:.{DIGITS}g}"


fmt_value = fmt_number  # the name the renderers used before the units


def fmt_bytes(v: float) -> str:
    a = abs(v)
    for name, size in _BINARY:
        if a >= size:
            return f"{fmt_number(round(v / size, 1) if a / size < 1000 else v / size)} {name}"
    return f"{fmt_number(v)} B"


def _is_number(v: Any) -> bool:
    if isinstance(v, bool):
        return False
    if isinstance(v, (int, float)):
        return True
    try:
        import numpy as np

        return isinstance(v, np.number)
    except ImportError:  # pragma: no cover
        return False


def with_unit(v: Any, unit: str) -> str:
    """One value in its unit (see :class:`gradprobe.rules.base.Field`)."""
    if v is None:
        return "n/a"
    if not _is_number(v):
        return fmt_number(v)
    f = float(v)
    if unit == "step":
        return f"step {fmt_number(v)}"
    if unit in _COUNT_UNITS:
        return f"{fmt_number(v)} {_COUNT_UNITS[unit] if f == 1 else unit}"
    if unit == "x":
        return f"{fmt_number(v)}x"
    if unit == "%":
        if not math.isfinite(f):
            return fmt_number(f)
        pct = 100.0 * f
        return f"{fmt_number(round(pct, 1) if 0.1 <= abs(pct) < 1000 else pct)}%"
    if unit == "bytes":
        return fmt_bytes(f) if math.isfinite(f) else fmt_number(f)
    if unit == "s":
        if math.isfinite(f) and 0 < abs(f) < 1:
            return f"{fmt_number(f * 1000)} ms"
        return f"{fmt_number(v)} s"
    return fmt_number(v)  # "", or a quantity's name (lr, norm, scale, loss): the number itself


#: a record's own field name (``max_factor``, ``first_step``), read as words; anything else (a
#: layer ``body.bias_ih_l0``, a module ``fc_1``) is a name from the run and printed as it is
_FIELD_NAME = re.compile(r"[a-z]+(?:_[a-z]+)+")


def _key(k: Any) -> str:
    k = str(k)
    return k.replace("_", " ") if _FIELD_NAME.fullmatch(k) else k


def _empty(v: Any) -> bool:
    return v is None or v == "" or (isinstance(v, (list, dict, tuple)) and not v)


def compact(v: Any, unit: str = "", depth: int = 0) -> str:
    """A nested evidence value (dicts, lists, lists of records) as a short phrase."""
    if isinstance(v, dict):
        if set(v) == {"min", "max"} and all(_is_number(x) for x in v.values()):
            lo, hi = with_unit(v["min"], unit), with_unit(v["max"], unit)
            return lo if lo == hi else f"{lo} to {hi}"
        parts = []
        for k, x in v.items():
            if _empty(x):
                continue
            if isinstance(x, (dict, list, tuple)):
                if depth >= 1:
                    continue  # two levels down: the record's own numbers say enough
                inner = compact(x, unit, depth + 1)
                parts.append(f"{_key(k)} {inner}" if inner.startswith("(") else f"{_key(k)} ({inner})")
            else:
                parts.append(f"{_key(k)} {with_unit(x, unit)}")
        return ", ".join(parts)
    if isinstance(v, (list, tuple)):
        if any(isinstance(x, dict) for x in v):
            shown = [compact(x, unit, depth + 1) for x in v[:RECORDS]]
            more = f"; ... ({len(v)} in all)" if len(v) > RECORDS else ""
            return "; ".join(f"({s})" for s in shown) + more
        if unit == "step" and all(_is_number(x) for x in v):
            head = ", ".join(fmt_number(x) for x in v[:LIST_ITEMS])
            more = f", ... ({len(v)} in all)" if len(v) > LIST_ITEMS else ""
            return f"step{'s' if len(v) != 1 else ''} {head}{more}"
        head = ", ".join(compact(x, unit, depth + 1) for x in v[:LIST_ITEMS])
        return head + (f", ... ({len(v)} in all)" if len(v) > LIST_ITEMS else "")
    return with_unit(v, unit)


def _clip(text: str, limit: int = VALUE_CHARS) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 3].rstrip() + "..."


def field_label(f: Finding, key: str) -> tuple[str, str]:
    """(label, unit) of an evidence field: the rule's declaration, else the raw key."""
    decl = (f.evidence_fields or {}).get(key)
    if decl is not None:
        label, unit = (decl.label, decl.unit) if hasattr(decl, "label") else tuple(decl)
        return str(label), str(unit)
    return _key(key), ""


def evidence_items(f: Finding) -> list[tuple[str, str]]:
    """(label, value with its unit) of every evidence field, in the rule's order."""
    out = []
    for k, v in f.evidence.items():
        if _empty(v):
            continue
        label, unit = field_label(f, k)
        out.append((label, _clip(compact(v, unit))))
    return out


def evidence_line(f: Finding) -> str:
    return "; ".join(f"{label}: {value}" for label, value in evidence_items(f))


def header_lines(report: Report) -> list[str]:
    src = report.source
    s = report.summary
    run = f", run {src['run']}" if src.get("run") else ""  # one run of several in PATH (TensorBoard, MLflow)
    steps = src.get("steps")
    lines = [f"gradprobe report: {src.get('path')} ({src.get('kind')}{run}, {steps} step{'s' if steps != 1 else ''})"]
    parts = []
    if s.get("optimizer"):
        parts.append(str(s["optimizer"]))
    if s.get("lr") is not None:
        parts.append(f"lr={fmt_number(s['lr'])}")
    if s.get("max_norm") is not None:
        parts.append(f"max_norm={fmt_number(s['max_norm'])}")
    if s.get("amp"):
        parts.append(f"amp={s['amp']}")
    for r in s.get("recurrent") or []:
        parts.append(f"{r.get('module')}: hidden {fmt_number(r.get('hidden_size'))}, lookback {fmt_number(r.get('lookback'))}")
    if parts:
        lines.append("  " + " | ".join(parts))
    if isinstance(src.get("stopped"), dict):
        lines.append("  " + stopped_line(src["stopped"]))
    for note in list(src.get("skipped") or []) + list(src.get("notes") or []):  # notes: how a foreign log was read
        lines.append(f"  note: {note}")
    return lines


def stopped_line(stop: dict[str, Any]) -> str:
    """``stopped after step 70 (--stop-on): GP401 nonfinite-loss, final; 19930 of 20000 steps left``."""
    who = f"rank {stop['rank']} " if stop.get("rank") is not None else ""
    left = ""
    if stop.get("steps_left") is not None and stop.get("total_steps") is not None:
        left = f"; {stop['steps_left']} of {stop['total_steps']} steps left"
    note = f" ({stop['note']})" if stop.get("note") else ""
    return (f"{who}stopped after step {stop.get('step')} (--stop-on): {stop.get('code')} {stop.get('rule')}, final"
            f"{left}{note}")


NOT_SUGGESTED = "not suggested: "


def recommendation_line(r: Recommendation) -> str:
    if r.kind == "hyperparameter":
        if r.suggested is None:
            why = r.reason[len(NOT_SUGGESTED):] if r.reason.startswith(NOT_SUGGESTED) else r.reason
            return f"{r.name}: {fmt_number(r.current)}, no value suggested ({why})"
        return f"{r.name}: {fmt_number(r.current)} -> {fmt_number(r.suggested)}  ({r.reason})"
    return f"{r.summary}" + (f"  ({r.reason})" if r.reason else "")


def severity_note(f: Finding) -> str | None:
    """Why the finding's severity differs from its rule's catalog severity, and whether
    further training can undo it; None when there is nothing to say."""
    parts = []
    if f.severity_reason:
        parts.append(f"{f.severity} because {f.severity_reason}")
    if f.final:
        parts.append("final: further training cannot undo it")
    return "; ".join(parts) or None


def where_text(f: Finding) -> str:
    where = []
    if f.first_step is not None:
        where.append(f"from step {f.first_step}")
    if f.layer:
        where.append(f"in {f.layer}")
    return ", ".join(where)


def title_line(f: Finding) -> str:
    w = where_text(f)
    return f"{ICON[f.severity]} {f.severity.upper()} {f.code} {f.rule}: {f.title}{f' ({w})' if w else ''}  [confidence {f.confidence:.2f}]"


# ------------------------------------------------------------------------------ verdict --
#: "needs loss, grad_norm (not in this log)": the engine's reason for a skipped rule
_NEEDS = re.compile(r"^needs (.+?) \(not in this log\)$")
#: a log's note that its loss was not found (the readers write it)
_NO_LOSS_NOTE = "cannot call the run healthy"


def missing_signals(report: Report) -> list[str]:
    """Signals that rules needed and the log lacks, most-needed first."""
    count: dict[str, int] = {}
    for s in report.skipped_rules:
        m = _NEEDS.match(s.reason or "")
        if not m:
            continue
        for alt in m.group(1).split(", "):
            count[alt] = count.get(alt, 0) + 1
    return sorted(count, key=lambda k: (-count[k], k))


def unjudged(report: Report) -> str | None:
    """Why a report without findings must not call the run healthy (no training loss was
    observed), or None when the rules that could run saw what a verdict needs."""
    notes = [n for n in report.source.get("skipped") or [] if _NO_LOSS_NOTE in str(n)]
    missing = missing_signals(report)
    if notes or any(m.split("|")[0] == "loss" for m in missing):
        return "this log has no training loss, so the rules that judge the loss did not run"
    if not _loss_observed(report):
        return "no training loss was recorded, so the rules that judge the loss had nothing to judge"
    return None


def _loss_observed(report: Report) -> bool:
    """Some step of the run's log holds a training loss (finite, or flagged non-finite); True
    when the report carries no log to look at."""
    log = report.runlog
    steps = getattr(log, "steps", None)
    if steps is None or len(steps) == 0:
        return True
    try:
        import numpy as np

        for col, flag in (("loss", "loss_nonfinite"), ("loss_fn", "loss_fn_nonfinite")):
            if col in steps and np.isfinite(steps[col].to_numpy(dtype=np.float64)).any():
                return True
            if flag in steps and steps[flag].to_numpy(dtype=bool).any():
                return True
    except Exception:  # noqa: BLE001 - a log of another shape: say nothing rather than guess
        return True
    return False


def verdict_lines(report: Report) -> list[str]:
    """What a report with no finding says: never that a run is healthy when its loss was
    not observed. Empty when there are findings."""
    if report.findings:
        return []
    if report.source.get("steps") == 0:  # nothing was judged: never "healthy"
        return ["No training step was recorded: there is nothing to judge."]
    why = unjudged(report)
    ran = _rules_ran(report)
    if why:
        names = list(dict.fromkeys(n for m in missing_signals(report) for n in m.split("|")))
        missing = ", ".join(names[:10]) + (", ..." if len(names) > 10 else "")
        lines = [f"No findings, but the run is not judged healthy: {why}."]
        lines.append(f"Judged: what was recorded ({ran}). Not judged: the training loss"
                     + (f", and {len(report.skipped_rules)} rule(s) needing {missing}." if missing else "."))
        return lines
    return [f"No findings: nothing in this run looks unhealthy to the rules that could run ({ran})."]


def _rules_ran(report: Report) -> str:
    try:
        from gradprobe.rules.base import CrossRankRule, registry

        several_ranks = len(report.source.get("ranks") or []) > 1  # cross-rank rules run only then
        total = sum(1 for cls in registry() if several_ranks or not issubclass(cls, CrossRankRule))
    except Exception:  # noqa: BLE001 - the count is a courtesy
        return f"{len(report.skipped_rules)} rule(s) skipped"
    ran = max(0, total - len(report.skipped_rules))
    return f"{ran} of {total} rules ran"
