"""The quantities layer: every derived series or statistic of a run, defined once.

Rules read a :class:`RunContext` and the quantities here, never raw hooks, never each other.
A quantity is a function of the context (and hashable arguments) decorated with
:func:`~gradprobe.analysis.context.quantity`: computed on first use, then served from the
context's one cache. Modules, from the foundation up:

* :mod:`.context`: the context, the cache, the per-step series (``ctx.loss``, ``ctx.lr``...);
* :mod:`.numeric`: pure helpers over series (running levels, rises, trends, confidence);
* :mod:`.steps`: the warm-up, the scaler's rows, the optimizer family, per-layer and sample
  tables, the run's own exceptions;
* :mod:`.nonfinite`: where NaN/Inf first appeared (inputs -> loss -> gradients -> parameters);
* :mod:`.loss`: the loss curve, where it started, its spikes, the harm it shows, the healthy
  part of the run;
* :mod:`.gradients`: gradient-norm spikes, geometric growth, the stable window, ``max_norm``;
* :mod:`.updates`: update-to-weight ratios;
* :mod:`.amp`: autocast in force, the GradScaler's history, float16 overflow;
* :mod:`.data`: features, targets, the trivial loss, the nonlinearity;
* :mod:`.graphs`: backward time and memory of graphs that outlive their step;
* :mod:`.recurrent`: gradient-through-time profiles, and whether gradients grow backwards in time;
* :mod:`.recommend`: computed values and the plausibility check on every suggestion.
"""

from gradprobe.analysis.amp import (
    AUTOCAST_COMPUTE_CLASSES,
    FORWARD_OVERFLOW_MIN,
    FP16_MAX,
    FP16_MAX_SCALE,
    FP16_MIN_NORMAL,
    FP16_MIN_SUBNORMAL,
    LATE_SKIP_MIN,
    LATE_SKIP_RATE,
    LONG_BURST_HALVINGS,
    OverflowTriggers,
    ScalerHistory,
    autocast_dtypes,
    autocast_modules,
    fp16_activation_overflow_steps,
    fp16_compute_modules,
    fp16_trained_modules,
    has_scale,
    high_init,
    overflow_triggers,
    scaler_history,
    scaler_in_use,
    uses_fp16_or_unknown,
)
from gradprobe.analysis.context import ADAPTIVE_OPTIMIZERS, RunContext, quantity
from gradprobe.analysis.data import (
    TARGET_TINY,
    TRIVIAL_LEVEL,
    TrivialLoss,
    class_ordered_batches,
    feature_absmax,
    first_layer_name,
    input_constant,
    nonlinearity,
    normalised,
    sustained,
    tiny_targets,
    probabilities_into_cross_entropy,
    trivial_loss,
    uniform_classes,
)
from gradprobe.analysis.gradients import (
    MAX_NORM_FORMULA,
    MAX_NORM_PERCENTILE,
    SPIKE_ABOVE_SUSTAINED,
    SPIKE_FACTOR,
    GradSpikes,
    geometric_growth,
    grad_spikes,
    stable_window,
    suggested_max_norm,
)
from gradprobe.analysis.graphs import footprint_growth, footprint_grows
from gradprobe.analysis.loss import (
    LOSS_SPIKE_FACTOR,
    REGAIN_WINDOWS,
    LOSS_SPIKE_MATERIAL,
    LOSS_SPIKE_SINGLE,
    LOSS_SPIKE_Z,
    LossCurve,
    LossSpike,
    eval_curve,
    eval_curves,
    eval_loss_spikes,
    find_loss_spikes,
    harder_data,
    healthy_end,
    healthy_rows,
    loss_curve,
    loss_harm,
    loss_spikes,
    new_parameter_steps,
    rising_trend,
    on_probability_floor,
    lr_following,
    material_rise,
    median_lr,
    level_wander,
    set_back,
    transient,
    trained_stably_before,
)
from gradprobe.analysis.nonfinite import NonfiniteTimeline, diverged_into_nonfinite, nonfinite_timeline
from gradprobe.analysis.numeric import (
    RISE_FACTOR,
    RUNNING_WINDOW,
    Trend,
    count_confidence,
    finite,
    log_ratio_confidence,
    nice,
    percentile,
    rank_correlation,
    risen_before,
    smoothing_window,
    too_early_to_rise,
    trailing_level,
    trailing_level_at,
    trend,
)
from gradprobe.analysis.recommend import Computed, implausible
from gradprobe.analysis.recurrent import (
    EXPLODING_FAR_OVER_NEAR,
    bptt_profiles,
    exploding_through_time,
    explodes_from_the_first_profile,
)
from gradprobe.analysis.steps import (
    WARMUP_DIVISOR,
    WARMUP_MAX,
    feature_table,
    finite_or_none,
    first_index,
    gradient_free_rows,
    is_matrix,
    layer_forward_order,
    layer_grads,
    layer_grads_by_row,
    module_of,
    optimizer_eps,
    optimizer_family,
    run_exceptions,
    sample_table,
    scaler_rows,
    total_numel,
    warmup_rows,
)
from gradprobe.analysis.updates import TARGET_UPDATE_RATIO, init_scale_norm, update_ratio_by_step, update_ratios
from gradprobe.runlog import MISSING
from gradprobe.stats import HORIZON_FRACTION

__all__ = [name for name in dir() if not name.startswith("_")]
