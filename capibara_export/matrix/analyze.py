"""Normalised analysis of every compiled unit in a build folder: one versioned schema.

Each section says where its figures come from:
  compiled  read from the executable: memory analysis, optimized or pre-partition HLO
  model     derived: the roofline, the model config's analytic FLOPs
  measured  timed on a device (added by the benchmarks, never here)

It is a pure function of the build folder (records.jsonl, build.json, hlo/), so
`python -m capibara_export report BUILD_DIR` can always recompute it.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict
from pathlib import Path
from typing import Callable

from sharding.precision import get_policy

from ..analysis.collectives import collectives
from ..analysis.hardware import MEMORY_FRACTION, Hardware
from ..analysis.hlo import HloProgram
from ..analysis.hotspots import by_scope, by_tower, classify, load_grid, scope_totals
from ..analysis.libtpu_estimate import estimate_record
from ..analysis.model_agreement import compare_models
from ..analysis.roofline import collective_times, roofline
from .cache import DerivedCache, key_of, source_hash
from .folder import REBUILD, BuildFolderError, build_parts, hlo_text, ordered_shape, read_build, read_records
from .records import CompileRecord

SCHEMA = "capibara-export/analysis"
SCHEMA_VERSION = 1


Programs = Callable[[], "tuple[HloProgram, HloProgram | None]"]


def analyze_unit(record: CompileRecord, programs: Programs, hardware: Hardware, mesh_shape: dict[str, int],
                 coords: list[list[int]] | None = None) -> dict:
    """`programs()`: the unit's optimized and pre-partition HLO, parsed (read only for a
    unit that compiled). `mesh_shape`: {axis: size} in mesh order, `dcn` first on slices."""
    out: dict = {"unit": record.unit.to_dict(), "status": record.status, "reason": record.reason,
                 "plan_description": record.plan_description}
    if record.origin:
        out["origin"] = record.origin
    if record.status != "ok" or record.memory is None:
        if record.needed_bytes:
            out["memory"] = {"source": "compiled", "needed": record.needed_bytes, "hbm_bytes": hardware.hbm_bytes,
                             "fits": False}
        return out
    devices = math.prod(mesh_shape.values())
    mem = dict(record.memory)
    mem.update(source="compiled", hbm_bytes=hardware.hbm_bytes, fraction_of_hbm=mem["peak"] / hardware.hbm_bytes,
               budget_fraction=MEMORY_FRACTION, fits=mem["peak"] <= MEMORY_FRACTION * hardware.hbm_bytes)
    out["memory"] = mem

    program, pre = programs()
    per_device, counted_once = program.costs(True), program.costs(False)
    global_costs = pre.costs(True) if pre else None
    raw = record.cost or {}
    out["flops"] = {
        "source": "compiled",
        "per_device": per_device.flops, "per_device_matmul": per_device.matmul_flops,
        "transcendentals": per_device.transcendentals, "bytes_accessed": per_device.bytes,
        "counted_once": {"flops": counted_once.flops, "bytes_accessed": counted_once.bytes},
        "cost_analysis": {"flops": raw.get("flops"), "bytes_accessed": raw.get("bytes accessed"),
                          "transcendentals": raw.get("transcendentals")},
        "loops": [{"trip_count": loop.trip_count, "trip_count_source": loop.source, "runs": loop.multiplier}
                  for loop in program.loops],
        "global_matmul": global_costs.matmul_flops if global_costs else None,
        "global": global_costs.flops if global_costs else None,
        "redundancy": per_device.flops * devices / global_costs.flops if global_costs and global_costs.flops else None,
    }
    analytic = record.analytic_flops or 0
    out["analytic"] = {"source": "model", "flops": analytic,
                       "global_matmul_over_analytic": (global_costs.matmul_flops / analytic
                                                       if global_costs and analytic else None)}
    found = collectives(program, mesh_shape)
    by_axis: dict[str, float] = {}
    kinds: dict[tuple, dict] = {}
    for c in found:
        by_axis[c.axis] = by_axis.get(c.axis, 0.0) + c.total_bytes
        row = kinds.setdefault((c.kind, c.axis, c.group_size), {"kind": c.kind, "axis": c.axis,
                                                                "group_size": c.group_size, "bytes": 0.0, "count": 0.0,
                                                                "dcn_bytes": 0.0})
        row["bytes"] += c.total_bytes
        row["count"] += c.times
        row["dcn_bytes"] += c.dcn_bytes
    # by network: "ici" is the buffer bytes of collectives within one slice; "dcn" the bytes
    # each device sends between slices (Collective.dcn_bytes); both per device per run
    networks = {"ici": sum(c.total_bytes for c in found if c.slices_spanned <= 1),
                "dcn": sum(c.dcn_bytes for c in found)}
    out["collectives"] = {"source": "compiled", "bytes_by_axis": by_axis, "bytes_by_network": networks,
                          "by_kind": sorted(kinds.values(), key=lambda r: -r["bytes"])}
    optimal = raw.get("optimal_seconds")
    compute_dtype = get_policy(record.unit.precision).compute_dtype
    profile = program.kernel_profile()
    out["roofline"] = roofline(per_device.flops, per_device.bytes, found, hardware, compute_dtype, analytic, devices,
                               optimal, coords, profile).to_dict()
    if hardware.clock_hz:   # a TPU target: its compiler's own per-kernel estimates, beside the roofline
        out["libtpu_estimate"] = estimate_record(program, hardware, compute_dtype, out["roofline"]["comm_s"],
                                                 profile.kernels)
    totals = scope_totals(program, found, lambda c: sum(collective_times(c, hardware, coords).values()),
                          profile.kernels)
    out["hotspots"] = {"source": "compiled", "scopes": by_scope(totals), "towers": by_tower(totals)}
    out["load_grid"] = load_grid(found, mesh_shape)
    out["classification"] = classify(mem)
    return out


def _program(folder: Path, relative: str, sha256: str | None = None) -> HloProgram:
    """A record's HLO text, read through the build-folder boundary and parsed. A text that
    does not parse (the pre-partition text carries no hash, so it can be anything) is the
    folder's fault, reported as one line; the parser's own tests cover what XLA writes."""
    text = hlo_text(folder, relative, sha256)
    try:
        program = HloProgram(text)
        program.costs(True)
        return program
    except (ValueError, KeyError, IndexError, StopIteration, AttributeError, TypeError) as err:
        raise BuildFolderError(f"{folder / relative}: not HLO text this version can analyse "
                               f"({type(err).__name__}: {err}); {REBUILD}") from None


# Every source file whose code shapes a unit's analysis: an edit there recomputes it.
ANALYSIS_SOURCES = ("capibara_export/matrix/analyze.py",) + tuple(
    f"capibara_export/analysis/{m}.py" for m in ("hlo", "hlo_text", "collectives", "hotspots", "roofline", "hardware",
                                                   "libtpu_estimate")) \
    + ("sharding/precision.py",)
_VOLATILE = ("cached", "lower_s", "compile_s", "hlo_file", "pre_hlo_file")  # no influence on the analysis


def unit_key(record: CompileRecord, hardware: Hardware, mesh_shape: dict[str, int], coords) -> str:
    """Where a compiled unit's analysis is cached: its record (which the result cache's key
    already ties to the program), the hardware entry, the mesh and the analysis code."""
    kept = {k: v for k, v in record.to_dict().items() if k not in _VOLATILE}
    return key_of({"record": kept, "hardware": asdict(hardware), "mesh": mesh_shape, "coords": coords,
                   "code": source_hash(*ANALYSIS_SOURCES)})


def encode_unit(analysis: dict) -> bytes:
    """A unit's analysis as the cache and analysis.json store it (a cached unit reads back identical)."""
    return json.dumps(analysis, sort_keys=True, default=float).encode()


