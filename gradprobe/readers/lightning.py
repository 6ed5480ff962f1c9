"""Lightning ``CSVLogger`` ``metrics.csv`` -> ``RunLog`` (``source.kind = "lightning-csv"``).

``CSVLogger`` writes one row per ``log`` call site and step, with sparse columns: a row of
``train_loss_step`` at step 12, a row of ``lr-Adam`` (``LearningRateMonitor``) at the same
step, a row of ``val_loss`` and ``train_loss_epoch`` at the last step of an epoch. Every
non-empty cell is one record at the row's ``step`` (and ``epoch`` where the row has one);
rows of one step are merged. Names follow the mapping of :mod:`gradprobe.readers.mapping`:
``train_loss_step`` beats ``train_loss_epoch`` for the loss, ``lr-<Optimizer>`` gives the
lr (and names the optimizer class), ``grad_2.0_norm_total`` the total gradient norm and
``grad_2.0_norm/<param>`` the per-layer norms of ``lightning.pytorch.utilities.grad_norm``.

Expected columns: ``step`` and at least one mapped metric; anything else raises
:class:`LogError` naming the columns found. A truncated last line (a killed writer) or rows
with the wrong number of cells are skipped and noted in ``source["skipped"]``.
"""

from __future__ import annotations

import csv
import io
import math
import os

from gradprobe.readers import mapping as M
from gradprobe.readers.records import RawRecords, build_runlog, to_float, to_step, training_steps
from gradprobe.runlog import LogError, RunLog
from gradprobe.runlog.runlog import open_regular

KIND = "lightning-csv"
FILE_NAME = "metrics.csv"


def _columns_hint(header: list[str]) -> str:
    shown = ", ".join(header[:12]) + (f", ... ({len(header)} in all)" if len(header) > 12 else "")
    return shown or "none"


def parse_metrics_csv(path: str) -> tuple[RawRecords, list[str]]:
    """The raw records of a ``metrics.csv`` and notes on what was skipped."""
    name = os.path.basename(path)
    try:
        with open_regular(path) as f:
            data = f.read()
    except OSError as exc:
        raise LogError(f"{path}: cannot read ({exc.strerror or exc})") from None
    if not data.strip():
        raise LogError(f"{path}: empty file")
    if b"\x00" in data[:4096]:
        raise LogError(f"{path}: not a CSV file (binary data)")
    text = data.decode("utf-8", "replace")
    rows: list[list[str]] = []
    unparsable = 0
    reader = csv.reader(io.StringIO(text, newline=""))
    while True:
        try:
            rows.append(next(reader))
        except StopIteration:
            break
        except csv.Error:
            unparsable += 1
    if not rows:
        raise LogError(f"{path}: not a readable CSV file")
    header = [h.strip() for h in rows[0]]
    if "step" not in header:
        raise LogError(
            f"{path}: CSV without the expected columns: a Lightning metrics.csv has a 'step' column "
            f"and metric columns (found: {_columns_hint(header)})"
        )
    metric_names = [h for h in header if h not in ("step", "epoch")]
    res = M.resolve(metric_names)
    if not {c for c in res.columns if c != "epoch"} and not res.layers:
        raise LogError(
            f"{path}: CSV without the expected columns: no loss, grad-norm, lr or eval-loss column "
            f"(found: {_columns_hint(header)}); map yours with ${M.ENV_VAR} (docs/readers.md)"
        )
    i_step = header.index("step")
    i_epoch = header.index("epoch") if "epoch" in header else None
    body = rows[1:]
    skipped: list[str] = []
    truncated = not text.endswith(("\n", "\r")) and body
    if truncated and len(body[-1]) != len(header):
        body = body[:-1]
        skipped.append(f"{name}: truncated last line skipped")
    bad_shape = bad_step = 0
    raw = RawRecords()
    for row in body:
        if not row:
            continue
        if len(row) != len(header):
            bad_shape += 1
            continue
        step = to_step(row[i_step])
        if step is None:
            bad_step += 1
            continue
        epoch = to_float(row[i_epoch]) if i_epoch is not None else None
        for j, cell in enumerate(row):
            if j == i_step or j == i_epoch or not cell.strip():
                continue
            v = to_float(cell)
            if v is None:
                continue
            raw.add(header[j], step, v, epoch=epoch if epoch is not None else math.nan)
    if unparsable:
        skipped.append(f"{name}: {unparsable} unparsable line(s) skipped")
    if bad_shape:
        skipped.append(f"{name}: {bad_shape} row(s) with a wrong number of cells skipped")
    if bad_step:
        skipped.append(f"{name}: {bad_step} row(s) without a numeric step skipped")
    return raw, skipped


def read_metrics_csv(path: str) -> RunLog:
    """Reads a Lightning ``metrics.csv``."""
    raw, skipped = parse_metrics_csv(path)
    if not len(raw):
        raise LogError(f"{path}: metrics.csv without data rows (nothing was logged yet)")
    return build_runlog(raw, kind=KIND, path=path, skipped=skipped, what="metrics.csv")


def find_metrics_csv(root: str) -> tuple[str | None, list[tuple[str, int]]]:
    """The ``metrics.csv`` under ``root`` with the most logged training steps (Lightning
    writes one per ``version_N`` run; runs are not merged), and the others with theirs."""
    found: list[tuple[int, float, str]] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        p = os.path.join(dirpath, FILE_NAME)
        if FILE_NAME in filenames and os.path.isfile(p):  # not a dangling link, a FIFO, a device
            try:
                raw, _ = parse_metrics_csv(p)
                steps = training_steps(raw)
            except LogError:
                steps = -1
            found.append((steps, os.path.getmtime(p), p))
    if not found:
        return None, []
    found.sort(reverse=True)
    return found[0][2], [(p, s) for s, _, p in found[1:]]
