"""The catalog is correct by construction: generated from the rules, declarations complete and
consistent, and the rule modules keep to their layer (they import the quantities layer and the
rule base, never each other; no rule runs another rule's check)."""

from __future__ import annotations

import ast
import math
import subprocess
import sys
from pathlib import Path

import pytest

from gradprobe.report import CANONICAL_HYPERPARAMETERS, SEVERITIES
from gradprobe.rules.base import Confidence, CrossRankRule, Field, Flag, Product, Ramp, Rule, registry
from gradprobe.rules.catalog import docs_text, readme_table

ROOT = Path(__file__).resolve().parents[2]
RULES_DIR = ROOT / "gradprobe" / "rules"
#: modules of gradprobe.rules that hold no rule: the base, the catalog, shared snippet text
NOT_RULE_MODULES = {"__init__", "base", "catalog", "snippets"}
ALLOWED_GRADPROBE_IMPORTS = ("gradprobe.analysis", "gradprobe.rules.base", "gradprobe.rules.snippets")


def _rule_modules() -> list[Path]:
    return sorted(p for p in RULES_DIR.glob("*.py") if p.stem not in NOT_RULE_MODULES)


@pytest.mark.parametrize("path", _rule_modules(), ids=lambda p: p.stem)
def test_a_rule_module_imports_only_the_quantities_layer_and_the_rule_base(path: Path):
    tree = ast.parse(path.read_text(encoding="utf-8"))
    for node in ast.walk(tree):
        names = []
        if isinstance(node, ast.ImportFrom) and node.module:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            mod = node.module
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
            mod = names[0]
        else:
            continue
        if not mod.startswith("gradprobe"):
            continue
        assert mod.startswith(ALLOWED_GRADPROBE_IMPORTS), f"{path.name} imports {mod}"
        assert not any(n.startswith("gradprobe.rules.") and n.split(".")[2] not in NOT_RULE_MODULES for n in names), \
            f"{path.name} imports another rule module: {names}"


def test_no_rule_calls_another_rules_check():
    for path in _rule_modules():
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in (
                    "check", "check_ranks"):
                raise AssertionError(f"{path.name}:{node.lineno} calls .{node.func.attr}()")
    grep = subprocess.run(["grep", "-rnE", r"(get_rule|registry)\(", *map(str, _rule_modules())],
                          capture_output=True, text=True)
    assert grep.stdout == "", f"a rule module looks rules up: {grep.stdout}"


def test_declarations_are_complete_and_consistent():
    slugs = {cls.slug for cls in registry()}
    for cls in registry():
        assert cls.code.startswith("GP") and cls.slug and cls.title, cls
        sevs = cls.all_severities()
        assert cls.severity in sevs and set(sevs) <= set(SEVERITIES), cls.code
        assert all(when.strip() for when in sevs.values()), cls.code
        assert set(cls.causes) <= slugs and set(cls.causes_on_evidence) <= slugs, cls.code
        assert cls.slug not in cls.causes and cls.slug not in cls.causes_on_evidence, cls.code
        assert not set(cls.causes) & set(cls.causes_on_evidence), f"{cls.code}: a cause declared twice"
        assert set(cls.computes) <= set(CANONICAL_HYPERPARAMETERS), cls.code
        assert all(isinstance(f, Field) and f.label.strip() for f in cls.evidence_fields.values()), cls.code
        assert cls.evidence_fields, f"{cls.code} declares no evidence fields"
        assert isinstance(cls.final_when, str)
        if issubclass(cls, CrossRankRule):
            assert "ranks" in cls.requires
        else:
            assert issubclass(cls, Rule) and cls.check is not Rule.check


def test_docs_rules_md_is_generated_and_current():
    current = (ROOT / "docs" / "rules.md").read_text(encoding="utf-8")
    assert current == docs_text(), "run: python -m gradprobe.rules.catalog --readme README.md --docs docs/rules.md"