def analyze_texts(record: CompileRecord, texts: dict[str, str], hardware: Hardware, mesh: dict) -> dict:
    """A unit's analysis from its HLO texts in memory (a build worker, before any folder is
    written); `mesh` as build.json records it."""
    def programs() -> tuple[HloProgram, HloProgram | None]:
        return HloProgram(texts["hlo"]), HloProgram(texts["pre"]) if texts.get("pre") else None
    return analyze_unit(record, programs, hardware, ordered_shape(mesh), mesh.get("device_coords"))


def analyze_build(folder: Path, hardware: Hardware | None = None, name: str | None = None,
                  cache: DerivedCache | None = None) -> dict:
    """`name`: the build folder's final name when `folder` is still the staging folder.
    `cache`: where each compiled unit's analysis is kept, keyed by its record (which the
    result cache's key already ties to the program), the hardware entry, the mesh and the
    analysis code: a warm build parses no HLO."""
    folder = Path(folder)
    build = read_build(folder)
    hardware = hardware or build_parts(build, folder)[1]
    mesh_shape = ordered_shape(build["mesh"])
    coords = build["mesh"].get("device_coords")
    units = {}
    for r in read_records(folder):
        key = None
        if cache and r.status == "ok" and r.cache_key:
            key = unit_key(r, hardware, mesh_shape, coords)
            units[r.unit.id] = cache.get_json(key)
        if units.get(r.unit.id) is None:
            def programs(r=r) -> tuple[HloProgram, HloProgram | None]:
                return (_program(folder, r.hlo_file, r.hlo_sha256),
                        _program(folder, r.pre_hlo_file) if r.pre_hlo_file else None)
            units[r.unit.id] = analyze_unit(r, programs, hardware, mesh_shape, coords)
            if key:
                encoded = encode_unit(units[r.unit.id])
                cache.put(key, "json", encoded)
                units[r.unit.id] = json.loads(encoded)
    out = {
        "schema": SCHEMA, "schema_version": SCHEMA_VERSION,
        "build": {"folder": name or folder.name, "target": build["request"]["target"], "mesh": build["mesh"],
                  "model": build["request"]["checkpoint"] or build["request"]["model"],
                  "hardware": asdict(hardware), "toolchain": build["toolchain"]},
        "units": units,
    }
    agreement = compare_models(out)
    if agreement is not None:
        out["model_agreement"] = agreement
    return out


def write_json(path: Path, data: dict) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=1, sort_keys=True, default=float))
    tmp.replace(path)
