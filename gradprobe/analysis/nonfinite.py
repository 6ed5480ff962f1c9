"""Where NaN/Inf first appeared in a run, in causal order inputs -> loss -> gradients ->
parameters (THE non-finite timeline), and whether the optimizer drove the run there."""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from gradprobe.analysis.context import RunContext, quantity
from gradprobe.analysis.numeric import risen_before
from gradprobe.analysis.steps import scaler_rows


class NonfiniteTimeline:
    """Where NaN/Inf first appeared, in causal order inputs -> loss -> gradients -> parameters.
    One definition for GP401-GP404 (and for anyone who needs "did the run go non-finite").

    Within one step the order is fixed: the batch enters, the loss is computed, backward
    fills the gradients, the optimizer updates the parameters. Parameters that are non-finite
    after step s can only affect the forward of step s+1 and later.

    Attributes:
        loss: row mask, a loss (backward root or loss-function output with grad) was NaN/Inf.
        grad_raw: row mask, a gradient was NaN/Inf (any reason).
        grad: ``grad_raw`` minus the steps a GradScaler skipped on purpose and the steps
            discarded under a GradScaler without ``update()`` (those are GP305's evidence).
        param: row mask, parameters NaN/Inf after the optimizer step.
        loss_step, grad_step, param_step: first step of each (None: never).
        inputs: sampled input/target evidence: a list of dicts (step, probe, target,
            nonfinite, numel), only samples that cannot come from non-finite parameters.
        input_observed_step: first sampled step with non-finite inputs or targets.
        input_step: the first step bounded with the per-step evidence: the first step after
            the last clean sample, at or before ``input_observed_step``, whose loss or
            gradients went non-finite while the parameters were still finite; or, exactly,
            ``data_step`` when that is earlier.
        data: row mask, the recorder counted NaN/Inf entries in the step's data (the watched
            models' first input, float loss targets; column ``data_nonfinite``, every step)
            at or before ``param_step``.
        data_step: first step of ``data`` (None: never, or not measured).
        data_measured: the log has the per-step data count.
    """

    def __init__(self, ctx: RunContext) -> None:
        st = ctx.steps

        def flag(name: str) -> np.ndarray:
            return st[name].to_numpy(dtype=bool)

        self.loss = flag("loss_nonfinite") | flag("loss_fn_nonfinite") | np.isinf(ctx.loss)
        self.grad_raw = (st["grad_nonfinite_layers"].to_numpy() > 0) | np.isinf(ctx.grad_norm)
        srows = scaler_rows(ctx)
        self.skipped_mask = ctx.skipped & self.grad_raw
        # scaled steps whose gradients were looked at and thrown away without update(): the
        # recorder's abandoned rows, and a last row the run ended in before update()
        not_updated = ~flag("scaler_updated") & (st["optimizer_steps"].to_numpy() == 0)
        self.discarded_mask = srows & self.grad_raw & ~ctx.skipped & (flag("abandoned") | not_updated)
        self.grad = self.grad_raw & ~ctx.skipped & ~self.discarded_mask
        self.param = st["param_nonfinite_layers"].to_numpy() > 0
        self.loss_step = ctx.first_step_where(self.loss)
        self.grad_step = ctx.first_step_where(self.grad)
        self.param_step = ctx.first_step_where(self.param)
        self.inputs: list[dict[str, Any]] = []
        self.input_observed_step: int | None = None
        self.input_step: int | None = None
        self.last_clean_input_step: int | None = None
        self._inputs(ctx)
        counts = st["data_nonfinite"].to_numpy() if "data_nonfinite" in st else np.full(len(st), -1)
        self.data_measured = bool((counts >= 0).any())
        self.data = counts > 0
        if self.param_step is not None:  # a chained model's input can come from NaN weights
            self.data &= ctx.step <= self.param_step
        self.data_counts = counts
        self.data_step = ctx.first_step_where(self.data)
        if self.data_step is not None:  # observed, not inferred: the first observation wins
            seen = [self.data_step] + ([self.input_observed_step] if self.input_observed_step is not None else [])
            self.input_step = min(seen)

    def _inputs(self, ctx: RunContext) -> None:
        s = ctx.log.samples
        if s.empty:
            return
        sel = s[s["probe"].isin(["input", "first_layer", "target"]) & s["stat"].isin(["nonfinite", "numel"])]
        if sel.empty:
            return
        piv = sel.pivot_table(index=["step", "probe", "target"], columns="stat", values="value", aggfunc="max")
        piv = piv.reset_index()
        if "nonfinite" not in piv.columns:
            return
        pstep = self.param_step
        rows = []
        for rec in piv.to_dict("records"):
            step = int(rec["step"])
            probe, target = str(rec["probe"]), str(rec["target"])
            if target.endswith("]"):
                # an argument after the first (a carried hidden state, a mask, a cache) is the
                # model's own output of an earlier step, not data: a NaN there came from the
                # model, whatever the token ids beside it held
                continue
            data_input = probe == "input"
            # anything but the model's first input could come from non-finite parameters
            # (a normalisation before the first layer, a teacher's targets)
            if not data_input and pstep is not None and step > pstep:
                continue
            rows.append({"step": step, "probe": probe, "target": target,
                         "nonfinite": float(rec.get("nonfinite", 0.0) or 0.0),
                         "numel": float(rec.get("numel", math.nan))})
        bad = [r for r in rows if r["nonfinite"] > 0]
        if not bad:
            return
        self.inputs = bad
        observed = min(r["step"] for r in bad)
        self.input_observed_step = observed
        clean = [r["step"] for r in rows if r["step"] < observed]
        lo = max(clean) if clean else None
        self.last_clean_input_step = lo
        hits = (self.loss | self.grad_raw) & (ctx.step <= observed)
        if lo is not None:
            hits &= ctx.step > lo
        if pstep is not None:
            hits &= ctx.step <= pstep
        first = ctx.first_step_where(hits)
        self.input_step = first if first is not None else observed


@quantity
def nonfinite_timeline(ctx: RunContext) -> NonfiniteTimeline:
    return NonfiniteTimeline(ctx)


@quantity
def diverged_into_nonfinite(ctx: RunContext, step: int) -> bool:
    """The optimizer drove the run to NaN/Inf at ``step``: the loss or the gradient norm had
    risen to 3x its running median right before (:func:`~gradprobe.analysis.numeric.risen_before`:
    a divergence running away), or the parameters went non-finite first, from a finite loss
    and finite gradients (the update itself overflowed), with an optimizer whose eps is not 0
    (Adam's eps=0 makes 0/0 = NaN at any learning rate). A NaN that appears first in the loss
    or the gradients of a steady run is a loss or backward bug."""
    if not ctx.n:
        return False
    i0 = int(np.searchsorted(ctx.step, step))
    if risen_before(ctx.loss, i0) or risen_before(ctx.grad_norm, i0):
        return True
    tl = nonfinite_timeline(ctx)
    if tl.param_step != step:
        return False
    if (tl.loss_step is not None and tl.loss_step <= step) or (tl.grad_step is not None and tl.grad_step <= step):
        return False
    eps = ctx.hparams.get("eps")
    return not (ctx.adaptive and isinstance(eps, (int, float)) and eps == 0)
