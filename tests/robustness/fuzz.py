"""Fuzz targets for ``gradprobe analyze``: Hypothesis strategies and the property each
example must satisfy (the analyze contract of :func:`tests.robustness.harness.check_contract`).

Each target is a strategy producing a ``case`` dict and a function ``run(case, workdir)`` that
builds the input under ``workdir`` (a fresh empty directory) and analyzes it, returning the
:class:`~tests.robustness.harness.AnalyzeResult`. The tests wrap them with ``@given``;
``benchmarks/robustness.py`` runs them at a larger scale and counts the examples tried
(:data:`TRIED`).

Targets:

=============== ==========================================================================
file_bytes      arbitrary bytes (or the real bytes with a few bytes overwritten) as one file
                of a real run directory (gradprobe.json, steps.arrow, layers-0.arrow,
                events.jsonl, samples.arrow, scalars.arrow, the TensorBoard file), alone or
                among the other real files
truncation      real files cut at arbitrary prefix lengths (several at once)
meta_types      gradprobe.json with values of the wrong type anywhere (or not an object)
values          synthetic runs with NaN/Inf/huge/negative values in every column, layer,
                sample, scalar, event and metadata field
names           unicode, control characters, markup and newlines in layer and module
                names, scalar names, event messages and the directory name
tree            directory trees of run files, garbage, nested runs and symlinks (loops to
                ``.``/``..``/``/``, dangling, to files)
ranks           ``rank<N>`` directories of a distributed run, some real, some cut or garbage
trainer_state   Hugging Face ``trainer_state.json``: any JSON, or a log history of wild values
metrics_csv     Lightning ``metrics.csv``: any header and cells, cut anywhere
tfevents        TensorBoard event files: well-framed (valid CRC) events with wild steps,
                times, tags and values, random records, a real file cut or corrupted
mlflow_files    an MLflow file store: metric files of wild lines cut anywhere, meta.yaml
                well-formed or not, params of any value; PATH the run, experiment, store or
                the folder holding it
mlflow_sqlite   an ``mlflow.db`` with MLflow's tables and wild metric rows (any type in any
                column), a table dropped, or its bytes cut or overwritten
arrow_schema    a well-formed Arrow stream with any columns (missing, extra, duplicated,
                of the wrong type, nested, null-filled) as steps, layers, samples, scalars
=============== ==========================================================================
"""

from __future__ import annotations

import collections
import json
import math
import os
import struct
from typing import Any, Callable

import numpy as np
from hypothesis import strategies as st

from tests.robustness import harness as H

TRIED: collections.Counter[str] = collections.Counter()
#: target -> exit status -> examples (0/1: a report, 2: not a readable log)
EXITS: dict[str, collections.Counter[int]] = collections.defaultdict(collections.Counter)
DELETE = "<delete>"

formats = st.sampled_from(H.FORMATS)
wild_float = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([0.0, -0.0, 1e308, -1e308, 3.4e38, -3.4e38, 1e-45, 5e-324, float("nan"), float("inf"), float("-inf")]),
)
wild_float32 = st.one_of(st.floats(allow_nan=True, allow_infinity=True, width=32),
                         st.sampled_from([3.4e38, -3.4e38, 1e-45, float("nan"), float("inf")]))
json_scalar = st.one_of(st.none(), st.booleans(), st.integers(-(2**70), 2**70), wild_float, st.text(max_size=8))
json_value = st.recursive(json_scalar, lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=8), c, max_size=4),
                          max_leaves=12)
# names: anything a filesystem-independent string can hold (no lone surrogates: they cannot
# be written as UTF-8), with the awkward cases made likely
awkward_text = st.one_of(
    st.text(st.characters(blacklist_categories=("Cs",)), max_size=24),
    st.sampled_from(["<script>alert(1)</script>", "\"><img src=x onerror=alert(1)>", "line1\nline2", "\x1b[31mred\x1b[0m",
                     "\u202eevil", "名前", "🔥", "", " ", "\x00", "a\rb", "{}", "%s%n", "${x}", "..", "NaN"]),
)
path_component = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="/\x00"), min_size=1, max_size=24) \
    .filter(lambda s: s not in (".", "..") and len(s.encode("utf-8")) < 200)


def _run(target: str, case: dict[str, Any], workdir: str, build: Callable[[dict[str, Any], str], str]) -> H.AnalyzeResult:
    TRIED[target] += 1
    path = build(case, workdir)
    res = H.analyze_in_process(path, case.get("fmt", "json"))
    EXITS[target][res.exit_code] += 1
    return res


def _write(path: str, data: bytes) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(data)


def _real_name(name: str) -> str:
    if name in FOREIGN_FILES:
        return name
    if name == "tfevents":
        return H.tfevents_name()
    return name


def _mutate(data: bytes, edits: list[tuple[int, int]]) -> bytes:
    if not data:
        return data
    b = bytearray(data)
    for pos, val in edits:
        b[pos % len(b)] = val
    return bytes(b)


# ----------------------------------------------------------------------- file_bytes ----
file_names = st.sampled_from(H.RUN_FILES + ("tfevents",))
byte_edits = st.lists(st.tuples(st.integers(0, 2**20), st.integers(0, 255)), min_size=1, max_size=8)
file_bytes_case = st.fixed_dictionaries({
    "name": file_names,
    "content": st.one_of(st.binary(max_size=4096).map(lambda b: ("bytes", b)), byte_edits.map(lambda e: ("mutate", e))),
    "alone": st.booleans(),
    "fmt": formats,
})


