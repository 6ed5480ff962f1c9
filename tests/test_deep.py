"""Deep probes: each statistic against a brute-force reference, and real tiny runs where
each probe matters."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn as nn

import gradprobe
from gradprobe.config import ProbeConfig
from gradprobe.probe.deep import gradient_through_time
from gradprobe.schedule import Schedule
from gradprobe.stats import bptt_summary
from tests.helpers import SeqRegressor, mlp, regression_batches

EVERY = ProbeConfig(schedule=Schedule(every=1))


def _sample(log: gradprobe.RunLog, probe: str, target: str, stat: str, step: int = 0) -> float:
    s = log.samples
    sel = s[(s.probe == probe) & (s.target == target) & (s.stat == stat) & (s.step == step)]
    assert len(sel), (probe, target, stat, step)
    return float(sel["value"].iloc[0])


@pytest.mark.parametrize("batch_first", [True, False])
def test_gradient_through_time_equals_jacobian(batch_first):
    """One backward per projection, and all projections in one backward over a batch
    repeated once per projection (the probe's way), both equal the Jacobian's profile."""
    torch.manual_seed(0)
    rnn = nn.RNN(3, 5, batch_first=batch_first)
    h0 = torch.randn(1, 2, 5)
    x = torch.randn(2, 7, 3) if batch_first else torch.randn(7, 2, 3)
    bd, td = (0, 1) if batch_first else (1, 0)

    def last(xs: torch.Tensor) -> torch.Tensor:
        out = rnn(xs, torch.cat([h0] * (xs.shape[bd] // 2), dim=1))[0]
        return out[:, -1] if batch_first else out[-1]

    vs = [torch.randn(2, 5) for _ in range(4)]
    J = torch.autograd.functional.jacobian(last, x)  # (B, H, *x.shape)
    expected = torch.zeros(7)
    for v in vs:
        g = torch.einsum("bh,bh...->...", v, J)  # d(v·h_T)/dx, shaped like x
        expected += g.pow(2).sum(dim=bd).sum(dim=-1).sqrt()
    expected = (expected / len(vs)).flip(0)
    one_by_one = gradient_through_time(last, x, time_dim=td, projections=vs)
    batched = gradient_through_time(last, x, time_dim=td, projections=vs, batch_dim=bd)
    assert torch.allclose(one_by_one, expected, rtol=1e-5, atol=1e-7)
    assert torch.allclose(batched, expected, rtol=1e-5, atol=1e-7)
    assert not any(p.grad is not None for p in rnn.parameters())  # .grad never touched


def test_bptt_summary():
    p = [1.0 * 0.5**k for k in range(30)]
    s = bptt_summary(p)
    assert s["horizon"] == 10  # 0.5**10 < 1e-3 <= 0.5**9
    assert s["growth_per_step"] == pytest.approx(0.5)
    assert s["reaches_end"] == 0
    grow = bptt_summary([1.2**k for k in range(20)])
    assert grow["growth_per_step"] == pytest.approx(1.2) and grow["reaches_end"] == 1 and grow["horizon"] == 20


def test_lstmcell_gate_saturation_equals_manual(logdir):
    cell = nn.LSTMCell(3, 4)
    with torch.no_grad():
        cell.bias_ih[4:8] += 8.0  # forget gate pushed towards 1
    opt = torch.optim.SGD(cell.parameters(), lr=0.0)
    x = torch.randn(6, 3) * 3
    h, c = torch.randn(6, 4), torch.randn(6, 4)
    with gradprobe.watch(cell, opt, logdir=logdir, config=EVERY):
        hn, cn = cell(x, (h, c))
        opt.zero_grad()
        hn.sum().backward()
        opt.step()
    log = gradprobe.RunLog.load(logdir)
    gates = x @ cell.weight_ih.t() + cell.bias_ih + h @ cell.weight_hh.t() + cell.bias_hh
    i, f, g, o = gates.detach().chunk(4, dim=1)
    i, f, g, o = torch.sigmoid(i), torch.sigmoid(f), torch.tanh(g), torch.sigmoid(o)
    assert _sample(log, "gates", "lstmcell.l0.forget", "high_frac") == pytest.approx(float((f > 0.99).float().mean()))
    assert _sample(log, "gates", "lstmcell.l0.forget", "high_frac") > 0.5
    assert _sample(log, "gates", "lstmcell.l0.input", "low_frac") == pytest.approx(float((i < 0.01).float().mean()))
    assert _sample(log, "gates", "lstmcell.l0.cell", "sat_frac") == pytest.approx(float((g.abs() > 0.99).float().mean()))
    assert _sample(log, "gates", "lstmcell.l0.output", "mean") == pytest.approx(float(o.mean()), rel=1e-5)


def test_lstm_gates_recomputed_from_weights_equal_manual(logdir):
    lstm = nn.LSTM(3, 4, batch_first=True)
    opt = torch.optim.SGD(lstm.parameters(), lr=0.0)
    x = torch.randn(2, 5, 3) * 2
    with gradprobe.watch(lstm, opt, logdir=logdir, config=EVERY):
        out, _ = lstm(x)
        opt.zero_grad()
        out.sum().backward()
        opt.step()
    log = gradprobe.RunLog.load(logdir)
    cell = nn.LSTMCell(3, 4)
    with torch.no_grad():
        cell.weight_ih.copy_(lstm.weight_ih_l0)
        cell.weight_hh.copy_(lstm.weight_hh_l0)
        cell.bias_ih.copy_(lstm.bias_ih_l0)
        cell.bias_hh.copy_(lstm.bias_hh_l0)
    h = c = torch.zeros(2, 4)
    fs = []
    for t in range(5):
        g = x[:, t] @ cell.weight_ih.t() + cell.bias_ih + h @ cell.weight_hh.t() + cell.bias_hh
        fs.append(torch.sigmoid(g.chunk(4, 1)[1]))
        h, c = cell(x[:, t], (h, c))
    assert _sample(log, "gates", "lstm.l0.forget", "mean") == pytest.approx(float(torch.stack(fs).mean()), rel=1e-4)


def _reference_gates(module: nn.RNNBase, x: torch.Tensor, hx) -> dict[str, dict[str, torch.Tensor]]:
    """Gates of every layer's forward direction, cell by cell: each layer (both directions)
    is a one-layer copy of the module, run by torch itself, giving the next layer's input."""
    kind = type(module)
    cell_cls = {nn.LSTM: nn.LSTMCell, nn.GRU: nn.GRUCell, nn.RNN: nn.RNNCell}[kind]
    seq = x.transpose(0, 1) if module.batch_first else x
    dirs = 2 if module.bidirectional else 1
    h_all = hx[0] if isinstance(hx, tuple) else hx
    out: dict[str, dict[str, torch.Tensor]] = {}
    for layer in range(module.num_layers):
        extra = {} if kind is not nn.RNN else {"nonlinearity": module.nonlinearity}
        one = kind(seq.shape[-1], module.hidden_size, bidirectional=module.bidirectional, **extra)
        cell = cell_cls(seq.shape[-1], module.hidden_size, **extra)
        with torch.no_grad():
            for sfx in ("", "_reverse")[:dirs]:
                for w in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"):
                    getattr(one, f"{w}_l0{sfx}").copy_(getattr(module, f"{w}_l{layer}{sfx}"))
            for w in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"):
                getattr(cell, w).copy_(getattr(module, f"{w}_l{layer}"))
            h = h_all[layer * dirs] if h_all is not None else torch.zeros(seq.shape[1], module.hidden_size)
            c = hx[1][layer * dirs] if isinstance(hx, tuple) else torch.zeros_like(h)
            gates: dict[str, list[torch.Tensor]] = {}
            for t in range(seq.shape[0]):
                gi = seq[t] @ cell.weight_ih.t() + cell.bias_ih
                gh = h @ cell.weight_hh.t() + cell.bias_hh
                if kind is nn.LSTM:
                    i, f, g, o = (gi + gh).chunk(4, dim=1)
                    now = {"input": i.sigmoid(), "forget": f.sigmoid(), "cell": g.tanh(), "output": o.sigmoid()}
                    h, c = cell(seq[t], (h, c))
                elif kind is nn.GRU:
                    r = (gi.chunk(3, 1)[0] + gh.chunk(3, 1)[0]).sigmoid()
                    z = (gi.chunk(3, 1)[1] + gh.chunk(3, 1)[1]).sigmoid()
                    now = {"reset": r, "update": z, "new": (gi.chunk(3, 1)[2] + r * gh.chunk(3, 1)[2]).tanh()}
                    h = cell(seq[t], h)
                else:
                    h = cell(seq[t], h)
                    now = {"h": h}
                for k, v in now.items():
                    gates.setdefault(k, []).append(v)
            out[f"l{layer}"] = {k: torch.stack(v) for k, v in gates.items()}
            layer_hx = None
            if h_all is not None:
                hs = h_all[layer * dirs : (layer + 1) * dirs]
                layer_hx = (hs, hx[1][layer * dirs : (layer + 1) * dirs]) if isinstance(hx, tuple) else hs
            seq = one(seq, layer_hx)[0]
    return out


@pytest.mark.parametrize(
    "kind,bidirectional,batch_first,with_hx",
    [(nn.LSTM, False, True, False), (nn.LSTM, True, False, True), (nn.GRU, False, False, True),
     (nn.GRU, True, True, False), (nn.RNN, True, True, True)],
)
def test_fused_layer_gates_equal_a_cell_by_cell_reference(logdir, kind, bidirectional, batch_first, with_hx):
    """Every gate statistic of every layer of a 2-layer LSTM/GRU/RNN (uni- and
    bidirectional, either batch layout, with and without an initial state) against the gates
    computed cell by cell, each layer's input being the previous layer's real output."""
    torch.manual_seed(3)
    module = kind(3, 5, num_layers=2, bidirectional=bidirectional, batch_first=batch_first)
    with torch.no_grad():
        for p in module.parameters():
            p.mul_(3.0)  # gates spread over their whole range, some saturated
    dirs = 2 if bidirectional else 1
    x = torch.randn(4, 6, 3) if batch_first else torch.randn(6, 4, 3)
    hx = None
    if with_hx:
        h0 = torch.randn(2 * dirs, 4, 5)
        hx = (h0, torch.randn(2 * dirs, 4, 5)) if kind is nn.LSTM else h0
    opt = torch.optim.SGD(module.parameters(), lr=0.0)
    with gradprobe.watch(module, opt, logdir=logdir, config=EVERY):
        out = module(x, hx)[0]
        opt.zero_grad()
        out.sum().backward()
        opt.step()
    log = gradprobe.RunLog.load(logdir)
    ref = _reference_gates(module, x, hx)
    seen = 0
    for layer, gates in ref.items():
        for name, v in gates.items():
            target = f"{type(module).__name__.lower()}.{layer}.{name}"
            if name in ("cell", "new", "h"):
                expect = {"sat_frac": (v.abs() > 0.99).float().mean(), "absmean": v.abs().mean()}
            else:
                expect = {"low_frac": (v < 0.01).float().mean(), "high_frac": (v > 0.99).float().mean(), "mean": v.mean()}
            for stat, e in expect.items():
                assert _sample(log, "gates", target, stat) == pytest.approx(float(e), abs=1e-5), (target, stat)
                seen += 1
    assert seen == 2 * {nn.LSTM: 11, nn.GRU: 8, nn.RNN: 2}[kind]  # every stat of every layer


def test_update_ratio_activation_input_and_target_stats(logdir):
    model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 1))
    with torch.no_grad():
        model[0].bias[:3] = -50.0  # three units never active
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x = torch.randn(16, 4) * 5 + 2
    y = torch.randn(16, 1) * 3
    before = [p.detach().clone() for p in model.parameters()]
    with gradprobe.watch(model, opt, logdir=logdir, config=EVERY):
        opt.zero_grad()
        h = model[0](x)
        pred = model(x)
        loss = nn.functional.mse_loss(pred, y)
        loss.backward()
        opt.step()
    log = gradprobe.RunLog.load(logdir)
    for (name, p), b in zip(model.named_parameters(), before):
        expected = float((p.detach() - b).norm() / p.detach().norm())
        assert _sample(log, "update", name, "ratio") == pytest.approx(expected, rel=1e-5)
    assert _sample(log, "activation", "1", "dead_frac") == pytest.approx(0.5)
    assert _sample(log, "activation", "2", "input_dead_frac") == pytest.approx(0.5)
    assert _sample(log, "activation", "0", "std") == pytest.approx(float(h.detach().std(unbiased=False)), rel=1e-4)
    assert _sample(log, "activation", "0", "absmax") == pytest.approx(float(h.detach().abs().max()), rel=1e-5)
    assert _sample(log, "input", "sequential", "mean") == pytest.approx(float(x.mean()), rel=1e-5)
    assert _sample(log, "input", "sequential", "std") == pytest.approx(float(x.std(unbiased=False)), rel=1e-5)
    assert _sample(log, "input", "sequential", "absmax") == pytest.approx(float(x.abs().max()), rel=1e-5)
    assert _sample(log, "input", "sequential", "feature_std_max") == pytest.approx(float(x.std(0, unbiased=False).max()), rel=1e-5)
    assert _sample(log, "first_layer", "0", "mean") == pytest.approx(float(x.mean()), rel=1e-5)
    assert _sample(log, "target", "mse_loss", "var") == pytest.approx(float(y.var(unbiased=False)), rel=1e-5)
    assert _sample(log, "target", "mse_loss", "pred_mean") == pytest.approx(float(pred.mean()), rel=1e-5)
    assert _sample(log, "input", "sequential", "nonfinite") == 0


