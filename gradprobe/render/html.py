"""Self-contained HTML report: one file, no network, interactive plots (plotly).

The page holds the findings (root cause and fix first) and plots of the key series (gradient
norm with max_norm, loss and validation loss, GradScaler scale and skipped steps, state age,
per-layer gradient norms, gradient-through-time profiles), each marking where every finding
starts. plotly.js is embedded once. Every string that comes from the log (paths, module and
layer names, messages) is HTML-escaped, and the figure JSON is embedded with ``<``, ``>`` and
``&`` written as unicode escapes, so a log cannot inject markup or script.
"""

from __future__ import annotations

import html
import json
from typing import Any

import numpy as np

from gradprobe.render._common import ICON, fmt_value, header_lines, recommendation_line, severity_note
from gradprobe.report import Report

MAX_POINTS = 4000
COLORS = {"error": "#c0392b", "warning": "#d68910", "info": "#2874a6"}

CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:2em auto;max-width:1100px;color:#222;padding:0 1em}
h1{font-size:1.4em} h2{font-size:1.15em;margin-top:1.6em}
.meta{color:#555;font-size:.9em}
.finding{border-left:5px solid #999;padding:.4em 1em;margin:1em 0;background:#fafafa}
.finding.error{border-color:#c0392b}.finding.warning{border-color:#d68910}.finding.info{border-color:#2874a6}
.finding h3{margin:.2em 0;font-size:1.05em}
.sev{font-weight:bold;text-transform:uppercase}
pre{background:#f0f3f4;padding:.6em;overflow-x:auto}
table{border-collapse:collapse;font-size:.9em} td,th{border:1px solid #ddd;padding:2px 8px;text-align:left}
.skipped{color:#777;font-size:.85em}
.plot{width:100%;height:340px}
"""


def _e(s: Any) -> str:
    return html.escape(str(s), quote=True)


def _safe_json(obj: Any) -> str:
    text = json.dumps(obj, allow_nan=False, default=str)
    return text.replace("&", "\\u0026").replace("<", "\\u003c").replace(">", "\\u003e")


def _clean(values: np.ndarray) -> list[Any]:
    out: list[Any] = []
    for v in values.tolist():
        out.append(v if isinstance(v, (int, float)) and np.isfinite(v) else None)
    return out


def _downsample(x: np.ndarray, *ys: np.ndarray) -> tuple[np.ndarray, ...]:
    n = len(x)
    if n <= MAX_POINTS:
        return (x, *ys)
    idx = np.unique(np.linspace(0, n - 1, MAX_POINTS).astype(int))
    # keep every non-finite point: they are what the reader is looking for
    for y in ys:
        bad = np.flatnonzero(~np.isfinite(y.astype(np.float64)))
        if bad.size:
            idx = np.union1d(idx, bad[:MAX_POINTS])
    return (x[idx], *(y[idx] for y in ys))


def _markers(report: Report) -> list[dict[str, Any]]:
    shapes = []
    for f in report.findings:
        if f.first_step is None or f.severity == "info":
            continue
        shapes.append({"step": int(f.first_step), "label": f"{f.code} {f.rule}", "color": COLORS[f.severity]})
    return shapes


def _figure(title: str, traces: list[dict[str, Any]], markers: list[dict[str, Any]], *, ylog: bool = False,
            xtitle: str = "step", y2: bool = False) -> dict[str, Any]:
    layout: dict[str, Any] = {
        "title": {"text": title, "font": {"size": 14}},
        "margin": {"l": 60, "r": 60 if y2 else 20, "t": 40, "b": 40},
        "xaxis": {"title": {"text": xtitle}},
        "yaxis": {"type": "log" if ylog else "linear"},
        "legend": {"orientation": "h", "y": -0.2},
        "shapes": [],
        "annotations": [],
    }
    if y2:
        layout["yaxis2"] = {"overlaying": "y", "side": "right"}
    for m in markers if xtitle == "step" else []:
        layout["shapes"].append({"type": "line", "x0": m["step"], "x1": m["step"], "yref": "paper", "y0": 0, "y1": 1,
                                 "line": {"color": m["color"], "dash": "dot", "width": 1.5}})
        layout["annotations"].append({"x": m["step"], "yref": "paper", "y": 1.0, "text": m["label"], "showarrow": False,
                                      "font": {"size": 10, "color": m["color"]}, "textangle": -90, "xanchor": "right", "yanchor": "top"})
    return {"data": traces, "layout": layout}


def _line(x: np.ndarray, y: np.ndarray, name: str, **kw: Any) -> dict[str, Any]:
    xs, ys = _downsample(x, y.astype(np.float64))
    mode = kw.pop("mode", "lines" if len(xs) > 60 else "lines+markers")  # a lone point still shows
    return {"type": "scattergl" if len(xs) > 2000 else "scatter", "mode": mode, "x": xs.tolist(),
            "y": _clean(ys), "name": name, **kw}


def figures(report: Report) -> list[dict[str, Any]]:
    log = report.runlog
    if log is None or log.steps.empty:
        return []
    st = log.steps
    x = st["step"].to_numpy()
    marks = _markers(report)
    figs = []
    gn = st["grad_norm"].to_numpy(dtype=np.float64)
    if np.isfinite(gn).any() or (~np.isnan(gn)).any():
        traces = [_line(x, gn, "pre-clip gradient norm")]
        sg = st["step_grad_norm"].to_numpy(dtype=np.float64)
        if np.isfinite(sg).any() and not np.allclose(sg[np.isfinite(sg)], gn[np.isfinite(sg)], equal_nan=True):
            traces.append(_line(x, sg, "after clipping"))
        mn = st["clip_max_norm"].to_numpy(dtype=np.float64)
        if np.isfinite(mn).any():
            traces.append(_line(x, mn, "max_norm", line={"dash": "dash"}))
        ln = st["local_grad_norm"].to_numpy(dtype=np.float64) if "local_grad_norm" in st else np.array([])
        if ln.size and np.isfinite(ln).any():
            traces.append(_line(x, ln, "local (before all-reduce)"))
        figs.append(_figure("Gradient norm vs max_norm", traces, marks, ylog=True))
    loss = st["loss"].to_numpy(dtype=np.float64)
    if not np.isfinite(loss).any():
        loss = st["loss_fn"].to_numpy(dtype=np.float64)
    traces = []
    if np.isfinite(loss).any():
        traces.append(_line(x, loss, "training loss"))
    ev = st["eval_loss"].to_numpy(dtype=np.float64)
    if np.isfinite(ev).any():
        m = np.isfinite(ev)
        traces.append(_line(x[m], ev[m], "eval loss (no-grad loss functions)", mode="lines+markers"))
    if not log.scalars.empty:
        for name in sorted(set(log.scalars["name"].astype(str))):
            if "loss" in name.lower():
                s = log.scalar(name)
                traces.append(_line(s.index.to_numpy(), s.to_numpy(dtype=np.float64), name, mode="lines+markers"))
    if traces:
        figs.append(_figure("Loss", traces, marks, ylog=bool(np.nanmin(np.where(np.isfinite(loss), loss, np.nan)) > 0) if np.isfinite(loss).any() else False))
    sc = st["scale"].to_numpy(dtype=np.float64)
    if np.isfinite(sc).any():
        sk = st["skipped"].to_numpy(dtype=bool)
        traces = [_line(x, sc, "GradScaler scale")]
        if sk.any():
            traces.append({"type": "scatter", "mode": "markers", "x": x[sk].tolist(), "y": _clean(sc[sk]), "name": "skipped step",
                           "marker": {"color": "#c0392b", "symbol": "x", "size": 7}})
        figs.append(_figure("GradScaler scale and skipped steps", traces, marks, ylog=True))
    age = st["state_age"].to_numpy(dtype=np.float64)
    alive = st["graphs_alive"].to_numpy(dtype=np.float64)
    if age.any() or alive.any():
        traces = [_line(x, age, "state age (steps)"), _line(x, alive, "graphs alive (2+ steps old)")]
        bt = st["backward_time"].to_numpy(dtype=np.float64)
        if np.isfinite(bt).any():
            traces.append(_line(x, bt, "backward time (s)", yaxis="y2"))
        figs.append(_figure("State age: how far back a carried graph reaches", traces, marks, y2=True))
    lg = log.layer_grad
    if not lg.empty:
        names = list(lg.columns)
        arr = lg.to_numpy(dtype=np.float64, copy=True)
        arr[arr < 0] = np.nan  # not measured
        steps = lg.index.to_numpy()
        if len(names) > 24:  # keep the layers with the largest and smallest typical norms
            med = np.nanmedian(np.where(np.isfinite(arr), arr, np.nan), axis=0)
            order = np.argsort(np.nan_to_num(med, nan=0.0))
            keep = sorted(set(order[:8].tolist() + order[-16:].tolist()))
            names = [names[i] for i in keep]
            arr = arr[:, keep]
        traces = [_line(steps, arr[:, i], n) for i, n in enumerate(names)]
        figs.append(_figure("Per-layer gradient norms (before clipping)", traces, marks, ylog=True))
    prof = log.samples_of("bptt", "profile")
    if not prof.empty:
        traces = []
        for target, g in prof.groupby("target"):
            last = g[g["step"] == g["step"].max()].sort_values("index")
            traces.append(_line(last["index"].to_numpy(), last["value"].to_numpy(dtype=np.float64),
                                f"{target} (step {int(last['step'].iloc[0])})"))
        figs.append(_figure("Gradient through time: |d(v·h_T)/dx_t| by steps back", traces, [], ylog=True, xtitle="steps back from the last output"))
    return figs


def render(report: Report, **_: Any) -> str:
    from plotly.offline import get_plotlyjs

    head = header_lines(report)
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{_e(head[0])}</title>",
        f"<style>{CSS}</style>",
        f"<script>{get_plotlyjs()}</script>",
        "</head><body>",
        f"<h1>{_e(head[0])}</h1>",
    ]
    for line in head[1:]:
        parts.append(f'<div class="meta">{_e(line.strip())}</div>')
    parts.append("<h2>Findings</h2>")
    if not report.findings and report.source.get("steps") == 0:  # nothing was judged: never "healthy"
        parts.append("<p>No training step was recorded: there is nothing to judge.</p><ul>")
        parts.extend(f"<li>{_e(line)}</li>" for line in (report.source.get("no_step") or {}).get("observed") or [])
        parts.append("</ul>")
    elif not report.findings:
        parts.append("<p>No findings: nothing in this run looks unhealthy to the rules that could run.</p>")
    for f in report.findings:
        where = f" from step {f.first_step}" if f.first_step is not None else ""
        layer = f" in <code>{_e(f.layer)}</code>" if f.layer else ""
        parts.append(f'<div class="finding {_e(f.severity)}">')
        parts.append(f'<h3>{ICON[f.severity]} <span class="sev">{_e(f.severity)}</span> {_e(f.code)} <code>{_e(f.rule)}</code>: {_e(f.title)}</h3>')
        parts.append(f'<div class="meta">confidence {f.confidence:.2f}{_e(where)}{layer}</div>')
        parts.append(f"<p>{_e(f.message)}</p>")
        note = severity_note(f)
        if note:
            parts.append(f"<p class=\"meta\">({_e(note)})</p>")
        if f.caused_by:
            parts.append("<p>Caused by: " + ", ".join(f"<code>{_e(c)}</code>" for c in f.caused_by) + "</p>")
        if f.recommendations:
            parts.append("<p><b>Fix</b></p><ul>")
            for r in f.recommendations:
                parts.append(f"<li>{_e(recommendation_line(r))}")
                if r.kind == "code" and r.snippet:
                    parts.append(f"<pre>{_e(r.snippet)}</pre>")
                parts.append("</li>")
            parts.append("</ul>")
        if f.evidence:
            parts.append("<table><tr><th>evidence</th><th>value</th></tr>")
            for k, v in f.evidence.items():
                parts.append(f"<tr><td>{_e(k)}</td><td>{_e(fmt_value(v))}</td></tr>")
            parts.append("</table>")
        parts.append("</div>")
    if report.suggested_hyperparameters:
        parts.append("<h2>Suggested hyperparameters</h2><ul>")
        for k, v in report.suggested_hyperparameters.items():
            parts.append(f"<li><code>{_e(k)}</code> = {_e(v)}</li>")
        parts.append("</ul>")
    figs = figures(report)
    if figs:
        parts.append("<h2>Signals</h2>")
        for i, fig in enumerate(figs):
            parts.append(f'<div class="plot" id="gp-plot-{i}"></div>')
        parts.append("<script>")
        parts.append(f"var gpFigures = {_safe_json(figs)};")
        parts.append('gpFigures.forEach(function(f,i){Plotly.newPlot("gp-plot-"+i, f.data, f.layout, {responsive:true, displaylogo:false});});')
        parts.append("</script>")
    if report.skipped_rules:
        parts.append(f'<h2>Skipped rules</h2><ul class="skipped">')
        for s in report.skipped_rules:
            parts.append(f"<li>{_e(s.code)} <code>{_e(s.rule)}</code>: {_e(s.reason)}</li>")
        parts.append("</ul>")
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"
