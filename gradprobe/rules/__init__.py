"""The rule catalog (SPEC §3). Importing this package registers every rule family."""

from gradprobe.rules import amp, data, distributed, gradients, logs, nonfinite, optimization, recurrent  # noqa: F401
from gradprobe.rules.base import Explanation, Rule, get_rule, register, registry

__all__ = ["Explanation", "Rule", "get_rule", "register", "registry"]