def test_catalog_check_mode_reports_staleness(tmp_path):
    readme = tmp_path / "README.md"
    from gradprobe.rules.catalog import README_BEGIN, README_END

    readme.write_text(f"x\n{README_BEGIN}\n| old |\n{README_END}\n", encoding="utf-8")
    docs = tmp_path / "rules.md"
    docs.write_text("old", encoding="utf-8")
    cmd = [sys.executable, "-m", "gradprobe.rules.catalog", "--readme", str(readme), "--docs", str(docs)]
    r = subprocess.run([*cmd, "--check"], capture_output=True, text=True)
    assert r.returncode == 1 and "stale" in r.stderr
    assert subprocess.run(cmd, capture_output=True, text=True).returncode == 0
    assert subprocess.run([*cmd, "--check"], capture_output=True, text=True).returncode == 0
    assert readme_table().strip() in readme.read_text(encoding="utf-8")
    assert docs.read_text(encoding="utf-8") == docs_text()


def test_the_report_states_an_escalation_and_a_final_finding():
    import json

    from gradprobe.report import Report
    from gradprobe.rules.base import RuleDeclarationError, get_rule

    rule = get_rule("GP101")()
    f = rule.finding(confidence=0.9, message="m", severity="warning", final=False,
                     evidence={"max_state_age": 3})
    assert f.severity_reason == rule.severities["warning"]
    g = rule.finding(confidence=0.9, message="m", final=True)
    assert g.severity_reason is None and g.final
    report = Report(source={"path": "x", "kind": "gradprobe", "steps": 1}, summary={}, findings=[f, g])
    text = report.render("text")
    assert f"warning because {rule.severities['warning']}" in " ".join(text.split())
    assert "final: further training cannot undo it" in text
    assert "warning because" in report.render("markdown")
    js = json.loads(json.dumps(report.to_json()))
    assert js["findings"][0]["severity_reason"] == rule.severities["warning"] and js["findings"][1]["final"] is True
    with pytest.raises(RuleDeclarationError):
        rule.finding(confidence=0.9, message="m", severity="info")  # GP101 never gives info
    with pytest.raises(RuleDeclarationError):
        rule.finding(confidence=0.9, message="m", evidence={"not_declared": 1})
    with pytest.raises(RuleDeclarationError):
        get_rule("GP504")().finding(confidence=0.9, message="m", final=True)  # a spike is never final


#: Numbers a rule function may write as literals: 0, 1, -1 (the unary minus is its own node),
#: 2, 0.5 as "half", 100 for percent. Every other number is a named constant with its reason.
PLAIN_NUMBERS = {0, 1, 2, 0.5, 100}
#: ... and a floor that only guards a division or a log: ``max(x, 1e-300)``, ``np.maximum(x, 1e-12)``.
GUARDS = {1e-300, 1e-12}
GUARD_CALLS = {"max", "maximum", "fmax"}


