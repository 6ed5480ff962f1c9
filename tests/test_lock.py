"""``constraints/dev.txt`` is a full lock of the test environment: every package in the
dependency tree of ``gradprobe[dev]`` (as installed here) is pinned there, at the version
installed. A dependency added to ``pyproject.toml`` without re-running ``scripts/lock.py``
fails here, before a new machine resolves it to whatever PyPI holds that day."""

from __future__ import annotations

import re
from importlib import metadata
from pathlib import Path

from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parent.parent


def _canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _lock() -> dict[str, str]:
    pins = {}
    for line in (ROOT / "constraints" / "dev.txt").read_text(encoding="utf-8").splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, _, version = line.partition("==")
            assert version, f"not a pin: {line!r}"
            pins[_canonical(name)] = version
    return pins


def _tree(root: str, extras: set[str]) -> dict[str, str]:
    """canonical name -> installed version, for every installed requirement reachable from
    ``root[extras]`` (environment markers evaluated as pip does)."""
    seen: dict[str, str] = {}
    todo = [(root, extras)]
    while todo:
        name, wanted = todo.pop()
        dist = metadata.distribution(name)
        for spec in dist.requires or []:
            req = Requirement(spec)
            if req.marker is not None and not any(
                req.marker.evaluate({"extra": e}) for e in (wanted | {""})
            ):
                continue
            key = _canonical(req.name)
            if key in seen:
                continue
            seen[key] = metadata.version(req.name).split("+", 1)[0]
            todo.append((req.name, set(req.extras)))
    return seen


def test_lock_pins_every_package_the_tests_install_at_its_installed_version() -> None:
    lock = _lock()
    tree = _tree("gradprobe", {"dev"})
    assert "torch" in tree and "pytest" in tree
    missing = sorted(set(tree) - set(lock))
    assert not missing, f"not in constraints/dev.txt (run python scripts/lock.py): {missing}"
    differ = {k: (v, lock[k]) for k, v in tree.items() if lock[k] != v}
    assert not differ, f"installed != locked (reinstall with scripts/test.sh, or re-lock): {differ}"


def test_lock_has_no_local_labels_cuda_packages_or_the_project() -> None:
    lock = _lock()
    assert "gradprobe" not in lock
    assert not [k for k in lock if k.startswith("nvidia-") or k == "triton"]
    assert not [v for v in lock.values() if "+" in v]
    assert lock["torch"] == "2.13.0"
