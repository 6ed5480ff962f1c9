"""Reading logs into a :class:`~gradprobe.runlog.RunLog`, whatever wrote them.

:func:`load` auto-detects the kind of ``path`` (``source.kind`` in the report):

* a gradprobe run directory (``gradprobe.json`` / ``steps.arrow``) -> ``gradprobe``
* a file:
    - ``*tfevents*`` (or a file whose first record is a TensorBoard event) -> ``tensorboard``
    - ``*.json`` (or text starting with ``{``) -> ``hf-trainer-state``
    - ``*.csv`` (or text whose first line is a CSV header with a ``step`` column) -> ``lightning-csv``
* any other directory, first match wins:
    1. a ``trainer_state.json`` directly inside (an HF checkpoint or ``save_state()`` dir)
    2. a ``metrics.csv`` directly inside (a Lightning ``version_N`` dir)
    3. TensorBoard event files or gradprobe runs anywhere below: one run is chosen (the
       most logged training steps; see :mod:`gradprobe.readers.tensorboard`), a gradprobe
       run going to the gradprobe reader
    4. the ``trainer_state.json`` below with the highest ``global_step``
    5. the ``metrics.csv`` below with the most logged training steps

Anything else raises :class:`LogError` with one line. Names in foreign logs are mapped to
columns by :mod:`gradprobe.readers.mapping`; extend it with :func:`register_tag` or the
``GRADPROBE_TAG_MAP`` environment variable (docs/readers.md).
"""

from __future__ import annotations

import os

from gradprobe.readers.mapping import DEFAULT_RULES, NameRule, active_rules, register_tag, unregister_tag
from gradprobe.runlog import LogError, RunLog
from gradprobe.runlog.runlog import is_run_dir, open_regular

__all__ = ["load", "detect", "register_tag", "unregister_tag", "active_rules", "DEFAULT_RULES", "NameRule"]


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
    ``lightning-csv``) without reading it all. Raises :class:`LogError` if none."""
    from gradprobe.readers import hf, lightning, tensorboard

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
        if os.path.isfile(os.path.join(p, hf.FILE_NAME)):
            return hf.KIND
        if os.path.isfile(os.path.join(p, lightning.FILE_NAME)):
            return lightning.KIND
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
            f"{p}: no log found in this directory (looked for a gradprobe run, TensorBoard event "
            f"files, {hf.FILE_NAME} and {lightning.FILE_NAME})"
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
    sniffed = _sniff_text(p)
    if sniffed:
        return sniffed
    if tensorboard.sniff_event_file(p):
        return tensorboard.KIND
    raise LogError(
        f"{p}: not a recognised log (expected a gradprobe run directory, a TensorBoard log directory "
        f"or event file, a Hugging Face {hf.FILE_NAME} or a Lightning {lightning.FILE_NAME})"
    )


def load(path: str | os.PathLike[str]) -> RunLog:
    """Loads any supported log. Raises :class:`LogError` (one line) if it is not one."""
    from gradprobe.readers import hf, lightning, tensorboard

    p = os.fspath(path)
    kind = detect(p)
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
