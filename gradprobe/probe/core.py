"""The recorder: ``gradprobe.watch(...)`` returns a :class:`Probe`.

The probe watches models, optimizers and GradScalers through PyTorch's public hooks
(per-module or global forward hooks, per-optimizer or global step hooks) and the few
patches of :mod:`gradprobe.probe.patches`, and records one row per step (docs/run-log.md).

A probe is composed of units, each with one job:

* :mod:`~gradprobe.probe.discovery`: the models, optimizers and scalers watched, and the
  table of watched parameters;
* :mod:`~gradprobe.probe.boundary`: where a step begins and ends, and its record;
* :mod:`~gradprobe.probe.gradients`: the gradient as the last backward left it and as the
  optimizer steps with it (clipping seen by its effect);
* :mod:`~gradprobe.probe.forward` and :mod:`~gradprobe.probe.state_age`: what the forward
  shows (data, autocast, losses, how far back a carried graph reaches);
* :mod:`~gradprobe.probe.memory`: memory per step and the memory limit;
* :mod:`~gradprobe.probe.deep`: the sampled deep probes, behind :class:`DeepHost`;
* :mod:`~gradprobe.probe.ranks`: which rank of a distributed run this is.

This module is the probe's life: it builds and wires the units, buffers closed steps and
hands them to the writer in batches (off the training thread), and closes everything. It
records; reports are made downstream (:meth:`Probe.report`, ``gradprobe run``, the
integrations' callbacks), from what it wrote.

Nothing here reads a device value: measurements are device tensors buffered by
:mod:`gradprobe.probe.buffer` and copied to the host in batches off the training thread.
"""

from __future__ import annotations

import atexit
import datetime as _dt
import os
import platform
import sys
import threading
import time
import weakref
from typing import Any

import torch
import torch.nn as nn

from gradprobe._guard import Guard
from gradprobe._version import __version__
from gradprobe.config import ProbeConfig
from gradprobe.probe import patches
from gradprobe.probe.boundary import StepBoundary
from gradprobe.probe.buffer import PendingBatch, StepRecord
from gradprobe.probe.context import Context
from gradprobe.probe.discovery import Discovery, LayerInfo, ModuleInfo, OptInfo, as_list
from gradprobe.probe.forward import ForwardHooks
from gradprobe.probe.gradients import Gradients
from gradprobe.probe.memory import MemoryMonitor
from gradprobe.probe.ranks import rank_and_world
from gradprobe.probe.state_age import StateAges
from gradprobe.runlog import schema as S
from gradprobe.runlog.writer import RunWriter

__all__ = ["Probe", "DeepHost", "ModuleInfo", "OptInfo", "LayerInfo", "watch", "live_probes", "default_logdir"]


class DeepHost:
    """The part of a probe the sampled deep probes (:class:`~gradprobe.probe.deep.DeepProbes`)
    use, and all of it: the guard and configuration, the open step's index and its samples,
    which modules are models, the watched parameters, and two metadata entries."""

    def __init__(self, ctx: Context, discovery: Discovery, forward: ForwardHooks) -> None:
        self._ctx = ctx
        self._disc = discovery
        self._forward = forward
        self.guard = ctx.guard
        self.config = ctx.config

    def step_index(self) -> int:
        return self._ctx.open.index

    def add_sample(self, row: tuple[str, Any, Any, int, Any]) -> None:
        """A ``(probe, target, stat, index, value)`` row of the open step."""
        self._ctx.open.samples.append(row)

    def is_root(self, module: nn.Module) -> bool:
        return self._disc.is_root(module)

    def layers(self, scope: list[int]) -> list[LayerInfo]:
        layers = self._disc.layers
        return [layers[i] for i in scope]

    def set_lookback(self, module: str, steps: int) -> None:
        """The BPTT window of a recurrent module, as its forward showed it."""
        for rec in self._ctx.meta.get("recurrent", []):
            if rec.get("module") == module and rec.get("lookback") != steps:
                rec["lookback"] = steps
                self._ctx.meta_dirty = True

    def note_loss_function(self, name: str) -> None:
        self._forward.note_loss_function(name)


