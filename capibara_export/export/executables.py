"""Serialized compiled executables (jax.experimental.serialize_executable) of the selected units.

Each is two files and a manifest entry: `<unit>.xla` (JAX's payload: a pickle around the
compiled program) and `<unit>.trees.json` (its input and output tree structures as plain
JSON, from which the loader rebuilds the treedefs: pytrees are not serializable, and a
pickled treedef would be one more pickle to trust).

Trust: JAX's own docstring says loading a serialized executable "may run arbitrary code".
Two doors, closed separately:
- the pickle: its globals are listed statically (`pickle_scan`) and must all be in
  EXECUTABLE_GLOBALS, the classes JAX 0.10.2's serializer writes; the loader's unpickler
  admits only those as well. This check runs on every bundle, loadable here or not.
- the compiled code itself is code: it is loaded only from a bundle whose signature was
  checked against a trusted key, or with an explicit opt-in (`trust.py`).
They run only where they were compiled for (the same TPU topology, or this CPU mesh) and
only with the exact jax/jaxlib/libtpu that made them.
"""

from __future__ import annotations

import io
import json
import pickle
from pathlib import Path

import jax
import numpy as np
from jax.experimental import serialize_executable

from ..analysis.hardware import host_available_bytes
from . import pickle_scan
from .manifest import BundleError

# Every global the pickles of jax 0.10.2's serialize_executable name (listed from the
# payloads of every entry, plan and precision this project exports; a test keeps it so).
EXECUTABLE_GLOBALS = frozenset({
    ("jax", "P"), ("jax._src.core", "ManualAxisType"), ("jax._src.core", "MemorySpace"),
    ("jax._src.core", "ShapedArray"), ("jax._src.interpreters.pxla", "AllArgsInfo"),
    ("jax._src.interpreters.pxla", "UnloadedMeshExecutable"), ("jax._src.layout", "Layout"),
    ("jax._src.linear_util", "DebugInfo"), ("jax._src.mesh", "AbstractDevice"), ("jax._src.mesh", "AbstractMesh"),
    ("jax._src.mesh", "AxisType"), ("jax._src.mesh", "Mesh"), ("jax._src.named_sharding", "_unpickle_named_sharding"),
    ("jax._src.stages", "ArgInfo"), ("jaxlib._jax", "DeviceList"), ("numpy", "dtype"), ("numpy", "ndarray"),
    ("numpy._core.multiarray", "_reconstruct"), ("ml_dtypes", "bfloat16"),
})
TREES_FORMAT = "capibara-export/pytree-structure"


# ------------------------------------------------------------------ tree structures as JSON
def tree_to_json(treedef) -> dict:
    """A treedef as JSON: {"leaf"}, {"none"}, {"tuple": [...]}, {"list": [...]},
    {"dict": [[key, ...], ...]} (keys in JAX's order). Other node types cannot be described
    and are refused at export."""
    skeleton = jax.tree_util.tree_unflatten(treedef, [_Leaf()] * treedef.num_leaves)
    return _describe(skeleton)


class _Leaf:
    pass


def _describe(node) -> dict:
    if isinstance(node, _Leaf):
        return {"leaf": True}
    if node is None:
        return {"none": True}
    if type(node) is tuple:
        return {"tuple": [_describe(x) for x in node]}
    if type(node) is list:
        return {"list": [_describe(x) for x in node]}
    if type(node) is dict and all(isinstance(k, str) for k in node):
        return {"dict": [[k, _describe(v)] for k, v in node.items()]}
    raise BundleError(f"cannot describe a pytree node of type {type(node).__name__} as JSON")


def tree_from_json(desc) -> object:
    """The treedef a description stands for (the inverse of tree_to_json)."""
    return jax.tree_util.tree_structure(_rebuild(desc, 0), is_leaf=lambda x: x is _LEAF)


_LEAF = object()


def _rebuild(desc, depth: int):
    if depth > 64 or not isinstance(desc, dict) or len(desc) != 1:
        raise BundleError("tree description is not a nested {leaf|none|tuple|list|dict} object")
    (kind, value), = desc.items()
    if kind == "leaf":
        return _LEAF
    if kind == "none":
        return None
    if kind in ("tuple", "list") and isinstance(value, list):
        items = [_rebuild(x, depth + 1) for x in value]
        return tuple(items) if kind == "tuple" else items
    if kind == "dict" and isinstance(value, list) and all(
            isinstance(p, list) and len(p) == 2 and isinstance(p[0], str) for p in value):
        return {k: _rebuild(v, depth + 1) for k, v in value}
    raise BundleError(f"tree description has an unknown node {kind!r}")


def read_trees(path: Path) -> tuple:
    """(in_tree, out_tree) from a trees file; refuses anything that is not the JSON form."""
    try:
        data = json.loads(Path(path).read_bytes())
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise BundleError(f"{path.name}: not a JSON tree description (an old or crafted pickle?); "
                          "re-export the bundle") from None
    if not isinstance(data, dict) or data.get("format") != TREES_FORMAT:
        raise BundleError(f"{path.name}: not a {TREES_FORMAT} file")
    return tree_from_json(data.get("in_tree")), tree_from_json(data.get("out_tree"))


# ------------------------------------------------------------------ save / check / load
def serialize(compiled: jax.stages.Compiled, name: str) -> tuple[bytes, str]:
    """(JAX's payload, the JSON tree description) of a compiled executable, checked: the
    payload names only allowed classes, the trees survive their JSON form."""
    payload, in_tree, out_tree = serialize_executable.serialize(compiled)
    check_payload(payload, name)
    described = {"format": TREES_FORMAT, "in_tree": tree_to_json(in_tree), "out_tree": tree_to_json(out_tree)}
    if (tree_from_json(described["in_tree"]), tree_from_json(described["out_tree"])) != (in_tree, out_tree):
        raise BundleError(f"{name}: its tree structures do not survive the JSON description")
    return payload, json.dumps(described)


