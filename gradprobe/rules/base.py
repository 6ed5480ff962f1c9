"""Rules: one unit per diagnosis, in one registry (ruff's shape).

Each rule is a class with a code, a slug, the signals it requires, the root causes its symptom
may follow from, the severities it can take and when, whether a finding of it is *final*
(further training cannot undo it), the hyperparameters it computes (with their formulas), the
label and unit of every evidence field, a structured :class:`Explanation`, how it computes a
finding's ``confidence`` (a :class:`Confidence`: a base and terms that saturate, each named
with what it measures), and a ``check`` over a :class:`~gradprobe.analysis.RunContext` that
returns structured findings. The class docstring states every threshold with its
justification and why the confidence is computed as it is; the catalog prints the formula
after it, generated from the declaration, so the two cannot drift. A rule is judged on runs it
has never seen, so thresholds come from the mechanics of training, and every number inside
``check`` is a named constant with its reason.

A rule module imports the quantities layer (:mod:`gradprobe.analysis`) and this module, never
another rule: causation is the engine's (a rule names which causes its evidence points to with
``finding(may_follow=...)``; the engine links the ones present in the report).
"""

from __future__ import annotations

import abc
import inspect
import math
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Iterable, Union

from gradprobe.report import Finding, Recommendation

if TYPE_CHECKING:
    from gradprobe.analysis import RunContext

__all__ = ["Confidence", "CrossRankRule", "Explanation", "Field", "Finding", "Flag", "Product", "Ramp", "Recommendation",
           "Rule", "RuleDeclarationError", "get_rule", "register", "registry"]


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


def _num(x: float) -> str:
    return f"{x:g}"


@dataclass(frozen=True)
class Ramp:
    """A term of a :class:`Confidence`: ``weight`` times how far a measured value has come from
    ``start`` towards the point where the term is whole, as a fraction clipped to [0, 1]:
    ``(value - start) / span``, or with ``log``, ``log10(value / start) / span`` (``span`` in
    decades; a value that is not positive adds nothing). ``falling``: 1 minus that, a term that
    shrinks as the value grows. ``clip=False`` keeps the fraction past either end, for a term
    that keeps growing (under a cap on the whole confidence) or can take confidence away. With
    the defaults the value is itself a fraction in [0, 1] (a share of steps, a persistence)."""

    weight: float
    measures: str
    span: float = 1.0
    start: float = 0.0
    log: bool = False
    falling: bool = False
    clip: bool = True

    def __post_init__(self) -> None:
        if self.span <= 0 or (self.log and self.start <= 0):
            raise ValueError(f"{self}: span must be > 0, and start > 0 on a log scale")

    def fraction(self, value: float) -> float:
        if self.log:
            if not value > 0:
                return 0.0
            r = math.log10(value / self.start) / self.span
        else:
            r = (value - self.start) / self.span
        if self.falling:
            r = 1.0 - r
        return max(0.0, min(1.0, r)) if self.clip else r

    def __call__(self, value: float) -> float:
        return self.weight * self.fraction(value)

    def describe(self) -> str:
        x = self.measures
        whole = f"({x})" if any(f" {op} " in x for op in "+-/") and not x.startswith("(") else x
        bare = False  # the measure as it stands, a fraction in [0, 1]
        if self.log:
            r = f"log10({x})" if self.start == 1 else f"log10({whole} / {_num(self.start)})"
        elif self.start:
            r = f"({whole} - {_num(self.start)})"
        else:
            r, bare = x, True
        if self.span != 1:
            r, bare = f"{whole if bare else r} / {_num(self.span)}", False
        if self.falling:
            r, bare = f"1 - {whole if bare else r}", False
        if self.clip and not bare:
            r = f"max(0, {r})" if self.falling else f"min(1, {r})"
        elif self.falling:
            r = f"({r})"
        if self.weight == 1:
            return r
        return f"{_num(self.weight)} x {whole if bare else r}"

    @property
    def most(self) -> float:
        """The most this term can add (unbounded when its fraction is not clipped and can grow)."""
        return self.weight if self.clip or self.falling else math.inf


@dataclass(frozen=True)
class Flag:
    """A term of a :class:`Confidence` that a condition adds whole (``weight``) or not at all
    (``otherwise``, usually 0)."""

    weight: float
    measures: str
    otherwise: float = 0.0

    def __call__(self, on: bool) -> float:
        return self.weight if on else self.otherwise

    @property
    def most(self) -> float:
        return max(self.weight, self.otherwise)

    def describe(self) -> str:
        if self.otherwise:
            return f"({_num(self.weight)} if {self.measures}, else {_num(self.otherwise)})"
        return f"{_num(self.weight)} if {self.measures}"


