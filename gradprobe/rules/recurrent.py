"""GP1xx: recurrent state and graph retention (undetached-hidden-state, long-lookback, graph-retained-across-steps).

These rules read what the recorder measures about graphs that outlive their step: the
``state_age`` column (how many steps back the graph of a tensor entering a watched module
reaches), the ``state_age`` and ``exception`` events, ``graphs_alive`` (weakref sentinels
in the loss graphs of earlier steps), backward time and memory per step, and the sampled
gradient-through-time profiles of recurrent modules (``bptt`` samples, summarised by
:func:`gradprobe.stats.bptt_summary`).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from gradprobe.analysis import (
    HORIZON_FRACTION,
    RunContext,
    footprint_growth,
    EXPLODING_FAR_OVER_NEAR,
    optimizer_family,
    bptt_profiles,
    explodes_from_the_first_profile,
    nonfinite_timeline,
    footprint_grows,
    run_exceptions,
    trend,
    warmup_rows,
)
from gradprobe.analysis.graphs import GROWS_MEMORY_BYTES, GROWS_TIME_FACTOR
from gradprobe.rules.base import Confidence, Explanation, Field, Finding, Flag, Ramp, Recommendation, Rule, register

#: Substrings of the two errors a carried, undetached state raises.
SECOND_BACKWARD_ERROR = "backward through the graph a second time"
INPLACE_ERROR = "modified by an inplace operation"
#: How much of an error message the evidence keeps.
MESSAGE_CHARS = 200
#: GP101: a state whose age at the last aged step is at least this fraction of the steps
#: elapsed since the first is never detached (its age grows every step).
UNBOUNDED_AGE = 0.8
#: GP101: backward time and memory trends are measured from this many aged steps; the message
#: names a trend from this rank correlation (``footprint_grows`` decides the confidence).
MIN_TREND_STEPS = 4
TREND_SPEARMAN = 0.5
#: GP101's silent form: confidence is whole from 10 aged steps.
AGED_STEPS_FULL = 10
MIB = 2**20
#: GP102's vanishing form: the window is at least this many horizons long (three quarters or
#: more of it carries < 1e-3 of the peak gradient) and at least ``MIN_UNUSED_WINDOW`` steps
#: longer than the horizon (conventional windows, such as word-level LMs' 35 to 70 tokens,
#: cost a few dozen cheap steps and stay quiet while a young model's horizon is still growing).
LOOKBACK_OVER_HORIZON = 4
MIN_UNUSED_WINDOW = 64
#: GP102's exploding form: an error from three decades of amplification over the window; the
#: recommended window keeps it within one decade.
EXPLODING_ERROR = 1000
AMPLIFICATION_KEPT = 10
#: math.exp overflows past ~709: the amplification is reported up to exp(700).
EXP_MAX = 700.0
#: How many sampled steps the evidence lists.
SHOWN_STEPS = 10

_DETACH_SNIPPET = """\
state = None
for x, y in loader:
    optimizer.zero_grad()
    out, state = model(x, state)            # {module} receives the carried state
    loss = criterion(out, y)
    loss.backward()                         # no retain_graph=True
    optimizer.step()
    # cut the graph after the step: the values carry over, the old graph is freed
    state = tuple(s.detach() for s in state) if isinstance(state, tuple) else state.detach()"""

#: GP103: graphs at least 2 steps old still alive: 8 rising on half the steps is an accumulation
#: (``total_loss += loss``), and 100 is a leak whatever the shape (see the rule's docstring).
GRAPHS_ALIVE = 8
GRAPHS_RISING = 0.5
GRAPHS_LEAK = 100
#: GP103: confidence in retained graphs is whole at 50 alive (half way to a leak of any shape).
GRAPHS_FULL = 50
#: GP103's growth form: at least 20 steps; backward time rank-correlated with the step >= 0.8
#: and x3 from the first to the last quarter; memory rank-correlated >= 0.9, up by >= 16 MiB
#: and by >= 10% of process RSS (>= 5% of CUDA allocated memory), rising in every quarter.
GROWTH_MIN_STEPS = 20
GROWTH_TIME_SPEARMAN = 0.8
GROWTH_TIME_FACTOR = 3.0
#: ... unless the rest of the step (step time - backward time: the forward pass, the optimizer,
#: the data) grew with it, by at least the square root of backward's factor: longer sequences
#: or larger batches make every part of a step slower alike, while a backward that walks
#: retained graphs again grows alone.
GROWTH_REST_EXPONENT = 0.5
GROWTH_MEMORY_SPEARMAN = 0.9
GROWTH_MEMORY_RSS = 1.1
GROWTH_MEMORY_CUDA = 1.05
GROWTH_MEMORY_BYTES = 16 * 2**20
#: GP103's growth form: fewest steps after the warm-up, and memory records, a trend is judged on.
GROWTH_MIN_ROWS = 16
GROWTH_MIN_MEMORY_RECORDS = 8

_ITEM_SNIPPET = """\
running_loss = 0.0
for x, y in loader:
    ...
    loss.backward()
    optimizer.step()
    running_loss += loss.item()       # a float: the step's graph is freed
    history.append(loss.detach())     # or detach tensors you keep"""


