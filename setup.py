"""Package layout only; everything else is in pyproject.toml.

`cli/` sits at the top of the repository (next to `gradprobe/`) but is installed as
`gradprobe.cli`, so no bare top-level `cli` module ever lands in site-packages.
"""

from setuptools import find_packages, setup

core = find_packages(include=["gradprobe", "gradprobe.*"])
cli = ["gradprobe.cli"] + [f"gradprobe.cli.{p}" for p in find_packages(where="cli")]

setup(
    packages=core + cli,
    package_dir={"gradprobe.cli": "cli"},
)
