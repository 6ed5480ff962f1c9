"""Analyzing a log never runs anything from it, and reports never carry its markup.

* Crafted inputs (pickles whose loading would create a marker directory, as every file of a
  run directory and as every foreign format; an Arrow stream with a pickle-backed extension
  type; ``torch.save`` files; YAML and JSON "object" tags) are analyzed with ``pickle``,
  ``torch.load``, ``yaml``, ``marshal``, ``numpy.load``/``pandas.read_pickle``, ``eval`` and
  ``exec`` replaced by tripwires, and under a Python audit hook that records unpickling
  (``pickle.find_class``), code execution (``exec``, ``compile``, ``marshal.loads``) and
  process creation. The marker never appears, no tripwire fires.
* A source scan of ``gradprobe/`` and ``cli/``: no unpickling call anywhere, ``torch.load``
  only with ``weights_only=True``, ``exec``/``compile`` only where ``gradprobe run`` runs the
  user's own script.
* HTML reports escape every string that comes from a log: module, layer and scalar names,
  messages and the path carrying ``<script>``/``<img onerror>`` payloads render without a
  raw tag, inside the figures' JSON included.
"""

from __future__ import annotations

import ast
import builtins
import contextlib
import io
import json
import os
import pickle
import re
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from tests.robustness import fuzz as FZ
from tests.robustness import harness as H

PAYLOADS = ["<script>alert(1)</script>", "\"><img src=x onerror=alert(2)>", "</script><script>alert(3)</script>",
            "<svg onload=alert(4)>", "javascript:alert(5)//<b>bold</b>"]
RAW_TAGS = re.compile(r"<script>alert|<img src=x|<svg onload|</script><script>|<b>bold</b>", re.IGNORECASE)


# ------------------------------------------------------------------ crafted inputs ----
class _Boom:
    """Unpickling this creates the marker directory (``os.mkdir(marker)``)."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


def _pickle(marker: str, protocol: int = pickle.HIGHEST_PROTOCOL) -> bytes:
    return pickle.dumps({"loss": [1.0, 2.0], "boom": _Boom(marker)}, protocol=protocol)


def _arrow_with_pickled_extension(marker: str) -> bytes:
    """An Arrow IPC stream whose field claims pyarrow's legacy pickle-backed extension type
    (``arrow.py_extension_type``, CVE-2023-47248) with a payload that would run mkdir."""
    field = pa.field("step", pa.int64(), metadata={b"ARROW:extension:name": b"arrow.py_extension_type",
                                                    b"ARROW:extension:metadata": _pickle(marker)})
    schema = pa.schema([field, pa.field("loss", pa.float32())], metadata={b"pandas": json.dumps({
        "index_columns": [], "columns": [{"name": "step", "field_name": "step", "pandas_type": "object",
                                          "numpy_type": "object", "metadata": {"__reduce__": "os.system"}}]}).encode()})
    sink = io.BytesIO()
    with pa.ipc.new_stream(sink, schema) as w:
        w.write_batch(pa.record_batch([pa.array([0, 1, 2], pa.int64()), pa.array([1.0, 0.5, 0.2], pa.float32())], schema=schema))
    return sink.getvalue()


def _torch_save(marker: str) -> bytes:
    import torch

    buf = io.BytesIO()
    torch.save({"steps": _Boom(marker)}, buf)
    return buf.getvalue()


def _tfevents_with_pickle(marker: str) -> bytes:
    from tensorboard.compat.proto import event_pb2, summary_pb2

    meta = summary_pb2.SummaryMetadata(plugin_data=summary_pb2.SummaryMetadata.PluginData(plugin_name="scalars",
                                                                                          content=_pickle(marker)))
    ev = event_pb2.Event(step=1, wall_time=1.7e9, summary=summary_pb2.Summary(value=[
        summary_pb2.Summary.Value(tag="loss", metadata=meta, simple_value=1.0)]))
    return FZ._frame(event_pb2.Event(wall_time=1.7e9, file_version="brain.Event:2").SerializeToString()) + FZ._frame(ev.SerializeToString())


def crafted_inputs(root: Path) -> list[tuple[str, Path]]:
    """(what, path) for every crafted input; each would create ``root/PWNED-<n>`` if anything
    unpickled or executed it."""
    out: list[tuple[str, Path]] = []
    n = 0

    def marker() -> str:
        nonlocal n
        n += 1
        return str(root / f"PWNED-{n}")

    files = H.template_files()
    for name in H.RUN_FILES + ("tfevents",):
        for kind, make in (("pickle", _pickle), ("pickle-protocol0", lambda m: _pickle(m, 0)), ("torch.save", _torch_save)):
            d = root / f"run-{name}-{kind}"
            H.copy_template(str(d))
            (d / FZ._real_name(name)).write_bytes(make(marker()))
            out.append((f"{name} as {kind}", d))
    for name in ("steps.arrow", "samples.arrow", "scalars.arrow", "layers-0.arrow"):
        d = root / f"run-{name}-extension"
        H.copy_template(str(d))
        (d / name).write_bytes(_arrow_with_pickled_extension(marker()))
        out.append((f"{name} with a pickled extension type", d))
    d = root / "run-meta-tags"
    H.copy_template(str(d))
    meta = json.loads(files["gradprobe.json"])
    meta.update({"optimizers": [{"class": "!!python/object/apply:os.system", "param_groups": [{"lr": "__import__('os')"}]}],
                 "__reduce__": ["os", "mkdir"], "py/object": "os.system", "$type": "System.Diagnostics.Process"})
    (d / "gradprobe.json").write_text(json.dumps(meta))
    (d / "events.jsonl").write_text(json.dumps({"kind": "exception", "message": "!!python/object/apply:os.system ['id']",
                                                "py/reduce": [{"py/function": "os.mkdir"}, {"py/tuple": [marker()]}]}) + "\n")
    out.append(("object tags in gradprobe.json and events.jsonl", d))
    for k, (fname, data) in enumerate((("trainer_state.json", _pickle(marker())), ("metrics.csv", _pickle(marker(), 0)),
                        ("events.out.tfevents.1.h", _tfevents_with_pickle(marker())),
                        ("trainer_state.json", b"!!python/object/apply:os.mkdir ['" + marker().encode() + b"']\n"),
                        ("events.out.tfevents.2.h", _torch_save(marker())))):
        d = root / f"foreign-{k}"
        d.mkdir()
        (d / fname).write_bytes(data)
        out += [(f"{fname} crafted ({k})", d / fname), (f"directory with a crafted {fname} ({k})", d)]
    return out


# ------------------------------------------------------------------------ tripwires ----
class Tripwire(BaseException):
    """Not an Exception: ``gradprobe analyze``'s own error handling cannot swallow it."""


