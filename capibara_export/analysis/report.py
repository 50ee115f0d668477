"""The build report: a self-contained HTML page (tables and inline matplotlib figures) and
a short Markdown summary. Every figure is explained in docs/report.md.
"""

from __future__ import annotations

import base64
import html
import io
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from .model_agreement import DISAGREEMENT_HEADERS, ENTRY_HEADERS, disagreement_rows, entry_rows  # noqa: E402

GiB = 1024 ** 3
_UNITS = ((GiB, "GiB"), (2 ** 20, "MiB"), (2 ** 10, "KiB"), (1, "B"))
REDUNDANCY_FLAG = 1.5   # units whose devices repeat more work than this are flagged with the reason


def byte_unit(values) -> tuple[float, str]:
    """The largest unit in which the biggest of `values` is at least 1 (a tiny model's
    memory shows as 12.3 MiB, not 0.01 GiB)."""
    top = max((float(v) for v in values if v is not None and np.isfinite(v)), default=0.0)
    return next(((d, n) for d, n in _UNITS if top >= d), _UNITS[-1])


def _bytes(n: float) -> str:
    d, name = byte_unit([n])
    return f"{n / d:.3g} {name}"


def _plain_log_ticks(axis) -> None:
    """Plain numbers (0.5, 2, 300) on a log axis instead of 10^x."""
    from matplotlib.ticker import FuncFormatter, LogLocator

    axis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    axis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    axis.set_minor_formatter(FuncFormatter(lambda v, _: ""))


def _png(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
    plt.close(fig)
    return f'<img alt="figure" src="data:image/png;base64,{base64.b64encode(buf.getvalue()).decode()}">'


def _table(headers: list[str], rows: list[list], cls: str = "") -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in row) + "</tr>" for row in rows)
    return f'<table class="{cls}"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


def _ms(s: float | None) -> str:
    return "" if s is None else f"{s * 1e3:.3g}"


def _ok_units(analysis: dict) -> list[tuple[str, dict]]:
    return [(uid, a) for uid, a in analysis["units"].items() if a["status"] == "ok"]


def grid_figure(analysis: dict, entry: str, batch: int) -> str | None:
    """Plan × precision heatmaps of predicted latency and peak memory for one entry and batch."""
    units = [a for a in analysis["units"].values() if a["unit"]["entry"] == entry and a["unit"]["batch"] == batch]
    plans = list(dict.fromkeys(a["unit"]["plan"] for a in units))
    precisions = list(dict.fromkeys(a["unit"]["precision"] for a in units))
    if not plans:
        return None
    lat = np.full((len(plans), len(precisions)), np.nan)
    mem = np.full_like(lat, np.nan)
    for a in units:
        i, j = plans.index(a["unit"]["plan"]), precisions.index(a["unit"]["precision"])
        if a["status"] == "ok":
            lat[i, j] = a["roofline"]["latency_s"] * 1e3
            mem[i, j] = a["memory"]["peak"]
    div, unit = byte_unit(mem.ravel())
    mem /= div
    fig, axes = plt.subplots(1, 2, figsize=(10, 0.5 * len(plans) + 1.6))
    for ax, data, title, fmt in ((axes[0], lat, "predicted latency (ms)", "{:.3g}"),
                                 (axes[1], mem, f"peak memory per device ({unit})", "{:.3g}")):
        masked = np.ma.masked_invalid(data)
        cmap = plt.get_cmap("viridis_r").with_extremes(bad="#dddddd")
        ax.imshow(masked, cmap=cmap, aspect="auto")
        lo, hi = (np.nanmin(data), np.nanmax(data)) if np.isfinite(data).any() else (0.0, 1.0)
        ax.set_xticks(range(len(precisions)), precisions)
        ax.set_yticks(range(len(plans)), plans)
        ax.set_title(f"{entry} b{batch}: {title}", fontsize=10)
        for (i, j), v in np.ndenumerate(data):
            light = np.isnan(v) or (v - lo) / ((hi - lo) or 1.0) < 0.6  # viridis_r is light at the low end
            ax.text(j, i, "invalid" if np.isnan(v) else fmt.format(v), ha="center", va="center", fontsize=8,
                    color="black" if light else "white")
    return _png(fig)


