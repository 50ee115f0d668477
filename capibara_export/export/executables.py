"""Serialized compiled executables (jax.experimental.serialize_executable) of the selected units.

Each is three files: `<unit>.xla` (the executable), `<unit>.trees.pkl` (its input and
output tree structures, pickled as JAX does) and an entry in the manifest with the
input/output specs. They run only where they were compiled for (the same TPU topology, or
this CPU mesh) and only with the exact jax/jaxlib/libtpu that made them; `load` checks
the hash, the toolchain and the devices before unpickling anything.
"""

from __future__ import annotations

import pickle
from pathlib import Path

import jax
from jax.experimental import serialize_executable

from .manifest import BundleError, check_hash, check_toolchain


def save(compiled: jax.stages.Compiled, folder: Path, name: str) -> tuple[Path, Path]:
    payload, in_tree, out_tree = serialize_executable.serialize(compiled)
    exe, trees = folder / f"{name}.xla", folder / f"{name}.trees.pkl"
    exe.write_bytes(payload)
    trees.write_bytes(pickle.dumps((in_tree, out_tree)))
    return exe, trees


def runnable_here(manifest: dict) -> tuple[bool, str]:
    """Whether this machine has the devices the executables were compiled for."""
    platform = manifest["mesh"]["platform"]
    want = manifest["mesh"]["devices"]
    have = [d for d in jax.devices() if d.platform == platform] if platform != "cpu" else jax.devices("cpu")
    if len(have) < want:
        return False, f"compiled for {want} {manifest['mesh']['device_kind']} devices; this machine has " \
                      f"{len(have)} {platform} device(s)"
    return True, ""


def load(bundle: Path, manifest: dict, artifact: dict):
    """Deserialize after checking hash, toolchain and devices, in that order."""
    problem = check_hash(bundle, artifact)
    trees = next(a for a in manifest["artifacts"] if a["path"] == artifact["trees"])
    problem = problem or check_hash(bundle, trees)
    if problem:
        raise BundleError(problem)
    check_toolchain(manifest, artifact["path"])
    ok, why = runnable_here(manifest)
    if not ok:
        raise BundleError(f"{artifact['path']}: not runnable here: {why}")
    in_tree, out_tree = pickle.loads((Path(bundle) / artifact["trees"]).read_bytes())
    payload = (Path(bundle) / artifact["path"]).read_bytes()
    platform = manifest["mesh"]["platform"]
    by_id = {d.id: d for d in jax.devices(platform)}
    order = [by_id[i] for row in manifest["mesh"]["device_ids"] for i in row]
    return serialize_executable.deserialize_and_load(payload, in_tree, out_tree, backend=platform,
                                                     execution_devices=order)