class _ChangedAfterAct(nn.Module):
    """Linear -> ReLU/ReLU6 -> (features 0..1 zeroed in place, or not) -> Linear."""

    def __init__(self, act: nn.Module, zero_after: bool) -> None:
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(4, 6), act, nn.Linear(6, 1)
        self.zero_after = zero_after

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.act(self.fc1(x))
        if self.zero_after:
            h[:, :2] = 0.0  # in place, after the activation's hook ran (ReLU6 saves its input)
        return self.fc2(h)


@pytest.mark.parametrize("act,zero_after", [(nn.ReLU(), False), (nn.ReLU(inplace=True), False), (nn.ReLU6(), False), (nn.ReLU6(), True)],
                         ids=["relu", "relu-inplace", "relu6", "relu6-then-changed-in-place"])
def test_input_dead_frac_after_a_relu_reuses_its_column_max_only_when_unchanged(logdir, act, zero_after):
    """The next layer's dead-input fraction reuses the activation's per-unit max (one pass
    less) only while that output is unmodified: an in-place change after it is seen."""
    torch.manual_seed(0)
    model = _ChangedAfterAct(act, zero_after)
    with torch.no_grad():
        model.fc1.bias[4:] = -50.0  # units 4, 5 never active
        model.fc1.bias[:4] = 50.0  # units 0..3 always active
    x = torch.randn(16, 4)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with gradprobe.watch(model, opt, logdir=logdir, config=EVERY):
        opt.zero_grad()
        model(x).pow(2).mean().backward()
        opt.step()
    log = gradprobe.RunLog.load(logdir)
    assert _sample(log, "activation", "act", "dead_frac") == pytest.approx(2 / 6)
    assert _sample(log, "activation", "fc2", "input_dead_frac") == pytest.approx((4 if zero_after else 2) / 6)