def build_file_bytes(case: dict[str, Any], workdir: str) -> str:
    d = os.path.join(workdir, "run")
    if case["alone"]:
        os.makedirs(d)
    else:
        H.copy_template(d)
    kind, payload = case["content"]
    data = payload if kind == "bytes" else _mutate(H.template_files()[case["name"]], payload)
    _write(os.path.join(d, _real_name(case["name"])), data)
    return d


# ----------------------------------------------------------------------- truncation ----
truncation_case = st.fixed_dictionaries({
    "cuts": st.dictionaries(file_names, st.floats(0, 1), min_size=1, max_size=4),
    "fmt": formats,
})


def build_truncation(case: dict[str, Any], workdir: str) -> str:
    d = H.copy_template(os.path.join(workdir, "run"))
    files = H.template_files()
    for name, frac in case["cuts"].items():
        data = files[name]
        _write(os.path.join(d, _real_name(name)), data[: int(len(data) * frac)])
    return d


def truncate_file(workdir: str, name: str, length: int, fmt: str = "json") -> H.AnalyzeResult:
    """One file of the template cut to ``length`` bytes (the exhaustive prefix sweep)."""
    TRIED["truncation"] += 1
    d = H.copy_template(os.path.join(workdir, f"cut-{name}-{length}"))
    _write(os.path.join(d, _real_name(name)), H.template_files()[name][:length])
    res = H.analyze_in_process(d, fmt)
    EXITS["truncation"][res.exit_code] += 1
    return res


# ----------------------------------------------------------------------- meta_types ----
meta_case = st.fixed_dictionaries({
    "edits": st.lists(st.tuples(st.lists(st.integers(0, 1000), max_size=4), st.one_of(st.just(DELETE), json_value)),
                      min_size=1, max_size=6),
    "fmt": formats,
})


def _apply_edit(meta: Any, path: list[int], value: Any) -> Any:
    if not path:
        return value if value != DELETE else {}
    node = meta
    for depth, i in enumerate(path):
        if isinstance(node, dict) and node:
            key = sorted(node, key=str)[i % len(node)]
        elif isinstance(node, list) and node:
            key = i % len(node)
        else:
            return meta
        if depth == len(path) - 1 or not isinstance(node[key], (dict, list)) or not node[key]:
            if value == DELETE:
                del node[key]
            else:
                node[key] = value
            return meta
        node = node[key]
    return meta


def build_meta(case: dict[str, Any], workdir: str) -> str:
    d = H.copy_template(os.path.join(workdir, "run"))
    meta: Any = json.loads(H.template_files()["gradprobe.json"])
    for path, value in case["edits"]:
        meta = _apply_edit(meta, path, value)
    _write(os.path.join(d, "gradprobe.json"), json.dumps(meta).encode())
    return d


# --------------------------------------------------------------------------- values ----
def _column(typ: Any) -> st.SearchStrategy[Any]:
    import pyarrow as pa

    if typ == pa.float32():
        elem: st.SearchStrategy[Any] = wild_float32
    elif typ == pa.float64():
        elem = wild_float
    elif typ == pa.int32():
        elem = st.one_of(st.integers(-(2**31), 2**31 - 1), st.integers(-3, 50))
    elif typ == pa.int64():
        elem = st.one_of(st.integers(-(2**63), 2**63 - 1), st.integers(-3, 50))
    elif typ == pa.bool_():
        elem = st.booleans()
    else:
        elem = st.one_of(st.none(), awkward_text)
    return st.lists(elem, min_size=1, max_size=40)


def _step_columns() -> st.SearchStrategy[dict[str, Any]]:
    from gradprobe.runlog import schema as S

    return st.fixed_dictionaries({}, optional={name: _column(typ) for name, typ, _ in S.STEP_COLUMNS})


PROBES = {
    "update": ["ratio"], "grad": ["nonfinite_count"], "weight": ["nonfinite_count"],
    "activation": ["mean", "std", "absmax", "nonfinite", "saturated_frac", "dead_frac", "input_dead_frac"],
    "gates": ["low_frac", "high_frac", "sat_frac"],
    "input": ["numel", "nonfinite", "mean", "std", "absmax", "feature_std_min", "feature_std_max", "integer"],
    "first_layer": ["numel", "nonfinite", "mean", "std", "absmax", "feature_std_min", "feature_std_max", "integer"],
    "target": ["numel", "nonfinite", "mean", "std", "var", "absmax", "integer", "n_classes", "pred_mean", "pred_std"],
    "bptt": ["profile", "hidden_size"],
}
sample_row = st.sampled_from(sorted(PROBES)).flatmap(lambda probe: st.tuples(
    st.one_of(st.integers(-2, 40), st.integers(-(2**63), 2**63 - 1)), st.just(probe),
    st.one_of(st.sampled_from(["lstm", "head", "0.weight", "mse_loss", "rnn"]), awkward_text),
    st.sampled_from(PROBES[probe]), st.integers(-(2**31), 2**31 - 1) | st.integers(0, 8), wild_float))
EVENT_KINDS = ["state_age", "exception", "autocast", "scaler_misuse", "memory_limit", "probe_failure", "script_end", "signal", "x"]
event = st.fixed_dictionaries({"kind": st.sampled_from(EVENT_KINDS)}, optional={
    k: json_value for k in ("step", "module", "message", "type", "where", "age", "how", "status", "dtype", "enabled", "what", "memory", "limit")})
