"""TensorBoard logs written by any program -> ``RunLog`` (``source.kind = "tensorboard"``).

Accepts a single event file (``events.out.tfevents.*``) or a log directory, searched
recursively. Files are read with TensorBoard's own ``event_file_loader`` (its raw record
reader plus the ``data_compat``/``dataclass_compat`` migrations ``EventFileLoader`` applies),
not with ``EventAccumulator``: the accumulator down-samples (``size_guidance``) and purges
"orphaned" steps after a restart, and both would hide the raw duplicate records GP701
needs. Every scalar is kept, in file order.

Runs. A *run* is one directory holding event files (TensorBoard's own notion): all files
in it are one run, read in file-name (= creation time) order and merged by step; children
written by ``SummaryWriter.add_scalars`` (``<run>/<tag>_<key>/``) belong to their parent
run, as the name ``<tag>_<key>`` (so ``loss_train``/``loss_val`` map to loss/eval loss).
Folders named after a split (Keras' ``train/`` and ``validation/``, an estimator's
``eval/``) are one run with their parent, their tags read as ``<folder>/<tag>``
(:func:`_attach_split_children`).
A directory holding several runs (one per ``trainer.fit``/``train()`` call, Lightning's
``version_N``, HF's ``runs/<date>``) is **not merged**: different runs restart their step
counts, so merging by step would interleave two trainings. The run with the most logged
training steps is analyzed (ties: a gradprobe run, then the most recently written), and
``source["skipped"]`` names the others. A gradprobe run directory found inside still goes to the gradprobe
reader when it is the one chosen.

Truncation. An event file cut off mid-record (a killed writer) or with a corrupt record is
read up to that record and ``source["skipped"]`` says how many records were lost.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass, field
from typing import Any

from gradprobe.readers import mapping as M
from gradprobe.readers.records import RawRecords, build_runlog, training_steps
from gradprobe.runlog import LogError, RunLog
from gradprobe.runlog.runlog import is_run_dir, open_regular

KIND = "tensorboard"
_HEADER = struct.Struct("<QI")


def is_event_file(path: str) -> bool:
    """An event file by name (TensorBoard finds runs by the same test)."""
    return "tfevents" in os.path.basename(path)


def framed_records(path: str) -> tuple[int, int]:
    """Counts complete TFRecord frames by their length headers (no parsing, no CRC check).

    Returns:
        (complete records, bytes after the last complete record).
    """
    size = os.path.getsize(path)
    n = 0
    offset = 0
    with open_regular(path) as f:
        while offset < size:
            hdr = f.read(_HEADER.size)
            if len(hdr) < _HEADER.size:
                break
            length, _ = _HEADER.unpack(hdr)
            end = offset + _HEADER.size + length + 4
            if end > size:
                break
            f.seek(end)
            offset = end
            n += 1
    return n, size - offset


def sniff_event_file(path: str) -> bool:
    """True if the file's first record parses as a TensorBoard ``Event``."""
    try:
        with open_regular(path) as f:
            hdr = f.read(_HEADER.size)
            if len(hdr) < _HEADER.size:
                return False
            length, _ = _HEADER.unpack(hdr)
            if length > 1 << 20:
                return False
            data = f.read(length)
            if len(data) < length:
                return False
        from tensorboard.compat.proto import event_pb2

        ev = event_pb2.Event.FromString(data)
        return ev.wall_time > 0 and (bool(ev.file_version) or ev.HasField("summary"))
    except Exception:  # noqa: BLE001 - not an event file
        return False


@dataclass
class _Run:
    directory: str
    files: list[str]
    raw: RawRecords = field(default_factory=RawRecords)
    skipped: list[str] = field(default_factory=list)
    children: list["_Run"] = field(default_factory=list)
    tags: set[str] = field(default_factory=set)

    @property
    def mtime(self) -> float:
        try:
            return max(os.path.getmtime(f) for f in self.files + [f for c in self.children for f in c.files])
        except (OSError, ValueError):
            return 0.0


