"""Which metric name in a foreign log feeds which :class:`~gradprobe.runlog.RunLog` column.

One table serves every foreign format: TensorBoard tags (``train/loss``), Hugging Face
``log_history`` keys (``grad_norm``) and Lightning ``metrics.csv`` columns
(``train_loss_step``, ``lr-Adam``) are all *names*, matched against :data:`DEFAULT_RULES`
with ``re.fullmatch`` (case-insensitive).

Priority: when several names of one log match the same column, the name matched by the
earliest rule wins and the others are listed as unused (``meta["names"]``). That keeps a
column to one series: Lightning's per-step ``train_loss_step`` beats its per-epoch
``train_loss_epoch``, HF's ``loss`` beats anything else named like a loss. Values of the
losing names are never mixed in.

Targets are step columns of :data:`gradprobe.runlog.schema.STEP_COLUMNS` plus:

* ``layer_grad``: a per-layer gradient norm; the pattern must have a ``(?P<layer>...)`` group
  naming the layer (e.g. Lightning's ``grad_2.0_norm/<param>``).
* ``epoch``: the epoch of each record (kept with the raw records, not a step column).
* ``ignore``: drop the name (use it to silence a default rule that misreads your log).

Extending it (documented in ``docs/readers.md``):

* in Python: :func:`register_tag` (``gradprobe.readers.register_tag(r"my/loss", "loss")``);
  registered rules take priority over the defaults, the latest registration first;
* from the shell: the ``GRADPROBE_TAG_MAP`` environment variable, a JSON object
  ``{"pattern": "column", ...}``, read at every load and placed before everything else.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from typing import Iterable, Union

from gradprobe.runlog import LogError
from gradprobe.runlog.schema import STEP_COLUMNS
from gradprobe.runlog.tensorboard import LAYER_GRAD_PREFIX, STEP_TAGS

ENV_VAR = "GRADPROBE_TAG_MAP"

#: columns a name may feed besides the step columns
EXTRA_TARGETS = ("layer_grad", "epoch", "ignore")

#: step columns that hold per-step numbers a foreign log can provide
STEP_TARGETS = tuple(n for n, _, _ in STEP_COLUMNS if n not in ("step", "state_age_module"))


@dataclass(frozen=True)
class NameRule:
    """One mapping rule: names that fully match ``pattern`` feed ``column``."""

    pattern: str
    column: str
    note: str = ""
    regex: re.Pattern[str] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.column not in STEP_TARGETS and self.column not in EXTRA_TARGETS:
            raise ValueError(
                f"unknown column {self.column!r} for tag pattern {self.pattern!r} "
                f"(one of: {', '.join(STEP_TARGETS + EXTRA_TARGETS)})"
            )
        try:
            rx = re.compile(self.pattern, re.IGNORECASE)
        except re.error as exc:
            raise ValueError(f"invalid tag pattern {self.pattern!r}: {exc}") from None
        if self.column == "layer_grad" and "layer" not in rx.groupindex:
            raise ValueError(f"a layer_grad pattern needs a (?P<layer>...) group: {self.pattern!r}")
        object.__setattr__(self, "regex", rx)


def _gradprobe_rules() -> list[NameRule]:
    """gradprobe's own dashboard tags map back to the columns they were written from."""
    rules = [NameRule(re.escape(tag), col, "gradprobe TensorBoard dashboard") for tag, col in STEP_TAGS.items()]
    rules.append(NameRule(re.escape(LAYER_GRAD_PREFIX) + r"(?P<layer>.+)", "layer_grad", "gradprobe TensorBoard dashboard"))
    return rules


_TRAIN = r"(?:train(?:ing)?[/_.])?"


# ---------------------------------------------------------------------------- meaning ----
# Everything not named by a structured rule (gradprobe's own tags, Lightning's lr-<Optimizer>
# and grad_2.0_norm/<param>, the AMP scale, the epoch) is mapped by what its words mean: a
# name is split into words (at /, _, ., -, spaces and camelCase), a few multi-word terms are
# joined (cross entropy, learning rate, gradient norm, ...), and the words say the quantity
# (a loss, a learning rate, a gradient norm), the split (train, or validation/eval/test)
# and the aggregation (per step, or per epoch / a running mean). TensorFlow's
# "cost/cross_entropy", Keras' "epoch_loss", "validation/epoch_loss", Lightning's
# "train_loss_step", "Loss/total_loss", "valPerplexity" are all read this way.

