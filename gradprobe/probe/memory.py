"""The step's memory, and the memory limit (``gradprobe run --memory-limit``).

Memory is CUDA allocated bytes when the watched parameters are on a GPU (read every step: no
system call), else the process RSS. This is the only memory-limit path of gradprobe: on a
CPU the kernel's OOM killer sends SIGKILL, which nothing can report, so past the limit the
probe raises ``MemoryError`` into the script at a step boundary instead, and the run ends
with a report. The probe of every process of a tree enforces it for its own process
(``gradprobe run`` hands the limit to each child's probe through its configuration).
"""

from __future__ import annotations

import math
import os
import time
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from gradprobe.probe.context import Context

#: seconds between two readings of the process RSS (CPU runs; see MemoryMonitor.read)
RSS_EVERY = 0.05
#: seconds between two checks of the limit at module forwards, for a run whose step never
#: closes (no optimizer and no backward: one giant step); a fresh reading each time
BETWEEN_STEPS_EVERY = 0.25


class MemoryMonitor:
    """Reads the process's memory and holds it to ``limit`` bytes (None: no limit)."""

    def __init__(self, ctx: "Context", limit: int | None) -> None:
        self.ctx = ctx
        self.limit = int(limit) if limit is not None else None
        self.last = 0  # the last reading (bytes)
        self.hit = False  # the limit was exceeded (its event is written once)
        self._rss_read_at = -math.inf  # perf_counter of the last RSS reading
        self._checked_at = -math.inf  # perf_counter of the last check between steps
        self._boundary_at = time.perf_counter()  # perf_counter of the last step boundary
        # /proc/self/statm read with one pread (psutil reopens it at every reading)
        self._statm: int | None = None
        self._page = 4096
        try:
            self._statm = os.open("/proc/self/statm", os.O_RDONLY)
            self._page = os.sysconf("SC_PAGE_SIZE")
        except (OSError, ValueError, AttributeError):
            self._statm = None
        self._proc: Any = None
        try:
            import psutil

            self._proc = psutil.Process()
        except Exception:  # noqa: BLE001
            self._proc = None

    @property
    def kind(self) -> str:
        return "cuda_allocated" if self.ctx.device.type == "cuda" else "rss"

    def read(self, fresh: bool = False) -> int:
        """The step's memory: CUDA allocated bytes, or the process RSS read at most every
        ``RSS_EVERY`` seconds (unless ``fresh``); a step closing sooner repeats the last
        reading. The read is one system call, but the first one after a training step pays
        for the caches the step evicted: 21-29 us in the MLP loop of
        ``benchmarks/overhead.py`` (2.5 us when repeated at once; ~0.25% of that ~9 ms step).
        Rules read memory as a trend over many steps, for which a reading per 50 ms is
        plenty."""
        if self.ctx.device.type == "cuda":
            try:
                self.last = int(torch.cuda.memory_allocated(self.ctx.device))
            except Exception:  # noqa: BLE001
                self.last = 0
            return self.last
        now = time.perf_counter()
        if not fresh and now - self._rss_read_at < RSS_EVERY:
            return self.last
        self._rss_read_at = now
        self.last = self._rss()
        return self.last

    def _rss(self) -> int:
        if self._statm is not None:
            try:
                return int(os.pread(self._statm, 128, 0).split()[1]) * self._page
            except (OSError, IndexError, ValueError):
                self._statm = None
        if self._proc is not None:
            try:
                return int(self._proc.memory_info().rss)
            except Exception:  # noqa: BLE001
                return 0
        return 0

    def gate(self) -> None:
        """Raises ``MemoryError`` when the last reading is over the limit. Called at step
        boundaries (after a backward, an optimizer step, a scaler update), outside every
        guard, so the error reaches the user's call. While memory stays over the limit every
        boundary raises again: a script that catches the error and goes on is stopped at its
        next step, not by the OOM killer."""
        if self.limit is None or not self.ctx.live():
            return
        self._boundary_at = time.perf_counter()
        self._check(self.last)

    def gate_between_steps(self) -> None:
        """At a module's forward, once no step boundary came for ``BETWEEN_STEPS_EVERY``
        seconds, at most that often, on a fresh reading: a run whose step never closes (or
        takes long) is held to the limit too."""
        if self.limit is None or not self.ctx.live():
            return
        now = time.perf_counter()
        if now - self._boundary_at < BETWEEN_STEPS_EVERY or now - self._checked_at < BETWEEN_STEPS_EVERY:
            return
        self._checked_at = now
        self._check(self.read(fresh=True))

    def _check(self, used: int) -> None:
        limit = self.limit
        if limit is None or used <= limit:
            return
        step = self.ctx.open.index
        if not self.hit:
            self.hit = True
            ctx = self.ctx
            ctx.guard.call("memory", ctx.writer.put_event,
                           {"kind": "memory_limit", "step": step, "memory": used, "limit": limit, "wall_time": time.time()})
            ctx.guard.call("memory", ctx.flush, True)
        raise MemoryError(
            f"gradprobe: process memory {used / 2**20:.0f} MiB exceeded --memory-limit "
            f"{limit / 2**20:.0f} MiB at step {step} (stopped before the kernel's OOM killer)"
        )

    def close(self) -> None:
        if self._statm is not None:
            try:
                os.close(self._statm)
            except OSError:
                pass
            self._statm = None
