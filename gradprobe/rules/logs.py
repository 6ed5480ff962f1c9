"""GP7xx: logging hygiene (duplicate-log-records).

gradprobe's own logs never duplicate a step. Logs written by other programs can: several
logging handlers or callbacks attached to one logger, several processes (every DDP rank, a
job launched twice) writing the same log, a run resumed from a checkpoint that logs the
steps after the checkpoint again. Readers keep the last value per step, so a duplicated log
silently mixes values from different writers; the rule says so, and how it happened.

Data contract (written by the readers in ``gradprobe/readers/records.py``, consumed here):

* ``meta["signals"]`` contains ``"duplicates"`` for a log whose raw records were kept.
* ``meta["raw_records"]``: ``{column: {"name": str, "step": [int, ...], "epoch": [...]?,
  "origin": [str | None, ...]?}}`` with every record of the stream in file order (``origin``:
  the file or writer a record came from, where the format has several).
* ``meta["duplicates"]``: ``{column: {"name", "records", "distinct_steps",
  "duplicated_steps", "extra_records", "examples": [[step, count], ...], "origins"?: [...]}}``
  for the streams that have a duplicated step (a summary; the rule falls back on it when
  ``raw_records`` is absent).
* Alternatively ``meta["raw_steps"]``: a list of step values in file order (one stream), or
  ``{column: [steps...]}``.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from gradprobe.analysis import RunContext
from gradprobe.rules.base import Confidence, Explanation, Field, Finding, Ramp, Recommendation, Rule, register

#: A stream counts from 2 extra records: one repeated record is routinely a final evaluation
#: run again at the last step (``trainer.evaluate()`` after ``train()``), not a logging fault.
MIN_EXTRA = 2
#: Columns in the order a finding prefers to describe them (the loss is what users read).
_PREFERRED = ("loss", "eval_loss", "grad_norm", "lr")
#: The streams the rules read as the run's loss and gradient: duplicates there are a warning
#: (the last record of a step wins, so values of different writers are mixed into the
#: diagnosis); duplicates only in other columns are a fact about the logging (info).
JUDGED_STREAMS = ("loss", "eval_loss", "grad_norm")


def _streams(meta: dict[str, Any]) -> dict[str, dict[str, Any]]:
    raw = meta.get("raw_records")
    if isinstance(raw, dict) and raw:
        return {str(k): v for k, v in raw.items() if isinstance(v, dict) and isinstance(v.get("step"), list)}
    rs = meta.get("raw_steps")
    if isinstance(rs, list):
        return {"loss": {"name": "loss", "step": rs}}
    if isinstance(rs, dict):
        return {str(k): {"name": str(k), "step": v} for k, v in rs.items() if isinstance(v, list)}
    return {}


def classify(steps: list[int], origins: list[Any] | None = None) -> dict[str, Any] | None:
    """How a stream's records repeat steps, from their order in the file.

    Returns None when no step repeats, else a dict: ``records``, ``distinct_steps``,
    ``duplicated_steps``, ``extra_records``, ``examples`` ([step, count]), and the patterns
    found: ``repeated`` (records repeating a step within one ascending run of the file: several
    handlers per log call, or a step counter that does not advance; ``repeat_factor`` = records
    per distinct step among the repeated ones), ``restarted`` (the steps went back to the
    stream's first step, or went back and re-logged a range without going past it: several
    processes writing one log, or the run started again into it), ``resumed`` (the steps went
    back part of the way and went on past where they had been: a run resumed from a
    checkpoint; ``resumes``: [[from_step, to_step]]).
    """
    s = np.asarray([int(x) for x in steps], dtype=np.int64)
    if s.size < 2:
        return None
    vals, counts = np.unique(s, return_counts=True)
    dup = counts > 1
    if not dup.any():
        return None
    out: dict[str, Any] = {
        "records": int(s.size), "distinct_steps": int(vals.size), "duplicated_steps": int(dup.sum()),
        "extra_records": int((counts[dup] - 1).sum()),
        "examples": [[int(v), int(c)] for v, c in zip(vals[dup][:10], counts[dup][:10])],
    }
    # split into ascending runs at every decrease of the step
    cuts = np.flatnonzero(np.diff(s) < 0) + 1
    bounds = [0, *cuts.tolist(), int(s.size)]
    runs = [s[a:b] for a, b in zip(bounds[:-1], bounds[1:])]
    repeated = sum(int(r.size - np.unique(r).size) for r in runs)
    first = int(s[0])
    restarts, resumes = 0, []
    seen_max = int(runs[0].max())
    for r in runs[1:]:
        lo, hi = int(r[0]), int(r.max())
        if lo <= first or hi <= seen_max:
            restarts += 1  # logged again from the start, or a range logged again without going on
        elif lo <= seen_max:
            resumes.append([seen_max, lo])
        seen_max = max(seen_max, hi)
    if repeated:
        rep_counts = counts[dup]
        out["repeated"] = repeated
        out["repeat_factor"] = float(np.median(rep_counts))
    if restarts:
        out["restarted"] = restarts
    if resumes:
        out["resumed"] = len(resumes)
        out["resumes"] = resumes[:10]
    if origins is not None:
        o = [str(x) for x in origins if x is not None]
        if o:
            out["origins"] = sorted(set(o))
    return out


@register
class DuplicateLogRecords(Rule):
    """Fires when a foreign log holds several records for the same step (or, for a stream
    logged per epoch, the same epoch), found from the raw records in file order (see the
    module docstring for the data contract). A log is a record of what happened once per
    step, so a second value for a step is never a second measurement; a stream counts from
    2 extra records (a single one is routinely a final evaluation run again at the last step).

    Three patterns, by how the steps run in file order:

    * repeated: within one ascending run the same step appears several times (every step k
      times: k handlers or callbacks per log call, or a step counter that does not advance,
      e.g. ``add_scalar(..., epoch)`` inside the batch loop): warning.
    * restarted: the steps go back to the stream's first step and are logged again, or go
      back and re-log a range without going past it (several processes or ranks writing one
      log, or a re-run into the same directory): warning.
    * resumed: the steps go back only part of the way and continue past where they were (a
      run resumed from a checkpoint re-logs the steps after it; TensorBoard shows both): info,
      a fact about the log, not a fault of the run.

    Repeated and restarted records are a warning when they are in a stream the rules read as
    the run's loss or gradient (``JUDGED_STREAMS``): the last record of a step wins, so values
    of different writers are mixed into the diagnosis. Only in other columns (the lr a monitor
    writes twice per step, an epoch counter) they are info: a fact about the logging that
    changes nothing the diagnosis reads.

    Confidence: 0.5 from the threshold (the records are counted exactly, but a few repeats can
    be a harmless re-run of an evaluation), whole when a quarter or more of the records of the
    stream with the most extra records are repeats.
    """

    code = "GP701"
    slug = "duplicate-log-records"
    severity = "warning"
    title = "The same step is logged several times"
    severities = {
        "warning": "records of the loss or gradient repeated within one pass of the log, or the log restarted",
        "info": "only a resume from a checkpoint re-logged steps, or only columns the diagnosis does not read "
                "(the lr, counters) repeat: facts about the log, not faults",
    }
    requires = ("duplicates",)
    confidence = Confidence(0.5, Ramp(0.5, "extra records / records", span=0.25))
    evidence_fields = {
        "streams": Field("duplicated streams"),
        "main": Field("main stream"),
    }
    explanation = Explanation(
        what="A log (TensorBoard, trainer_state.json, metrics.csv) holds several records for the same step or epoch.",
        why="Readers, dashboards and this analysis keep one value per step: duplicates silently mix values from "
        "different writers, and they usually mean the code runs a logger, a callback or a whole process more than once.",
        causes="A logging handler or callback added again at every epoch or trial; every DDP rank logging; a job "
        "launched twice into one directory; a step counter that does not advance (logging with step=epoch inside the "
        "batch loop); a run resumed from a checkpoint.",
        fix="Attach handlers once, log from rank 0 only, pass a global step that advances, give each run its own "
        "directory, and on resume drop the orphaned records (SummaryWriter(purge_step=...)).",
        example="Every epoch's validation results printed 4 times: the training loop added a handler per epoch.",
    )

    def check(self, ctx: RunContext) -> list[Finding]:
        streams = _streams(ctx.meta)
        found: dict[str, dict[str, Any]] = {}
        for col, rec in streams.items():
            c = classify(rec["step"], rec.get("origin"))
            if c is None or c["extra_records"] < MIN_EXTRA:
                continue
            c["name"] = rec.get("name", col)
            ep = rec.get("epoch")
            if isinstance(ep, list) and len(ep) == len(rec["step"]) and all(
                    e is not None and float(e) == float(s) for e, s in zip(ep, rec["step"])):
                c["unit"] = "epoch"
            found[col] = c
        if not found:
            summary = ctx.meta.get("duplicates") or {}
            for col, d in summary.items():
                if isinstance(d, dict) and d.get("extra_records", 0) >= MIN_EXTRA:
                    found[str(col)] = {k: d.get(k) for k in ("name", "records", "distinct_steps", "duplicated_steps",
                                                             "extra_records", "examples", "origins") if k in d}
        if not found:
            return []
        order = {c: i for i, c in enumerate(_PREFERRED)}
        main_col = max(found, key=lambda c: (found[c].get("extra_records", 0), -order.get(c, len(_PREFERRED))))
        main = found[main_col]
        unit = main.get("unit", "step")
        frac = main["extra_records"] / max(1, main["records"])
        conf = self.confidence(frac)
        faults = [p for p in ("repeated", "restarted") if any(p in f for f in found.values())]
        only_resumed = not faults and any("resumed" in f for f in found.values())
        # a duplicated loss mixes values from different writers into what the diagnosis reads;
        # a duplicated bookkeeping column (the lr a monitor writes twice, an epoch counter) does not
        judged = [c for c, f in found.items() if c in JUDGED_STREAMS and ("repeated" in f or "restarted" in f)]
        severity = "info" if only_resumed or not judged else "warning"
        ex = main.get("examples") or []
        ex_txt = ", ".join(f"{unit} {s} x{c}" for s, c in ex[:4])
        msg = (f"{main['duplicated_steps']} {unit}s of '{main.get('name', main_col)}' are logged more than once "
               f"({main['extra_records']} extra of {main['records']} records; e.g. {ex_txt})")
        others = [c for c in found if c != main_col]
        if others:
            msg += f"; also in {', '.join(found[c].get('name', c) for c in others[:5])}"
        explain = []
        if "repeated" in main:
            explain.append(f"within one pass of the log every duplicated {unit} appears {main['repeat_factor']:.0f} "
                           f"times: several handlers or callbacks write each record, or the {unit} counter does not "
                           f"advance")
        if "restarted" in main:
            src = f" from {len(main['origins'])} writers ({', '.join(main['origins'][:3])})" if len(main.get("origins", [])) > 1 else ""
            explain.append(f"the {unit}s go back and are logged again {main['restarted']} time(s){src}: several "
                           f"processes write the same log, or the run was started again into it")
        if "resumed" in main:
            r = main["resumes"][0]
            explain.append(f"the log goes back from {unit} {r[0]} to {r[1]} and continues: a resume from a checkpoint "
                           f"re-logged the {unit}s after it")
        if explain:
            msg += ". " + "; ".join(explain)[0].upper() + "; ".join(explain)[1:]
        msg += ". The analysis keeps the last record of each step."
        recs = []
        if "repeated" in main or "restarted" in main:
            recs.append(Recommendation.code(
                "Log once per step, from one process",
                "import logging, torch.distributed as dist\n"
                "log = logging.getLogger(\"train\")\n"
                "if not log.handlers:                 # configure once, not per epoch or per trial\n"
                "    log.addHandler(logging.StreamHandler())\n"
                "is_main = not dist.is_initialized() or dist.get_rank() == 0\n"
                "if is_main:\n"
                "    writer.add_scalar(\"train/loss\", loss.item(), global_step)  # a step that advances every batch"))
        if "resumed" in main:
            r = main["resumes"][0]
            recs.append(Recommendation.code(
                "Drop the orphaned records when resuming",
                f"writer = SummaryWriter(log_dir, purge_step={r[1]})   # the checkpoint's step"))
        ev = {"streams": found, "main": main_col}
        first = min((int(e[0]) for f in found.values() for e in (f.get("examples") or [])), default=None)
        return [self.finding(confidence=conf, message=msg, first_step=first, evidence=ev, recommendations=recs,
                             severity=severity)]
