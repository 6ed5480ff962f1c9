"""State age: how many steps back the autograd graph of a tensor entering a module reaches.

Every tensor a watched module outputs has its autograd node dated (``grad_fn.metadata``):
the step that made it and the oldest step its graph reaches. A tensor entering a module in
step s whose graph reaches step s - k is a state carried across k steps still attached to
its graph (GP101: an RNN state, a memory, an EMA never detached). Tensors made outside
watched modules are dated by walking a few nodes back to a dated one.

Each step's backward roots also get a sentinel in their node's metadata: it lives exactly as
long as that step's graph, so graphs of old steps still alive (``total_loss += loss``,
GP103) are counted when a step closes.
"""

from __future__ import annotations

import collections
import weakref
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from gradprobe.probe.context import Context
    from gradprobe.probe.discovery import ModuleInfo

AGE_KEY = "gradprobe.reach"  # oldest step whose graph this node reaches
MADE_KEY = "gradprobe.made"  # step in which this node was made
SENTINEL_KEY = "gradprobe.sentinel"
#: most step sentinels kept (the oldest are dropped; a step's graph alive 512 steps later is
#: counted until then)
MAX_SENTINELS = 512


class _Sentinel:
    """Stored in a step's graph (``grad_fn.metadata``); alive exactly as long as that graph."""

    __slots__ = ("step", "__weakref__")

    def __init__(self, step: int) -> None:
        self.step = step


def iter_tensors(obj: Any, depth: int = 0) -> list[torch.Tensor]:
    """Tensors in a (nested, up to 3 levels) tuple/list/dict, in order (hot path: no generators)."""
    if isinstance(obj, torch.Tensor):
        return [obj]
    out: list[torch.Tensor] = []
    if depth < 3:
        items = obj.values() if isinstance(obj, dict) else obj if isinstance(obj, (tuple, list)) else ()
        for o in items:
            if isinstance(o, torch.Tensor):
                out.append(o)
            elif isinstance(o, (tuple, list, dict)):
                out.extend(iter_tensors(o, depth + 1))
    return out


def date(fn: Any, made: int, reach: int) -> None:
    """Dates an autograd node: the oldest step its graph reaches (kept if already older) and
    the step that made it (kept if already dated)."""
    meta = fn.metadata
    old = meta.get(AGE_KEY)
    meta[AGE_KEY] = reach if old is None or old > reach else old
    if MADE_KEY not in meta:
        meta[MADE_KEY] = made


class StateAges:
    """Dates graphs as modules output them and measures how old the graphs entering them are."""

    def __init__(self, ctx: "Context") -> None:
        self.ctx = ctx
        self.walk_nodes = ctx.config.age_walk_nodes
        self.sentinels: collections.deque[tuple[int, Any]] = collections.deque()

    def reach(self, t: torch.Tensor) -> tuple[int, int] | None:
        """(made, reach) of ``t``'s graph: the step that made it and the oldest step its
        graph reaches; None if unknown (made outside watched modules and more than
        ``age_walk_nodes`` nodes away from a dated one, or from leaves only)."""
        fn = t.grad_fn
        if fn is None:
            return None
        meta = fn.metadata
        r = meta.get(AGE_KEY)
        if r is not None:
            return meta.get(MADE_KEY, r), r
        reach: int | None = None
        made: int | None = None
        frontier = [fn]
        budget = self.walk_nodes
        while frontier and budget > 0:
            node = frontier.pop()
            budget -= 1
            for nxt, _ in node.next_functions:
                if nxt is None:
                    continue
                m = nxt.metadata
                r = m.get(AGE_KEY)
                if r is not None:
                    reach = r if reach is None else min(reach, r)
                    mk = m.get(MADE_KEY, r)
                    made = mk if made is None else max(made, mk)
                else:
                    frontier.append(nxt)
        if reach is None or made is None:
            return None
        meta[AGE_KEY] = reach
        meta[MADE_KEY] = made
        return made, reach

    def track(self, info: "ModuleInfo", args: Any, kwargs: Any, output: Any) -> None:
        """A training forward of a watched module: the age of what entered it, and the date
        of what it output."""
        ctx = self.ctx
        step = ctx.open.index
        reach = step
        carried_reach = step  # oldest reach among inputs made in an earlier step
        oldest_pos = -1
        # hot path: one tensor argument, no keywords (a Linear, a conv...)
        inputs = args if not kwargs and len(args) == 1 and isinstance(args[0], torch.Tensor) else iter_tensors((args, kwargs))
        for pos, t in enumerate(inputs):
            if t.grad_fn is None:
                continue
            mr = self.reach(t)
            if mr is None:
                # a graph made outside watched modules: date it now, so that if it is still
                # attached next step (an EMA, a running state), it is seen as carried
                date(t.grad_fn, step, step)
                continue
            made, r = mr
            reach = min(reach, r)
            if made < step and r < carried_reach:
                carried_reach = r
                oldest_pos = pos
        for t in (output,) if isinstance(output, torch.Tensor) else iter_tensors(output):
            fn = t.grad_fn
            if fn is not None:
                date(fn, step, reach)
        age = step - carried_reach
        if age > 0:
            seg = ctx.open.current
            if age > seg.state_age:
                seg.state_age = age
                seg.state_age_module = info.name
            if not info.aged:
                info.aged = True
                ctx.event(
                    {
                        "kind": "state_age",
                        "module": info.name,
                        "class": info.cls,
                        "step": step,
                        "age": age,
                        "input_position": oldest_pos,
                        "detail": "a tensor entering this module's forward is still attached to the graph of an earlier step",
                    }
                )

    def stamp(self, fn: Any) -> None:
        """Puts the open step's sentinel into a backward root's graph."""
        step = self.ctx.open.index
        s = _Sentinel(step)
        fn.metadata[SENTINEL_KEY] = s
        self.sentinels.append((step, weakref.ref(s)))

    def graphs_alive(self, step: int) -> int:
        """Graphs of steps at least two steps before ``step`` that are still alive (retained);
        forgets the sentinels of freed graphs."""
        alive = 0
        keep: collections.deque[tuple[int, Any]] = collections.deque()
        for s, ref in self.sentinels:
            if ref() is None:
                continue
            keep.append((s, ref))
            if s <= step - 2:
                alive += 1
        while len(keep) > MAX_SENTINELS:
            keep.popleft()
        self.sentinels = keep
        return alive
