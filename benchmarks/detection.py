"""Detection benchmark: does each rule find its fault, stay quiet without it, and name it first?

    python benchmarks/detection.py                       # every rule, 3 seeds
    python benchmarks/detection.py --quick               # a smoke run (1 seed, fewer combinations)
    python benchmarks/detection.py --seeds 5 --rules GP101,GP202 --json out.json --workers 2

For every rule that can be reproduced on a CPU, a generator builds runs with the rule's fault
injected, over seeds x architectures x optimizers, and healthy runs of every architecture
and optimizer are built alongside. Every run is a real tiny training loop recorded with
``gradprobe.watch`` (no TensorBoard files) and analyzed with ``gradprobe.analyze(logdir)``,
the full pipeline. GP701 (duplicate records in foreign logs) is measured on TensorBoard event
files, a Hugging Face ``trainer_state.json`` and a Lightning ``metrics.csv`` written from a
real run's losses, with and without duplicated records.

Per rule it prints:

* TP: the fraction of the runs built with its fault on which it fires (any severity).
* FP (healthy): the fraction of healthy runs (every architecture, optimizer, seed, and the
  healthy AMP / stateful / clipped variants) on which it fires at warning or error.
* FP (other faults): the fraction of runs built with *another* fault on which it fires at
  warning or error as a root cause of its own: a finding that names a cause in ``caused_by``
  is the report saying it is a symptom, and counts as attributed, not as a false positive;
  so does a finding the fault's generator declares as its mechanical consequence (listed in
  ``consequences`` with the reason, e.g. an over-clipped run also plateaus).
* RCF, root cause first: the fraction of the fault's runs whose report lists a root cause the
  generator injected first, and in which every symptom present (exploding gradients, loss
  spike, plateau, non-finite loss/gradients/parameters, missing clipping) names a cause.

The generators are parameterised (strength drawn per seed from a range: lr factors, scales,
gains, clip thresholds, the step a fault starts), not tuned to one run. Architectures: MLP
(regression), CNN (image classification), LSTM / GRU / vanilla RNN (sequence regression),
Transformer encoder (sequence classification on float features; an embedding variant for
token faults). Optimizers: SGD with momentum 0.9, Adam, AdamW.
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing as mp
import os
import shutil
import sys
import tempfile
import time
import traceback
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Callable

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

ARCHS = ("mlp", "cnn", "lstm", "gru", "rnn", "transformer")
RECURRENT = ("lstm", "gru", "rnn")
FP16_ARCHS = ("mlp", "cnn", "transformer")  # CPU float16 autocast fails for nn.LSTM and skips GRU/RNN
OPTS = ("sgd", "adam", "adamw")
BASE_LR = {"sgd": 0.05, "adam": 3e-3, "adamw": 3e-3}
#: Symptoms: when one is in a report it must name its cause (caused_by) for root-cause-first.
SYMPTOMS = ("GP202", "GP204", "GP401", "GP402", "GP403", "GP504", "GP505")


# =============================================================================== configs ====
@dataclass(frozen=True)
class Run:
    """One training run: an architecture, an optimizer, a seed and the switches of a fault."""

    fault: str  # "healthy" or a fault name
    arch: str
    opt: str
    seed: int
    variant: str = ""
    steps: int = 80
    lr: float | None = None
    eps: float = 1e-8
    weight_decay: float = 0.0
    max_norm: float = 0.0  # 0: no clipping
    # model
    init_gain: float = 0.0  # >0: xavier/orthogonal with this gain on every weight
    act: str = "relu"  # relu | tanh | sigmoid (mlp/cnn/transformer hidden activation)
    depth: int = 0  # >0: a deep stack of this many hidden layers (mlp/cnn)
    hidden: int = 16
    lookback: int = 20
    dead_bias: float = 0.0  # bias of the first ReLU layer
    closed_gate_bias: float = 0.0  # recurrent: bias that closes the input gate
    sat_gain: float = 0.0  # multiply the hidden weights (saturating activations)
    rho: float = 0.0  # vanilla RNN: recurrent weights with spectral radius rho
    tokens: bool = False  # token ids through an embedding
    ema_state: bool = False  # an EMA of the input carried across steps
    norm_feature: bool = False  # a magnitude feature sqrt(sum h^2) of a projection
    overflow_gain: float = 0.0  # fp16: multiply a hidden activation by this (unit conversion)
    # data
    input_scale: float = 1.0
    input_offset: float = 0.0
    target_scale: float = 1.0
    constant_targets: bool = False
    shuffled_targets: bool = False
    zero_inputs: bool = False
    nan_input_at: int = -1
    nan_target_at: int = -1
    zero_rows_at: int = -1
    outlier_at: int = -1
    outlier_scale: float = 1.0
    corrupt_at: int = -1
    corrupt_len: int = 0
    empty_mask_at: int = -1
    tiny_train: int = 0  # >0: this many training examples (overfitting)
    # loop
    amp: str = "none"  # none | float16 | bfloat16
    scaler: bool = True
    init_scale: float = 2.0**16
    skip_update_on_inf: bool = False
    clip_before_unscale: bool = False
    scale_by_hand: bool = False
    stateful: bool = False
    detach: bool = True
    retain_graph: bool = False
    manual_updates: bool = False  # p.data -= lr * grad, no optimizer
    accumulate_loss: bool = False  # total_loss += loss
    guard_nonfinite: bool = False  # skip the step when the loss / grad norm is not finite
    guard_after_backward: bool = False  # the guard runs after backward (the loss reached backward)
    grad_hook_at: int = -1  # a gradient hook multiplying the head's input gradient by outlier_scale, two steps
    grad_hook_steps: tuple[int, ...] = ()  # ... or on these steps
    val_every: int = 10

    @property
    def key(self) -> str:
        v = f"/{self.variant}" if self.variant else ""
        return f"{self.fault}{v}/{self.arch}/{self.opt}/s{self.seed}"


@dataclass
class Fault:
    """A fault generator: the rule it targets, the root causes a report may list first, its
    declared consequences (rules that follow from the fault by mechanism), and the runs."""

    name: str
    rules: tuple[str, ...]  # the rule(s) the fault is built for (TP: any of them fires)
    make: Callable[[int, bool], list[Run]]  # (seeds, quick) -> runs
    roots: tuple[str, ...] = ()  # accepted first findings (default: rules)
    consequences: dict[str, str] = field(default_factory=dict)  # code -> why it follows from the fault
    foreign: bool = False  # runs are foreign logs (GP701)

    @property
    def root_codes(self) -> tuple[str, ...]:
        return self.roots or self.rules


def _seeds(n: int) -> range:
    return range(n)


def _pick(seq: tuple[Any, ...] | list[Any], seed: int) -> Any:
    return seq[seed % len(seq)]


def _grid(fault: str, archs: tuple[str, ...], opts: tuple[str, ...], seeds: int, quick: bool,
          make: Callable[[str, str, int], Run | list[Run] | None]) -> list[Run]:
    """seeds x archs x opts; quick: one seed, and the optimizers cycled over the archs."""
    out: list[Run] = []
    for s in _seeds(1 if quick else seeds):
        for i, a in enumerate(archs):
            use = (opts[i % len(opts)],) if quick else opts
            for o in use:
                r = make(a, o, s)
                if r is None:
                    continue
                out.extend(r if isinstance(r, list) else [r])
    return out


def _base(fault: str, arch: str, opt: str, seed: int, **kw: Any) -> Run:
    clip = 1.0 if arch in RECURRENT else 0.0
    return replace(Run(fault=fault, arch=arch, opt=opt, seed=seed, max_norm=clip,
                       weight_decay=1e-2 if opt == "adamw" else 0.0), **kw)


# =============================================================================== faults =====
def _healthy(seeds: int, quick: bool) -> list[Run]:
    runs = _grid("healthy", ARCHS, OPTS, seeds, quick, lambda a, o, s: _base("healthy", a, o, s))
    for s in _seeds(1 if quick else seeds):
        for a in FP16_ARCHS:  # float16 with a default GradScaler: a few calibration skips, healthy
            runs.append(_base("healthy", a, "adam", s, variant="fp16-scaler", amp="float16", max_norm=1.0))
        for a in ("lstm", "gru"):
            runs.append(_base("healthy", a, _pick(OPTS, s), s, variant="stateful-detached", stateful=True))
            runs.append(_base("healthy", a, "adam", s, variant="bf16", amp="bfloat16"))
        runs.append(_base("healthy", "transformer", "adamw", s, variant="tokens", tokens=True))
    return runs


def _undetached(seeds: int, quick: bool) -> list[Run]:
    runs: list[Run] = []
    for s in _seeds(1 if quick else seeds):
        for i, a in enumerate(RECURRENT):
            o = _pick(OPTS, s + i)
            n = 16 + 4 * s
            runs.append(_base("undetached-state", a, o, s, variant="bf16", stateful=True, detach=False,
                              retain_graph=True, amp="bfloat16", steps=n))
            runs.append(_base("undetached-state", a, "manual", s, variant="p.data", stateful=True, detach=False,
                              retain_graph=True, manual_updates=True, steps=n))
            runs.append(_base("undetached-state", a, o, s, variant="crash-second-backward", stateful=True,
                              detach=False, steps=6))
            runs.append(_base("undetached-state", a, "adam", s, variant="crash-inplace", stateful=True,
                              detach=False, retain_graph=True, steps=6))
        for a in ("mlp", "cnn", "transformer"):
            runs.append(_base("undetached-state", a, _pick(OPTS, s), s, variant="ema", ema_state=True, detach=False,
                              steps=20 + 5 * s))
    return runs


def _graph_retained(seeds: int, quick: bool) -> list[Run]:
    return _grid("graph-retained", ARCHS, ("sgd", "adam"), seeds, quick,
                 lambda a, o, s: _base("graph-retained", a, o, s, accumulate_loss=True, steps=40 + 10 * s))


def _long_lookback(seeds: int, quick: bool) -> list[Run]:
    return _grid("long-lookback", RECURRENT, ("adam", "sgd"), seeds, quick,
                 lambda a, o, s: _base("long-lookback", a, o, s, lookback=_pick((400, 300, 500), s),
                                       hidden=_pick((8, 10, 12), s), steps=6))


def _exploding_rnn(seeds: int, quick: bool) -> list[Run]:
    return _grid("exploding-rnn", ("rnn",), ("sgd", "adam"), seeds, quick,
                 lambda a, o, s: _base("exploding-rnn", a, o, s, rho=_pick((1.15, 1.25, 1.1), s), lookback=60,
                                       input_scale=1e-3, steps=10, max_norm=0.0))


def _overclipping(seeds: int, quick: bool) -> list[Run]:
    return _grid("overclipping", ARCHS, ("sgd",), seeds, quick,
                 lambda a, o, s: _base("overclipping", a, o, s, max_norm=_pick((0.002, 0.001, 0.004), s)))


def _exploding(seeds: int, quick: bool) -> list[Run]:
    def make(a: str, o: str, s: int) -> list[Run]:
        k = _pick((300.0, 1000.0, 3000.0), s)
        # a gradient-scaling hook switched on for two steps (a misconfigured gradient-reversal
        # or scaling layer): the loss is normal, the gradients below the hook explode
        return [_base("exploding-gradients", a, o, s, variant="grad-hook", max_norm=0.0, grad_hook_at=14 + 5 * s,
                      outlier_scale=k)]
    return _grid("exploding-gradients", ARCHS, ("sgd", "adam"), seeds, quick, make)


def _vanishing(seeds: int, quick: bool) -> list[Run]:
    return _grid("vanishing-gradients", ("mlp", "cnn"), ("sgd",), seeds, quick,
                 lambda a, o, s: _base("vanishing-gradients", a, o, s, act="sigmoid",
                                       depth=_pick((12, 10, 14), s) if a == "mlp" else _pick((8, 7, 9), s),
                                       steps=40))


def _missing_clipping(seeds: int, quick: bool) -> list[Run]:
    # a recurrent run (or any run spiking repeatedly) whose gradient spikes now and then, with
    # no clipping: the spikes come from a gradient-scaling hook on a few steps
    def make(a: str, o: str, s: int) -> Run | None:
        if a not in RECURRENT and o != "adam":
            return None
        at = 25 + 4 * s
        steps = (at,) if a in RECURRENT else (at, at + 15, at + 30)
        return _base("missing-clipping", a, o, s, max_norm=0.0, grad_hook_steps=steps,
                     outlier_scale=_pick((100.0, 300.0, 1000.0), s))
    return _grid("missing-clipping", ARCHS, ("sgd", "adam"), seeds, quick, make)


def _high_init_scale(seeds: int, quick: bool) -> list[Run]:
    return _grid("high-init-scale", FP16_ARCHS, ("adam", "sgd"), seeds, quick,
                 lambda a, o, s: _base("high-init-scale", a, o, s, amp="float16",
                                       init_scale=2.0 ** _pick((32, 40, 28), s), max_norm=1.0))


def _fp16_overflow(seeds: int, quick: bool) -> list[Run]:
    return _grid("fp16-overflow", FP16_ARCHS, ("adam", "sgd"), seeds, quick,
                 lambda a, o, s: _base("fp16-overflow", a, o, s, amp="float16",
                                       overflow_gain=_pick((3e4, 1e5, 5e4), s), max_norm=1.0))


def _amp_without_scaler(seeds: int, quick: bool) -> list[Run]:
    return _grid("amp-without-scaler", FP16_ARCHS, ("adam", "sgd"), seeds, quick,
                 lambda a, o, s: _base("amp-without-scaler", a, o, s, amp="float16", scaler=False))


def _scaler_misuse(seeds: int, quick: bool) -> list[Run]:
    def make(a: str, o: str, s: int) -> list[Run]:
        return [
            _base("scaler-misuse", a, o, s, variant="skip-update", amp="float16", skip_update_on_inf=True,
                  max_norm=1.0, init_scale=2.0 ** _pick((24, 20, 30), s)),
            _base("scaler-misuse", a, o, s, variant="clip-scaled", amp="float16", clip_before_unscale=True,
                  max_norm=1.0),
            _base("scaler-misuse", a, o, s, variant="scale-by-hand", amp="float16", scale_by_hand=True,
                  max_norm=1.0),
        ]
    return _grid("scaler-misuse", FP16_ARCHS, ("adam",), seeds, quick, make)


def _nan_inputs(seeds: int, quick: bool) -> list[Run]:
    def make(a: str, o: str, s: int) -> list[Run]:
        at = 10 + 7 * s
        out = [_base("nan-inputs", a, o, s, variant="input-guarded", nan_input_at=at, guard_nonfinite=True),
               _base("nan-inputs", a, o, s, variant="input", nan_input_at=at)]
        if a in ("mlp",) + RECURRENT:
            out.append(_base("nan-inputs", a, o, s, variant="target", nan_target_at=at))
        return out
    return _grid("nan-inputs", ARCHS, ("sgd", "adam"), seeds, quick, make)


def _nan_loss(seeds: int, quick: bool) -> list[Run]:
    def make(a: str, o: str, s: int) -> list[Run]:
        at = 12 + 6 * s
        return [_base("nan-loss", a, o, s, variant="guarded", empty_mask_at=at, guard_nonfinite=True,
                      guard_after_backward=True),
                _base("nan-loss", a, o, s, variant="stepped", empty_mask_at=at)]
    return _grid("nan-loss", ARCHS, ("sgd", "adam"), seeds, quick, make)


def _nonfinite_grads(seeds: int, quick: bool) -> list[Run]:
    def make(a: str, o: str, s: int) -> list[Run]:
        at = 12 + 6 * s
        return [_base("nonfinite-gradients", a, o, s, variant="guarded", norm_feature=True, zero_rows_at=at,
                      guard_nonfinite=True),
                _base("nonfinite-gradients", a, o, s, variant="stepped", norm_feature=True, zero_rows_at=at)]
    return _grid("nonfinite-gradients", ARCHS, ("sgd", "adam"), seeds, quick, make)


def _nonfinite_params(seeds: int, quick: bool) -> list[Run]:
    return _grid("nonfinite-parameters", ("mlp", "lstm", "gru", "rnn", "transformer"), ("adam", "adamw"), seeds, quick,
                 lambda a, o, s: _base("nonfinite-parameters", a, o, s, tokens=True, eps=0.0, steps=40))


def _lr_high(seeds: int, quick: bool) -> list[Run]:
    def make(a: str, o: str, s: int) -> Run:
        factor = _pick((100.0, 300.0, 1000.0), s) if o != "sgd" else _pick((40.0, 100.0, 200.0), s)
        return _base("lr-too-high", a, o, s, lr=BASE_LR[o] * factor, max_norm=0.0)
    return _grid("lr-too-high", ARCHS, OPTS, seeds, quick, make)


def _lr_low(seeds: int, quick: bool) -> list[Run]:
    def make(a: str, o: str, s: int) -> Run:
        lr = _pick((1e-6, 3e-7, 1e-5), s) if o == "sgd" else _pick((1e-7, 3e-8, 3e-7), s)
        return _base("lr-too-low", a, o, s, lr=lr)
    return _grid("lr-too-low", ARCHS, OPTS, seeds, quick, make)


def _loss_spike(seeds: int, quick: bool) -> list[Run]:
    def make(a: str, o: str, s: int) -> list[Run]:
        out = [_base("loss-spike", a, o, s, variant="corrupt-stretch", steps=100, corrupt_at=50 + 5 * s,
                     corrupt_len=_pick((4, 6, 5), s))]
        if a == "mlp":  # an outlier batch (features x100-1000): saturating cells and softmax bound it elsewhere
            out.append(_base("loss-spike", a, o, s, variant="outlier-batch", steps=100, max_norm=0.0,
                             outlier_at=50 + 5 * s, outlier_scale=_pick((300.0, 1000.0, 100.0), s)))
        return out
    return _grid("loss-spike", ARCHS, ("adam", "sgd"), seeds, quick, make)


def _plateau(seeds: int, quick: bool) -> list[Run]:
    def make(a: str, o: str, s: int) -> list[Run]:
        return [_base("plateau", a, o, s, variant="constant-input", zero_inputs=True),
                _base("plateau", a, o, s, variant="shuffled-targets", shuffled_targets=True)]
    return _grid("plateau", ARCHS, ("adam", "sgd"), seeds, quick, make)


def _overfitting(seeds: int, quick: bool) -> list[Run]:
    # not the CNN: in these runs its weight sharing generalises from 12-24 noisy images and the
    # validation loss does not turn up, so the fault cannot be produced reliably
    return _grid("overfitting", ("mlp", "transformer") + RECURRENT, ("adam",), seeds, quick,
                 lambda a, o, s: _base("overfitting", a, o, s, tiny_train=_pick((16, 24, 20), s), hidden=64,
                                       steps=250, val_every=10))


def _input_scale(seeds: int, quick: bool) -> list[Run]:
    return _grid("input-scale", ARCHS, ("adam", "sgd"), seeds, quick,
                 lambda a, o, s: _base("input-scale", a, o, s, input_scale=_pick((1e3, 1e4, 300.0), s),
                                       input_offset=_pick((1e3, 0.0, 500.0), s)))


def _degenerate_targets(seeds: int, quick: bool) -> list[Run]:
    def make(a: str, o: str, s: int) -> list[Run]:
        out = [_base("degenerate-targets", a, o, s, variant="constant", constant_targets=True)]
        if a in ("mlp",) + RECURRENT:
            out.append(_base("degenerate-targets", a, o, s, variant="tiny", target_scale=_pick((1e-7, 1e-5, 1e-6), s)))
        return out
    return _grid("degenerate-targets", ARCHS, ("adam", "sgd"), seeds, quick, make)


def _poor_init(seeds: int, quick: bool) -> list[Run]:
    # not the Transformer: its LayerNorms reset the scale and the residual path carries the
    # input, so a tiny gain does not starve it (GP603 does not judge normalised networks)
    return _grid("poor-initialization", ("mlp", "cnn") + RECURRENT, ("adam", "sgd"), seeds, quick,
                 lambda a, o, s: _base("poor-initialization", a, o, s, init_gain=_pick((1e-3, 1e-2, 3e-3), s)))


def _saturated(seeds: int, quick: bool) -> list[Run]:
    def make(a: str, o: str, s: int) -> Run:
        if a in ("lstm", "gru"):
            return _base("saturated-activations", a, o, s, closed_gate_bias=_pick((-10.0, -8.0, -12.0), s))
        if a == "rnn":
            return _base("saturated-activations", a, o, s, sat_gain=_pick((20.0, 30.0, 25.0), s))
        return _base("saturated-activations", a, o, s, act="tanh", sat_gain=_pick((20.0, 30.0, 15.0), s))
    # no sigmoid/tanh units in a standard Transformer encoder: not reproduced there
    return _grid("saturated-activations", ("mlp", "cnn") + RECURRENT, ("adam", "sgd"), seeds, quick, make)


def _dead_units(seeds: int, quick: bool) -> list[Run]:
    return _grid("dead-units", ARCHS, ("adam", "sgd"), seeds, quick,
                 lambda a, o, s: _base("dead-units", a, o, s, dead_bias=_pick((-10.0, -20.0, -6.0), s)))


def _duplicate_logs(seeds: int, quick: bool) -> list[Run]:
    out = []
    for s in _seeds(1 if quick else seeds):
        for v in ("tb-repeat", "tb-two-writers", "hf-appended", "csv-epoch-twice"):
            out.append(Run(fault="duplicate-logs", arch="foreign", opt="-", seed=s, variant=v))
    return out


def _clean_foreign(seeds: int, quick: bool) -> list[Run]:
    out = []
    for s in _seeds(1 if quick else seeds):
        for v in ("tb-clean", "hf-clean", "csv-clean"):
            out.append(Run(fault="healthy", arch="foreign", opt="-", seed=s, variant=v))
    return out


FAULTS: list[Fault] = [
    Fault("undetached-state", ("GP101",), _undetached,
          consequences={"GP103": "the carried state keeps earlier steps' graphs alive (the same leak, seen as graphs)"}),
    Fault("graph-retained", ("GP103",), _graph_retained),
    Fault("long-lookback", ("GP102",), _long_lookback),
    Fault("exploding-rnn", ("GP102",), _exploding_rnn,
          consequences={"GP202": "gradients growing through time are large gradients",
                         "GP601": "the generator keeps the tanh RNN linear with inputs of 1e-3, far below unit scale"}),
    Fault("overclipping", ("GP201",), _overclipping),
    Fault("exploding-gradients", ("GP202",), _exploding),
    Fault("vanishing-gradients", ("GP203",), _vanishing),
    Fault("missing-clipping", ("GP204",), _missing_clipping, roots=("GP204", "GP202")),
    Fault("high-init-scale", ("GP301",), _high_init_scale),
    Fault("fp16-overflow", ("GP302",), _fp16_overflow),
    Fault("amp-without-scaler", ("GP303",), _amp_without_scaler),
    Fault("scaler-misuse", ("GP305",), _scaler_misuse),
    Fault("nan-inputs", ("GP404",), _nan_inputs),
    Fault("nan-loss", ("GP401",), _nan_loss),
    Fault("nonfinite-gradients", ("GP402",), _nonfinite_grads),
    Fault("nonfinite-parameters", ("GP403",), _nonfinite_params),
    Fault("lr-too-high", ("GP501",), _lr_high),
    Fault("lr-too-low", ("GP502",), _lr_low),
    Fault("loss-spike", ("GP504",), _loss_spike),
    Fault("plateau", ("GP505",), _plateau,
          consequences={"GP605": "a network that can only lower its loss by predicting the prior (no signal in its "
                                 "input or targets) turns its ReLU units off"}),
    Fault("overfitting", ("GP506",), _overfitting),
    Fault("input-scale", ("GP601",), _input_scale),
    Fault("degenerate-targets", ("GP602",), _degenerate_targets),
    Fault("poor-initialization", ("GP603",), _poor_init),
    Fault("saturated-activations", ("GP604",), _saturated),
    Fault("dead-units", ("GP605",), _dead_units),
    Fault("duplicate-logs", ("GP701",), _duplicate_logs, foreign=True),
]
HEALTHY: list[Callable[[int, bool], list[Run]]] = [_healthy, _clean_foreign]


# =============================================================================== models =====
def _build(run: Run) -> Any:
    import torch
    import torch.nn as nn

    act = {"relu": nn.ReLU, "tanh": nn.Tanh, "sigmoid": nn.Sigmoid}[run.act]
    H = run.hidden

    class EMAInput(nn.Module):
        """A running mean of the batch features (state = 0.9 state + 0.1 (mean(x) + shift),
        written with add(alpha=) so its graph saves no tensors) subtracted from the input."""

        def __init__(self, shape: tuple[int, ...]) -> None:
            super().__init__()
            self.shift = nn.Parameter(torch.zeros(shape))

        def forward(self, x: torch.Tensor, state: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
            m = x.mean(0) if x.dim() <= 2 or x.shape[1:] == self.shift.shape else x.mean((0, 1))
            if state is None:
                state = torch.zeros_like(m)
            state = torch.add(state, m + self.shift - state, alpha=0.1)
            return x - state, state

    class NormFeature(nn.Module):
        """h = P x (no bias) plus its magnitude ||h|| over the last dim: finite forward, but
        d||h||/dh = h / ||h|| is 0/0 on an all-zero row."""

        def __init__(self, d: int) -> None:
            super().__init__()
            self.proj = nn.Linear(d, d, bias=False)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = self.proj(x)
            return h + 1e-3 * torch.sqrt((h * h).sum(-1, keepdim=True))

    class Scale(nn.Module):
        def __init__(self, k: float) -> None:
            super().__init__()
            self.k = k

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x * self.k

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            a = run.arch
            self.kind = a
            self.front: nn.Module | None = None
            self.ema: nn.Module | None = None
            if run.tokens:
                self.embed = nn.Embedding(50, 16)
            if a == "mlp":
                F_in = 16 if run.tokens else 8
                if run.ema_state:
                    self.ema = EMAInput((F_in,))
                if run.norm_feature:
                    self.front = NormFeature(F_in)
                W = max(32, H)
                layers: list[nn.Module] = [nn.Linear(F_in, W), act()]
                for _ in range(max(0, run.depth - 1) if run.depth else 1):
                    layers += [nn.Linear(W, W), act()]
                if run.overflow_gain:
                    layers.insert(2, Scale(run.overflow_gain))
                self.body = nn.Sequential(*layers)
                self.head = nn.Linear(W, 50 if run.tokens else 1)
            elif a == "cnn":
                if run.ema_state:
                    self.ema = EMAInput((1, 12, 12))
                if run.norm_feature:
                    self.front = NormFeature(12)
                if run.depth:
                    convs: list[nn.Module] = [nn.Conv2d(1, 8, 3, padding=1), act()]
                    for _ in range(run.depth - 1):
                        convs += [nn.Conv2d(8, 8, 3, padding=1), act()]
                    convs += [nn.MaxPool2d(2), nn.MaxPool2d(2), nn.Flatten()]
                    self.body = nn.Sequential(*convs)
                    self.head = nn.Linear(8 * 3 * 3, 3)
                else:
                    c1, c2 = (8, 16) if H <= 16 else (H // 2, H)
                    convs = [nn.Conv2d(1, c1, 3, padding=1), act(), nn.MaxPool2d(2), nn.Conv2d(c1, c2, 3, padding=1),
                             act(), nn.MaxPool2d(2), nn.Flatten()]
                    if run.overflow_gain:
                        convs.insert(2, Scale(run.overflow_gain))
                    self.body = nn.Sequential(*convs)
                    self.head = nn.Linear(c2 * 3 * 3, 3)
            elif a in RECURRENT:
                F_in = 16 if run.tokens else 4
                if run.norm_feature:
                    self.front = NormFeature(F_in)
                cls = {"lstm": nn.LSTM, "gru": nn.GRU, "rnn": nn.RNN}[a]
                kw = {"bias": False} if a == "rnn" and run.rho else {}
                self.rnn = cls(F_in, H if not run.tokens else 32, batch_first=True, **kw)
                hh = H if not run.tokens else 32
                out_dim = 50 if run.tokens else 1
                self.head = nn.Sequential(nn.Linear(hh, 16), nn.ReLU(), nn.Linear(16, out_dim))
            else:  # transformer
                F_in = 4
                d = 16
                if run.ema_state:
                    self.ema = EMAInput((F_in,))
                if run.norm_feature:
                    self.front = NormFeature(F_in)
                if not run.tokens:
                    self.inp = nn.Linear(F_in, d)
                self.scale = Scale(run.overflow_gain) if run.overflow_gain else None
                layer = nn.TransformerEncoderLayer(d, 2, 32, dropout=0.0, batch_first=True,
                                                   activation="relu" if run.act == "relu" else "gelu")
                self.enc = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
                self.head = nn.Linear(d, 50 if run.tokens else 3)

        step_i = -1

        def hooked(self, h: torch.Tensor) -> torch.Tensor:
            k = run.grad_hook_at
            on = (k >= 0 and k <= self.step_i < k + 2) or self.step_i in run.grad_hook_steps
            if on and h.requires_grad:
                h.register_hook(lambda g: g * run.outlier_scale)
            return h

        def forward(self, x: torch.Tensor, state: Any = None) -> tuple[torch.Tensor, Any]:
            new_state = None
            if run.tokens:
                x = self.embed(x)
                if self.kind == "mlp":
                    x = x.mean(1)
            if self.ema is not None:
                x, new_state = self.ema(x, state)
            if self.front is not None:
                x = self.front(x)
            if self.kind in ("mlp", "cnn"):
                return self.head(self.hooked(self.body(x))), new_state
            if self.kind in RECURRENT:
                out, new_state = self.rnn(x, state)
                return self.head(self.hooked(out)), new_state
            h = x if run.tokens else self.inp(x)
            if self.scale is not None:
                h = self.scale(h)
            h = self.hooked(self.enc(h))
            return self.head(h if run.tokens else h.mean(1)), new_state

    model = Net()
    with torch.no_grad():
        if run.init_gain > 0:
            for name, p in model.named_parameters():
                if p.dim() < 2:
                    if name.endswith("bias") or "bias_" in name:
                        nn.init.zeros_(p)  # normalisation gains stay 1
                elif "weight_hh" in name:
                    nn.init.orthogonal_(p, gain=run.init_gain)
                else:
                    nn.init.xavier_uniform_(p, gain=run.init_gain)
        if run.rho and run.arch == "rnn":
            Hh = model.rnn.hidden_size
            model.rnn.weight_hh_l0.copy_(torch.linalg.qr(torch.randn(Hh, Hh))[0] * run.rho)
        if run.dead_bias:
            first = _first_relu_linear(model, run)
            first.bias.fill_(run.dead_bias)
        if run.closed_gate_bias and run.arch in ("lstm", "gru"):
            Hh = model.rnn.hidden_size
            b = model.rnn.bias_ih_l0
            if run.arch == "lstm":
                b[:Hh].fill_(run.closed_gate_bias)  # input gate closed
                b[3 * Hh:].fill_(run.closed_gate_bias)  # output gate closed
            else:
                b[Hh:2 * Hh].fill_(-run.closed_gate_bias)  # GRU update gate z -> 1? keep state; reset gate r -> 0
                b[:Hh].fill_(run.closed_gate_bias)  # reset gate closed
        if run.sat_gain:
            if run.arch == "rnn":
                model.rnn.weight_ih_l0.mul_(run.sat_gain)
            else:
                for name, p in model.named_parameters():
                    if p.dim() >= 2 and not name.startswith("head"):
                        p.mul_(run.sat_gain)
    return model


def _first_relu_linear(model: Any, run: Run) -> Any:
    if run.arch == "mlp":
        return model.body[0]
    if run.arch == "cnn":
        return model.body[0]
    if run.arch in RECURRENT:
        return model.head[0]
    return model.enc.layers[0].linear1


# ================================================================================= data =====
def _data(run: Run) -> tuple[list[tuple[Any, Any]], tuple[Any, Any]]:
    """Training batches (one per step) and a validation set, for the run's architecture."""
    import torch

    g = torch.Generator().manual_seed(1000 + run.seed)
    a = run.arch
    n = run.steps

    def regression(k: int, B: int = 32) -> list[tuple[torch.Tensor, torch.Tensor]]:
        return [(x, x @ w / math.sqrt(8) + 0.1 * torch.randn(B, 1, generator=g))
                for x in (torch.randn(B, 8, generator=g) for _ in range(k))]

    if run.tokens:
        # a Markov chain over ids 0..19 (ids 20..49 of the 50-row embedding never occur)
        succ = torch.randint(0, 20, (20, 3), generator=g)
        B, T = 10, 20

        def tok(k: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
            out = []
            for _ in range(k):
                s = torch.zeros(B, T + 1, dtype=torch.long)
                s[:, 0] = torch.randint(0, 20, (B,), generator=g)
                ch = torch.randint(0, 3, (B, T + 1), generator=g)
                for t in range(1, T + 1):
                    s[:, t] = succ[s[:, t - 1], ch[:, t]]
                if a == "mlp":
                    out.append((s[:, :T], s[:, T]))
                else:
                    out.append((s[:, :T], s[:, 1:]))
            return out
        batches, val = tok(n), tok(4)
        return batches, (torch.cat([b[0] for b in val]), torch.cat([b[1] for b in val]))

    if a == "mlp":
        w = torch.randn(8, 1, generator=g)
        batches = regression(n)
        vb = regression(4)
    elif a == "cnn":
        protos = torch.randn(3, 1, 12, 12, generator=g)

        def img(k: int, B: int = 16) -> list[tuple[torch.Tensor, torch.Tensor]]:
            out = []
            for _ in range(k):
                y = torch.randint(0, 3, (B,), generator=g)
                out.append((protos[y] + 0.7 * torch.randn(B, 1, 12, 12, generator=g), y))
            return out
        batches, vb = img(n), img(4)
    elif a in RECURRENT:
        B, T = 16, run.lookback
        if run.lookback > 100:
            B = 4

        def seq(k: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
            out = []
            for _ in range(k):
                x = torch.randn(B, T, 4, generator=g)
                y = 0.5 * torch.roll(x[..., :1], 2, dims=1) + 0.5 * x[..., 1:2]
                out.append((x, y))
            return out
        if run.stateful:
            # B parallel streams of consecutive windows of one smoothed series
            L = T * (n + 1)
            raw = torch.randn(B, L, 4, generator=g)
            sm = torch.zeros_like(raw)
            acc = torch.zeros(B, 4)
            for t in range(L):
                acc = 0.8 * acc + 0.2 * raw[:, t]
                sm[:, t] = acc
            y = 0.7 * torch.roll(sm[..., :1], 3, dims=1) + 0.3 * sm[..., 1:2]
            batches = [(sm[:, k * T:(k + 1) * T], y[:, k * T:(k + 1) * T]) for k in range(n)]
            vb = seq(2)
        else:
            batches, vb = seq(n), seq(4)
    else:
        W = torch.randn(4, 3, generator=g)

        def cls(k: int, B: int = 16, T: int = 10) -> list[tuple[torch.Tensor, torch.Tensor]]:
            out = []
            for _ in range(k):
                x = torch.randn(B, T, 4, generator=g)
                out.append((x, (x.mean(1) @ W).argmax(1)))
            return out
        batches, vb = cls(n), cls(4)
    if run.tiny_train:
        # a few noisy examples repeated every step: the model memorises them
        xs = torch.cat([b[0] for b in batches])[: run.tiny_train]
        ys = torch.cat([b[1] for b in batches])[: run.tiny_train]
        if ys.is_floating_point():
            ys = ys + 1.5 * torch.randn(ys.shape, generator=g)
        else:
            flip = torch.rand(ys.shape, generator=g) < 0.5
            ys = torch.where(flip, torch.randint(0, 3, ys.shape, generator=g), ys)
            xs = xs + 1.5 * torch.randn(xs.shape, generator=g)  # noisy examples: memorised, not generalised
        batches = [(xs, ys)] * n
    vx, vy = torch.cat([b[0] for b in vb]), torch.cat([b[1] for b in vb])
    return [_transform(run, i, x, y, g) for i, (x, y) in enumerate(batches)], (_transform(run, -2, vx, vy, g))


def _classes(run: Run) -> int:
    return 20 if run.tokens else 3


def _transform(run: Run, i: int, x: Any, y: Any, g: Any) -> tuple[Any, Any]:
    import torch

    if run.input_scale != 1.0 or run.input_offset:
        x = x * run.input_scale + run.input_offset
    if run.zero_inputs:
        x = torch.zeros_like(x)
    if y.is_floating_point():
        if run.target_scale != 1.0:
            y = y * run.target_scale
        if run.constant_targets:
            y = torch.full_like(y, 0.7)
    elif run.constant_targets:
        y = torch.zeros_like(y)
    if run.shuffled_targets and i >= 0:
        y = y[torch.randperm(y.shape[0], generator=g)]
        if y.is_floating_point():
            y = torch.randn(y.shape, generator=g) * y.std()
        else:
            y = torch.randint(0, _classes(run), y.shape, generator=g)
    if i < 0:
        return x, y
    if i == run.nan_input_at:
        x = x.clone()
        x.view(-1)[3] = float("nan")
    if i == run.nan_target_at and y.is_floating_point():
        y = y.clone()
        y.view(-1)[1] = float("nan")
    if i == run.zero_rows_at:
        x = x.clone()
        x[:2] = 0.0
    if run.outlier_at >= 0 and run.outlier_at <= i < run.outlier_at + 2:
        x = x * run.outlier_scale
    if run.corrupt_at >= 0 and run.corrupt_at <= i < run.corrupt_at + run.corrupt_len:
        # a stretch of corrupt batches: sign-flipped regression targets, shifted labels
        y = -y if y.is_floating_point() else (y + 1) % _classes(run)
    return x, y


# ================================================================================= loop =====
def _loss(run: Run, out: Any, y: Any, i: int) -> Any:
    import torch
    import torch.nn.functional as F

    if run.tokens and run.arch != "mlp":
        out, y = out.reshape(-1, out.shape[-1]), y.reshape(-1)
    if run.empty_mask_at >= 0:
        # a masked mean: (loss * mask).sum() / mask.sum(); the mask is empty on one batch -> 0/0
        if y.is_floating_point():
            per = F.mse_loss(out, y, reduction="none").reshape(out.shape[0], -1).mean(1)
        else:
            per = F.cross_entropy(out, y, reduction="none")
        mask = torch.ones_like(per)
        if i == run.empty_mask_at:
            mask = torch.zeros_like(per)
        return (per * mask).sum() / mask.sum()
    if y.is_floating_point():
        return F.mse_loss(out.float(), y)
    return F.cross_entropy(out.float(), y)


def _detach(state: Any) -> Any:
    if state is None:
        return None
    if isinstance(state, tuple):
        return tuple(s.detach() for s in state)
    return state.detach()


def train(run: Run, logdir: str) -> dict[str, Any]:
    """Trains ``run`` under gradprobe.watch into ``logdir``; returns what happened."""
    import torch

    import gradprobe

    torch.manual_seed(run.seed)
    model = _build(run)
    batches, (vx, vy) = _data(run)
    lr = run.lr if run.lr is not None else BASE_LR.get(run.opt, 0.01)
    opt: Any = None
    if run.opt == "sgd":
        opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=run.weight_decay)
    elif run.opt == "adam":
        opt = torch.optim.Adam(model.parameters(), lr=lr, eps=run.eps, weight_decay=run.weight_decay)
    elif run.opt == "adamw":
        opt = torch.optim.AdamW(model.parameters(), lr=lr, eps=run.eps, weight_decay=run.weight_decay or 1e-2)
    amp_dtype = {"float16": torch.float16, "bfloat16": torch.bfloat16}.get(run.amp)
    scaler = None
    if run.amp == "float16" and run.scaler:
        scaler = torch.amp.GradScaler("cpu", init_scale=run.init_scale)
    info: dict[str, Any] = {"exception": None}
    state: Any = None
    total_loss: Any = 0.0
    params = list(model.parameters())
    try:
        with gradprobe.watch(model, opt, scaler=scaler, logdir=logdir, tensorboard=False) as probe:
            for i, (x, y) in enumerate(batches):
                model.step_i = i
                carried = state if (run.stateful or run.ema_state) else None
                with torch.autocast("cpu", dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
                    out, new_state = model(x, carried)
                    loss = _loss(run, out, y, i)
                if run.guard_nonfinite and not run.guard_after_backward and not torch.isfinite(loss):
                    state = _detach(new_state)
                    if opt is not None:
                        opt.zero_grad()
                    continue
                if opt is not None:
                    opt.zero_grad()
                else:
                    model.zero_grad()
                if scaler is not None:
                    scaler.scale(loss).backward(retain_graph=run.retain_graph)
                    if not run.clip_before_unscale:
                        scaler.unscale_(opt)
                    norm = torch.nn.utils.clip_grad_norm_(params, run.max_norm) if run.max_norm > 0 else None
                    if run.skip_update_on_inf and norm is not None and not torch.isfinite(norm):
                        continue  # a hand-made guard: the scale never backs off
                    if run.scale_by_hand and i % 10 == 5:
                        scaler._scale = torch.clamp(scaler._scale * 0.5, min=1.0)
                    scaler.step(opt)
                    scaler.update()
                else:
                    loss.backward(retain_graph=run.retain_graph)
                    if run.guard_after_backward and not torch.isfinite(loss):
                        state = _detach(new_state)
                        continue
                    norm = torch.nn.utils.clip_grad_norm_(params, run.max_norm) if run.max_norm > 0 else None
                    if run.guard_nonfinite:
                        if norm is None:
                            norm = torch.nn.utils.clip_grad_norm_(params, float("inf"))
                        if not torch.isfinite(norm):
                            state = _detach(new_state)
                            continue
                    if run.manual_updates:
                        with torch.no_grad():
                            for p in params:
                                if p.grad is not None:
                                    p.data -= lr * p.grad
                    else:
                        opt.step()
                state = new_state if not run.detach else _detach(new_state)
                if run.accumulate_loss:
                    total_loss = total_loss + loss
                if run.val_every and i % run.val_every == run.val_every - 1:
                    model.eval()
                    with torch.no_grad():
                        vo, _ = model(vx)
                        v = float(_loss(replace(run, empty_mask_at=-1), vo, vy, -1))
                    model.train()
                    probe.log(val_loss=v)
    except RuntimeError as exc:
        info["exception"] = f"{type(exc).__name__}: {str(exc)[:120]}"
    return info


# ======================================================================== foreign logs ======
def write_foreign(run: Run, path: str) -> str:
    """A foreign log (TensorBoard, trainer_state.json, metrics.csv) of a real run's losses,
    with duplicated records for the duplicate-logs fault. Returns the path to analyze."""
    import csv

    import numpy as np

    rng = np.random.default_rng(run.seed)
    n = 40 + 10 * run.seed
    loss = 2.0 * np.exp(-np.arange(n) / 15.0) + 0.1 + 0.05 * rng.standard_normal(n)
    v = run.variant
    os.makedirs(path, exist_ok=True)
    if v.startswith("tb"):
        from torch.utils.tensorboard import SummaryWriter

        repeat = 1 + (1 + run.seed % 3) if v == "tb-repeat" else 1
        w = SummaryWriter(log_dir=path, filename_suffix=".a")
        for s in range(n):
            for _ in range(repeat):
                w.add_scalar("train/loss", float(loss[s]), global_step=s)
        w.close()
        if v == "tb-two-writers":
            time.sleep(1.1)  # event file names carry the creation second
            w = SummaryWriter(log_dir=path, filename_suffix=".b")
            for s in range(n):
                w.add_scalar("train/loss", float(loss[s]) * 1.05, global_step=s)
            w.close()
        return path
    if v.startswith("hf"):
        hist = [{"loss": float(loss[s]), "grad_norm": 1.0, "learning_rate": 1e-3, "epoch": s / 10, "step": s + 1}
                for s in range(n)]
        if v == "hf-appended":
            k = n // 2 - 5 * run.seed
            hist += [dict(h) for h in hist[k:]]
        p = os.path.join(path, "trainer_state.json")
        with open(p, "w") as fh:
            json.dump({"global_step": n, "log_history": hist, "logging_steps": 1}, fh)
        return p
    rows = []
    per_epoch = 5
    for epoch in range(n // per_epoch):
        for s in range(epoch * per_epoch, (epoch + 1) * per_epoch):
            rows.append({"epoch": epoch, "step": s, "train_loss_step": float(loss[s])})
        for _ in range(2 if v == "csv-epoch-twice" else 1):
            rows.append({"epoch": epoch, "step": (epoch + 1) * per_epoch - 1, "val_loss": float(loss[(epoch + 1) * per_epoch - 1]) * 1.1})
    p = os.path.join(path, "metrics.csv")
    with open(p, "w", newline="") as fh:
        wr = csv.DictWriter(fh, fieldnames=["epoch", "step", "train_loss_step", "val_loss"])
        wr.writeheader()
        wr.writerows(rows)
    return p


# ============================================================================== running =====
KEEP = os.environ.get("GRADPROBE_DETECTION_KEEP", "")


def run_one(run: Run) -> dict[str, Any]:
    """Builds, records and analyzes one run (in a worker process)."""
    import torch

    import gradprobe

    torch.set_num_threads(1)
    t0 = time.perf_counter()
    tmp = tempfile.mkdtemp(prefix="gp-detect-")
    out: dict[str, Any] = {"run": asdict(run), "key": run.key}
    try:
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if run.arch == "foreign":
                path = write_foreign(run, os.path.join(tmp, "log"))
                out["exception"] = None
            else:
                path = os.path.join(tmp, "run")
                out.update(train(run, path))
            rep = gradprobe.analyze(path)
        out["findings"] = [{"code": f.code, "rule": f.rule, "severity": f.severity, "confidence": round(f.confidence, 3),
                            "first_step": f.first_step, "caused_by": list(f.caused_by), "message": f.message[:300],
                            "evidence": json.loads(json.dumps(f.evidence, default=str))}
                           for f in rep.findings]
        if KEEP:
            dest = os.path.join(KEEP, run.key.replace("/", "__"))
            shutil.rmtree(dest, ignore_errors=True)
            shutil.copytree(os.path.dirname(path) if os.path.isfile(path) else path, dest)
        out["suggested"] = rep.suggested_hyperparameters
        out["rule_errors"] = [f"{s.code}: {s.reason}" for s in rep.skipped_rules if "rule error" in s.reason]
    except Exception as exc:  # noqa: BLE001 - a broken run is reported, never hides the others
        out["error"] = f"{type(exc).__name__}: {exc}\n{traceback.format_exc()[-1500:]}"
        out["findings"] = []
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    out["seconds"] = round(time.perf_counter() - t0, 2)
    return out


def _by_code(findings: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """code -> its most severe finding (a rule may report several)."""
    rank = {"error": 0, "warning": 1, "info": 2}
    out: dict[str, dict[str, Any]] = {}
    for f in findings:
        if f["code"] not in out or rank[f["severity"]] < rank[out[f["code"]]["severity"]]:
            out[f["code"]] = f
    return out


def root_cause_first(findings: list[dict[str, Any]], roots: tuple[str, ...]) -> bool:
    """The report lists an injected root cause first, and every symptom present names a cause."""
    if not findings or findings[0]["code"] not in roots:
        return False
    for f in findings:
        if f["code"] in SYMPTOMS and f["code"] not in roots and f["severity"] != "info" and not f["caused_by"]:
            return False
    return True


def score(results: list[dict[str, Any]], faults: list[Fault]) -> dict[str, dict[str, Any]]:
    """Per rule: TP, FP on healthy runs, FP on other faults' runs (unattributed), RCF."""
    by_fault = {f.name: f for f in faults}
    rules = sorted({c for f in faults for c in f.rules} | {f["code"] for r in results for f in r["findings"]})
    table: dict[str, dict[str, Any]] = {}
    for code in rules:
        tp = [0, 0]
        rcf = [0, 0]
        fp_h = [0, 0]
        fp_o = [0, 0]
        misses: list[str] = []
        fps: list[str] = []
        for r in results:
            fault = by_fault.get(r["run"]["fault"])
            found = _by_code(r["findings"])
            f = found.get(code)
            alarming = f is not None and f["severity"] in ("error", "warning")
            if fault is not None and code in fault.rules:
                tp[1] += 1
                rcf[1] += 1
                if f is not None:
                    tp[0] += 1
                else:
                    misses.append(r["key"])
                if root_cause_first(r["findings"], fault.root_codes):
                    rcf[0] += 1
            elif fault is None:
                if r["run"]["arch"] == "foreign" and code != "GP701" and not alarming:
                    continue
                fp_h[1] += 1
                if alarming:
                    fp_h[0] += 1
                    fps.append(r["key"])
            else:
                fp_o[1] += 1
                if alarming and not f["caused_by"] and code not in fault.consequences and code not in fault.root_codes:
                    fp_o[0] += 1
                    fps.append(r["key"])
        table[code] = {"tp": tp, "fp_healthy": fp_h, "fp_other": fp_o, "rcf": rcf, "misses": misses, "false_positives": fps}
    return table


def _rate(p: list[int]) -> str:
    return f"{p[0] / p[1]:.2f} ({p[0]}/{p[1]})" if p[1] else "-"


def markdown(table: dict[str, dict[str, Any]], faults: list[Fault]) -> str:
    from gradprobe.rules import get_rule

    targeted = {c for f in faults for c in f.rules}
    lines = ["| rule | slug | TP | FP (healthy) | FP (other faults) | root cause first |",
             "|---|---|---|---|---|---|"]
    for code, row in table.items():
        cls = get_rule(code)
        slug = cls.slug if cls else ""
        tp = _rate(row["tp"]) if code in targeted else "not reproduced"
        rcf = _rate(row["rcf"]) if code in targeted else "-"
        lines.append(f"| {code} | `{slug}` | {tp} | {_rate(row['fp_healthy'])} | {_rate(row['fp_other'])} | {rcf} |")
    return "\n".join(lines)


def collect(seeds: int, quick: bool, rules: set[str] | None) -> tuple[list[Run], list[Fault]]:
    faults = [f for f in FAULTS if rules is None or set(f.rules) & rules]
    runs: list[Run] = []
    for f in faults:
        runs.extend(f.make(seeds, quick))
    for h in HEALTHY:
        runs.extend(h(seeds, quick))
    return runs, faults


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--rules", default="", help="comma-separated codes (default: every rule)")
    p.add_argument("--quick", action="store_true", help="one seed, optimizers cycled over architectures")
    p.add_argument("--json", default="", help="write every run's findings and the table here")
    p.add_argument("--workers", type=int, default=2, help="processes (1: sequential)")
    p.add_argument("--list", action="store_true", help="list the runs and exit")
    p.add_argument("--only", default="", help="comma-separated substrings: keep the runs whose key contains one")
    p.add_argument("--keep", default="", help="copy every run directory here (for inspection)")
    p.add_argument("--verbose", action="store_true", help="print every miss and false positive")
    args = p.parse_args(argv)
    rules = {r.strip().upper() for r in args.rules.split(",") if r.strip()} or None
    runs, faults = collect(args.seeds, args.quick, rules)
    if args.only:
        pats = [x for x in args.only.split(",") if x]
        runs = [r for r in runs if any(x in r.key for x in pats)]
    if args.keep:
        global KEEP
        KEEP = os.path.abspath(args.keep)
        os.makedirs(KEEP, exist_ok=True)
    if args.list:
        for r in runs:
            print(r.key)
        print(f"{len(runs)} runs")
        return 0
    t0 = time.perf_counter()
    results: list[dict[str, Any]] = []
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    if args.workers > 1:
        ctx = mp.get_context("fork" if sys.platform != "win32" else "spawn")
        with ctx.Pool(args.workers, maxtasksperchild=25) as pool:
            for k, res in enumerate(pool.imap_unordered(run_one, runs, chunksize=1)):
                results.append(res)
                if (k + 1) % 25 == 0:
                    print(f"  {k + 1}/{len(runs)} runs, {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    else:
        for k, r in enumerate(runs):
            results.append(run_one(r))
            if (k + 1) % 25 == 0:
                print(f"  {k + 1}/{len(runs)} runs, {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    elapsed = time.perf_counter() - t0
    results.sort(key=lambda r: r["key"])
    table = score(results, faults)
    errors = [r for r in results if r.get("error")]
    print(markdown(table, faults))
    print(f"\n{len(results)} runs ({sum(1 for r in results if r['run']['fault'] == 'healthy')} healthy) in "
          f"{elapsed:.0f} s with {args.workers} worker(s); seeds={1 if args.quick else args.seeds}"
          + (" (--quick)" if args.quick else ""))
    if errors:
        print(f"{len(errors)} run(s) failed to build or analyze:")
        for r in errors[:10]:
            print(f"  {r['key']}: {r['error'].splitlines()[0]}")
    rule_errors = sorted({e for r in results for e in r.get("rule_errors", [])})
    for e in rule_errors[:10]:
        print(f"  rule error: {e}")
    if args.verbose:
        for code, row in table.items():
            if row["misses"]:
                print(f"{code} missed: {', '.join(row['misses'])}")
            if row["false_positives"]:
                print(f"{code} false positives: {', '.join(row['false_positives'])}")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"elapsed_s": elapsed, "seeds": args.seeds, "quick": args.quick, "table": table,
                       "runs": results}, fh, indent=1, default=str)
    return 0


if __name__ == "__main__":
    sys.exit(main())
