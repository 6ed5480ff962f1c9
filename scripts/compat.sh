#!/usr/bin/env bash
# Compatibility check against the newest framework releases (outside CI: CI runs the locked
# environment of constraints/dev.txt). In a scratch venv it installs the locked environment,
# then upgrades transformers, accelerate and lightning to the newest releases on the registry
# (torch stays at the locked CPU build), and runs the integration and reader tests, both
# tiers. It prints the versions it tested.
#
#   bash scripts/compat.sh            # exit 0: passed; 1: tests failed;
#                                     # 3: no package registry reachable (nothing was tested)
#   COMPAT_KEEP=1 bash scripts/compat.sh   # keep the venv (path printed) to debug a failure
set -uo pipefail
cd "$(dirname "$0")/.."
export PIP_DISABLE_PIP_VERSION_CHECK=1
NEWEST=(transformers accelerate lightning)
PY=${PYTHON:-python3}

venv=$(mktemp -d "${TMPDIR:-/tmp}/gradprobe-compat.XXXXXX")
cleanup() { if [ -z "${COMPAT_KEEP:-}" ]; then rm -rf "$venv"; else echo "venv kept: $venv"; fi; }
trap cleanup EXIT

"$PY" -m venv "$venv" || exit 1
# shellcheck disable=SC1091
. "$venv/bin/activate"

# Reachability first: a registry that does not answer is not a failed compatibility check.
if ! python -m pip index versions "${NEWEST[0]}" >/dev/null 2>&1; then
  echo "compat: no package registry reachable (pip index versions ${NEWEST[0]} failed): nothing tested" >&2
  exit 3
fi

python -m pip install -q torch==2.13.0 || exit 1
python -m pip install -q -c constraints/dev.txt -e ".[dev]" || exit 1
# The newest releases of the frameworks, with torch held at the locked build (a range that
# admits a newer torch must never pull a CUDA build here).
echo "torch==2.13.0" >"$venv/torch-pin.txt"
python -m pip install -q --upgrade -c "$venv/torch-pin.txt" "${NEWEST[@]}" || exit 1

echo "compat: testing against"
python - "${NEWEST[@]}" torch <<'EOF'
import sys
from importlib import metadata
for name in sys.argv[1:]:
    print(f"  {name}=={metadata.version(name)}")
EOF

status=0
python -m pytest -q -p no:cacheprovider tests/integrations tests/readers tests/test_recorder.py -k "not lock" || status=1
python -m pytest -q -p no:cacheprovider -m slow tests/integrations tests/readers || status=1
if [ "$status" = 0 ]; then echo "compat: passed"; else echo "compat: FAILED"; fi
exit "$status"
