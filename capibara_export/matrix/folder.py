"""Reading a build folder: the one boundary every command crosses to use what `build` wrote.

A build folder may come from elsewhere (a colleague's machine, a CI artifact) or be damaged
(a truncated copy, a hand edit), so nothing in it is trusted: each file is a regular file of
bounded size, parsed as JSON of the expected shape, and every field a command reads is
checked for its type here, before any work starts. A record's HLO paths stay inside the
folder's `hlo/` and an HLO text must hash to what its record says. Anything else is one
`BuildFolderError` line naming the file (and line or field) and the fix: run `build` again.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import stat
import zlib
from pathlib import Path

from modelapi.errors import UserError

from .records import CompileRecord

MAX_JSON_BYTES = 256 * 2 ** 20     # records.jsonl of a large matrix stays far below
MAX_HLO_BYTES = 1 * 2 ** 30        # decompressed HLO text of one unit (base decode programs: tens of MB)
REBUILD = "run `python -m capibara_export build` again to rewrite it"


class BuildFolderError(UserError):
    """A build folder that is missing, damaged or not written by this version."""


def regular_file(path: Path, limit: int, what: str) -> Path:
    """`path` if it is a regular file (not a link) of at most `limit` bytes."""
    try:
        st = path.lstat()
    except OSError:
        raise BuildFolderError(f"{path}: missing; this is not a whole build folder ({REBUILD})") from None
    if not stat.S_ISREG(st.st_mode):
        raise BuildFolderError(f"{path}: not a regular file; a build folder's {what} is a file ({REBUILD})")
    if st.st_size > limit:
        raise BuildFolderError(f"{path}: {st.st_size} bytes, more than a {what} can be ({limit}); {REBUILD}")
    return path


def _json(text: bytes | str, where: str):
    try:
        return json.loads(text)
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise BuildFolderError(f"{where}: not valid JSON ({getattr(err, 'msg', err)}); {REBUILD}") from None


def read_json(path: Path, what: str) -> dict:
    data = _json(regular_file(path, MAX_JSON_BYTES, what).read_bytes(), str(path))
    if not isinstance(data, dict):
        raise BuildFolderError(f"{path}: not a JSON object; {REBUILD}")
    return data


def _field(data: dict, dotted: str, types: type | tuple[type, ...], where: Path):
    """data[a][b]... checked for its type (bool never passes for a number)."""
    value = data
    for key in dotted.split("."):
        if not isinstance(value, dict) or key not in value:
            raise BuildFolderError(f"{where}: no field `{dotted}`; {REBUILD}")
        value = value[key]
    if not isinstance(value, types) or (isinstance(value, bool) and bool not in _tuple(types)):
        raise BuildFolderError(f"{where}: field `{dotted}` is {type(value).__name__}, not "
                               f"{' or '.join(t.__name__ for t in _tuple(types))}; {REBUILD}")
    return value


def _tuple(types) -> tuple:
    return types if isinstance(types, tuple) else (types,)


# build.json fields the commands read, with their types
_BUILD_FIELDS = {
    "request.target": str, "request.model": str, "request.checkpoint": (str, type(None)), "request.out": str,
    "request.use_cache": bool, "request.precisions": list, "request.options": dict,
    "mesh.shape.data": int, "mesh.shape.model": int, "target.name": str, "hardware": dict, "toolchain": dict,
    "model_config": dict, "plans": dict,
}


def ordered_shape(mesh: dict) -> dict[str, int]:
    """{axis: size} of a recorded mesh (build.json's or a manifest's) in mesh order: JSON
    writers may sort `shape`'s keys, `axis_names` keeps the order ("dcn" first on slices)."""
    shape = mesh["shape"]
    names = [a for a in mesh.get("axis_names", ()) if a in shape]
    return {str(a): int(shape[a]) for a in (names if len(names) == len(shape) else shape)}


def read_build(folder: Path) -> dict:
    """build.json, with the type of every field a command reads checked."""
    path = Path(folder) / "build.json"
    build = read_json(path, "build.json")
    for dotted, types in _BUILD_FIELDS.items():
        _field(build, dotted, types, path)
    shape = build["mesh"]["shape"]
    if set(shape) - {"dcn"} != {"data", "model"} or not all(
            isinstance(n, int) and not isinstance(n, bool) and n >= 1 for n in shape.values()):
        raise BuildFolderError(f"{path}: mesh shape {shape} is not a (dcn,) data, model mesh; {REBUILD}")
    if not all(isinstance(p, str) for p in build["request"]["precisions"]):
        raise BuildFolderError(f"{path}: field `request.precisions` is not a list of names; {REBUILD}")
    coords = build["mesh"].get("device_coords")
    if coords is not None and not (isinstance(coords, list) and all(
            isinstance(c, list) and all(isinstance(i, int) and not isinstance(i, bool) for i in c) for c in coords)):
        raise BuildFolderError(f"{path}: field `mesh.device_coords` is not a list of integer coordinates; {REBUILD}")
    return build


