"""Independent measurement behind the 001 golden: the gradient horizon of the sample's
recurrent model at initialisation, computed with ``torch.autograd.functional.jacobian``
(no gradprobe involved).

    python sample_runs/measure_horizon.py [--lookback 400] [--hidden-size 10] [--seed 0]

Prints, for the model and window the sample uses, ||d h_T / d x_{T-1-k}|| (Frobenius, over a
batch of windows) relative to its peak, and the first k where it falls below 1e-3.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import seqloop  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--lookback", type=int, default=400)
    ap.add_argument("--hidden-size", type=int, default=10)
    ap.add_argument("--model", default="lstm")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--windows", type=int, default=4)
    args = ap.parse_args(argv)
    torch.manual_seed(args.seed)
    model = seqloop.SeqModel(args.model, 5, args.hidden_size, 1, 0.0).eval()
    x, _ = seqloop.make_series(args.lookback * (args.windows + 1), 5, 1, 1.0, 1.0)
    xw = torch.stack([x[i * args.lookback:(i + 1) * args.lookback] for i in range(args.windows)])

    def last_hidden(inp: torch.Tensor) -> torch.Tensor:
        out, _ = model.body(inp)
        return out[:, -1]

    J = torch.autograd.functional.jacobian(last_hidden, xw)  # (B, H, B, T, F)
    per_t = torch.stack([J[b, :, b] for b in range(args.windows)]).pow(2).sum(dim=(0, 1, 3)).sqrt()  # (T,)
    profile = per_t.flip(0)  # k = steps back from the last output
    rel = profile / profile.max()
    below = (rel < 1e-3).nonzero()
    horizon = int(below[0]) if len(below) else args.lookback
    print(json.dumps({"lookback": args.lookback, "hidden_size": args.hidden_size, "horizon_1e-3": horizon,
                      "relative_gradient_at": {str(k): float(rel[k]) for k in (0, 10, 20, 40, 80, 160, args.lookback - 1) if k < args.lookback}}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
