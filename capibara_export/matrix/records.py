"""The compile record: one JSON object per unit, one versioned schema.

A unit is (target, mesh, model, entry, plan, precision, batch, program options). Its
record says what happened (ok, invalid, does-not-fit, compile-error) and, when it
compiled, what the compiled program is: timings, memory analysis, raw cost analysis,
the optimized HLO's hash, and the toolchain that made it. Records are written one per
line to `records.jsonl` in the build folder.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import platform
from dataclasses import dataclass, field
from functools import lru_cache
from importlib import metadata
from pathlib import Path, PurePosixPath

SCHEMA = "capibara-export/compile-record"
SCHEMA_VERSION = 1

STATUSES = ("ok", "invalid", "does-not-fit", "compile-error")

_TOOLCHAIN_PACKAGES = ("jax", "jaxlib", "libtpu", "flax", "optax", "orbax-checkpoint", "tensorflow-cpu",
                       "transformers", "numpy")


@lru_cache(maxsize=1)
def toolchain() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for name in _TOOLCHAIN_PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "absent"
    return versions


@lru_cache(maxsize=1)
def code_version(model_module: str | None = None) -> str:
    """Hash of every source file that shapes a compiled program: the model interface, the
    built-in models, sharding and the pipeline's program and compile code, and the file of a
    user's --model-module. Any edit there invalidates the result cache."""
    root = Path(__file__).resolve().parents[2]
    here = Path(__file__).resolve().parent
    files = sorted([*root.glob("modelapi/*.py"), *root.glob("model/**/*.py"), *root.glob("sharding/*.py"),
                    *root.glob("sharding/*.toml"), root / "capibara_export" / "families.py",
                    *(here / f for f in ("programs.py", "serving.py", "compile.py", "targets.py"))])
    digest = hashlib.sha256()
    for f in files:
        digest.update(f.relative_to(root).as_posix().encode())
        digest.update(f.read_bytes())
    if model_module:
        import importlib.util

        spec = importlib.util.find_spec(model_module.split(":")[0])
        digest.update(model_module.encode())
        if spec is not None and spec.origin and Path(spec.origin).is_file():
            digest.update(Path(spec.origin).read_bytes())
    return digest.hexdigest()[:16]


