"""Rules: one unit per diagnosis, in one registry (ruff's shape).

Each rule is a class with a code, a slug, the signals it requires, the root causes its symptom
may follow from, the severities it can take and when, whether a finding of it is *final*
(further training cannot undo it), the hyperparameters it computes (with their formulas), the
label and unit of every evidence field, a structured :class:`Explanation`, and a ``check`` over
a :class:`~gradprobe.analysis.RunContext` that returns structured findings. The class docstring
states every threshold with its justification and how ``confidence`` is computed: a rule is
judged on runs it has never seen, so thresholds come from the mechanics of training.

A rule module imports the quantities layer (:mod:`gradprobe.analysis`) and this module, never
another rule: causation is the engine's (a rule names which causes its evidence points to with
``finding(may_follow=...)``; the engine links the ones present in the report).
"""

from __future__ import annotations

import abc
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Iterable

from gradprobe.report import Finding, Recommendation

if TYPE_CHECKING:
    from gradprobe.analysis import RunContext

__all__ = ["CrossRankRule", "Explanation", "Field", "Finding", "Recommendation", "Rule", "RuleDeclarationError",
           "get_rule", "register", "registry"]


class RuleDeclarationError(ValueError):
    """A finding that does not match its rule's declarations (an undeclared severity, cause,
    final flag or evidence field): a bug in the rule, raised in strict mode (the test suite)."""


#: Strict mode: a finding that strays from its rule's declarations raises (the tests set it).
#: Outside it, an undeclared evidence field is printed under its raw name.
STRICT = os.environ.get("GRADPROBE_STRICT_RULES", "") not in ("", "0")


@dataclass(frozen=True)
class Explanation:
    """What ``gradprobe rules SLUG`` prints, in fixed sections."""

    what: str
    why: str
    causes: str
    fix: str
    example: str

    SECTIONS: ClassVar[tuple[tuple[str, str], ...]] = (
        ("what", "What it detects"),
        ("why", "Why it matters"),
        ("causes", "Typical causes"),
        ("fix", "Fix"),
        ("example", "Example"),
    )


@dataclass(frozen=True)
class Field:
    """An evidence field as people read it: a short label and its unit.

    Units: ``""`` (a plain number or text), ``"step"`` (a step index), ``"steps"`` (a count of
    steps), ``"x"`` (a ratio or factor), ``"%"`` (a fraction in [0, 1], printed as a
    percentage), ``"bytes"`` (printed in KiB/MiB/GiB), ``"s"`` (seconds), ``"decades"``,
    ``"halvings"``, ``"nats"``, or a physical quantity's name (``"lr"``, ``"norm"``,
    ``"scale"``, ``"loss"``) printed as a number."""

    label: str
    unit: str = ""


