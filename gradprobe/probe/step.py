"""What one step accumulates while it is open.

Observations arrive in *segments*: everything since the last ``optimizer.step()`` is the
current segment. When an optimizer steps, the current segment is sealed into the step.
If an optimizer steps a second time within one open step (a loop that steps one optimizer
several times per iteration, e.g. WGAN critics), the step closes with its sealed segments,
and the current segment, which already holds the next iteration's forward and backward,
opens the next step. Other closes take everything.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass(slots=True)
class Segment:
    """Observations since the last optimizer step (all tensors stay on the device)."""

    roots: list[torch.Tensor] = field(default_factory=list)  # backward roots outside optimizer.step
    inner_roots: list[torch.Tensor] = field(default_factory=list)  # roots inside step (LBFGS closures)
    loss_fn: list[torch.Tensor] = field(default_factory=list)
    eval_loss: list[tuple[int, torch.Tensor]] = field(default_factory=list)  # (no-grad loss stream, value)
    n_backward: int = 0
    backward_time: float = 0.0
    retain_graph: bool = False
    # (layer indices, total norm, max_norm, ordinal) per clip call; max_norm None: the tensor
    # is the coefficient; the ordinal names the clip in the gradients' comparison (gradients.py)
    clip_pieces: list[tuple[tuple[int, ...], torch.Tensor, float | None, int]] = field(default_factory=list)
    clip_max_norm: float | None = None
    clip_max_norm_tensor: torch.Tensor | None = None
    clip_total_norm: torch.Tensor | None = None
    clip_calls: int = 0
    clip_on_scaled: bool = False
    state_age: int = 0
    state_age_module: str | None = None
    scale_before: torch.Tensor | None = None
    scaled_by: Any = None  # the GradScaler whose scale() produced a root in this segment
    scale_tampered: bool = False
    # one 0-d check per data tensor (model inputs, loss targets): non-finite iff it holds NaN/Inf (count_data)
    data_checks: list[torch.Tensor] = field(default_factory=list)

    def empty(self) -> bool:
        return self.n_backward == 0 and not self.loss_fn and not self.eval_loss

    def merge(self, later: "Segment") -> None:
        """Appends ``later`` (observed after this one) into this segment."""
        self.roots += later.roots
        self.inner_roots += later.inner_roots
        self.loss_fn += later.loss_fn
        self.eval_loss += later.eval_loss
        self.n_backward += later.n_backward
        self.backward_time += later.backward_time
        self.retain_graph |= later.retain_graph
        self.clip_pieces += later.clip_pieces
        if later.clip_calls:
            self.clip_max_norm = later.clip_max_norm
            self.clip_max_norm_tensor = later.clip_max_norm_tensor
            self.clip_total_norm = later.clip_total_norm
        self.clip_calls += later.clip_calls
        self.clip_on_scaled |= later.clip_on_scaled
        if later.state_age > self.state_age:
            self.state_age, self.state_age_module = later.state_age, later.state_age_module
        if later.scale_before is not None:
            self.scale_before = later.scale_before
        if later.scaled_by is not None:
            self.scaled_by = later.scaled_by
        self.scale_tampered |= later.scale_tampered
        self.data_checks += later.data_checks

    def count_data(self, t: torch.Tensor) -> None:
        """Keeps one 0-d reduction of ``t`` (on its device, no sync); the record counts those
        that are non-finite, on the host, when it is read.

        The reduction is the 2-norm: non-finite when any entry is NaN/Inf, and otherwise only
        when the squares of finite entries overflow (entries beyond ~1.8e19 / sqrt(numel) in
        float32 or bfloat16: no real data reaches that scale; uninitialised memory does).
        PyTorch's CPU kernel computes a whole-tensor 2-norm on the calling thread, where a
        sum is an OpenMP parallel region whose thread wake-up costs more than the arithmetic:
        in the MLP loop of ``benchmarks/overhead.py`` (a 256x512 batch), steps interleaved
        with no check, a sum and a norm (``benchmarks/data_check.py``), the sum added
        109-230 us per ~10 ms step and the norm 11-133 us, in five runs.
        float16 data gets the float32-accumulated sum instead: its norm would come back in
        float16 and overflow at 65504.
        """
        t = t.detach()
        self.data_checks.append(t.sum(dtype=torch.float32) if t.dtype == torch.float16 else torch.linalg.vector_norm(t))


#: the ``sealed`` segment of a step before anything was sealed (never written: ``seal`` replaces it)
NOTHING_SEALED = Segment()


@dataclass(slots=True)
class OpenStep:
    """The step being recorded: sealed segments plus the current one."""

    index: int
    sampled: bool
    # until the first seal, ``sealed`` is a shared empty segment that is only ever read
    sealed: Segment = field(default_factory=lambda: NOTHING_SEALED)
    current: Segment = field(default_factory=Segment)
    stepped: list[Any] = field(default_factory=list)  # optimizers that stepped (identity)
    weight_pieces: list[tuple[tuple[int, ...], list[torch.Tensor]]] = field(default_factory=list)
    # the gradient as the last backward left it, per committed group of layers (gradients.py)
    grad_pieces: list[tuple[tuple[int, ...], list[torch.Tensor]]] = field(default_factory=list)
    # per optimizer index (-1: layers no optimizer compared): (layer indices, observed clips
    # per layer, B measured, compared) and, where B was measured, (layer indices, its norms)
    effect: dict[int, tuple[tuple[int, ...], tuple[tuple[int, ...], ...], bool, bool]] = field(default_factory=dict)
    post: dict[int, tuple[tuple[int, ...], list[torch.Tensor]]] = field(default_factory=dict)
    # per optimizer index, where B was not measured: (a layer, its norm at the comparison point)
    check: dict[int, tuple[int, torch.Tensor]] = field(default_factory=dict)
    optimizer_steps: int = 0
    found_inf: torch.Tensor | None = None
    scale_after: torch.Tensor | None = None
    scaler_updated: bool = False
    samples: list[tuple[str, str, str, int, Any]] = field(default_factory=list)

    _sealed_fresh: bool = True

    def seal(self) -> None:
        if self._sealed_fresh:  # nothing sealed yet: take the segment as is (no copying)
            self.sealed = self.current
            self._sealed_fresh = False
        else:
            self.sealed.merge(self.current)
        self.current = Segment()

    def has_stepped(self, opt: Any) -> bool:
        return any(o is opt for o in self.stepped)

    def training_active(self) -> bool:
        """A backward, a training loss or an optimizer step happened in this step."""
        return any(seg.n_backward or seg.loss_fn for seg in (self.sealed, self.current)) or self.optimizer_steps > 0

    def active(self) -> bool:
        return (not (self.sealed.empty() and self.current.empty()) or self.optimizer_steps > 0 or self.scaler_updated
                or bool(self.grad_pieces))