def read_event_file(path: str, raw: RawRecords, skipped: list[str], *, origin: str | None = None,
                    plugins: dict[str, str] | None = None, initial_metadata: dict[str, Any] | None = None) -> int:
    """Appends every scalar of one event file to ``raw``; returns the records read.

    A truncated or corrupt tail is noted in ``skipped``; the records before it are kept.
    """
    from tensorboard.backend.event_processing import event_file_loader
    from tensorboard.compat.proto import event_pb2
    from tensorboard.util import tensor_util

    data_compat = event_file_loader.data_compat
    dataclass_compat = event_file_loader.dataclass_compat
    plugins = {} if plugins is None else plugins
    initial_metadata = {} if initial_metadata is None else initial_metadata
    name = origin or os.path.basename(path)
    try:
        framed, tail = framed_records(path)
    except OSError as exc:
        skipped.append(f"{name}: unreadable ({exc.strerror or exc})")
        return 0
    loaded = 0
    bad = 0
    try:
        loader = event_file_loader.RawEventFileLoader(path)
        for record in loader.Load():
            loaded += 1
            try:
                event = event_pb2.Event.FromString(record)
                events = dataclass_compat.migrate_event(data_compat.migrate_event(event), initial_metadata)
            except Exception:  # noqa: BLE001 - one undecodable record is skipped
                bad += 1
                continue
            for ev in events:
                if not ev.HasField("summary"):
                    continue
                for v in ev.summary.value:
                    if v.HasField("metadata") and v.metadata.plugin_data.plugin_name:
                        plugins[v.tag] = v.metadata.plugin_data.plugin_name
                    if plugins.get(v.tag) != "scalars" or not v.HasField("tensor"):
                        continue
                    t = v.tensor
                    if len(t.float_val) == 1:
                        value = float(t.float_val[0])
                    elif len(t.double_val) == 1:
                        value = float(t.double_val[0])
                    else:
                        try:
                            arr = tensor_util.make_ndarray(t)
                        except Exception:  # noqa: BLE001
                            continue
                        if arr.size != 1 or arr.dtype.kind not in "fiub":
                            continue
                        value = float(arr.reshape(-1)[0])
                    raw.add(v.tag, int(ev.step), value, wall_time=float(ev.wall_time), origin=origin)
    except OSError as exc:
        skipped.append(f"{name}: read error after {loaded} records ({exc.strerror or exc})")
        return loaded
    lost = max(framed - loaded, 0)
    if lost or tail:
        what = []
        if lost:
            what.append(f"{lost} record(s)")
        if tail:
            what.append(f"{tail} trailing bytes")
        skipped.append(f"{name}: truncated or corrupt after {loaded} records; {' and '.join(what)} skipped")
    if bad:
        skipped.append(f"{name}: {bad} undecodable record(s) skipped")
    return loaded


def _read_run(run: _Run, root: str) -> None:
    plugins: dict[str, str] = {}
    initial: dict[str, Any] = {}
    for f in run.files:
        rel = os.path.relpath(f, root) if root != f else os.path.basename(f)
        read_event_file(f, run.raw, run.skipped, origin=rel, plugins=plugins, initial_metadata=initial)
    run.tags = set(run.raw.name)


def _discover(root: str) -> tuple[dict[str, list[str]], list[str]]:
    """Event files grouped by directory, and gradprobe run directories (not descended)."""
    event_dirs: dict[str, list[str]] = {}
    gradprobe_runs: list[str] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        if is_run_dir(dirpath):
            gradprobe_runs.append(dirpath)
            dirnames[:] = []
            continue
        files = sorted(os.path.join(dirpath, f) for f in filenames if is_event_file(f))
        files = [f for f in files if os.path.isfile(f) and os.path.getsize(f) > 0]
        if files:
            event_dirs[dirpath] = files
    return event_dirs, gradprobe_runs


def _attach_add_scalars_children(runs: dict[str, _Run]) -> None:
    """``SummaryWriter.add_scalars(main, {key: v})`` writes tag ``main`` into the child
    directory ``<run>/<main with / as _>_<key>``: fold such children into their parent."""
    for d in sorted(runs, key=len, reverse=True):
        run = runs[d]
        parent = os.path.dirname(d)
        if parent not in runs or parent == d or not run.tags:
            continue
        base = os.path.basename(d)
        if all(base.startswith(t.replace("/", "_") + "_") for t in run.tags):
            runs[parent].raw.extend(run.raw, rename={t: base for t in run.tags})
            runs[parent].skipped.extend(run.skipped)
            runs[parent].children.append(run)
            del runs[d]


#: run directories named after a split: Keras' TensorBoard callback writes ``<logdir>/train``
#: and ``<logdir>/validation``, a TF estimator ``<model_dir>`` and ``<model_dir>/eval``,
#: hand-written loops ``runs/train`` and ``runs/val``
TRAIN_DIRS = frozenset({"train", "training"})
EVAL_DIRS = frozenset({"validation", "val", "valid", "eval", "evaluation", "test"})