def pareto_figure(analysis: dict, selection: dict, entry: str) -> str | None:
    chosen = {s["unit_id"] for s in selection["selections"] if s["unit_id"]}
    front = {u for s in selection["selections"] for u in s["pareto"]}
    points = [(uid, a) for uid, a in _ok_units(analysis) if a["unit"]["entry"] == entry]
    if not points:
        return None
    div, unit = byte_unit([a["memory"]["peak"] for _, a in points])
    fig, ax = plt.subplots(figsize=(6.5, 4))
    labels = []
    for precision in dict.fromkeys(a["unit"]["precision"] for _, a in points):
        sub = [(uid, a) for uid, a in points if a["unit"]["precision"] == precision]
        ax.scatter([a["memory"]["peak"] / div for _, a in sub], [a["roofline"]["latency_s"] * 1e3 for _, a in sub],
                   label=precision, alpha=0.8)
        for uid, a in sub:
            mark = "★ " if uid in chosen else ("◆ " if uid in front else "")
            labels.append(ax.annotate(mark + a["unit"]["plan"], (a["memory"]["peak"] / div,
                                                                a["roofline"]["latency_s"] * 1e3),
                                      fontsize=7, xytext=(3, 3), textcoords="offset points",
                                      arrowprops={"arrowstyle": "-", "lw": 0.4, "color": "0.6"}))
    ax.set_xlabel(f"peak memory per device ({unit})")
    ax.set_ylabel("predicted latency (ms)")
    ax.set_yscale("log")
    _plain_log_ticks(ax.yaxis)
    ax.set_title(f"{entry}: latency vs memory (◆ Pareto front, ★ selected)", fontsize=10)
    ax.legend(fontsize=8)
    _separate(fig, labels)
    return _png(fig)


