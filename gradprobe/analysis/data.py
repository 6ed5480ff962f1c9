"""The data as the rules read it: features where they enter the model, targets and what a
model that ignores its input would lose on them (the trivial loss), the nonlinearity in use.

The mechanics. PyTorch's initialisers (and Xavier/Kaiming) are designed for unit-scale
inputs: with inputs of scale s, a Linear layer's pre-activations have scale ~s, so the
initialisation, the nonlinearity's useful range (tanh/sigmoid saturate past |z| ~ 3) and the
learning rate are all off by the factor s.
"""

from __future__ import annotations

import math
import re
from typing import Any

import numpy as np
import pandas as pd

from gradprobe.analysis.context import RunContext, quantity
from gradprobe.analysis.loss import probability_floor
from gradprobe.analysis.steps import sample_table

#: A loss at this fraction of the trivial predictor's loss or above has learned (almost) nothing
#: from its input: a model that ignores its input scores 1.0 (plus the variance of its own
#: predictions, when they vary), and real learning takes the ratio well below 0.8 within the
#: first hundred steps of any run this is calibrated on.
TRIVIAL_LEVEL = 0.8
#: A target scale (RMS) at or below this is tiny: the trivial predictor's MSE is then at most
#: 1e-6, every loss looks converged, and one optimizer step moves a prediction by about the
#: whole target range.
TARGET_TINY = 1e-3