class Rule(abc.ABC):
    """A diagnosis over one run. Subclasses set the class attributes and implement :meth:`check`."""

    code: ClassVar[str]
    slug: ClassVar[str]
    #: the severity a finding has unless the rule escalates or lowers it (see ``severities``)
    severity: ClassVar[str] = "warning"
    #: every severity the rule can give -> when (the catalog prints this; a finding with another
    #: severity is a declaration error). Empty: only ``severity``, always.
    severities: ClassVar[dict[str, str]] = {}
    title: ClassVar[str]
    #: signals the rule needs (see :mod:`gradprobe.signals`); missing -> skipped, and said so.
    #: An entry ``"a|b"`` is met by either signal.
    requires: ClassVar[tuple[str, ...]] = ()
    #: root causes this symptom may follow from: linked by the engine whenever they are in the
    #: report and started no later
    causes: ClassVar[tuple[str, ...]] = ()
    #: root causes linked only when a finding's own evidence points to them
    #: (``finding(may_follow=...)``), e.g. a NaN linked to the learning rate only when the loss
    #: had risen right before it
    causes_on_evidence: ClassVar[tuple[str, ...]] = ()
    #: when a finding is final (further training cannot undo it), or "" when it never is
    final_when: ClassVar[str] = ""
    #: canonical hyperparameter -> the formula the rule uses to compute it
    computes: ClassVar[dict[str, str]] = {}
    #: evidence key -> label and unit (every key a finding's evidence may hold)
    evidence_fields: ClassVar[dict[str, Field]] = {}
    explanation: ClassVar[Explanation]

    @abc.abstractmethod
    def check(self, ctx: "RunContext") -> list[Finding]:
        """The rule's findings on ``ctx`` (empty when it does not fire)."""

    @classmethod
    def all_severities(cls) -> dict[str, str]:
        return dict(cls.severities) or {cls.severity: "always"}

    def finding(
        self,
        *,
        confidence: float,
        message: str,
        first_step: int | None = None,
        layer: str | None = None,
        evidence: dict[str, Any] | None = None,
        recommendations: Iterable[Recommendation] = (),
        severity: str | None = None,
        title: str | None = None,
        may_follow: Iterable[str] = (),
        final: bool = False,
    ) -> Finding:
        """A finding of this rule. ``may_follow``: causes from ``causes_on_evidence`` that this
        finding's evidence points to (the engine links them when present). ``final``: further
        training cannot undo it (only for rules that declare ``final_when``)."""
        sev = severity or self.severity
        evidence = dict(evidence or {})
        follow = list(dict.fromkeys(may_follow))
        problems = []
        if sev not in self.all_severities():
            problems.append(f"severity {sev!r} not declared")
        if [c for c in follow if c not in self.causes_on_evidence and c not in self.causes]:
            problems.append(f"causes {follow} not declared")
        if final and not self.final_when:
            problems.append("final without final_when")
        undeclared = [k for k in evidence if k not in self.evidence_fields]
        if undeclared:
            problems.append(f"evidence fields {undeclared} not declared")
        if problems and STRICT:
            raise RuleDeclarationError(f"{self.code} {self.slug}: " + "; ".join(problems))
        f = Finding(
            rule=self.slug,
            code=self.code,
            severity=sev,
            confidence=confidence,
            title=title or self.title,
            message=message,
            first_step=None if first_step is None else int(first_step),
            layer=layer,
            evidence=evidence,
            recommendations=list(recommendations),
            final=bool(final) and bool(self.final_when),
        )
        f.cause_candidates = list(dict.fromkeys([*self.causes, *follow]))
        if sev != self.severity:
            f.severity_reason = self.all_severities().get(sev)
        return f

    @classmethod
    def describe(cls) -> dict[str, Any]:
        """The rule's catalog entry (``gradprobe rules --format json``)."""
        ex = cls.explanation
        return {
            "code": cls.code,
            "slug": cls.slug,
            "severity": cls.severity,
            "severities": cls.all_severities(),
            "title": cls.title,
            "kind": "ranks" if issubclass(cls, CrossRankRule) else "run",
            "requires": list(cls.requires),
            "causes": list(cls.causes),
            "causes_on_evidence": list(cls.causes_on_evidence),
            "final_when": cls.final_when or None,
            "computes": dict(cls.computes),
            "evidence_fields": {k: {"label": v.label, "unit": v.unit} for k, v in cls.evidence_fields.items()},
            "what": ex.what,
            "why": ex.why,
            "causes_text": ex.causes,
            "fix": ex.fix,
            "example": ex.example,
            "thresholds": (cls.__doc__ or "").strip(),
        }


class CrossRankRule(Rule):
    """A diagnosis across the ranks of one distributed run: :meth:`check_ranks` compares the
    ranks' contexts. It does not run on a single run (its ``check`` is never called)."""

    requires: ClassVar[tuple[str, ...]] = ("ranks",)

    def check(self, ctx: "RunContext") -> list[Finding]:  # pragma: no cover - the engine never calls it
        raise TypeError(f"{self.code} compares ranks: use check_ranks")

    @abc.abstractmethod
    def check_ranks(self, ranks: dict[int, "RunContext"]) -> list[Finding]:
        """The rule's findings across the ranks' contexts (rank -> context)."""


_REGISTRY: dict[str, type[Rule]] = {}


def register(cls: type[Rule]) -> type[Rule]:
    """Class decorator adding a rule to the registry (one code, one slug)."""
    for other in _REGISTRY.values():
        if other.slug == cls.slug and other is not cls:
            raise ValueError(f"duplicate rule slug {cls.slug}")
    if cls.code in _REGISTRY and _REGISTRY[cls.code] is not cls:
        raise ValueError(f"duplicate rule code {cls.code}")
    _REGISTRY[cls.code] = cls
    return cls


def registry() -> list[type[Rule]]:
    """All rules (one-run and cross-rank), ordered by code."""
    import gradprobe.rules  # noqa: F401 - imports every family, filling the registry

    return [_REGISTRY[c] for c in sorted(_REGISTRY)]


def run_rules() -> list[type[Rule]]:
    """The rules that judge one run."""
    return [c for c in registry() if not issubclass(c, CrossRankRule)]


def rank_rules() -> list[type[CrossRankRule]]:
    """The rules that compare the ranks of a distributed run."""
    return [c for c in registry() if issubclass(c, CrossRankRule)]


def get_rule(name: str) -> type[Rule] | None:
    """A rule by code (``GP201``) or slug (``overclipping``)."""
    for cls in registry():
        if name.lower() in (cls.code.lower(), cls.slug):
            return cls
    return None
