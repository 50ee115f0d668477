"""Where a compiled unit spends its work, and what to change about its sharding.

- `by_scope`: FLOPs, bytes and collective bytes per model scope, read from each HLO op's
  metadata (`op_name` carries the named scopes the model opens: vision/mlp, text_decoder/
  cross_attention, lm_head, ...), loop trip counts included.
- `load_grid` (the seed's detect_hotspots): per-device communication over the mesh, and
  the devices whose load exceeds the mean by a threshold. SPMD programs give every device
  the same memory, so unevenness shows up in who sends what.
- `classify` (the seed's optimize_sharding): is the unit's per-device memory dominated by
  batch-proportional bytes (activations, inputs) or hidden-proportional ones (weights)?
  The first calls for sharding the batch, the second for sharding hidden dimensions.
- `advise`: that advice for a selected unit, restricted to the plans valid for the model
  and mesh, and said plainly when the selection does not follow it, and why.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable

import numpy as np

from .collectives import Collective, device_traffic
from .hlo import HloProgram

BATCH_FAMILY = ("dp", "fsdp")
HIDDEN_FAMILY = ("hidden", "fsdp-tp", "tp")


def scope_totals(program: HloProgram, found: list[Collective],
                 comm_seconds: Callable[[Collective], float] | None = None,
                 kernels: list | None = None) -> dict[str, dict[str, float]]:
    """FLOPs, bytes, collective bytes and kernel launches per scope, every instruction counted
    (loops included); with `comm_seconds` (the roofline's time of one collective) also `comm_s`
    per scope. `kernels`: the program's kernel profile when already made (hlo.Kernel list)."""
    acc: dict[str, dict[str, float]] = defaultdict(lambda: {"flops": 0.0, "bytes": 0.0, "comm_bytes": 0.0,
                                                            "launches": 0.0,
                                                            **({"comm_s": 0.0} if comm_seconds else {})})
    kernels = {k.name for k in (program.kernel_profile().kernels if kernels is None else kernels)}
    for comp, inst, times in program.instructions():
        c = program.instruction_costs(comp, inst)
        if c.flops or c.bytes or inst.name in kernels:
            row = acc[program.scope_of(comp, inst)]
            row["flops"] += c.flops * times
            row["bytes"] += c.bytes * times
            row["launches"] += times if inst.name in kernels else 0.0
    for c in found:
        acc[c.scope]["comm_bytes"] += c.total_bytes
        if comm_seconds:
            acc[c.scope]["comm_s"] += comm_seconds(c)
    return dict(acc)


def _with_shares(acc: dict[str, dict[str, float]]) -> list[dict]:
    totals = {k: sum(r[k] for r in acc.values()) or 1.0 for k in ("flops", "bytes", "comm_bytes")}  # no comm_s share
    rows = [{"scope": s, **r, **{f"{k}_share": r[k] / totals[k] for k in totals}} for s, r in acc.items()]
    rows.sort(key=lambda r: (r["flops"], r["bytes"]), reverse=True)
    return rows


def by_scope(totals: dict[str, dict[str, float]], top: int = 8) -> list[dict]:
    """The `top` scopes by FLOPs, each with its share of FLOPs, bytes and collective bytes."""
    return _with_shares(totals)[:top]


def by_tower(totals: dict[str, dict[str, float]]) -> list[dict]:
    """The same figures summed per top-level scope (the model's towers and heads: vision,
    text_decoder, itm_head, ...): what a plan with per-tower rules can act on."""
    towers: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))
    for scope, row in totals.items():
        top = scope.split("/", 1)[0] or "(unscoped)"
        for k, v in row.items():
            towers[top][k] += v
    towers = {t: dict(row) for t, row in towers.items()}
    return _with_shares(dict(towers))


