"""The reference training loop for sequence regression, with switches that reintroduce each
sample run's failure (sample_runs/README.md).

The healthy default (sample 003): MSE, Adam, ReduceLROnPlateau,
early stopping with best-model restore, gradient clipping at a sane ``max_norm``, dropout,
weight decay, separate noise seeds for the training and test sets, and the hidden state
detached after every step. One loop; every failure is a switch:

=========================  =====================================================================
switch                      reintroduces
=========================  =====================================================================
``--stateful --no-detach``  sample 000: the state is carried across consecutive windows and
 ``--retain-graph``         detached only when an error is caught (add ``--amp-dtype bfloat16``
                            for the silent-growth form; float32 crashes at step 2)
``--lookback 400``          sample 001: a window far past the gradient horizon, with
 ``--hidden-size 10``       ``--max-norm 0.5 --weight-decay 0``
``--amp-dtype float16``     sample 002: GradScaler(init_scale) and a ``continue`` on a
 ``--skip-update-on-inf``   non-finite norm before ``scaler.update()``, the scale shrunk by hand
 ``--clip-before-unscale``  and clipping on still-scaled gradients
``--init-gain 0.001``       sample 004: xavier/orthogonal gains of 0.01/0.001, AMP on although
 ``--amp-despite-config``   the config says off, tiny targets (``--target-scale 1e-7``)
``--input-scale``,          raw, unnormalised features; a NaN injected in one batch
 ``--nan-at-step``
=========================  =====================================================================

Hyperparameters use gradprobe's canonical names (``--lr --max-norm --weight-decay
--init-scale --growth-interval --growth-factor --lookback --hidden-size --amp-dtype
--batch-size --warmup-steps``) so ``gradprobe verify`` can apply a report's suggestions. CPU
autocast notes: float16 fails for nn.LSTM on CPU and leaves GRU/LSTMCell in float32, so the
recurrent AMP samples use bfloat16 and the float16 ones the ``--model mlp`` / ``conv`` models.

Prints one JSON line at the end: final train/validation loss, steps, seconds, and a checksum
of the parameters (for the no-observer-effect tests).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import sys
import time

import torch
import torch.nn as nn


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=["lstm", "gru", "rnn", "mlp", "conv"], default="lstm")
    p.add_argument("--hidden-size", type=int, default=32)
    p.add_argument("--num-layers", type=int, default=1)
    p.add_argument("--dropout", type=float, default=0.1)
    p.add_argument("--lookback", type=int, default=50)
    p.add_argument("--features", type=int, default=5)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--train-windows", type=int, default=512)
    p.add_argument("--test-windows", type=int, default=128)
    p.add_argument("--epochs", type=int, default=6)
    p.add_argument("--max-steps", type=int, default=0, help="stop after this many optimizer steps (0: no limit)")
    p.add_argument("--optimizer", choices=["adam", "adamw", "sgd"], default="adam")
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--momentum", type=float, default=0.9)
    p.add_argument("--eps", type=float, default=1e-8)
    p.add_argument("--weight-decay", type=float, default=1e-5)
    p.add_argument("--max-norm", type=float, default=1.0, help="clip_grad_norm_ threshold (0: no clipping)")
    p.add_argument("--warmup-steps", type=int, default=0)
    p.add_argument("--plateau-patience", type=int, default=2)
    p.add_argument("--patience", type=int, default=5, help="early stopping patience (epochs)")
    p.add_argument("--amp-dtype", choices=["none", "float16", "bfloat16"], default="none")
    p.add_argument("--init-scale", type=float, default=2.0**16)
    p.add_argument("--growth-interval", type=int, default=2000)
    p.add_argument("--growth-factor", type=float, default=2.0)
    p.add_argument("--no-scaler", action="store_true", help="float16 autocast without a GradScaler")
    p.add_argument("--stateful", action="store_true", help="carry the state across consecutive windows")
    p.add_argument("--no-detach", action="store_true", help="detach the carried state only on errors (sample 000)")
    p.add_argument("--retain-graph", action="store_true")
    p.add_argument("--init-gain", type=float, default=0.0, help="xavier/orthogonal gain for all weights (sample 004 uses 0.001); 0: PyTorch defaults")
    p.add_argument("--amp-despite-config", action="store_true", help="config says mixed precision off, the code enables it anyway (sample 004)")
    p.add_argument("--skip-update-on-inf", action="store_true", help="`continue` on a non-finite norm before scaler.update(), shrinking the scale by hand (sample 002)")
    p.add_argument("--clip-before-unscale", action="store_true", help="clip the still-scaled gradients (sample 002)")
    p.add_argument("--input-scale", type=float, default=1.0, help="multiply the raw features (unnormalised inputs)")
    p.add_argument("--target-scale", type=float, default=1.0, help="multiply the targets (sample 004's tiny targets)")
    p.add_argument("--nan-at-step", type=int, default=-1, help="inject a NaN into the batch of this step")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--train-seed", type=int, default=1, help="noise seed of the training set")
    p.add_argument("--test-seed", type=int, default=2, help="noise seed of the test set")
    p.add_argument("--device", default="cpu")
    p.add_argument("--quiet", action="store_true")
    return p.parse_args(argv)


# ----------------------------------------------------------------------------------- data ----
def make_series(n_steps: int, features: int, seed: int, input_scale: float, target_scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """A multivariate signal (sinusoids of several periods + noise) and a target that depends
    on the recent past of the inputs (a leaky integrator of two features plus a product term):
    a task a recurrent model with a window of a few dozen steps learns well."""
    g = torch.Generator().manual_seed(seed)
    t = torch.arange(n_steps, dtype=torch.float32)
    periods = torch.tensor([17.0, 29.0, 47.0, 83.0, 131.0, 7.0, 11.0, 13.0])[:features]
    phase = torch.rand(features, generator=g) * 6.283
    x = torch.sin(t[:, None] * 6.283 / periods[None, :] + phase[None, :]) + 0.2 * torch.randn(n_steps, features, generator=g)
    y = torch.zeros(n_steps)
    acc = 0.0
    for i in range(n_steps):
        acc = 0.9 * acc + 0.1 * float(x[i, 0] + 0.5 * x[i, 1 % features])
        y[i] = acc + 0.3 * float(x[i, 2 % features] * x[i, 3 % features])
    y = y + 0.05 * torch.randn(n_steps, generator=g)
    return x * input_scale, (y * target_scale)[:, None]


def windows(x: torch.Tensor, y: torch.Tensor, lookback: int, count: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Consecutive, non-overlapping windows (so a stateful model can carry its state)."""
    n = min(count, (len(x) - 1) // lookback)
    xs = torch.stack([x[i * lookback:(i + 1) * lookback] for i in range(n)])
    ys = torch.stack([y[i * lookback:(i + 1) * lookback] for i in range(n)])
    return xs, ys


# ---------------------------------------------------------------------------------- model ----
class SeqModel(nn.Module):
    def __init__(self, kind: str, features: int, hidden: int, layers: int, dropout: float) -> None:
        super().__init__()
        self.kind = kind
        self.drop = nn.Dropout(dropout)
        if kind in ("lstm", "gru", "rnn"):
            cls = {"lstm": nn.LSTM, "gru": nn.GRU, "rnn": nn.RNN}[kind]
            self.body = cls(features, hidden, num_layers=layers, batch_first=True, dropout=dropout if layers > 1 else 0.0)
        elif kind == "mlp":
            self.body = nn.Sequential(nn.Linear(features * 8, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU())
        else:
            self.body = nn.Sequential(nn.Conv1d(features, hidden, 8), nn.ReLU(), nn.Conv1d(hidden, hidden, 1), nn.ReLU())
        self.head = nn.Linear(hidden, 1)

    def forward(self, x: torch.Tensor, state: object = None) -> tuple[torch.Tensor, object]:
        if self.kind in ("lstm", "gru", "rnn"):
            out, state = self.body(self.drop(x), state)
            return self.head(self.drop(out)), state
        # feed-forward models see the last 8 steps of each position (causal, zero-padded)
        pad = nn.functional.pad(x, (0, 0, 7, 0))
        if self.kind == "mlp":
            ctx = pad.unfold(1, 8, 1).flatten(2)  # (B, T, F*8)
            return self.head(self.drop(self.body(ctx))), None
        out = self.body(pad.transpose(1, 2)).transpose(1, 2)
        return self.head(self.drop(out)), None


def init_weights(model: nn.Module, gain: float) -> None:
    """Sample 004's initialisation: xavier for input/output weights, orthogonal for the
    recurrent ones, all with ``gain`` (sample 004 uses 0.001)."""
    for name, p in model.named_parameters():
        if p.dim() < 2:
            nn.init.zeros_(p)
        elif "weight_hh" in name:
            nn.init.orthogonal_(p, gain=gain)
        else:
            nn.init.xavier_uniform_(p, gain=gain)


def detach_state(state: object) -> object:
    if state is None:
        return None
    if isinstance(state, tuple):
        return tuple(s.detach() for s in state)
    return state.detach()  # type: ignore[union-attr]


def checksum(model: nn.Module) -> str:
    h = hashlib.sha256()
    for p in model.parameters():
        h.update(p.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


# ---------------------------------------------------------------------------------- train ----
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.manual_seed(args.seed)
    dev = torch.device(args.device)
    length = args.lookback * (args.train_windows + 1)
    x_tr, y_tr = make_series(length, args.features, args.train_seed, args.input_scale, args.target_scale)
    x_te, y_te = make_series(args.lookback * (args.test_windows + 1), args.features, args.test_seed, args.input_scale, args.target_scale)
    xw, yw = windows(x_tr, y_tr, args.lookback, args.train_windows)
    xv, yv = windows(x_te, y_te, args.lookback, args.test_windows)
    xw, yw, xv, yv = xw.to(dev), yw.to(dev), xv.to(dev), yv.to(dev)
    model = SeqModel(args.model, args.features, args.hidden_size, args.num_layers, args.dropout).to(dev)
    if args.init_gain > 0:
        init_weights(model, args.init_gain)
    params = model.parameters()
    if args.optimizer == "sgd":
        opt: torch.optim.Optimizer = torch.optim.SGD(params, lr=args.lr, momentum=args.momentum, weight_decay=args.weight_decay)
    elif args.optimizer == "adamw":
        opt = torch.optim.AdamW(params, lr=args.lr, eps=args.eps, weight_decay=args.weight_decay)
    else:
        opt = torch.optim.Adam(params, lr=args.lr, eps=args.eps, weight_decay=args.weight_decay)
    plateau = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, factor=0.5, patience=args.plateau_patience, min_lr=args.lr / 64)
    config_mixed_precision = args.amp_dtype != "none"
    use_amp = config_mixed_precision or args.amp_despite_config
    amp_dtype = {"none": torch.float16, "float16": torch.float16, "bfloat16": torch.bfloat16}[args.amp_dtype]
    scaler = None
    if use_amp and amp_dtype == torch.float16 and not args.no_scaler:
        scaler = torch.amp.GradScaler(dev.type, init_scale=args.init_scale, growth_interval=args.growth_interval,
                                      growth_factor=args.growth_factor)
    mse = nn.MSELoss()
    step = 0
    best = (math.inf, None)
    bad_epochs = 0
    t0 = time.perf_counter()
    state: object = None
    train_loss = math.nan
    val_loss = math.nan
    stop = False
    for epoch in range(args.epochs):
        model.train()
        if args.stateful:
            # B parallel streams of consecutive windows: row i of batch k continues row i of
            # batch k-1, so a carried state belongs to the same stream (the TBPTT layout)
            streams = len(xw) // args.batch_size
            batches = [torch.arange(args.batch_size) * streams + k for k in range(streams)]
            state = None
        else:
            perm = torch.randperm(len(xw))
            batches = [perm[b:b + args.batch_size] for b in range(0, len(perm) - args.batch_size + 1, args.batch_size)]
        losses = []
        for idx in batches:
            xb, yb = xw[idx], yw[idx]
            if step == args.nan_at_step:
                xb = xb.clone()
                xb[0, 0, 0] = float("nan")
            if args.warmup_steps and step < args.warmup_steps:
                for g in opt.param_groups:
                    g["lr"] = args.lr * (step + 1) / args.warmup_steps
            carried = state if args.stateful else None
            with torch.autocast(dev.type, dtype=amp_dtype, enabled=use_amp):
                out, new_state = model(xb, carried)
                loss = mse(out.float(), yb)
            if not torch.isfinite(loss):
                if args.stateful and args.no_detach:
                    state = detach_state(new_state)  # sample 000: detached only on errors
                opt.zero_grad()
                step += 1
                continue
            opt.zero_grad()
            try:
                if scaler is not None:
                    scaler.scale(loss).backward(retain_graph=args.retain_graph)
                    if not args.clip_before_unscale:
                        scaler.unscale_(opt)
                    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), args.max_norm) if args.max_norm > 0 else None
                    if args.skip_update_on_inf and norm is not None and not torch.isfinite(norm):
                        scaler._scale = torch.clamp(scaler._scale * 0.1, min=1.0)  # sample 002's hand-made "fix"
                        step += 1
                        continue
                    scaler.step(opt)
                    scaler.update()
                else:
                    loss.backward(retain_graph=args.retain_graph)
                    if args.max_norm > 0:
                        torch.nn.utils.clip_grad_norm_(model.parameters(), args.max_norm)
                    opt.step()
            except RuntimeError:
                if args.stateful and args.no_detach:
                    state = detach_state(new_state)
                raise
            state = new_state if (args.stateful and args.no_detach) else detach_state(new_state)
            losses.append(float(loss.detach()))
            step += 1
            if args.max_steps and step >= args.max_steps:
                stop = True
                break
        model.eval()
        with torch.no_grad():
            out, _ = model(xv)
            val_loss = float(mse(out.float(), yv))
        train_loss = float(sum(losses) / len(losses)) if losses else math.nan
        if not args.quiet:
            print(f"epoch {epoch + 1}: train {train_loss:.5g}  val {val_loss:.5g}  lr {opt.param_groups[0]['lr']:.3g}", file=sys.stderr)
        plateau.step(val_loss if math.isfinite(val_loss) else math.inf)
        if val_loss < best[0]:
            best = (val_loss, {k: v.detach().clone() for k, v in model.state_dict().items()})
            bad_epochs = 0
        else:
            bad_epochs += 1
            if bad_epochs >= args.patience:
                break
        if stop:
            break
    if best[1] is not None:
        model.load_state_dict(best[1])
    print(json.dumps({"final_train_loss": train_loss, "final_val_loss": val_loss, "best_val_loss": best[0], "steps": step,
                      "seconds": round(time.perf_counter() - t0, 3), "checksum": checksum(model)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
