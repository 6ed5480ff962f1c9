"""Hugging Face ``trainer_state.json`` -> ``RunLog`` (``source.kind = "hf-trainer-state"``).

The Trainer writes its ``TrainerState`` with Python's ``json`` module, so non-finite values
appear as bare ``NaN``/``Infinity``/``-Infinity`` (not strict JSON); they are read as the
floats they are. Each ``log_history`` entry is one record at its ``step``: training entries
carry ``loss``, ``grad_norm``, ``learning_rate`` and ``epoch``; evaluation entries carry
``eval_loss`` and other ``eval_*`` metrics. The final summary entry (``train_runtime``,
``train_loss`` = the mean loss of the whole run, ``total_flos``) is not a log record and is
kept in ``meta["hf"]["summary"]`` instead.

``loss`` in a training entry is the mean over the ``logging_steps`` steps since the previous
entry; ``grad_norm`` and ``learning_rate`` are those of the logging step itself.

Truncation. The Trainer rewrites the file in place at every checkpoint, so a kill can leave
it cut off. When the cut falls inside ``log_history``, every complete entry before it is
read and ``source["skipped"]`` says where the file ends; a file cut before its first
complete entry, or one that is not a trainer state, raises :class:`LogError`.
"""

from __future__ import annotations

import json
import os
import re
from typing import Any

from gradprobe.readers.records import RawRecords, build_runlog, to_float, to_step
from gradprobe.runlog import LogError, RunLog
from gradprobe.runlog.runlog import open_regular

KIND = "hf-trainer-state"
FILE_NAME = "trainer_state.json"
_STATE_KEYS = ("global_step", "max_steps", "logging_steps", "eval_steps", "save_steps", "train_batch_size",
               "num_train_epochs", "epoch", "best_metric", "best_global_step", "best_model_checkpoint")
_SUMMARY_KEYS = ("train_runtime", "total_flos")
_HISTORY = re.compile(r'"log_history"\s*:\s*\[')


def _salvage(text: str) -> tuple[list[Any], dict[str, Any]] | None:
    """Complete ``log_history`` entries of a truncated or corrupt file (None: none)."""
    m = _HISTORY.search(text)
    if m is None:
        return None
    dec = json.JSONDecoder()
    pos = m.end()
    entries: list[Any] = []
    while True:
        while pos < len(text) and text[pos] in " \t\r\n,":
            pos += 1
        if pos >= len(text) or text[pos] == "]":
            break
        try:
            obj, pos = dec.raw_decode(text, pos)
        except ValueError:
            break
        entries.append(obj)
    if not entries:
        return None
    header: dict[str, Any] = {}
    for key in _STATE_KEYS:
        km = re.search(r'"%s"\s*:\s*(-?[0-9.eE+]+|null|"[^"]*")' % re.escape(key), text[: m.start()])
        if km:
            try:
                header[key] = json.loads(km.group(1))
            except ValueError:
                pass
    return entries, header


def read_trainer_state(path: str) -> RunLog:
    """Reads a ``trainer_state.json`` (or any file holding a ``TrainerState``)."""
    name = os.path.basename(path)
    try:
        with open_regular(path) as f:
            data = f.read()
    except OSError as exc:
        raise LogError(f"{path}: cannot read ({exc.strerror or exc})") from None
    if not data.strip():
        raise LogError(f"{path}: empty file")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise LogError(f"{path}: not a Hugging Face trainer state (not UTF-8 JSON text)") from None
    skipped: list[str] = []
    try:
        state = json.loads(text)
    except ValueError as exc:
        salvaged = _salvage(text)
        if salvaged is None:
            raise LogError(f"{path}: truncated or invalid JSON, no complete log record ({str(exc).splitlines()[0]})") from None
        history, state = salvaged
        skipped.append(
            f"{name}: truncated or corrupt JSON ({str(exc).splitlines()[0]}); "
            f"read the {len(history)} complete log_history entries before it"
        )
    else:
        if not isinstance(state, dict) or not isinstance(state.get("log_history"), list):
            raise LogError(f'{path}: JSON but not a Hugging Face trainer state (no "log_history" list)')
        history = state["log_history"]

    raw = RawRecords()
    summary: dict[str, Any] = {}
    bad = 0
    for entry in history:
        if not isinstance(entry, dict):
            bad += 1
            continue
        step = to_step(entry.get("step"))
        if step is None:
            bad += 1
            continue
        if any(k in entry for k in _SUMMARY_KEYS):
            summary = {k: v for k, v in entry.items() if to_float(v) is not None}
            continue
        epoch = to_float(entry.get("epoch"))
        for key, value in entry.items():
            if key in ("step", "epoch"):
                continue
            v = to_float(value)
            if v is None:
                continue
            raw.add(str(key), step, v, epoch=epoch if epoch is not None else float("nan"))
    if bad:
        skipped.append(f"{name}: {bad} log_history entr{'y' if bad == 1 else 'ies'} without a numeric step skipped")
    if not len(raw):
        logging = state.get("logging_steps")
        hint = f" (the Trainer logs every logging_steps={logging} steps)" if logging else ""
        raise LogError(f"{path}: trainer state without log records in log_history; nothing was logged yet{hint}")
    # each "loss" record is the mean over the logging_steps since the previous one
    meta: dict[str, Any] = {"hf": {k: state.get(k) for k in _STATE_KEYS if k in state}, "loss_records": "average"}
    if summary:
        meta["hf"]["summary"] = summary
    return build_runlog(raw, kind=KIND, path=path, skipped=skipped, meta=meta, what="trainer state")


def _global_step(path: str) -> int:
    try:
        with open_regular(path) as f:
            head = f.read(4096).decode("utf-8", "replace")
        m = re.search(r'"global_step"\s*:\s*(\d+)', head)
        return int(m.group(1)) if m else -1
    except OSError:
        return -1


def find_trainer_state(root: str) -> str | None:
    """The ``trainer_state.json`` under ``root`` with the highest ``global_step`` (the last
    checkpoint's state holds the whole log history up to it), or None."""
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        p = os.path.join(dirpath, FILE_NAME)
        if FILE_NAME in filenames and os.path.isfile(p):  # not a dangling link, a FIFO, a device
            found.append((_global_step(p), os.path.getmtime(p), p))
    if not found:
        return None
    return max(found)[2]
