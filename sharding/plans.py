"""Sharding plans as data: ordered logical-axis → mesh-axis rules read from TOML.

A plan says nothing about a particular model; `sharding.validity` checks one against a
model config, a mesh and a batch size, and `param_specs` resolves it to PartitionSpecs
with flax.linen.logical_to_mesh_axes (first match wins, each mesh axis once per array).
"""

from __future__ import annotations

import contextlib
import re
import tomllib
from dataclasses import dataclass, replace
from pathlib import Path

import jax
from flax import linen
from jax.sharding import PartitionSpec

from modelapi.axes import LOGICAL_AXES, is_names, tower_rules
from modelapi.errors import UserError

# The mesh axes a plan may name. `dcn` exists only on a multi-slice mesh (one position per
# slice, connected by the data-centre network); on one slice a plan's `dcn` is dropped.
MESH_AXES = ("dcn", "data", "model")
DCN = "dcn"
SHIPPED = Path(__file__).with_name("plans.toml")
PLAN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
SCOPE_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,63}")
# Logical names plan files may map beyond the shared vocabulary (modelapi.axes.LOGICAL_AXES):
# the names of the families the pipeline has registered (capibara_export/families.py).
_EXTRA_AXES: list[str] = []


def add_axes(names) -> None:
    """Let plan files map these logical names too (a model family's own)."""
    _EXTRA_AXES.extend(n for n in names if n not in LOGICAL_AXES and n not in _EXTRA_AXES)


def known_axes() -> tuple[str, ...]:
    return (*LOGICAL_AXES, *_EXTRA_AXES)

Rules = tuple[tuple[str, tuple[str, ...]], ...]


class PlanError(UserError):
    """A plan file or rule that cannot be used (unknown names, repeated mesh axes, bad syntax)."""


