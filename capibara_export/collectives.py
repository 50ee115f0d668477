"""The collectives in an optimized HLO program, mapped back to the mesh axes they run over.

Written by hand: no JAX or XLA API lists a compiled program's collectives. Replica groups
appear in three notations, all turned into explicit groups of logical device ids:
  explicit  replica_groups={{0,1,2,3},{4,5,6,7}}
  iota      replica_groups=[8,4]<=[4,8]T(1,0)   (groups × size, from a transposed iota)
  mesh      replica_groups=mesh['axis_0'=4,'axis_1'=8] {'axis_1'}, optionally with
            device_ids=([4,8]T(1,0)) giving the device at each mesh position (CPU HLO)
With use_global_device_ids the ids index the jit's device assignment, which is the mesh's
devices in row-major order, so id i sits at mesh position divmod(i, model_size).

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


@dataclass
class Collective:
    kind: str
    name: str
    bytes: float                  # per device, per execution
    times: float                  # executions per program run (loop trip counts included)
    groups: list[list[int]]       # logical device ids per group (permutes: [source, target] pairs)
    axis: str                     # data | model | data+model | none
    group_size: int
    scope: str

    @property
    def total_bytes(self) -> float:
        return self.bytes * self.times


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


def axis_of(groups: list[list[int]], mesh_shape: tuple[int, int]) -> tuple[str, int]:
    """Which mesh axes the members of a group differ along, and the group size."""
    _, cols = mesh_shape
    size = max((len(g) for g in groups), default=1)
    if size <= 1:
        return "none", 1
    g = max(groups, key=len)
    rows_used = {i // cols for i in g}
    cols_used = {i % cols for i in g}
    if len(rows_used) > 1 and len(cols_used) > 1:
        return "data+model", size
    return ("data" if len(rows_used) > 1 else "model"), size


def _pairs(attrs: str) -> list[list[int]]:
    m = _PAIRS.search(attrs)
    return [[int(a), int(b)] for a, b in re.findall(r"\{(\d+),(\d+)\}", m.group(1))] if m else []


def collectives(program: HloProgram, mesh_shape: tuple[int, int]) -> list[Collective]:
    n = mesh_shape[0] * mesh_shape[1]
    found = []
    for comp, inst, times in program.instructions():
        kind = inst.opcode.removesuffix("-start")
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
            axis, size = axis_of(crossing, mesh_shape) if crossing else ("none", 1)
            found.append(Collective(kind, inst.name, moved, times, crossing, axis, 2 if crossing else 1,
                                    program.scope_of(comp, inst)))
            continue
        m = _GROUPS.search(inst.attrs)
        groups = parse_groups(m.group(1), n) if m else [list(range(n))]
        axis, size = axis_of(groups, mesh_shape)
        found.append(Collective(kind, inst.name, moved, times, groups, axis, size, program.scope_of(comp, inst)))
    return found


def dims_spanned(c: Collective, coords: list[list[int]]) -> int:
    """How many physical torus dimensions the devices of c's largest group vary along (at
    least 1): a collective over several dimensions can drive that many links at once."""
    if not coords or not c.groups or not all(coords):
        return 1
    group = max(c.groups, key=len)
    positions = [coords[i] for i in group if i < len(coords)]
    return max(1, sum(len({p[k] for p in positions}) > 1 for k in range(len(positions[0]))))


def device_traffic(found: list[Collective], mesh_shape: tuple[int, int]) -> np.ndarray:
    """Bytes each device sends per program run, as a (data, model) grid.

    A ring all-gather / reduce-scatter sends (n-1)/n of the buffer, an all-reduce twice
    that, an all-to-all (n-1)/n; a permute sends its buffer from each source whose target
    is another device. Devices outside every group send nothing: that unevenness is what
    the load grid is for."""
    sent = np.zeros(mesh_shape[0] * mesh_shape[1])
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
    return sent.reshape(mesh_shape)