def write(payload: bytes, trees: str, folder: Path, name: str) -> tuple[Path, Path]:
    """`<name>.xla` and `<name>.trees.json` in `folder` (a serialized pair, fresh or cached)."""
    check_payload(payload, name)
    exe, trees_path = folder / f"{name}.xla", folder / f"{name}.trees.json"
    exe.write_bytes(payload)
    trees_path.write_text(trees)
    read_trees(trees_path)
    return exe, trees_path


def check_payload(payload: bytes, label: str) -> None:
    """Refuse a payload that names any class JAX's serializer does not write (runs nothing)."""
    try:
        pickle_scan.check(payload, EXECUTABLE_GLOBALS)
    except pickle_scan.PickleRefused as err:
        raise BundleError(f"{label}: executable payload refused: {err}") from None


class _AllowListUnpickler(serialize_executable._JaxPjrtUnpickler):
    """JAX's own unpickler (devices and executables via persistent ids), admitting only
    EXECUTABLE_GLOBALS: defence in depth behind the static scan."""

    def find_class(self, module, name):
        if (module, name) not in EXECUTABLE_GLOBALS:
            raise pickle.UnpicklingError(f"{module}.{name} is not allowed in an executable payload")
        return super().find_class(module, name)


def runtime_mismatch(manifest: dict, simulated: bool = False) -> str | None:
    """One line naming both sides when this JAX runtime is not the one the bundle's sharded
    artifacts were compiled for: processes (one per host), devices per process, device kind
    (the manifest's mesh.hosts, recorded at build time); None when it is. `simulated`: the
    hosts' devices are simulated CPU devices (serve --cpu-devices), so the kind is not checked."""
    mesh = manifest["mesh"]
    hosts = mesh.get("hosts") or {}
    platform, kind = ("cpu" if simulated else mesh["platform"]), mesh["device_kind"]
    procs = int(hosts.get("processes", 1))
    per = int(hosts.get("devices_per_process", mesh["devices"]))
    local = [d for d in jax.local_devices() if d.platform == platform] if platform != "cpu" else \
        jax.local_devices(backend="cpu")
    kinds = sorted({d.device_kind for d in local})
    enough = len(local) >= per if platform == "cpu" else len(local) == per   # CPU devices are simulated
    if jax.process_count() == procs and enough and (platform == "cpu" or kinds == [kind]):
        return None
    chip = f", {hosts['chip_config']}" if hosts.get("chip_config") else ""
    here = (f"this runtime has {jax.process_count()} process(es) with {len(local)} {platform} device(s) each"
            + (f" ({', '.join(kinds)})" if kinds and platform != "cpu" else ""))
    fix = ("start one process per host of the target slice" if procs > 1 else "run it on a machine with those devices")
    return (f"compiled for {procs} process(es) x {per} {kind} device(s){chip}; {here}; {fix}"
            + (f"; note: {hosts['runtime']}" if hosts.get("default_runtime_loads") is False else ""))


def runnable_here(manifest: dict, artifact: dict | None = None) -> tuple[bool, str]:
    """Whether this runtime is the one the executables were compiled for (`runtime_mismatch`)
    and, for simulated CPU devices (which share this host's memory), has the memory the
    artifact's compiled peak says all of them need together."""
    mismatch = runtime_mismatch(manifest) if manifest["mesh"].get("hosts") else None
    if mismatch:
        return False, mismatch
    platform = manifest["mesh"]["platform"]
    want = manifest["mesh"]["devices"]
    have = [d for d in jax.devices() if d.platform == platform] if platform != "cpu" else jax.devices("cpu")
    if len(have) < want:
        return False, f"compiled for {want} {manifest['mesh']['device_kind']} devices; this machine has " \
                      f"{len(have)} {platform} device(s)"
    analysis = (artifact or {}).get("analysis")
    peak = analysis.get("peak_bytes_per_device") if isinstance(analysis, dict) else None
    if platform == "cpu" and isinstance(peak, (int, float)) and not isinstance(peak, bool):
        need, free = peak * want, host_available_bytes()
        if need > free:
            return False, (f"needs about {need / 2 ** 30:.1f} GiB of host memory ({peak / 2 ** 30:.2f} GiB per "
                           f"device x {want} simulated devices, the compiled peak); {free / 2 ** 30:.1f} GiB are "
                           "available here")
    return True, ""


def execution_devices(manifest: dict) -> list:
    """The devices in the order the executable was compiled for (the manifest's mesh order)."""
    platform = manifest["mesh"]["platform"]
    by_id = {d.id: d for d in jax.devices(platform)}
    ids = [int(i) for i in np.ravel(manifest["mesh"]["device_ids"])]   # row-major, any mesh rank
    missing = [i for i in ids if i not in by_id]
    if missing:
        raise BundleError(f"compiled for {platform} devices {missing[:4]}..., which this runtime does not have")
    return [by_id[i] for i in ids]


def load(payload_path: Path, trees_path: Path, platform: str, devices: list):
    """Deserialize (after the caller checked hash, trust, toolchain and devices)."""
    payload = Path(payload_path).read_bytes()
    check_payload(payload, Path(payload_path).name)
    in_tree, out_tree = read_trees(trees_path)
    backend = devices[0].client
    unloaded, args_info_flat, no_kwargs = _AllowListUnpickler(io.BytesIO(payload), backend, devices).load()
    return jax.stages.Compiled(unloaded.load(), [], in_tree.unflatten(args_info_flat), out_tree,
                               no_kwargs=no_kwargs)
