"""Entry programs: each model family's pure functions of (params, inputs), built from a
config and a precision policy (modelapi.family), joined here with sharding plans.

The family builds the program; nothing of it knows a mesh. `lower` joins a program with a
sharding plan and a mesh:
parameters take the plan's parameter rules, inputs, outputs and the model's internal
activation annotations take its activation rules. Inputs are ShapeDtypeStructs, so
compiling `base` or `large` never materialises a weight.
"""

from __future__ import annotations

from typing import Callable

import jax
import numpy as np
import optax
from jax.sharding import NamedSharding, PartitionSpec

from modelapi.axes import is_names
from modelapi.family import Program, ProgramError, ProgramOptions
from sharding.plans import ShardingPlan
from sharding.precision import PrecisionPolicy
from sharding.storage import stored_specs, stored_template

from ..families import for_config

__all__ = ["Program", "ProgramError", "ProgramOptions", "build_program", "in_specs", "out_specs", "lower", "place",
           "traced_afresh"]


def build_program(cfg, entry: str, policy: PrecisionPolicy, batch: int,
                  options: ProgramOptions = ProgramOptions()) -> Program:
    """`entry` of the config's model family at `batch`, its parameters in `policy`'s storage form."""
    family = for_config(cfg)
    family.entry(entry)
    if policy.name not in family.precisions:
        raise ProgramError(f"{policy.name} is not a precision model {family.name} offers "
                           f"(it offers {', '.join(family.precisions)})")
    program = family.build(cfg, entry, policy, batch, options, stored_template(family, cfg, policy))
    program.config, program.policy = cfg, policy
    return program


def _specs(program: Program, plan: ShardingPlan, names_or_marker, struct_tree=None):
    """PartitionSpec tree for one argument or output description."""
    cfg, policy = program.config, program.policy
    if isinstance(names_or_marker, str):
        pspecs = stored_specs(for_config(cfg), plan, cfg, policy)
        if names_or_marker == "params":
            return pspecs
        return optax.tree_map_params(program.optimizer, lambda _, spec: spec, struct_tree, pspecs,
                                     transform_non_params=lambda x: jax.tree.map(lambda _: PartitionSpec(), x),
                                     is_leaf=lambda x: isinstance(x, PartitionSpec))
    return jax.tree.map(lambda n: plan.spec(n, "activations"), names_or_marker,
                        is_leaf=is_names)


def in_specs(program: Program, plan: ShardingPlan) -> tuple:
    return tuple(_specs(program, plan, names, struct) for names, struct in zip(program.arg_names, program.args))


def place(args, shardings):
    """`args` on the devices of `shardings` (a matching tree), placed from host copies.

    jax.device_put of an array already committed to one device onto a sharding over other
    devices compiles a resharding program per array shape: 9.7 s for the tiny model's
    parameters onto the 32 simulated CPU devices of a plan, 0.04 s from numpy arrays
    (docs/performance.md). On a CPU host the copies are free; on an accelerator they cost a
    transfer, still far less than the compiles."""
    return jax.device_put(jax.tree.map(np.asarray, args), shardings)


MARKERS = ("params", "opt_state")


def out_specs(program: Program, plan: ShardingPlan):
    """The outputs' PartitionSpecs; a training entry's outputs lead with new params and opt_state."""
    names = program.out_names
    if isinstance(names, tuple) and not is_names(names) and any(isinstance(n, str) and n in MARKERS for n in names):
        state = program.args[program.arg_names.index("opt_state")] if "opt_state" in program.arg_names else None
        return tuple(_specs(program, plan, n, state if n == "opt_state" else None) for n in names)
    return _specs(program, plan, names)


def traced_afresh(fn: Callable) -> Callable:
    """A new function object that calls `fn`, for jax.jit to trace under the current context.

    JAX caches a traced jaxpr per function object, argument types and JAX's own config; the
    plan's activation rules (flax's logical_axis_rules) and the model's kernel choices are
    Python context it does not see. Jitting the same `fn` under a second plan reused the
    first plan's trace, sharding constraints and all (measured: a decode_step lowered under
    dp, then under replicated, ran replicated with dp's batch split). Every lowering under a
    plan or a kernel context therefore traces a fresh object."""
    return lambda *args: fn(*args)


def lower(program: Program, plan: ShardingPlan, mesh) -> jax.stages.Lowered:
    """jit(...).lower(...) with every argument and output sharded by the plan on `mesh`
    (traced afresh: the plan's activation rules are in effect, whatever was traced before)."""
    is_spec = lambda x: isinstance(x, PartitionSpec)  # noqa: E731
    to_sharding = lambda tree: jax.tree.map(lambda s: NamedSharding(mesh, s), tree, is_leaf=is_spec)  # noqa: E731
    in_shardings = tuple(to_sharding(s) for s in in_specs(program, plan))
    out_shardings = to_sharding(out_specs(program, plan))
    args = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), program.args, in_shardings)
    jitted = jax.jit(traced_afresh(program.fn), in_shardings=in_shardings, out_shardings=out_shardings,
                     donate_argnums=program.donate)
    with jax.set_mesh(mesh), plan.activated():
        return jitted.lower(*args)