def sustained(values: np.ndarray, threshold: float) -> bool:
    """At least 3 samples, the median of the later half at or above ``threshold`` and the last
    sample at or above 0.8 x threshold: the condition holds through the run, not only at one
    moment (init) or one batch."""
    v = values[np.isfinite(values)]
    if v.size < 3:
        return False
    late = v[v.size // 2:]
    return bool(np.median(late) >= threshold and v[-1] >= 0.8 * threshold)


_NORM_CLASS = re.compile(r"(Batch|Layer|Group|Instance|RMS)Norm")


@quantity
def normalised(ctx: RunContext) -> bool:
    """The watched model has normalisation layers (from the module classes in the metadata)."""
    return any(_NORM_CLASS.search(str(c)) for c in (ctx.meta.get("modules") or {}).values())


@quantity
def input_constant(ctx: RunContext) -> bool:
    """The float features entering the model (or its first layer) did not vary over the batch
    on most sampled steps (std exactly 0): every unit downstream then sees one input."""
    for probe in ("first_layer", "input"):
        w = sample_table(ctx, probe)
        if w.empty or "std" not in w:
            continue
        w = w[~w["target"].str.contains(r"\[", regex=True)]
        if "integer" in w:
            w = w[w["integer"].fillna(0) < 0.5]
        if len(w):
            return bool((w["std"] == 0).mean() >= 0.5)
    return False


@quantity
def first_layer_name(ctx: RunContext) -> str | None:
    s = ctx.samples("first_layer")
    if s.empty:
        return None
    names = [t for t in s["target"].astype(str) if "[" not in t]
    return max(set(names), key=names.count) if names else None


@quantity
def nonlinearity(ctx: RunContext) -> str:
    """The nonlinearity the network mostly uses, from the sampled activation modules:
    ``relu`` (ReLU family: dead_frac samples), ``tanh``/``sigmoid`` (saturating modules; a mean
    above 0.25 is a sigmoid's (0, 1) range) or ``linear``."""
    act = sample_table(ctx, "activation")
    if act.empty:
        return "linear"
    relu = int(act["dead_frac"].notna().sum()) if "dead_frac" in act else 0
    sat = act[act["saturated_frac"].notna()] if "saturated_frac" in act else act.iloc[0:0]
    if relu == 0 and sat.empty:
        return "linear"
    if relu >= len(sat):
        return "relu"
    return "sigmoid" if float(sat["mean"].median()) > 0.25 else "tanh"



@quantity
def tiny_targets(ctx: RunContext) -> dict[str, dict[str, float]]:
    """Regression loss functions whose float targets have an RMS (median over the sampled
    batches of sqrt(mean^2 + std^2)) of at most 1e-3 and a largest magnitude of at most 1e-2:
    ``{loss function: {rms, absmax, mean, std}}``. Classification targets (integer labels,
    cross-entropy, BCE probabilities) are not a scale. Shared by GP602 (which reports them) and
    GP501 (whose loss-based evidence means nothing at such a scale)."""
    out: dict[str, dict[str, float]] = {}
    w = sample_table(ctx, "target")
    if not w.empty and "std" in w and "mean" in w:
        for name, g in w.groupby("target", sort=False):
            g = g.dropna(subset=["std", "mean"])
            if g.empty or str(name).startswith("binary_cross_entropy") or name in ("cross_entropy", "nll_loss"):
                continue
            if "integer" in g and bool((g["integer"].fillna(0) > 0.5).all()):
                continue
            mean = g["mean"].to_numpy(dtype=np.float64)
            std = g["std"].to_numpy(dtype=np.float64)
            absmax = g["absmax"].to_numpy(dtype=np.float64) if "absmax" in g else np.abs(mean)
            rms = float(np.median(np.sqrt(mean ** 2 + std ** 2)))
            amax = float(np.median(absmax))
            if 0 < rms <= TARGET_TINY and amax <= 10 * TARGET_TINY:
                out[str(name)] = {"rms": rms, "absmax": amax, "mean": float(np.median(mean)), "std": float(np.median(std))}
    return out



#: Inputs of a cross-entropy are probabilities when every sampled batch of them averages 1/K
#: to this relative tolerance (rows that sum to 1 average exactly 1/K; float32 keeps ~1e-7) and
#: none exceeds 1 (by more than float rounding): logits land on exactly 1/K by no chance.
PROBABILITY_MEAN_RTOL = 1e-4
MIN_PROBABILITY_SAMPLES = 3


@quantity
def probabilities_into_cross_entropy(ctx: RunContext) -> tuple[int, float] | None:
    """``(K, floor)`` when what the run feeds ``cross_entropy`` are probabilities over K
    classes (a softmax already applied: every sampled batch's mean exactly 1/K and no entry
    above 1, over at least 3 samples); ``floor`` = ln(e + K - 1) - 1, the lowest loss a
    cross-entropy can reach on probability inputs (softmax of a one-hot vector puts e / (e + K
    - 1) on the right class). None otherwise."""
    w = sample_table(ctx, "target")
    if w.empty or not {"pred_mean", "pred_absmax", "pred_numel", "numel"} <= set(w.columns):
        return None
    g = w[w["target"] == "cross_entropy"].dropna(subset=["pred_mean", "pred_absmax", "pred_numel", "numel"])
    g = g[g["numel"] > 0]
    if len(g) < MIN_PROBABILITY_SAMPLES:
        return None
    width = (g["pred_numel"] / g["numel"]).to_numpy(dtype=np.float64)
    k = int(round(float(np.median(width))))
    if k < 2 or not np.allclose(width, k):
        return None
    mean = g["pred_mean"].to_numpy(dtype=np.float64)
    if not (np.abs(mean * k - 1.0) <= PROBABILITY_MEAN_RTOL).all():
        return None
    if not (g["pred_absmax"].to_numpy(dtype=np.float64) <= 1.0 + PROBABILITY_MEAN_RTOL).all():
        return None
    return k, probability_floor(k)


#: Class-ordered batches: a batch of B examples drawn at random from classes of frequencies
#: p_k holds a single class with probability sum_k p_k**B (2 balanced classes, B = 16: 3e-5).
#: The sampled batches are class-ordered when that many single-class batches among those
#: sampled would happen by chance less than once in 1000 runs (binomial tail), with at least
#: 2 classes among them (a single class every batch is class imbalance, not order).
ORDERED_CHANCE = 1e-3
#: ... judged on at least this many sampled batches of at least ``MIN_CLASS_BATCH`` targets
#: over 2 or more classes (batches of 2-4 examples are single-class by chance too often).
MIN_ORDERED_SAMPLES = 5
MIN_CLASS_BATCH = 8
#: ... and the order persists: of at least 2 pairs of adjacent sampled steps, half or more
#: hold the same class (the recorder samples the first steps densely: 0, 1, 2, 3).
MIN_ADJACENT = 2
SAME_CLASS_RUNS = 0.5


@quantity
def class_ordered_batches(ctx: RunContext) -> dict[str, Any] | None:
    """The data reached the loss sorted by class: most sampled steps fed ``cross_entropy`` /
    ``nll_loss`` targets of one class only (every call of the step the same class: a GAN
    discriminator's all-real and all-fake calls make one mixed step), from 2 or more different
    classes over the run, far more often than shuffled batches of that size could
    (``ORDERED_CHANCE``). A DataLoader over a dataset stored class by class with
    ``shuffle=False``: each run of one class pulls the model to predict that class, and the
    first batch of the next class pays for it. Returns ``sampled``, ``single_class``,
    ``classes``, ``batch`` (median targets per step), ``chance`` (the binomial tail) and
    ``first_step``; None otherwise.

    Order, not alternation: of the sampled single-class steps that directly follow another
    (step s and s + 1, at least ``MIN_ADJACENT`` such pairs), at least half hold the same class
    as the step before (a block of one class spans several batches). A discriminator fed an
    all-real batch and then an all-fake one, which the recorder may cut into two steps,
    alternates classes from one step to the next: that is no order."""
    w = sample_table(ctx, "target")
    if w.empty or not {"class_entropy", "mean", "numel", "n_classes"} <= set(w.columns):
        return None
    g = w[w["target"].isin(["cross_entropy", "nll_loss"])].dropna(subset=["class_entropy", "mean", "numel",
                                                                          "n_classes"])
    g = g[(g["numel"] >= MIN_CLASS_BATCH) & (g["n_classes"] >= 2)]
    if g.empty:
        return None
    per_step = g.groupby("step").agg(entropy=("class_entropy", "max"), lo=("mean", "min"), hi=("mean", "max"),
                                     numel=("numel", "sum"))
    if len(per_step) < MIN_ORDERED_SAMPLES:
        return None
    one = per_step[(per_step["entropy"] <= 0.0) & (per_step["lo"] == per_step["hi"])
                   & (per_step["lo"] == np.round(per_step["lo"]))]
    n, m = len(per_step), len(one)
    counts = one["lo"].value_counts().to_numpy(dtype=np.float64)
    if counts.size < 2:
        return None
    steps, label = one.index.to_numpy(dtype=np.int64), one["lo"].to_numpy()
    adjacent = np.diff(steps) == 1
    if adjacent.sum() < MIN_ADJACENT or (label[1:] == label[:-1])[adjacent].mean() < SAME_CLASS_RUNS:
        return None
    batch = float(per_step["numel"].median())
    p = float(np.sum((counts / counts.sum()) ** batch))  # a random batch's chance to hold one class
    chance = float(sum(math.comb(n, j) * p ** j * (1 - p) ** (n - j) for j in range(m, n + 1)))
    if chance > ORDERED_CHANCE:
        return None
    return {"sampled": n, "single_class": m, "classes": int(counts.size), "batch": batch, "chance": chance,
            "first_step": int(one.index.min())}


@quantity
def feature_absmax(ctx: RunContext) -> float | None:
    """Largest finite magnitude of the float features sampled where they enter the model: the
    first parametric layer's input, else the model's input (integer token ids excluded)."""
    for probe in ("first_layer", "input"):
        s = ctx.samples(probe)
        if s.empty:
            continue
        piv = s[s["stat"].isin(["absmax", "integer"])].pivot_table(
            index=["step", "target"], columns="stat", values="value", aggfunc="max")
        if "absmax" not in piv.columns:
            continue
        if "integer" in piv.columns:
            piv = piv[piv["integer"].fillna(0) == 0]
        v = piv["absmax"].to_numpy(dtype=np.float64)
        v = v[np.isfinite(v)]
        if v.size:
            return float(v.max())
    return None



#: A cross-entropy at ln K is the uniform prediction over K classes when it sits between
#: ``UNIFORM_BELOW`` under and ``UNIFORM_ABOVE`` over ln K (relative): predictions that ignore the
#: input add their own small spread to ln K (half the variance of the logits, in nats), and a
#: batch's noise moves a near-constant loss by well under 1%. With only a few records the
#: level must match to ``UNIFORM_TIGHT``: a match that close is a fact about the outputs, not a
#: coincidence of the level.
UNIFORM_BELOW = 0.005
UNIFORM_ABOVE = 0.02
UNIFORM_TIGHT = 0.005
#: Class counts considered: 2 (binary) up to a large vocabulary.
UNIFORM_MAX_CLASSES = 10**6


def uniform_classes(level: float, *, tight: bool = False) -> int | None:
    """K when ``level`` is the cross-entropy of the uniform prediction over K classes (see the
    ``UNIFORM_*`` constants), else None."""
    if not (math.isfinite(level) and level > 0):
        return None
    above = UNIFORM_TIGHT if tight else UNIFORM_ABOVE
    guess = math.exp(level)
    for k in sorted({math.floor(guess), math.ceil(guess)}):
        if 2 <= k <= UNIFORM_MAX_CLASSES:
            lk = math.log(k)
            if -UNIFORM_BELOW * lk <= level - lk <= above * lk:
                return int(k)
    return None


def _bernoulli_entropy(p: float) -> float:
    p = min(max(p, 1e-7), 1 - 1e-7)
    return float(-(p * math.log(p) + (1 - p) * math.log(1 - p)))


class TrivialLoss:
    """The loss of a model that ignores its input, per sampled step, from the target samples:
    predicting the data's mean under ``mse_loss``, the uniform distribution under
    ``cross_entropy``/``nll_loss`` (ln n_classes), the base rate under
    ``binary_cross_entropy(_with_logits)``. Summed over the grad-enabled loss calls of the
    step, as ``loss_fn`` is.

    The data's mean (and base rate) is the mean of the sampled batch means of that loss
    function, so a batch's baseline is what predicting it costs on that batch: under MSE its
    variance plus its mean's squared distance from the data's mean (the law of total variance:
    batches of contiguous windows, or an unshuffled dataset, have small within-batch variance
    but a model that ignores its input cannot know the batch's own mean).

    Attributes:
        table: DataFrame indexed by sampled step: ``baseline``, ``loss_fn`` (the recorded value),
            ``ratio`` (loss_fn / baseline), ``expected_initial`` (what loss_fn should be for
            the recorded predictions if they were unrelated to the targets), ``kinds``.
        first_over_expected: the first sampled loss_fn / expected_initial (NaN: none).
        consistent: the first sampled loss matches ``expected_initial`` within a factor 3,
            i.e. the loss is on the scale the baseline assumes (not reduction="sum", not
            re-weighted, not a sum with other terms); rules compare with the baseline only then.
            Never when one loss function scored the same predictions (equal mean and std) against
            several targets in one step (mixup, cutmix: lam * CE(y_a) + (1 - lam) * CE(y_b)):
            the calls' sum cannot fall to 0, since one prediction cannot match two different
            targets, and the run weighs them with coefficients the recorder does not see, so the
            summed baseline is not the trivial level of the loss it trains.
        shared_predictions: a sampled step had such calls.
        kinds: the baselines involved (``mean``, ``uniform``, ``base-rate``).
        pred_spread: per sampled step, the largest across-batch std of one output feature
            relative to the target std (regression) or in nats (logits): near 0 means the
            predictions do not depend on the input.
    """

    _KINDS = {"mse_loss": "mean", "cross_entropy": "uniform", "nll_loss": "uniform",
              "binary_cross_entropy": "base-rate", "binary_cross_entropy_with_logits": "base-rate"}

    def __init__(self, ctx: RunContext) -> None:
        self.table = pd.DataFrame()
        self.consistent = False
        self.kinds: list[str] = []
        self.pred_spread = pd.Series([], dtype=np.float64)
        self.first_over_expected = math.nan
        self.shared_predictions = False
        s = ctx.samples("target")
        if s.empty:
            return
        s = s.assign(target=s["target"].astype(str), stat=s["stat"].astype(str))
        loss_fn = pd.Series(ctx.col("loss_fn"), index=ctx.step)
        loss_fn = loss_fn[~loss_fn.index.duplicated(keep="last")]
        means = s[s["stat"] == "mean"].groupby("target")["value"].mean()
        rows = []
        spreads = {}
        for step, g in s.groupby("step", sort=True):
            base = 0.0
            expected = 0.0
            kinds = []
            ok = True
            spread = []
            for name, gg in g.groupby("target", sort=False):
                kind = self._KINDS.get(name)
                st = {k: gg.loc[gg["stat"] == k, "value"].to_numpy(dtype=np.float64) for k in
                      ("numel", "var", "mean", "std", "absmax", "n_classes", "pred_std", "pred_mean",
                       "pred_feature_std_max")}
                calls = st["numel"].size
                if kind is None or calls == 0:
                    ok = False
                    break
                preds = np.stack([st["pred_mean"][:calls], st["pred_std"][:calls]], axis=1) if (
                    st["pred_mean"].size >= calls and st["pred_std"].size >= calls) else np.empty((0, 2))
                if preds.shape[0] >= 2 and np.isfinite(preds).all():
                    self.shared_predictions |= len(np.unique(preds, axis=0)) < preds.shape[0]
                for k in range(calls):
                    def at(key: str) -> float:
                        arr = st[key]
                        return float(arr[k]) if k < arr.size else math.nan
                    if kind == "mean":
                        var = at("var")
                        base += var + (at("mean") - float(means.get(name, at("mean")))) ** 2
                        expected += var + at("pred_std") ** 2 + (at("mean") - at("pred_mean")) ** 2
                        tstd = at("std")
                        if tstd > 0:
                            spread.append(at("pred_feature_std_max") / tstd)
                    elif kind == "uniform":
                        c = at("n_classes")
                        if not c > 1:
                            ok = False
                            break
                        base += math.log(c)
                        expected += math.log(c) + 0.5 * at("pred_std") ** 2
                        spread.append(at("pred_feature_std_max"))
                    else:
                        m = at("mean")
                        if not (0.0 <= m <= 1.0) or at("absmax") > 1.0:
                            ok = False
                            break
                        pbar = min(max(float(means.get(name, m)), 1e-7), 1 - 1e-7)
                        base += -(m * math.log(pbar) + (1 - m) * math.log(1 - pbar))
                        expected += _bernoulli_entropy(m)
                    kinds.append(kind)
                if not ok:
                    break
            if not ok or not base > 0:
                continue
            lf = float(loss_fn.get(step, math.nan))
            rows.append({"step": int(step), "baseline": base, "loss_fn": lf, "ratio": lf / base if math.isfinite(lf) else math.nan,
                         "expected_initial": expected, "kinds": ",".join(sorted(set(kinds)))})
            if spread and np.isfinite(spread).any():
                spreads[int(step)] = float(np.nanmax(spread))
        if not rows:
            return
        self.table = pd.DataFrame(rows).set_index("step").sort_index()
        self.kinds = sorted({k for ks in self.table["kinds"] for k in ks.split(",") if k})
        self.pred_spread = pd.Series(spreads, dtype=np.float64).sort_index()
        first = self.table.dropna(subset=["loss_fn"])
        if len(first):
            r = first["loss_fn"].iloc[0] / first["expected_initial"].iloc[0] if first["expected_initial"].iloc[0] > 0 else math.nan
            self.first_over_expected = float(r)
            self.consistent = bool(math.isfinite(r) and 1 / 3 <= r <= 3) and not self.shared_predictions

    def ratio_between(self, lo: int, hi: int) -> float:
        """Median of ``loss_fn / baseline`` over the sampled steps in [lo, hi] (NaN: none)."""
        if self.table.empty:
            return math.nan
        t = self.table.loc[(self.table.index >= lo) & (self.table.index <= hi), "ratio"].dropna()
        return float(t.median()) if len(t) else math.nan

    def baseline_between(self, lo: int, hi: int) -> float:
        if self.table.empty:
            return math.nan
        t = self.table.loc[(self.table.index >= lo) & (self.table.index <= hi), "baseline"].dropna()
        return float(t.median()) if len(t) else math.nan


@quantity
def trivial_loss(ctx: RunContext) -> TrivialLoss:
    return TrivialLoss(ctx)