#: words naming the validation split (preferred over ``test`` for the eval loss)
VAL_WORDS = frozenset({"val", "valid", "validation", "validate", "eval", "evaluation", "evaluate", "dev", "holdout",
                       "heldout"})
#: words naming the test split: an eval loss only when no validation/eval loss is logged
TEST_WORDS = frozenset({"test", "testing"})
TRAIN_WORDS = frozenset({"train", "training", "trn"})
#: a loss by name
LOSS_WORDS = frozenset({"loss", "losses", "cost", "objective", "xent", "nll", "bce", "ce", "logloss", "logppl"})
#: a loss in other units, converted to nats (``ln(ppl)``; bits * ln 2)
CONVERTED_WORDS = {"ppl": "ln", "perplexity": "ln", "bits": "bits"}
#: error metrics that are the loss of a regression when nothing is named as a loss
METRIC_WORDS = frozenset({"mse", "mae", "rmse", "huber"})
#: per-epoch or smoothed values: used only when no per-step series of the same kind exists
AGGREGATE_WORDS = frozenset({"epoch", "epochs", "avg", "average", "mean", "running", "smooth", "smoothed", "ema",
                             "moving", "cumulative", "cum", "final", "last"})
#: per-step qualifiers (neutral)
STEP_WORDS = frozenset({"step", "steps", "batch", "batches", "minibatch", "iter", "iters", "iteration", "iterations",
                        "it", "global", "update", "updates"})
#: words that say nothing about which series it is (neutral)
FILLER_WORDS = frozenset({"total", "overall", "full", "all", "sum", "main", "model", "net", "network", "value",
                          "values", "metric", "metrics", "scalar", "scalars", "summary", "summaries", "stats", "stat",
                          "info", "log", "logs", "chart", "charts", "optim", "optimizer", "opt", "per", "vs", "of",
                          "on", "at", "and", "set", "data", "dataset", "split", "tb", "keras", "pg", "group",
                          "param", "params", "current", "curr", "cur", "lightning", "hf", "mlflow", "wandb"})
#: words that make a loss-like name something else: a coefficient, a count, a time, a best
#: value, a change, another metric (``loss_weight``, ``nan_loss_count``, ``best_val_loss``)
NOT_A_SERIES_WORDS = frozenset({
    "weight", "weights", "coef", "coeff", "coefficient", "lambda", "alpha", "beta", "factor", "multiplier", "mult",
    "scale", "scaler", "scaling", "ratio", "percent", "pct", "fraction", "frac", "threshold", "thresh", "nan", "nans",
    "inf", "infs", "nonfinite", "count", "counts", "num", "number", "skipped", "skip", "time", "times", "runtime",
    "seconds", "sec", "secs", "ms", "duration", "speed", "throughput", "flops", "flop", "memory", "mem", "best",
    "min", "minimum", "lowest", "delta", "diff", "change", "improvement", "gap", "std", "var", "variance", "acc",
    "accuracy", "f1", "precision", "recall", "auc", "bleu", "rouge", "wer", "cer", "score", "decay", "finder",
    "range", "patience", "target", "goal", "grad", "grads", "gradient", "gradients",
})
#: a GAN discriminator's or a WGAN critic's loss: trained, but it stays near a constant by
#: design (ln 2 per term at equilibrium), so it is not the model's training loss
ADVERSARIAL_WORDS = frozenset({"disc", "discriminator", "critic", "d", "dis"})
#: optimizer class names: neutral in a learning-rate name (``lr/Adam``)
OPTIMIZER_WORDS = frozenset({"sgd", "adam", "adamw", "adagrad", "adadelta", "adamax", "nadam", "radam", "rmsprop",
                             "lbfgs", "rprop", "asgd", "adafactor", "lamb", "lars", "lion", "sophia", "muon"})
