"""The format of a serialized compiled executable (jax.experimental.serialize_executable),
as the build caches it and the bundle stores it: `<unit>.xla` (JAX's payload: a pickle
around the compiled program) and `<unit>.trees.json` (its input and output tree structures
as plain JSON, from which the loader rebuilds the treedefs: pytrees are not serializable,
and a pickled treedef would be one more pickle to trust).

Every payload is checked statically against EXECUTABLE_GLOBALS when written and when read
(`check_payload`; nothing is unpickled here). Loading is export/executables.py's.
"""

from __future__ import annotations

import json
from pathlib import Path

import jax
from jax.experimental import serialize_executable

from ..bundle_error import BundleError
from . import pickle_scan

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