def _finite_reference(x: torch.Tensor, feature_dim: int) -> list[float]:
    """[numel, nonfinite, mean, std, absmax, feature_std_min, feature_std_max] in float64."""
    a = x.double().numpy()
    fin = np.isfinite(a)
    v = a[fin]
    z = np.where(fin, a, 0.0)
    feats = np.moveaxis(z, feature_dim, -1).reshape(-1, a.shape[feature_dim])
    fstd = feats.std(axis=0) if feats.shape[1] > 1 else np.array([v.std() if v.size else 0.0])  # one feature: the std
    return [a.size, (~fin).sum(), v.mean() if v.size else 0.0, v.std() if v.size else 0.0,
            np.abs(v).max() if v.size else 0.0, fstd.min(), fstd.max()]


@pytest.mark.parametrize("seed", range(8))
def test_input_stats_over_finite_entries_equal_float64_reference(seed):
    """The few-pass statistics (NaN/Inf zeroed, two-pass variance) against numpy in float64,
    on data with offsets, scales and NaN/+Inf/-Inf entries (seeds 6-7: +Inf only, where the
    sum is Inf, not NaN)."""
    from gradprobe.probe.deep import _float_stats, _nonfinite_count

    g = torch.Generator().manual_seed(seed)
    shape, fd = [((64, 12), -1), ((8, 3, 5, 5), 1), ((5, 1), -1)][seed % 3]
    x = torch.randn(*shape, generator=g) * 10.0 ** (seed - 2) + 3.0 * 10.0 ** (seed % 4)
    if seed % 2:
        idx = torch.randperm(x.numel(), generator=g)[: x.numel() // 4 + 1]
        bad = [float("inf")] if seed >= 6 else [float("nan"), float("inf"), -float("inf")]
        x.view(-1)[idx] = torch.tensor(bad).repeat(len(idx))[: len(idx)]
    got = _float_stats(x, fd).tolist()
    ref = _finite_reference(x, fd % x.dim())
    assert got[0] == ref[0] and got[1] == ref[1]
    assert got[1] == float(_nonfinite_count(x)) == float((~torch.isfinite(x)).sum())
    for k in (2, 3, 4, 5, 6):
        assert got[k] == pytest.approx(ref[k], rel=2e-3, abs=1e-6 * max(1.0, abs(ref[2]))), k


def test_activation_stats_and_dead_units_with_nonfinite_entries(logdir):
    """A NaN in a ReLU unit's column makes it poisoned, not dead; the activation moments are
    over the finite entries; the exact NaN/Inf counts of gradients and weights match."""
    model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 1))
    with torch.no_grad():
        model[0].bias[:3] = -50.0  # three units never active...
    x = torch.randn(16, 4)
    x[0, 0] = float("nan")  # ...but a NaN in row 0 reaches every unit: none is "dead"
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with gradprobe.watch(model, opt, logdir=logdir, config=EVERY):
        opt.zero_grad()
        h = model[0](x).detach()
        nn.functional.mse_loss(model(x), torch.zeros(16, 1)).backward()
        g = {n: float((~torch.isfinite(p.grad)).sum()) for n, p in model.named_parameters()}
        opt.step()
        w = {n: float((~torch.isfinite(p)).sum()) for n, p in model.named_parameters()}
    log = gradprobe.RunLog.load(logdir)
    assert _sample(log, "activation", "1", "dead_frac") == 0.0
    assert _sample(log, "activation", "0", "nonfinite") == float((~torch.isfinite(h)).sum()) == 6.0
    fin = h[1:]
    assert _sample(log, "activation", "0", "mean") == pytest.approx(float(fin.mean()), rel=1e-5)
    assert _sample(log, "activation", "0", "std") == pytest.approx(float(fin.std(unbiased=False)), rel=1e-4)
    assert _sample(log, "activation", "0", "absmax") == pytest.approx(float(fin.abs().max()), rel=1e-6)
    for name in g:
        assert _sample(log, "grad", name, "nonfinite_count") == g[name]
        assert _sample(log, "weight", name, "nonfinite_count") == w[name]
    assert g["0.weight"] > 0