#: multi-word terms joined into one word before classifying (longest first)
PHRASES: list[tuple[tuple[str, ...], str]] = [
    (("root", "mean", "squared", "error"), "rmse"),
    (("mean", "squared", "error"), "mse"),
    (("mean", "absolute", "error"), "mae"),
    (("negative", "log", "likelihood"), "nll"),
    (("neg", "log", "likelihood"), "nll"),
    (("bits", "per", "dim"), "bits"),
    (("bits", "per", "char"), "bits"),
    (("bits", "per", "character"), "bits"),
    (("bits", "per", "byte"), "bits"),
    (("log", "perplexity"), "logppl"),
    (("log", "ppl"), "logppl"),
    (("cross", "entropy"), "xent"),
    (("log", "loss"), "logloss"),
    (("log", "likelihood"), "loglik"),
    (("learning", "rate"), "lr"),
    (("grad", "norm"), "gradnorm"),
    (("grads", "norm"), "gradnorm"),
    (("gradient", "norm"), "gradnorm"),
    (("gradients", "norm"), "gradnorm"),
    (("global", "norm"), "gradnorm"),
    (("total", "norm"), "gradnorm"),
    (("weight", "norm"), "weightnorm"),
    (("weights", "norm"), "weightnorm"),
    (("param", "norm"), "weightnorm"),
    (("params", "norm"), "weightnorm"),
    (("parameter", "norm"), "weightnorm"),
    (("parameters", "norm"), "weightnorm"),
]
#: single words that are one of the joined terms
WORD_ALIASES = {"crossentropy": "xent", "learningrate": "lr", "gnorm": "gradnorm", "gradnorm": "gradnorm",
                "bpd": "bits", "bpc": "bits", "bpb": "bits", "pnorm": "weightnorm",
                "paramnorm": "weightnorm", "wnorm": "weightnorm", "losses": "loss"}
#: which of a gradient norm it is: after clipping (what the optimizer got) or before
POST_CLIP_WORDS = frozenset({"clipped", "post", "after"})
PRE_CLIP_WORDS = frozenset({"pre", "before", "unclipped", "preclip", "clip", "raw"})
#: a parameter group index: the first group (0) or another one
_GROUP = re.compile(r"(?:pg|group|g)?(\d+)")
_CAMEL = re.compile(r"(?<=[a-z0-9])(?=[A-Z])|(?<=[A-Z])(?=[A-Z][a-z])")
_WORD_SPLIT = re.compile(r"[^A-Za-z0-9]+")


def words(name: str) -> list[str]:
    """The words of a metric name, lower case, multi-word terms joined: ``"cost/CrossEntropy"``
    -> ``["cost", "xent"]``, ``"train/learning_rate"`` -> ``["train", "lr"]``."""
    out: list[str] = []
    for part in _WORD_SPLIT.split(name):
        if part:
            out.extend(w.lower() for w in _CAMEL.sub(" ", part).split())
    out = [WORD_ALIASES.get(w, w) for w in out]
    joined: list[str] = []
    i = 0
    while i < len(out):
        for phrase, word in PHRASES:
            n = len(phrase)
            if tuple(out[i:i + n]) == phrase:
                joined.append(word)
                i += n
                break
        else:
            joined.append(out[i])
            i += 1
    return joined


@dataclass(frozen=True)
class Meaning:
    """What a name means: its column, how good a candidate it is, and a conversion.

    ``score`` orders candidates of one column (lower is better): (another component than
    the total, class of name (0 a loss by name, 1 converted units, 2 an error metric),
    split (0 validation/eval, 1 test), per-epoch or smoothed). ``transform``: ``"ln"``
    (perplexity -> loss), ``"bits"`` (bits -> nats) or None. ``why`` says why a name that
    looks like one of the columns is not mapped (then ``column`` is None)."""

    column: str | None
    score: tuple[int, int, int, int] = (0, 0, 0, 0)
    transform: str | None = None
    why: str = ""
    aggregate: bool = False


def _is_group(word: str) -> int | None:
    m = _GROUP.fullmatch(word)
    return int(m.group(1)) if m else None


