"""GP8xx: distributed runs (one log per rank under torchrun)."""

from __future__ import annotations

import numpy as np

from gradprobe.analysis import RunContext
from gradprobe.rules.base import Confidence, CrossRankRule, Explanation, Field, Finding, Ramp, Recommendation, register

#: Relative disagreement of the all-reduced gradient norm between ranks that is not float
#: rounding. An all-reduce hands every rank the same bits (NCCL and gloo reduce once and
#: broadcast the result), so reduced norms computed from them agree to the last ulp; 1e-4
#: leaves room for ranks that sum the per-layer norms in a different order.
REDUCED_RTOL = 1e-4


def _first_nonfinite(ctx: RunContext) -> tuple[int | None, str | None]:
    """First step at which this rank's own data went non-finite, and where (inputs, loss,
    local gradients). Reduced gradients are excluded: after the all-reduce a NaN from one rank
    is on every rank."""
    best: tuple[int | None, str | None] = (None, None)

    def consider(step: int | None, where: str) -> None:
        nonlocal best
        if step is not None and (best[0] is None or step < best[0]):
            best = (step, where)

    for probe in ("input", "first_layer", "target"):
        s = ctx.samples(probe, "nonfinite")
        if not s.empty:
            bad = s[s["value"] > 0]
            if not bad.empty:
                consider(int(bad["step"].min()), "inputs" if probe != "target" else "targets")
    loss = ctx.steps["loss_nonfinite"].to_numpy(dtype=bool) | ctx.steps["loss_fn_nonfinite"].to_numpy(dtype=bool)
    consider(ctx.first_step_where(loss), "loss")
    local = ctx.col("local_grad_norm")
    if np.isfinite(local).any():  # a DDP rank: NaN means measured and non-finite on steps with a backward
        nf = ~np.isfinite(local) & (ctx.col("n_backward") > 0)
        consider(ctx.first_step_where(nf), "local gradients")
    return best


