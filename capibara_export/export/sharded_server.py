"""Serving a bundle's selected sharded programs on the runtime they were built for.

The same code runs in every process of the slice (`python -m capibara_export serve`, or this
module's `ShardedServer` inside a serving team's own server, after `multihost.join`):

1. the bundle is opened as every command opens it (loading.py: manifest, signature, paths),
   and the artifacts this process will use are hash-checked and read without running;
2. the runtime is compared with the manifest's hosts (processes, local devices, kind);
3. the mesh is built by mesh position (multihost.mesh_by_position), never by raw device id;
4. the parameters are restored from the orbax checkpoint with the program's own input
   shardings, so each host reads only the shards its devices hold;
5. the program is the serialized executable where this platform, toolchain and trust allow
   it, else the sharded jax.export artifact (lowered for the target platform and cpu);
6. each input is placed from the global array with `jax.make_array_from_callback`: a host
   materialises only the slices its devices own; outputs are gathered onto every process.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..bundle_error import BundleError
from . import executables, stablehlo
from . import manifest as mf
from . import params as params_io
from .arrays import as_declared
from .loading import OpenedBundle, inspect_artifact, open_bundle
from .trust import TrustPolicy


def sharded_artifact(manifest: dict, entry: str, precision: str | None = None, batch: int | None = None) -> dict:
    """The selected unit's sharded jax.export artifact for `entry` (and `precision`, `batch`)."""
    found = [a for a in manifest["artifacts"] if a["kind"] == "jax.export-sharded" and a["entry"] == entry
             and precision in (None, a["precision"]) and batch in (None, a.get("batch"))]
    if len(found) == 1:
        return found[0]
    have = sorted({f"{a['entry']} ({a['precision']})" for a in manifest["artifacts"]
                   if a["kind"] == "jax.export-sharded"})
    if not found:
        refused = [s["refused"] for s in manifest.get("selection", []) if s.get("refused") and s["entry"] == entry
                   and precision in (None, s["precision"])]
        raise BundleError(f"the bundle has no sharded program for {entry}"
                          + (f" in {precision}" if precision else "") + f"; it has: {', '.join(have) or 'none'}"
                          + (f"; the build's selection {refused[0]}" if refused else ""))
    if len({a["precision"] for a in found}) > 1:
        raise BundleError(f"the bundle has {entry} in {len(found)} precisions: choose one with --precision "
                          f"({', '.join(a['precision'] for a in found)})")
    raise BundleError(f"the bundle has {entry} at batch sizes {', '.join(str(a.get('batch')) for a in found)}: "
                      "`serve` runs one; the live server (`server`) serves them all")


def _checked(opened: OpenedBundle, a: dict) -> None:
    problem = mf.check_hash(opened.folder, a) or inspect_artifact(opened, a)
    if problem:
        raise BundleError(f"{opened.folder}: refusing to serve: {problem}")