def meaning(name: str) -> Meaning | None:
    """The column a name feeds by its meaning (see the comment above), or None."""
    ws = words(name)
    if not ws:
        return None
    wset = set(ws)
    evals = wset & VAL_WORDS
    tests = wset & TEST_WORDS
    split_eval = bool(evals or tests)
    aggregate = bool(wset & AGGREGATE_WORDS)
    groups = [g for w in ws if (g := _is_group(w)) is not None]
    known = (VAL_WORDS | TEST_WORDS | TRAIN_WORDS | FILLER_WORDS | AGGREGATE_WORDS | STEP_WORDS)

    def extra(vocab: frozenset[str] | set[str]) -> bool:
        return any(w not in vocab and w not in known and _is_group(w) is None for w in ws)

    # learning rate (the first parameter group of the first optimizer)
    if "lr" in wset:
        if wset & LOSS_WORDS or wset & (NOT_A_SERIES_WORDS - {"weight", "weights"}) or split_eval:
            return Meaning(None, why="not the learning rate itself (a modifier, a count or another split)")
        if any(g != 0 for g in groups):
            return Meaning(None, why="another parameter group's or optimizer's learning rate (the first is read)")
        return Meaning("lr", (int(extra({"lr"} | OPTIMIZER_WORDS)), 0, 0, int(aggregate)), aggregate=aggregate)
    # total gradient norm
    if "gradnorm" in wset:
        if split_eval or wset & (NOT_A_SERIES_WORDS - {"grad", "grads", "gradient", "gradients", "min", "minimum"}):
            return Meaning(None, why="not the total gradient norm of a training step")
        column = "step_grad_norm" if wset & POST_CLIP_WORDS else "grad_norm"
        vocab = {"gradnorm", "grad", "grads", "gradient", "gradients"} | POST_CLIP_WORDS | PRE_CLIP_WORDS
        return Meaning(column, (int(extra(vocab) or bool(groups)), 0, 0, int(aggregate)), aggregate=aggregate)
    if "weightnorm" in wset:
        if split_eval or wset & NOT_A_SERIES_WORDS - {"weight", "weights"}:
            return Meaning(None, why="not the total weight norm")
        return Meaning("weight_norm", (int(extra({"weightnorm"})), 0, 0, int(aggregate)), aggregate=aggregate)
    # losses
    strong = wset & LOSS_WORDS
    converted = [CONVERTED_WORDS[w] for w in ws if w in CONVERTED_WORDS]
    metric = wset & METRIC_WORDS
    if not (strong or converted or metric):
        if "loglik" in wset or "elbo" in wset:
            return Meaning(None, why="a likelihood or ELBO: its sign (maximised or its negative minimised) is not in the name")
        return None
    if wset & NOT_A_SERIES_WORDS:
        return Meaning(None, why="not a loss value (a coefficient, count, time, best value, change or another metric)")
    if wset & ADVERSARIAL_WORDS:
        return Meaning(None, why="a GAN discriminator's or critic's loss: near a constant by design, not the model's training loss")
    if ws.count("train") + ws.count("training") > 1:
        return Meaning(None, why="a whole-run summary (Hugging Face's train/train_loss), not a step's loss")
    if split_eval and "step" in wset:
        return Meaning(None, why="per-batch validation values (Lightning's *_step during validation repeat one training step)")
    if evals and tests:
        return Meaning(None, why="names both a validation and a test split")
    vocab: set[str] = set(LOSS_WORDS) | set(CONVERTED_WORDS) | set(METRIC_WORDS)
    cls = 0 if strong else (1 if converted else 2)
    transform = None if strong else (converted[0] if converted and len(set(converted)) == 1 else None)
    if not strong and converted and transform is None:
        return Meaning(None, why="mixes units (perplexity and bits)")
    column = "eval_loss" if split_eval else "loss"
    split_rank = 1 if (tests and not evals) else 0
    # a number in a loss name is a TensorFlow uniquifier ("loss_1") or an index: neutral
    return Meaning(column, (int(extra(vocab)), cls, split_rank, int(aggregate)), transform=transform, aggregate=aggregate)


def quantity(name: str) -> frozenset[str]:
    """The words that say which loss a name is (``train/nll_loss`` -> ``{nll}``,
    ``val/rmse_loss`` -> ``{rmse}``, ``val_loss`` -> empty: the loss, whatever it is)."""
    generic = {"loss", "losses", "cost", "objective"}
    known = VAL_WORDS | TEST_WORDS | TRAIN_WORDS | FILLER_WORDS | AGGREGATE_WORDS | STEP_WORDS
    return frozenset(CROSS_ENTROPY_WORDS.get(w, w) for w in words(name)
                     if w not in generic and w not in known and _is_group(w) is None)


