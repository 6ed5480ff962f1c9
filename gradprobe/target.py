"""What ``gradprobe run`` runs: a script file, a module (``-m``), a directory or zip file with
``__main__.py``, or a Python console script found on ``PATH`` (``torchrun``, ``accelerate``),
checked before any of it runs (:func:`resolve_target`)."""

from __future__ import annotations

import os
import zipfile
from dataclasses import dataclass, field


class RunnerError(Exception):
    """The script could not be started (missing file, unwritable log directory...).

    Raised before any of the script ran; the CLI turns it into one line and exit status 2.
    """


@dataclass
class Target:
    """What to run.

    Attributes:
        kind: ``"file"`` (a ``.py`` script), ``"module"`` (``-m``) or ``"main_dir"`` (a
            directory or zip file with ``__main__.py``, as ``python DIR`` runs it).
        name: the script path or module name exactly as given on the command line.
        args: the script's own arguments.
    """

    kind: str
    name: str
    args: list[str] = field(default_factory=list)


#: bytes of a file read to tell a Python console script (its shebang) from another program
SHEBANG_BYTES = 512


def python_script_on_path(name: str) -> str | None:
    """The path of ``name`` on ``PATH`` when it is a Python script (``torchrun``,
    ``accelerate``: a console script whose shebang runs Python, directly or through pip's
    ``/bin/sh`` trampoline for long interpreter paths); None otherwise."""
    import shutil

    if not name or os.sep in name or (os.altsep and os.altsep in name):
        return None
    found = shutil.which(name)
    if found is None or not os.path.isfile(found):
        return None
    try:
        with open(found, "rb") as f:
            head = f.read(SHEBANG_BYTES)
    except OSError:
        return None
    lines = head.split(b"\n")
    words = lines[0][2:].split() if lines[0].startswith(b"#!") else []
    if not words:
        return None
    interpreter = os.path.basename(words[0])
    if interpreter == b"env":
        rest = [w for w in words[1:] if not w.startswith(b"-")]
        interpreter = os.path.basename(rest[0]) if rest else b""
    if interpreter.startswith(b"python"):
        return found
    # pip's trampoline for long interpreter paths: "#!/bin/sh", then a line starting
    # '''exec' "/long/path/bin/python" "$0" "$@"
    if interpreter == b"sh" and len(lines) > 1 and lines[1].startswith(b"'''exec'") and b"python" in lines[1]:
        return found
    return None


def resolve_target(name: str, args: list[str], *, module: bool) -> Target:
    """Checks that the script exists (``-m``: nothing is imported yet).

    A name that is no file but a Python console script on ``PATH`` (``gradprobe run torchrun
    ...``) runs that script's file, as its shebang would (``sys.argv[0]`` is its path).

    Raises:
        RunnerError: the file does not exist or cannot be read (Python exits 2 there too).
    """
    if module:
        if not name:
            raise RunnerError("-m needs a module name")
        return Target("module", name, list(args))
    if os.path.isdir(name) or (os.path.isfile(name) and zipfile.is_zipfile(name)):
        return Target("main_dir", name, list(args))
    if not os.path.exists(name):
        found = python_script_on_path(name)
        if found is not None:
            return Target("file", found, list(args))
    if not os.path.isfile(name):
        shown = os.path.abspath(name)
        if os.path.exists(name):
            raise RunnerError(f"can't open file {shown!r}: not a regular file")
        import shutil

        program = shutil.which(name) if os.sep not in name else None
        hint = f" ({program} is not a Python script: gradprobe runs Python code)" if program else ""
        raise RunnerError(f"can't open file {shown!r}: [Errno 2] No such file or directory{hint}")
    if not os.access(name, os.R_OK):
        raise RunnerError(f"can't open file {os.path.abspath(name)!r}: [Errno 13] Permission denied")
    return Target("file", name, list(args))
