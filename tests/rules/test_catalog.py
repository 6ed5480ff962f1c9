"""The catalog is correct by construction: generated from the rules, declarations complete and
consistent, and the rule modules keep to their layer (they import the quantities layer and the
rule base, never each other; no rule runs another rule's check)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

from gradprobe.report import CANONICAL_HYPERPARAMETERS, SEVERITIES
from gradprobe.rules.base import CrossRankRule, Field, Rule, registry
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