def _literal_problems(path: Path) -> list[str]:
    """``file:line: value`` for each numeric literal inside a function (or lambda) of ``path``
    that is not plain (``PLAIN_NUMBERS``), a guard inside ``max()`` (``GUARDS``), a slice bound
    (how many items a message or an evidence list shows: ``names[:20]``), the digits of
    ``round()`` or the 10 of ``10 ** decades`` (decades back to a factor)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    allowed: set[int] = set()  # ids of Constant nodes whose place makes them display-only or guards
    for node in ast.walk(tree):
        if isinstance(node, ast.Slice):
            allowed |= {id(b) for b in (node.lower, node.upper, node.step) if isinstance(b, ast.Constant)}
        elif isinstance(node, ast.BinOp) and isinstance(node.op, ast.Pow) and isinstance(node.left, ast.Constant) \
                and node.left.value == 10:
            allowed.add(id(node.left))
        elif isinstance(node, ast.Call):
            name = node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", "")
            if name == "round" and len(node.args) == 2:
                allowed.add(id(node.args[1]))
            if name in GUARD_CALLS:
                allowed |= {id(a) for a in node.args if isinstance(a, ast.Constant) and a.value in GUARDS}
    out: dict[int, str] = {}
    for fn in ast.walk(tree):
        if not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            continue
        for node in ast.walk(fn):
            if (isinstance(node, ast.Constant) and isinstance(node.value, (int, float))
                    and not isinstance(node.value, bool) and node.value not in PLAIN_NUMBERS
                    and id(node) not in allowed):
                out[id(node)] = f"{path.relative_to(ROOT)}:{node.lineno}: {node.value!r}"
    return sorted(set(out.values()), key=lambda s: (s.split(":")[0], int(s.split(":")[1])))


def test_rule_functions_name_their_thresholds():
    """Thresholds and confidence weights are named constants with their reasons, never numbers
    inside ``check``: every rule module and the base (the catalog and the snippets too, which
    hold text and no numbers)."""
    problems = [p for path in sorted(RULES_DIR.glob("*.py")) for p in _literal_problems(path)]
    assert not problems, f"{len(problems)} numeric literals inside rule functions:\n" + "\n".join(problems)


#: rules whose confidence the quantities layer computes (GP302's triggers, in
#: ``gradprobe.analysis.amp.OverflowTriggers``): their docstring states it
CONFIDENCE_FROM_ANALYSIS = {"GP302"}


def test_every_rule_declares_its_confidence_and_the_catalog_prints_it():
    for cls in registry():
        if cls.code in CONFIDENCE_FROM_ANALYSIS:
            assert cls.confidence is None and "Confidence" in (cls.__doc__ or ""), cls.code
            continue
        formulas = cls.confidence_formulas()
        assert formulas, f"{cls.code} declares no confidence"
        text = cls.thresholds_text()
        assert all(f.describe() in text for _, f in formulas), cls.code
        assert [c["formula"] for c in cls.describe()["confidence"]] == [f.describe() for _, f in formulas]
    assert "Confidence = 0.6 + 0.2 x min(1, bad steps observed / 3) + 0.2 if" in docs_text()


def test_a_confidence_computes_what_it_describes():
    c = Confidence(0.6, Ramp(0.2, "bad steps", span=3), Flag(0.2, "corroborated"))
    assert c.describe() == "0.6 + 0.2 x min(1, bad steps / 3) + 0.2 if corroborated"
    assert (c(0, False), c(3, True), c(30, False)) == (0.6, 1.0, 0.6 + 0.2)
    spikes = Confidence(0.5, Ramp(0.5, "ratio", start=10.0, span=2.0, log=True))
    assert spikes.describe() == "0.5 + 0.5 x min(1, log10(ratio / 10) / 2)"
    assert [spikes(v) for v in (10.0, 100.0, 1e3, 1e9, math.inf, 5.0, 0.0, math.nan)] == [0.5, 0.75, 1, 1, 1, 0.5, 0.5, 0.5]
    headroom = Confidence(0.5, Ramp(0.4, "headroom", span=10.0, falling=True))
    assert headroom.describe() == "0.5 + 0.4 x max(0, 1 - headroom / 10)"
    assert (headroom(0.0), headroom(10.0), headroom(20.0)) == (0.9, 0.5, 0.5)
    capped = Confidence(0.5, Ramp(0.1, "decades", clip=False), cap=0.8)
    assert capped.describe() == "0.5 + 0.1 x decades, at most 0.8"
    assert (capped(2.0), capped(9.0)) == (0.5 + 0.1 * 2.0, 0.8)
    either = Confidence(0.5, Flag(0.25, "still falling", otherwise=0.1))
    assert either.describe() == "0.5 + (0.25 if still falling, else 0.1)" and (either(True), either(False)) == (0.75, 0.6)
    count = Confidence(0.7, Ramp(0.3, "events", span=3))
    product = spikes * count
    assert isinstance(product, Product) and product(1e3, 3) == 1.0 and product(10.0, 0) == 0.5 * 0.7
    assert product.describe() == "(0.5 + 0.5 x min(1, log10(ratio / 10) / 2)) x (0.7 + 0.3 x min(1, events / 3))"
    mean = Product((spikes, count), geometric=True)
    assert mean(10.0, 0) == (0.5 * 0.7) ** 0.5 and mean.describe().startswith("the geometric mean of (0.5 + ")
    with pytest.raises(TypeError):
        c(1)
    with pytest.raises(ValueError):
        Ramp(0.5, "ratio", log=True)  # a log scale needs a start above 0