_AUDIT: dict[str, object] = {"armed": False, "events": []}
FORBIDDEN_EVENTS = ("pickle.find_class", "exec", "compile", "marshal.loads", "marshal.load", "os.system", "os.exec",
                    "os.posix_spawn", "os.spawn", "os.fork", "subprocess.Popen", "ctypes.dlopen", "builtins.input")


def _audit(event: str, args: tuple) -> None:
    if _AUDIT["armed"] and event.startswith(FORBIDDEN_EVENTS):
        _AUDIT["events"].append((event, repr(args)[:200]))  # type: ignore[union-attr]


_HOOKED = False


def _install_audit_hook() -> None:
    global _HOOKED
    if not _HOOKED:
        sys.addaudithook(_audit)  # audit hooks cannot be removed; it records only while armed
        _HOOKED = True


@contextlib.contextmanager
def tripwires(monkeypatch):
    """Every way of running or unpickling data replaced by a tripwire, and the audit hook
    armed. Use it after a warm-up pass over the same inputs: imports run module code
    (``exec``, ``marshal.loads``), and a lazily imported reader must not count."""
    fired: list[str] = []

    def wire(name: str):
        def tripped(*args, **kwargs):
            fired.append(name)
            raise Tripwire(name)

        return tripped

    import marshal

    import pandas as pd
    import torch

    try:
        import yaml
    except ImportError:  # pragma: no cover
        yaml = None
    _install_audit_hook()
    with monkeypatch.context() as mp:
        for owner, name in ((pickle, "load"), (pickle, "loads"), (pickle, "Unpickler"), (pickle, "_load"), (pickle, "_loads"),
                            (marshal, "load"), (marshal, "loads"), (torch, "load"), (np, "load"), (pd, "read_pickle"),
                            (builtins, "eval"), (builtins, "exec")):
            if hasattr(owner, name):
                mp.setattr(owner, name, wire(f"{owner.__name__}.{name}"))
        if yaml is not None:
            for name in ("load", "unsafe_load", "full_load", "load_all", "unsafe_load_all"):
                mp.setattr(yaml, name, wire(f"yaml.{name}"))
        _AUDIT["events"] = []
        _AUDIT["armed"] = True
        try:
            yield fired
        finally:
            _AUDIT["armed"] = False


