"""Reading logs into a :class:`~gradprobe.runlog.RunLog`, whatever wrote them.

:func:`load` auto-detects the kind of ``path`` (``source.kind`` in the report):

* a gradprobe run directory (``gradprobe.json`` / ``steps.arrow``) -> ``gradprobe``
* an MLflow file-store run, experiment or ``mlruns/`` folder -> ``mlflow``
* a file:
    - ``*tfevents*`` (or a file whose first record is a TensorBoard event) -> ``tensorboard``
    - ``*.json`` (or text starting with ``{``) -> ``hf-trainer-state``
    - ``*.csv`` (or text whose first line is a CSV header with a ``step`` column) -> ``lightning-csv``
    - a SQLite database (``mlflow.db``) -> ``mlflow``
* any other directory, first match wins:
    1. a ``trainer_state.json`` directly inside (an HF checkpoint or ``save_state()`` dir)
    2. a ``metrics.csv`` directly inside (a Lightning ``version_N`` dir)
    3. ``mlruns/`` or ``mlflow.db`` directly inside (a project folder) -> ``mlflow``
    4. TensorBoard event files or gradprobe runs anywhere below: one run is chosen (the
       most logged training steps; see :mod:`gradprobe.readers.tensorboard`), a gradprobe
       run going to the gradprobe reader
    5. the ``trainer_state.json`` below with the highest ``global_step``
    6. the ``metrics.csv`` below with the most logged training steps

Anything else raises :class:`LogError` with one line. Names in foreign logs are mapped to
columns by :mod:`gradprobe.readers.mapping`; extend it with :func:`register_tag` or the
``GRADPROBE_TAG_MAP`` environment variable (docs/readers.md).
"""

from __future__ import annotations

import os

from gradprobe.readers.mapping import DEFAULT_RULES, NameRule, active_rules, register_tag, unregister_tag
from gradprobe.runlog import LogError, RunLog
from gradprobe.runlog.runlog import is_run_dir, open_regular

__all__ = ["load", "load_runs", "detect", "register_tag", "unregister_tag", "active_rules", "DEFAULT_RULES", "NameRule"]


def _sniff_text(path: str) -> str | None:
    try:
        with open_regular(path) as f:
            head = f.read(4096)
    except OSError:
        return None
    if b"\x00" in head:
        return None
    text = head.decode("utf-8", "replace").lstrip("\ufeff \t\r\n")
    if text.startswith("{"):
        return "hf-trainer-state"
    first = text.splitlines()[0] if text else ""
    if "," in first and "step" in [c.strip().strip('"') for c in first.split(",")]:
        return "lightning-csv"
    return None


def detect(path: str | os.PathLike[str]) -> str:
    """The kind of log at ``path`` (``gradprobe``, ``tensorboard``, ``hf-trainer-state``,
    ``lightning-csv``, ``mlflow``) without reading it all. Raises :class:`LogError` if none."""
    from gradprobe.readers import hf, lightning, mlflow, tensorboard

    p = os.fspath(path)
    if not os.path.exists(p):
        raise LogError(f"{p}: no such file or directory")
    if is_run_dir(p):
        return "gradprobe"
    if os.path.isdir(p):
        try:
            entries = os.listdir(p)
        except OSError as exc:
            raise LogError(f"{p}: cannot read directory ({exc.strerror})") from None
        if not entries:
            raise LogError(f"{p}: empty directory, no log to analyze")
        if mlflow.is_run_dir(p) or mlflow.is_experiment_dir(p) or mlflow.is_store_dir(p):
            return mlflow.KIND
        if os.path.isfile(os.path.join(p, hf.FILE_NAME)):
            return hf.KIND
        if os.path.isfile(os.path.join(p, lightning.FILE_NAME)):
            return lightning.KIND
        if mlflow.holds_store(p) is not None:
            return mlflow.KIND
        for dirpath, dirnames, filenames in os.walk(p):
            if is_run_dir(dirpath):
                return tensorboard.KIND  # the TensorBoard reader hands gradprobe runs over
            if any(tensorboard.is_event_file(f) for f in filenames):
                return tensorboard.KIND
        for dirpath, _, filenames in os.walk(p):
            if hf.FILE_NAME in filenames and os.path.isfile(os.path.join(dirpath, hf.FILE_NAME)):
                return hf.KIND
        for dirpath, _, filenames in os.walk(p):
            if lightning.FILE_NAME in filenames and os.path.isfile(os.path.join(dirpath, lightning.FILE_NAME)):
                return lightning.KIND
        raise LogError(
            f"{p}: no log found in this directory (looked for a gradprobe run, an MLflow run or store, "
            f"TensorBoard event files, {hf.FILE_NAME} and {lightning.FILE_NAME})"
        )
    try:
        size = os.path.getsize(p)
    except OSError as exc:
        raise LogError(f"{p}: cannot read ({exc.strerror or exc})") from None
    if size == 0:
        raise LogError(f"{p}: empty file")
    name = os.path.basename(p).lower()
    if tensorboard.is_event_file(name):
        return tensorboard.KIND
    if name.endswith(".json"):
        return hf.KIND
    if name.endswith(".csv"):
        return lightning.KIND
    if mlflow.is_sqlite(p):
        return mlflow.KIND
    sniffed = _sniff_text(p)
    if sniffed:
        return sniffed
    if tensorboard.sniff_event_file(p):
        return tensorboard.KIND
    raise LogError(
        f"{p}: not a recognised log (expected a gradprobe run directory, a TensorBoard log directory "
        f"or event file, a Hugging Face {hf.FILE_NAME}, a Lightning {lightning.FILE_NAME} or an MLflow "
        f"run, mlruns/ or {mlflow.DB_NAME})"
    )