def load_grid(found: list[Collective], mesh_shape: tuple[int, int], threshold: float = 1.25) -> dict:
    grid = device_traffic(found, mesh_shape)
    mean = float(grid.mean())
    hot = [[int(r), int(c)] for r, c in zip(*np.nonzero(grid > threshold * mean))] if mean > 0 else []
    return {"source": "compiled", "comm_bytes": grid.tolist(), "mean": mean, "max": float(grid.max()),
            "min": float(grid.min()), "threshold": threshold, "hot_devices": hot,
            "imbalance": float(grid.max() / mean) if mean > 0 else 1.0}


def classify(memory: dict) -> dict:
    """Batch-bound or hidden-bound, from the per-device memory breakdown, with a sentence.
    `family` names the shipped plans of the kind that would cut the dominant bytes; which
    of them are valid for a model and mesh only the build knows (see `advise`)."""
    weights = float(memory.get("arguments_by_kind", {}).get("params", 0))
    peak = float(memory.get("peak", 0)) or 1.0
    activations = max(peak - weights, 0.0)
    bound = "hidden" if weights >= activations else "batch"
    share = (weights if bound == "hidden" else activations) / peak
    if bound == "hidden":
        why = (f"weights are {gib(weights)} of the {gib(peak)} peak per device ({share:.0%}): hidden-bound; "
               "sharding hidden dimensions would cut per-device bytes")
    else:
        why = (f"activations and inputs are {gib(activations)} of the {gib(peak)} peak per device ({share:.0%}): "
               "batch-bound; sharding the batch would cut per-device bytes")
    return {"source": "compiled", "bound": bound, "weights_bytes": weights, "activation_bytes": activations,
            "dominant_share": share, "family": list(HIDDEN_FAMILY if bound == "hidden" else BATCH_FAMILY),
            "reason": why}


def advise(chosen: dict, units: list[dict]) -> dict:
    """The chosen unit's memory advice, naming only plans valid for this model and mesh (those
    that compiled in this build for the same entry, batch and precision), and whether the
    selection follows it; when it does not, why, with the alternatives' predicted numbers."""
    cls = chosen.get("classification") or classify(chosen["memory"])
    family = HIDDEN_FAMILY if cls["bound"] == "hidden" else BATCH_FAMILY
    by_plan = {u["unit"]["plan"]: u for u in units}
    valid = [p for p in family if p in by_plan and by_plan[p]["status"] == "ok"]
    excluded = {p: by_plan[p]["status"] for p in family if p in by_plan and by_plan[p]["status"] != "ok"}
    plan, mem = chosen["unit"]["plan"], chosen["memory"]
    kind = "hidden dimensions" if cls["bound"] == "hidden" else "the batch"
    not_valid = f"; not valid here: {', '.join(f'{p} ({s})' for p, s in excluded.items())}" if excluded else ""
    if plan in family:
        why = f"{plan} shards {kind}: the selection follows the advice"
    elif not valid:
        why = f"no plan sharding {kind} is valid here{not_valid}; {plan} is the fastest fitting plan"
    else:
        def alt(u: dict) -> str:
            if not u.get("memory", {}).get("fits"):
                return f"{u['unit']['plan']} (over the memory budget, {gib(u['memory']['peak'])}/device)"
            return f"{u['unit']['plan']} ({_ms(u['roofline']['latency_s'])}, {gib(u['memory']['peak'])}/device)"
        budget = mem.get("budget_fraction", 1.0) * mem.get("hbm_bytes", 0)
        fits = f"it fits ({gib(mem['peak'])} of the {gib(budget)} budget per device)" if budget else "it fits"
        why = (f"{plan} is selected instead: {fits}, so cutting per-device bytes buys nothing, and it is "
               f"predicted at {_ms(chosen['roofline']['latency_s'])} against "
               f"{', '.join(alt(by_plan[p]) for p in valid)}{not_valid}")
    return {"bound": cls["bound"], "plans": valid, "not_valid": excluded, "follows": plan in family,
            "text": f"{cls['reason']}. {why}."}


def gib(n: float) -> str:
    return f"{n / 1024 ** 3:.2f} GiB"


def _ms(seconds: float) -> str:
    return f"{seconds * 1e3:.3g} ms"
