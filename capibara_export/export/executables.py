"""Serialized compiled executables of a bundle, loaded: where they can run, and the loading
itself through an unpickler that admits only the classes JAX's serializer writes.

The format (payload, trees JSON, the allow-list and its static check) is written by the
build: matrix/executable_format.py.

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
import pickle
from pathlib import Path

import jax
import numpy as np
from jax.experimental import serialize_executable

from ..analysis.hardware import host_available_bytes
from ..bundle_error import BundleError
from ..matrix.executable_format import EXECUTABLE_GLOBALS, check_payload, read_trees

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
