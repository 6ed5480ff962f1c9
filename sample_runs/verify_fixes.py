"""Proof that following gradprobe's advice heals the sample runs.

    python sample_runs/verify_fixes.py [--seeds 4] [--samples NAME,...] [--markdown]

For every sample with a fix: run it under ``gradprobe run`` (the before side), apply the fix
(the report's ``suggested_hyperparameters`` as the loop's flags through ``gradprobe verify``
for hyperparameter-fixable samples; the code fix switched on for the others), and compare at
an equal step budget with the seed-to-seed spread of a healthy reference run of the same model
(the sample's arguments with the fault set to the healthy value decided a priori, over
``--seeds`` seeds). A fix passes when the after run has no error/warning finding and its loss
at the budget is no worse than the worst healthy seed plus 10%.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)
sys.path.insert(0, ROOT)

import samples as S  # noqa: E402

from gradprobe.verify import apply_flags, loss_at_budget, run_watched  # noqa: E402

#: the healthy value of each sample's fault, decided from the loop's defaults (not from a report)
REFERENCE_OVERRIDES: dict[str, dict[str, str]] = {
    "001-long-lookback": {"--lookback": "50"},
    "lr-too-high": {"--lr": "3e-3"},
    "overclipping-sgd": {"--max-norm": "1.0"},
}


def _set(args: list[str], flag: str, value: str) -> list[str]:
    out, _ = apply_flags(args, {flag.lstrip("-").replace("-", "_"): value}, {flag.lstrip("-").replace("-", "_"): flag})
    return out


def reference_args(sample: S.Sample) -> list[str]:
    if sample.code_fix_remove is not None:
        return S.fix_args(sample)
    args = list(sample.args)
    for flag, value in REFERENCE_OVERRIDES.get(sample.name, {}).items():
        args = _set(args, flag, value)
    return args


def seq(args: list[str]) -> list[str]:
    return [os.path.join(HERE, "seqloop.py"), *args]


def verify_sample(sample: S.Sample, seeds: int, work: str) -> dict:
    before = run_watched(seq(sample.args), os.path.join(work, sample.name, "before"))
    if sample.code_fix_remove is not None:
        after_args = S.fix_args(sample)
        applied = {"code fix": "removed " + " ".join(f for f, _ in sample.code_fix_remove)}
    else:
        after_args, applied = apply_flags(sample.args, before.report.get("suggested_hyperparameters", {}), {})
    after = run_watched(seq(after_args), os.path.join(work, sample.name, "after"))
    budget = min(int(before.report.get("source", {}).get("steps") or 0), int(after.report.get("source", {}).get("steps") or 0)) \
        or int(after.report.get("source", {}).get("steps") or 0)
    refs = []
    for seed in range(seeds):
        r = run_watched(seq(_set(reference_args(sample), "--seed", str(seed))), os.path.join(work, sample.name, f"ref{seed}"))
        refs.append(loss_at_budget(r.logdir, budget))
    refs = [x for x in refs if x is not None]
    loss_after = loss_at_budget(after.logdir, budget)
    loss_before = loss_at_budget(before.logdir, budget)
    serious_after = after.codes("error", "warning")
    within = bool(refs) and loss_after is not None and loss_after <= max(refs) * 1.1
    return {
        "sample": sample.name,
        "applied": applied,
        "budget_steps": budget,
        "before": {"findings": before.codes("error", "warning"), "loss": loss_before, "seconds": round(before.seconds, 1)},
        "after": {"findings": serious_after, "loss": loss_after, "seconds": round(after.seconds, 1)},
        "reference": {"seeds": len(refs), "min": min(refs) if refs else None, "max": max(refs) if refs else None,
                      "mean": statistics.fmean(refs) if refs else None},
        "healthy_after": not serious_after,
        "loss_within_reference": within,
        "passed": not serious_after and within,
    }


def markdown(rows: list[dict]) -> str:
    def f(x: float | None) -> str:
        return "n/a" if x is None else f"{x:.4g}"

    out = ["| sample | fix applied | before: findings | loss before | after: findings | loss after | healthy reference (min–max) | passed |",
           "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        ap = ", ".join(f"{k}={v}" for k, v in r["applied"].items())
        out.append(f"| {r['sample']} | {ap} | {', '.join(r['before']['findings']) or '–'} | {f(r['before']['loss'])} | "
                   f"{', '.join(r['after']['findings']) or 'none'} | {f(r['after']['loss'])} | "
                   f"{f(r['reference']['min'])}–{f(r['reference']['max'])} ({r['reference']['seeds']} seeds) | {'yes' if r['passed'] else 'NO'} |")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, default=4)
    ap.add_argument("--samples", default="")
    ap.add_argument("--markdown", action="store_true")
    ap.add_argument("--json")
    args = ap.parse_args(argv)
    names = [n for n in args.samples.split(",") if n]
    chosen = [s for s in S.SAMPLES if (not names or s.name in names) and s.name != "003-healthy-reference"]
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    rows = []
    with tempfile.TemporaryDirectory() as work:
        for s in chosen:
            row = verify_sample(s, args.seeds, work)
            rows.append(row)
            print(json.dumps(row), file=sys.stderr, flush=True)
    print(markdown(rows) if args.markdown else json.dumps(rows, indent=2))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(rows, fh, indent=2)
    return 0 if all(r["passed"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
