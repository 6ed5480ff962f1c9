"""Self-contained HTML report: one file, no network, interactive plots (uPlot).

The page holds the findings (root cause and fix first) and one plot per group of signals the
run has (gradient norm with max_norm, loss and validation loss, GradScaler scale and skipped
steps, state age, per-layer gradient norms, gradient-through-time profiles). Each plot over
steps marks where every error and warning starts: one marker per finding, their labels
stacked apart where they would collide. A series of a few points is drawn as points, not a
line. uPlot (vendored, see ``vendor/README.md``) is inlined once: 51 KB, where plotly.js was
4.8 MB. Every string that comes from the log (paths, module and layer names, messages) is
HTML-escaped, and the plot data is embedded with ``<``, ``>`` and ``&`` written as unicode
escapes, so a log cannot inject markup or script.
"""

from __future__ import annotations

import html
import json
import os
from typing import Any

import numpy as np

from gradprobe.render._common import (
    ICON,
    evidence_items,
    fmt_number,
    header_lines,
    recommendation_line,
    severity_note,
    verdict_lines,
    where_text,
)
from gradprobe.report import Report
from gradprobe.runlog.schema import eval_stream_name

#: x values per plot: a plot is 1000 pixels wide, and 2000 points (every non-finite point, and
#: each series' extremes, kept on top) keep a 100k-step run's report near 1 MB
MAX_POINTS = 2000
#: the per-layer plot has up to 24 series: fewer points each
MAX_LAYER_POINTS = 600
#: layers shown in the per-layer plot (the largest and smallest typical norms)
MAX_LAYERS = 24
#: a series with this many finite points or fewer is drawn as points (two validation losses
#: joined by a line suggest a trend that was never measured)
SHORT_SERIES = 30
COLORS = {"error": "#c0392b", "warning": "#b9770e", "info": "#2874a6"}
PALETTE = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf")

VENDOR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "vendor")
#: the vendored uPlot files and their sha256 (npm package uplot@1.6.32, MIT; vendor/README.md)
VENDORED = {
    "uPlot.iife.min.js": "19c8d4c6ad88929a79f4ae49d6f7161566dfd0ba3d15cc495e974f787eb78f1f",
    "uPlot.min.css": "df630c6a8d6f8eeaff264b50f73ce5b114f646ffd9a0bb74f049b0a00135fa04",
    "uPlot.LICENSE": "8f989229699b4fe2f1a0432d0e9edc338a8a911e250e2d1b01ecd770a5f5b1bd",
}

CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:2em auto;max-width:1100px;color:#222;padding:0 1em}
h1{font-size:1.4em;overflow-wrap:anywhere} h2{font-size:1.15em;margin-top:1.6em} h3.plot-title{font-size:1em;margin:1.4em 0 .3em}
.meta{color:#555;font-size:.9em;overflow-wrap:anywhere}
.verdict{font-weight:bold}.verdict.unjudged{color:#9a6700}.verdict.healthy{color:#1e7d32}
.finding{border-left:5px solid #999;padding:.4em 1em;margin:1em 0;background:#fafafa}
.finding.error{border-color:#c0392b}.finding.warning{border-color:#b9770e}.finding.info{border-color:#2874a6}
.finding h3{margin:.2em 0;font-size:1.05em}
.sev{font-weight:bold;text-transform:uppercase}
.nosuggest{color:#9a6700}
pre{background:#f0f3f4;padding:.6em;overflow-x:auto;white-space:pre}
table.evidence{border-collapse:collapse;font-size:.9em} table.evidence td,table.evidence th{border:1px solid #ddd;padding:2px 8px;text-align:left;vertical-align:top}
.skipped{color:#777;font-size:.85em}
.gp-plot{width:100%;position:relative}
.gp-marker{position:absolute;top:0;bottom:0;width:0;border-left:1.5px dashed;pointer-events:none}
.gp-marker-label{position:absolute;font:11px system-ui,sans-serif;padding:0 3px;background:rgba(255,255,255,.85);white-space:nowrap;pointer-events:auto;cursor:default;border:1px solid;border-radius:2px;line-height:13px}
"""

#: draws every plot, then lays the finding markers over each plot over steps (again after a
#: zoom or a resize). A marker's label goes to the highest lane where it does not touch the
#: label before it, so labels at the same or nearby steps never print over each other.
SCRIPT = """
(function(){
  var LANE = 16, GAP = 4;
  function num(v) {
    if (v == null || !isFinite(v)) return v == null ? '--' : String(v);
    var a = Math.abs(v);
    if (a === 0) return '0';
    if (a >= 1e5 || a < 1e-3) return v.toExponential(a.toExponential(2).indexOf('.00e') > 0 ? 0 : 2);
    return String(+v.toPrecision(4));
  }
  function ticks(u, splits) { return splits.map(function(v){ return v == null ? null : num(v); }); }
  function placeMarkers(u, marks) {
    var over = u.over;
    Array.prototype.slice.call(over.querySelectorAll('.gp-marker,.gp-marker-label')).forEach(function(n){ n.remove(); });
    var w = over.clientWidth, lanes = [];
    var shown = marks.map(function(m){ return {m: m, x: u.valToPos(m.step, 'x')}; })
                     .filter(function(p){ return isFinite(p.x) && p.x >= -0.5 && p.x <= w + 0.5; })
                     .sort(function(a, b){ return a.x - b.x; });
    shown.forEach(function(p){
      var line = document.createElement('div');
      line.className = 'gp-marker';
      line.style.left = p.x + 'px';
      line.style.borderColor = p.m.color;
      over.appendChild(line);
      var label = document.createElement('div');
      label.className = 'gp-marker-label';
      label.textContent = p.m.code;
      label.title = p.m.label;
      label.style.color = p.m.color;
      label.style.borderColor = p.m.color;
      over.appendChild(label);
      var lw = label.offsetWidth, left = Math.max(0, Math.min(p.x + 2, w - lw));
      var lane = 0;
      while (lane < lanes.length && lanes[lane] + GAP > left) lane++;
      lanes[lane] = left + lw;
      label.style.left = left + 'px';
      label.style.top = (2 + lane * LANE) + 'px';
    });
  }
  gpFigures.forEach(function(f, i){
    var el = document.getElementById('gp-plot-' + i);
    var series = [{label: f.xlabel}];
    f.series.forEach(function(s){
      var o = {label: s.label, stroke: s.color, width: 1.5, scale: s.scale || 'y', spanGaps: true,
               value: function(u, v){ return num(v); }};
      if (s.dash) o.dash = [6, 4];
      if (s.points) { o.paths = function(){ return null; }; o.points = {show: true, size: 7, stroke: s.color, fill: s.color}; }
      else o.points = {show: false};
      series.push(o);
    });
    var scales = {x: {time: false}, y: {distr: f.ylog ? 3 : 1}};
    var axes = [{label: f.xlabel}, {label: f.ylabel, size: 70, values: ticks}];
    if (f.y2label) { scales.y2 = {distr: 1}; axes.push({scale: 'y2', side: 1, label: f.y2label, size: 70, values: ticks, grid: {show: false}}); }
    var marks = f.markers ? gpMarkers : [];
    var opts = {width: Math.max(300, el.clientWidth), height: 300, series: series, scales: scales, axes: axes,
                legend: {live: true}, cursor: {drag: {x: true, y: false}},
                hooks: {ready: [function(u){ placeMarkers(u, marks); }], setScale: [function(u, key){ if (key === 'x') placeMarkers(u, marks); }],
                        setSize: [function(u){ placeMarkers(u, marks); }]}};
    var u = new uPlot(opts, [f.x].concat(f.series.map(function(s){ return s.y; })), el);
    window.addEventListener('resize', function(){ u.setSize({width: Math.max(300, el.clientWidth), height: 300}); });
  });
})();
"""


def _e(s: Any) -> str:
    return html.escape(str(s), quote=True)


def _safe_json(obj: Any) -> str:
    text = json.dumps(obj, allow_nan=False, default=str, separators=(",", ":"))
    return text.replace("&", "\\u0026").replace("<", "\\u003c").replace(">", "\\u003e")


def _vendored(name: str) -> str:
    with open(os.path.join(VENDOR, name), encoding="utf-8") as f:
        return f.read()


def _round(v: float) -> float:
    """4 significant digits: what a plot can show, at a third of the characters. A value
    within rounding of the largest double keeps its digits (rounding it up overflows to Inf,
    which JSON cannot carry)."""
    r = float(f"{v:.4g}")
    return r if np.isfinite(r) else v


def _series_values(y: np.ndarray, log: bool) -> list[Any]:
    """JSON values: finite numbers (rounded), null where there is none (NaN, Inf, or <= 0 on
    a log axis)."""
    out: list[Any] = []
    for v in y.tolist():
        ok = v is not None and np.isfinite(v) and (v > 0 or not log)
        out.append(_round(v) if ok else None)
    return out


def _pick(n: int, ys: list[np.ndarray], limit: int) -> np.ndarray:
    """Indices of at most ~``limit`` x values: evenly spaced, plus every non-finite point and
    each series' largest and smallest value (a spike must survive the thinning)."""
    if n <= limit:
        return np.arange(n)
    idx = np.unique(np.linspace(0, n - 1, limit).astype(int))
    extra = []
    for y in ys:
        bad = np.flatnonzero(~np.isfinite(y))
        extra.append(bad[: limit // 4])
        fin = np.where(np.isfinite(y), y, np.nan)
        if np.isfinite(fin).any():
            extra.append(np.array([int(np.nanargmax(fin)), int(np.nanargmin(fin))]))
    return np.union1d(idx, np.concatenate(extra).astype(int)) if extra else idx


def _aligned(parts: list[tuple[np.ndarray, np.ndarray]], limit: int) -> tuple[np.ndarray, list[np.ndarray]]:
    """Series with their own x values on one sorted x (NaN where a series has none)."""
    xs = np.unique(np.concatenate([np.asarray(x, dtype=np.float64) for x, _ in parts])) if parts else np.array([])
    ys = []
    for x, y in parts:
        full = np.full(xs.shape, np.nan)
        pos = np.searchsorted(xs, np.asarray(x, dtype=np.float64))
        full[pos] = np.asarray(y, dtype=np.float64)
        ys.append(full)
    keep = _pick(len(xs), ys, limit)
    return xs[keep], [y[keep] for y in ys]


class _Figure:
    """One plot: series on a shared x, and whether the finding markers go on it."""

    def __init__(self, title: str, ylabel: str, *, ylog: bool = False, xlabel: str = "step", markers: bool = True,
                 limit: int = MAX_POINTS) -> None:
        self.title, self.ylabel, self.ylog, self.xlabel, self.markers, self.limit = title, ylabel, ylog, xlabel, markers, limit
        self.parts: list[tuple[np.ndarray, np.ndarray, dict[str, Any]]] = []
        self.y2label: str | None = None

    def add(self, x: np.ndarray, y: np.ndarray, label: str, **style: Any) -> None:
        self.parts.append((np.asarray(x), np.asarray(y, dtype=np.float64), {"label": label, **style}))

    def to_json(self) -> dict[str, Any]:
        x, ys = _aligned([(x, y) for x, y, _ in self.parts], self.limit)
        series = []
        for i, (y, (_, raw, style)) in enumerate(zip(ys, self.parts)):
            log = self.ylog and style.get("scale", "y") == "y"
            finite = int(np.isfinite(raw).sum())
            series.append({
                "label": style["label"],
                "y": _series_values(y, log),
                "color": style.get("color") or PALETTE[i % len(PALETTE)],
                "dash": bool(style.get("dash")),
                "points": bool(style.get("points")) or finite <= SHORT_SERIES,
                "scale": style.get("scale", "y"),
            })
        return {"title": self.title, "xlabel": self.xlabel, "ylabel": self.ylabel, "ylog": self.ylog,
                "y2label": self.y2label, "markers": self.markers,
                "x": [int(v) if float(v).is_integer() else _round(float(v)) for v in x], "series": series}


def markers(report: Report) -> list[dict[str, Any]]:
    """One marker per error and warning that has a first step (info findings describe the run's
    setup, not an event)."""
    out = []
    for f in report.findings:
        if f.first_step is None or f.severity == "info":
            continue
        out.append({"step": int(f.first_step), "code": f.code, "label": f"{f.code} {f.rule}: {f.title} (step {f.first_step})",
                    "color": COLORS[f.severity]})
    return out


def _has(values: np.ndarray) -> bool:
    """A signal the run has: some value that is a measurement (non-finite values count: a
    NaN gradient norm was measured)."""
    return bool((~np.isnan(values)).any() or np.isinf(values).any())


def _stream_labels(meta: dict[str, Any]) -> dict[str, str]:
    """The recorder's no-grad loss streams named by where the script computed them (the
    outermost frame of each call site: the script's line that called the evaluation)."""
    out: dict[str, str] = {}
    for entry in meta.get("eval_streams") or ():
        if not isinstance(entry, dict) or not isinstance(entry.get("name"), str):
            continue
        site = [s for s in entry.get("site") or () if isinstance(s, str)]
        if site:
            out[entry["name"]] = f"no-grad loss at {os.path.basename(site[-1])}"
    return out


def figures(report: Report) -> list[dict[str, Any]]:
    """The plots of the signals this run has, as the page's JSON."""
    log = report.runlog
    if log is None or log.steps.empty:
        return []
    st = log.steps
    x = st["step"].to_numpy()
    figs: list[_Figure] = []
    gn = st["grad_norm"].to_numpy(dtype=np.float64)
    if _has(gn):
        fig = _Figure("Gradient norm vs max_norm", "norm (log)", ylog=True)
        fig.add(x, gn, "pre-clip gradient norm")
        sg = st["step_grad_norm"].to_numpy(dtype=np.float64)
        fin = np.isfinite(sg)
        if fin.any() and not np.allclose(sg[fin], gn[fin], equal_nan=True):
            fig.add(x, sg, "after clipping")
        mn = st["clip_max_norm"].to_numpy(dtype=np.float64)
        if np.isfinite(mn).any():
            fig.add(x, mn, "max_norm", dash=True, color="#555555")
        if "local_grad_norm" in st:
            ln = st["local_grad_norm"].to_numpy(dtype=np.float64)
            if np.isfinite(ln).any():
                fig.add(x, ln, "local (before all-reduce)")
        figs.append(fig)
    loss = st["loss"].to_numpy(dtype=np.float64)
    if not np.isfinite(loss).any():
        loss = st["loss_fn"].to_numpy(dtype=np.float64)
    parts = []
    if np.isfinite(loss).any():
        parts.append((x, loss, "training loss"))
    ev = st["eval_loss"].to_numpy(dtype=np.float64)
    streams = _stream_labels(log.meta)
    if np.isfinite(ev).any():
        m = np.isfinite(ev)
        parts.append((x[m], ev[m], streams.get(eval_stream_name(0), "eval loss (no-grad loss functions)")))
    if not log.scalars.empty:
        for name in sorted(set(log.scalars["name"].astype(str))):
            if "loss" in name.lower():
                s = log.scalar(name)
                parts.append((s.index.to_numpy(), s.to_numpy(dtype=np.float64), streams.get(name, name)))
    if parts:
        allv = np.concatenate([p[1] for p in parts])
        fin = allv[np.isfinite(allv)]
        ylog = bool(fin.size and fin.min() > 0)
        fig = _Figure("Loss", "loss (log)" if ylog else "loss", ylog=ylog)
        for px, py, name in parts:
            fig.add(px, py, name)
        figs.append(fig)
    sc = st["scale"].to_numpy(dtype=np.float64)
    if np.isfinite(sc).any():
        fig = _Figure("GradScaler scale and skipped steps", "scale (log)", ylog=True)
        fig.add(x, sc, "GradScaler scale")
        sk = st["skipped"].to_numpy(dtype=bool)
        if sk.any():
            fig.add(x[sk], sc[sk], "skipped step", points=True, color=COLORS["error"])
        figs.append(fig)
    age = st["state_age"].to_numpy(dtype=np.float64)
    alive = st["graphs_alive"].to_numpy(dtype=np.float64)
    if np.nan_to_num(age).any() or np.nan_to_num(alive).any():
        fig = _Figure("State age: how far back a carried graph reaches", "steps")
        fig.add(x, age, "state age (steps)")
        fig.add(x, alive, "graphs alive (2+ steps old)")
        bt = st["backward_time"].to_numpy(dtype=np.float64)
        if np.isfinite(bt).any():
            fig.add(x, bt, "backward time (s)", scale="y2")
            fig.y2label = "backward time (s)"
        figs.append(fig)
    lg = log.layer_grad
    if not lg.empty:
        names = list(lg.columns)
        arr = lg.to_numpy(dtype=np.float64, copy=True)
        arr[arr < 0] = np.nan  # not measured
        steps = lg.index.to_numpy()
        if len(names) > MAX_LAYERS:  # keep the layers with the largest and smallest typical norms
            with np.errstate(all="ignore"):
                med = np.nanmedian(np.where(np.isfinite(arr), arr, np.nan), axis=0)
            order = np.argsort(np.nan_to_num(med, nan=0.0))
            keep = sorted(set(order[:8].tolist() + order[-(MAX_LAYERS - 8):].tolist()))
            names = [names[i] for i in keep]
            arr = arr[:, keep]
        fig = _Figure("Per-layer gradient norms (before clipping)", "norm (log)", ylog=True, limit=MAX_LAYER_POINTS)
        for i, n in enumerate(names):
            fig.add(steps, arr[:, i], str(n))
        figs.append(fig)
    prof = log.samples_of("bptt", "profile")
    if not prof.empty:
        fig = _Figure("Gradient through time: |d(v·h_T)/dx_t| by steps back", "sensitivity (log)", ylog=True,
                      xlabel="steps back from the last output", markers=False)
        for target, g in prof.groupby("target"):
            last = g[g["step"] == g["step"].max()].sort_values("index")
            fig.add(last["index"].to_numpy(), last["value"].to_numpy(dtype=np.float64), f"{target} (step {int(last['step'].iloc[0])})")
        figs.append(fig)
    return [f.to_json() for f in figs]


def _finding_html(f: Any) -> list[str]:
    w = where_text(f)
    parts = [f'<div class="finding {_e(f.severity)}">',
             f'<h3>{ICON[f.severity]} <span class="sev">{_e(f.severity)}</span> {_e(f.code)} <code>{_e(f.rule)}</code>: {_e(f.title)}</h3>',
             f'<div class="meta">confidence {f.confidence:.2f}{_e(", " + w) if w else ""}</div>',
             f"<p>{_e(f.message)}</p>"]
    note = severity_note(f)
    if note:
        parts.append(f'<p class="meta">({_e(note)})</p>')
    if f.caused_by:
        parts.append("<p>Caused by: " + ", ".join(f"<code>{_e(c)}</code>" for c in f.caused_by) + "</p>")
    if f.recommendations:
        parts.append("<p><b>Fix</b></p><ul>")
        for r in f.recommendations:
            cls = ' class="nosuggest"' if r.kind == "hyperparameter" and r.suggested is None else ""
            parts.append(f"<li{cls}>{_e(recommendation_line(r))}")
            if r.kind == "code" and r.snippet:
                parts.append(f"<pre><code>{_e(r.snippet.rstrip())}</code></pre>")
            parts.append("</li>")
        parts.append("</ul>")
    items = evidence_items(f)
    if items:
        parts.append('<table class="evidence"><tr><th>evidence</th><th>value</th></tr>')
        parts.extend(f"<tr><td>{_e(label)}</td><td>{_e(value)}</td></tr>" for label, value in items)
        parts.append("</table>")
    parts.append("</div>")
    return parts


def render(report: Report, **_: Any) -> str:
    head = header_lines(report)
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{_e(head[0])}</title>",
        f"<style>{_vendored('uPlot.min.css')}{CSS}</style>",
        "</head><body>",
        f"<h1>{_e(head[0])}</h1>",
    ]
    for line in head[1:]:
        parts.append(f'<div class="meta">{_e(line.strip())}</div>')
    parts.append("<h2>Findings</h2>")
    verdict = verdict_lines(report)
    if verdict:
        kind = "healthy" if verdict[0].startswith("No findings:") else "unjudged"
        parts.append(f'<p class="verdict {kind}">{_e(verdict[0])}</p>')
        parts.extend(f"<p>{_e(line)}</p>" for line in verdict[1:])
        observed = (report.source.get("no_step") or {}).get("observed") or []
        if observed:
            parts.append("<ul>" + "".join(f"<li>{_e(line)}</li>" for line in observed) + "</ul>")
    for f in report.findings:
        parts.extend(_finding_html(f))
    if report.suggested_hyperparameters:
        parts.append("<h2>Suggested hyperparameters</h2><ul>")
        for k, v in report.suggested_hyperparameters.items():
            parts.append(f"<li><code>{_e(k)}</code> = {_e(fmt_number(v))}</li>")
        parts.append("</ul>")
    figs = figures(report)
    if figs:
        parts.append("<h2>Signals</h2>")
        parts.append('<p class="meta">Drag across a plot to zoom in, double-click to zoom out; click a legend entry to hide its series. '
                     "Dashed lines mark where each error and warning starts (hover a label for its title). "
                     "Gaps are steps with no finite value (NaN, Inf).</p>")
        for i, fig in enumerate(figs):
            parts.append(f'<h3 class="plot-title">{_e(fig["title"])}</h3>')
            parts.append(f'<div class="gp-plot" id="gp-plot-{i}"></div>')
        parts.append(f"<script>{_vendored('uPlot.iife.min.js')}</script>")
        parts.append("<script>")
        parts.append(f"var gpFigures = {_safe_json(figs)};")
        parts.append(f"var gpMarkers = {_safe_json(markers(report))};")
        parts.append(SCRIPT)
        parts.append("</script>")
    if report.skipped_rules:
        parts.append('<h2>Skipped rules</h2><ul class="skipped">')
        for s in report.skipped_rules:
            parts.append(f"<li>{_e(s.code)} <code>{_e(s.rule)}</code>: {_e(s.reason)}</li>")
        parts.append("</ul>")
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"
