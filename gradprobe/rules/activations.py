"""GP604-GP605: what the activations do (saturated-activations, dead-units).

The mechanics (see :mod:`gradprobe.rules.data` for the scale argument): a tanh/sigmoid unit at
its bound passes less than 2% of its gradient (derivative < 0.02 past |tanh| = 0.99); a ReLU
unit that is negative for every input passes none and never recovers by itself. Statistics
come from the sampled ``activation`` and ``gates`` probes (``gradprobe/probe/deep.py``):
output statistics of parametric, saturating and ReLU-family modules by call order, on
grad-enabled forwards only, and recurrent gates recomputed from a slice of the batch.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pandas as pd

from gradprobe.analysis import (
    RunContext,
    first_layer_name,
    loss_curve,
    input_constant,
    sample_table,
    sustained,
)
from gradprobe.rules.base import (
    Confidence,
    Explanation,
    Field,
    Finding,
    Ramp,
    Recommendation,
    Rule,
    register,
)

#: GP604: half of a module's outputs (or of a gate's values) at their bounds.
SATURATED = 0.5
#: GP605: half of a layer's units never active over a batch; 99% is an error.
DEAD = 0.5
DEAD_ALL = 0.99
#: GP605: units killed by training cost the run nothing when the loss still fell this fraction
#: of its level after they died (and by more than 3 standard errors of a window median).
LIVE_UNITS_FALL = 0.10
#: ... by more than this many standard errors of a window median
MEDIAN_SES = 3.0
#: GP605: batches of fewer examples are not judged (a healthy unit is off for all of them too often).
MIN_BATCH = 8
#: GP604/GP605: confidence is whole this far above the threshold (0.9 of the units: all but a few).
SATURATION_SPAN = 0.4


# ------------------------------------------------------------------------------------------
@register
class SaturatedActivations(Rule):
    """Fires when sigmoid/tanh units stay at their bounds beyond what the architecture intends:
    at least half of a module's outputs (``saturated_frac``: |tanh| > 0.99, sigmoid < 0.01 or
    > 0.99), of a recurrent gate's values stuck closed (``gates`` ``low_frac``: < 0.01), or of
    a recurrent tanh candidate at +-1 (``sat_frac``), sustained through the run
    (:func:`_sustained`: at least 3 samples, the later half's median >= 0.5 and the last
    sample >= 0.4). Past those bounds the derivative is below 0.02: half of the units pass
    less than 2% of their gradient.

    Gates count only when closed: a closed gate blocks both its signal and its gradient (an
    input gate at 0 makes the cell ignore its input, an output gate at 0 silences it, a forget
    or GRU update gate at 0 erases the memory every step), while an open gate is a
    pass-through: an LSTM forget gate or a GRU update gate near 1 is the designed memory path
    (and the usual forget-bias initialisation puts it there), and gates that learned to open
    fully are doing their job. Not counted either: a saturating module that produces the
    model's output (confident predictions are the goal of a sigmoid output under BCE);
    saturation only at initialisation that training resolves.

    Causes (linked by the engine when present and not later): unnormalised inputs, a poor
    initialisation, a too-high lr, weights grown without decay, or an exploding step that
    blew the weights up.

    Severity: the harm of a saturated unit is the learning it stops (its gradient fades). Units
    saturated from the first sampled step, before any update (raw features of scale 100, an
    initialisation too large for tanh), stop it from the start: warning. Units that training
    drove to their bounds (below half saturated at the first sampled step) stopped it only
    if the loss was falling before they saturated (by ``LossCurve.significance``: 3 standard
    errors and 10% of its start) and did not go on falling past where it was before they
    saturated (10% of that level and 3 standard errors, ``LIVE_UNITS_FALL``, as GP605 has it for
    units training killed; a loss that spiked as the weights blew up and came back only part of
    the way did not): warning.
    Otherwise info: a loss that went on falling learned through them (saturated units still
    carry their sign forward, and an adaptive optimizer rescales the faded gradients of the
    weights before them), and a loss that was not falling before they saturated was not
    stopped by them (a critic regressing returns that grow as the policy improves saturates its
    last tanh layer to reach them, while its loss follows the returns up). A loss centred on 0
    (a policy surrogate) says nothing either way: warning.

    Confidence: 0.5 at the threshold, whole when nearly all (0.9) of the worst module's units
    are saturated.
    """

    code = "GP604"
    slug = "saturated-activations"
    severity = "warning"
    severities = {
        "info": "training drove them to their bounds, and the loss went on falling after (it learned through them) "
                "or was not falling before (they did not stop it)",
        "warning": "saturated from the start, or driven there by training while the loss was falling, after which "
                   "it stopped falling",
    }
    title = "Sigmoid/tanh units are stuck at their bounds"
    requires = ("activations|gates",)
    confidence = Confidence(0.5, Ramp(0.5, "the worst module's saturated fraction", start=SATURATED,
                                      span=SATURATION_SPAN))
    causes = ("input-scale", "poor-initialization", "lr-too-high", "missing-weight-decay", "exploding-gradients")
    evidence_fields = {
        "saturated": Field("saturated modules"),
        "threshold": Field("threshold", "%"),
    }
    explanation = Explanation(
        what="Sigmoid or tanh units (LSTM/GRU gates included) that sit at their bounds for most inputs throughout "
        "training, beyond what the architecture intends (an LSTM forget gate near 1 is by design and not flagged).",
        why="A saturated unit's derivative is below 0.02: gradients through it vanish and the unit stops learning; "
        "saturated gates make a recurrent cell ignore its input or its state.",
        causes="Unnormalised inputs; initial weights too large for tanh/sigmoid; a learning rate that blew the weights "
        "up; weights that grew without weight decay.",
        fix="Normalise the inputs, initialise with Xavier (gain 5/3 for tanh), add LayerNorm before the nonlinearity, "
        "lower the learning rate.",
        example="nn.Tanh after a Linear fed raw features of scale 100: 93% of the outputs at +-1 from step 0 to the end.",
    )

    def check(self, ctx: RunContext) -> list[Finding]:
        hits: list[dict[str, Any]] = []
        act = sample_table(ctx, "activation")
        if not act.empty and "saturated_frac" in act:
            first_step = int(act["step"].min())
            first = act[act["step"] == first_step]
            output_module = str(first.sort_values("index")["target"].iloc[-1]) if len(first) else None
            sat = act[act["saturated_frac"].notna()]
            for (name, call), g in sat.groupby(["target", "call"], sort=False):
                if name == output_module and call == 0:
                    continue
                g = g.sort_values("step")
                v = g["saturated_frac"].to_numpy(dtype=np.float64)
                if sustained(v, SATURATED):
                    hits.append({"layer": str(name), "kind": "module", "fraction": float(np.median(v[v.size // 2:])),
                                 "first_step": int(g.loc[g["saturated_frac"] >= SATURATED, "step"].min()),
                                 "samples": int(v.size), "at_start": float(v[0])})
        gates = sample_table(ctx, "gates")
        if not gates.empty:
            for name, g in gates.groupby("target", sort=False):
                gate = str(name).rsplit(".", 1)[-1]
                g = g.sort_values("step")
                if "sat_frac" in g and g["sat_frac"].notna().any():
                    v = g["sat_frac"].to_numpy(dtype=np.float64)
                elif "low_frac" in g:
                    v = g["low_frac"].to_numpy(dtype=np.float64)  # closed; open gates pass signal and gradient
                else:
                    continue
                if sustained(v, SATURATED):
                    steps = g["step"].to_numpy()
                    hits.append({"layer": str(name), "kind": "gate", "gate": gate,
                                 "fraction": float(np.median(v[v.size // 2:])),
                                 "first_step": int(steps[np.argmax(v >= SATURATED)]), "samples": int(v.size),
                                 "at_start": float(v[0])})
        if not hits:
            return []
        worst = max(hits, key=lambda h: h["fraction"])
        conf = self.confidence(worst["fraction"])
        listed = ", ".join(f"{h['layer']} ({h['fraction']:.0%})" for h in sorted(hits, key=lambda h: -h["fraction"])[:6])
        msg = (f"Sigmoid/tanh outputs stay at their bounds through the run: {listed}. Units there pass less than 2% of "
               f"their gradient.")
        sev = "warning"
        if all(h["at_start"] < SATURATED for h in hits):  # training drove every one of them there
            onset = min(h["first_step"] for h in hits)
            fell = _loss_fell_after(ctx, onset, from_before=True)
            before = self._fell_before(ctx, onset)
            if fell is not None:
                sev = "info"
                msg += (f" Training drove them there (from step {onset}), and the loss fell {fell:.0%} after: it "
                        f"learned through them.")
            elif before is False:
                sev = "info"
                msg += (f" Training drove them there (from step {onset}) while the loss was not falling: they did not "
                        f"stop it (a regression onto targets that grow, as a critic's returns do, saturates the last "
                        f"hidden layer to reach them).")
        snippet = ("# keep the pre-activations O(1): standardised inputs, xavier init with the tanh gain,\n"
                   "# or a LayerNorm in front of the nonlinearity\n"
                   "nn.init.xavier_uniform_(linear.weight, gain=nn.init.calculate_gain(\"tanh\"))\n"
                   "block = nn.Sequential(nn.Linear(d_in, d), nn.LayerNorm(d), nn.Tanh())")
        ev = {"saturated": hits[:20], "threshold": SATURATED}
        return [self.finding(confidence=conf, message=msg, first_step=min(h["first_step"] for h in hits),
                             layer=worst["layer"], evidence=ev, severity=sev,
                             recommendations=[Recommendation.code("Bring the pre-activations back into range", snippet)])]

    @staticmethod
    def _fell_before(ctx: RunContext, step: int) -> bool | None:
        """Whether the training loss fell from its start to its level at ``step`` by more than
        noise explains (``LossCurve.significance``); None for a loss centred on 0 (a policy
        surrogate: its level says nothing) or one too short to tell."""
        curve = loss_curve(ctx)
        if curve.signed or curve.n < 2:
            return None
        k = curve.index_at(step)
        if k < curve.window or k >= curve.n:
            return None
        return bool(curve.start - curve.level_before(k) > curve.significance)


# ------------------------------------------------------------------------------------------
@register
class DeadUnits(Rule):
    """Fires when ReLU-family units never activate: a module's ``dead_frac`` (units not
    positive for any example of the batch) or, for a Linear/Conv fed by a functional ReLU, its
    ``input_dead_frac`` (input features exactly 0 for the whole batch) is at least 0.5,
    sustained through the run (:func:`_sustained`: at least 3 samples, the later half's median
    >= 0.5, the last >= 0.4). A dead ReLU passes no gradient, so nothing revives it: half the
    layer's capacity is gone. At initialisation a unit with zero-mean pre-activations is off
    for a batch of 32 with probability 2**-32; even trained networks rarely exceed 10-20%.

    Not counted: the first layer's input features, at every call (raw data may be legitimately
    all-zero, e.g. one-hot states fed to a policy step after step, or
    image borders or sparse one-hot features); a module whose outputs average below 0 (a
    LeakyReLU/ELU/GELU/SiLU: its negative side still passes gradient); an input_dead_frac
    right after an activation module (a ReLU module's zeros are its own dead_frac; a tanh's
    exact zeros are a zero initialisation, not dead ReLUs); batches of fewer than 8 examples
    (a healthy unit is off for all of them too often); a run whose input features do not vary
    over the batch (std exactly 0 on most sampled steps: every unit then sees one input and is
    on or off for the whole batch, which says nothing about the unit).

    Causes (linked by the engine when present and not later): a too-high lr or an exploding
    step that pushed the pre-activations negative, a poor initialisation, unnormalised inputs,
    saturated or closed recurrent units upstream (a closed LSTM output gate feeds the next
    layer a constant, which the same argument leaves uninformative), and constant targets
    (the loss is lowest for a constant output, and the gradient turns the units off to
    produce one).

    Severity: error when some layer is at least 99% dead (it passes essentially nothing, so
    every layer before it stops learning). Otherwise warning when training killed them: of the
    units alive at the run's first sampled step (before any update), at least half
    (``DEAD``) are dead later, ``(late - start) / (1 - start) >= 0.5``, the same threshold
    applied to the units an update could kill, and the loss stopped improving with them. When
    the training loss still fell by 10% of its level (``LIVE_UNITS_FALL``) and 3 standard errors
    of a window median from the step they died to the end, it is info: the live units carry
    the task (a wide layer trained at a large lr commonly ends with half its ReLUs off), the
    dead ones cost capacity the run did not need; the harm of a dead unit is the learning it
    stops, and this run's learning went on. A layer already that dead before the first
    update and no deader since is info: the data's geometry or the initialisation left those
    units off, not the training. The 2**-32 argument above assumes pre-activations that vary in
    sign over the batch; a network fed low-dimensional data (a 1-D GAN, a curve fit) has many
    units whose half-space misses the whole data from the start (measured: 25-48% of the second
    ReLU layer of a healthy 1-D sine fit, 58% of a weight-clipped WGAN critic's from step 0,
    both training as intended), and an initialisation that leaves most units off is reported
    with its number at info. Confidence: 0.5 at the threshold, whole when nearly all (0.9) of
    the worst layer's units are dead.
    """

    code = "GP605"
    slug = "dead-units"
    severity = "warning"
    title = "ReLU units never activate"
    severities = {
        "info": "half or more of a layer's units were already off before the first update and no more since "
        "(the data's geometry or the initialisation, not the training), or training killed them while the loss "
        "went on falling (the live units carry the task)",
        "warning": "training killed half or more of a layer's units that were alive at the start, and the loss "
                   "stopped improving with them",
        "error": "99% or more of a layer's units never activate: it passes essentially nothing",
    }
    requires = ("activations",)
    confidence = Confidence(0.5, Ramp(0.5, "the worst layer's dead fraction", start=DEAD, span=SATURATION_SPAN))
    evidence_fields = {
        "dead": Field("dead layers"),
        "threshold": Field("threshold", "%"),
    }
    causes = ("lr-too-high", "poor-initialization", "input-scale", "exploding-gradients", "saturated-activations",
              "degenerate-targets")
    explanation = Explanation(
        what="ReLU-family units that are zero for every example of the batch, sampled through the run: dead units.",
        why="A dead ReLU has zero gradient, so nothing brings it back; a layer with most units dead passes almost "
        "nothing, and every layer before it stops learning.",
        causes="A learning-rate spike that pushed the biases negative; negative bias initialisation; inputs or "
        "initial weights of the wrong scale; a large weight decay on a small layer.",
        fix="Lower the learning rate (or add warmup), initialise biases at 0 and weights with Kaiming, or use "
        "LeakyReLU/GELU, which keep a gradient on the negative side.",
        example="nn.init.constant_(layer.bias, -5.0): 100% of the 64 units of relu1 dead from step 0.",
    )

    def check(self, ctx: RunContext) -> list[Finding]:
        act = sample_table(ctx, "activation")
        if act.empty:
            return []
        tw = sample_table(ctx, "target")
        if not tw.empty and "numel" in tw and float(tw["numel"].median()) < MIN_BATCH:
            return []
        if input_constant(ctx):
            return []  # one input for the whole batch: every unit is on or off for all of it
        first_layer = first_layer_name(ctx)
        hits: list[dict[str, Any]] = []
        # calls of activation modules (ReLU family, tanh/sigmoid): an input_dead_frac right after
        # one is that module's own zeros (assessed through dead_frac, or tanh(0) of a zero init)
        act_at: set[tuple[int, int]] = set()
        for stat in ("dead_frac", "saturated_frac"):
            if stat in act:
                m = act[act[stat].notna()]
                act_at |= {(int(s), int(i)) for s, i in zip(m["step"], m["index"])}
        if "dead_frac" in act:
            dead = act[act["dead_frac"].notna()]
            for (name, call), g in dead.groupby(["target", "call"], sort=False):
                g = g.sort_values("step")
                if "mean" in g and float(g["mean"].median()) < 0:
                    continue
                v = g["dead_frac"].to_numpy(dtype=np.float64)
                if sustained(v, DEAD):
                    hits.append(self._hit(str(name), "units", g, v))
        if "input_dead_frac" in act:
            inp = act[act["input_dead_frac"].notna()]
            for (name, call), g in inp.groupby(["target", "call"], sort=False):
                if name == first_layer:  # raw data, at every call (a policy applied per time step)
                    continue
                g = g.sort_values("step")
                after_act = np.mean([(int(s), int(i) - 1) in act_at for s, i in zip(g["step"], g["index"])])
                if after_act >= 0.5:
                    continue
                v = g["input_dead_frac"].to_numpy(dtype=np.float64)
                if sustained(v, DEAD):
                    hits.append(self._hit(str(name), "inputs", g, v))
        if not hits:
            return []
        first = min(h["first_step"] for h in hits)
        strongest: dict[tuple[str, str], dict[str, Any]] = {}
        for h in hits:  # a module called several times a step (a critic on real and fake) is one layer
            k = (h["layer"], h["what"])
            if k not in strongest or h["fraction"] > strongest[k]["fraction"]:
                strongest[k] = h
        hits = list(strongest.values())
        worst = max(hits, key=lambda h: h["fraction"])
        for h in hits:  # the layer before any update: its first call of the first sampled step
            col = "dead_frac" if h["what"] == "units" else "input_dead_frac"
            mine = act[(act["target"].astype(str) == h["layer"]) & act[col].notna()]
            h["at_start"] = float(mine.sort_values(["step", "index"])[col].iloc[0]) if len(mine) else 0.0
        killed = [h for h in hits if h["at_start"] >= 1.0
                  or (h["fraction"] - h["at_start"]) / (1.0 - h["at_start"]) >= DEAD]
        sev = "error" if worst["fraction"] >= DEAD_ALL else "warning" if killed else "info"
        fell = _loss_fell_after(ctx, min(h["first_step"] for h in killed)) if sev == "warning" else None
        if fell is not None:
            sev = "info"
        conf = self.confidence(worst["fraction"])
        listed = ", ".join(
            f"{h['layer']} ({h['fraction']:.0%} of its {'units' if h['what'] == 'units' else 'input features'})"
            for h in sorted(hits, key=lambda h: -h["fraction"])[:6])
        msg = f"ReLU units never activate over the sampled batches: {listed}. Dead units pass no gradient and do not recover."
        if fell is not None:
            msg += (f" Training killed them, but the loss fell {fell:.0%} after they died: the live units carry the "
                    "task, and the dead ones cost capacity the run did not need.")
        elif sev == "info":
            msg += (" They were already off at the first sampled step, before any update, and training killed no more "
                    "of them: the data's geometry (low-dimensional inputs) or the initialisation left them off.")
        snippet = ("# keep a gradient on the negative side, and start the units alive\n"
                   "act = nn.LeakyReLU(0.01)            # or nn.GELU()\n"
                   "nn.init.kaiming_normal_(linear.weight, nonlinearity=\"relu\")\n"
                   "nn.init.zeros_(linear.bias)         # not negative")
        ev = {"dead": hits[:20], "threshold": DEAD}
        return [self.finding(confidence=conf, message=msg, first_step=first,
                             layer=worst["layer"], evidence=ev, severity=sev,
                             recommendations=[Recommendation.code("Revive the units", snippet)])]

    @staticmethod
    def _hit(name: str, what: str, g: pd.DataFrame, v: np.ndarray) -> dict[str, Any]:
        steps = g["step"].to_numpy()
        return {"layer": name, "what": what, "fraction": float(np.median(v[v.size // 2:])),
                "first_step": int(steps[np.argmax(v >= DEAD)]), "samples": int(v.size)}


def _loss_fell_after(ctx: RunContext, step: int, *, from_before: bool = False) -> float | None:
    """How far the training loss fell from its level at ``step`` to the end, when by at least
    ``LIVE_UNITS_FALL`` of that level and 3 standard errors of a window median; None otherwise,
    or for a loss centred on 0 (a policy surrogate: its level says nothing). ``from_before``:
    from the lower of that level and the level over the window before ``step`` (a loss that
    spiked as the weights blew up and came only part of the way back did not go on falling)."""
    curve = loss_curve(ctx)
    if curve.signed or curve.n < 2:
        return None
    k = curve.index_at(step)
    if k >= curve.n - curve.window:
        return None
    then = float(curve.smooth[k])
    before = curve.level_before(k) if from_before else math.nan
    if np.isfinite(before):
        then = min(then, before)
    fall = then - curve.final
    if then > 0 and fall >= LIVE_UNITS_FALL * then and fall > MEDIAN_SES * curve.median_se:
        return fall / then
    return None
