"""Plans proposed by the hotspots, compiled as extra units of the same build.

Two proposals, both read from each (entry, precision, batch) group's compiled units:

- **Tower mix.** Every unit's analysis says, per tower (the model's top-level scopes:
  vision, text_decoder, text_encoder), how many FLOPs and bytes it spends and what its
  collectives cost (`hotspots.towers`). Each tower's time under each plan that compiled is
  estimated as

      t(tower, plan) = max(max(FLOPs / peak, bytes / HBM bandwidth) + launches · κ, comm)
                       (comm: the roofline's time of the tower's collectives, κ its per-kernel
                       overhead; + comm instead where collectives do not overlap, as roofline.py),

  and when the towers' cheapest plans differ (by more than MARGIN), a plan giving each tower
  its cheapest rules (sharding/plans.py `towers`) is proposed.
- **Relieve the gathers.** When the group's fastest unit is communication-bound and its
  costliest mesh axis carries all-gathers while its plan shards parameters over that axis,
  the same plan with the parameters replicated on that axis is proposed (the axis where the
  most bytes are all-gathered first).

The selection then compares a proposal with every other unit on its own compiled numbers:
the estimates only decide what is worth compiling. Written by hand: no library searches
sharding plans from compiled-program statistics.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

from sharding.plans import ShardingPlan
from sharding.precision import get_policy

from .hardware import Hardware

SOURCE = "derived by capibara-export from the hotspots"
MARGIN = 0.05   # a tower moves to another plan only when the estimate there is this much lower


@dataclass(frozen=True)
class Proposal:
    plan: ShardingPlan
    groups: tuple[tuple[str, str, int], ...]   # (entry, precision, batch) to compile it for
    origin: dict                               # the hotspot that proposed it, with the estimates
    gain_s: float                              # estimated seconds saved against its group's fastest unit


def tower_seconds(row: dict, hardware: Hardware, compute_dtype: str) -> float:
    """The estimate above for one tower's figures (a `hotspots.towers` row)."""
    # the roofline's achievable rates (the same as the peaks for TPU entries and a CPU host) and
    # its per-launch overhead for the tower's kernels (no per-kernel split of the max here)
    rate, bandwidth = hardware.achievable_flops(compute_dtype), hardware.achievable_bandwidth()
    compute = row["flops"] / rate if rate else 0.0
    memory = row["bytes"] / bandwidth if bandwidth else 0.0
    work = max(compute, memory) + row.get("launches", 0.0) * hardware.kernel_overhead
    comm = row.get("comm_s", 0.0)
    return max(work, comm) if hardware.overlaps_communication else work + comm


def _same_rules(a: ShardingPlan, b: ShardingPlan) -> bool:
    return (a.params, a.activations, a.towers) == (b.params, b.activations, b.towers)


def propose(analysis: dict, plans: dict[str, ShardingPlan], hardware: Hardware, round_no: int = 1,
            known: list[ShardingPlan] = (), scopes: tuple[str, ...] = ()) -> list[Proposal]:
    """Plans worth compiling, most promising first. `plans`: those of the compiled units (the
    building blocks); `known`: plans the user could have asked for (shipped, plan files). A
    proposal whose rules repeat one of either is dropped: the user chose which to compile.
    `scopes`: the model's scopes a plan may give rules of their own (its family's), the only
    top-level scopes a tower mix puts on different plans."""
    everything = [*plans.values(), *known]
    groups: dict[tuple, list[tuple[str, dict]]] = defaultdict(list)
    for uid, a in analysis["units"].items():
        if a["status"] == "ok" and a.get("memory", {}).get("fits") and a.get("hotspots", {}).get("towers"):
            u = a["unit"]
            groups[(u["entry"], u["precision"], u["batch"])].append((uid, a))
    found: list[Proposal] = []
    for group, units in sorted(groups.items()):
        # only plans without tower rules of their own are the building blocks
        units = [(uid, a) for uid, a in units if a["unit"]["plan"] in plans and not plans[a["unit"]["plan"]].towers]
        if not units:
            continue
        fastest = min(units, key=lambda x: x[1]["roofline"]["latency_s"])
        for made in (_tower_mix(group, units, fastest, plans, hardware, scopes), _relieve_gathers(fastest, plans)):
            if made is None or any(_same_rules(made[0], p) for p in everything):
                continue
            plan, origin, gain = made
            origin = {"round": round_no, "proposed_by": fastest[0], **origin}
            same = next((i for i, p in enumerate(found) if _same_rules(p.plan, plan)), None)
            if same is None:
                found.append(Proposal(plan, (group,), origin, gain))
            else:  # the same plan proposed by another group: one plan, compiled for both
                p = found[same]
                found[same] = Proposal(p.plan, (*p.groups, group), p.origin, max(p.gain_s, gain))
    return sorted(found, key=lambda p: -p.gain_s)