#: names of one quantity, the cross-entropy of the data under the model (in nats once
#: converted): a training ``nll_loss`` and a validation ``ce`` or ``perplexity`` are comparable
CROSS_ENTROPY_WORDS = {w: "xent" for w in ("xent", "ce", "nll", "logloss", "bce", "ppl", "perplexity", "logppl", "bits")}


@dataclass(frozen=True)
class MeaningRule:
    """The rule that maps names by meaning (:func:`meaning`); one entry of the rule table."""

    columns: tuple[str, ...] = ("loss", "eval_loss", "lr", "grad_norm", "step_grad_norm", "weight_norm")
    note: str = "by meaning: loss, cost, cross-entropy, xent, nll, perplexity (ln), bits (x ln 2), objective, " \
                "mse...; learning rate; gradient norm; train vs validation/eval/test; per step before per epoch"
    pattern: str = "(by meaning)"


#: rules for names that look like a known column but are another thing (checked before
#: the meaning); their reason is kept in ``meta["names"]["not_mapped"]``
EXCLUSIONS: list[tuple[re.Pattern[str], str]] = [
    (re.compile(r"lr-[A-Za-z_]\w*-\d+(?:/pg\d+)?", re.I), "Lightning's learning rate of a second optimizer (the first is read)"),
    (re.compile(r"lr-[A-Za-z_]\w*/pg(?:[02-9]|\d\d+)", re.I), "Lightning's learning rate of another parameter group (pg1 is read)"),
    (re.compile(r"(?:train/)?train_(?:runtime|samples_per_second|steps_per_second)|(?:train/)?total_flos", re.I),
     "Hugging Face's whole-run summary"),
]

#: The default table, in priority order (first matching rule wins for a column).
DEFAULT_RULES: list[NameRule | MeaningRule] = _gradprobe_rules() + [
    # structured names that carry more than a meaning (the optimizer class, a layer)
    NameRule(r"lr-(?P<optimizer>[A-Za-z_]\w*)(?:/pg1)?", "lr", "Lightning LearningRateMonitor (lr-Adam, lr-SGD/pg1)"),
    NameRule(r"(?:learning_rate|lr)[/_]pg1", "lr", "Lightning's first param group (pg1)"),
    NameRule(r"grad_2(?:\.0)?_norm[_/]total(?:_step)?", "grad_norm", "Lightning grad_norm(...) total"),
    NameRule(_TRAIN + r"grad(?:ient)?_norm[_/]total", "grad_norm", "grad_norm/total"),
    # AMP loss scale
    NameRule(
        _TRAIN + r"(?:loss[_ ]?scale|loss_scaler|grad[_ ]?scaler?(?:[/_]scale)?|amp[/_](?:loss_)?scale|scaler[/_]scale)",
        "scale",
        "loss_scale, train/loss_scale, grad_scale, scaler/scale",
    ),
    # per-layer gradient norms
    NameRule(r"grad_2(?:\.0)?_norm/(?P<layer>.+?)(?:_step)?", "layer_grad", "Lightning grad_norm(...) per parameter"),
    NameRule(r"grad(?:ient)?_norm/(?P<layer>.+)", "layer_grad", "grad_norm/LAYER"),
    # epoch
    NameRule(_TRAIN + r"epoch", "epoch", "epoch, train/epoch"),
    # everything else: by meaning
    MeaningRule(),
]

_registered: list[NameRule] = []


def register_tag(pattern: str, column: str, *, note: str = "") -> NameRule:
    """Adds a mapping rule that takes priority over the defaults (latest first).

    Args:
        pattern: a regular expression matched with ``re.fullmatch``, case-insensitive,
            against the whole name (a TensorBoard tag, a ``log_history`` key, a CSV column).
        column: a step column (``loss``, ``grad_norm``, ``lr``, ``eval_loss``, ``scale``,
            ``skipped``, ...), ``layer_grad`` (with a ``(?P<layer>...)`` group), ``epoch``
            or ``ignore``.
        note: what the rule is for (shown in ``meta["names"]``).

    Returns:
        The rule (pass it to :func:`unregister_tag` to remove it).

    Raises:
        ValueError: unknown column or invalid pattern.
    """
    rule = NameRule(pattern, column, note or "registered")
    _registered.insert(0, rule)
    return rule


