"""Compilation targets: which devices a build compiles for, and the 2-D mesh over them.

TPU targets need no TPU: their devices are deviceless descriptions from libtpu
(jax.experimental.topologies.get_topology_desc), enough to compile real executables on
a CPU host, as MaxText's train_compile.py does. `cpu` is N simulated host devices (they
run programs, slowly); `local` is whatever JAX finds (one GPU, say).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, replace

import numpy as np

from modelapi.errors import UserError

from .. import compiler_options
from ..analysis.hardware import CPU_PLACEHOLDER, HARDWARE, Hardware, for_device_kind
from ..environment import DEFAULT_TARGET

MESH_AXES = ("data", "model")
DCN_AXIS = "dcn"          # the slice axis of a multi-slice mesh, in front of MESH_AXES
MAX_SLICES = 64


class TargetError(UserError):
    """A target or mesh that cannot be built here; the message says how to fix it."""


@dataclass(frozen=True)
class Target:
    """A compilation target: a TPU slice (compiled deviceless through libtpu), simulated CPU
    devices, or this machine's own devices (`local`)."""
    name: str
    platform: str                 # tpu | cpu | local
    description: str
    topology: str | None = None   # libtpu topology name, e.g. v4:2x2x4
    chip_config: str | None = None
    devices: int | None = None    # fixed device count (TPU targets)
    hardware: str | None = None   # key into hardware.HARDWARE
    slices: int = 1               # identical slices joined by the data-centre network (TPU only)

    @property
    def deviceless(self) -> bool:
        """Whether programs compile without the devices present (every TPU target)."""
        return self.platform == "tpu"

    def with_slices(self, slices: int) -> Target:
        """S copies of this slice joined by DCN, named `Sx<name>` (`2xtpu-v4-16`)."""
        if slices == 1:
            return self
        if self.platform != "tpu":
            raise TargetError(f"--slices {slices}: only TPU targets have slices; {self.name} is {self.platform} "
                              "(use a tpu-v4-N / tpu-v5e-N preset or a topology)")
        if not 1 < slices <= MAX_SLICES:
            raise TargetError(f"--slices {slices}: choose 1 to {MAX_SLICES}")
        return replace(self, name=f"{slices}x{self.name}", slices=slices, devices=(self.devices or 0) * slices or None,
                       description=f"{slices} x {self.description}, joined by the data-centre network (DCN)")


# DEFAULT_TARGET (environment.py, read before JAX starts) is the seed's hardware (32 v4 chips x
# 32 GiB, 4x8) as a default Cloud TPU runtime exposes it: one megacore device per chip
# (docs/design.md, "Targets and hosts").

# Named slices, as Cloud TPU names them (v4-N: N TensorCores = N/2 chips; v5litepod-N: N chips)
# and as MaxText's accelerator table maps them to libtpu topologies; v4 in megacore mode, one
# device per chip, which is what a default runtime exposes. v5e-1 and v5e-8 are single hosts that
# libtpu's default host bounds (2x2) would split, so they are left out. The 32 TensorCores of a
# v4-32 as separate devices are the topology target `v4:2x2x4` (not what a default runtime loads).
V4_SLICES = {8: "2x2x1", 16: "2x2x2", 32: "2x2x4", 64: "2x4x4", 128: "4x4x4", 256: "4x4x8", 512: "4x8x8",
             1024: "8x8x8", 2048: "8x8x16", 4096: "8x16x16"}
V5E_SLICES = {4: "2x2", 16: "4x4", 32: "4x8", 64: "8x8", 128: "8x16", 256: "16x16"}


