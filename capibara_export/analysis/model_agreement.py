"""The roofline beside the TPU compiler's own estimates, over a whole build.

Per entry: the Spearman rank correlation of the two models' compute parts over the entry's
units (its plans at every precision and batch built), and of the latencies they imply (the
compiler's compute part with the roofline's communication term, which no compiler estimate
covers: libtpu_estimate.py); the median ratio compiler / roofline on compute; and every
unit where the two differ by more than DISAGREEMENT on compute, with the kind of kernel
that carries the difference. Per selection group (selection.py): the plan the compiler's
estimates would choose by the same rule.
"""

from __future__ import annotations

import math
import statistics

DISAGREEMENT = 1.5    # compute parts further apart than this ratio, either way, are listed


def _spearman(xs: list[float], ys: list[float]) -> float | None:
    """Spearman's rho (scipy), None for fewer than 3 points or a constant side."""
    if len(xs) < 3 or len(set(xs)) < 2 or len(set(ys)) < 2:
        return None
    from scipy.stats import spearmanr

    rho = float(spearmanr(xs, ys).statistic)
    return None if math.isnan(rho) else rho


def _estimated(analysis: dict) -> list[tuple[str, dict]]:
    return [(uid, a) for uid, a in sorted(analysis["units"].items())
            if a.get("status") == "ok" and a.get("libtpu_estimate")]


def carrying_kind(estimate: dict) -> str:
    """The kernel kind whose difference between the two models is largest."""
    kinds = estimate.get("by_kind") or {}
    if not kinds:
        return "none"
    return max(kinds, key=lambda k: abs(kinds[k]["libtpu_s"] - kinds[k]["roofline_s"]))


def compare_models(analysis: dict) -> dict | None:
    """The build-wide comparison (None when no unit carries a compiler estimate)."""
    units = _estimated(analysis)
    if not units:
        return None
    entries: dict[str, list[tuple[str, dict]]] = {}
    for uid, a in units:
        entries.setdefault(a["unit"]["entry"], []).append((uid, a))
    per_entry, disagreements = {}, []
    for entry, rows in sorted(entries.items()):
        ours = [a["libtpu_estimate"]["roofline_compute_s"] for _, a in rows]
        theirs = [a["libtpu_estimate"]["compute_s"] for _, a in rows]
        latency_ours = [a["roofline"]["latency_s"] for _, a in rows]
        latency_theirs = [a["libtpu_estimate"]["latency_s"] for _, a in rows]
        ratios = [float(t / o) for o, t in zip(ours, theirs) if o > 0]
        per_entry[entry] = {"units": len(rows), "spearman_compute": _spearman(ours, theirs),
                            "spearman_latency": _spearman(latency_ours, latency_theirs),
                            "median_ratio_compute": float(statistics.median(ratios)) if ratios else None,
                            "min_ratio_compute": min(ratios, default=None), "max_ratio_compute": max(ratios, default=None)}
        for (uid, a), o, t in zip(rows, ours, theirs):
            if o > 0 and not 1 / DISAGREEMENT <= t / o <= DISAGREEMENT:
                est = a["libtpu_estimate"]
                kinds = est["by_kind"]
                disagreements.append({"unit_id": uid, "roofline_compute_s": o, "libtpu_compute_s": t, "ratio": t / o,
                                      "carried_by": carrying_kind(est),
                                      "by_kind": {k: {"roofline_s": v["roofline_s"], "libtpu_s": v["libtpu_s"]}
                                                  for k, v in kinds.items()},
                                      "largest_differences": est["largest_differences"][:3]})
    totals: dict[str, dict] = {}
    for _, a in units:
        for kind, v in a["libtpu_estimate"]["by_kind"].items():
            row = totals.setdefault(kind, {"kernels": 0, "roofline_s": 0.0, "libtpu_s": 0.0})
            for key in row:
                row[key] += v[key]
    for row in totals.values():
        row["ratio"] = row["libtpu_s"] / row["roofline_s"] if row["roofline_s"] else None
    return {"source": "compiled+model", "disagreement_threshold": DISAGREEMENT, "entries": per_entry,
            "by_kind": totals, "disagreements": disagreements}


def compiler_choice(fitting: list[dict]) -> dict | None:
    """The unit the compiler's estimates would choose among `fitting` (selection.py's units,
    each with its id): fastest compiler-implied latency, ties to the smaller footprint. None
    when some unit has no compiler estimate."""
    if not fitting or any(not u.get("libtpu_estimate") for u in fitting):
        return None
    return min(fitting, key=lambda u: (u["libtpu_estimate"]["latency_s"], u["memory"]["peak"]))


def _fmt(x: float | None, spec: str = ".2f") -> str:
    return "—" if x is None else format(x, spec)


ENTRY_HEADERS = ["entry", "units", "Spearman (compute)", "Spearman (latency)", "median ratio on compute",
                 "range of ratios"]
DISAGREEMENT_HEADERS = ["unit", "roofline compute ms", "libtpu compute ms", "ratio", "carried by",
                        "largest kernel difference"]


def entry_rows(agreement: dict) -> list[list[str]]:
    """One row per entry: the two models' rank agreement and the ratio on compute."""
    return [[entry, str(v["units"]), _fmt(v["spearman_compute"]), _fmt(v["spearman_latency"]),
             _fmt(v["median_ratio_compute"]) + "x",
             f"{_fmt(v['min_ratio_compute'])}-{_fmt(v['max_ratio_compute'])}x"]
            for entry, v in agreement["entries"].items()]


def disagreement_rows(agreement: dict) -> list[list[str]]:
    """One row per unit whose compute parts differ by more than the threshold."""
    rows = []
    for d in agreement["disagreements"]:
        top = d["largest_differences"][0] if d["largest_differences"] else None
        kernel = (f"{top['kernel']} ({top['kind']}, x{top['times']:.0f}): {top['roofline_s'] * 1e6:.3g} µs vs "
                  f"{top['libtpu_s'] * 1e6:.3g} µs" if top else "—")
        rows.append([d["unit_id"], f"{d['roofline_compute_s'] * 1e3:.3g}", f"{d['libtpu_compute_s'] * 1e3:.3g}",
                     f"{d['ratio']:.2f}x", d["carried_by"], kernel])
    return rows
