"""Plan selection: per (entry, batch, precision), the plan to serve and why.

Units that did not compile, are invalid or do not fit the memory budget are dropped
(never selected). Among the rest, the Pareto front on (predicted latency, peak memory per
device) is kept and its fastest member chosen, ties going to the smaller footprint; the
reason names the next-fastest fitting plans with their predicted latencies. Plans derived
from the hotspots (plan_search.py) compete like any other; when one is chosen, the reason
quotes the hotspot that proposed it.
Precision is not chosen here: it is a numerical decision for the serving team, so each
precision gets its own selection. Each selection carries the memory advice of its unit
(hotspots.advise): only plans valid here, and why the selection differs when it does.
"""

from __future__ import annotations

from .hotspots import advise, gib

SCHEMA = "capibara-export/selection"
SCHEMA_VERSION = 1


def _none_selected(units: list[dict]) -> str:
    """Why no plan was selected, by what happened to each unit (invalid, does not fit, ...)."""
    by_outcome: dict[str, list[str]] = {}
    for u in units:
        outcome = "over the memory budget" if u["status"] in ("ok", "does-not-fit") else u["status"]
        by_outcome.setdefault(outcome, []).append(u["unit"]["plan"])
    parts = [f"{len(plans)} {outcome} ({', '.join(plans)})" for outcome, plans in by_outcome.items()]
    first_invalid = next((u["reason"] for u in units if u["status"] == "invalid" and u["reason"]), None)
    return (f"no plan selected: {len(units)} considered: {'; '.join(parts)}"
            + (f"; e.g. {first_invalid}" if first_invalid else ""))


def _latency(u: dict) -> str:
    return f"{u['unit']['plan']} {u['roofline']['latency_s'] * 1e3:.3g} ms"


def pareto(points: list[tuple[str, float, float]]) -> list[str]:
    """Ids of the points no other point beats on both latency and memory."""
    front = []
    for uid, lat, mem in points:
        dominated = any((l2 <= lat and m2 <= mem) and (l2 < lat or m2 < mem) for u2, l2, m2 in points if u2 != uid)
        if not dominated:
            front.append(uid)
    return front


def select(analysis: dict) -> dict:
    groups: dict[tuple, list[dict]] = {}
    for uid, a in analysis["units"].items():
        u = a["unit"]
        groups.setdefault((u["entry"], u["batch"], u["precision"]), []).append({"id": uid, **a})
    selections = []
    for (entry, batch, precision), units in sorted(groups.items()):
        fitting = [u for u in units if u["status"] == "ok" and u.get("memory", {}).get("fits")]
        dropped = {u["id"]: (u["reason"] or u["status"]) if u["status"] != "ok" else "over the memory budget"
                   for u in units if u not in fitting}
        entry_sel = {"entry": entry, "batch": batch, "precision": precision, "dropped": dropped}
        if not fitting:
            entry_sel.update(plan=None, unit_id=None, pareto=[], reason=_none_selected(units))
            selections.append(entry_sel)
            continue
        points = [(u["id"], u["roofline"]["latency_s"], u["memory"]["peak"]) for u in fitting]
        front = pareto(points)
        by_id = {u["id"]: u for u in fitting}
        best = min(front, key=lambda i: (by_id[i]["roofline"]["latency_s"], by_id[i]["memory"]["peak"]))
        chosen = by_id[best]
        r = chosen["roofline"]
        others = [by_id[i]["unit"]["plan"] for i in front if i != best]
        beaten = sorted((u for u in fitting if u["id"] != best), key=lambda u: u["roofline"]["latency_s"])[:3]
        reason = (f"{chosen['unit']['plan']}: fastest predicted latency ({r['latency_s'] * 1e3:.3g} ms, "
                  f"{r['binding']}-bound, MFU {r['mfu']:.0%}) of {len(fitting)} fitting plans, "
                  f"{gib(chosen['memory']['peak'])} per device"
                  + (f"; next: {', '.join(_latency(u) for u in beaten)}" if beaten else "")
                  + (f"; also on the Pareto front: {', '.join(others)}" if others else ""))
        origin = chosen.get("origin")
        if origin:
            reason += (f"; a plan derived from the hotspots of {origin['proposed_by']}: {origin['hotspot']}")
        entry_sel.update(plan=chosen["unit"]["plan"], unit_id=best, pareto=front, reason=reason, derived=bool(origin),
                         predicted_latency_s=r["latency_s"], peak_bytes=chosen["memory"]["peak"],
                         advice=advise(chosen, units))
        selections.append(entry_sel)
    return {"schema": SCHEMA, "schema_version": SCHEMA_VERSION, "selections": selections}
