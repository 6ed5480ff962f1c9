"""The ``gradprobe`` command line (installed as ``gradprobe.cli``)."""