def recorded_model(build: dict) -> dict:
    """build.json's model as families.for_record reads it: its family (BLIP when a folder
    written before families names none), the user module it came from, and its config."""
    return {"family": build.get("model_family", "blip"),
            "module": build.get("model_module") or build["request"].get("model_module"),
            "config": build["model_config"]}


def build_parts(build: dict, folder: Path):
    """(model config, hardware, program options, plans) that build.json describes."""
    from sharding.plans import ShardingPlan

    from ..analysis.hardware import Hardware
    from ..families import config_from_record
    from .programs import ProgramOptions

    path = Path(folder) / "build.json"
    parts = {}
    for name, make in (("model_config", lambda: config_from_record(recorded_model(build))),
                       ("hardware", lambda: Hardware(**build["hardware"])),
                       ("request.options", lambda: ProgramOptions(**build["request"]["options"])),
                       ("plans", lambda: {k: ShardingPlan.from_dict(v) for k, v in build["plans"].items()})):
        try:
            parts[name] = make()
        except (TypeError, ValueError, KeyError, AttributeError) as err:
            why = " ".join(str(err).split())  # a foreign key with a newline stays on the one line
            raise BuildFolderError(f"{path}: field `{name}` cannot be read ({type(err).__name__}: {why}); "
                                   f"{REBUILD}") from None
    return parts["model_config"], parts["hardware"], parts["request.options"], parts["plans"]


def read_records(folder: Path) -> list[CompileRecord]:
    """records.jsonl, one checked record per line (errors name the line)."""
    path = Path(folder) / "records.jsonl"
    text = regular_file(path, MAX_JSON_BYTES, "records.jsonl").read_bytes()
    records = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        data = _json(line, where)
        try:
            if not isinstance(data, dict):
                raise TypeError("not a JSON object")
            records.append(CompileRecord.from_dict(data))
        except (ValueError, TypeError) as err:
            raise BuildFolderError(f"{where}: not a compile record ({err}); {REBUILD}") from None
    return records


def read_selection(folder: Path) -> list[dict]:
    """selection.json's selections: each names an entry, batch, precision and its plan and unit (or none)."""
    path = Path(folder) / "selection.json"
    selections = _field(read_json(path, "selection.json"), "selections", list, path)
    for i, s in enumerate(selections):
        where = f"{path}: selection {i}"
        if not isinstance(s, dict):
            raise BuildFolderError(f"{where} is not a JSON object; {REBUILD}")
        for key, types in (("entry", str), ("batch", int), ("precision", str), ("plan", (str, type(None))),
                           ("unit_id", (str, type(None)))):
            _field(s, key, types, Path(where))
    return selections


def read_analysis(folder: Path) -> dict[str, dict]:
    """analysis.json's units, by unit id."""
    path = Path(folder) / "analysis.json"
    units = _field(read_json(path, "analysis.json"), "units", dict, path)
    bad = [uid for uid, a in units.items() if not isinstance(a, dict)]
    if bad:
        raise BuildFolderError(f"{path}: unit {bad[0]!r} is not a JSON object; {REBUILD}")
    return units


def hlo_text(folder: Path, relative: str | None, sha256: str | None = None) -> str:
    """A record's gzipped HLO text: confined to the folder (records.py checks the path's
    form; links are refused), bounded when decompressed, checked against the record's hash."""
    if not relative:
        raise BuildFolderError(f"{folder}: a compiled unit's record names no HLO file; {REBUILD}")
    path = Path(folder) / relative
    data = regular_file(path, MAX_HLO_BYTES, "HLO file").read_bytes()
    try:
        unzip = zlib.decompressobj(wbits=16 + zlib.MAX_WBITS)  # gzip.decompress has no output bound
        raw = unzip.decompress(data, MAX_HLO_BYTES)
        if unzip.unconsumed_tail:
            raise BuildFolderError(f"{path}: more than {MAX_HLO_BYTES} bytes of HLO text; {REBUILD}")
        text = raw.decode()
    except (zlib.error, gzip.BadGzipFile, EOFError, UnicodeDecodeError) as err:
        raise BuildFolderError(f"{path}: not gzipped HLO text ({err}); {REBUILD}") from None
    if sha256 is not None and hashlib.sha256(raw).hexdigest() != sha256:
        raise BuildFolderError(f"{path}: does not hash to its record's hlo_sha256 (changed after the build); "
                               f"{REBUILD}")
    return text

