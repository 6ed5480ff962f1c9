"""The rule catalog. Importing this package registers every rule.

One module per rule or small family; each imports only the quantities layer
(:mod:`gradprobe.analysis`), the rule base (:mod:`gradprobe.rules.base`) and shared snippet
text (:mod:`gradprobe.rules.snippets`), never another rule module.
"""

from gradprobe.rules import (  # noqa: F401
    activations,
    amp_autocast,
    amp_scale,
    data,
    distributed,
    gradients,
    learning_rate,
    logs,
    loss_shape,
    nonfinite,
    overfitting,
    recurrent,
    scaler_misuse,
    unbounded,
    vanishing,
    weight_decay,
)
from gradprobe.rules.base import (
    CrossRankRule,
    Explanation,
    Field,
    Rule,
    get_rule,
    register,
    registry,
)

__all__ = ["CrossRankRule", "Explanation", "Field", "Rule", "get_rule", "register", "registry"]