def _check_crafted(tmp_path: Path, monkeypatch, *, every: int, formats: tuple[str, ...]) -> dict[str, int]:
    """Analyzes every ``every``-th crafted input once to warm up imports, then again with
    the tripwires armed, in ``formats``; returns the exit status of each."""
    inputs = crafted_inputs(tmp_path)
    assert len(inputs) >= 30
    chosen = inputs[::every]
    warm = {what: H.analyze_in_process(str(path), fmt).exit_code for what, path in chosen for fmt in formats}
    modules = set(sys.modules)
    results = {}
    with tripwires(monkeypatch) as fired:
        for what, path in chosen:
            for fmt in formats:
                results[what] = H.analyze_in_process(str(path), fmt).exit_code  # the contract holds too
        events = list(_AUDIT["events"])  # type: ignore[arg-type]
    assert not fired, f"tripwires fired: {fired} (new modules: {sorted(set(sys.modules) - modules)[:10]})"
    assert not events, f"forbidden operations during analysis: {events[:5]}"
    assert not list(tmp_path.glob("PWNED-*")), "a payload ran"
    assert results == warm
    return results


def test_crafted_inputs_are_never_unpickled_or_executed(tmp_path, monkeypatch):
    """A third of the crafted inputs (the slow tier: all, in every format)."""
    _check_crafted(tmp_path, monkeypatch, every=3, formats=("json",))


@pytest.mark.slow
def test_all_crafted_inputs_in_every_format(tmp_path, monkeypatch):
    results = _check_crafted(tmp_path, monkeypatch, every=1, formats=H.FORMATS)
    # a run directory with one crafted file still analyzes: the other files are read
    assert results["steps.arrow as pickle"] in (0, 1)
    assert results["gradprobe.json as pickle"] in (0, 1)


def test_the_tripwires_work(tmp_path, monkeypatch):
    """The harness itself: unpickling the payload trips the monkeypatch, and the C
    unpickler reached directly (bypassing the patched names) is seen by the audit hook."""
    import _pickle

    marker = tmp_path / "PWNED-selftest"
    data = pickle.dumps(_Boom(str(marker)))
    with tripwires(monkeypatch) as fired:
        with pytest.raises(Tripwire):
            pickle.loads(data)
        _pickle.loads(data)  # runs the payload: mkdir(marker)
        events = [e for e, _ in _AUDIT["events"]]  # type: ignore[misc]
    assert marker.is_dir()
    assert "pickle.find_class" in events
    assert fired == ["pickle.loads"]


# -------------------------------------------------------------------- source scan ----
#: (file, call) that may run code: `gradprobe run` compiles and executes the user's script
ALLOWED = {("gradprobe/runner.py", "compile"), ("gradprobe/runner.py", "exec")}
UNPICKLING = {("pickle", "load"), ("pickle", "loads"), ("pickle", "Unpickler"), ("cPickle", "load"), ("cPickle", "loads"),
              ("marshal", "load"), ("marshal", "loads"), ("shelve", "open"), ("dill", "load"), ("dill", "loads"),
              ("cloudpickle", "load"), ("cloudpickle", "loads"), ("jsonpickle", "decode"), ("yaml", "unsafe_load"),
              ("yaml", "full_load"), ("pd", "read_pickle"), ("pandas", "read_pickle")}


def _kw(call: ast.Call, name: str) -> ast.expr | None:
    return next((k.value for k in call.keywords if k.arg == name), None)


