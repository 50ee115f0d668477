"""Serving functions: each entry program with the flat parameter dict as first argument,
its inputs named by the model family's signature, and the abstract arguments for a fixed
or symbolic batch.

Every exported format (jax.export, SavedModel, serialized executables) is made from these,
so all of them share one calling convention, written once here and in the manifest. The
build compiles exactly these functions (compile.py), which is why they live with the
matrix and not with the export: the export reads them, the matrix never reads the export.

The flat parameter dict ("vision/blocks/qkv/kernel": array; int8 weights as
".../kernel.int8" and ".../kernel.scale") is every program's first argument. An entry's
input and output names and batch axes are its family's `Entry` (modelapi/family.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from modelapi.family import Entry
from modelapi.quant import QArray
from sharding.plans import ShardingPlan
from sharding.precision import PrecisionPolicy
from sharding.storage import stored_template

from ..families import for_config
from .programs import Program, ProgramOptions, build_program, in_specs, out_specs, traced_afresh

# ------------------------------------------------------------------ the flat parameter dict
SEP = "/"


def _key(path) -> str:
    return SEP.join(str(getattr(k, "key", k)) for k in path)


def flatten(params: dict) -> dict[str, jax.Array]:
    flat = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(params, is_leaf=lambda x: isinstance(x, QArray))[0]:
        name = _key(path)
        if isinstance(leaf, QArray):
            flat[f"{name}.int8"], flat[f"{name}.scale"] = leaf.q, leaf.scale
        else:
            flat[name] = leaf
    return flat


def unflatten(flat: dict, template: dict) -> dict:
    """The nested tree (QArrays where the template has them) from a flat dict."""
    def rebuild(path, leaf):
        name = _key(path)
        if isinstance(leaf, QArray):
            return QArray(flat[f"{name}.int8"], flat[f"{name}.scale"])
        return flat[name]
    return jax.tree_util.tree_map_with_path(rebuild, template, is_leaf=lambda x: isinstance(x, QArray))


# ------------------------------------------------------------------ signatures
def partition_spec_json(spec) -> list:
    """A PartitionSpec as JSON: one entry per dimension, null (replicated), an axis name,
    or a list of axis names."""
    return [None if p is None else p if isinstance(p, str) else list(p) for p in spec]


def describe(names: list[str], avals, shardings=None) -> list[dict]:
    """[{name, shape, dtype[, sharding]}]: dims are ints, or strings when symbolic ("b")."""
    out = []
    shardings = list(shardings) if shardings is not None else [None] * len(avals)
    for name, aval, sharding in zip(names, avals, shardings):
        item = {"name": name, "shape": [d if isinstance(d, int) else str(d) for d in aval.shape],
                "dtype": str(aval.dtype)}
        if sharding is not None:
            item["sharding"] = partition_spec_json(getattr(sharding, "spec", sharding))
        out.append(item)
    return out


def input_names(entry: Entry, inputs) -> list[str]:
    """One name per flattened input leaf (a tree input's leaves by key)."""
    names = []
    for name, arg in zip(entry.inputs, inputs):
        leaves = jax.tree_util.tree_flatten_with_path(arg)[0]
        names += [name + (jax.tree_util.keystr(path, simple=True, separator="/") and "/" +
                          jax.tree_util.keystr(path, simple=True, separator="/")) for path, _ in leaves]
    return names


def output_names(entry: Entry, out_tree_example) -> list[str]:
    """One name per flattened output leaf, in JAX's order."""
    root = entry.outputs
    names = []
    for path, _ in jax.tree_util.tree_flatten_with_path(out_tree_example)[0]:
        keys = [str(getattr(k, "key", getattr(k, "idx", k))) for k in path]
        if isinstance(root, tuple):
            keys[0] = root[int(keys[0])]
        elif root is not None:
            keys.insert(0, root)
        names.append("/".join(keys))
    return names


@dataclass
class ServingFunction:
    entry: str
    signature: Entry
    policy: PrecisionPolicy
    program: Program
    fn: Callable                 # fn(flat_params, *inputs)
    flat_params: dict            # name → ShapeDtypeStruct
    inputs: tuple                # abstract inputs at the program's batch

    def abstract(self, batch=None) -> tuple:
        """(flat params, inputs) with the batch axis replaced, e.g. by a symbolic dimension."""
        if batch is None:
            return (self.flat_params, *self.inputs)

        def swap(s, axis):
            shape = list(s.shape)
            shape[axis] = batch
            return jax.ShapeDtypeStruct(tuple(shape), s.dtype)

        inputs = []
        for i, arg in enumerate(self.inputs):
            axis = self.signature.batch_axis(i)
            inputs.append(arg if axis is None else jax.tree.map(lambda s, a=axis: swap(s, a), arg))
        return (self.flat_params, *inputs)

    @property
    def input_names(self) -> tuple[str, ...]:
        return self.signature.inputs


def serving_function(cfg, entry: str, policy: PrecisionPolicy, batch: int,
                     options: ProgramOptions = ProgramOptions()) -> ServingFunction:
    program = build_program(cfg, entry, policy, batch, options)
    family = for_config(cfg)
    template = stored_template(family, cfg, policy)

    def fn(flat_params, *inputs):
        return program.fn(unflatten(flat_params, template), *inputs)

    flat = {k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in flatten(template).items()}
    return ServingFunction(entry, family.entry(entry), policy, program, fn, flat, tuple(program.args[1:]))


def example_inputs(serving: ServingFunction, batch: int, seed: int = 0) -> tuple:
    """Fixed, reproducible inputs for an entry (the ones `verify` compares on), made by its family."""
    cfg = serving.program.config
    _, *inputs = serving.abstract(batch)
    return tuple(for_config(cfg).example_inputs(cfg, serving.entry, tuple(inputs), np.random.default_rng(seed)))


# ------------------------------------------------------------------ under a plan
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
