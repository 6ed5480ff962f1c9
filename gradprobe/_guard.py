"""Failure isolation: a fault inside gradprobe never reaches the user's training run.

Every hook and patch body runs through a :class:`Guard`. The first exception raised by a
probe *part* (``"grad_norms"``, ``"state_age"``, ``"writer"``...) is reported once as a
:class:`GradprobeWarning`, the part disables itself, and training goes on untouched. The
user's own calls (the original ``backward``, ``optimizer.step``...) are never wrapped in a
guard: their exceptions propagate exactly as without gradprobe.
"""

from __future__ import annotations

import functools
import traceback
import warnings
from typing import Any, Callable, TypeVar

F = TypeVar("F", bound=Callable[..., Any])


class GradprobeWarning(RuntimeWarning):
    """Something inside gradprobe failed; the affected probe part switched itself off."""


class Guard:
    """Tracks which probe parts are disabled and why.

    Attributes:
        disabled: part name -> one-line reason, for parts that failed.
        on_failure: optional callback ``(part, exc)`` used to log the failure into the run.
    """

    def __init__(self) -> None:
        self.disabled: dict[str, str] = {}
        self.on_failure: Callable[[str, BaseException], None] | None = None
        # Test hook: part name -> exception to raise at the part's next entry (fault injection).
        self.inject: dict[str, BaseException] = {}

    def enabled(self, part: str) -> bool:
        return part not in self.disabled

    def fail(self, part: str, exc: BaseException) -> None:
        if part in self.disabled:
            return
        reason = f"{type(exc).__name__}: {exc}".splitlines()[0][:300]
        self.disabled[part] = reason
        where = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__)[-2:]).strip()
        warnings.warn(
            f"gradprobe: the {part!r} probe failed and switched itself off; training continues "
            f"unaffected ({reason}). Last frame: {where.splitlines()[-1] if where else '?'}",
            GradprobeWarning,
            stacklevel=3,
        )
        if self.on_failure is not None:
            try:
                self.on_failure(part, exc)
            except Exception:  # noqa: BLE001 - the failure logger itself must never raise
                pass

    def call(self, part: str, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """Runs ``fn`` for ``part``; returns None if the part is off or fails."""
        if part in self.disabled:
            return None
        try:
            if self.inject:
                exc = self.inject.pop(part, None)
                if exc is not None:
                    raise exc
            return fn(*args, **kwargs)
        except Exception as exc:  # noqa: BLE001 - isolation is the point
            self.fail(part, exc)
            return None


def guarded(part: str) -> Callable[[F], F]:
    """Method decorator: runs the method through ``self.guard`` under ``part``."""

    def deco(fn: F) -> F:
        @functools.wraps(fn)
        def wrapper(self: Any, *args: Any, **kwargs: Any) -> Any:
            guard = self.guard
            if guard.inject or part in guard.disabled:
                return guard.call(part, fn, self, *args, **kwargs)
            try:  # the hot path of Guard.call, one frame less (these wrap every hook)
                return fn(self, *args, **kwargs)
            except Exception as exc:  # noqa: BLE001 - isolation is the point
                guard.fail(part, exc)
                return None

        return wrapper  # type: ignore[return-value]

    return deco
