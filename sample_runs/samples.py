"""The sample runs: training runs with a common failure switched on (and one healthy
reference), each recreated by one command.

    python sample_runs/samples.py make [NAME ...]      # re-record the run directories
    python sample_runs/samples.py list                 # the commands

Each sample is a small run directory ``sample_runs/<name>/`` recorded with ``gradprobe run``
from ``sample_runs/seqloop.py`` (one loop, the failure switched on by flags) plus its golden
file ``sample_runs/<name>.golden.json``: the expected root cause, decided from the mechanics
and measured evidence before gradprobe ran (see each golden's ``why``), the findings that must
and must not appear, and how the fix is applied (hyperparameters from the report, or the
code fix switched on) for ``sample_runs/verify_fixes.py``.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass, field

HERE = os.path.dirname(os.path.abspath(__file__))
LOOP = os.path.join(HERE, "seqloop.py")


@dataclass(frozen=True)
class Sample:
    name: str
    args: list[str]
    # (flag, number of values) removed to apply the code fix; None: the fix is the report's hyperparameters
    code_fix_remove: tuple[tuple[str, int], ...] | None = None
    code_fix_add: tuple[str, ...] = ()
    expected_exit: int = 0
    env: dict[str, str] = field(default_factory=dict)

    def command(self, logdir: str) -> list[str]:
        return ["gradprobe", "run", "--logdir", logdir, "--no-report", "sample_runs/seqloop.py", *self.args]


SAMPLES: list[Sample] = [
    Sample("000-undetached-state-bf16",
           ["--stateful", "--no-detach", "--retain-graph", "--amp-dtype", "bfloat16", "--hidden-size", "10",
            "--max-norm", "0.5", "--epochs", "1", "--max-steps", "24", "--lookback", "40", "--train-windows", "768", "--quiet"],
           code_fix_remove=(("--no-detach", 0), ("--retain-graph", 0))),
    Sample("000-undetached-state-crash",
           ["--stateful", "--no-detach", "--retain-graph", "--hidden-size", "10", "--max-norm", "0.5", "--epochs", "1",
            "--max-steps", "24", "--lookback", "40", "--train-windows", "768", "--quiet"],
           code_fix_remove=(("--no-detach", 0), ("--retain-graph", 0)), expected_exit=1),
    Sample("001-long-lookback",
           ["--lookback", "400", "--hidden-size", "10", "--max-norm", "0.5", "--weight-decay", "0", "--lr", "1e-4",
            "--epochs", "2", "--train-windows", "128", "--test-windows", "32", "--batch-size", "16", "--quiet"]),
    Sample("002-scaler-skip-update",
           ["--model", "mlp", "--amp-dtype", "float16", "--init-scale", "65536", "--skip-update-on-inf",
            "--clip-before-unscale", "--max-norm", "1.0", "--epochs", "2", "--target-scale", "30", "--quiet"],
           code_fix_remove=(("--skip-update-on-inf", 0), ("--clip-before-unscale", 0))),
    Sample("003-healthy-reference", ["--epochs", "3", "--quiet"]),
    Sample("004-gru-init-amp-tiny-targets",
           ["--model", "gru", "--init-gain", "0.001", "--amp-despite-config", "--target-scale", "1e-7", "--epochs", "2", "--quiet"],
           code_fix_remove=(("--init-gain", 1), ("--amp-despite-config", 0), ("--target-scale", 1))),
    Sample("nan-batch-skipped", ["--nan-at-step", "5", "--epochs", "2", "--quiet"],
           code_fix_remove=(("--nan-at-step", 1),)),
    Sample("lr-too-high", ["--lr", "0.5", "--epochs", "2", "--quiet"]),
    Sample("overclipping-sgd", ["--optimizer", "sgd", "--lr", "0.05", "--max-norm", "0.002", "--epochs", "3", "--quiet"]),
    Sample("raw-input-scale", ["--model", "mlp", "--input-scale", "10000", "--epochs", "2", "--quiet"],
           code_fix_remove=(("--input-scale", 1),)),
]

BY_NAME = {s.name: s for s in SAMPLES}


def fix_args(sample: Sample) -> list[str]:
    """The sample's arguments with the code fix switched on (failure flags removed)."""
    args = list(sample.args)
    for flag, n_values in sample.code_fix_remove or ():
        if flag in args:
            i = args.index(flag)
            del args[i:i + 1 + n_values]
    return args + list(sample.code_fix_add)


def make(names: list[str]) -> int:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONHASHSEED="0")
    for s in SAMPLES:
        if names and s.name not in names:
            continue
        d = os.path.join("sample_runs", s.name)
        if os.path.exists(d):
            shutil.rmtree(d)
        proc = subprocess.run(s.command(d), cwd=os.path.dirname(HERE), env={**env, **s.env}, capture_output=True, text=True)
        size = sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(os.path.join(os.path.dirname(HERE), d)) for f in fs)
        status = "ok" if proc.returncode == s.expected_exit else f"UNEXPECTED exit {proc.returncode}"
        print(f"{s.name}: exit {proc.returncode} ({status}), {size / 1024:.0f} KiB")
        if proc.returncode != s.expected_exit:
            print(proc.stderr[-3000:], file=sys.stderr)
    return 0


def main(argv: list[str]) -> int:
    if not argv or argv[0] == "list":
        for s in SAMPLES:
            print(f"{s.name}:\n  {' '.join(s.command('sample_runs/' + s.name))}")
        return 0
    if argv[0] == "make":
        return make(argv[1:])
    raise SystemExit(f"usage: {__doc__}")


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