@register
class RankDivergence(CrossRankRule):
    """Ranks of one DistributedDataParallel job that disagree, or a fault that started on one
    rank.

    Checked only when a run has several ranks' logs (``torchrun`` with ``gradprobe run`` or
    ``gradprobe.watch``: one run directory per rank).

    * Reduced norms disagree: after DDP's all-reduce every rank holds the same gradient, so
      the reduced gradient norm (``grad_norm``) must agree across ranks to
      ``REDUCED_RTOL`` = 1e-4 relative at every step where all ranks measured it. More than
      one disagreeing step (one can be a step some rank skipped) means the gradients were
      not averaged: a model that is not (or not on every rank) wrapped in DDP, gradients
      modified after the all-reduce on one rank, or ``no_sync()`` left on. Only runs whose
      models are DDP-wrapped are judged. Confidence: from 0.6 (an exact comparison), whole at
      10 disagreeing steps (more disagreeing steps, more certain).
    * A fault that started on one rank: the first step at which a rank's own inputs, loss or
      local (pre-all-reduce) gradients went NaN/Inf, compared across ranks; when one rank is
      strictly first, the all-reduce then spread the NaN to the others. Confidence: high when
      the other ranks stayed finite for at least one more step, lower when they went bad in
      the same step (the order within the step is then from the stage: inputs before loss
      before gradients).
    """

    code = "GP801"
    slug = "rank-divergence"
    severity = "error"
    title = "Ranks of a distributed run disagree, or a fault started on one rank"
    confidence = {
        "reduced norms disagree": Confidence(0.6, Ramp(0.4, "disagreeing steps", span=10)),
        "one rank first, a step ahead": Confidence(0.95),
        "one rank first, in the same step": Confidence(0.7),
    }
    evidence_fields = {
        "disagreeing_steps": Field("steps where the ranks disagree", "steps"),
        "compared_steps": Field("steps compared", "steps"),
        "max_relative_difference": Field("largest relative difference"),
        "ranks": Field("ranks"),
        "rank": Field("rank"),
        "first_step": Field("first non-finite", "step"),
        "where": Field("where"),
        "first_nonfinite_by_rank": Field("first non-finite step by rank", "step"),
    }
    explanation = Explanation(
        what="In a torchrun/DDP job: ranks whose all-reduced gradient norms differ (the gradients are not being averaged), "
        "or the rank whose inputs, loss or local gradients went non-finite first.",
        why="DDP's promise is identical parameters on every rank; if the reduced gradients differ, the replicas drift apart "
        "silently. A NaN on one rank reaches every rank through the all-reduce, so every rank's log shows it: only comparing "
        "ranks tells where it started.",
        causes="A model not wrapped in DistributedDataParallel on some rank; gradients edited after backward on one rank; "
        "no_sync() left on; a bad shard of the dataset read by one rank only; a rank-specific augmentation producing NaN.",
        fix="Wrap the same model in DDP on every rank and edit gradients only before the all-reduce (or identically on all "
        "ranks). For a NaN from one rank, inspect that rank's data shard at the reported step (DistributedSampler index).",
        example="torchrun --no-python --nproc_per_node=2 gradprobe run train.py  # rank 1 reads a corrupt shard at step 40",
    )

    def check_ranks(self, ranks: dict[int, RunContext]) -> list[Finding]:
        out: list[Finding] = []
        if len(ranks) < 2:
            return out
        ddp = any(m.get("ddp") for c in ranks.values() for m in (c.meta.get("models") or []))
        if ddp:
            frames = {r: c.steps.set_index("step")["grad_norm"] for r, c in ranks.items()}
            common = None
            for s in frames.values():
                common = s.index if common is None else common.intersection(s.index)
            if common is not None and len(common):
                mat = np.vstack([frames[r].reindex(common).to_numpy(dtype=np.float64) for r in sorted(frames)])
                ok = np.isfinite(mat).all(axis=0)
                if ok.any():
                    ref = mat[0, ok]
                    diff = np.abs(mat[:, ok] - ref) / np.maximum(np.abs(ref), 1e-12)
                    bad_cols = (diff > REDUCED_RTOL).any(axis=0)
                    n_bad = int(bad_cols.sum())
                    if n_bad > 1:
                        steps = np.asarray(common)[ok][bad_cols]
                        worst = float(diff.max())
                        out.append(self.finding(
                            confidence=self.confidence["reduced norms disagree"](n_bad),
                            first_step=int(steps[0]),
                            message=(f"The all-reduced gradient norm differs between ranks at {n_bad} of {int(ok.sum())} steps "
                                     f"(largest relative difference {worst:.2g}, first at step {int(steps[0])}): DDP is not "
                                     "averaging the gradients the optimizer uses on every rank."),
                            evidence={"disagreeing_steps": n_bad, "compared_steps": int(ok.sum()), "max_relative_difference": worst,
                                      "ranks": sorted(ranks)},
                            recommendations=[Recommendation.code(
                                "Wrap the model in DistributedDataParallel on every rank and step the optimizer on the DDP "
                                "model's parameters; do not edit .grad on one rank only",
                                "model = torch.nn.parallel.DistributedDataParallel(model)\n"
                                "optimizer = torch.optim.AdamW(model.parameters(), lr=lr)")],
                        ))
        firsts = {r: _first_nonfinite(c) for r, c in ranks.items()}
        bad = {r: v for r, v in firsts.items() if v[0] is not None}
        if bad:
            r0, (s0, where) = min(bad.items(), key=lambda kv: (kv[1][0], kv[0]))
            others = [v[0] for r, v in firsts.items() if r != r0]
            strictly_first = all(o is None or o > s0 for o in others)
            if strictly_first or len(bad) < len(ranks):
                same_step = any(o == s0 for o in others)
                form = "one rank first, in the same step" if same_step else "one rank first, a step ahead"
                out.append(self.finding(
                    confidence=self.confidence[form](),
                    first_step=s0,
                    message=(f"Non-finite values started on rank {r0} at step {s0} (its {where}); "
                             + ("the other ranks' own data stayed finite until later: the all-reduce spread it." if not same_step
                                else "the other ranks went bad in the same step, through the all-reduce.")),
                    evidence={"rank": r0, "first_step": s0, "where": where,
                              "first_nonfinite_by_rank": {str(r): v[0] for r, v in sorted(firsts.items())}},
                    recommendations=[Recommendation.code(
                        f"Inspect rank {r0}'s batch at step {s0} (its DistributedSampler shard)",
                        "sampler = torch.utils.data.distributed.DistributedSampler(dataset)\n"
                        f"# rank {r0}, step {s0}: indices = list(sampler)[{s0} * batch_size:({s0} + 1) * batch_size]")],
                ))
        return out
