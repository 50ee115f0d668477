"""The collectives in an optimized HLO program, mapped back to the mesh axes they run over.

Written by hand: no JAX or XLA API lists a compiled program's collectives. Replica groups
appear in three notations, all turned into explicit groups of logical device ids:
  explicit  replica_groups={{0,1,2,3},{4,5,6,7}}
  iota      replica_groups=[8,4]<=[4,8]T(1,0)   (groups × size, from a transposed iota)
  mesh      replica_groups=mesh['axis_0'=4,'axis_1'=8] {'axis_1'}, optionally with
            device_ids=([4,8]T(1,0)) giving the device at each mesh position (CPU HLO)
With use_global_device_ids the ids index the jit's device assignment, which is the mesh's
devices in row-major order, so id i sits at mesh position unravel_index(i, mesh shape).

On a multi-slice mesh (a leading `dcn` axis) libtpu compiles one program per slice: its
replica groups index the slice's own devices (ICI), and each collective part that crosses
slices becomes a host-transfer `send`/`recv` pair for the DCN ("megascale") runtime, tagged
_xla_megascale_transfer_type="ALL_GATHER" (or ALL_REDUCE, ...). Those sends are read as
collectives over the `dcn` axis. A group that spans slices itself (a platform that lowers
the mesh as one program) is split the same way. `dcn_bytes` is what each device sends over
the data-centre network.

Per collective, `bytes` is the per-device buffer the collective moves: the gathered result
of an all-gather, the operand of every other kind.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

from .hlo import COLLECTIVES, HloProgram

_IOTA = r"\[[\d,]+\]<=\[[\d,]+\](?:T\([\d,]+\))?"
_DEVICE_IDS = r"(?:,\s*device_ids=\((?:\[[\d,]+\](?:T\([\d,]+\))?|[\d,]+)\))?"
_GROUPS = re.compile(rf"replica_groups=(\{{\{{[^=]*?\}}\}}|\{{\}}|{_IOTA}|mesh\[[^\]]*\]{_DEVICE_IDS}\s*\{{[^}}]*\}})")
_PAIRS = re.compile(r"source_target_pairs=\{(\{[\d,{}]*\})\}")
_MEGASCALE = re.compile(r'_xla_megascale_transfer_type="([A-Z_]+)"')
_MEGASCALE_KIND = {"ALL_GATHER": "all-gather", "ALL_REDUCE": "all-reduce", "REDUCE_SCATTER": "reduce-scatter",
                   "ALL_TO_ALL": "all-to-all"}


@dataclass
class Collective:
    kind: str
    name: str
    bytes: float                  # per device, per execution
    times: float                  # executions per program run (loop trip counts included)
    groups: list[list[int]]       # logical device ids per group (permutes: [source, target] pairs)
    axis: str                     # the mesh axes it spans, "+"-joined: data | model | data+model | dcn+data | none
    group_size: int
    scope: str
    slices_spanned: int = 1       # distinct `dcn` positions in its largest group (1: ICI only)

    @property
    def total_bytes(self) -> float:
        return self.bytes * self.times

    @property
    def dcn_bytes(self) -> float:
        """Bytes per device per run that cross the data-centre network, for the hierarchical
        algorithm (ICI within a slice, then DCN between slices): a ring all-gather over s
        slices of n devices moves V·(s−1)/n per device over DCN, an all-reduce twice that;
        a permute moves its buffer when source and target are in different slices."""
        s = self.slices_spanned
        if s <= 1:
            return 0.0
        if self.kind == "collective-permute":
            return self.total_bytes
        factor = 2.0 if self.kind == "all-reduce" else 1.0
        return factor * self.total_bytes * (s - 1) / max(self.group_size, 1)


def mesh_axes(mesh_shape) -> dict[str, int]:
    """{axis: size} in mesh order; a bare (rows, cols) pair is the (data, model) mesh."""
    if isinstance(mesh_shape, dict):
        return {str(k): int(v) for k, v in mesh_shape.items()}
    rows, cols = mesh_shape
    return {"data": int(rows), "model": int(cols)}


def grid_shape(mesh_shape) -> tuple[int, int]:
    """The 2-D grid a heatmap draws: every axis but the last folded into rows (dcn × data)."""
    sizes = list(mesh_axes(mesh_shape).values())
    return int(np.prod(sizes[:-1])) if len(sizes) > 1 else 1, sizes[-1]


def _iota(dims: str, perm: str | None) -> np.ndarray:
    """iota over `dims` (e.g. "4,8"), optionally transposed by `perm` ("1,0"), flattened."""
    ids = np.arange(int(np.prod([int(x) for x in dims.split(",")]))).reshape([int(x) for x in dims.split(",")])
    return (ids.transpose([int(x) for x in perm.split(",")]) if perm else ids).reshape(-1)


def parse_groups(text: str, num_devices: int) -> list[list[int]]:
    text = text.strip()
    if text.startswith("{{"):
        return [[int(x) for x in g.split(",") if x.strip()] for g in re.findall(r"\{([\d,\s]*)\}", text[1:-1])]
    if text == "{}":
        return [list(range(num_devices))]
    if text.startswith("["):
        m = re.match(r"\[([\d,]+)\]<=\[([\d,]+)\](?:T\(([\d,]+)\))?", text)
        return _iota(m.group(2), m.group(3)).reshape([int(x) for x in m.group(1).split(",")]).tolist()
    m = re.match(r"mesh\[([^\]]*)\](?:,\s*device_ids=\(([^{]*)\))?\s*\{([^}]*)\}", text)
    axes = [(a, int(n)) for a, n in re.findall(r"'(\w+)'=(\d+)", m.group(1))]
    grouped = set(re.findall(r"'(\w+)'", m.group(3)))
    positions = np.arange(int(np.prod([n for _, n in axes]))).reshape([n for _, n in axes])
    order = [i for i, (a, _) in enumerate(axes) if a not in grouped] + [i for i, (a, _) in enumerate(axes) if a in grouped]
    size = int(np.prod([n for a, n in axes if a in grouped]))
    groups = positions.transpose(order).reshape(-1, size)
    if m.group(2):  # the device at each mesh position: an iota expression or an explicit list
        ids = re.match(r"\[([\d,]+)\](?:T\(([\d,]+)\))?$", m.group(2).strip())
        device_at = _iota(ids.group(1), ids.group(2)) if ids else np.array(
            [int(x) for x in m.group(2).split(",") if x.strip()])
        groups = device_at[groups]
    return groups.tolist()


def spanned(groups: list[list[int]], mesh_shape) -> dict[str, int]:
    """{axis: distinct positions} for the axes the members of the largest group differ along."""
    axes = mesh_axes(mesh_shape)
    if not groups or max(len(g) for g in groups) <= 1:
        return {}
    g = [i for i in max(groups, key=len) if i < int(np.prod(list(axes.values())))]
    positions = np.array(np.unravel_index(g, tuple(axes.values()))).T
    return {a: n for a, n in zip(axes, (len(set(positions[:, k])) for k in range(len(axes)))) if n > 1}


def axis_of(groups: list[list[int]], mesh_shape) -> tuple[str, int]:
    """Which mesh axes the members of a group differ along ("+"-joined), and the group size."""
    size = max((len(g) for g in groups), default=1)
    found = spanned(groups, mesh_shape)
    if size <= 1 or not found:
        return "none", 1
    return "+".join(found), size


def _pairs(attrs: str) -> list[list[int]]:
    m = _PAIRS.search(attrs)
    return [[int(a), int(b)] for a, b in re.findall(r"\{(\d+),(\d+)\}", m.group(1))] if m else []


def collectives(program: HloProgram, mesh_shape) -> list[Collective]:
    """Every collective of `program` with the mesh axes it spans; `mesh_shape` is {axis: size}
    in mesh order (or a (data, model) pair)."""
    axes = mesh_axes(mesh_shape)
    n = int(np.prod(list(axes.values())))
    found = []
    slices = axes.get("dcn", 1)
    for comp, inst, times in program.instructions():
        kind = inst.opcode.removesuffix("-start")
        if inst.opcode == "send" and slices > 1 and (m := _MEGASCALE.search(inst.attrs)):
            found.append(_dcn_transfer(comp, inst, times, m.group(1), axes, program.scope_of(comp, inst)))
            continue
        if kind not in COLLECTIVES:
            continue
        operand_bytes = sum(comp.by_name[o].shape.bytes for o in inst.operands if o in comp.by_name)
        if inst.opcode.endswith("-start"):  # (operands..., results..., contexts): the results are the rest
            result_bytes = max(inst.shape.bytes - operand_bytes, operand_bytes)
        else:
            result_bytes = inst.shape.bytes
        moved = result_bytes if kind == "all-gather" else operand_bytes
        if kind == "collective-permute":
            pairs = _pairs(inst.attrs)
            crossing = [p for p in pairs if p[0] != p[1]]
            axis, size = axis_of(crossing, axes) if crossing else ("none", 1)
            slices = max((spanned([p], axes).get("dcn", 1) for p in crossing), default=1)
            found.append(Collective(kind, inst.name, moved, times, crossing, axis, 2 if crossing else 1,
                                    program.scope_of(comp, inst), slices))
            continue
        m = _GROUPS.search(inst.attrs)
        groups = parse_groups(m.group(1), n) if m else [list(range(n))]
        axis, size = axis_of(groups, axes)
        found.append(Collective(kind, inst.name, moved, times, groups, axis, size, program.scope_of(comp, inst),
                                spanned(groups, axes).get("dcn", 1)))
    return found


def _dcn_transfer(comp, inst, times: float, transfer: str, axes: dict[str, int], scope: str) -> Collective:
    """One device's part of a collective between slices (a megascale `send`): its counterpart
    devices are the same mesh position in every other slice."""
    slices = axes["dcn"]
    per_slice = int(np.prod([n for a, n in axes.items() if a != "dcn"]))
    sent = comp.by_name[inst.operands[0]].shape.bytes if inst.operands and inst.operands[0] in comp.by_name else 0
    kind = _MEGASCALE_KIND.get(transfer, transfer.lower().replace("_", "-"))
    moved = sent * slices if kind == "all-gather" else sent  # the gathered result, as for an ICI all-gather
    groups = [[i + k * per_slice for k in range(slices)] for i in range(per_slice)]
    return Collective(kind, inst.name, moved, times, groups, "dcn", slices, scope, slices)


def dims_spanned(c: Collective, coords: list[list[int]]) -> int:
    """How many physical torus dimensions the devices of c's largest group vary along (at
    least 1): a collective over several dimensions can drive that many links at once."""
    if not coords or not c.groups or not all(coords):
        return 1
    group = max(c.groups, key=len)
    positions = [coords[i] for i in group if i < len(coords)]
    return max(1, sum(len({p[k] for p in positions}) > 1 for k in range(len(positions[0]))))


def device_traffic(found: list[Collective], mesh_shape) -> np.ndarray:
    """Bytes each device sends per program run, as a (data, model) grid (dcn × data rows on
    several slices).

    A ring all-gather / reduce-scatter sends (n-1)/n of the buffer, an all-reduce twice
    that, an all-to-all (n-1)/n; a permute sends its buffer from each source whose target
    is another device. Devices outside every group send nothing: that unevenness is what
    the load grid is for."""
    rows, cols = grid_shape(mesh_shape)
    sent = np.zeros(rows * cols)
    for c in found:
        if c.kind == "collective-permute":
            for src, _ in c.groups:
                sent[src] += c.total_bytes
            continue
        for g in c.groups:
            n = len(g)
            if n <= 1:
                continue
            share = (n - 1) / n * (2.0 if c.kind == "all-reduce" else 1.0)
            for d in g:
                sent[d] += c.total_bytes * share
    return sent.reshape(rows, cols)