def unregister_tag(rule_or_pattern: NameRule | str) -> None:
    """Removes rules added with :func:`register_tag` (by rule or by pattern)."""
    _registered[:] = [
        r for r in _registered if r is not rule_or_pattern and r.pattern != rule_or_pattern
    ]


def _env_rules() -> list[NameRule]:
    raw = os.environ.get(ENV_VAR, "").strip()
    if not raw:
        return []
    try:
        data = json.loads(raw)
        if not isinstance(data, dict):
            raise ValueError("not a JSON object")
        return [NameRule(str(p), str(c), f"${ENV_VAR}") for p, c in data.items()]
    except ValueError as exc:
        raise LogError(f"${ENV_VAR}: expected a JSON object {{\"pattern\": \"column\"}} ({str(exc).splitlines()[0]})") from None


Rule = Union[NameRule, MeaningRule]


def active_rules() -> list[Rule]:
    """The rules in force, in priority order: environment, registered, defaults."""
    return _env_rules() + list(_registered) + list(DEFAULT_RULES)


@dataclass
class NameMatch:
    name: str
    column: str
    priority: int
    layer: str | None = None
    optimizer: str | None = None
    #: order among the names one rule maps to one column (lower is better; see :class:`Meaning`)
    score: tuple[int, int, int, int] = (0, 0, 0, 0)
    transform: str | None = None
    aggregate: bool = False


@dataclass
class Resolution:
    """How the names of one log were mapped.

    Attributes:
        columns: column -> the one name that feeds it (not for ``layer_grad``).
        layers: name -> layer for the per-layer gradient norm names in use.
        unused: name -> why it is not used (a better name feeds its column).
        unmapped: names no rule matched.
        not_mapped: name -> why a name that looks like a known column is not one
            (``best_val_loss``, ``lr-Adam-1``, Hugging Face's ``train/train_loss``).
        ignored: names mapped to ``ignore``.
        optimizer: optimizer class named by a matched lr name (``lr-Adam``), if any.
        transforms: column -> conversion applied to its values (``ln``: a perplexity;
            ``bits``: bits to nats).
    """

    columns: dict[str, str] = field(default_factory=dict)
    layers: dict[str, str] = field(default_factory=dict)
    unused: dict[str, str] = field(default_factory=dict)
    unmapped: list[str] = field(default_factory=list)
    not_mapped: dict[str, str] = field(default_factory=dict)
    ignored: list[str] = field(default_factory=list)
    optimizer: str | None = None
    transforms: dict[str, str] = field(default_factory=dict)
    matches: dict[str, NameMatch] = field(default_factory=dict, repr=False)

    def describe(self) -> dict[str, object]:
        out: dict[str, object] = {"columns": dict(self.columns)}
        if self.transforms:
            out["transforms"] = dict(self.transforms)
        if self.layers:
            out["layer_grad"] = sorted(self.layers)
        if self.unused:
            out["unused"] = dict(self.unused)
        if self.unmapped:
            out["unmapped"] = list(self.unmapped)
        if self.not_mapped:
            out["not_mapped"] = dict(self.not_mapped)
        if self.ignored:
            out["ignored"] = list(self.ignored)
        return out

    def notes(self) -> list[str]:
        """What a reader should say about how the columns were read (conversions, a loss
        read from an error metric or from one component of several)."""
        out = []
        for col, name in self.columns.items():
            m = self.matches.get(name)
            if m is None:
                continue
            what = "training loss" if col == "loss" else "eval loss" if col == "eval_loss" else col
            if m.transform == "ln":
                out.append(f"{what} = ln({name!r}): the log has a perplexity and no series named as a loss")
            elif m.transform == "bits":
                out.append(f"{what} = {name!r} x ln 2: bits converted to nats (no series named as a loss)")
            elif col in ("loss", "eval_loss") and m.score[1] == 2:
                out.append(f"{what} read from the error metric {name!r}: no series is named as a loss")
            elif col in ("loss", "eval_loss") and m.score[0]:
                rivals = [n for n, why in self.unused.items() if why.startswith(f"{col} is read from")]
                also = f" (also logged: {', '.join(rivals[:5])})" if rivals else ""
                out.append(f"{what} read from {name!r}, one part of the loss: no total is logged{also}")
        return out