class Probe:
    """Records gradient health of a training run into a run directory.

    Use :func:`gradprobe.watch` to create one. A probe is a context manager; ``close()``
    removes every hook it installed and restores everything it patched.
    """

    def __init__(
        self,
        models: Any,
        optimizers: Any = None,
        *,
        scalers: Any = None,
        logdir: str | os.PathLike[str] | None = None,
        config: ProbeConfig | None = None,
        auto: bool = False,
        run_info: dict[str, Any] | None = None,
        layout: Any = None,
    ) -> None:
        self.config = config or ProbeConfig()
        self.guard = Guard()
        self.guard.on_failure = self._on_part_failure
        self.auto = auto
        self._pid = os.getpid()
        rank, world = rank_and_world()
        self.rank, self.world_size = rank, world
        self.logdir = os.fspath(logdir) if logdir is not None else default_logdir()
        # a process-tree layout (gradprobe run) names the run directory at the first recorded
        # step, from the rank then known (see gradprobe.tree); a process that records no step
        # writes nothing
        self._layout = layout
        self._unnamed = layout is not None
        if world > 1 and layout is None:  # one complete run directory per rank, no clobbering, no collectives
            self.logdir = os.path.join(self.logdir, f"rank{rank}")
        self.meta = _run_meta(self.config, auto, rank, world)
        if run_info:
            self.meta.update(run_info)
        ctx = self.ctx = Context(self.config, self.guard, auto, self.meta)
        ctx.flush = self._flush
        self._records: list[StepRecord] = []
        self._flush_lock = threading.Lock()  # guards _records between the training thread and the flusher
        self._stop = threading.Event()
        self._last_flush = time.perf_counter()
        self._handles: list[Any] = []  # global hooks
        self._after_close: list[Any] = []  # called once closed (the findings logged to MLflow)
        #: the doomed-run stop (``stop_on``): live checks on the writer thread, a gate at every
        #: step boundary (:mod:`gradprobe.live`); None when the run is never stopped
        self.stopper: Any = None
        #: steps the script means to run, when it says (``watch(total_steps=)``, the callbacks):
        #: the stop reports how many were left
        self.total_steps: int | None = None
        self._flush_steps = self.config.flush_steps
        if self.config.stop_on != "never":
            from gradprobe.live import STOP_FLUSH_STEPS, Stopper

            self.stopper = Stopper(self, self.config.stop_on)
            self._flush_steps = min(self._flush_steps, STOP_FLUSH_STEPS)

        def make_writer(logdir: str, meta: dict[str, Any]) -> RunWriter:
            return RunWriter(
                logdir,
                meta,
                tensorboard=self.config.tensorboard,
                tb_layers_every=self.config.tb_layers_every,
                on_error=lambda exc: self.guard.fail("writer", exc),
                live=self.stopper.checks if self.stopper is not None else None,
            )

        self.writer: Any = make_writer(self.logdir, self.meta) if layout is None else layout.writer(make_writer)
        ctx.writer = self.writer

        opts = as_list(optimizers)
        models_list = as_list(models)
        # global optimizer hooks when optimizers are discovered (gradprobe run, optimizer=None)
        self.discovery = Discovery(ctx, global_optimizer_hooks=auto or not opts)
        self.memory = MemoryMonitor(ctx, self.config.memory_limit)
        self.ages = StateAges(ctx)
        self.grads = Gradients(ctx, self.discovery)
        self.forward = ForwardHooks(ctx, self.discovery, self.ages, self.memory)
        self.boundary = StepBoundary(ctx, self.discovery, self.grads, self.ages, self.memory, self.forward)
        self.forward.boundary = self.boundary
        self.boundary.emit = self._take_record
        self.boundary.stopper = self.stopper
        disc = self.discovery
        disc.module_hooks = (self.forward.on_pre, self.forward.on_post)
        disc.optimizer_hooks = (self.boundary.on_opt_pre, self.boundary.on_opt_post)
        disc.on_ddp_model = self.grads.watch_local
        disc.on_layout = self.grads.reset
        disc.on_new_hooks = self.forward.mark_new_modules

        disc.prefix_all = len(models_list) > 1
        for m in models_list:
            disc.add_root(m)
        for o in opts:
            disc.add_optimizer(o)
        if not opts and not auto and disc.roots:
            disc.adopt_existing_optimizers()
        for sc in as_list(scalers):
            disc.add_scaler(sc)
        if self.config.deep:
            from gradprobe.probe.deep import DeepProbes

            ctx.deep = DeepProbes(DeepHost(ctx, disc, self.forward))
            self.forward.sync_light_hooks()

        patches.activate(self)
        _LIVE.add(self)
        # hands closed steps to the writer even when the script hangs between steps, so a kill
        # loses at most ~flush_seconds of records
        self._flusher = threading.Thread(target=self._flush_loop, name="gradprobe-flusher", daemon=True)
        self._flusher.start()
        if auto:
            from torch.nn.modules.module import register_module_forward_hook, register_module_forward_pre_hook

            self._handles.append(register_module_forward_pre_hook(self.forward.on_pre))
            self._handles.append(register_module_forward_hook(self.forward.on_post, with_kwargs=True, always_call=True))
        if disc.global_optimizer_hooks:
            from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook

            self._handles.append(register_optimizer_step_pre_hook(self.boundary.on_opt_pre))
            self._handles.append(register_optimizer_step_post_hook(self.boundary.on_opt_post))
        self._write_meta()

    # ------------------------------------------------------------------ state views -----
    @property
    def _closed(self) -> bool:
        return self.ctx.closed

    @property
    def _forked(self) -> bool:
        return self.ctx.forked

    @property
    def deep(self) -> Any:
        """The sampled deep probes (None: the light profile, or closed)."""
        return self.ctx.deep

    @property
    def _sentinels(self) -> Any:
        return self.ages.sentinels

    def _on_optimizer_created(self, opt: Any) -> None:
        """An optimizer created while this probe is live (the process tree's children
        attach their probe at their first optimizer)."""
        self.boundary.on_optimizer_created(opt)

    # ------------------------------------------------------------------- records ------
    def _take_record(self, rec: StepRecord) -> None:
        """A closed step's record, buffered until the next hand-over to the writer."""
        if self._unnamed:
            self._name_run_dir()
        with self._flush_lock:
            self._records.append(rec)
        if time.perf_counter() - self._last_flush >= self.config.flush_seconds or len(self._records) >= self._flush_steps:
            self._flush()

    def _name_run_dir(self) -> None:
        """The first recorded step of a process-tree probe: its run directory is named from
        the rank known now (the process group usually exists by the first step, not at the
        start) and created."""
        self._unnamed = False
        rank, world = rank_and_world()
        self.rank, self.world_size = rank, world
        self.meta["rank"], self.meta["world_size"] = rank, world
        try:
            self.logdir = self.writer.open(rank, world, {k: v for k, v in self.meta.items() if not k.startswith("_")})
        except Exception as exc:  # noqa: BLE001 - no run directory: the run goes on unrecorded
            self.guard.fail("writer", exc)

    def _records_or_steps(self) -> bool:
        return self.ctx.open.index > 0

    def _attach_trailing_eval(self) -> None:
        st = self.ctx.open
        evals = st.sealed.eval_loss + st.current.eval_loss
        pending = self.boundary.pending_scalars
        with self._flush_lock:
            if self._records:
                rec = self._records[-1]
                for k, v in evals:
                    rec.add("eval_loss", v, k)
                for name, value in pending:
                    if isinstance(value, torch.Tensor):
                        rec.add("scalar", value, name)
                    else:
                        rec.host_scalar((name, float(value)))
                self.boundary.pending_scalars = []
                return
        if evals:  # the last step is already on disk: keep each stream's value as a scalar of that step
            by_stream: dict[int, list[float]] = {}
            for k, v in evals:
                by_stream.setdefault(k, []).append(float(v.float().mean().cpu()))
            self.writer.put_scalars([(st.index - 1, S.eval_stream_name(k), sum(vals) / len(vals))
                                     for k, vals in by_stream.items()])

    def _flush(self, force: bool = False) -> None:
        # non-blocking: a signal handler (or the flusher) arriving while a flush or a step
        # close holds the lock skips, rather than handing the same records over twice
        if not self._flush_lock.acquire(blocking=False):
            return
        try:
            if self.ctx.meta_dirty:
                self._write_meta()
            if not self._records:
                return
            records, self._records = self._records, []
            self._last_flush = time.perf_counter()
            if "writer" in self.guard.disabled:
                return
            disc = self.discovery
            self.writer.put_batch(PendingBatch(records, len(disc.layers), max(disc.segment_id, 0), self.ctx.device,
                                               disc.tolerances))
        finally:
            self._flush_lock.release()

    def _flush_loop(self) -> None:
        interval = max(0.05, self.config.flush_seconds)
        ctx = self.ctx
        while not self._stop.wait(interval):
            if ctx.closed or ctx.forked:
                return
            if self._records and time.perf_counter() - self._last_flush >= interval:
                self.guard.call("writer", self._flush)

    def _write_meta(self) -> None:
        self.ctx.meta_dirty = False
        self.meta["probe_failures"] = dict(self.guard.disabled)
        self.writer.put_meta({k: v for k, v in self.meta.items() if not k.startswith("_")})

    def _on_part_failure(self, part: str, exc: BaseException) -> None:
        self.meta["probe_failures"] = dict(self.guard.disabled)
        self.ctx.meta_dirty = True
        if part != "writer":
            self.writer.put_event({"kind": "probe_failure", "part": part, "error": f"{type(exc).__name__}: {exc}"[:500]})

    # ------------------------------------------------------------------- public API -----
    def log(self, step: int | None = None, **scalars: Any) -> None:
        """Records extra scalars (e.g. ``val_loss``) against the current step.

        Tensors are kept on their device and copied back with the next batch. Values
        logged between steps (after the last step of an epoch) belong to the last closed
        step.
        """
        if not self.ctx.live():
            return
        self.guard.call("log", self._log, step, scalars)

    def _log(self, step: int | None, scalars: dict[str, Any]) -> None:
        st = self.ctx.open
        target = step
        if target is None:
            target = st.index if st.training_active() or st.index == 0 else st.index - 1
        for name, value in scalars.items():
            if isinstance(value, torch.Tensor):
                value = value.detach().reshape(-1)[:1].float()
            else:
                value = float(value)
            if target == st.index:
                self.boundary.pending_scalars.append((str(name), value))
            else:
                self._late_scalar(target, str(name), value)

    def _late_scalar(self, step: int, name: str, value: Any) -> None:
        # A value for an already-closed step: attach it to that step's record if still
        # buffered, else write it directly.
        with self._flush_lock:
            for rec in reversed(self._records):
                if rec.host.get("step") == step:
                    if isinstance(value, torch.Tensor):
                        rec.add("scalar", value, name)
                    else:
                        rec.host_scalar((name, float(value)))
                    return
        if isinstance(value, torch.Tensor):
            value = float(value.cpu())  # rare path: the step already went to disk
        self.writer.put_scalars([(step, name, float(value))])

    def record_exception(self, exc: BaseException, where: str = "script") -> None:
        """Records an exception the run ended with (once per exception object) and flushes."""
        if not self.ctx.live():
            return
        self.guard.call("exception", self.boundary.record_exception, exc, where)

    @property
    def step(self) -> int:
        """Index of the step being recorded (= number of steps closed so far)."""
        return self.ctx.open.index

    def flush(self, timeout: float = 30.0) -> None:
        """Hands over everything recorded so far and waits until it is on disk."""
        if not self.ctx.live():
            return
        self._flush(force=True)
        self.writer.sync(timeout)

    def close(self) -> None:
        """Closes the open step, writes everything, removes every hook and patch."""
        ctx = self.ctx
        if ctx.closed:
            return
        if ctx.forked:
            ctx.closed = True
            return
        boundary = self.boundary
        try:
            st = ctx.open
            if st.training_active() or (st.active() and not self._records_or_steps()):
                self.guard.call("close", boundary.close_step, boundary.consumed and boundary.stepping is None)
            elif st.active():
                # only evaluation happened after the last step (a final validation pass): it
                # belongs to that step, not to a step of its own
                self.guard.call("close", self._attach_trailing_eval)
            self.guard.call("close", self._flush, True)
            if ctx.deep is not None:
                self.guard.call("deep", ctx.deep.close)
        finally:
            ctx.closed = True
            self._stop.set()
            for h in self._handles:
                try:
                    h.remove()
                except Exception:  # noqa: BLE001
                    pass
            self._handles = []
            self.forward.close()
            self.discovery.close()
            self.grads.close()
            boundary.close()
            patches.deactivate(self)
            _LIVE.discard(self)
            self.meta["closed"] = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
            self.meta["steps"] = ctx.open.index
            self.meta["probe_failures"] = dict(self.guard.disabled)
            if self.stopper is not None:
                try:
                    self.writer.sync()  # the last batch fed to the checks (close waits for it anyway)
                except Exception:  # noqa: BLE001
                    pass
                self.meta["live_checks"] = self.stopper.stats()
            try:
                self.writer.put_meta({k: v for k, v in self.meta.items() if not k.startswith("_")})
                self.writer.close()
            except Exception:  # noqa: BLE001
                pass
            self.memory.close()
            self.ages.sentinels.clear()
            ctx.deep = None
        for hook in self._after_close:
            self.guard.call("after close", hook)

    def runlog(self) -> Any:
        """The run recorded so far as a :class:`gradprobe.RunLog`."""
        from gradprobe.runlog.runlog import RunLog

        self.flush()
        return RunLog.load(self.logdir)

    def report(self) -> Any:
        """Analyzes the run recorded so far: a :class:`gradprobe.Report`, whose findings are
        also added to the run's TensorBoard output
        (:func:`gradprobe.runlog.tensorboard.write_findings`)."""
        from gradprobe.engine import analyze_runlog
        from gradprobe.runlog.tensorboard import write_findings

        report = analyze_runlog(self.runlog())
        write_findings(self.logdir, report)
        return report

    def __enter__(self) -> "Probe":
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        # a stop is not an error of the run: it is recorded as the ``stopped`` event
        own_stop = self.stopper is not None and getattr(exc, "decision", None) is self.stopper.decision is not None
        if exc is not None and self.ctx.live() and not own_stop:
            self.guard.call("close", self.boundary.record_exception, exc, "training loop")
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self.ctx.closed else f"step {self.ctx.open.index}"
        return f"<gradprobe.Probe {self.logdir!r} {state}>"


