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
from typing import Iterable

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
_EVAL = r"(?:eval|evaluation|val|valid|validation|dev)"

#: The default table, in priority order (first matching rule wins for a column).
DEFAULT_RULES: list[NameRule] = _gradprobe_rules() + [
    # training loss: per-step names first, then per-epoch aggregates
    NameRule(_TRAIN + r"loss(?:_step)?", "loss", "loss, train/loss, train_loss, train_loss_step (HF, Lightning)"),
    NameRule(r"loss[_/](?:train|training)", "loss", "SummaryWriter.add_scalars('loss', {'train': ...})"),
    NameRule(r"(?:loss/)?train(?:ing)?[_ ]loss", "loss", "loss/train_loss, training loss"),
    NameRule(_TRAIN + r"loss_epoch", "loss", "Lightning per-epoch aggregate (only when no per-step loss is logged)"),
    # total gradient norm
    NameRule(_TRAIN + r"grad(?:ient)?[_ ]?norm(?:[_/]total)?(?:_step)?", "grad_norm", "grad_norm, train/grad_norm, gradient_norm"),
    NameRule(r"grad_2(?:\.0)?_norm[_/]total(?:_step)?", "grad_norm", "Lightning grad_norm(...) total"),
    NameRule(r"(?:train[/_])?(?:total_)?grad(?:ient)?s?[/_]norm", "grad_norm", "grads/norm, total_grad_norm"),
    # learning rate: first param group of the first optimizer
    NameRule(_TRAIN + r"(?:learning_rate|lr)(?:[/_](?:pg|group|param_group)?_?0)?", "lr", "learning_rate, lr, train/learning_rate"),
    NameRule(r"lr-(?P<optimizer>[A-Za-z_]\w*)(?:/pg1)?", "lr", "Lightning LearningRateMonitor (lr-Adam, lr-SGD/pg1)"),
    NameRule(r"(?:learning_rate|lr)[/_]pg1", "lr", "first param group"),
    # validation / eval loss
    NameRule(_EVAL + r"[/_.]loss(?:_epoch)?", "eval_loss", "eval_loss, eval/loss, val_loss, val/loss, validation_loss"),
    NameRule(r"loss[_/]" + _EVAL, "eval_loss", "SummaryWriter.add_scalars('loss', {'val': ...})"),
    NameRule(r"(?:loss/)?" + _EVAL + r"[_ ]loss", "eval_loss", "loss/val_loss, validation loss"),
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


def active_rules() -> list[NameRule]:
    """The rules in force, in priority order: environment, registered, defaults."""
    return _env_rules() + list(_registered) + list(DEFAULT_RULES)


@dataclass
class NameMatch:
    name: str
    column: str
    priority: int
    layer: str | None = None
    optimizer: str | None = None


@dataclass
class Resolution:
    """How the names of one log were mapped.

    Attributes:
        columns: column -> the one name that feeds it (not for ``layer_grad``).
        layers: name -> layer for the per-layer gradient norm names in use.
        unused: name -> why it is not used (a better-priority name feeds its column).
        unmapped: names no rule matched.
        ignored: names mapped to ``ignore``.
        optimizer: optimizer class named by a matched lr name (``lr-Adam``), if any.
    """

    columns: dict[str, str] = field(default_factory=dict)
    layers: dict[str, str] = field(default_factory=dict)
    unused: dict[str, str] = field(default_factory=dict)
    unmapped: list[str] = field(default_factory=list)
    ignored: list[str] = field(default_factory=list)
    optimizer: str | None = None

    def describe(self) -> dict[str, object]:
        out: dict[str, object] = {"columns": dict(self.columns)}
        if self.layers:
            out["layer_grad"] = sorted(self.layers)
        if self.unused:
            out["unused"] = dict(self.unused)
        if self.unmapped:
            out["unmapped"] = list(self.unmapped)
        if self.ignored:
            out["ignored"] = list(self.ignored)
        return out


def match(name: str, rules: list[NameRule] | None = None) -> NameMatch | None:
    """The first rule matching ``name`` (None: unmapped)."""
    for i, rule in enumerate(rules if rules is not None else active_rules()):
        m = rule.regex.fullmatch(name)
        if m is None:
            continue
        gd = m.groupdict()
        return NameMatch(name, rule.column, i, layer=gd.get("layer"), optimizer=gd.get("optimizer"))
    return None


def resolve(names: Iterable[str], rules: list[NameRule] | None = None) -> Resolution:
    """Maps the distinct names of one log to columns (one name per column)."""
    rules = rules if rules is not None else active_rules()
    res = Resolution()
    best: dict[str, NameMatch] = {}
    layer_matches: list[NameMatch] = []
    matches: list[NameMatch] = []
    for name in dict.fromkeys(names):
        m = match(name, rules)
        if m is None:
            res.unmapped.append(name)
        elif m.column == "ignore":
            res.ignored.append(name)
        elif m.column == "layer_grad":
            layer_matches.append(m)
        else:
            matches.append(m)
            cur = best.get(m.column)
            if cur is None or m.priority < cur.priority:
                best[m.column] = m
    for m in matches:
        win = best[m.column]
        if win is m:
            res.columns[m.column] = m.name
            if m.column == "lr" and m.optimizer:
                res.optimizer = m.optimizer
        else:
            res.unused[m.name] = f"{m.column} is read from {win.name!r}"
    if layer_matches:
        top = min(m.priority for m in layer_matches)
        for m in layer_matches:
            if m.priority == top and m.layer:
                res.layers[m.name] = m.layer
            else:
                res.unused[m.name] = "per-layer norms are read from a higher-priority naming scheme"
    return res


def markdown_table(rules: list[NameRule] | None = None) -> str:
    """The default mapping as a Markdown table (``docs/readers.md`` embeds it verbatim; a
    test keeps the two in sync). gradprobe's own dashboard tags are summarised in one row."""
    rules = list(DEFAULT_RULES if rules is None else rules)
    own = [r for r in rules if r.note == "gradprobe TensorBoard dashboard"]
    lines = ["| priority | column | pattern (`re.fullmatch`, case-insensitive) | for |", "|---|---|---|---|"]
    if own:
        lines.append(f"| 1-{len(own)} | (the tag's column) | `gradprobe/...` dashboard tags, e.g. "
                     f"`{own[0].pattern}` | gradprobe's own TensorBoard files read back |")
    for i, r in enumerate(rules, 1):
        if r in own:
            continue
        pattern = r.pattern.replace("|", "\\|")
        lines.append(f"| {i} | `{r.column}` | `{pattern}` | {r.note} |")
    return "\n".join(lines) + "\n"