def _exclusion(name: str) -> str | None:
    for rx, why in EXCLUSIONS:
        if rx.fullmatch(name):
            return why
    return None


def match(name: str, rules: list[Rule] | None = None, *, why: dict[str, str] | None = None) -> NameMatch | None:
    """The first rule matching ``name`` (None: unmapped; ``why`` receives the reason when a
    name that looks like a known column is deliberately not mapped)."""
    for i, rule in enumerate(rules if rules is not None else active_rules()):
        if isinstance(rule, MeaningRule):
            excluded = _exclusion(name)
            if excluded:
                if why is not None:
                    why[name] = excluded
                return None
            m = meaning(name)
            if m is None:
                continue
            if m.column is None:
                if why is not None:
                    why[name] = m.why
                return None
            return NameMatch(name, m.column, i, score=m.score, transform=m.transform, aggregate=m.aggregate)
        rx = rule.regex.fullmatch(name)
        if rx is None:
            continue
        gd = rx.groupdict()
        return NameMatch(name, rule.column, i, layer=gd.get("layer"), optimizer=gd.get("optimizer"))
    return None


#: A series logged at fewer distinct steps than this is too short to judge a trend from (the
#: rules that read a curve need 5 records): a name of the same column and rule logged at more
#: steps is read instead (Lightning's ``train_loss`` logged every 50 steps of a 160-step run,
#: 3 records, beside its per-epoch ``train_mean_squared_error``, 10).
SHORT_SERIES = 5


def resolve(names: Iterable[str], rules: list[Rule] | None = None, *, counts: dict[str, int] | None = None) -> Resolution:
    """Maps the distinct names of one log to columns (one name per column).

    Among the names one column could be read from, the earliest rule wins; within one rule,
    a name logged at ``SHORT_SERIES`` distinct steps or more over one logged at fewer, then
    the best :class:`Meaning` score; then the name logged at the most distinct steps
    (``counts``; Hugging Face's per-step ``loss`` over its one-point summary
    ``train_loss``); then the shorter name; then the first seen. The eval loss prefers a
    series of the same granularity as the training loss it is compared with (Keras logs a
    per-epoch ``validation/epoch_loss`` and a per-iteration ``evaluation_loss_vs_iterations``).
    """
    rules = rules if rules is not None else active_rules()
    counts = counts or {}
    res = Resolution()
    layer_matches: list[NameMatch] = []
    by_column: dict[str, list[tuple[int, NameMatch]]] = {}
    for order, name in enumerate(dict.fromkeys(names)):
        m = match(name, rules, why=res.not_mapped)
        if m is None:
            if name not in res.not_mapped:
                res.unmapped.append(name)
        elif m.column == "ignore":
            res.ignored.append(name)
        elif m.column == "layer_grad":
            layer_matches.append(m)
        else:
            by_column.setdefault(m.column, []).append((order, m))
            res.matches[name] = m

    def key(item: tuple[int, NameMatch], loss_aggregate: bool | None = None) -> tuple[object, ...]:
        order, m = item
        score: tuple[int, ...] = m.score
        if loss_aggregate is not None:  # same granularity as the training loss first
            score = (m.score[0], m.score[1], m.score[2], int(m.aggregate != loss_aggregate))
        short = bool(counts) and counts.get(m.name, 0) < SHORT_SERIES
        return (m.priority, short, *score, -counts.get(m.name, 0), len(words(m.name)), order)

    loss_aggregate = None
    loss_quantity: frozenset[str] = frozenset()
    for column in sorted(by_column, key=lambda c: c != "loss"):  # the loss first: the eval loss follows it
        items = by_column[column]
        if column == "eval_loss" and loss_quantity:
            # the validation value of the training loss, not another quantity
            same = []
            for order, m in items:
                q = quantity(m.name)
                if not q or not q.isdisjoint(loss_quantity):
                    same.append((order, m))
                else:
                    res.not_mapped[m.name] = (f"measures {'/'.join(sorted(q))}, not the training loss's "
                                              f"{'/'.join(sorted(loss_quantity))} ({res.columns['loss']!r})")
                    del res.matches[m.name]
            items = same
            if not items:
                continue
        win = min(items, key=lambda it: key(it, loss_aggregate if column == "eval_loss" else None))[1]
        if column == "loss":
            loss_aggregate = win.aggregate
            loss_quantity = quantity(win.name)
        res.columns[column] = win.name
        if win.transform:
            res.transforms[column] = win.transform
        if column == "lr" and win.optimizer:
            res.optimizer = win.optimizer
        for _, m in items:
            if m is not win:
                res.unused[m.name] = f"{column} is read from {win.name!r}"
    res.columns = {c: res.columns[c] for c in sorted(res.columns, key=lambda c: min(o for o, _ in by_column[c]))}
    if layer_matches:
        top = min(m.priority for m in layer_matches)
        for m in layer_matches:
            if m.priority == top and m.layer:
                res.layers[m.name] = m.layer
            else:
                res.unused[m.name] = "per-layer norms are read from a higher-priority naming scheme"
    return res