def _tower_mix(group: tuple, units: list[tuple[str, dict]], fastest: tuple[str, dict],
               plans: dict[str, ShardingPlan], hardware: Hardware,
               scopes: tuple[str, ...]) -> tuple[ShardingPlan, dict, float] | None:
    """Each tower (scope) on the plan whose compiled figures make it cheapest there."""
    towers = [t["scope"] for t in fastest[1]["hotspots"]["towers"] if t["scope"] in scopes]
    if len(towers) < 2 or len(units) < 2:
        return None
    dtype = get_policy(group[1]).compute_dtype
    cost = {t: {a["unit"]["plan"]: tower_seconds(_row(a, t), hardware, dtype) for _, a in units} for t in towers}
    now = fastest[1]["unit"]["plan"]
    choice = {}
    for t in towers:  # another plan for a tower only when it is clearly cheaper there
        cheapest = min(cost[t], key=lambda p, t=t: (cost[t][p], p))
        choice[t] = cheapest if cost[t][cheapest] < (1 - MARGIN) * cost[t][now] else now
    if len(set(choice.values())) < 2:
        return None
    heaviest = max(towers, key=lambda t: cost[t][choice[t]])
    base = plans[choice[heaviest]]
    moved = [t for t in towers if choice[t] != base.name]
    plan = ShardingPlan(
        base.name + "".join(f"_{t}-{choice[t]}" for t in moved),
        f"{base.description} Derived: " + "; ".join(f"the {t} tower on {choice[t]}" for t in moved) + ".",
        base.params, base.activations, SOURCE,
        tuple((t, plans[choice[t]].params, plans[choice[t]].activations) for t in moved))
    gain = sum(cost[t][now] - cost[t][choice[t]] for t in towers)
    if gain <= 0:
        return None
    share = {t: cost[t][now] / (sum(cost[x][now] for x in towers) or 1.0) for t in towers}
    hotspot = "; ".join(f"{t} ({share[t]:.0%} of the towers' estimated time under {now}) is cheapest under "
                        f"{choice[t]}: {cost[t][choice[t]] * 1e3:.3g} ms vs {cost[t][now] * 1e3:.3g} ms"
                        for t in towers if choice[t] != now)
    return plan, {"kind": "tower-mix", "hotspot": hotspot, "estimate_s": {t: dict(sorted(cost[t].items()))
                                                                         for t in towers},
                  "estimated_gain_s": gain}, gain


def _relieve_gathers(fastest: tuple[str, dict], plans: dict[str, ShardingPlan]
                     ) -> tuple[ShardingPlan, dict, float] | None:
    """A communication-bound unit whose costliest mesh axis carries all-gathers while its plan
    shards parameters over that axis: the same plan with the parameters replicated there
    (fsdp's trade undone on one axis: more weight bytes per device, no gathers)."""
    uid, a = fastest
    r = a["roofline"]
    if r["binding"] != "communication" or not r.get("comm_s_by_axis"):
        return None
    gathered: dict[str, float] = defaultdict(float)
    for row in a["collectives"]["by_kind"]:
        if row["kind"] == "all-gather" and row["axis"] in r["comm_s_by_axis"]:
            gathered[row["axis"]] += row["bytes"]
    axes = sorted(gathered, key=lambda x: -gathered[x])  # where the most bytes are gathered first
    plan = plans[a["unit"]["plan"]]
    for axis in axes:
        names = set(axis.split("+"))
        kept = tuple((k, tuple(m for m in mesh if m not in names)) for k, mesh in plan.params)
        kept = tuple((k, mesh) for k, mesh in kept if mesh)
        if kept == plan.params:
            continue
        dropped = [k for k, mesh in plan.params if names & set(mesh)]
        seconds = r["comm_s_by_axis"][axis]
        derived = ShardingPlan(f"{plan.name}_params-off-{axis.replace('+', '-')}",
                               f"{plan.description} Derived: parameters not sharded over {axis}.",
                               kept, plan.activations, SOURCE, plan.towers)
        hotspot = (f"communication-bound ({r['latency_s'] * 1e3:.3g} ms): {gathered[axis] / 2**20:.3g} MiB per device "
                   f"are all-gathered over {axis}, whose collectives take {seconds * 1e3:.3g} ms, and the plan shards "
                   f"parameters over {axis} by {', '.join(dropped)}; replicate them there instead")
        return derived, {"kind": "relieve-gathers", "hotspot": hotspot, "axis": axis,
                         "estimated_gain_s": seconds}, seconds
    return None


def _row(unit: dict, tower: str) -> dict:
    return next((r for r in unit["hotspots"]["towers"] if r["scope"] == tower),
                {"flops": 0.0, "bytes": 0.0, "comm_bytes": 0.0})


def plans_toml(plans: list[ShardingPlan]) -> str:
    """Plans in the form sharding/plans.toml and --plan-file read (written by hand: tomllib
    only reads, and the form is small: tables of strings and lists of strings)."""
    def table(rules) -> str:
        items = (f"{k} = [{', '.join(f'{chr(34)}{a}{chr(34)}' for a in v)}]" for k, v in rules)
        return "{ " + ", ".join(items) + " }" if rules else "{}"

    lines = ["# Plans derived by capibara-export from a build's hotspots that its selection took.",
             "# Pass this file with --plan-file to compile them again in another build.", ""]
    for p in plans:
        lines += [f'["{p.name}"]', f"description = {_quoted(p.description)}", f"params = {table(p.params)}",
                  f"activations = {table(p.activations)}"]
        for tower, params, activations in p.towers:
            lines += [f'["{p.name}".towers.{tower}]', f"params = {table(params)}",
                      f"activations = {table(activations)}"]
        lines.append("")
    return "\n".join(lines)


def _quoted(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", " ") + '"'
