"""The per-step data check's cost: no check, a sum, a 2-norm, interleaved step by step.

    python benchmarks/data_check.py [--model mlp] [--steps 4000]

gradprobe reduces every training batch to one 0-d value on the device, on every step, to
count non-finite batches (:meth:`gradprobe.probe.step.Segment.count_data`). This trains one
of ``overhead.py``'s models and cycles the variants step by step (no check, ``sum`` with
float32 accumulation, ``torch.linalg.vector_norm``), timing each step: neighbouring steps
see the same machine, so a cost of ~0.1 ms shows through a step time that moves by 20% on
a shared machine, where comparing blocks of steps cannot see it. Prints each variant's
median step time and its difference from no check.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import overhead  # noqa: E402

CHECKS = {
    "none": None,
    "sum": lambda t: t.sum(dtype=torch.float32),
    "norm": lambda t: torch.linalg.vector_norm(t),
}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="mlp", choices=["lstm", "mlp", "transformer"])
    ap.add_argument("--steps", type=int, default=4000)
    args = ap.parse_args(argv)
    case = overhead.make_case(args.model, "cpu")
    model, opt, x, y, loss_fn = case["model"], case["opt"], case["x"], case["y"], case["loss_fn"]
    names = list(CHECKS)
    times: dict[str, list[float]] = {k: [] for k in names}
    kept: list[torch.Tensor] = []  # the checks' results stay alive until the step ends, as in the probe
    for i in range(args.steps + len(names)):
        name = names[i % len(names)]
        check = CHECKS[name]
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        if check is not None:
            kept.append(check(x))
        loss = loss_fn(model(x), y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        dt = time.perf_counter() - t0
        kept.clear()
        if i >= len(names):  # the first cycle warms up
            times[name].append(dt)
    base = statistics.median(times["none"])
    print(f"{args.model}: data {tuple(x.shape)}, {args.steps // len(names)} steps per variant, interleaved")
    for name in names:
        m = statistics.median(times[name])
        print(f"  {name:5s} {m * 1e3:8.3f} ms per step  {(m - base) * 1e6:+7.0f} us  ({m / base:.4f}x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