def _run_meta(config: ProbeConfig, auto: bool, rank: int, world: int) -> dict[str, Any]:
    """The run's metadata as the probe starts (``gradprobe.json``; see docs/run-log.md)."""
    return {
        "schema": S.RUN_SCHEMA,
        "gradprobe_version": __version__,
        "torch_version": torch.__version__,
        "python": platform.python_version(),
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "pid": os.getpid(),
        "argv": list(sys.argv),
        "mode": "run" if auto else "watch",
        "rank": rank,
        "world_size": world,
        "device": "cpu",
        "memory_kind": "rss",
        "config": {
            "schedule_every": config.schedule.every,
            "schedule_early_until": config.schedule.early_until,
            "deep": config.deep,
            "flush_seconds": config.flush_seconds,
            "stop_on": config.stop_on,
        },
        "models": [],
        "recurrent": [],
        "optimizers": [],
        "scalers": [],
        "layer_segments": [],
        "loss_functions": [],
        "autocast": {},
        "probe_failures": {},
    }


def default_logdir() -> str:
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    base = os.path.join(os.getcwd(), "gradprobe_runs")
    path = os.path.join(base, f"{stamp}-{os.getpid()}")
    k = 1
    while os.path.exists(path):
        k += 1
        path = os.path.join(base, f"{stamp}-{os.getpid()}-{k}")
    return path


