"""GP401-GP404 (non-finite values, inputs -> loss -> gradients -> parameters): firing and
healthy cases, on synthetic RunLogs and on real tiny CPU runs."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
import torch.nn as nn

import gradprobe
from gradprobe.engine import analyze_runlog
from tests.helpers import mlp, regression_batches

NAN = math.nan
NF_CODES = ("GP401", "GP402", "GP403", "GP404")


def analyze(steps: dict[str, Any], meta: dict[str, Any] | None = None, **kw: Any) -> gradprobe.Report:
    return analyze_runlog(gradprobe.RunLog.build(steps, meta=meta or {}, **kw))


def codes(report: gradprobe.Report) -> set[str]:
    return {f.code for f in report.findings}


def nf_findings(report: gradprobe.Report) -> list[str]:
    return [f.code for f in report.findings if f.code in NF_CODES]


def healthy_steps(n: int = 30) -> dict[str, list[Any]]:
    return {
        "step": list(range(n)),
        "loss": [1.0 / (1 + 0.1 * i) for i in range(n)],
        "grad_norm": [1.0] * n,
        "grad_nonfinite_layers": [0] * n,
        "param_nonfinite_layers": [0] * n,
        "weight_norm": [5.0] * n,
        "lr": [0.01] * n,
        "optimizer_steps": [1] * n,
    }


def diverged_from(steps: dict[str, list[Any]], s: int, *, loss: bool = True, grads: bool = True,
                  params: bool = True, layers: int = 3) -> dict[str, list[Any]]:
    """Marks every stage non-finite from step ``s`` on (an optimizer that stepped on NaN)."""
    out = {k: list(v) for k, v in steps.items()}
    n = len(out["step"])
    out.setdefault("loss_nonfinite", [False] * n)
    for i in range(s, n):
        if loss:
            out["loss"][i] = NAN
            out["loss_nonfinite"][i] = True
        if grads:
            out["grad_norm"][i] = NAN
            out["grad_nonfinite_layers"][i] = layers
        if params:
            out["param_nonfinite_layers"][i] = layers
            out["weight_norm"][i] = NAN
    return out


def input_samples(steps: list[int], bad: dict[int, float], probe: str = "input", target: str = "net",
                  numel: float = 256.0) -> list[tuple[int, str, str, str, int, float]]:
    rows = []
    for s in steps:
        rows.append((s, probe, target, "numel", 0, numel))
        rows.append((s, probe, target, "nonfinite", 0, bad.get(s, 0.0)))
    return rows


SAMPLED = [0, 1, 2, 3, 5, 7, 10, 15, 22]


# ---------------------------------------------------------------- GP404 nonfinite-inputs ----
def test_gp404_fires_on_a_sampled_nan_batch_and_roots_the_chain():
    steps = diverged_from(healthy_steps(), 7)
    r = analyze(steps, {}, samples=input_samples(SAMPLED, {7: 1.0}))
    f = r.finding("nonfinite-inputs")
    assert f is not None and f.severity == "error" and f.first_step == 7
    assert f.evidence["places"][0]["max_nonfinite"] == 1.0
    # root cause first; every symptom names its cause
    order = [x.code for x in r.findings if x.code in NF_CODES]
    assert order == ["GP404", "GP401", "GP402", "GP403"]
    assert "nonfinite-inputs" in r.finding("GP401").caused_by
    assert "nonfinite-loss" in r.finding("GP402").caused_by
    assert "nonfinite-gradients" in r.finding("GP403").caused_by
    assert "nonfinite-gradients" not in r.finding("GP401").caused_by  # same step: the loss came first


def test_gp404_bounds_the_first_step_with_the_per_step_loss():
    # samples only on 3 and 7; the loss went NaN at step 5 (not sampled) with finite parameters
    steps = diverged_from(healthy_steps(), 5, params=False)
    r = analyze(steps, {}, samples=input_samples([3, 7], {7: 4.0}))
    f = r.finding("GP404")
    assert f.first_step == 5
    assert f.evidence["first_observed_step"] == 7 and f.evidence["last_clean_sample_step"] == 3
    assert "entered there" in f.message


def test_gp404_targets_count_and_late_model_dependent_samples_do_not():
    steps = healthy_steps()
    steps = diverged_from(steps, 10)
    # a NaN target before the parameters went bad: the data
    r = analyze(steps, {}, samples=input_samples(SAMPLED, {10: 2.0}, probe="target", target="mse_loss"))
    assert r.finding("GP404").layer == "mse_loss"
    # a NaN first-layer input only after the parameters went NaN (a norm layer before it
    # could have made it): not evidence about the data
    r2 = analyze(steps, {}, samples=input_samples(SAMPLED, {15: 2.0, 22: 2.0}, probe="first_layer", target="fc1"))
    assert "GP404" not in codes(r2)


def test_gp404_per_step_data_count_names_the_exact_step():
    steps = diverged_from(healthy_steps(), 12, params=False)
    steps["data_nonfinite"] = [0] * 12 + [3] + [0] * 17  # one bad batch, no sample on it
    for i in range(13, 30):  # the loop skipped it: later steps finite again
        steps["loss"][i], steps["loss_nonfinite"][i] = 0.5, False
        steps["grad_norm"][i], steps["grad_nonfinite_layers"][i] = 1.0, 0
    r = analyze(steps, {}, samples=input_samples(SAMPLED, {}))
    f = r.finding("GP404")
    assert f.first_step == 12 and f.evidence["bad_steps"] == 1 and "on 1 step(s), first at step 12" in f.message
    assert "nonfinite-inputs" in r.finding("GP401").caused_by


def test_gp404_per_step_count_after_the_parameters_went_nan_is_not_data():
    steps = diverged_from(healthy_steps(), 8)  # parameters NaN after step 8
    steps["data_nonfinite"] = [0] * 20 + [5] * 10  # a chained model's input, made from NaN weights
    assert "GP404" not in codes(analyze(steps))
    steps["data_nonfinite"] = [-1] * 30  # not measured
    assert "GP404" not in codes(analyze(steps))


def test_gp404_quiet_on_clean_samples():
    r = analyze(healthy_steps(), {}, samples=input_samples(SAMPLED, {}))
    assert "GP404" not in codes(r)


# ---------------------------------------------------------------- GP401 nonfinite-loss ------
def test_gp401_fires_and_reports_what_preceded_it():
    steps = healthy_steps()
    for i, g in zip(range(15, 20), (3.0, 9.0, 27.0, 81.0, 243.0)):
        steps["grad_norm"][i] = g
        steps["loss"][i] = g
    steps = diverged_from(steps, 20, grads=False, params=False)
    f = analyze(steps).finding("nonfinite-loss")
    assert f.first_step == 20 and f.severity == "error"
    assert f.evidence["last_finite_grad_norm"] == 243.0
    assert "gradient norm had risen" in f.message
    assert f.evidence["recovered"] is False


def test_gp401_caused_by_parameters_from_an_earlier_step():
    steps = healthy_steps()
    steps = diverged_from(steps, 8, loss=False, grads=False)          # Adam eps=0: params first
    steps = diverged_from(steps, 9, params=False)                     # then the loss and gradients
    r = analyze(steps)
    loss = r.finding("GP401")
    assert loss.first_step == 9 and "nonfinite-parameters" in loss.caused_by
    assert "nonfinite-parameters" in r.finding("GP402").caused_by
    assert r.findings[0].code == "GP403"


def test_gp401_isolated_recovered_nan_is_a_warning():
    steps = healthy_steps(200)
    steps["loss"][50] = NAN
    steps["loss_nonfinite"] = [i == 50 for i in range(200)]
    f = analyze(steps).finding("GP401")
    assert f.severity == "warning" and f.evidence["recovered"] is True
    assert f.confidence < analyze(diverged_from(healthy_steps(), 5)).finding("GP401").confidence


def test_gp401_quiet_on_finite_losses():
    assert "GP401" not in codes(analyze(healthy_steps()))


# ---------------------------------------------------------------- GP402 nonfinite-gradients -
def test_gp402_names_the_layer_where_backward_meets_the_nan():
    # loss finite, backward singularity in fc2: fc2 and everything before it are NaN
    steps = healthy_steps(10)
    steps["grad_nonfinite_layers"][4] = 4
    steps["grad_norm"][4] = NAN
    lg = {
        "fc1.weight": [1.0] * 10, "fc1.bias": [1.0] * 10, "fc2.weight": [1.0] * 10, "fc2.bias": [1.0] * 10,
        "fc3.weight": [1.0] * 10, "fc3.bias": [1.0] * 10,
    }
    for k in ("fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias"):
        lg[k][4] = NAN
    f = analyze(steps, layer_grad=lg).finding("nonfinite-gradients")
    assert f.first_step == 4
    assert f.layer == "fc2.bias"
    assert f.evidence["loss_finite_at_first_step"] is True
    assert f.evidence["applied_by_optimizer"] is True and f.severity == "error"


def test_gp402_does_not_count_scaler_skipped_steps():
    steps = healthy_steps(40)
    steps["scale_before"] = [65536.0 / 2 ** min(i, 3) for i in range(40)]
    steps["scale"] = [65536.0 / 2 ** min(i + 1, 3) for i in range(40)]
    steps["skipped"] = [i < 3 for i in range(40)]
    for i in range(3):
        steps["grad_nonfinite_layers"][i] = 3
        steps["grad_norm"][i] = math.inf
        steps["optimizer_steps"][i] = 0
        steps["param_nonfinite_layers"][i] = -1
    r = analyze(steps)
    assert not set(nf_findings(r))
    # one that the scaler did not skip counts
    steps["grad_nonfinite_layers"][20] = 1
    steps["grad_norm"][20] = math.inf
    f = analyze(steps).finding("GP402")
    assert f.first_step == 20 and f.evidence["skipped_by_scaler_not_counted"] == 3


def test_gp402_guarded_steps_without_update_are_a_warning():
    steps = healthy_steps(100)
    for i in (30, 31):
        steps["grad_nonfinite_layers"][i] = 2
        steps["grad_norm"][i] = NAN
        steps["optimizer_steps"][i] = 0
        steps["param_nonfinite_layers"][i] = -1
    f = analyze(steps).finding("GP402")
    assert f.severity == "warning" and f.evidence["applied_by_optimizer"] is False


def test_gp402_quiet_on_finite_gradients():
    assert "GP402" not in codes(analyze(healthy_steps()))


# ---------------------------------------------------------------- GP403 nonfinite-parameters
def test_gp403_adam_eps_zero_with_finite_gradients():
    steps = diverged_from(healthy_steps(), 0, loss=False, grads=False, layers=1)
    meta = {"optimizers": [{"index": 0, "class": "Adam", "param_groups": [{"lr": 1e-3, "eps": 0.0}]}]}
    lw = {"emb.weight": [NAN] * 30, "head.weight": [1.0] * 30}
    r = analyze(steps, meta, layer_weight=lw, layer_grad={"emb.weight": [0.1] * 30, "head.weight": [0.5] * 30})
    f = r.finding("nonfinite-parameters")
    assert f.first_step == 0 and f.layer == "emb.weight"
    assert f.evidence["eps"] == 0.0 and f.evidence["gradients_nonfinite_at_step"] is False
    assert "eps=0" in f.message and "eps=1e-8" in f.recommendations[0].snippet
    assert f.caused_by == [] and nf_findings(r) == ["GP403"]
    assert f.confidence == pytest.approx(1.0)


def test_gp403_confidence_follows_persistence():
    steps = healthy_steps(40)
    steps["param_nonfinite_layers"][10] = 1  # non-finite once, then reloaded from a checkpoint
    once = analyze(steps).finding("GP403")
    stuck = analyze(diverged_from(healthy_steps(40), 10, loss=False, grads=False)).finding("GP403")
    assert once.confidence < stuck.confidence


def test_gp403_quiet_when_not_measured_or_finite():
    steps = healthy_steps()
    steps["param_nonfinite_layers"] = [-1] * 15 + [0] * 15
    assert "GP403" not in codes(analyze(steps))


# ---------------------------------------------------------------- real CPU runs -------------
def _mlp_run(logdir: str, *, nan_at: int | None = None, target_nan_at: int | None = None, n: int = 16,
             guard: bool = False) -> gradprobe.Report:
    model = mlp((8, 32, 32, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    with gradprobe.watch(model, opt, logdir=logdir):
        for i, (x, y) in enumerate(regression_batches(n)):
            if i == nan_at:
                x = x.clone()
                x[3, 2] = float("nan")
            if i == target_nan_at:
                y = y.clone()
                y[5, 0] = float("inf")
            opt.zero_grad()
            loss = nn.functional.mse_loss(model(x), y)
            if guard and not torch.isfinite(loss):
                continue
            loss.backward()
            opt.step()
    return gradprobe.analyze(logdir)


def test_real_nan_batch_chain(logdir):
    r = _mlp_run(logdir, nan_at=5)  # step 5 is on the sampling schedule
    order = nf_findings(r)
    assert order == ["GP404", "GP401", "GP402", "GP403"]
    assert all(r.finding(c).first_step == 5 for c in order)
    assert r.finding("GP404").evidence["places"][0]["max_nonfinite"] == 1.0
    assert r.finding("GP401").caused_by == ["nonfinite-inputs"]
    assert r.finding("GP401").evidence["first_nonfinite_module"] == "0"
    assert "nonfinite-loss" in r.finding("GP402").caused_by
    assert r.finding("GP402").evidence["nonfinite_entries"]["0.weight"] == 256
    assert "nonfinite-gradients" in r.finding("GP403").caused_by


def test_real_inf_target(logdir):
    r = _mlp_run(logdir, target_nan_at=7)
    f = r.finding("GP404")
    assert f.first_step == 7 and f.layer == "mse_loss"
    assert r.finding("GP401").caused_by == ["nonfinite-inputs"]


def test_real_nan_batch_on_unsampled_step_is_counted_at_its_step(logdir):
    r = _mlp_run(logdir, nan_at=4)  # not sampled: the per-step data count still sees it
    f = r.finding("GP404")
    assert f.first_step == 4 and f.evidence["bad_steps"] == 1 and f.evidence["bad_samples"] == 0
    assert f.evidence["places"][0]["probe"] == "data" and f.evidence["places"][0]["max_nonfinite"] == 1.0
    assert nf_findings(r)[0] == "GP404"
    assert r.finding("GP401").caused_by == ["nonfinite-inputs"]
    steps = gradprobe.RunLog.load(logdir).steps
    assert steps["data_nonfinite"].tolist() == [0, 0, 0, 0, 1] + [0] * 11


def test_real_guarded_nan_batches_between_samples(logdir):
    # one bad batch at 13 (not sampled), the loop skips it: the run recovers, the data is named
    r = _mlp_run(logdir, nan_at=13, n=40, guard=True)
    f = r.finding("GP404")
    assert f.first_step == 13 and nf_findings(r)[0] == "GP404"
    assert r.finding("GP401").severity == "warning" and r.finding("GP401").caused_by == ["nonfinite-inputs"]


class _SqrtFeatures(nn.Module):
    """A backbone whose features turn NaN when its pre-activations go negative (sqrt)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sqrt(self.fc(x))