def _separate(fig, labels: list, step: float = 9.0, tries: int = 12) -> None:
    """Move each label up (then down) in steps of `step` points until its box overlaps no
    label placed before it. Written by hand: matplotlib has no label placement, and the
    adjustText package would be a dependency for these lines."""
    renderer = fig.canvas.get_renderer()
    placed = []
    for label in labels:
        x0, y0 = label.get_position()
        for k in range(tries + 1):
            dy = step * ((k + 1) // 2) * (1 if k % 2 else -1) if k else 0.0
            label.set_position((x0, y0 + dy))
            box = label.get_window_extent(renderer).expanded(1.02, 1.1)
            if not any(box.overlaps(other) for other in placed):
                break
        placed.append(label.get_window_extent(renderer))


def load_figure(unit: dict, title: str, rows: str = "data") -> str:
    """The per-device communication heatmap, or one line when no device sends anything.
    `rows`: what the rows are (every mesh axis but `model`: "dcn × data" on several slices)."""
    grid = np.array(unit["load_grid"]["comm_bytes"], dtype=float)
    if not grid.size or float(grid.max()) == 0.0:
        return f"<p>{html.escape(title)}: no collective traffic (every device computes on its own data).</p>"
    div, name = byte_unit(grid.ravel())
    grid = grid / div
    fig, ax = plt.subplots(figsize=(0.55 * grid.shape[1] + 1.8, 0.5 * grid.shape[0] + 1.2))
    im = ax.imshow(grid, cmap="magma")
    ax.set_xticks(range(grid.shape[1]))
    ax.set_yticks(range(grid.shape[0]))
    ax.set_xlabel("model")
    ax.set_ylabel(rows)
    ax.set_title(title, fontsize=9)
    for r, c in unit["load_grid"]["hot_devices"]:
        ax.add_patch(plt.Rectangle((c - 0.5, r - 0.5), 1, 1, fill=False, edgecolor="cyan", linewidth=2))
    fig.colorbar(im, ax=ax, label=f"{name} sent per run")
    return _png(fig)


def redundancy_reason(a: dict, devices: int) -> str | None:
    """Why a unit's devices repeat work, when they repeat more than REDUNDANCY_FLAG times."""
    f = a["flops"]
    r = f.get("redundancy")
    if r is None or r <= REDUNDANCY_FLAG:
        return None
    mm = f["per_device_matmul"] * devices / f["global_matmul"] if f.get("global_matmul") else None
    if mm is not None and mm > REDUNDANCY_FLAG:
        return (f"the {devices} devices compute {r:.1f}x the program's FLOPs, matmuls {mm:.1f}x: some dimensions "
                f"are replicated, so devices that hold the same slice repeat its matmuls ({a['plan_description']})")
    return (f"the {devices} devices compute {r:.1f}x the program's FLOPs but the matmuls only "
            f"{'?' if mm is None else f'{mm:.2f}'}x: the repeated work is elementwise (casts, scales, norms) on "
            "operands every device holds whole")


def units_rows(analysis: dict) -> list[list]:
    rows = []
    for uid, a in analysis["units"].items():
        u = a["unit"]
        if a["status"] != "ok":
            rows.append([u["entry"], u["plan"], u["precision"], u["batch"], a["status"], "", "", "", "", "", "", ""])
            continue
        r, f, m = a["roofline"], a["flops"], a["memory"]
        rows.append([u["entry"], u["plan"], u["precision"], u["batch"], "ok", _ms(r["latency_s"]), r["binding"],
                     f"{r['mfu']:.1%}", _bytes(m["peak"]), "yes" if m["fits"] else "no",
                     _bytes(sum(a["collectives"]["bytes_by_axis"].values())),
                     "" if f["redundancy"] is None else f"{f['redundancy']:.2f}"])
    return rows


def _options(options: dict | None) -> str:
    """XLA compile options as `name=value` (capibara_export/compiler_options.py chooses them)."""
    return ", ".join(f"{k}={v!r}" for k, v in sorted(options.items())) if options else "XLA's defaults"


def render_html(analysis: dict, selection: dict) -> str:
    b = analysis["build"]
    entries = list(dict.fromkeys(a["unit"]["entry"] for a in analysis["units"].values()))
    batches = list(dict.fromkeys(a["unit"]["batch"] for a in analysis["units"].values()))
    parts = [f"<h1>capibara-export build {html.escape(b['folder'])}</h1>",
             f"<p>Target {html.escape(b['target'])}, mesh {html.escape(str(b['mesh']['shape']))} of "
             f"{html.escape(b['mesh']['device_kind'])}, model {html.escape(str(b['model']))}, hardware constants "
             f"{html.escape(b['hardware']['name'])} ({html.escape(b['hardware']['source'])}); cost-model "
             f"calibration: {html.escape(b['hardware'].get('calibration', 'none'))}. jax "
             f"{html.escape(b['toolchain']['jax'])}, libtpu {html.escape(b['toolchain']['libtpu'])}; XLA compile "
             f"options {html.escape(_options(b['mesh'].get('compiler_options')))}.</p>",
             "<p>Figures are tagged: <b>compiled</b> (from the executable and its HLO), <b>model</b> "
             "(the roofline and analytic counts), <b>measured</b> (timed; only in benchmark reports). "
             "See docs/report.md.</p>",
             "<h2>Selection</h2>",
             _table(["entry", "batch", "precision", "plan", "why"],
                    [[s["entry"], s["batch"], s["precision"], s["plan"] or "—", s["reason"]]
                     for s in selection["selections"]], "selection")]
    derived = derived_rows(analysis, selection)
    if derived:
        parts += ["<h2>Plans derived from the hotspots</h2>",
                  "<p>Compiled in this build because a unit's hotspots proposed them (docs/plans.md); the "
                  "selection compared them with every other unit on their compiled figures.</p>",
                  _table(["unit", "proposed by", "hotspot", "predicted ms", "outcome"], derived, "derived")]
    parts.append("<h2>Predicted latency and memory per plan × precision (model / compiled)</h2>")
    for entry in entries:
        for batch in batches:
            fig = grid_figure(analysis, entry, batch)
            if fig:
                parts.append(fig)
    parts.append("<h2>Pareto fronts (model latency vs compiled memory)</h2>")
    parts += [f for f in (pareto_figure(analysis, selection, e) for e in entries) if f]
    agreement = analysis.get("model_agreement")
    if agreement:
        parts += ["<h2>The compiler's second opinion (compiled vs model)</h2>",
                  "<p>libtpu's own per-kernel estimates (<code>estimated_cycles</code>) beside the roofline's "
                  "per-kernel prices, on the compute part (collectives carry no compiler estimate); ratio = "
                  "libtpu / roofline. See docs/report.md.</p>",
                  _table(ENTRY_HEADERS, entry_rows(agreement)),
                  f"<p>Units where the two differ by more than {agreement['disagreement_threshold']}x:</p>",
                  _table(DISAGREEMENT_HEADERS, disagreement_rows(agreement))
                  if agreement["disagreements"] else "<p>None.</p>"]
    parts.append("<h2>Per-device communication load of the selected units (compiled)</h2>")
    for s in selection["selections"]:
        if s["unit_id"]:
            unit = analysis["units"][s["unit_id"]]
            lg = unit["load_grid"]
            rows = " × ".join(a for a in analysis["build"]["mesh"]["shape"] if a != "model")
            parts.append(load_figure(unit, f"{s['unit_id']}: imbalance {lg['imbalance']:.2f}, "
                                           f"{len(lg['hot_devices'])} device(s) over {lg['threshold']}x mean", rows))
    parts.append("<h2>Hotspots of the selected units (compiled, by model scope)</h2>")
    for s in selection["selections"]:
        if s["unit_id"]:
            unit = analysis["units"][s["unit_id"]]
            advice = s.get("advice", {}).get("text") or unit["classification"]["reason"]
            parts.append(f"<h3>{html.escape(s['unit_id'])}</h3><p>{html.escape(advice)}</p>")
            parts.append(_table(["scope", "FLOPs share", "bytes share", "collective bytes share"],
                                [[h["scope"], f"{h['flops_share']:.1%}", f"{h['bytes_share']:.1%}",
                                  f"{h['comm_bytes_share']:.1%}"] for h in unit["hotspots"]["scopes"]]))
    parts.append("<h2>All units</h2>")
    parts.append(_table(["entry", "plan", "precision", "batch", "status", "latency ms", "bound", "MFU",
                         "peak/dev", "fits", "collective bytes", "redundancy"], units_rows(analysis), "units"))
    devices = int(np.prod(list(analysis["build"]["mesh"]["shape"].values())))
    repeated = [[uid, f"{a['flops']['redundancy']:.2f}", why] for uid, a in _ok_units(analysis)
                if (why := redundancy_reason(a, devices))]
    parts.append(f"<h2>Units that repeat work (redundancy over {REDUNDANCY_FLAG})</h2>")
    parts.append(_table(["unit", "redundancy", "why"], repeated) if repeated else "<p>None.</p>")
    parts.append("<h2>FLOP cross-check (compiled vs model)</h2>")
    parts.append(_table(["unit", "HLO matmul FLOPs (global)", "analytic FLOPs", "ratio", "cost_analysis per device",
                         "loop-corrected per device"],
                        [[uid, f"{a['flops']['global_matmul'] or 0:.4g}", f"{a['analytic']['flops']:.4g}",
                          f"{a['analytic']['global_matmul_over_analytic'] or 0:.3f}",
                          f"{a['flops']['cost_analysis']['flops'] or 0:.4g}", f"{a['flops']['per_device']:.4g}"]
                         for uid, a in _ok_units(analysis)]))
    invalid = [[a["unit"]["entry"], a["unit"]["plan"], a["unit"]["precision"], a["status"], a["reason"]]
               for a in analysis["units"].values() if a["status"] != "ok"]
    if invalid:
        parts.append("<h2>Units not built, and why</h2>")
        parts.append(_table(["entry", "plan", "precision", "status", "reason"], invalid))
    style = ("body{font-family:sans-serif;margin:2em;max-width:1200px} table{border-collapse:collapse;margin:1em 0;"
             "font-size:13px} td,th{border:1px solid #ccc;padding:3px 6px;text-align:left} th{background:#eee}"
             " img{max-width:100%;margin:0.5em 0}")
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>capibara-export {html.escape(b['folder'])}"
            f"</title><style>{style}</style></head><body>{''.join(parts)}</body></html>")