def _first_sentence(msg: str) -> str:
    """The error's first sentence (PyTorch messages run on with hints), at most 200 chars."""
    head = msg.split(". ")[0].split("\n")[0].strip()
    return head[:MESSAGE_CHARS]


def _recurrent_names(ctx: RunContext) -> set[str]:
    return {str(r.get("module")) for r in ctx.recurrent if r.get("module")}


def _root_names(ctx: RunContext) -> set[str]:
    out = set()
    for m in ctx.meta.get("models") or []:
        name, cls = str(m.get("name", "")), str(m.get("class", ""))
        out.add(name)
        out.add(cls[:1].lower() + cls[1:])
        out.add(cls.lower())
    return out


@register
class UndetachedHiddenState(Rule):
    """A tensor made in step s enters the forward of step s+k still attached to step s's graph.

    Signals: the ``state_age`` column (k, per step, the largest over watched modules) and
    ``state_age_module``; the ``state_age`` events (first module to receive an aged tensor);
    ``exception`` events; backward time, memory and ``retain_graph`` per step.

    Fires on either form:

    * crash form: an ``exception`` event whose message contains "Trying to backward through
      the graph a second time" (the old graph's saved tensors were freed by the previous
      backward), or "modified by an inplace operation" when that backward used
      ``retain_graph=True`` (the old graph was kept, and the optimizer's in-place update
      bumped the version counters of the weights it saved). The error is attributed to a
      carried state when a state age >= 1 was measured at or before the failing step, or,
      failing that, when the failing backward was the first of its step (nothing earlier in
      the same step could have freed the graph). A "second time" error on a later backward of
      a step with no measured state age is two backward calls on one graph, not this rule's.
    * silent form: ``state_age >= 1`` on at least 2 steps. It runs without an error when the
      old graph saves no tensors (an EMA built from additions), when parameters are updated
      through ``p.data`` (no version bump), or under autocast with ``retain_graph=True``
      (the graph saved the casted weight copies, which the optimizer never touches).

    Threshold: age >= 1 is the physical boundary: a state detached after every step (age 0)
    is truncated BPTT and healthy; any age >= 1 means each backward walks earlier steps'
    graphs again, with stale weights, and the graph, backward time and memory grow.

    Severity: ``error`` for the crash form and for an age that keeps growing (the state is
    never detached: the age at the last aged step is >= 80% of the steps elapsed since the
    first); ``warning`` for a bounded age (the state is detached every few steps).

    Confidence: crash form 0.6 (the error names the mechanism), most of the rest when a state
    age >= 1 was measured (the carried tensor is seen, not inferred), the last bit when the
    message is the one its ``retain_graph`` setting predicts. Silent form 0.6 (the age is
    measured), more with more aged steps, and more when backward time or memory grows with the
    step over the aged steps (rank correlation >= 0.7, and backward time x1.5 from the first
    to the last quarter or memory up by >= 1 MiB).

    Exception events stamped before this run's ``created`` time come from an earlier run
    that used the same directory and are ignored.
    """

    code = "GP101"
    slug = "undetached-hidden-state"
    severity = "error"
    severities = {
        "error": "the crash form, or a state whose age grows every step (never detached)",
        "warning": "a state detached every few steps (its age stays bounded)",
    }
    title = "Hidden state carried across steps without detach"
    requires = ("state_age",)
    confidence = {
        "crash form": Confidence(0.6, Flag(0.35, "a state age >= 1 was measured"),
                                 Flag(0.05, "the message is the one its retain_graph setting predicts")),
        "silent form": Confidence(0.6, Ramp(0.3, "aged steps", span=AGED_STEPS_FULL),
                                  Flag(0.1, "backward time or memory grows")),
    }
    final_when = ("the run crashed on the carried graph, or the state's age grows every step: each step adds a "
                  "graph that every later backward walks again, so backward time and memory only grow")
    evidence_fields = {
        "max_state_age": Field("oldest graph reached", "steps"),
        "aged_steps": Field("steps with a carried graph", "steps"),
        "module": Field("module receiving the state"),
        "retain_graph_steps": Field("steps with retain_graph=True", "steps"),
        "age_grows_without_bound": Field("age grows every step"),
        "backward_time_spearman": Field("backward time trend (rank correlation)"),
        "backward_time_late_over_early": Field("backward time, last quarter over first", "x"),
        "memory_spearman": Field("memory trend (rank correlation)"),
        "memory_growth_bytes": Field("memory growth", "bytes"),
        "exception_step": Field("failing step", "step"),
        "exception": Field("error"),
        "crash_form": Field("crash form"),
        "exception_retain_graph": Field("failing backward used retain_graph"),
        "exception_state_age": Field("state age at the failure", "steps"),
    }
    explanation = Explanation(
        what=(
            "A tensor produced in one step (an RNN hidden state, a memory, an EMA) enters the "
            "forward of a later step still attached to the earlier step's autograd graph."
        ),
        why=(
            "Each backward then runs into the graphs of all earlier steps. Without "
            "retain_graph it fails at step 2 with \"Trying to backward through the graph a "
            "second time\"; with retain_graph=True and an optimizer it fails with \"modified by "
            "an inplace operation\"; and when the old graph saves no tensors, when parameters "
            "are updated through p.data, or under autocast (the graph saves casted weight "
            "copies), it runs on silently: gradients include stale contributions from every "
            "earlier step, and graph size, backward time and memory grow every step until the "
            "run slows to a crawl or runs out of memory."
        ),
        causes=(
            "`hidden = model(x, hidden)` in a loop with no `hidden.detach()`; detaching only on "
            "an error path; retain_graph=True added to silence the first error; a running "
            "statistic (EMA, memory bank) computed from tensors that require grad."
        ),
        fix=(
            "Detach the carried state after optimizer.step() (truncated BPTT): `state = "
            "state.detach()` (or a tuple of detached tensors for an LSTM). Remove "
            "retain_graph=True: it only hides the bug."
        ),
        example=(
            "out, h = lstm(x, h); loss.backward(retain_graph=True); opt.step()  # h still holds "
            "the graph -> add `h = tuple(t.detach() for t in h)` after opt.step()"
        ),
    )

    def _module(self, ctx: RunContext) -> str | None:
        """The module that received the carried state: a recurrent module among those that
        saw an aged input, else the innermost (longest name) non-root one, else any."""
        names: list[str] = []
        col = ctx.steps["state_age_module"]
        ages = ctx.col("state_age")
        for name, age in zip(col, ages):
            if age > 0 and isinstance(name, str) and name:
                names.append(name)
        for e in ctx.events("state_age") + run_exceptions(ctx):
            m = e.get("module") or e.get("state_age_module")
            if isinstance(m, str) and m:
                names.append(m)
        if not names:
            return None
        rec = _recurrent_names(ctx)
        for n in names:
            if n in rec:
                return n
        roots = _root_names(ctx)
        inner = [n for n in names if n not in roots]
        pool = inner or names
        counts = {n: pool.count(n) for n in pool}
        return max(counts, key=lambda n: (counts[n], n.count("."), -pool.index(n)))

    def _crash(self, ctx: RunContext) -> tuple[dict[str, Any], bool, bool] | None:
        """(exception event, state age measured, message matches retain_graph) or None."""
        ages = ctx.col("state_age")
        nb = ctx.col("n_backward", np.int64)
        aged_events = ctx.events("state_age")
        for e in run_exceptions(ctx):
            msg = str(e.get("message") or "")
            second = SECOND_BACKWARD_ERROR in msg
            inplace = INPLACE_ERROR in msg
            if not (second or inplace):
                continue
            step = e.get("step")
            step = int(step) if isinstance(step, (int, float)) else None
            retain = bool(e.get("retain_graph"))
            if inplace and not retain:
                rows = np.flatnonzero(ctx.step == step) if step is not None else np.array([], dtype=int)
                retain = bool(rows.size and ctx.col("retain_graph", bool)[rows].any())
                if not retain and not ctx.col("retain_graph", bool).any():
                    continue  # an ordinary in-place bug, not a retained old graph
            measured = int(e.get("state_age") or 0) >= 1
            if not measured and step is not None:
                measured = bool((ages[ctx.step <= step] >= 1).any()) or any(
                    isinstance(a.get("step"), (int, float)) and a["step"] <= step for a in aged_events
                )
            if not measured:
                rows = np.flatnonzero(ctx.step == step) if step is not None else np.array([], dtype=int)
                first_backward = bool(rows.size == 0 or nb[rows[0]] <= 1)
                if not (first_backward and second):
                    continue
            consistent = (second and not retain) or (inplace and retain)
            return e, measured, consistent
        return None

    def check(self, ctx: RunContext) -> list[Finding]:
        ages = ctx.col("state_age")
        aged = np.flatnonzero(ages >= 1)
        crash = self._crash(ctx)
        if crash is None and aged.size < 2:
            return []
        module = self._module(ctx)
        where = f"`{module}`" if module else "a watched module"
        retain_rows = ctx.col("retain_graph", bool)
        evidence: dict[str, Any] = {
            "max_state_age": int(ages.max()) if ages.size else 0,
            "aged_steps": int(aged.size),
            "module": module,
            "retain_graph_steps": int(retain_rows.sum()),
        }
        first_step = ctx.step_at(int(aged[0])) if aged.size else None
        recs = [
            Recommendation.code(
                f"Detach the state carried into {where} after optimizer.step(); drop retain_graph=True",
                _DETACH_SNIPPET.format(module=module or "the model"),
            )
        ]
        growth = footprint_growth(ctx, aged) if aged.size >= MIN_TREND_STEPS else {}
        evidence.update({k: v for k, v in growth.items() if isinstance(v, float) and math.isfinite(v)})

        if crash is not None:
            e, measured, consistent = crash
            step = e.get("step")
            step = int(step) if isinstance(step, (int, float)) else first_step
            if step is not None:
                first_step = step if first_step is None else min(first_step, step)
            msg = str(e.get("message") or "")
            kind = "second-backward" if SECOND_BACKWARD_ERROR in msg else "inplace-after-retain_graph"
            evidence.update({"exception_step": step, "exception": _first_sentence(msg), "crash_form": kind,
                             "exception_retain_graph": bool(e.get("retain_graph")),
                             "exception_state_age": int(e.get("state_age") or 0)})
            conf = self.confidence["crash form"](measured, consistent)
            if kind == "second-backward":
                why = ("the previous backward freed that graph's saved tensors, so the next backward "
                       "cannot go through it again")
            else:
                why = ("retain_graph=True kept the old graph, and the optimizer's in-place update "
                       "changed the weights it saved")
            age = evidence["exception_state_age"] or evidence["max_state_age"]
            seen = (f"the state entering {where} reached {age} step(s) back" if measured else
                    "the failing backward was the first of its step, so the graph it walked into was built in an "
                    "earlier step")
            message = (
                f"Step {step} failed with \"{evidence['exception']}\": a tensor carried from an earlier step "
                f"into {where} is still attached to that step's graph ({seen}); {why}. "
                "Detach the state after optimizer.step(); retain_graph=True would only hide the error."
            )
            return [self.finding(confidence=conf, message=message, first_step=first_step, layer=module,
                                 evidence=evidence, recommendations=recs, final=True)]

        # silent form
        last_age = int(ages[aged[-1]])
        elapsed = int(ctx.step[aged[-1]] - ctx.step[aged[0]]) + 1
        unbounded = last_age >= UNBOUNDED_AGE * elapsed
        evidence["age_grows_without_bound"] = bool(unbounded)
        grows = footprint_grows(growth)
        conf = self.confidence["silent form"](aged.size, grows)
        reasons = []
        if not ctx.optimizer and ctx.optimizer_class is None:
            reasons.append("parameters are updated without an optimizer (p.data), so no version counter changes")
        if ctx.amp_dtype and ctx.amp_dtype != "none":
            reasons.append(f"under {ctx.amp_dtype} autocast the graph saved casted weight copies, not the weights")
        if retain_rows[aged].any():
            reasons.append("backward used retain_graph=True")
        if not reasons:
            reasons.append("the old graph saves no tensors (e.g. an average built from additions)")
        trend = []
        bt_ratio = evidence.get("backward_time_late_over_early", 0.0)
        if bt_ratio >= GROWS_TIME_FACTOR and evidence.get("backward_time_spearman", 0.0) >= TREND_SPEARMAN:
            trend.append(f"backward time x{bt_ratio:.2g} from the first to the last quarter")
        if evidence.get("memory_growth_bytes", 0) >= GROWS_MEMORY_BYTES and \
                evidence.get("memory_spearman", 0.0) >= TREND_SPEARMAN:
            trend.append(f"memory +{evidence['memory_growth_bytes'] / MIB:.1f} MiB")
        if unbounded:
            shape = f"its age grows every step (reaching {last_age} steps)"
        else:
            shape = f"it is detached only every few steps (age up to {evidence['max_state_age']})"
        message = (
            f"From step {first_step} the state entering {where} is still attached to the graphs of earlier "
            f"steps: {shape}. Each backward walks all of them again with stale weights"
            + (f" ({'; '.join(trend)})" if trend else "")
            + f". It runs without an error because {'; '.join(reasons)}."
        )
        sev = "error" if unbounded else "warning"
        return [self.finding(confidence=conf, message=message, first_step=first_step, layer=module,
                             evidence=evidence, recommendations=recs, severity=sev, final=unbounded)]


