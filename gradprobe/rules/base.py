"""Rules: one unit per diagnosis, in one registry (ruff's shape).

Each rule is a class with a code, a slug, a severity, the signals it requires, the
hyperparameters it computes (with their formulas), a structured :class:`Explanation` and a
``check`` over a :class:`~gradprobe.analysis.RunContext` that returns structured
:class:`~gradprobe.report.Finding` objects. The class docstring states every threshold with
its justification and how ``confidence`` is computed: a rule is judged on runs it has never
seen, so thresholds come from the mechanics of training, not from a sample run.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Iterable

from gradprobe.report import Finding, Recommendation

if TYPE_CHECKING:
    from gradprobe.analysis import RunContext


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


class Rule(abc.ABC):
    """Base class. Subclasses set the class attributes and implement :meth:`check`."""

    code: ClassVar[str]
    slug: ClassVar[str]
    severity: ClassVar[str] = "warning"
    title: ClassVar[str]
    #: signals the rule needs (see :mod:`gradprobe.signals`); missing -> skipped, and said so.
    #: An entry ``"a|b"`` is met by either signal.
    requires: ClassVar[tuple[str, ...]] = ()
    #: slugs of root causes this symptom may follow from; the engine links those present
    causes: ClassVar[tuple[str, ...]] = ()
    #: canonical hyperparameter -> the formula the rule uses to compute it
    computes: ClassVar[dict[str, str]] = {}
    explanation: ClassVar[Explanation]

    @abc.abstractmethod
    def check(self, ctx: "RunContext") -> list[Finding]:
        """The rule's findings on ``ctx`` (empty when it does not fire)."""

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
        caused_by: Iterable[str] = (),
    ) -> Finding:
        return Finding(
            rule=self.slug,
            code=self.code,
            severity=severity or self.severity,
            confidence=confidence,
            title=title or self.title,
            message=message,
            first_step=None if first_step is None else int(first_step),
            layer=layer,
            evidence=dict(evidence or {}),
            caused_by=list(caused_by),
            recommendations=list(recommendations),
        )

    @classmethod
    def describe(cls) -> dict[str, Any]:
        """The rule's catalog entry (``gradprobe rules --format json``)."""
        ex = cls.explanation
        return {
            "code": cls.code,
            "slug": cls.slug,
            "severity": cls.severity,
            "title": cls.title,
            "requires": list(cls.requires),
            "causes": list(cls.causes),
            "computes": dict(cls.computes),
            "what": ex.what,
            "why": ex.why,
            "causes_text": ex.causes,
            "fix": ex.fix,
            "example": ex.example,
            "thresholds": (cls.__doc__ or "").strip(),
        }


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
    """All rules, ordered by code."""
    import gradprobe.rules  # noqa: F401 - imports every family, filling the registry

    return [_REGISTRY[c] for c in sorted(_REGISTRY)]


def get_rule(name: str) -> type[Rule] | None:
    """A rule by code (``GP201``) or slug (``overclipping``)."""
    for cls in registry():
        if name.lower() in (cls.code.lower(), cls.slug):
            return cls
    return None
