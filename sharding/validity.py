"""Whether a sharding plan can serve a given model, mesh and batch, with reasons.

A plan is invalid when a dimension it shards does not divide evenly by the mesh axes it
is sharded over (BLIP's 12 heads on the 8-way `model` axis, a batch of 1 over 32
devices). Parameters are resolved exactly, one by one; activations are checked for every
size each logical axis takes in the program (a conservative check: the model may not
shard every such activation). An invalid plan is reported, never silently altered.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import jax

from modelapi.axes import LOGICAL_AXES, is_names

from .plans import ShardingPlan


@dataclass(frozen=True)
class Validity:
    ok: bool
    reasons: tuple[str, ...] = ()

    @property
    def reason(self) -> str:
        return "; ".join(self.reasons)


def _mesh_size(entry, mesh_shape: dict[str, int]) -> int:
    axes = (entry,) if isinstance(entry, str) else tuple(entry)
    return math.prod(mesh_shape[a] for a in axes)


def _describe(entry) -> str:
    return entry if isinstance(entry, str) else " x ".join(entry)


def param_problems(plan: ShardingPlan, names_tree: dict, shapes_tree: dict, mesh_shape: dict[str, int]) -> list[str]:
    """One line per (logical axis, size, mesh axes) that does not divide, with a count of parameters."""
    problems: dict[tuple, list[str]] = {}
    flat_names = jax.tree_util.tree_flatten_with_path(names_tree, is_leaf=is_names)[0]
    shapes = jax.tree.leaves(shapes_tree)
    for (path, names), shape in zip(flat_names, shapes):
        top = str(getattr(path[0], "key", "")) if path else None
        spec = plan.spec(names, "params", top)
        for name, size, entry in zip(names, shape.shape, tuple(spec)):
            if entry is not None and size % _mesh_size(entry, mesh_shape):
                problems.setdefault((name, size, _describe(entry), _mesh_size(entry, mesh_shape)), []).append(
                    ".".join(str(getattr(k, "key", k)) for k in path))
    return [f"parameter axis {name}={size} does not divide over {mesh} ({n}) in {len(paths)} parameter(s), "
            f"e.g. {paths[0]}" for (name, size, mesh, n), paths in problems.items()]


def activation_problems(plan: ShardingPlan, axis_sizes: dict[str, set[int]], mesh_shape: dict[str, int]) -> list[str]:
    out = []
    for tower in (None, *(t for t, _, _ in plan.towers)):
        for logical, mesh_axes in plan.rules("activations", tower):
            n = _mesh_size(mesh_axes, mesh_shape)
            for size in sorted(axis_sizes.get(logical, ())):
                problem = f"activation axis {logical}={size} does not divide over {_describe(mesh_axes)} ({n})"
                if size % n and problem not in out:
                    out.append(problem)
    return out


def vocabulary_problems(plan: ShardingPlan, model: str, scopes: tuple[str, ...],
                        own_axes: tuple[str, ...]) -> list[str]:
    """A plan written for another model: rules for a scope this model does not have, or for a
    logical name that is neither in the shared vocabulary nor this model's own."""
    out = [f"plan gives rules to scope {t!r}, which model {model} does not have "
           f"(its scopes: {', '.join(scopes) or 'none'})" for t, _, _ in plan.towers if t not in scopes]
    named = {logical for rules in plan.all_rules() for logical, _ in rules}
    foreign = sorted(named - set(LOGICAL_AXES) - set(own_axes))
    if foreign:
        out.append(f"plan maps logical axis {foreign[0]!r}, which model {model} does not have "
                   f"(it names the shared axes{''.join(', ' + a for a in own_axes)})")
    return out


def check(plan: ShardingPlan, names_tree: dict, shapes_tree: dict, axis_sizes: dict[str, set[int]],
          mesh_shape: dict[str, int], model: str = "this model", scopes: tuple[str, ...] = (),
          own_axes: tuple[str, ...] = ()) -> Validity:
    """Whether `plan` serves the model (its parameters' names and shapes, the sizes its logical
    axes take, its name, scopes and own logical names) on a mesh of `mesh_shape`."""
    unknown_mesh = {a for rules in plan.all_rules() for _, axes in rules for a in axes} - set(mesh_shape)
    if unknown_mesh:
        return Validity(False, (f"plan uses mesh axes {sorted(unknown_mesh)} that this mesh "
                                f"({', '.join(mesh_shape)}) does not have",))
    foreign = vocabulary_problems(plan, model, scopes, own_axes)
    if foreign:
        return Validity(False, tuple(foreign))
    reasons = param_problems(plan, names_tree, shapes_tree, mesh_shape)
    reasons += activation_problems(plan, axis_sizes, mesh_shape)
    return Validity(not reasons, tuple(reasons))