@dataclass
class ShardedServer:
    """One entry of a bundle, restored and ready on this host's share of the slice."""
    opened: OpenedBundle
    artifact: dict
    program: Callable
    program_kind: str                      # "executable" or "jax.export-sharded"
    program_path: str                      # the artifact it was loaded from
    params: dict
    input_shardings: list                  # one per input leaf, after the parameters
    input_tree: object
    notes: list[str] = field(default_factory=list)

    @classmethod
    def open(cls, bundle: Path | OpenedBundle, entry: str, precision: str | None = None,
             policy: TrustPolicy = TrustPolicy(), use_executable: bool = True, batch: int | None = None,
             restored: dict | None = None) -> ShardedServer:
        """`bundle`: a folder (opened here with `policy`) or a bundle already opened. `restored`:
        parameters already restored by another program of the same plan (the live server opens
        one program per compiled batch size; the parameters are read once)."""
        import jax

        opened = bundle if isinstance(bundle, OpenedBundle) else open_bundle(Path(bundle), policy)
        manifest = opened.manifest
        a = sharded_artifact(manifest, entry, precision, batch)
        platform = jax.default_backend()
        mismatch = executables.runtime_mismatch(manifest, simulated=platform == "cpu")
        if mismatch:
            raise BundleError(f"{a['path']}: {mismatch}")
        from .multihost import mesh_by_position

        mesh = mesh_by_position(manifest)
        _checked(opened, a)
        _checked(opened, opened.artifact(a["params"]))
        exported = stablehlo.load(opened.path(a))
        if platform not in exported.platforms:
            raise BundleError(f"{a['path']} was lowered for {', '.join(exported.platforms)}; this runtime is "
                              f"{platform}: run it on the slice it was built for")
        notes = []
        program, kind, path = exported.call, "jax.export-sharded", a["path"]
        flat = list(exported.in_shardings_jax(mesh))
        exe = next((x for x in manifest["artifacts"] if x["kind"] == "executable" and x["unit"] == a["unit"]), None)
        if exe is not None and use_executable:
            why = ((None if platform == manifest["mesh"]["platform"] else
                    f"compiled for {manifest['mesh']['platform']}, this runtime is {platform}")
                   or _toolchain_problem(manifest, exe) or opened.executables_refused())
            if why is None:
                _checked(opened, exe)
                loaded = executables.load(opened.path(exe), opened.path(exe, "trees"), platform,
                                          list(mesh.devices.flat))
                program, kind, path = loaded, "executable", exe["path"]  # same mesh and shardings as the export
            else:
                notes.append(f"serialized executable not used: {why}")
        abstract = [jax.ShapeDtypeStruct(av.shape, av.dtype, sharding=s) for av, s in zip(exported.in_avals, flat)]
        (params_abstract, *inputs_abstract), _ = jax.tree.unflatten(exported.in_tree, abstract)
        args_tree = jax.tree.structure(tuple(inputs_abstract))
        params = restored if restored is not None else \
            params_io.restore(opened.path(opened.artifact(a["params"])), params_abstract)
        n_params = len(jax.tree.leaves(params_abstract))
        share = host_share(params)
        notes.append(f"parameters restored on this host: sharded {share['sharded_here']} of {share['sharded_total']} "
                     f"bytes, replicated {share['replicated']} bytes, not read by the program {share['unused']} bytes")
        return cls(opened, a, program, kind, path, params, flat[n_params:], args_tree, notes)

    @property
    def input_specs(self) -> list[dict]:
        return self.artifact["inputs"]

    @property
    def output_names(self) -> list[str]:
        return [t["name"] for t in self.artifact["outputs"]]

    def __call__(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Global inputs by name (every process passes the same) -> global outputs by name,
        gathered onto every process."""
        import jax
        from jax.experimental import multihost_utils

        leaves = []
        for spec, sharding in zip(self.input_specs, self.input_shardings):
            value = _input(inputs, spec, self.artifact["path"])
            leaves.append(value if sharding is None else   # None: an input the program does not read
                          jax.make_array_from_callback(value.shape, sharding, lambda idx, v=value: v[idx]))
        out = self.program(self.params, *jax.tree.unflatten(self.input_tree, leaves))
        gathered = [np.asarray(x) for x in multihost_utils.process_allgather(jax.tree.leaves(out), tiled=True)]
        return dict(zip(self.output_names, gathered))


def host_share(arrays: dict) -> dict[str, int]:
    """Bytes of the distinct slices this process's devices hold of the arrays sharded over
    devices, those arrays' whole bytes, the replicated arrays' bytes, and the unused ones'."""
    import jax

    share = {"sharded_here": 0, "sharded_total": 0, "replicated": 0, "unused": 0}
    for x in arrays.values():
        whole = x.size * x.dtype.itemsize
        if not isinstance(x, jax.Array):   # the program does not read it: no sharding, left on the host
            share["unused"] += whole
        elif x.sharding.is_fully_replicated:
            share["replicated"] += whole
        else:
            seen = {tuple((i.start, i.stop) for i in s.index): s.data.size for s in x.addressable_shards}
            share["sharded_here"] += sum(seen.values()) * x.dtype.itemsize
            share["sharded_total"] += whole
    return share


def _toolchain_problem(manifest: dict, exe: dict) -> str | None:
    try:
        mf.check_toolchain(manifest, exe["path"])
    except BundleError as err:
        return str(err)
    return None


def _input(inputs: Mapping[str, np.ndarray], spec: dict, rel: str) -> np.ndarray:
    name, shape, dtype = spec["name"], tuple(spec["shape"]), np.dtype(spec["dtype"])
    if name not in inputs:
        raise BundleError(f"{rel} needs input {name!r} {list(shape)} {dtype}; the inputs have "
                          f"{', '.join(sorted(inputs)) or 'none'}")
    value = as_declared(inputs[name], dtype)
    if value.shape != shape or value.dtype != dtype:
        raise BundleError(f"input {name!r} is {list(value.shape)} {value.dtype}; {rel} was exported for "
                          f"{list(shape)} {dtype}")
    return value