@dataclass(frozen=True)
class ShardingPlan:
    """A sharding plan as data: rules mapping logical axis names (of parameters and of
    activations, optionally per tower) to mesh axes. The model never sees a mesh; a plan
    turns its logical names into PartitionSpecs for one."""
    name: str
    description: str
    params: Rules
    activations: Rules
    source: str = str(SHIPPED)
    # Rules of their own for some of a model's scopes (its family's `scopes`, such as BLIP's
    # towers): (scope, params, activations). A scope's parameters and the activations it
    # constrains use them instead. A model without that scope reports the plan invalid.
    towers: tuple[tuple[str, Rules, Rules], ...] = ()

    def rules(self, kind: str, tower: str | None = None) -> Rules:
        """The rules for `kind` (`params` or `activations`), a tower's own where it has them."""
        for name, params, activations in self.towers:
            if name == tower:
                return params if kind == "params" else activations
        return self.params if kind == "params" else self.activations

    def all_rules(self) -> list[Rules]:
        """Every rule set: the plan's own and each tower's."""
        return [self.params, self.activations, *(r for _, p, a in self.towers for r in (p, a))]

    def flax_rules(self, kind: str, tower: str | None = None) -> list[tuple[str, str | tuple[str, ...]]]:
        """Rules in the form flax.linen.logical_axis_rules takes."""
        return [(logical, mesh[0] if len(mesh) == 1 else mesh) for logical, mesh in self.rules(kind, tower)]

    def spec(self, names: tuple[str | None, ...], kind: str, tower: str | None = None) -> PartitionSpec:
        """The PartitionSpec for an array with these logical axis names."""
        return linen.logical_to_mesh_axes(names, self.flax_rules(kind, tower))

    @contextlib.contextmanager
    def activated(self):
        """The activation rules while a program is traced (inside `jax.set_mesh`): the
        plan's own, and each tower's inside that tower's scope."""
        with linen.logical_axis_rules(self.flax_rules("activations")), \
                tower_rules({t: self.flax_rules("activations", t) for t, _, _ in self.towers}):
            yield

    def for_mesh(self, axis_names: tuple[str, ...]) -> ShardingPlan:
        """This plan as it applies to a mesh with these axes.

        On one slice (no `dcn` axis) any `dcn` in the rules is dropped. On several slices a
        plan that does not name `dcn` gets it in front of its batch rule (or a batch rule of
        its own): data parallelism across slices with parameters replicated per slice, as
        MaxText's dcn_data_parallelism does by default, since the data-centre network is
        ~7x slower per chip than one ICI link. A plan that names `dcn` is used as written."""
        named = any(DCN in mesh for rules in self.all_rules() for _, mesh in rules)
        if DCN not in axis_names:
            if not named:
                return self

            def change(rules: Rules, kind: str) -> Rules:
                kept = ((logical, tuple(a for a in mesh if a != DCN)) for logical, mesh in rules)
                return tuple((logical, mesh) for logical, mesh in kept if mesh)
        else:
            if named:
                return self

            def change(rules: Rules, kind: str) -> Rules:
                if kind == "params":
                    return rules
                if any(logical == "batch" for logical, _ in rules):
                    return tuple((k, (DCN, *m) if k == "batch" else m) for k, m in rules)
                return (("batch", (DCN,)), *rules)
        changed = replace(self, params=change(self.params, "params"),
                          activations=change(self.activations, "activations"),
                          towers=tuple((t, change(p, "params"), change(a, "activations")) for t, p, a in self.towers))
        if DCN in axis_names:
            changed = replace(changed, description=f"{self.description} Across slices: batch over dcn.")
        return changed

    def to_dict(self) -> dict:
        """The plan as plain JSON data (records, manifests, cache keys)."""
        out = {"name": self.name, "description": self.description, "source": self.source,
               "params": {k: list(v) for k, v in self.params},
               "activations": {k: list(v) for k, v in self.activations}}
        if self.towers:  # absent, not empty, for plans without: recorded plans (and cache keys) stay as they were
            out["towers"] = {t: {"params": {k: list(v) for k, v in p}, "activations": {k: list(v) for k, v in a}}
                             for t, p, a in self.towers}
        return out

    @classmethod
    def from_dict(cls, d: dict) -> ShardingPlan:
        """A plan recorded by to_dict (in a build or bundle), re-checked like a plan file."""
        where = d.get("source", "recorded plan")
        if not isinstance(d.get("name"), str) or not PLAN_NAME.fullmatch(d["name"]):
            raise PlanError(f"{where}: recorded plan name {d.get('name')!r} is not a plan name")
        return cls(d["name"], d.get("description", ""), _rules(d["name"], "params", d["params"], where),
                   _rules(d["name"], "activations", d["activations"], where), where,
                   _towers(d["name"], d.get("towers", {}), where))


def _rules(plan: str, kind: str, raw, where: str) -> Rules:
    if not isinstance(raw, dict):
        raise PlanError(f"{where}: plan {plan!r}: `{kind}` must be a table of logical axis = mesh axis/axes")
    rules = []
    for logical, mesh in raw.items():
        if logical not in known_axes():
            raise PlanError(f"{where}: plan {plan!r}: unknown logical axis {logical!r} in {kind}; "
                            f"known: {', '.join(known_axes())}")
        mesh_axes = (mesh,) if isinstance(mesh, str) else tuple(mesh) if isinstance(mesh, list) else None
        if not mesh_axes or not all(isinstance(m, str) for m in mesh_axes):
            raise PlanError(f"{where}: plan {plan!r}: {kind}.{logical} must be a mesh axis name or a "
                            f"non-empty list of them, got {mesh!r}")
        unknown = [m for m in mesh_axes if m not in MESH_AXES]
        if unknown:
            raise PlanError(f"{where}: plan {plan!r}: {kind}.{logical} names unknown mesh axis {unknown[0]!r}; "
                            f"the mesh axes are {', '.join(MESH_AXES)}")
        if len(set(mesh_axes)) != len(mesh_axes):
            raise PlanError(f"{where}: plan {plan!r}: {kind}.{logical} uses mesh axis "
                            f"{next(m for m in mesh_axes if mesh_axes.count(m) > 1)!r} twice in one array")
        rules.append((logical, mesh_axes))
    return tuple(rules)


