"""The calibration corpus's labels (``benchmarks/corpus/labels.json``, ``programs.json``) and
the corpus benchmark's scoring, without analyzing anything.

The logs the labels describe live outside the project (``$GRADPROBE_CORPUS``, see
``benchmarks/corpus.py``); the checks that need their manifest are skipped where it is absent.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CORPUS_DIR = os.path.join(ROOT, "benchmarks", "corpus")
LABELS = os.path.join(CORPUS_DIR, "labels.json")
PROGRAMS = os.path.join(CORPUS_DIR, "programs.json")
SCHEMA = "gradprobe.corpus-labels/1"
LABEL_KINDS = ("healthy", "faulty", "unclear")
#: Catalog slugs labels may name before their rule is registered (GP507 is being added).
PENDING_SLUGS = frozenset({"unbounded-loss"})


def _bench():
    """benchmarks/corpus.py as a module (benchmarks/ is not a package)."""
    spec = importlib.util.spec_from_file_location("corpus_bench", os.path.join(ROOT, "benchmarks", "corpus.py"))
    mod = importlib.util.module_from_spec(spec)
    sys.modules["corpus_bench"] = mod
    spec.loader.exec_module(mod)
    return mod


def _no_duplicate_keys(pairs):
    keys = [k for k, _ in pairs]
    dup = sorted({k for k in keys if keys.count(k) > 1})
    assert not dup, f"labelled more than once: {dup}"
    return dict(pairs)


def _load(path):
    with open(path, encoding="utf-8") as f:
        return json.load(f, object_pairs_hook=_no_duplicate_keys)


def _label_files():
    return [p for p in (LABELS, PROGRAMS) if os.path.exists(p)]


def _split_of(key: str) -> str:
    return "tune" if int(hashlib.sha256(key.encode()).hexdigest()[:8], 16) % 2 == 0 else "check"


def _manifest():
    corpus = os.environ.get("GRADPROBE_CORPUS") or os.path.join(os.path.dirname(ROOT), "shared", "corpus", "logs")
    path = os.path.join(corpus, "MANIFEST.json")
    if not os.path.isfile(path):
        pytest.skip(f"the shared corpus is not at {corpus}")
    with open(path, encoding="utf-8") as f:
        return {e["id"]: e for e in json.load(f)}


@pytest.fixture(scope="module")
def slugs():
    from gradprobe.rules import registry

    return {rule.slug for rule in registry()} | PENDING_SLUGS


@pytest.mark.parametrize("path", _label_files(), ids=os.path.basename)
def test_label_file_schema(path, slugs):
    doc = _load(path)
    assert doc["schema"] == SCHEMA
    assert "even -> tune" in doc["split_rule"]
    assert isinstance(doc["items"], dict) and doc["items"]
    for item_id, e in doc["items"].items():
        where = f"{os.path.basename(path)}:{item_id}"
        assert e["label"] in LABEL_KINDS, where
        assert isinstance(e["evidence"], str) and len(e["evidence"]) >= 20, where
        assert e["split"] in ("tune", "check"), where
        assert e["split"] == _split_of(e["split_key"]), f"{where}: split is not the hash rule's"
        if e["label"] == "faulty":
            assert e["expected"] and e["roots"], where
            assert set(e["roots"]) <= set(e["expected"]), f"{where}: a root that is not expected"
            assert set(e["expected"]) <= slugs, f"{where}: not catalog slugs {set(e['expected']) - slugs}"
        else:
            assert not e.get("expected") and not e.get("roots"), where
        if e["label"] == "unclear":
            assert e.get("why_unclear"), where
    for r in doc["removed"]:
        assert r["id"] in doc["items"] and r["reason"], r


def test_every_shared_log_labelled_once_with_its_repository_split():
    manifest = _manifest()
    doc = _load(LABELS)
    removed = {r["id"] for r in doc["removed"]}
    assert set(doc["items"]) == set(manifest), (
        f"unlabelled: {sorted(set(manifest) - set(doc['items']))}; "
        f"unknown: {sorted(set(doc['items']) - set(manifest))}")
    for item_id, e in doc["items"].items():
        if item_id in removed:
            continue
        # sibling runs of one repository share its split: the key is the repository
        assert e["split_key"] == manifest[item_id]["repo"].lower(), item_id
        assert e["split"] == _split_of(manifest[item_id]["repo"].lower()), item_id


def test_programs_are_keyed_by_their_id_and_exist():
    if not os.path.exists(PROGRAMS):
        pytest.skip("no programs.json yet")
    for item_id, e in _load(PROGRAMS)["items"].items():
        assert e["split_key"] == item_id, item_id
        assert os.path.isfile(os.path.join(CORPUS_DIR, "programs", f"{item_id}.py")), item_id
    assert not set(_load(PROGRAMS)["items"]) & set(_load(LABELS)["items"]), "an id used by a log and a program"


def _finding(slug, code, severity):
    return {"rule": slug, "code": code, "severity": severity}


def _report(*findings):
    return {"findings": [_finding(*f) for f in findings]}


def test_scoring_counts_silence_detection_root_first_and_rules():
    bench = _bench()
    healthy = {"label": "healthy", "split": "tune"}
    lr = {"label": "faulty", "split": "tune", "expected": ["lr-too-high", "loss-spike"], "roots": ["lr-too-high"]}
    plateau = {"label": "faulty", "split": "tune", "expected": ["loss-plateau"], "roots": ["loss-plateau"]}
    results = [
        bench.make_result("quiet", "program", healthy, _report(("mixed-precision-active", "GP304", "info"))),
        bench.make_result("alarm", "lightning-csv", healthy, _report(("loss-spike", "GP504", "warning"))),
        bench.make_result("refused", "tensorboard", healthy, None, error="LogError: no loss tag"),
        # detected, root first (the info finding before it does not count)
        bench.make_result("root", "program", lr, _report(("dead-units", "GP605", "info"),
                                                         ("lr-too-high", "GP501", "error"),
                                                         ("loss-spike", "GP504", "warning"))),
        # detected through a symptom, but the first finding is not a root
        bench.make_result("symptom", "program", lr, _report(("loss-spike", "GP504", "warning"),
                                                            ("input-scale", "GP601", "warning"))),
        bench.make_result("missed", "hf-trainer-state", plateau, _report(("overfitting", "GP506", "warning"))),
        bench.make_result("unclear", "program", {"label": "unclear", "split": "tune"},
                          _report(("loss-spike", "GP504", "error"))),
        bench.make_result("fault-refused", "mlflow", plateau, None, error="LogError: unknown format"),
    ]
    s = bench.score(results)
    assert (s.healthy_silent, s.healthy) == (1, 3)
    assert (s.faulty_detected, s.faulty) == (2, 4)
    assert s.root_first == 1
    assert (s.unclear, s.errors) == (1, 2)
    assert s.line("tune") == "corpus tune: healthy-silent 1/3 faulty-detected 2/4 root-first 1/4"
    spike, high, plat, over, scale = (s.rules[k] for k in
                                      ("loss-spike", "lr-too-high", "loss-plateau", "overfitting", "input-scale"))
    assert (spike.code, spike.tp, spike.fp, spike.extra, spike.miss) == ("GP504", 2, 1, 0, 0)
    assert (high.tp, high.miss) == (1, 1)
    assert (plat.tp, plat.miss) == (0, 2)
    assert (over.extra, scale.extra) == (1, 1)
    assert "dead-units" not in s.rules and "mixed-precision-active" not in s.rules  # info is not scored
    text = "\n".join(s.failures)
    assert "ALARM  alarm [healthy, lightning-csv]: loss-spike(warning)" in text
    assert "ERROR  refused" in text and "ERROR  fault-refused" in text
    assert "MISSED missed [faulty, hf-trainer-state]: expected loss-plateau; fired overfitting(warning)" in text
    assert "ROOT   symptom [faulty, program]: first finding loss-spike, roots lr-too-high" in text
    assert not any(line.split()[1] in ("quiet", "root", "unclear") for line in s.failures)


def test_benchmark_without_the_shared_corpus_says_so_and_exits_2(tmp_path):
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "corpus.py"), "--corpus",
                           str(tmp_path / "absent")], check=False, capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "no shared corpus" in proc.stderr