@register
class LongLookback(Rule):
    """The BPTT window is far longer than the horizon gradients carry over, or gradients grow
    backwards through time.

    Signals: the sampled gradient-through-time profile of each recurrent module: for a random
    projection v of the last output h_T, ||d(v.h_T)/dx_t|| at every step back k, summarised by
    :func:`gradprobe.stats.bptt_summary` into ``horizon`` (first k after the peak where the
    profile falls below 1e-3 of its peak), ``reaches_end``, ``growth_per_step`` and
    ``far_over_near`` (farthest 10% of the window over the nearest 10%); the window length T
    (``lookback``). Only the later half of the samples of the healthy part of the run
    (:func:`gradprobe.analysis.healthy_end`; all samples when none precede it) is used (at
    least 1): profiles taken after the run diverged are NaN or describe the breakdown, and horizons grow as
    a model learns to carry information, so the latest ones describe the run.

    The profile is both the gradient a far input receives and the sensitivity of the output to
    that input: beyond the horizon, inputs change the output by less than 1e-3 of the nearest
    ones and receive no gradient to learn from.

    * vanishing through time: median horizon h with the profile not reaching the window's end,
      T >= 4 h (three quarters or more of the window carries < 1e-3 of the peak gradient) and
      T - h >= 64 steps (conventional windows, such as word-level LMs' 35 to 70 tokens, cost a
      few dozen cheap steps and stay quiet while a young model's horizon is still growing).
      Severity ``warning``: the run is not broken, but no dependency longer than h is being
      learned and the window's length costs activation memory and sequential compute. (With a
      loss on every step, every input still gets gradient from its own nearby outputs; what
      the long window does not buy is a longer dependency.) The fix, shorter windows with the
      state carried between them (truncated BPTT), is a stochastic-gradient practice: under a
      line-search optimizer (LBFGS), whose objective is the loss over the full sequences and
      whose curvature estimates need that one deterministic function, the sequences' length
      is the problem's, not a window to shorten, and the vanishing form is not judged.
    * exploding through time: median ``far_over_near`` >= 10 with ``growth_per_step`` > 1: the
      inputs at the far end of the window receive an order of magnitude more gradient than
      the recent ones, the recurrent Jacobian amplifies along the window, and the update is
      dominated by the distant past. Severity ``error`` from 1000x (three decades), or when
      the run went non-finite after it; else ``warning``.

    Recommended ``lookback``: vanishing: ceil(2 h); geometric decay reaches 1e-3 of the peak
    at h and 1e-6 at 2h, which leaves room for the horizon to grow as training proceeds.
    Exploding: floor(ln(10) / ln(growth_per_step)), the window over which the amplification
    stays within 10x. Never above the current window.

    Causes: the exploding form follows recurrent weights of spectral radius above 1. When the
    first sampled profile did not explode yet, the weights grew into that regime, which a
    too-high learning rate does by blowing them up: the finding then names lr-too-high, which
    the engine links when present and not later. A profile that explodes from the first sample
    was made by the initialisation or the architecture, and it is the root cause of what
    follows (exploding gradients, non-finite values, a harm that looks like a too-high lr).

    Confidence: how far past its threshold on a log scale (vanishing: T/h, 0.5 at 4, whole at
    40; exploding: far_over_near, 0.5 at 10, whole at 1000), times the fraction of the used
    samples that meet the condition (one odd profile is not the run's).
    """

    code = "GP102"
    slug = "long-lookback"
    severity = "warning"
    severities = {
        "warning": "vanishing through time, or gradients growing backwards through time by less than 1000x",
        "error": "gradients growing backwards through time by 1000x (three decades) or more over the window, or "
                 "the run went non-finite after they did",
    }
    title = "BPTT window far longer than the gradient horizon"
    requires = ("bptt",)
    confidence = {
        "exploding": (Confidence(0.5, Ramp(0.5, "far_over_near", start=EXPLODING_FAR_OVER_NEAR, span=2.0, log=True))
                      * Confidence(0, Ramp(1.0, "fraction of samples"))),
        "vanishing": (Confidence(0.5, Ramp(0.5, "T / h", start=LOOKBACK_OVER_HORIZON, log=True))
                      * Confidence(0, Ramp(1.0, "fraction of samples"))),
    }
    #: the exploding form, when the recurrent weights grew into it (the first profile did not
    #: explode yet): a too-high lr blows the weights up
    causes_on_evidence = ("lr-too-high",)
    evidence_fields = {
        "lookback": Field("window (lookback)", "steps"),
        "samples": Field("profiles used", "steps"),
        "sampled_steps": Field("sampled at", "step"),
        "horizon_fraction": Field("horizon threshold (fraction of the peak)"),
        "hidden_size": Field("hidden size"),
        "far_over_near": Field("gradient at the far end over the near end", "x"),
        "growth_per_step": Field("gradient growth per step back", "x"),
        "amplification_over_window": Field("amplification over the window", "x"),
        "median_horizon": Field("gradient horizon", "steps"),
        "lookback_over_horizon": Field("window over horizon", "x"),
        "window_fraction_without_gradient": Field("window without gradient", "%"),
    }
    computes = {
        "lookback": "vanishing: ceil(2 x median gradient horizon) (horizon: steps back until the "
                    "gradient-through-time profile falls below 1e-3 of its peak); exploding: "
                    "floor(ln 10 / ln growth_per_step); never above the current window",
    }
    explanation = Explanation(
        what=(
            "The sequence length (BPTT window, lookback) is far longer than the number of steps "
            "over which gradients actually carry (vanishing through time), or gradients grow "
            "backwards through time (exploding through time)."
        ),
        why=(
            "Beyond the gradient horizon the far inputs no longer influence an output nor receive "
            "gradient from it: the model cannot learn dependencies that long, and the window's "
            "length buys activation memory and sequential compute, not context. When gradients "
            "grow backwards in time, each update is dominated by the most distant inputs and one "
            "unlucky batch explodes the weights."
        ),
        causes=(
            "A lookback chosen from the data's timescale rather than what the model can carry "
            "(e.g. 400 steps into a small LSTM/GRU); vanilla RNNs with recurrent weights of "
            "spectral radius above 1; small hidden sizes."
        ),
        fix=(
            "Train on windows a small multiple of the measured horizon (carry the detached state "
            "between windows if context matters); for exploding profiles, shorten the window, "
            "clip gradients, and use orthogonal recurrent initialisation or a gated cell."
        ),
        example=(
            "GRU(hidden=8) on 400-step windows: the gradient reaching step t-14 is already 1e-3 "
            "of the peak, so no dependency longer than ~14 steps is learned -> lookback 28."
        ),
    )

    def check(self, ctx: RunContext) -> list[Finding]:
        findings = []
        meta_lb = {str(r.get("module")): r.get("lookback") for r in ctx.recurrent}
        for module, piv in bptt_profiles(ctx).items():
            recent = piv.iloc[len(piv) // 2:] if len(piv) >= 2 else piv
            f = self._check_module(ctx, module, piv, recent, meta_lb.get(module))
            if f is not None:
                findings.append(f)
        return findings

    def _check_module(self, ctx: RunContext, module: str, piv: Any, recent: Any, meta_lookback: Any) -> Finding | None:
        def col(name: str) -> np.ndarray:
            return recent[name].to_numpy(dtype=np.float64) if name in recent else np.full(len(recent), np.nan)

        T_s = col("lookback")
        T = float(np.nanmedian(T_s)) if np.isfinite(T_s).any() else float(meta_lookback or 0)
        if not T or T < 2:
            return None
        horizon, reaches = col("horizon"), col("reaches_end")
        growth, fon = col("growth_per_step"), col("far_over_near")
        n = len(recent)
        evidence: dict[str, Any] = {"lookback": int(T), "samples": int(n),
                                    "sampled_steps": [int(s) for s in recent.index[:SHOWN_STEPS]],
                                    "horizon_fraction": HORIZON_FRACTION}
        hidden = recent["hidden_size"].iloc[-1] if "hidden_size" in recent else None
        if hidden is not None and np.isfinite(hidden):
            evidence["hidden_size"] = int(hidden)

        # exploding through time
        g_med = float(np.nanmedian(growth)) if np.isfinite(growth).any() else float("nan")
        f_med = float(np.nanmedian(fon)) if np.isfinite(fon).any() else float("nan")
        if np.isfinite(f_med) and np.isfinite(g_med) and f_med >= EXPLODING_FAR_OVER_NEAR and g_med > 1:
            ok = np.nan_to_num(fon, nan=0.0) >= EXPLODING_FAR_OVER_NEAR
            frac = float(ok.mean())
            first = self._first_step(piv, lambda r: r.get("far_over_near", 0) >= EXPLODING_FAR_OVER_NEAR
                                     and r.get("growth_per_step", 0) > 1)
            suggested = int(min(T, max(2, math.floor(math.log(AMPLIFICATION_KEPT) / math.log(g_med))))) \
                if g_med > 1 else int(T)
            amplification = math.exp(min(EXP_MAX, (T - 1) * math.log(g_med)))
            evidence.update({"far_over_near": f_med, "growth_per_step": g_med,
                             "amplification_over_window": amplification})
            recs = []
            if suggested < T:
                recs.append(Recommendation.hyperparameter(
                    "lookback", int(T), suggested,
                    f"growth_per_step {g_med:.3g}: over {suggested} steps the gradient grows at most 10x "
                    f"(floor(ln 10 / ln {g_med:.3g}))"))
            recs.append(Recommendation.code(
                "Clip gradients and initialise the recurrent weights orthogonally (spectral radius 1)",
                f"for name, p in model.{module}.named_parameters():\n"
                "    if 'weight_hh' in name:\n"
                "        torch.nn.init.orthogonal_(p)\n"
                "...\n"
                "torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)"))
            message = (
                f"Gradients grow backwards through time in `{module}`: each step back multiplies the "
                f"gradient by {g_med:.3g}, so the inputs at the far end of the {int(T)}-step window get "
                f"{f_med:.3g}x the gradient of the nearest ones. Updates are dominated by the distant past "
                "and explode easily."
            )
            # weights that grew into the exploding regime may be the lr's doing; a profile that
            # explodes from the first sample was made by the initialisation or the architecture
            follow = [] if explodes_from_the_first_profile(ctx, module) else ["lr-too-high"]
            tl = nonfinite_timeline(ctx)
            broke = any(s is not None and (first is None or s >= first) for s in (tl.loss_step, tl.grad_step,
                                                                                  tl.param_step))
            return self.finding(confidence=self.confidence["exploding"](f_med, frac),
                                message=message, first_step=first, layer=module, evidence=evidence,
                                recommendations=recs, severity="error" if f_med >= EXPLODING_ERROR or broke else "warning",
                                title="Gradients explode backwards through time", may_follow=follow)

        # vanishing through time
        if not np.isfinite(horizon).any():
            return None
        if optimizer_family(ctx) == "other":
            return None  # a line-search optimizer's objective is the full sequences: their length is no BPTT choice
        h = float(np.nanmedian(horizon))
        reach = float(np.nanmedian(reaches)) if np.isfinite(reaches).any() else 0.0
        if reach >= 0.5:
            return None
        h_eff = max(h, 1.0)
        if T < LOOKBACK_OVER_HORIZON * h_eff or T - h < MIN_UNUSED_WINDOW:
            return None
        ok = ((np.nan_to_num(horizon, nan=np.inf) * LOOKBACK_OVER_HORIZON <= T)
              & (T - np.nan_to_num(horizon, nan=np.inf) >= MIN_UNUSED_WINDOW))
        frac = float(ok.mean())
        suggested = int(min(T, math.ceil(2 * h_eff)))
        first = self._first_step(piv, lambda r: r.get("reaches_end", 1) < 0.5
                                 and LOOKBACK_OVER_HORIZON * max(r.get("horizon", np.inf), 1) <= r.get("lookback", T)
                                 and r.get("lookback", T) - r.get("horizon", np.inf) >= MIN_UNUSED_WINDOW)
        evidence.update({"median_horizon": h, "lookback_over_horizon": T / h_eff,
                         "window_fraction_without_gradient": 1 - h / T})
        if np.isfinite(g_med):
            evidence["growth_per_step"] = g_med
        recs = [Recommendation.hyperparameter(
            "lookback", int(T), suggested,
            f"2 x the median gradient horizon ({h:.0f} steps: the gradient falls below {HORIZON_FRACTION:g} of its "
            f"peak {h:.0f} steps back, so about 1e-6 at {suggested})")]
        message = (
            f"`{module}` is trained on {int(T)}-step windows but its gradient through time dies out after about "
            f"{h:.0f} steps: the last output's sensitivity to inputs further back is below {HORIZON_FRACTION:g} of "
            f"its peak. The model carries information and gradient over ~{h:.0f} steps, not {int(T)}: "
            f"{100 * (1 - h / T):.0f}% of the window teaches it no longer dependency, and {suggested}-step windows "
            "would give every output the same gradient to within 1e-6 for a fraction of the activation memory "
            "per window."
        )
        return self.finding(confidence=self.confidence["vanishing"](T / h_eff, frac), message=message,
                            first_step=first, layer=module, evidence=evidence, recommendations=recs)

    @staticmethod
    def _first_step(piv: Any, cond: Any) -> int | None:
        for step, row in piv.iterrows():
            r = {k: float(v) for k, v in row.items() if v == v}
            try:
                if cond(r):
                    return int(step)
            except (TypeError, ValueError):
                continue
        return int(piv.index[0]) if len(piv) else None


@register
class GraphRetainedAcrossSteps(Rule):
    """Graphs of earlier steps stay alive, or memory/backward time grow step over step, with
    no carried state (``state_age`` 0 throughout).

    Signals: ``graphs_alive`` (loss graphs of steps at least 2 steps old still reachable: a
    weakref sentinel in each step's loss graph has not been freed), ``state_age``,
    ``backward_time``, ``memory``.

    * retained graphs (``error``): ``graphs_alive`` reaches >= 8 and rises on at least half of
      the steps, or reaches >= 100. Keeping the previous step's loss for a comparison holds 1
      graph (not counted: only graphs >= 2 steps old are) and a short fixed-size history
      plateaus; 8 graphs rising step after step is an accumulation (``total_loss += loss``,
      ``losses.append(loss)``) that ends in an out-of-memory error; 100 retained step graphs
      is a leak whatever the shape.
    * growth without a visible cause (``warning``, only when no state age was measured and
      at least 20 steps exist), after the warm-up (first max(1, min(50, n // 10)) steps):
      backward time rank-correlated with the step (Spearman >= 0.8) and x3 from the first to
      the last quarter (each backward walks more graph: a carried tensor the recorder could
      not date) while the rest of the step did not grow alike (by at least the square root of
      backward's factor: longer sequences or larger batches slow every part of a step), or memory rank-correlated with the step (>= 0.9), up by >= 16 MiB and by
      >= 10% of process RSS (>= 5% of CUDA allocated memory, which has no allocator or
      library noise) from the first to the last quarter, and still rising in every quarter
      (each quarter's median >= 1/8 of the total growth above the previous one): a
      steady-state step allocates and frees the same memory, and a cache that fills once
      plateaus.

    Severity: ``error`` for retained graphs (memory grows until the process dies), ``warning``
    for growth without a visible cause (a leak whose source the recorder could not name).

    Confidence: retained graphs: 0.5 (a count, exact) rising with the graphs alive, times how
    steadily they rose (whole from rising on half the steps, or with a leak of 100 graphs,
    whatever the shape). Growth: the rank correlation itself (how steadily it grows).
    """

    code = "GP103"
    slug = "graph-retained-across-steps"
    severity = "error"
    severities = {
        "error": "graphs of earlier steps stay alive and accumulate",
        "warning": "memory or backward time grows step over step and the recorder could not name what holds it",
    }
    title = "Autograd graphs of earlier steps kept alive"
    requires = ("state_age",)
    confidence = {
        "retained graphs": (Confidence(0.5, Ramp(0.5, "max graphs_alive", span=GRAPHS_FULL))
                            * Confidence(0, Ramp(1.0, "rising fraction", span=GRAPHS_RISING),
                                         Flag(1.0, f"{GRAPHS_LEAK}+ graphs are alive"))),
        "growth": Confidence(0, Ramp(1.0, "rank correlation")),
    }
    #: a state carried into a module without detach keeps every earlier step's graph alive too
    causes = ("undetached-hidden-state",)
    final_when = ("graphs of earlier steps stay alive and their number rises step after step: nothing frees them, "
                  "so memory grows until the process runs out")
    evidence_fields = {
        "max_graphs_alive": Field("graphs of earlier steps alive", "steps"),
        "rising_fraction": Field("steps on which it rose", "%"),
        "graphs_per_step": Field("added per step"),
        "max_state_age": Field("oldest carried state", "steps"),
        "steps_used": Field("steps compared", "steps"),
        "backward_time_spearman": Field("backward time trend (rank correlation)"),
        "backward_time_late_over_early": Field("backward time, last quarter over first", "x"),
        "memory_spearman": Field("memory trend (rank correlation)"),
        "memory_late_over_early": Field("memory, last quarter over first", "x"),
        "memory_growth_bytes": Field("memory growth", "bytes"),
        "memory_kind": Field("memory measured"),
    }
    explanation = Explanation(
        what=(
            "Memory or backward time grows step over step, or the graphs of earlier steps stay "
            "alive, without a hidden state being carried: a tensor that still holds its graph is "
            "kept across steps (e.g. `total_loss += loss`)."
        ),
        why=(
            "Every retained loss keeps its whole graph (activations included) alive: memory grows "
            "linearly until the process runs out of memory, and the run gets slower as it goes."
        ),
        causes=(
            "`total_loss += loss` or `losses.append(loss)` for logging; storing outputs or "
            "attention maps that require grad; a cache or replay buffer filled with non-detached "
            "tensors."
        ),
        fix="Accumulate Python floats (`loss.item()`) or detached tensors (`loss.detach()`).",
        example="total_loss += loss  ->  total_loss += loss.item()",
    )

    def check(self, ctx: RunContext) -> list[Finding]:
        alive = ctx.col("graphs_alive")
        ages = ctx.col("state_age")
        recs = [Recommendation.code("Accumulate loss.item() (a float) or loss.detach(), not the loss tensor",
                                    _ITEM_SNIPPET)]
        if alive.size and alive.max() >= GRAPHS_ALIVE:
            rising = float((np.diff(alive) > 0).mean()) if alive.size > 1 else 0.0
            top = float(alive.max())
            if rising >= GRAPHS_RISING or top >= GRAPHS_LEAK:
                rows = np.flatnonzero(alive >= 1)
                first = ctx.step_at(int(rows[0]))
                span = max(1, int(np.argmax(alive)) - int(rows[0]))
                evidence: dict[str, Any] = {"max_graphs_alive": int(top), "rising_fraction": rising,
                                            "graphs_per_step": float(top - alive[rows[0]]) / span,
                                            "max_state_age": int(ages.max()) if ages.size else 0}
                grown = footprint_growth(ctx, rows)
                evidence.update({k: v for k, v in grown.items() if isinstance(v, float) and math.isfinite(v)})
                conf = self.confidence["retained graphs"](top, rising, top >= GRAPHS_LEAK)
                message = (
                    f"From step {first} the loss graphs of earlier steps stay alive: {int(top)} graphs at least "
                    f"2 steps old were still reachable, about {evidence['graphs_per_step']:.2g} more every step. "
                    "Something keeps a tensor that holds its graph (typically `total_loss += loss`), so every step's "
                    "activations are kept until the process runs out of memory."
                )
                return [self.finding(confidence=conf, message=message, first_step=first, evidence=evidence,
                                     recommendations=recs, final=rising >= GRAPHS_RISING)]
        if ages.size == 0 or ages.max() > 0 or ctx.n < GROWTH_MIN_STEPS:
            return []
        return self._growth_form(ctx, recs)

    def _growth_form(self, ctx: RunContext, recs: list[Recommendation]) -> list[Finding]:
        rows = np.arange(ctx.n)[warmup_rows(ctx):]
        if rows.size < GROWTH_MIN_ROWS:
            return []
        evidence: dict[str, Any] = {"steps_used": int(rows.size), "max_state_age": 0}
        what, spearman = [], 0.0
        if "timing" in ctx.signals:
            bt = trend(ctx.col("backward_time")[rows], ctx.step[rows])
            rest = trend(ctx.col("step_time")[rows] - ctx.col("backward_time")[rows], ctx.step[rows])
            alike = (math.isfinite(rest.late_over_early) and math.isfinite(bt.late_over_early)
                     and rest.late_over_early >= bt.late_over_early ** GROWTH_REST_EXPONENT)
            if bt.rises(GROWTH_TIME_SPEARMAN, GROWTH_TIME_FACTOR) and not alike:
                evidence.update(backward_time_spearman=bt.spearman, backward_time_late_over_early=bt.late_over_early)
                what.append(f"backward time grew x{bt.late_over_early:.2g}")
                spearman = max(spearman, bt.spearman)
        if "memory" in ctx.signals:
            mem = ctx.col("memory")[rows]
            mem = np.where(mem > 0, mem, np.nan)
            tr = trend(mem, ctx.step[rows])
            kind = str(ctx.meta.get("memory_kind", "rss"))
            rel_needed = GROWTH_MEMORY_CUDA if kind.startswith("cuda") else GROWTH_MEMORY_RSS
            if tr.n >= GROWTH_MIN_MEMORY_RECORDS and tr.rises(GROWTH_MEMORY_SPEARMAN, rel_needed):
                grown = tr.quarters[-1] - tr.quarters[0]
                if grown >= GROWTH_MEMORY_BYTES and tr.steady:
                    evidence.update(memory_spearman=tr.spearman, memory_late_over_early=tr.late_over_early,
                                    memory_growth_bytes=grown, memory_kind=ctx.meta.get("memory_kind", "rss"))
                    what.append(f"memory grew by {grown / MIB:.0f} MiB (x{tr.late_over_early:.2g})")
                    spearman = max(spearman, tr.spearman)
        if not what:
            return []
        first = ctx.step_at(int(rows[0]))
        message = (
            f"From step {first}, {' and '.join(what)} step over step while no carried state was seen "
            "(state age 0) and no loss graph stayed alive: something built in each step is kept and, for "
            "backward time, walked again by later backward calls (a tensor carried from step to step outside "
            "the watched modules, a cache of non-detached tensors)."
        )
        return [self.finding(confidence=self.confidence["growth"](spearman), message=message, first_step=first,
                             evidence=evidence, recommendations=recs, severity="warning",
                             title="Memory or backward time grows step over step")]