optimizer_meta = st.fixed_dictionaries({
    "class": st.one_of(st.sampled_from(["SGD", "Adam", "AdamW", "LBFGS"]), json_value),
    "param_groups": st.one_of(st.lists(st.fixed_dictionaries({}, optional={
        k: st.one_of(wild_float, json_value) for k in ("lr", "weight_decay", "momentum", "betas", "eps", "fused", "initial_lr")}),
        max_size=2), json_value),
})
meta_fields = st.fixed_dictionaries({}, optional={
    "optimizers": st.one_of(st.lists(optimizer_meta, max_size=2), json_value),
    "scalers": st.one_of(st.lists(st.fixed_dictionaries({}, optional={
        k: st.one_of(wild_float, json_value) for k in ("init_scale", "growth_factor", "backoff_factor", "growth_interval", "enabled")}),
        max_size=2), json_value),
    "recurrent": st.one_of(st.lists(st.fixed_dictionaries({}, optional={
        k: st.one_of(wild_float, json_value) for k in ("module", "class", "hidden_size", "num_layers", "lookback")}), max_size=2),
        json_value),
    "models": json_value,
    "autocast": json_value,
    "loss_functions": json_value,
    "world_size": json_value,
    "rank": json_value,
    "device": json_value,
    "memory_kind": json_value,
    "config": json_value,
    "probe_failures": json_value,
})
values_case = st.fixed_dictionaries({
    "n": st.integers(0, 40),
    "steps": _step_columns(),
    "layers": st.dictionaries(st.sampled_from(["lstm.weight_ih_l0", "head.weight", "head.bias", "out.weight", "0.weight"]),
                              st.lists(st.one_of(wild_float32, st.just(-1.0)), min_size=1, max_size=40), max_size=4),
    "weights": st.booleans(),
    "samples": st.lists(sample_row, max_size=25),
    "scalars": st.lists(st.tuples(st.integers(-2, 40), st.sampled_from(["val_loss", "eval_loss", "loss", "x"]), wild_float), max_size=10),
    "events": st.lists(event, max_size=4),
    "meta": meta_fields,
    "fmt": formats,
})


def _fit(values: list[Any], n: int) -> list[Any]:
    return [values[i % len(values)] for i in range(n)]


