"""The TensorBoard dashboard a run writes: charts only for the signals the run has, charts that
stay readable through a 1e30 spike and NaN (their log10 copies), and the findings text written
where a report is made. Real tiny training runs; the browser check is in tests/browser/."""

from __future__ import annotations

import glob
import math
import os
from pathlib import Path

import numpy as np
import pytest
import torch

import gradprobe
from gradprobe.runlog.tensorboard import CHARTS, FINDINGS_TAG, LOG10_PREFIX, START_CHARTS, write_findings

#: the loss factor at the blow-up step: gradients near 1e17, a finite norm (its square still fits
#: in float32), weights pushed to ~1e16 and the losses after it to Inf and NaN
SPIKE = 1e18

SAMPLE_DIR = Path(__file__).resolve().parents[1] / "sample_runs"
SAMPLES = sorted(p.name for p in SAMPLE_DIR.iterdir() if p.is_dir())


def _acc(logdir: str):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(logdir, size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    return acc


def _values(acc, tag: str) -> list[float]:
    if tag in acc.Tags()["scalars"]:
        return [e.value for e in acc.Scalars(tag)]
    from tensorboard.util import tensor_util

    return [float(tensor_util.make_ndarray(e.tensor_proto)) for e in acc.Tensors(tag)]


def _layouts(acc) -> list[list[str]]:
    from tensorboard.plugins.custom_scalar import layout_pb2

    out = []
    for e in acc.Tensors("custom_scalars__config__"):
        layout = layout_pb2.Layout()
        layout.ParseFromString(e.tensor_proto.string_val[0])
        out.append([c.title for cat in layout.category for c in cat.chart])
    return out


def _train(logdir: str, *, blow_up_at: int | None = None, steps: int = 30, clip: bool = True):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    g = torch.Generator().manual_seed(0)
    w = torch.randn(8, 1, generator=g)
    with gradprobe.watch(model, opt, logdir=logdir) as probe:
        for i in range(steps):
            x = torch.randn(16, 8, generator=g)
            opt.zero_grad()
            loss = torch.nn.functional.mse_loss(model(x), x @ w)
            if i == blow_up_at:
                loss = loss * SPIKE  # a finite gradient spike; the step it feeds sends the weights to NaN
            loss.backward()
            if clip:
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
    return probe


def test_charts_only_for_the_signals_the_run_has(tmp_path):
    logdir = str(tmp_path / "run")
    _train(logdir)
    acc = _acc(logdir)
    tags = set(acc.Tags()["scalars"]) | set(acc.Tags()["tensors"])
    # no GradScaler, no carried state, nothing non-finite: none of their series
    for absent in ("gradprobe/amp/scale", "gradprobe/amp/skipped", "gradprobe/state/age_steps", "gradprobe/state/graphs_alive",
                   "gradprobe/nonfinite/grad_layers", "gradprobe/nonfinite/param_layers"):
        assert absent not in tags, absent
    layouts = _layouts(acc)
    assert layouts[0] == [c for c in CHARTS if c in START_CHARTS]  # written when the run starts
    final = layouts[-1]  # written at close: TensorBoard shows the latest
    assert "Gradient norm vs max_norm (log10)" in final and "Per-layer gradient norms (log10)" in final
    for absent in ("GradScaler scale (log10) and skipped steps", "State age (steps a carried graph reaches back)",
                   "Non-finite layers", "User scalars", "Loss"):
        assert absent not in final, absent


def test_charts_stay_readable_through_a_huge_spike_and_nan(tmp_path):
    """The raw series keep the spike and the NaN (the Scalars dashboard and gradprobe's
    reader read them); the dashboard's charts plot log10, where 1e30 is 30 and NaN is
    left out, and the non-finite chart appears."""
    logdir = str(tmp_path / "run")
    _train(logdir, blow_up_at=12, clip=False)
    acc = _acc(logdir)
    raw = _values(acc, "gradprobe/grad_norm/preclip")
    assert max(v for v in raw if math.isfinite(v)) > 1e15 and any(not math.isfinite(v) for v in raw)
    for tag in ("grad_norm/preclip", "loss/train"):
        view = _values(acc, LOG10_PREFIX + tag)
        assert view and all(math.isfinite(v) for v in view), tag
        assert max(view) - min(view) < 40, tag  # 1e17 is 17 decades, not a flattening factor
    spike = _values(acc, LOG10_PREFIX + "grad_norm/preclip")
    assert max(spike) > 15
    layer = [t for t in acc.Tags()["scalars"] + acc.Tags()["tensors"] if t.startswith(LOG10_PREFIX + "layer_grad_norm/")]
    assert layer and all(all(math.isfinite(v) for v in _values(acc, t)) for t in layer)
    assert "Non-finite layers" in _layouts(acc)[-1]
    assert max(_values(acc, "gradprobe/nonfinite/grad_layers")) > 0


def test_gradprobe_reads_its_own_tensorboard_output_by_the_raw_tags(tmp_path):
    logdir = str(tmp_path / "run")
    _train(logdir, steps=12)
    events = [p for p in glob.glob(os.path.join(logdir, "events.out.tfevents.*")) if not p.endswith(".findings")]
    report = gradprobe.analyze(events[0])
    cols = report.runlog.meta["names"]["columns"]
    assert cols["loss"] == "gradprobe/loss/train" and cols["grad_norm"] == "gradprobe/grad_norm/preclip"
    own = gradprobe.RunLog.load(logdir).steps["loss"].to_numpy(dtype=np.float64)
    read = report.runlog.steps["loss"].to_numpy(dtype=np.float64)
    assert np.allclose(read, own, rtol=1e-6)


def test_write_findings_adds_the_report_as_text(tmp_path):
    logdir = str(tmp_path / "run")
    probe = _train(logdir, steps=8)
    report = gradprobe.analyze(logdir)
    before = set(glob.glob(os.path.join(logdir, "*.findings")))
    write_findings(logdir, report)
    new = set(glob.glob(os.path.join(logdir, "*.findings"))) - before
    assert len(new) == 1
    acc = _acc(logdir)
    texts = [e.tensor_proto.string_val[0].decode() for e in acc.Tensors(FINDINGS_TAG)]
    assert texts and texts[-1] == report.to_markdown() and texts[-1].startswith("# gradprobe report")
    assert acc.Tensors(FINDINGS_TAG)[-1].step == report.source["steps"]
    assert probe is not None
    write_findings(str(tmp_path / "no" / "such" / "\0dir"), report)  # never raises


@pytest.mark.parametrize("sample", SAMPLES)
def test_every_sample_run_has_its_findings_text(sample):
    run = SAMPLE_DIR / sample
    acc = _acc(str(run))
    assert FINDINGS_TAG in acc.Tags()["tensors"], f"{sample}: no findings text (regenerate it: see its golden file)"
    text = acc.Tensors(FINDINGS_TAG)[-1].tensor_proto.string_val[0].decode()
    assert text.startswith("# gradprobe report")