def load(path: str | os.PathLike[str], *, run: str | None = None) -> RunLog:
    """Loads any supported log. Raises :class:`LogError` (one line) if it is not one.

    Args:
        path: a log file or directory (see the module docstring).
        run: the MLflow run to read when ``path`` holds several (an id, a unique id prefix
            or a run name); by default the run with the most logged training steps.
    """
    from gradprobe.readers import hf, lightning, mlflow, tensorboard

    p = os.fspath(path)
    kind = detect(p)
    if run is not None and kind != mlflow.KIND:
        raise LogError(f"{p}: --run picks a run of an MLflow store; this is a {kind} log")
    if kind == mlflow.KIND:
        return mlflow.read_mlflow(p, run)
    if kind == "gradprobe":
        return RunLog.load(p)
    if kind == tensorboard.KIND:
        return tensorboard.read_tensorboard(p)
    if kind == hf.KIND:
        if os.path.isdir(p):
            direct = os.path.join(p, hf.FILE_NAME)
            found = direct if os.path.isfile(direct) else hf.find_trainer_state(p)
            if found is None:  # pragma: no cover - detect() saw one
                raise LogError(f"{p}: no {hf.FILE_NAME} in this directory")
            return hf.read_trainer_state(found)
        return hf.read_trainer_state(p)
    if os.path.isdir(p):
        direct = os.path.join(p, lightning.FILE_NAME)
        if os.path.isfile(direct):
            return lightning.read_metrics_csv(direct)
        found, others = lightning.find_metrics_csv(p)
        if found is None:  # pragma: no cover - detect() saw one
            raise LogError(f"{p}: no {lightning.FILE_NAME} in this directory")
        log = lightning.read_metrics_csv(found)
        if others:
            listed = ", ".join(f"{os.path.relpath(o, p)} ({s} steps)" for o, s in others[:5])
            log.source["skipped"].append(
                f"{len(others)} other metrics.csv run(s) in {p} not analyzed: {listed}; runs are not merged"
            )
        return log
    return lightning.read_metrics_csv(p)


def load_runs(path: str | os.PathLike[str], *, run: str | None = None) -> list[RunLog] | None:
    """The runs of an MLflow store or experiment, one RunLog each (``gradprobe analyze``
    reports on each), or the one ``run`` names; None when ``path`` is not an MLflow log
    (analyze it as one log). Raises :class:`LogError` (one line) on a bad path."""
    from gradprobe.readers import mlflow

    p = os.fspath(path)
    maybe = (os.path.isdir(p) and mlflow.detect_dir(p)) or (os.path.isfile(p) and mlflow.is_sqlite(p))
    kind = detect(p) if maybe or run is not None else None
    if kind != mlflow.KIND:
        if run is not None:
            raise LogError(f"{p}: --run picks a run of an MLflow store; this is a {kind} log")
        return None
    return mlflow.read_each(p, run)