@dataclass(frozen=True, init=False)
class Confidence:
    """How a rule computes a finding's ``confidence``: ``base`` (what is certain about the
    measurement itself) plus each term (:class:`Ramp`, :class:`Flag`) in order, at most ``cap``.
    Called with one measured value per term, in the terms' order; :meth:`describe` is the
    formula as the catalog prints it, so the documented formula is the computed one.
    ``Confidence(a) * Confidence(b)`` multiplies two factors (:class:`Product`)."""

    base: float
    terms: tuple[Ramp | Flag, ...]
    cap: float

    def __init__(self, base: float, *terms: Ramp | Flag, cap: float = 1.0) -> None:
        object.__setattr__(self, "base", base)
        object.__setattr__(self, "terms", terms)
        object.__setattr__(self, "cap", cap)

    def __call__(self, *values: Any) -> float:
        if len(values) != len(self.terms):
            raise TypeError(f"{self.describe()}: {len(self.terms)} values, got {len(values)}")
        c = self.base
        for term, value in zip(self.terms, values):
            c = c + term(value)
        return min(self.cap, c)

    def __mul__(self, other: "Confidence | Product") -> "Product":
        return Product((self, *(other.factors if isinstance(other, Product) else (other,))))

    def describe(self) -> str:
        parts = [t.describe() for t in self.terms]
        if self.base or not parts:
            parts.insert(0, _num(self.base))
        text = " + ".join(parts)
        most = self.base + sum(t.most for t in self.terms)
        return f"{text}, at most {_num(self.cap)}" if most > self.cap else text


@dataclass(frozen=True)
class Product:
    """Confidence factors multiplied (each in [0, 1]: any weak factor weakens the whole), or
    with ``geometric``, their geometric mean (a weak factor weakens it less). Called with the
    factors' values one after the other."""

    factors: tuple[Confidence, ...]
    geometric: bool = False

    def __call__(self, *values: Any) -> float:
        if len(values) != sum(len(f.terms) for f in self.factors):
            raise TypeError(f"{self.describe()}: got {len(values)} values")
        c, i = 1.0, 0
        for f in self.factors:
            c = c * f(*values[i:i + len(f.terms)])
            i += len(f.terms)
        return c ** (1.0 / len(self.factors)) if self.geometric else c

    def __mul__(self, other: "Confidence | Product") -> "Product":
        return Product((*self.factors, *(other.factors if isinstance(other, Product) else (other,))))

    def describe(self) -> str:
        parts = [f"({f.describe()})" if len(f.terms) > 1 or f.base else f.describe() for f in self.factors]
        if self.geometric:
            return f"the geometric mean of {', '.join(parts[:-1])} and {parts[-1]}"
        return " x ".join(parts)


#: A confidence formula: a sum of terms, or a product of such sums.
Formula = Union[Confidence, Product]


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
    #: how ``confidence`` is computed: one formula, or form -> formula for a rule whose findings
    #: take several forms; the catalog prints each after the docstring. None only where the
    #: quantities layer computes it (the docstring then states how).
    confidence: ClassVar[Formula | dict[str, Formula] | None] = None

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
            "thresholds": cls.thresholds_text(),
            "confidence": [{"form": form or None, "formula": f.describe()} for form, f in cls.confidence_formulas()],
        }

    @classmethod
    def confidence_formulas(cls) -> list[tuple[str, Formula]]:
        """(form, formula) for each way the rule computes ``confidence`` (form "" when one)."""
        c = cls.confidence
        if c is None:
            return []
        return list(c.items()) if isinstance(c, dict) else [("", c)]

    @classmethod
    def thresholds_text(cls) -> str:
        """The docstring (thresholds, and why the confidence is computed as it is), then the
        confidence formulas generated from :attr:`confidence`."""
        out = [inspect.cleandoc(cls.__doc__ or "")]
        formulas = cls.confidence_formulas()
        if len(formulas) == 1 and not formulas[0][0]:
            out += ["", "Confidence = " + formulas[0][1].describe()]
        elif formulas:
            out += ["", "Confidence:"] + [f"* {form} = {f.describe()}" for form, f in formulas]
        return "\n".join(out)


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
