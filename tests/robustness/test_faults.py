"""Never break training: a fault inside any probe part is reported once as a
``GradprobeWarning``, that part switches itself off, and the user's run finishes with
bit-identical parameters (and RNG stream) to an unwatched run.

Faults are injected through ``probe.guard.inject[part]`` (the part raises at its next
entry), at the first entry and in the middle of the run, for every part the recorder has;
``test_every_part_is_exercised`` keeps the list in step with the source. A failure inside the
writer thread itself (not through the guard) is checked too.
"""

from __future__ import annotations

import functools
import re
import time
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn as nn

import gradprobe
from gradprobe._guard import GradprobeWarning
from tests.helpers import identical

PROBE_SOURCES = Path(gradprobe.__file__).parent / "probe"

#: part -> where the training loop below reaches it
PARTS = {
    "backward": "loss.backward() (the patched autograd entry point)",
    "clip": "clip_grad_norm_",
    "scaler": "GradScaler.scale / unscale_ / step / update",
    "optimizer": "optimizer.step() hooks",
    "forward": "module forward hooks",
    "loss": "F.mse_loss",
    "close": "closing each step",
    "writer": "the flusher thread handing records to the writer",
    "log": "probe.log(val_loss=...)",
    "exception": "probe.record_exception (gradprobe run records the script's exception)",
    "deep": "the deep probes' close",
    "deep.input": "model input statistics (sampled steps)",
    "deep.activation": "activation statistics",
    "deep.gates": "LSTM gate saturation",
    "deep.bptt": "the gradient-through-time side computation",
    "deep.target": "loss target statistics",
    "deep.update": "update-to-weight ratios around optimizer.step()",
    "deep.grad": "exact non-finite gradient counts",
    "deep.weight": "non-finite weight counts after the step",
}
#: parts this suite cannot inject, and why
NOT_INJECTED = {
    "memory": "reached only when --memory-limit fires, which stops the run by design",
    "local_grad": "DistributedDataParallel only; reports through guard.fail directly",
}


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lstm = nn.LSTM(3, 8, batch_first=True)
        self.head = nn.Linear(8, 8)
        self.act = nn.Tanh()
        self.relu = nn.ReLU()
        self.out = nn.Linear(8, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, _ = self.lstm(x)
        return self.out(self.relu(self.act(self.head(h[:, -1]))))


def train(logdir: str | None = None, part: str | None = None, inject_at: int = 0) -> tuple[list[torch.Tensor], object]:
    """Six steps of an LSTM regressor with GradScaler, clipping, dropout-free deep probes on
    every step; returns the parameters (plus a draw of the RNG stream) and the probe."""
    torch.manual_seed(11)
    model = Net()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)
    g = torch.Generator().manual_seed(5)
    probe = None
    if logdir is not None:
        probe = gradprobe.watch(model, opt, scaler=scaler, logdir=logdir, profile="full", flush_seconds=0.2)
    for step in range(6):
        if probe is not None and part is not None and step == inject_at:
            probe.guard.inject[part] = RuntimeError(f"injected fault in {part}")
        x, y = torch.randn(8, 5, 3, generator=g), torch.randn(8, 1, generator=g)
        loss = nn.functional.mse_loss(model(x), y)
        opt.zero_grad()
        scaler.scale(loss).backward()
        scaler.unscale_(opt)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        scaler.step(opt)
        scaler.update()
        if probe is not None:
            probe.log(val_loss=loss.detach())
            deadline = time.time() + 3.0
            while part == "writer" and part in probe.guard.inject and time.time() < deadline:
                time.sleep(0.01)  # the flusher thread picks up records pending > flush_seconds
    with torch.no_grad():
        nn.functional.mse_loss(model(torch.randn(4, 5, 3, generator=g)), torch.zeros(4, 1))  # a validation loss
    if probe is not None:
        probe.record_exception(ValueError("the script's own error"), where="script")
        probe.close()
    return [p.detach().clone() for p in model.parameters()] + [torch.randn(3)], probe


@functools.lru_cache(maxsize=1)
def unwatched() -> tuple[torch.Tensor, ...]:
    return tuple(train()[0])


def _gradprobe_warnings(record: list[warnings.WarningMessage]) -> list[str]:
    return [str(w.message) for w in record if issubclass(w.category, GradprobeWarning)]


@pytest.mark.parametrize("inject_at", [0, 3], ids=["first-entry", "mid-run"])
@pytest.mark.parametrize("part", sorted(PARTS))
def test_injected_fault_is_reported_once_and_changes_nothing(tmp_path, part, inject_at):
    with pytest.warns(GradprobeWarning) as record:
        params, probe = train(str(tmp_path / "run"), part, inject_at)
    messages = _gradprobe_warnings(record)
    assert len(messages) == 1, messages
    assert f"the {part!r} probe failed" in messages[0] and "injected fault" in messages[0]
    assert part not in probe.guard.inject, "the injected fault was never reached"
    assert list(probe.guard.disabled) == [part]
    assert identical(params, list(unwatched())), "watching with a failed part changed the run"
    log = gradprobe.RunLog.load(str(tmp_path / "run"))
    if part == "close":  # closing steps is recording them: the steps before the fault remain
        assert log.n_steps == inject_at
    elif part != "writer":  # (with the writer off, what reaches the disk is undefined)
        assert log.n_steps == 6
    if part != "writer":
        assert part in log.meta["probe_failures"]
        assert any(e.get("kind") == "probe_failure" and e.get("part") == part for e in log.events)


def test_every_part_is_exercised():
    """Every part name in the recorder's source is injected above or excused."""
    found: set[str] = set()
    for path in PROBE_SOURCES.glob("*.py"):
        text = path.read_text()
        found |= set(re.findall(r'guarded\("([\w.]+)"\)', text))
        found |= set(re.findall(r'guard\.(?:call|fail)\("([\w.]*\w)",', text))
        found |= {"deep." + p for p in re.findall(r'self\._guard\("([\w.]+)"', text)}
    assert found, "no probe part found: the source layout changed"
    missing = found - set(PARTS) - set(NOT_INJECTED)
    assert not missing, f"probe parts without a fault-injection test: {sorted(missing)}"


def test_a_failing_writer_thread_is_reported_once(tmp_path, monkeypatch):
    """A real error inside the writer thread (disk full, say), not through the guard."""
    from gradprobe.runlog.writer import RunWriter

    def broken(self, *args):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(RunWriter, "_on_steps", broken)
    with pytest.warns(GradprobeWarning) as record:
        params, probe = train(str(tmp_path / "run"))
    messages = _gradprobe_warnings(record)
    assert len(messages) == 1 and "No space left on device" in messages[0], messages
    assert list(probe.guard.disabled) == ["writer"]
    assert identical(params, list(unwatched()))


def test_the_users_own_errors_pass_through_unchanged(tmp_path):
    """gradprobe never wraps the user's calls: their exceptions arrive as without it."""
    model = nn.Linear(3, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with gradprobe.watch(model, opt, logdir=str(tmp_path / "run")):
        loss = model(torch.randn(4, 3)).sum()
        loss.backward()
        with pytest.raises(RuntimeError, match="second time"):
            loss.backward()
        with pytest.raises(RuntimeError, match="shapes cannot be multiplied"):
            model(torch.randn(4, 5))
        with pytest.raises(TypeError):
            opt.step(closure=3)