def _towers(plan: str, raw, where: str) -> tuple[tuple[str, Rules, Rules], ...]:
    if not isinstance(raw, dict):
        raise PlanError(f"{where}: plan {plan!r}: `towers` must be a table of tower = {{ params, activations }}")
    out = []
    for tower, body in raw.items():
        if not SCOPE_NAME.fullmatch(str(tower)):
            raise PlanError(f"{where}: plan {plan!r}: tower {tower!r} is not a scope name (letters, digits, '_'); "
                            "a model reports the plans whose scopes it does not have invalid")
        if not isinstance(body, dict) or set(body) - {"params", "activations"}:
            raise PlanError(f"{where}: plan {plan!r}: towers.{tower} must be a table with params and/or activations")
        out.append((tower, _rules(plan, f"towers.{tower}.params", body.get("params", {}), where),
                    _rules(plan, f"towers.{tower}.activations", body.get("activations", {}), where)))
    return tuple(out)


MAX_PLAN_FILE_BYTES = 1 << 20   # the shipped plans are 5 KB; a larger file is not a plan file


def parse_plans(text: str, where: str) -> dict[str, ShardingPlan]:
    """The plans a TOML text defines (`where` names it in errors); each checked, or PlanError."""
    if len(text) > MAX_PLAN_FILE_BYTES:
        raise PlanError(f"{where}: {len(text)} characters; a plan file is at most {MAX_PLAN_FILE_BYTES} "
                        "(see sharding/plans.toml for the form)")
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as err:
        raise PlanError(f"{where}: not valid TOML ({err})") from None
    except RecursionError:
        raise PlanError(f"{where}: nested too deeply to be a plan file (a plan is a table of axis = [mesh axes])") \
            from None
    plans = {}
    for name, body in raw.items():
        if not isinstance(body, dict):
            raise PlanError(f"{where}: top-level key {name!r} must be a plan table like [{name}]")
        if not PLAN_NAME.fullmatch(name):
            raise PlanError(f"{where}: plan name {name!r} must be letters, digits, '.', '_' or '-' (at most 64, "
                            "starting with a letter or digit): it becomes part of file names")
        extra = set(body) - {"description", "params", "activations", "towers"}
        if extra:
            raise PlanError(f"{where}: plan {name!r}: unknown key(s) {sorted(extra)}; "
                            "a plan has description, params, activations and optionally towers")
        plans[name] = ShardingPlan(
            name=name, description=str(body.get("description", "")),
            params=_rules(name, "params", body.get("params", {}), where),
            activations=_rules(name, "activations", body.get("activations", {}), where), source=where,
            towers=_towers(name, body.get("towers", {}), where))
    return plans


def load_plans(extra_files: list[str | Path] = ()) -> dict[str, ShardingPlan]:
    """The shipped plans plus any user plan files (a user plan may replace a shipped one)."""
    plans = parse_plans(SHIPPED.read_text(), str(SHIPPED))
    for f in extra_files:
        path = Path(f)
        if not path.is_file():
            raise PlanError(f"{path}: plan file not found")
        if path.stat().st_size > MAX_PLAN_FILE_BYTES:
            raise PlanError(f"{path}: {path.stat().st_size} bytes; a plan file is at most {MAX_PLAN_FILE_BYTES}")
        try:
            text = path.read_bytes().decode("utf-8")
        except UnicodeDecodeError:
            raise PlanError(f"{path}: not a text file; a plan file is TOML (see sharding/plans.toml)") from None
        plans.update(parse_plans(text, str(path)))
    return plans


def select_plans(plans: dict[str, ShardingPlan], names: list[str] | None) -> list[ShardingPlan]:
    """The named plans in the given order (every plan when `names` is empty); an unknown name is a PlanError."""
    if not names:
        return list(plans.values())
    unknown = [n for n in names if n not in plans]
    if unknown:
        raise PlanError(f"unknown plan {unknown[0]!r}; available: {', '.join(plans)} (add one with --plan-file)")
    return [plans[n] for n in names]


def param_specs(plan: ShardingPlan, names_tree: dict) -> dict:
    """PartitionSpec for every parameter, in the parameter tree's structure (a tower's
    parameters, the subtree under its name, by the tower's rules where the plan has them)."""
    return {key: jax.tree.map(lambda names, t=key: plan.spec(names, "params", t), sub, is_leaf=is_names)
            for key, sub in names_tree.items()}