def _attach_split_children(runs: dict[str, _Run]) -> None:
    """Directories named after a split are one run with their siblings and parent: their tags
    are read as ``<split>/<tag>`` (Keras' ``validation/epoch_loss`` is the eval loss of the
    run whose ``train/epoch_loss`` is the loss), as TensorBoard overlays them in one chart.

    An eval directory folds into its parent when the parent has event files of its own (a
    TF estimator's ``eval/``); otherwise a train directory and at least one eval directory
    side by side make one run at their parent (Keras). A lone ``test/`` run stays a run."""
    by_parent: dict[str, list[str]] = {}
    for d in runs:
        base = os.path.basename(d).lower()
        if base in TRAIN_DIRS or base in EVAL_DIRS:
            by_parent.setdefault(os.path.dirname(d), []).append(d)
    for parent, children in sorted(by_parent.items()):
        if parent in runs:
            members = [c for c in children if os.path.basename(c).lower() in EVAL_DIRS]
        elif any(os.path.basename(c).lower() in TRAIN_DIRS for c in children) and \
                any(os.path.basename(c).lower() in EVAL_DIRS for c in children):
            members = children
            runs[parent] = _Run(parent, [])
        else:
            continue
        target = runs[parent]
        for c in sorted(members):
            run = runs.pop(c)
            base = os.path.basename(c)
            target.raw.extend(run.raw, rename={t: f"{base}/{t}" for t in run.tags})
            target.skipped.extend(run.skipped)
            target.children.append(run)
            target.tags |= {f"{base}/{t}" for t in run.tags}


def read_tensorboard(path: str) -> RunLog:
    """Reads an event file or a TensorBoard log directory (see the module docstring)."""
    if not os.path.exists(path):
        raise LogError(f"{path}: no such file or directory")
    if os.path.isfile(path):
        if os.path.getsize(path) == 0:
            raise LogError(f"{path}: empty file")
        raw = RawRecords()
        skipped: list[str] = []
        n = read_event_file(path, raw, skipped, origin=os.path.basename(path))
        if n == 0:
            raise LogError(f"{path}: not a readable TensorBoard event file ({skipped[0] if skipped else 'no records'})")
        if not len(raw):
            raise LogError(f"{path}: TensorBoard event file without scalars")
        return build_runlog(raw, kind=KIND, path=path, skipped=skipped, what="event file",
                            meta={"tensorboard": {"run": ".", "files": [os.path.basename(path)]}})

    if is_run_dir(path):
        return RunLog.load(path)
    event_dirs, gradprobe_runs = _discover(path)
    if not event_dirs and not gradprobe_runs:
        raise LogError(f"{path}: no TensorBoard event files or gradprobe runs in this directory")
    runs = {d: _Run(d, files) for d, files in event_dirs.items()}
    for run in runs.values():
        _read_run(run, path)
    _attach_add_scalars_children(runs)
    _attach_split_children(runs)

    rules = M.active_rules()
    # (steps, is a gradprobe run, mtime, dir, run): most steps; on a tie the gradprobe run
    # (every signal, not a handful), then the newest
    candidates: list[tuple[int, int, float, str, Any]] = []
    for d, run in runs.items():
        candidates.append((training_steps(run.raw, rules), 0, run.mtime, d, run))
    loaded_gp: dict[str, RunLog] = {}
    for d in gradprobe_runs:
        try:
            log = RunLog.load(d)
        except LogError:
            continue
        loaded_gp[d] = log
        mtime = max((os.path.getmtime(os.path.join(d, f)) for f in os.listdir(d)), default=0.0)
        candidates.append((log.n_steps, 1, mtime, d, log))
    if not candidates:
        raise LogError(f"{path}: no readable run in this directory")
    candidates.sort(key=lambda c: (c[0], c[1], c[2]), reverse=True)
    steps, _, _, chosen_dir, chosen = candidates[0]
    if steps == 0:
        tags = sorted({t for r in runs.values() for t in r.tags})
        if not tags:
            raise LogError(f"{path}: TensorBoard event files without scalars")
        shown = ", ".join(tags[:12]) + (f", ... ({len(tags)} in all)" if len(tags) > 12 else "")
        raise LogError(
            f"{path}: no recognised metric in these TensorBoard logs (found: {shown}); "
            f"map your tags with ${M.ENV_VAR} or gradprobe.readers.register_tag (docs/readers.md)"
        )
    others = [(os.path.relpath(d, path), s) for s, _, _, d, _ in candidates[1:]]
    note = None
    if others:
        listed = ", ".join(f"{d} ({s} steps)" for d, s in others[:5]) + (f", ... ({len(others)} in all)" if len(others) > 5 else "")
        note = (f"{len(others)} other run(s) in {path} not analyzed: {listed}; "
                "runs are not merged (pass a run's own directory to analyze it)")
    rel = os.path.relpath(chosen_dir, path)
    if isinstance(chosen, RunLog):
        if note:
            chosen.source.setdefault("skipped", []).append(note)
        if rel != ".":
            chosen.source["run"] = rel
        return chosen
    run: _Run = chosen
    skipped = list(run.skipped) + ([note] if note else [])
    log = build_runlog(
        run.raw, kind=KIND, path=path, skipped=skipped, rules=rules, what="TensorBoard log",
        meta={"tensorboard": {
            "run": rel,
            "files": [os.path.relpath(f, path) for f in run.files] + [
                os.path.relpath(f, path) for c in run.children for f in c.files],
            "other_runs": [{"run": d, "steps": s} for d, s in others],
        }},
    )
    if rel != ".":
        log.source["run"] = rel
    return log