def synthetic_log(case: dict[str, Any]) -> Any:
    import warnings

    with np.errstate(all="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # float64 -> float32 overflow of the wild values is the point
        return _synthetic_log(case)


def _synthetic_log(case: dict[str, Any]) -> Any:
    import gradprobe

    n = case["n"]
    steps = {k: _fit(v, n) for k, v in case["steps"].items()}
    layers = {k: np.asarray(_fit(v, n), dtype=np.float32) for k, v in case["layers"].items()}
    return gradprobe.RunLog.build(
        steps, meta=case["meta"], layer_grad=layers or None,
        layer_weight={k: np.abs(v) for k, v in layers.items()} if layers and case["weights"] else None,
        samples=case["samples"], scalars=case["scalars"], events=case["events"],
    )


def build_values(case: dict[str, Any], workdir: str) -> str:
    d = os.path.join(workdir, "run")
    synthetic_log(case).save(d)
    return d


# ---------------------------------------------------------------------------- names ----
names_case = st.fixed_dictionaries({
    "layers": st.lists(awkward_text.filter(bool), min_size=1, max_size=4, unique=True),
    "module": awkward_text,
    "message": awkward_text,
    "scalar": awkward_text,
    "dirname": path_component,
    "fmt": formats,
})


def build_names(case: dict[str, Any], workdir: str) -> str:
    """A run whose findings must quote the names: exploding gradients in the first layer,
    a growing state age in ``module``, an exception carrying ``message``."""
    import gradprobe

    n = 30
    t = np.arange(n)
    grad = np.where(t < 20, 1.0, 10.0 ** (t - 18)).astype(np.float32)
    layers = {name: grad * (1 + i) for i, name in enumerate(case["layers"])}
    steps = {"step": t, "loss": np.where(t < 25, 1.0 / (1 + t), np.nan), "grad_norm": grad, "state_age": t,
             "state_age_module": [case["module"]] * n, "lr": np.full(n, 0.1)}
    meta = {"recurrent": [{"module": case["module"], "class": "LSTM", "hidden_size": 8, "lookback": 6}],
            "optimizers": [{"index": 0, "class": "SGD", "param_groups": [{"lr": 0.1, "weight_decay": 0.0}]}],
            "models": [{"name": case["module"], "class": case["module"]}],
            "autocast": {case["module"]: {"enabled": True, "dtype": "float16", "class": "LSTM"}}}
    events = [{"kind": "state_age", "module": case["module"], "step": 1, "age": 1},
              {"kind": "exception", "where": "script", "step": 29, "type": "RuntimeError", "message": case["message"]}]
    log = gradprobe.RunLog.build(steps, meta=meta, layer_grad=layers, events=events,
                                 scalars=[(i, case["scalar"], 1.0 + i) for i in range(n)])
    d = os.path.join(workdir, case["dirname"])
    log.save(d)
    return d


# ----------------------------------------------------------------------------- tree ----
FOREIGN_FILES = {
    "trainer_state.json": json.dumps({"global_step": 4, "log_history": [{"step": s, "loss": 1.0 / s} for s in range(1, 5)]}).encode(),
    "metrics.csv": b"epoch,step,train_loss\n" + b"".join(b"0,%d,%f\n" % (s, 1.0 / (s + 1)) for s in range(6)),
}
tree_entry = st.fixed_dictionaries({
    "path": st.lists(st.sampled_from(["a", "b", "rank0", "rank1", "run", "version_0", "runs"]), min_size=1, max_size=3),
    "kind": st.sampled_from(["dir", "file", "garbage", "symlink", "template"]),
    "file": st.one_of(file_names, st.sampled_from(sorted(FOREIGN_FILES))),
    "target": st.sampled_from([".", "..", "/", "missing", "self", "template", "template_file", "sibling", "root"]),
    "data": st.binary(max_size=256),
})
tree_case = st.fixed_dictionaries({
    "entries": st.lists(tree_entry, min_size=1, max_size=8),
    "analyze": st.integers(0, 7),
    "fmt": formats,
})


def build_tree(case: dict[str, Any], workdir: str) -> str:
    root = os.path.join(workdir, "root")
    os.makedirs(root)
    made: list[str] = [root]
    files = H.template_files()
    for e in case["entries"]:
        parts = list(e["path"])
        if e["kind"] in ("file", "garbage") or (e["kind"] == "symlink" and e["target"] == "template_file"):
            parts.append(_real_name(e["file"]))
        p = os.path.join(root, *parts)
        if os.path.lexists(p):
            continue
        parent = os.path.dirname(p)
        if not os.path.realpath(parent).startswith(os.path.realpath(root)):
            continue  # never write through a link out of the tree (into the shared template)
        try:
            os.makedirs(parent, exist_ok=True)
        except OSError:  # a file or a link where a directory is wanted
            continue
        try:
            if e["kind"] == "dir":
                os.makedirs(p)
            elif e["kind"] == "file":
                _write(p, FOREIGN_FILES[e["file"]] if e["file"] in FOREIGN_FILES else files[e["file"]])
            elif e["kind"] == "garbage":
                _write(p, e["data"])
            elif e["kind"] == "template":
                H.copy_template(p)
            else:
                target = {".": ".", "..": "..", "/": "/", "missing": os.path.join(root, "no-such-thing"), "self": p,
                          "template": H.template_run(), "template_file": os.path.join(H.template_run(), _real_name(e["file"])),
                          "sibling": made[-1], "root": root}[e["target"]]
                os.symlink(target, p)
        except OSError:
            continue
        made.append(p)
    # analyze a path of the tree (a link to "/" or to the workdir's parent would walk the
    # whole filesystem: a legitimate, slow request, not what this target is about)
    inside = [m for m in made if os.path.realpath(m).startswith((os.path.realpath(workdir), os.path.realpath(H.template_run())))]
    return (inside or [root])[case["analyze"] % len(inside or [root])]


# ---------------------------------------------------------------------------- ranks ----
rank_kind = st.sampled_from(["template", "truncated", "garbage", "empty", "meta-only", "nan-run"])
ranks_case = st.fixed_dictionaries({
    "ranks": st.lists(st.tuples(st.integers(0, 9), rank_kind, st.floats(0, 1)), min_size=1, max_size=4),
    "stray": st.booleans(),
    "fmt": formats,
})


def build_ranks(case: dict[str, Any], workdir: str) -> str:
    root = os.path.join(workdir, "ddp")
    os.makedirs(root)
    files = H.template_files()
    for r, kind, frac in case["ranks"]:
        d = os.path.join(root, f"rank{r}")
        if os.path.exists(d):
            continue
        if kind in ("template", "truncated", "nan-run"):
            H.copy_template(d)
            meta = json.loads(files["gradprobe.json"])
            meta.update(rank=r, world_size=len(case["ranks"]))
            _write(os.path.join(d, "gradprobe.json"), json.dumps(meta).encode())
            if kind == "truncated":
                _write(os.path.join(d, "steps.arrow"), files["steps.arrow"][: int(len(files["steps.arrow"]) * frac)])
            if kind == "nan-run":
                import gradprobe

                log = gradprobe.RunLog.load(d)
                cut = int(frac * max(log.n_steps - 1, 0))
                log.steps.loc[log.steps["step"] >= cut, ["loss", "grad_norm", "local_grad_norm"]] = np.nan
                log.steps.loc[log.steps["step"] >= cut, "loss_nonfinite"] = True
                log.save(d)
        elif kind == "garbage":
            _write(os.path.join(d, "steps.arrow"), files["steps.arrow"][::-1])
        elif kind == "meta-only":
            _write(os.path.join(d, "gradprobe.json"), files["gradprobe.json"])
        else:
            os.makedirs(d)
    if case["stray"]:
        _write(os.path.join(root, "notes.txt"), b"not a log")
    return root


# ------------------------------------------------------------------ foreign formats ----
hf_entry = st.dictionaries(st.sampled_from(["step", "epoch", "loss", "grad_norm", "learning_rate", "eval_loss", "train_loss",
                                            "eval_runtime", "total_flos", "x"]), st.one_of(wild_float, json_scalar), max_size=7)
hf_train_entry = st.fixed_dictionaries(
    {"step": st.one_of(st.integers(0, 60), json_scalar), "loss": st.one_of(wild_float, st.floats(0, 5))},
    optional={"epoch": st.one_of(st.floats(0, 3), json_scalar), "grad_norm": wild_float, "learning_rate": wild_float})
hf_eval_entry = st.fixed_dictionaries({"step": st.integers(0, 60), "eval_loss": st.one_of(wild_float, st.floats(0, 5))},
                                      optional={"epoch": st.floats(0, 3), "eval_runtime": wild_float})
trainer_state_case = st.fixed_dictionaries({
    "state": st.one_of(
        st.fixed_dictionaries({"log_history": st.lists(st.one_of(hf_train_entry, hf_train_entry, hf_eval_entry, hf_entry),
                                                       min_size=1, max_size=25)},
                              optional={"global_step": st.integers(0, 100), "logging_steps": st.integers(1, 10),
                                        "max_steps": json_scalar, "train_batch_size": json_scalar}),
        json_value,
        st.fixed_dictionaries({"log_history": st.lists(st.one_of(hf_entry, json_value), max_size=15)},
                              optional={"global_step": json_scalar, "best_metric": json_scalar, "max_steps": json_scalar,
                                        "logging_steps": json_scalar, "epoch": json_scalar, "train_batch_size": json_scalar}),
    ),
    "cut": st.one_of(st.none(), st.floats(0, 1)),
    "in_dir": st.booleans(),
    "fmt": formats,
})


def build_trainer_state(case: dict[str, Any], workdir: str) -> str:
    text = json.dumps(case["state"], indent=1).encode()
    if case["cut"] is not None:
        text = text[: int(len(text) * case["cut"])]
    p = os.path.join(workdir, "ckpt", "trainer_state.json")
    _write(p, text)
    return os.path.dirname(p) if case["in_dir"] else p


csv_cell = st.one_of(st.just(""), st.integers(-(2**63), 2**63).map(str), wild_float.map(repr), st.sampled_from(["nan", "inf", "-inf", "1e999", "NaN", "None", "\"a,b\"", "\"x\ny\""]),
                     st.text(max_size=4))
csv_number = st.one_of(st.integers(0, 60).map(str), st.floats(0, 10).map(repr), wild_float.map(repr), st.just(""), st.just(""))
LIGHTNING_COLUMNS = ["train_loss", "val_loss", "loss", "lr-Adam", "lr-SGD", "grad_2.0_norm_total", "grad_2.0_norm/layer.weight",
                     "train_loss_step", "train_loss_epoch"]
lightning_table = st.lists(st.sampled_from(LIGHTNING_COLUMNS), min_size=1, max_size=5, unique=True).flatmap(
    lambda cols: st.tuples(st.just(["epoch", "step", *cols]),
                           st.lists(st.lists(st.one_of(csv_number, csv_number, csv_number, csv_cell), min_size=len(cols) + 2,
                                             max_size=len(cols) + 2), min_size=1, max_size=25)))
random_table = st.tuples(
    st.lists(st.one_of(st.sampled_from(["step", "epoch", *LIGHTNING_COLUMNS]), awkward_text), min_size=1, max_size=7),
    st.lists(st.lists(csv_cell, max_size=8), max_size=15))
metrics_csv_case = st.fixed_dictionaries({
    "table": st.one_of(lightning_table, random_table),
    "cut": st.one_of(st.none(), st.none(), st.integers(0, 2000)),
    "in_dir": st.booleans(),
    "fmt": formats,
})


def build_metrics_csv(case: dict[str, Any], workdir: str) -> str:
    header, rows = case["table"]
    text = "\n".join(",".join(r) for r in [header] + rows) + "\n"
    data = text.encode("utf-8", "surrogatepass")
    if case["cut"] is not None:
        data = data[: case["cut"]]
    p = os.path.join(workdir, "lightning_logs", "version_0", "metrics.csv")
    _write(p, data)
    return os.path.dirname(p) if case["in_dir"] else p


def _frame(payload: bytes) -> bytes:
    from tensorboard.compat.tensorflow_stub.pywrap_tensorflow import masked_crc32c

    header = struct.pack("<Q", len(payload))
    return header + struct.pack("<I", masked_crc32c(header)) + payload + struct.pack("<I", masked_crc32c(payload))


def _event_bytes(step: int, wall_time: float, tag: str, value: float, how: str) -> bytes:
    from tensorboard.compat.proto import event_pb2, summary_pb2, tensor_pb2, tensor_shape_pb2, types_pb2

    if how == "simple":
        val = summary_pb2.Summary.Value(tag=tag, simple_value=value)
    else:
        meta = summary_pb2.SummaryMetadata(plugin_data=summary_pb2.SummaryMetadata.PluginData(plugin_name="scalars"))
        shape = tensor_shape_pb2.TensorShapeProto() if how == "tensor" else tensor_shape_pb2.TensorShapeProto(
            dim=[tensor_shape_pb2.TensorShapeProto.Dim(size=2)])
        t = tensor_pb2.TensorProto(dtype=types_pb2.DT_DOUBLE, tensor_shape=shape, double_val=[value] * (1 if how == "tensor" else 2))
        val = summary_pb2.Summary.Value(tag=tag, tensor=t, metadata=meta)
    return event_pb2.Event(step=step, wall_time=wall_time, summary=summary_pb2.Summary(value=[val])).SerializeToString()


tb_event = st.tuples(
    st.one_of(st.integers(-3, 60), st.integers(-(2**63), 2**63 - 1)),
    st.one_of(st.floats(1.6e9, 1.8e9), wild_float),
    st.one_of(st.sampled_from(["loss", "train/loss", "train_loss", "grad_norm", "train/grad_norm", "lr", "learning_rate",
                               "eval/loss", "val_loss", "gradprobe/grad_norm", "epoch"]), awkward_text),
    wild_float,
    st.sampled_from(["simple", "tensor", "tensor2"]),
)
tfevents_case = st.fixed_dictionaries({
    "records": st.lists(st.one_of(tb_event.map(lambda e: ("event", e)), st.binary(max_size=64).map(lambda b: ("raw", b))),
                        max_size=30),
    "version": st.booleans(),
    "tail": st.one_of(st.just(("none", 0)), st.tuples(st.just("garbage"), st.integers(1, 64)),
                      st.tuples(st.just("cut"), st.integers(1, 40))),
    "real": st.one_of(st.none(), st.tuples(st.floats(0, 1), byte_edits)),
    "in_dir": st.booleans(),
    "fmt": formats,
})


def build_tfevents(case: dict[str, Any], workdir: str) -> str:
    from tensorboard.compat.proto import event_pb2

    if case["real"] is not None:
        frac, edits = case["real"]
        data = H.template_files()["tfevents"]
        data = _mutate(data[: max(1, int(len(data) * frac))], edits if frac > 0.5 else [])
    else:
        parts = [_frame(event_pb2.Event(wall_time=1.7e9, file_version="brain.Event:2").SerializeToString())] if case["version"] else []
        for kind, rec in case["records"]:
            parts.append(_frame(_event_bytes(*rec) if kind == "event" else rec))
        data = b"".join(parts)
        how, k = case["tail"]
        if how == "garbage":
            data += os.urandom(k)
        elif how == "cut":
            data = data[: max(0, len(data) - k)]
    p = os.path.join(workdir, "tb", "run1", "events.out.tfevents.1700000000.host.1.0")
    _write(p, data)
    return os.path.join(workdir, "tb") if case["in_dir"] else p


# --------------------------------------------------------------------------- MLflow ----
MLFLOW_KEYS = ["loss", "train/loss", "train_loss_step", "val_loss", "eval/loss", "learning_rate", "lr", "grad_norm",
               "train/perplexity", "cost/cross_entropy", "accuracy", "epoch"]
mlflow_value = st.one_of(wild_float.map(repr), st.sampled_from(["nan", "inf", "-inf", "NaN", "1e999", "-0", "", "x"]),
                         st.floats(0, 10).map(repr))
mlflow_line = st.one_of(
    st.tuples(st.integers(0, 2**45).map(str), mlflow_value, st.one_of(st.integers(-3, 60), st.integers(-(2**70), 2**70)).map(str))
    .map(" ".join),
    st.tuples(st.integers(0, 2**45).map(str), mlflow_value).map(" ".join),  # MLflow < 1.0: no step
    st.text(max_size=20),
)
mlflow_meta = st.one_of(
    st.just("run"),  # a well-formed run meta.yaml
    st.sampled_from(["{ not: [yaml", "- a list\n", "", "run_id: \n", "\x00\xff"]),
    st.dictionaries(st.sampled_from(["run_id", "run_uuid", "status", "start_time", "lifecycle_stage", "run_name",
                                     "experiment_id"]), json_scalar, max_size=6).map(lambda d: ("yaml", d)),
)
mlflow_files_case = st.fixed_dictionaries({
    "meta": mlflow_meta,
    "metrics": st.lists(st.tuples(st.one_of(st.sampled_from(MLFLOW_KEYS), path_component),
                                  st.lists(mlflow_line, max_size=25)), min_size=1, max_size=6),
    "params": st.dictionaries(st.sampled_from(["lr", "learning_rate", "max_grad_norm", "weight_decay", "optim", "batch_size",
                                               "gradient_clip_val", "gradient_clip_algorithm", "x"]),
                              st.one_of(json_scalar.map(str), st.sampled_from(["adamw_torch", "None", "value", "-1"])),
                              max_size=6),
    "cut": st.one_of(st.none(), st.integers(1, 30)),
    "layout": st.sampled_from(["run", "experiment", "store", "project"]),
    "empty_sibling": st.booleans(),
    "trash": st.booleans(),
    "fmt": formats,
})


def _mlflow_run(d: str, case: dict[str, Any], run_id: str) -> None:
    import yaml

    meta = case["meta"]
    if meta == "run":
        text = yaml.safe_dump({"run_id": run_id, "run_uuid": run_id, "experiment_id": "0", "status": 3,
                               "lifecycle_stage": "active", "start_time": 1700000000000, "run_name": "fuzz"})
    elif isinstance(meta, tuple):
        text = yaml.safe_dump(meta[1])
    else:
        text = meta
    _write(os.path.join(d, "meta.yaml"), text.encode("utf-8", "surrogatepass"))
    os.makedirs(os.path.join(d, "metrics"), exist_ok=True)
    for key, lines in case["metrics"]:
        data = "".join(line + "\n" for line in lines).encode("utf-8", "surrogatepass")
        if case["cut"] is not None and data:
            data = data[: max(0, len(data) - case["cut"])]
        p = os.path.join(d, "metrics", *key.split("/"))
        if os.path.isdir(p):
            continue
        try:
            _write(p, data)
        except (IsADirectoryError, NotADirectoryError):
            continue  # "train" as a key and as a folder of "train/loss": MLflow cannot write both either
    for key, value in case["params"].items():
        _write(os.path.join(d, "params", key), value.encode("utf-8", "surrogatepass"))


def build_mlflow_files(case: dict[str, Any], workdir: str) -> str:
    """An MLflow file store: one run with metric files of wild lines (cut anywhere), its
    meta.yaml well-formed or not, params of any value; a run without metrics and a deleted
    run beside it. PATH: the run, its experiment, the store or the folder holding it."""
    store = os.path.join(workdir, "project", "mlruns")
    exp = os.path.join(store, "0")
    _write(os.path.join(exp, "meta.yaml"), b"experiment_id: '0'\nname: Default\nlifecycle_stage: active\n")
    run = os.path.join(exp, "a" * 32)
    _mlflow_run(run, case, "a" * 32)
    if case["empty_sibling"]:
        _mlflow_run(os.path.join(exp, "b" * 32), {**case, "metrics": [], "meta": "run"}, "b" * 32)
    if case["trash"]:
        _mlflow_run(os.path.join(store, ".trash", "c" * 32), {**case, "meta": "run"}, "c" * 32)
    return {"run": run, "experiment": exp, "store": store, "project": os.path.dirname(store)}[case["layout"]]


#: MLflow's SQL schema for the tables the reader reads (from ``mlflow.store.db``): a fuzzed
#: database is built with the standard library, in seconds, not migrated by MLflow
MLFLOW_DDL = [
    "CREATE TABLE experiments (experiment_id INTEGER NOT NULL, name VARCHAR(256) NOT NULL, artifact_location VARCHAR(256), "
    "lifecycle_stage VARCHAR(32), creation_time BIGINT, last_update_time BIGINT, PRIMARY KEY (experiment_id))",
    "CREATE TABLE runs (run_uuid VARCHAR(32) NOT NULL, name VARCHAR(250), source_type VARCHAR(20), source_name VARCHAR(500), "
    "entry_point_name VARCHAR(50), user_id VARCHAR(256), status VARCHAR(9), start_time BIGINT, end_time BIGINT, "
    "source_version VARCHAR(50), lifecycle_stage VARCHAR(20), artifact_uri VARCHAR(200), experiment_id INTEGER, "
    "deleted_time BIGINT, PRIMARY KEY (run_uuid))",
    # MLflow's metrics table without its NOT NULL constraints: the reader must survive a NULL too
    "CREATE TABLE metrics (key VARCHAR(250), value FLOAT, timestamp BIGINT, run_uuid VARCHAR(32) NOT NULL, "
    "step BIGINT DEFAULT '0', is_nan BOOLEAN DEFAULT '0')",
    "CREATE TABLE params (key VARCHAR(250) NOT NULL, value VARCHAR(8000) NOT NULL, run_uuid VARCHAR(32) NOT NULL)",
    "CREATE TABLE tags (key VARCHAR(250) NOT NULL, value VARCHAR(8000), run_uuid VARCHAR(32) NOT NULL)",
]
sql_any = st.one_of(json_scalar.filter(lambda v: not isinstance(v, int) or abs(v) < 2**63), st.binary(max_size=8),
                    st.sampled_from([1.7976931348623157e308, -1.7976931348623157e308]))
mlflow_sqlite_case = st.fixed_dictionaries({
    "rows": st.lists(st.tuples(st.one_of(st.sampled_from(MLFLOW_KEYS), awkward_text),
                               st.one_of(wild_float.filter(lambda v: not math.isnan(v)), sql_any),
                               st.one_of(st.integers(-3, 60), sql_any), st.one_of(st.sampled_from([0, 1]), sql_any)),
                     min_size=1, max_size=30),
    "status": st.sampled_from(["FINISHED", "FAILED", "RUNNING", "KILLED", None]),
    "drop": st.sampled_from([None, None, None, "params", "tags", "experiments", "metrics", "runs"]),
    "deleted_sibling": st.booleans(),
    "damage": st.one_of(st.none(), st.none(), st.tuples(st.sampled_from(["cut", "mutate"]), st.floats(0, 1), byte_edits)),
    "in_dir": st.booleans(),
    "fmt": formats,
})


def build_mlflow_sqlite(case: dict[str, Any], workdir: str) -> str:
    """An ``mlflow.db`` with MLflow's tables and one run of wild metric rows (any key, value,
    step, is_nan of any type), a table missing, a deleted run beside it, or its bytes cut or
    overwritten."""
    import sqlite3

    p = os.path.join(workdir, "proj", "mlflow.db")
    os.makedirs(os.path.dirname(p))
    con = sqlite3.connect(p)
    for ddl in MLFLOW_DDL:
        con.execute(ddl)
    con.execute("INSERT INTO experiments VALUES (0, 'Default', '', 'active', 0, 0)")
    con.execute("INSERT INTO runs (run_uuid, name, status, start_time, lifecycle_stage, experiment_id) VALUES (?, ?, ?, ?, ?, ?)",
                ("a" * 32, "fuzz", case["status"], 1700000000000, "active", 0))
    con.executemany("INSERT INTO metrics VALUES (?, ?, 1700000000000, ?, ?, ?)",
                    [(k, v, "a" * 32, s, n) for k, v, s, n in case["rows"]])
    con.execute("INSERT INTO params VALUES ('lr', '0.1', ?)", ("a" * 32,))
    if case["deleted_sibling"]:
        con.execute("INSERT INTO runs (run_uuid, status, lifecycle_stage, experiment_id) VALUES (?, 'FINISHED', 'deleted', 0)",
                    ("b" * 32,))
        con.execute("INSERT INTO metrics VALUES ('loss', 1.0, 0, ?, 0, 0)", ("b" * 32,))
    if case["drop"]:
        con.execute(f"DROP TABLE {case['drop']}")
    con.commit()
    con.close()
    if case["damage"] is not None:
        how, frac, edits = case["damage"]
        data = open(p, "rb").read()
        data = data[: max(1, int(len(data) * frac))] if how == "cut" else _mutate(data, edits)
        _write(p, data)
    return os.path.dirname(p) if case["in_dir"] else p


# --------------------------------------------------------------------- arrow_schema ----
ARROW_TYPES = ["int8", "int32", "int64", "uint64", "float16", "float32", "float64", "bool", "string", "large_string", "binary",
               "null", "date32", "timestamp", "list", "struct", "dictionary"]
EXPECTED_NAMES = ["step", "loss", "grad_norm", "n_backward", "state_age_module", "memory", "skipped", "probe", "target", "stat",
                  "index", "value", "name", "g0", "w0", "g1", "w1"]
arrow_column = st.tuples(st.one_of(st.sampled_from(EXPECTED_NAMES), st.text(max_size=6)), st.sampled_from(ARROW_TYPES),
                         st.booleans())
arrow_schema_case = st.fixed_dictionaries({
    "file": st.sampled_from(["steps.arrow", "layers-0.arrow", "samples.arrow", "scalars.arrow"]),
    "columns": st.lists(arrow_column, max_size=8),
    "rows": st.integers(0, 12),
    "seed": st.integers(0, 2**16),
    "append_real": st.booleans(),
    "fmt": formats,
})


def _arrow_array(typ: str, n: int, nulls: bool, rng: np.random.Generator) -> Any:
    import pyarrow as pa

    mask = (rng.random(n) < 0.3) if nulls else None
    ints = rng.integers(-5, 40, n)
    floats = rng.choice([0.0, 1.5, np.nan, np.inf, -np.inf, 3e38, -1.0], n)
    if typ in ("int8", "int32", "int64", "uint64"):
        arr = pa.array(np.abs(ints) if typ == "uint64" else ints, type=getattr(pa, typ)(), mask=mask)
    elif typ in ("float16", "float32", "float64"):
        with np.errstate(over="ignore"):  # the wild values overflow float16: the point
            arr = pa.array(floats.astype(typ), type=getattr(pa, typ)(), mask=mask)
    elif typ == "bool":
        arr = pa.array(ints > 10, mask=mask)
    elif typ in ("string", "large_string", "binary"):
        vals = [["update", "grad", "lstm", "ratio", "", "名前", "NaN"][i % 7] for i in ints]
        arr = pa.array([v.encode() if typ == "binary" else v for v in vals], type=getattr(pa, typ)(), mask=mask)
    elif typ == "null":
        arr = pa.nulls(n)
    elif typ == "date32":
        arr = pa.array(np.abs(ints).astype(np.int32), type=pa.int32()).cast(pa.date32())
    elif typ == "timestamp":
        arr = pa.array(np.abs(ints), type=pa.int64()).cast(pa.timestamp("s"))
    elif typ == "list":
        arr = pa.array([[int(i)] * 2 for i in ints], type=pa.list_(pa.int64()))
    elif typ == "struct":
        arr = pa.array([{"a": int(i), "b": float(f)} for i, f in zip(ints, floats)])
    else:
        arr = pa.array([["x", "y", "z"][i % 3] for i in ints]).dictionary_encode()
    return arr


def build_arrow_schema(case: dict[str, Any], workdir: str) -> str:
    """A well-formed Arrow IPC stream with columns of any name and type (missing, extra,
    duplicated, nested, null-filled) in place of one stream of a real run directory."""
    import io

    import pyarrow as pa

    d = H.copy_template(os.path.join(workdir, "run"))
    rng = np.random.default_rng(case["seed"])
    n = case["rows"]
    names = [name for name, _, _ in case["columns"]]
    arrays = [_arrow_array(typ, n, nulls, rng) for _, typ, nulls in case["columns"]]
    sink = io.BytesIO()
    table = pa.Table.from_arrays(arrays, names=names) if arrays else pa.table({})
    with pa.ipc.new_stream(sink, table.schema) as w:
        w.write_table(table)
    data = sink.getvalue()
    if case["append_real"]:  # a second stream's bytes after it (a reused file)
        data += H.template_files()[case["file"]]
    _write(os.path.join(d, case["file"]), data)
    return d


# ------------------------------------------------------------------------- registry ----
TARGETS: dict[str, tuple[st.SearchStrategy[dict[str, Any]], Callable[[dict[str, Any], str], str]]] = {
    "file_bytes": (file_bytes_case, build_file_bytes),
    "truncation": (truncation_case, build_truncation),
    "meta_types": (meta_case, build_meta),
    "values": (values_case, build_values),
    "names": (names_case, build_names),
    "tree": (tree_case, build_tree),
    "ranks": (ranks_case, build_ranks),
    "trainer_state": (trainer_state_case, build_trainer_state),
    "metrics_csv": (metrics_csv_case, build_metrics_csv),
    "tfevents": (tfevents_case, build_tfevents),
    "mlflow_files": (mlflow_files_case, build_mlflow_files),
    "mlflow_sqlite": (mlflow_sqlite_case, build_mlflow_sqlite),
    "arrow_schema": (arrow_schema_case, build_arrow_schema),
}


def run_target(target: str, case: dict[str, Any]) -> H.AnalyzeResult:
    """Builds ``case`` in a fresh temporary directory and analyzes it (contract checked)."""
    import tempfile

    _, build = TARGETS[target]
    with tempfile.TemporaryDirectory(prefix=f"gp-fuzz-{target}-") as workdir:
        return _run(target, case, workdir, build)
