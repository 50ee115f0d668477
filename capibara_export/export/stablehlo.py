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

from sharding.plans import ShardingPlan

from ..families import for_config
from ..matrix.programs import traced_afresh
from ..matrix.serving import ServingFunction, sharded_jit

PLATFORMS = ("tpu", "cpu", "cuda")


def export_portable(serving: ServingFunction) -> export.Exported:
    batch = export.symbolic_shape("b")[0]
    # on a GPU host too: artifacts for every platform hold no GPU-only kernel
    with for_config(serving.program.config).portable():
        return export.export(jax.jit(traced_afresh(serving.fn)), platforms=PLATFORMS)(*serving.abstract(batch))


def sharded_platforms(platform: str) -> tuple[str, ...]:
    return (platform,) if platform == "cpu" else (platform, "cpu")


def export_sharded(serving: ServingFunction, plan: ShardingPlan, mesh, platform: str) -> export.Exported:

    jitted, _, abstract = sharded_jit(serving, plan, mesh)
    with jax.set_mesh(mesh), plan.activated(), for_config(serving.program.config).portable():
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