def markdown_table(rules: list[Rule] | None = None) -> str:
    """The default mapping as a Markdown table (``docs/readers.md`` embeds it verbatim; a
    test keeps the two in sync). gradprobe's own dashboard tags are summarised in one row."""
    rules = list(DEFAULT_RULES if rules is None else rules)
    own = [r for r in rules if isinstance(r, NameRule) and r.note == "gradprobe TensorBoard dashboard"]
    lines = ["| priority | column | pattern (`re.fullmatch`, case-insensitive) | for |", "|---|---|---|---|"]
    if own:
        lines.append(f"| 1-{len(own)} | (the tag's column) | `gradprobe/...` dashboard tags, e.g. "
                     f"`{own[0].pattern}` | gradprobe's own TensorBoard files read back |")
    for i, r in enumerate(rules, 1):
        if r in own:
            continue
        if isinstance(r, MeaningRule):
            cols = ", ".join(f"`{c}`" for c in r.columns)
            lines.append(f"| {i} | {cols} | (by meaning: see below) | every other name |")
            continue
        pattern = r.pattern.replace("|", "\\|")
        lines.append(f"| {i} | `{r.column}` | `{pattern}` | {r.note} |")
    return "\n".join(lines) + "\n"


def _words_cell(ws: Iterable[str]) -> str:
    return ", ".join(f"`{w}`" for w in sorted(ws))


def meaning_markdown() -> str:
    """The vocabulary of the meaning rule as Markdown (``docs/readers.md`` embeds it
    verbatim; a test keeps the two in sync)."""
    phrases = sorted({f"`{' '.join(p)}` -> `{w}`" for p, w in PHRASES} | {f"`{a}` -> `{w}`" for a, w in WORD_ALIASES.items()
                                                                         if a != w})
    rows = [
        ("a loss by name", _words_cell(LOSS_WORDS)),
        ("a loss in other units (converted to nats)", ", ".join(f"`{w}` ({'ln' if t == 'ln' else 'x ln 2'})"
                                                              for w, t in sorted(CONVERTED_WORDS.items()))),
        ("an error metric (the loss only when nothing is named as one)", _words_cell(METRIC_WORDS)),
        ("the validation/eval split", _words_cell(VAL_WORDS)),
        ("the test split (eval loss when no validation/eval loss)", _words_cell(TEST_WORDS)),
        ("the training split (the default)", _words_cell(TRAIN_WORDS)),
        ("per epoch or smoothed (a per-step series wins)", _words_cell(AGGREGATE_WORDS)),
        ("per step (neutral)", _words_cell(STEP_WORDS)),
        ("neutral", _words_cell(FILLER_WORDS) + ", a parameter-group index `0`, `pg0`, `group0`"),
        ("not the series itself", _words_cell(NOT_A_SERIES_WORDS)),
        ("a discriminator's or critic's loss (not the training loss)", _words_cell(ADVERSARIAL_WORDS)),
        ("gradient norm after clipping (`step_grad_norm`)", _words_cell(POST_CLIP_WORDS)),
        ("joined terms", ", ".join(phrases)),
    ]
    lines = ["| meaning | words |", "|---|---|"]
    lines += [f"| {what} | {ws} |" for what, ws in rows]
    return "\n".join(lines) + "\n"