_LIVE: "weakref.WeakSet[Probe]" = weakref.WeakSet()


def live_probes() -> list[Probe]:
    return list(_LIVE)


def _after_fork_in_child() -> None:
    # Forked children (DataLoader workers) must not write logs or touch the parent's threads.
    for p in list(_LIVE):
        p.ctx.forked = True
    patches._active.clear()


def _close_at_exit() -> None:
    for p in list(_LIVE):
        if p._pid == os.getpid():
            try:
                p.close()
            except Exception:  # noqa: BLE001
                pass


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)
atexit.register(_close_at_exit)


def watch(
    model: Any,
    optimizer: Any = None,
    *,
    scaler: Any = None,
    logdir: str | os.PathLike[str] | None = None,
    profile: str = "default",
    sample_every: int | None = None,
    config: ProbeConfig | None = None,
    stop_on: str | None = None,
    total_steps: int | None = None,
    **options: Any,
) -> Probe:
    """Starts recording a training run.

    Args:
        model: an ``nn.Module`` or an iterable of them (GAN-style loops).
        optimizer: an optimizer or an iterable of them; None adopts any optimizer that
            steps the model's parameters.
        scaler: a ``torch.amp.GradScaler`` (or several); None adopts the first enabled
            scaler that scales a loss.
        logdir: run directory; default a new folder under ``./gradprobe_runs/``.
        profile: ``"default"``, ``"light"`` (no deep probes) or ``"full"`` (sample every step).
        sample_every: steady-state interval of the sampled deep probes.
        config: a full :class:`ProbeConfig` (overrides ``profile`` and options).
        stop_on: ``"error"`` or ``"warning"``: at the first step boundary after a final
            finding (one further training cannot undo) of at least that severity, the log is
            flushed and the step raises :class:`gradprobe.RunStopped` (a ``SystemExit``, exit
            status 3 if uncaught) carrying the report; ``"never"`` (default) never stops.
        total_steps: how many steps the run is meant to take: the stop says how many were
            left (else read from a ``OneCycleLR``, Lightning or Hugging Face ``Trainer``).
        **options: other :class:`ProbeConfig` fields (e.g. ``tensorboard=False``), and
            ``mlflow``: ``True`` logs the report to the MLflow run active now when the
            probe closes, or a run id (:mod:`gradprobe.integrations.mlflow`).

    Returns:
        A :class:`Probe` (a context manager).
    """
    mlflow = options.pop("mlflow", None)
    if stop_on is not None:
        from dataclasses import replace

        from gradprobe.live import check_stop_on

        stop_on = check_stop_on(stop_on)  # a bad value fails here, before anything is watched
        if config is not None:
            config = replace(config, stop_on=stop_on)
        else:
            options["stop_on"] = stop_on
    if config is None:
        if sample_every is not None:
            from gradprobe.schedule import Schedule

            options["schedule"] = Schedule(every=sample_every)
        config = ProbeConfig.profile(profile, **options)
    logger = None
    if mlflow:  # before the probe exists: without MLflow installed, nothing is attached
        from gradprobe.integrations.mlflow import ReportLogger

        logger = ReportLogger(mlflow)
    probe = Probe(model, optimizer, scalers=scaler, logdir=logdir, config=config)
    probe.total_steps = int(total_steps) if total_steps is not None else None
    if logger is not None:
        # downstream of the recorder, once it closed: the report is built from the run
        # directory (Probe.report also writes its findings as TensorBoard text) and logged
        probe._after_close.append(lambda: logger.log(probe.report))
    return probe
