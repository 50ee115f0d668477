"""jax.export artifacts: portable StableHLO for tpu, cpu and cuda, with a symbolic batch.

Two kinds:
- portable: one artifact per entry and precision, lowered for every platform at once,
  batch dimension symbolic ("b"), unsharded (nr_devices=1): call it on any single device.
- sharded: the selected plan's program for the build's mesh (e.g. 32 TPU devices),
  concrete batch, with the mesh axis names and shardings recorded in the manifest. Lowered
  for the target platform and for `cpu` (`sharded_platforms`), so the same artifact runs on
  the slice and, for checking, across local processes with simulated CPU devices laid out
  as the slice's hosts (`verify --processes`).
"""

from __future__ import annotations

from pathlib import Path

import jax
from jax import export
from jax.sharding import NamedSharding, PartitionSpec

from model import portable_kernels
from sharding.plans import ShardingPlan

from ..matrix.programs import in_specs, out_specs, traced_afresh
from .params import flatten
from .serving import ServingFunction

PLATFORMS = ("tpu", "cpu", "cuda")


def export_portable(serving: ServingFunction) -> export.Exported:
    batch = export.symbolic_shape("b")[0]
    with portable_kernels():   # on a GPU host too: artifacts for every platform hold no GPU-only kernel
        return export.export(jax.jit(traced_afresh(serving.fn)), platforms=PLATFORMS)(*serving.abstract(batch))


def flat_shardings(serving: ServingFunction, plan: ShardingPlan, mesh) -> tuple[dict, tuple, object]:
    """Shardings of (flat params, inputs) and of the outputs under `plan` on `mesh`."""
    is_spec = lambda x: isinstance(x, PartitionSpec)  # noqa: E731
    to = lambda tree: jax.tree.map(lambda s: NamedSharding(mesh, s), tree, is_leaf=is_spec)  # noqa: E731
    specs = in_specs(serving.program, plan)
    params = {k: NamedSharding(mesh, s) for k, s in flatten(specs[0]).items()}
    return params, tuple(to(s) for s in specs[1:]), to(out_specs(serving.program, plan))


def sharded_jit(serving: ServingFunction, plan: ShardingPlan, mesh):
    """The serving function jitted with the plan's shardings (for export or compilation)."""

    params, inputs, outputs = flat_shardings(serving, plan, mesh)
    jitted = jax.jit(traced_afresh(serving.fn), in_shardings=(params, *inputs), out_shardings=outputs,
                     donate_argnums=serving.program.donate)

    def lower(*args):
        with jax.set_mesh(mesh), plan.activated():
            return jitted.lower(*args)

    shardings = (params, *inputs)
    abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                            serving.abstract(), shardings)
    return jitted, lower, abstract


def sharded_platforms(platform: str) -> tuple[str, ...]:
    return (platform,) if platform == "cpu" else (platform, "cpu")


def export_sharded(serving: ServingFunction, plan: ShardingPlan, mesh, platform: str) -> export.Exported:

    jitted, _, abstract = sharded_jit(serving, plan, mesh)
    with jax.set_mesh(mesh), plan.activated(), portable_kernels():
        return export.export(jitted, platforms=sharded_platforms(platform))(*abstract)


def save(exported: export.Exported, path: Path) -> None:
    path.write_bytes(exported.serialize())


def load(path: Path) -> export.Exported:
    return export.deserialize(bytearray(path.read_bytes()))


def describe_avals(avals, shardings=None) -> list[dict]:
    out = []
    shardings = shardings or [None] * len(avals)
    for aval, sharding in zip(avals, shardings):
        item = {"shape": [str(d) for d in aval.shape], "dtype": str(aval.dtype)}
        if sharding is not None:
            item["sharding"] = str(sharding)
        out.append(item)
    return out
