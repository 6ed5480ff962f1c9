#!/usr/bin/env bash
# Installs gradprobe with its test dependencies (CPU torch pinned, never CUDA) and runs the
# whole test suite: the default tier, then the slow tier.
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install -q torch==2.13.0
python -m pip install -q -c constraints/dev.txt -e ".[dev]"
python -m pytest -q --durations=10
python -m pytest -q -m slow --durations=20
