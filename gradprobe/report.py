"""The report: findings, recommendations and the run summary (the JSON report's shape is
``gradprobe/schemas/report.schema.json``).

A :class:`Report` is plain data produced by the rule engine; renderers in
:mod:`gradprobe.render` turn it into terminal text, Markdown, JSON or HTML.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

REPORT_SCHEMA = "gradprobe.report/1"
SEVERITIES = ("error", "warning", "info")
SEVERITY_RANK = {"error": 0, "warning": 1, "info": 2}

#: Canonical hyperparameter names (the keys of ``suggested_hyperparameters``). A report only
#: names those a rule computes.
CANONICAL_HYPERPARAMETERS = (
    "lr",
    "max_norm",
    "weight_decay",
    "init_scale",
    "growth_factor",
    "growth_interval",
    "lookback",
    "hidden_size",
    "warmup_steps",
    "amp_dtype",
    "batch_size",
)


def clean_number(v: Any) -> Any:
    """JSON-safe value: numpy scalars to Python, NaN/Inf to None (strict JSON)."""
    try:
        import numpy as np

        if isinstance(v, np.generic):
            v = v.item()
    except ImportError:  # pragma: no cover
        pass
    if isinstance(v, float):
        if not math.isfinite(v):
            return None
        return float(f"{v:.6g}")
    if isinstance(v, dict):
        return {str(k): clean_number(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [clean_number(x) for x in v]
    return v


@dataclass
class Recommendation:
    """One change to make: a hyperparameter with a number from the run, or a code fix."""

    kind: str  # "hyperparameter" | "code"
    name: str | None = None
    current: Any = None
    suggested: Any = None
    reason: str = ""
    summary: str | None = None
    snippet: str | None = None

    @classmethod
    def hyperparameter(cls, name: str, current: Any, suggested: Any, reason: str) -> "Recommendation":
        if name not in CANONICAL_HYPERPARAMETERS:
            raise ValueError(f"{name!r} is not a canonical hyperparameter name")
        return cls(kind="hyperparameter", name=name, current=current, suggested=suggested, reason=reason)

    @classmethod
    def omitted(cls, name: str, current: Any, reason: str) -> "Recommendation":
        """A hyperparameter the rule could not compute from this run: no value, and why."""
        rec = cls.hyperparameter(name, current, None, reason)
        rec.reason = reason if reason.startswith("not suggested") else f"not suggested: {reason}"
        return rec

    @classmethod
    def code(cls, summary: str, snippet: str, reason: str = "") -> "Recommendation":
        return cls(kind="code", summary=summary, snippet=snippet, reason=reason)

    def to_json(self) -> dict[str, Any]:
        if self.kind == "hyperparameter":
            return {
                "kind": "hyperparameter",
                "name": self.name,
                "current": clean_number(self.current),
                "suggested": clean_number(self.suggested),
                "reason": self.reason,
            }
        out: dict[str, Any] = {"kind": "code", "summary": self.summary or "", "snippet": self.snippet or ""}
        if self.reason:
            out["reason"] = self.reason
        return out


@dataclass
class Finding:
    """One diagnosis. ``confidence`` is computed by the rule as its docstring states."""

    rule: str
    code: str
    severity: str
    confidence: float
    title: str
    message: str
    first_step: int | None = None
    layer: str | None = None
    evidence: dict[str, Any] = field(default_factory=dict)
    caused_by: list[str] = field(default_factory=list)
    recommendations: list[Recommendation] = field(default_factory=list)
    rank: int | None = None  # set by the engine (global order; also in ``rank`` of rank-aware logs)
    #: further training cannot undo it (declared by the rule: ``Rule.final_when``)
    final: bool = False
    #: why the severity differs from the rule's catalog severity (the rule's declared condition)
    severity_reason: str | None = None
    #: root causes the engine may link (the rule's static causes and those its evidence names)
    cause_candidates: list[str] | None = field(default=None, repr=False, compare=False)
    #: evidence key -> (label, unit), attached by the engine from the rule's declarations
    evidence_fields: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.severity not in SEVERITIES:
            raise ValueError(f"severity must be one of {SEVERITIES}, not {self.severity!r}")
        c = float(self.confidence)
        self.confidence = 0.0 if not math.isfinite(c) else min(1.0, max(0.0, c))

    def to_json(self) -> dict[str, Any]:
        return {
            "rule": self.rule,
            "code": self.code,
            "severity": self.severity,
            "confidence": round(self.confidence, 3),
            "title": self.title,
            "message": self.message,
            "first_step": None if self.first_step is None else int(self.first_step),
            "layer": self.layer,
            "evidence": clean_number(self.evidence),
            "caused_by": list(self.caused_by),
            "recommendations": [r.to_json() for r in self.recommendations],
            "final": bool(self.final),
            "severity_reason": self.severity_reason,
        }


@dataclass
class SkippedRule:
    rule: str
    code: str
    reason: str

    def to_json(self) -> dict[str, str]:
        return {"rule": self.rule, "code": self.code, "reason": self.reason}


@dataclass
class Report:
    """The result of analyzing a run."""

    source: dict[str, Any]
    summary: dict[str, Any]
    findings: list[Finding] = field(default_factory=list)
    suggested_hyperparameters: dict[str, Any] = field(default_factory=dict)
    skipped_rules: list[SkippedRule] = field(default_factory=list)
    runlog: Any = field(default=None, repr=False, compare=False)

    @property
    def errors(self) -> list[Finding]:
        return [f for f in self.findings if f.severity == "error"]

    @property
    def warnings(self) -> list[Finding]:
        return [f for f in self.findings if f.severity == "warning"]

    def finding(self, rule: str) -> Finding | None:
        """The first finding of ``rule`` (slug or code), or None."""
        for f in self.findings:
            if rule in (f.rule, f.code):
                return f
        return None

    def worst(self) -> str | None:
        if not self.findings:
            return None
        return min((f.severity for f in self.findings), key=SEVERITY_RANK.__getitem__)

    def fails(self, fail_on: str) -> bool:
        """True if a finding is at or above ``fail_on`` (``error``, ``warning``, ``never``)."""
        if fail_on == "never":
            return False
        limit = SEVERITY_RANK[fail_on]
        return any(SEVERITY_RANK[f.severity] <= limit for f in self.findings)

    def to_json(self) -> dict[str, Any]:
        """The JSON report (``gradprobe/schemas/report.schema.json``) as a dict; ``json.dumps``
        it for the text form."""
        return {
            "schema": REPORT_SCHEMA,
            "source": clean_number(self.source),
            "summary": clean_number(self.summary),
            "findings": [f.to_json() for f in self.findings],
            "suggested_hyperparameters": clean_number(self.suggested_hyperparameters),
            "skipped_rules": [s.to_json() for s in self.skipped_rules],
        }

    def render(self, fmt: str = "text", **kwargs: Any) -> str:
        from gradprobe.render import render

        return render(self, fmt, **kwargs)

    def to_markdown(self) -> str:
        return self.render("markdown")

    def __str__(self) -> str:
        return self.render("text")
