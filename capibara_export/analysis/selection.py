"""Plan selection: per (entry, batch, precision), the plan to serve and why.

Units that did not compile, are invalid or do not fit the memory budget are dropped
(never selected). Among the rest, the Pareto front on (predicted latency, peak memory per
device) is kept and its fastest member chosen, ties going to the smaller footprint; the
reason names the next-fastest fitting plans with their predicted latencies. Plans derived
from the hotspots (plan_search.py) compete like any other; when one is chosen, the reason
quotes the hotspot that proposed it.
Precision is not chosen here: it is a numerical decision for the serving team, so each
precision gets its own selection. One exception is made from measurements: where the
build's hardware figures say bf16 matmuls run slower than f32 ones (a CPU without native
bf16 dots: XLA:CPU widens bf16 around every dot, so a bf16 program is slower than fp32),
every bf16-compute selection is marked `refused` with that reason, and the export writes no
executable or sharded program for it unless the precision is named explicitly. Each
selection carries the memory advice of its unit (hotspots.advise): only plans valid here,
and why the selection differs when it does. On TPU targets the reason also says whether the
compiler's own per-kernel estimates (model_agreement.py) would choose the same plan; they
inform, the roofline decides.
"""

from __future__ import annotations

from sharding.precision import get_policy

from .hotspots import advise, gib
from .model_agreement import compiler_choice

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


def _second_opinion(chosen: dict, theirs: dict) -> str:
    """What the TPU compiler's own kernel estimates (with the roofline's communication term)
    say about the choice."""
    mine = chosen["libtpu_estimate"]["latency_s"]
    if theirs["id"] == chosen["id"]:
        return f"; libtpu's own kernel estimates agree ({mine * 1e3:.3g} ms)"
    return (f"; libtpu's own kernel estimates would choose {theirs['unit']['plan']} "
            f"({theirs['libtpu_estimate']['latency_s'] * 1e3:.3g} ms against {mine * 1e3:.3g} ms for "
            f"{chosen['unit']['plan']}; docs/report.md, 'The compiler's second opinion')")


def pareto(points: list[tuple[str, float, float]]) -> list[str]:
    """Ids of the points no other point beats on both latency and memory."""
    front = []
    for uid, lat, mem in points:
        dominated = any((l2 <= lat and m2 <= mem) and (l2 < lat or m2 < mem) for u2, l2, m2 in points if u2 != uid)
        if not dominated:
            front.append(uid)
    return front


def refused_precisions(analysis: dict) -> dict[str, str]:
    """Precisions that compute in bf16, each with the reason to refuse it, where the build's
    hardware figures (measured at run time for a CPU or a local GPU) give bf16 matmuls a lower
    rate than f32 ones; empty elsewhere (TPUs, GPUs, a CPU with native bf16 dots)."""
    hardware = analysis.get("build", {}).get("hardware", {})
    bf16, f32 = hardware.get("achieved_bf16_flops", 0.0), hardware.get("achieved_fp32_flops", 0.0)
    if not (bf16 and f32 and bf16 < f32):
        return {}
    precisions = {a["unit"]["precision"] for a in analysis["units"].values()}
    reason = (f"refused on {hardware.get('name', 'this hardware')}: bf16 matmuls run at {bf16 / f32:.2f}x the f32 "
              f"rate here ({bf16:.3g} vs {f32:.3g} FLOP/s, {hardware.get('source', 'measured')}), so bf16 is "
              "slower than fp32; serve fp32 on this hardware, or name the precision in --export-precisions to "
              "export its compiled programs anyway")
    return {p: reason for p in sorted(precisions) if get_policy(p).compute_dtype == "bfloat16"}


def select(analysis: dict) -> dict:
    refused = refused_precisions(analysis)
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
        theirs = compiler_choice(fitting)
        if theirs is not None:
            reason += _second_opinion(chosen, theirs)
            entry_sel["libtpu_choice"] = theirs["unit"]["plan"]
        origin = chosen.get("origin")
        if origin:
            reason += (f"; a plan derived from the hotspots of {origin['proposed_by']}: {origin['hotspot']}")
        if precision in refused:
            entry_sel["refused"] = refused[precision]
            reason = f"{refused[precision]}. Would serve {reason}"
        entry_sel.update(plan=chosen["unit"]["plan"], unit_id=best, pareto=front, reason=reason, derived=bool(origin),
                         predicted_latency_s=r["latency_s"], peak_bytes=chosen["memory"]["peak"],
                         advice=advise(chosen, units))
        selections.append(entry_sel)
    return {"schema": SCHEMA, "schema_version": SCHEMA_VERSION, "selections": selections}