class _Overflowing(nn.Module):
    """A Linear layer, a parameter whose gradient entries are 1e20 and one whose entries are
    1e20: finite, with 2-norms that overflow float32."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 1)
        self.w = nn.Parameter(torch.randn(6))
        self.big = nn.Parameter(torch.full((6,), 1e20))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x).mean() + (self.w * 1e20).sum() + (self.big * 1e-30).sum()


def test_nonfinite_counts_stay_exact_where_norms_overflow_or_clipping_spreads_nan(logdir):
    """The counts skip tensors whose 2-norm is finite (CPU). Finite entries whose squares
    overflow (norm inf) are still counted entry by entry, as 0; and a NaN gradient that
    ``clip_grad_norm_`` spreads to every gradient (total norm NaN) is counted as the step sees
    the gradients, not as their norms were before clipping."""
    torch.manual_seed(0)
    model = _Overflowing()
    assert float(torch.linalg.vector_norm(model.big.detach())) == math.inf
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    x = torch.randn(8, 4)
    grads, weights = [], []
    with gradprobe.watch(model, opt, logdir=logdir, config=EVERY):
        for poison in (False, True):
            opt.zero_grad()
            model(x).backward()
            if poison:
                model.fc.bias.grad[0] = float("nan")
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            else:
                assert float(torch.linalg.vector_norm(model.w.grad[1:])) == math.inf
                model.w.grad[0] = float("inf")  # one Inf among finite entries: the norm is Inf too
            grads.append({n: float((~torch.isfinite(p.grad)).sum()) for n, p in model.named_parameters()})
            opt.step()
            weights.append({n: float((~torch.isfinite(p)).sum()) for n, p in model.named_parameters()})
    log = gradprobe.RunLog.load(logdir)
    assert grads[0] == {"w": 1.0, "big": 0.0, "fc.weight": 0.0, "fc.bias": 0.0}
    assert weights[0] == {"w": 1.0, "big": 0.0, "fc.weight": 0.0, "fc.bias": 0.0}  # lr 0 times Inf: NaN
    for step in (0, 1):
        for name, p in model.named_parameters():
            assert _sample(log, "grad", name, "nonfinite_count", step=step) == grads[step][name]
            assert _sample(log, "weight", name, "nonfinite_count", step=step) == weights[step][name]
            if step == 1:  # the clipped NaN reaches every gradient, then every weight
                assert grads[1][name] == weights[1][name] == p.numel()


def test_token_ids_are_recorded_as_integers_not_features(logdir):
    model = nn.Sequential(nn.Embedding(50, 8), nn.Flatten(), nn.Linear(24, 2))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with gradprobe.watch(model, opt, logdir=logdir, config=EVERY):
        opt.zero_grad()
        nn.functional.cross_entropy(model(torch.randint(0, 50, (4, 3))), torch.tensor([0, 1, 0, 1])).backward()
        opt.step()
    log = gradprobe.RunLog.load(logdir)
    assert _sample(log, "input", "sequential", "integer") == 1.0
    assert log.samples_of("first_layer").empty  # an embedding lookup comes first: no feature layer input
    assert _sample(log, "target", "cross_entropy", "n_classes") == 2.0


def test_ignored_targets_are_no_class(logdir):
    # padding marked -100 (CrossEntropyLoss's default ignore_index) is not counted as class 0:
    # the batch's classes are 1 and 2 in equal numbers, entropy ln 2
    model = nn.Linear(4, 3)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with gradprobe.watch(model, opt, logdir=logdir, config=EVERY):
        opt.zero_grad()
        y = torch.tensor([1, 2, 1, 2, -100, -100, -100, -100])
        nn.functional.cross_entropy(model(torch.randn(8, 4)), y).backward()
        opt.step()
    log = gradprobe.RunLog.load(logdir)
    assert _sample(log, "target", "cross_entropy", "class_entropy") == pytest.approx(math.log(2), rel=1e-5)


def test_step0_collapse_with_xavier_gain_0001(logdir):
    sizes = (32,) + (64,) * 6 + (1,)
    model = mlp(sizes, act=nn.Tanh)
    for m in model:
        if isinstance(m, nn.Linear):
            nn.init.xavier_uniform_(m.weight, gain=0.001)
            nn.init.zeros_(m.bias)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    with gradprobe.watch(model, opt, logdir=logdir):
        for x, y in regression_batches(2, features=32):
            opt.zero_grad()
            nn.functional.mse_loss(model(x), y).backward()
            opt.step()
    log = gradprobe.RunLog.load(logdir)
    s = log.samples
    lin = s[(s.probe == "activation") & (s.stat == "std") & (s.step == 0) & s.target.isin([str(i) for i in range(0, 13, 2)])]
    stds = lin.sort_values("index")["value"].to_numpy()
    assert len(stds) == 7
    assert stds[-1] / stds[0] < 1e-12  # collapses by ~1e-3 per layer
    assert np.all(np.diff(np.log10(stds)) < -2)


def test_raw_inputs_of_scale_1e4_show_the_scale(logdir):
    model = mlp((5, 8, 1))
    opt = torch.optim.SGD(model.parameters(), lr=1e-9)
    with gradprobe.watch(model, opt, logdir=logdir):
        for x, y in regression_batches(1, features=5):
            opt.zero_grad()
            nn.functional.mse_loss(model(x * 1e4), y).backward()
            opt.step()
    log = gradprobe.RunLog.load(logdir)
    assert _sample(log, "first_layer", "0", "absmax") > 1e4
    assert _sample(log, "first_layer", "0", "std") > 1e3


def test_gru_horizon_far_shorter_than_lookback(logdir):
    model = SeqRegressor("gru", input_size=2, hidden=8)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    with gradprobe.watch(model, opt, logdir=logdir):
        x = torch.randn(4, 400, 2)
        out, _ = model(x)
        opt.zero_grad()
        nn.functional.mse_loss(out, torch.zeros_like(out)).backward()
        opt.step()
    log = gradprobe.RunLog.load(logdir)
    assert _sample(log, "bptt", "rnn", "lookback") == 400
    horizon = _sample(log, "bptt", "rnn", "horizon")
    assert horizon < 100
    assert _sample(log, "bptt", "rnn", "growth_per_step") < 1
    assert log.meta["recurrent"][0]["lookback"] == 400 and log.meta["recurrent"][0]["hidden_size"] == 8


def test_vanilla_rnn_built_to_explode_shows_growth_through_time(logdir):
    rnn = nn.RNN(2, 16, batch_first=True)
    with torch.no_grad():
        q, _ = torch.linalg.qr(torch.randn(16, 16))
        rnn.weight_hh_l0.copy_(1.3 * q)  # spectral radius 1.3
        rnn.bias_hh_l0.zero_()
        rnn.bias_ih_l0.zero_()
    opt = torch.optim.SGD(rnn.parameters(), lr=0.0)
    with gradprobe.watch(rnn, opt, logdir=logdir):
        out, _ = rnn(torch.randn(4, 20, 2) * 1e-4)  # tiny inputs: tanh stays linear
        opt.zero_grad()
        out[:, -1].sum().backward()
        opt.step()
    log = gradprobe.RunLog.load(logdir)
    assert _sample(log, "bptt", "rnn", "growth_per_step") == pytest.approx(1.3, rel=0.05)
    assert _sample(log, "bptt", "rnn", "far_over_near") > 20


def test_cell_loop_is_replayed(logdir):
    cell = nn.GRUCell(2, 6)
    opt = torch.optim.SGD(cell.parameters(), lr=0.0)
    with gradprobe.watch(cell, opt, logdir=logdir):
        h = torch.zeros(3, 6)
        for t in range(12):
            h = cell(torch.randn(3, 2), h)
        opt.zero_grad()
        h.sum().backward()
        opt.step()
    log = gradprobe.RunLog.load(logdir)
    prof = log.samples_of("bptt", "profile")
    assert len(prof) == 12 and (prof["value"] > 0).all()
    assert _sample(log, "bptt", "grucell", "lookback") == 12


def test_deep_probes_off_in_light_profile(logdir):
    model = mlp((4, 4, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with gradprobe.watch(model, opt, logdir=logdir, profile="light"):
        for x, y in regression_batches(3, features=4):
            opt.zero_grad()
            nn.functional.mse_loss(model(x), y).backward()
            opt.step()
    log = gradprobe.RunLog.load(logdir)
    assert log.samples.empty and log.n_steps == 3


def test_schedule_is_log_spaced_early_then_periodic():
    s = Schedule(every=50, early_until=200)
    steps = s.steps_until(400)
    assert steps[:6] == [0, 1, 2, 3, 4, 5] or steps[:4] == [0, 1, 2, 3]
    early = [x for x in steps if x < 200]
    assert 10 <= len(early) <= 30
    assert [x for x in steps if x >= 200] == [200, 250, 300, 350]
    assert math.isclose(len(s.steps_until(100_000)) / 100_000, 1 / 50, rel_tol=0.05)