def derived_rows(analysis: dict, selection: dict) -> list[list]:
    """One row per unit of a derived plan: its origin, prediction, and whether it was selected."""
    chosen = {s["unit_id"]: s for s in selection["selections"] if s.get("unit_id")}
    best = {(s["entry"], s["batch"], s["precision"]): s for s in selection["selections"]}
    rows = []
    for uid, a in analysis["units"].items():
        origin = a.get("origin")
        if not origin:
            continue
        u = a["unit"]
        if a["status"] != "ok":
            outcome, predicted = a["status"], ""
        else:
            predicted = _ms(a["roofline"]["latency_s"])
            sel = best.get((u["entry"], u["batch"], u["precision"]), {})
            outcome = ("selected" if uid in chosen else
                       f"not selected: {sel.get('plan')} predicts {_ms(sel.get('predicted_latency_s'))} ms"
                       if a["memory"]["fits"] else "over the memory budget")
        rows.append([uid, origin["proposed_by"], origin["hotspot"], predicted, outcome])
    return rows


def render_summary(analysis: dict, selection: dict) -> str:
    counts: dict[str, int] = {}
    for a in analysis["units"].values():
        counts[a["status"]] = counts.get(a["status"], 0) + 1
    lines = [f"## Build {analysis['build']['folder']}", "",
             f"{len(analysis['units'])} units: " + ", ".join(f"{v} {k}" for k, v in sorted(counts.items())), "",
             "| entry | batch | precision | plan | predicted ms | why |", "|---|---|---|---|---|---|"]
    for s in selection["selections"]:
        lines.append(f"| {s['entry']} | {s['batch']} | {s['precision']} | {s['plan'] or '—'} | "
                     f"{_ms(s.get('predicted_latency_s'))} | {s['reason']} |")
    derived = derived_rows(analysis, selection)
    if derived:
        lines += ["", "Plans derived from the hotspots:", "", "| unit | predicted ms | outcome |", "|---|---|---|"]
        lines += [f"| {r[0]} | {r[3] or '—'} | {r[4]} |" for r in derived]
    agreement = analysis.get("model_agreement")
    if agreement:
        lines += ["", "The roofline beside libtpu's own kernel estimates (compute part):", "",
                  "| " + " | ".join(ENTRY_HEADERS) + " |", "|---" * len(ENTRY_HEADERS) + "|"]
        lines += ["| " + " | ".join(r) + " |" for r in entry_rows(agreement)]
        lines += ["", f"{len(agreement['disagreements'])} units differ by more than "
                      f"{agreement['disagreement_threshold']}x on compute (report.html lists them)."]
    return "\n".join(lines) + "\n"


def write_report(folder: Path, analysis: dict, selection: dict) -> tuple[Path, Path]:
    folder = Path(folder)
    out = []
    for name, text in (("report.html", render_html(analysis, selection)),
                       ("summary.md", render_summary(analysis, selection))):
        tmp = folder / f".{name}.tmp"
        tmp.write_text(text)
        tmp.replace(folder / name)
        out.append(folder / name)
    return out[0], out[1]