def scan_source(roots: list[Path]) -> list[str]:
    """Calls in the source that could unpickle or execute data."""
    problems = []
    for root in roots:
        for path in sorted(root.rglob("*.py")):
            rel = path.relative_to(H.REPO).as_posix()
            tree = ast.parse(path.read_text(encoding="utf-8"), filename=rel)
            for node in ast.walk(tree):
                if isinstance(node, (ast.Import, ast.ImportFrom)):
                    names = [a.name for a in node.names] + ([node.module] if isinstance(node, ast.ImportFrom) and node.module else [])
                    if any(n.split(".")[0] in ("pickle", "cPickle", "dill", "cloudpickle", "jsonpickle", "shelve", "marshal") for n in names):
                        problems.append(f"{rel}:{node.lineno}: imports an unpickling module")
                if not isinstance(node, ast.Call):
                    continue
                f = node.func
                where = f"{rel}:{node.lineno}"
                if isinstance(f, ast.Name) and f.id in ("eval", "exec", "compile", "__import__"):
                    if (rel, f.id) not in ALLOWED:
                        problems.append(f"{where}: {f.id}()")
                if isinstance(f, ast.Attribute) and isinstance(f.value, ast.Name):
                    owner, attr = f.value.id, f.attr
                    if (owner, attr) in UNPICKLING:
                        problems.append(f"{where}: {owner}.{attr}()")
                    if owner == "torch" and attr == "load":
                        wo = _kw(node, "weights_only")
                        if not (isinstance(wo, ast.Constant) and wo.value is True):
                            problems.append(f"{where}: torch.load() without weights_only=True")
                    if owner == "yaml" and attr in ("load", "load_all"):
                        loader = _kw(node, "Loader")
                        if not (isinstance(loader, ast.Attribute) and loader.attr in ("SafeLoader", "CSafeLoader")):
                            problems.append(f"{where}: yaml.{attr}() without a safe loader")
                    if owner in ("np", "numpy") and attr == "load":
                        ap = _kw(node, "allow_pickle")
                        if isinstance(ap, ast.Constant) and ap.value:
                            problems.append(f"{where}: numpy.load(allow_pickle=True)")
    return problems


def test_source_has_no_unpickling_or_code_execution():
    assert not scan_source([H.REPO / "gradprobe", H.REPO / "cli"])


def test_source_scan_catches_what_it_should(tmp_path):
    sample = tmp_path / "bad.py"
    sample.write_text("import pickle, torch, yaml\n"
                      "pickle.loads(b'')\ntorch.load('x')\ntorch.load('x', weights_only=False)\ntorch.load('x', weights_only=True)\n"
                      "yaml.load(s)\nyaml.load(s, Loader=yaml.SafeLoader)\neval('1')\n")
    old = H.REPO
    try:
        H.REPO = tmp_path
        found = scan_source([tmp_path])
    finally:
        H.REPO = old
    assert len(found) == 6, found  # import, pickle.loads, 2 x torch.load, yaml.load, eval


# --------------------------------------------------------------------- HTML escaping ----
def _assert_no_raw_markup(html: str, clean_html: str) -> None:
    assert not RAW_TAGS.search(html), RAW_TAGS.search(html).group(0)
    # exactly the renderer's own script elements: as many as in a report of a clean log
    assert html.lower().count("<script") == clean_html.lower().count("<script")
    assert html.lower().count("</script") == clean_html.lower().count("</script")


def test_html_report_of_a_recorded_run_with_markup_in_every_name(tmp_path):
    """A real recorded run: submodules, a scalar and an exception message named with
    payloads, in a directory whose name is one."""
    d = tmp_path / PAYLOADS[1].replace("/", "")
    H.record_run(str(d), steps=12, names={"rnn": PAYLOADS[0], "head": PAYLOADS[2].replace(".", ""), "act": PAYLOADS[3],
                                          "scalar": PAYLOADS[4]}, message=" ".join(PAYLOADS), nan_at=8)
    clean = H.analyze_in_process(H.template_run(), "html").stdout
    res = H.analyze_in_process(str(d), "html")
    assert res.exit_code in (0, 1)
    _assert_no_raw_markup(res.stdout, clean)
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in res.stdout or "\\u003cscript\\u003ealert(1)" in res.stdout
    assert "onerror=alert(2)" in res.stdout  # the path is shown, escaped


def test_html_report_of_findings_quoting_markup(tmp_path):
    """A synthetic run whose findings quote the names (exploding gradients in a layer,
    an undetached state in a module, an exception message)."""
    path = FZ.build_names({"layers": PAYLOADS[:3], "module": PAYLOADS[3], "message": PAYLOADS[2], "scalar": PAYLOADS[0],
                           "dirname": PAYLOADS[0].replace("/", "")}, str(tmp_path))
    clean = H.analyze_in_process(H.template_run(), "html").stdout
    res = H.analyze_in_process(path, "html")
    assert res.exit_code == 1
    _assert_no_raw_markup(res.stdout, clean)
    findings = H.analyze_in_process(path, "json").report["findings"]
    quoted = " ".join(json.dumps(f) for f in findings)
    assert any(p in quoted for p in PAYLOADS), "no finding quotes a name: the test would prove nothing"
    for fmt in ("text", "markdown"):
        assert H.analyze_in_process(path, fmt).exit_code == 1