@dataclass(frozen=True)
class Unit:
    target: str
    mesh: str              # "4x8"
    model: str             # preset or checkpoint name
    model_hash: str        # hash of the model config
    entry: str
    plan: str
    precision: str
    batch: int
    options: dict = field(default_factory=dict, hash=False)

    @property
    def id(self) -> str:
        """Readable and unique within a build: entry-plan-precision-bN."""
        return f"{self.entry}-{self.plan}-{self.precision}-b{self.batch}"

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclass
class CompileRecord:
    unit: Unit
    status: str
    reason: str = ""
    lower_s: float | None = None
    compile_s: float | None = None
    memory: dict | None = None        # bytes per device, from Compiled.memory_analysis()
    needed_bytes: int | None = None   # does-not-fit: bytes per device the program needs
    cost: dict | None = None          # Compiled.cost_analysis() as reported (scanned bodies counted once)
    hlo_sha256: str | None = None
    hlo_file: str | None = None       # optimized per-device HLO text, relative to the build folder
    pre_hlo_file: str | None = None   # the program before partitioning (global shapes)
    analytic_flops: int | None = None  # the model config's count for the whole program
    plan_description: str = ""
    mesh: dict | None = None          # shape, axis names, device kind and order
    hardware: str | None = None
    toolchain: dict = field(default_factory=toolchain)
    code_version: str = field(default_factory=code_version)
    cache_key: str = ""
    cached: bool = False              # true when this run read it from the result cache
    origin: dict | None = None        # a derived plan's unit: the hotspot that proposed it (plan_search.py)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["unit"] = self.unit.to_dict()
        d["unit_id"] = self.unit.id
        return {"schema": SCHEMA, "schema_version": SCHEMA_VERSION, **d}

    @classmethod
    def from_dict(cls, d: dict) -> CompileRecord:
        """A record read back (records.jsonl, the result cache), every field's type checked:
        ValueError naming the field otherwise."""
        if d.get("schema") != SCHEMA or d.get("schema_version") != SCHEMA_VERSION:
            raise ValueError(f"record schema {d.get('schema')} v{d.get('schema_version')} is not "
                             f"{SCHEMA} v{SCHEMA_VERSION}; rebuild with this version")
        body = {k: v for k, v in d.items() if k not in ("schema", "schema_version", "unit_id")}
        unit = body.get("unit")
        if not isinstance(unit, dict) or set(unit) != set(_UNIT_TYPES):
            raise ValueError(f"`unit` must be an object with {', '.join(_UNIT_TYPES)}")
        _check_types(unit, _UNIT_TYPES, "unit.")
        if unit["batch"] < 1:
            raise ValueError(f"`unit.batch` is {unit['batch']}")
        unknown = set(body) - set(_RECORD_TYPES)
        if unknown or "status" not in body:
            raise ValueError(f"unknown field `{min(unknown)}`" if unknown else "no `status`")
        _check_types(body, _RECORD_TYPES, "")
        if body["status"] not in STATUSES:
            raise ValueError(f"`status` {body['status']!r} is not one of {', '.join(STATUSES)}")
        if not all(_is(v, (int, float)) for v in (body.get("cost") or {}).values()):
            raise ValueError("`cost` holds a value that is not a number")
        memory = body.get("memory")
        if memory is not None:
            if set(memory) - set(_MEMORY_TYPES) or not _is(memory.get("peak"), int):
                raise ValueError(f"`memory` is not {{{', '.join(_MEMORY_TYPES)}}} with an integer peak")
            _check_types(memory, _MEMORY_TYPES, "memory.")
            if not all(_is(v, int) for v in memory.get("arguments_by_kind", {}).values()):
                raise ValueError("`memory.arguments_by_kind` holds a value that is not an integer")
        for name in ("hlo_file", "pre_hlo_file"):
            _check_hlo_path(name, body.get(name))
        body["unit"] = Unit(**unit)
        return cls(**body)


def _is(value, types) -> bool:
    """isinstance, except that a bool is no number."""
    types = types if isinstance(types, tuple) else (types,)
    return isinstance(value, types) and (bool in types or not isinstance(value, bool))


def _check_types(data: dict, types: dict, prefix: str) -> None:
    for name, allowed in types.items():
        if name in data and not _is(data[name], allowed):
            raise ValueError(f"`{prefix}{name}` is {type(data[name]).__name__}")


def _check_hlo_path(name: str, relative: str | None) -> None:
    """An HLO path stays inside the build folder: None, or hlo/<file>.gz."""
    if relative is None:
        return
    p = PurePosixPath(relative)
    if p.is_absolute() or len(p.parts) != 2 or p.parts[0] != "hlo" or not p.name.endswith(".gz") or "\\" in relative:
        raise ValueError(f"`{name}` {relative!r} is not hlo/<name>.gz inside the build folder")


_NONE = type(None)
_NUMBER = (int, float)
_UNIT_TYPES = {"target": str, "mesh": str, "model": str, "model_hash": str, "entry": str, "plan": str,
               "precision": str, "batch": int, "options": dict}
_MEMORY_TYPES = {"argument": int, "output": int, "alias": int, "temp": int, "generated_code": int, "peak": int,
                 "peak_source": str, "arguments_by_kind": dict}
_RECORD_TYPES = {
    "unit": dict, "status": str, "reason": str, "lower_s": (*_NUMBER, _NONE), "compile_s": (*_NUMBER, _NONE),
    "memory": (dict, _NONE), "needed_bytes": (int, _NONE), "cost": (dict, _NONE), "hlo_sha256": (str, _NONE),
    "hlo_file": (str, _NONE), "pre_hlo_file": (str, _NONE), "analytic_flops": (int, _NONE),
    "plan_description": str, "mesh": (dict, _NONE), "hardware": (str, _NONE), "toolchain": dict,
    "code_version": str, "cache_key": str, "cached": bool, "origin": (dict, _NONE),
}


def write_records(path: Path, records: list[CompileRecord]) -> None:
    path.write_text("".join(json.dumps(r.to_dict(), sort_keys=True) + "\n" for r in records))