@pytest.mark.parametrize("nan_in", ["backbone", "data"])
def test_real_a_second_model_fed_by_the_first_is_not_fed_data(logdir, nan_in):
    """A backbone and a head called one after the other, each a watched model: the head's input
    is the backbone's output (it has a grad_fn), so NaN features are not 'NaN data'; a NaN in
    the batch itself still is."""
    torch.manual_seed(0)
    backbone, head = _SqrtFeatures(), nn.Linear(16, 1)
    if nan_in == "data":
        backbone.forward = lambda x: torch.relu(backbone.fc(x))  # features stay finite
    opt = torch.optim.SGD([*backbone.parameters(), *head.parameters()], lr=0.01)
    with gradprobe.watch([backbone, head], opt, logdir=logdir):
        for i, (x, y) in enumerate(regression_batches(8)):
            if nan_in == "data" and i == 5:
                x = x.clone()
                x[0, 0] = float("nan")
            opt.zero_grad()
            nn.functional.mse_loss(head(backbone(x)), y).backward()
            opt.step()
    r = gradprobe.analyze(logdir)
    if nan_in == "backbone":
        assert "GP404" not in codes(r) and "GP401" in codes(r)
    else:
        assert nf_findings(r)[0] == "GP404" and r.finding("GP404").first_step == 5