def _presets() -> list[Target]:
    v4 = [Target(f"tpu-v4-{n}", "tpu", f"TPU v4-{n} slice: topology v4:{shape}, {n // 2} chips in megacore mode "
                 f"(one device per chip, as a default runtime exposes them)"
                 + ("; the default" if f"tpu-v4-{n}" == DEFAULT_TARGET else ""),
                 topology=f"v4:{shape}", chip_config="megacore", devices=n // 2, hardware="tpu-v4-chip")
          for n, shape in V4_SLICES.items()]
    v5e = [Target(f"tpu-v5e-{n}", "tpu", f"TPU v5e-{n} (v5litepod-{n}) slice: topology v5e:{shape}, {n} chips",
                  topology=f"v5e:{shape}", devices=n, hardware="tpu-v5e-chip") for n, shape in V5E_SLICES.items()]
    return v4 + v5e


TARGETS: dict[str, Target] = {t.name: t for t in (
    *_presets(),
    Target("cpu", "cpu", "N simulated host CPU devices (runs programs; for tests and small models)"),
    Target("local", "local", "whatever devices JAX finds on this machine (e.g. one GPU)"),
)}


# Any slice libtpu can describe, by its topology name: "v4:4x4x4/megacore" (or the file-name
# form "v4-4x4x4-megacore"), "v5e:16x16". Only generations with hardware constants.
_TOPOLOGY = re.compile(r"(?:tpu-)?(?P<gen>v4|v5e|v5p|v6e)[:-](?P<shape>\d+(?:x\d+){1,2})(?:[/-](?P<chip>megacore))?")
_GENERATION_HARDWARE = {("v4", "megacore"): "tpu-v4-chip", ("v4", None): "tpu-v4-tensorcore",
                        ("v5e", None): "tpu-v5e-chip"}


def topology_target(text: str) -> Target | None:
    """A target for a libtpu topology name, or None when `text` is not one."""
    m = _TOPOLOGY.fullmatch(text.strip())
    if m is None:
        return None
    gen, shape, chip = m["gen"], m["shape"], m["chip"]
    hardware = _GENERATION_HARDWARE.get((gen, chip))
    if hardware is None:
        if gen == "v5e" and chip:
            raise TargetError(f"target {text!r}: v5e has one TensorCore per chip, so no megacore; drop '/megacore'")
        raise TargetError(f"target {text!r}: libtpu knows {gen}, but capibara-export has no hardware constants for "
                          f"it (capibara_export/analysis/hardware.py needs its peak FLOP/s, HBM and ICI figures with a "
                          "source); use a v4 or v5e topology")
    name = f"{gen}-{shape}" + (f"-{chip}" if chip else "")
    return Target(name, "tpu", f"TPU topology {gen}:{shape}" + (f", {chip}" if chip else ""),
                  topology=f"{gen}:{shape}", chip_config=chip, hardware=hardware)


def get_target(name: str) -> Target:
    """A target by name: a preset, `cpu`, `local`, a libtpu topology, or `Sx` before a TPU
    target for S slices of it (`2xtpu-v4-16`, `4xv5e:16x16`)."""
    multi = re.fullmatch(r"(\d+)x(\D.*)", name)
    if multi:
        return get_target(multi[2]).with_slices(int(multi[1]))
    if name in TARGETS:
        return TARGETS[name]
    found = topology_target(name)
    if found is None:
        raise TargetError(f"unknown target {name!r}; choose a named slice (tpu-v4-8 .. tpu-v4-4096: "
                          f"{', '.join(f'v4-{n}' for n in V4_SLICES)}; tpu-v5e-4 .. tpu-v5e-256), cpu, local, or a "
                          "libtpu topology such as v4:4x4x4/megacore or v5e:16x16")
    return found


def parse_mesh(text: str) -> tuple[int, int]:
    match = re.fullmatch(r"\s*([0-9]{1,6})\s*x\s*([0-9]{1,6})\s*", text or "", re.ASCII)
    if not match or 0 in (int(match[1]), int(match[2])):
        raise TargetError(f"--mesh {text!r} is not of the form DATAxMODEL with positive sizes, e.g. 4x8")
    return int(match[1]), int(match[2])


def devices(target: Target) -> list:
    """The target's devices (deviceless descriptions for TPU targets)."""
    import jax

    if target.platform == "tpu":
        from jax.experimental import topologies

        try:
            kw = {"chip_config_name": target.chip_config} if target.chip_config else {}
            if target.slices > 1:
                kw["num_slices"] = target.slices
            topo = topologies.get_topology_desc(platform="tpu", topology_name=target.topology, **kw)
        except Exception as err:  # libtpu missing or unusable: jax raises RuntimeError/ValueError variants
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            if "lockfile" in first:
                raise TargetError(f"target {target.name}: another process holds libtpu; set "
                                  "ALLOW_MULTIPLE_LIBTPU_LOAD=1 in that process too (capibara-export sets it "
                                  f"for itself); libtpu said: {first[:200]}") from None
            raise TargetError(f"target {target.name} needs libtpu to compile for TPU without a TPU "
                              f"(pip install 'jax[tpu]==0.10.2'); libtpu said: {first[:200]}") from None
        return list(topo.devices)
    if target.platform == "cpu":
        return jax.devices("cpu")
    return jax.devices()


def device_grid(devs: list, shape: tuple[int, int]) -> np.ndarray:
    """Devices laid out as the (data, model) grid.

    Devices are ordered by physical position (x, y, z, core on chip) and reshaped, so the
    `model` axis (the last) runs over the two TensorCores of a chip and then along the
    torus' longest dimension, where neighbours are one ICI hop apart. jax's
    create_device_mesh does this for one device per chip but refuses v4's per-core devices.
    """
    def position(d):
        coords = tuple(getattr(d, "coords", ()) or ())
        return (*coords, getattr(d, "core_on_chip", 0), d.id)

    return np.array(sorted(devs, key=position), dtype=object).reshape(shape)


def _squarest_meshes(n: int, count: int = 4) -> list[str]:
    """DATAxMODEL shapes of n devices, closest to square first (for error hints)."""
    rows = sorted((a for a in range(1, n + 1) if n % a == 0), key=lambda a: abs(math.log(a * a / n)))
    return [f"{a}x{n // a}" for a in rows[:count]]


def make_mesh(target: Target, shape: tuple[int, int]):
    """The (data, model) mesh over the target's devices; over S slices, the (dcn, data,
    model) mesh whose `dcn` axis picks the slice (each slice laid out as `device_grid`)."""
    import jax

    devs = devices(target)
    if target.slices > 1:
        by_slice: dict[int, list] = {}
        for d in devs:
            by_slice.setdefault(int(getattr(d, "slice_index", 0) or 0), []).append(d)
        per_slice = len(devs) // target.slices
        if len(by_slice) != target.slices or per_slice != shape[0] * shape[1]:
            raise TargetError(f"--mesh {shape[0]}x{shape[1]} is one slice's mesh and needs {shape[0] * shape[1]} "
                              f"devices, but each slice of {target.name} has {per_slice} (e.g. "
                              f"{', '.join(_squarest_meshes(per_slice))})")
        grids = [device_grid(by_slice[i], shape) for i in sorted(by_slice)]
        return jax.sharding.Mesh(np.stack(grids), (DCN_AXIS, *MESH_AXES))
    need = shape[0] * shape[1]
    if len(devs) != need:
        hint = {"tpu": f"{target.name} has {len(devs)} devices; use a mesh whose sizes multiply to {len(devs)} "
                       f"(e.g. {', '.join(_squarest_meshes(len(devs)))})",
                "cpu": f"{len(devs)} CPU devices are configured; the CLI sets jax_num_cpu_devices from --mesh, "
                       f"in Python call jax.config.update('jax_num_cpu_devices', {need}) before using JAX",
                "local": f"JAX found {len(devs)} {devs[0].platform} device(s) here; use a mesh that multiplies "
                         f"to {len(devs)} (e.g. 1x{len(devs)})"}[target.platform]
        raise TargetError(f"--mesh {shape[0]}x{shape[1]} needs {need} devices but {hint}")
    return jax.sharding.Mesh(device_grid(devs, shape), MESH_AXES)


def hardware_for(target: Target, mesh) -> Hardware:
    """The hardware table entry for a target's devices (uncalibrated placeholder for CPU)."""
    if target.hardware:
        return HARDWARE[target.hardware]
    kind = mesh.devices.flat[0].device_kind
    found = for_device_kind(kind)
    return found if found is not None else CPU_PLACEHOLDER


def host_layout(mesh, target: Target | None = None) -> dict:
    """How the mesh's devices fall on hosts (one JAX process per host) and chips: the
    process that owns each mesh position (`process_index` of the deviceless topology, or
    of the runtime's devices), the chip configuration, and what a default runtime gives."""
    devs = mesh.devices
    owner = np.vectorize(lambda d: int(getattr(d, "process_index", 0) or 0), otypes=[int])(devs)
    counts = np.unique(owner, return_counts=True)[1]
    first = devs.flat[0]
    per_core = first.platform == "tpu" and len({int(getattr(d, "core_on_chip", 0) or 0) for d in devs.flat}) > 1
    if first.platform == "tpu":
        megacore = target is not None and target.chip_config == "megacore"
        chip = "megacore (one device per chip)" if megacore else (
            "one device per TensorCore" if per_core else "one device per chip")
        if per_core:
            runtime = ("a default Cloud TPU v4 runtime exposes one megacore device per chip, half this count: "
                       "it needs a runtime configured for one device per TensorCore, or build in megacore mode "
                       "(a tpu-v4-N preset, or a topology ending in /megacore)")
        else:
            runtime = "a default Cloud TPU runtime exposes these devices (one per chip)"
    else:
        chip = "simulated CPU devices" if first.platform == "cpu" else f"one device per {first.platform} chip"
        runtime = "this host's runtime" if first.platform == "cpu" else "the local runtime"
    return {"processes": len(counts), "devices_per_process": int(counts.max()),
            "slices": int(target.slices) if target is not None else 1,
            "process_grid": owner.tolist(), "chip_config": chip, "device_kind": first.device_kind,
            "runtime": runtime, "default_runtime_loads": not per_core}


def describe(mesh, target: Target | None = None) -> dict:
    """What a record or manifest says about a mesh: shape, axes, device kind and order, and
    its layout over hosts (`host_layout`), and the XLA options its programs compile with."""
    first = mesh.devices.flat[0]
    return {
        "hosts": host_layout(mesh, target),
        "shape": dict(mesh.shape),
        "axis_names": list(mesh.axis_names),
        "device_kind": first.device_kind,
        "platform": first.platform,
        "device_ids": np.vectorize(lambda d: int(d.id), otypes=[int])(mesh.devices).tolist(),
        # physical torus position of each device in mesh order (TPU only): the roofline
        # counts how many torus dimensions a collective's group spans
        "device_coords": [list(getattr(d, "coords", ()) or ()) for d in mesh.devices.flat],
        "compiler_options": compiler_options.for_devices(mesh.devices.flat),
    }