def test_real_data_count_does_not_change_training(tmp_path):
    def train(watch: bool) -> torch.Tensor:
        torch.manual_seed(0)
        model = mlp((8, 32, 1))
        opt = torch.optim.SGD(model.parameters(), lr=0.01)
        ctx = gradprobe.watch(model, opt, logdir=str(tmp_path / "w")) if watch else None
        for x, y in regression_batches(8):
            opt.zero_grad()
            nn.functional.mse_loss(model(x), y).backward()
            opt.step()
        if ctx is not None:
            ctx.close()
        return torch.cat([p.detach().flatten() for p in model.parameters()])

    assert torch.equal(train(False), train(True))


def test_real_guarded_nan_batch_is_a_warning(logdir):
    r = _mlp_run(logdir, nan_at=5, n=40, guard=True)
    f = r.finding("GP401")
    assert f.severity == "warning" and f.evidence["recovered"] is True
    assert "GP403" not in codes(r) and "GP402" not in codes(r)
    assert r.finding("GP404").first_step == 5


def test_real_adam_eps_zero_on_embedding_with_unused_rows(logdir):
    class Bag(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.emb = nn.Embedding(50, 8)
            self.head = nn.Linear(8, 1)

        def forward(self, t: torch.Tensor) -> torch.Tensor:
            return self.head(self.emb(t).mean(1))

    model = Bag()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3, eps=0.0)
    g = torch.Generator().manual_seed(0)
    with gradprobe.watch(model, opt, logdir=logdir):
        for _ in range(10):
            tokens = torch.randint(0, 20, (16, 5), generator=g)  # ids 20-49 are never used
            y = torch.randn(16, 1, generator=g)
            opt.zero_grad()
            nn.functional.mse_loss(model(tokens), y).backward()
            opt.step()
    r = gradprobe.analyze(logdir)
    assert nf_findings(r) == ["GP403"]
    f = r.finding("GP403")
    assert f.first_step == 0 and f.layer == "emb.weight" and f.severity == "error"
    assert f.evidence["eps"] == 0.0 and "0/0" in f.message


def test_real_healthy_mlp_and_cnn_have_no_nonfinite_findings(tmp_path):
    r = _mlp_run(str(tmp_path / "mlp"), n=30)
    assert nf_findings(r) == []
    cnn = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 8 * 8, 3))
    opt = torch.optim.Adam(cnn.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(1)
    with gradprobe.watch(cnn, opt, logdir=str(tmp_path / "cnn")):
        for _ in range(20):
            x = torch.randn(8, 1, 8, 8, generator=g)
            y = torch.randint(0, 3, (8,), generator=g)
            opt.zero_grad()
            nn.functional.cross_entropy(cnn(x), y).backward()
            opt.step()
    r2 = gradprobe.analyze(str(tmp_path / "cnn"))
    assert nf_findings(r2) == []
    assert not [f for f in r2.findings if f.code.startswith("GP3")]


def test_every_nonfinite_rule_documents_itself():
    from gradprobe.rules.base import get_rule

    for code in NF_CODES:
        cls = get_rule(code)
        assert cls is not None and cls.__doc__ and "onfidence" in cls.__doc__
        for attr in ("what", "why", "causes", "fix", "example"):
            assert getattr(cls.explanation, attr).strip()
