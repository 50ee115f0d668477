"""Sharding plans as data: parsing, validity with reasons, and golden PartitionSpecs."""

from __future__ import annotations

import difflib
import json
import os
from pathlib import Path

import jax
import pytest

from model import get_preset
from model.axes import is_names
from model.state import abstract_params, logical_names
from sharding import PlanError, load_plans, param_specs, parse_plans, select_plans
from sharding.validity import check

GOLDEN = Path(__file__).parent / "golden" / "partition_specs_base_4x8.json"
MESH = {"data": 4, "model": 8}


def _validity(plan, cfg, batch):
    return check(plan, logical_names(cfg), abstract_params(cfg), {**cfg.axis_sizes(), "batch": {batch}}, MESH)


def test_shipped_plans_are_the_documented_six():
    assert list(load_plans()) == ["replicated", "dp", "fsdp", "tp", "fsdp-tp", "hidden"]


def test_rules_keep_their_order_and_split_params_from_activations():
    plans = load_plans()
    assert plans["fsdp"].params == (("embed", ("data", "model")),)
    assert plans["fsdp"].activations == (("batch", ("data", "model")),)
    assert plans["dp"].params == ()
    assert [r[0] for r in plans["fsdp-tp"].params] == ["head_dim", "mlp", "embed"]


def test_base_tp_is_invalid_because_12_heads_do_not_divide_8_ways():
    validity = _validity(load_plans()["tp"], get_preset("base"), 32)
    assert not validity.ok
    assert "parameter axis heads=12 does not divide over model (8)" in validity.reason
    assert "activation axis heads=12 does not divide over model (8)" in validity.reason


def test_batch_of_one_cannot_be_split_over_32_devices():
    plans, cfg = load_plans(), get_preset("base")
    assert _validity(plans["dp"], cfg, 1).reasons == ("activation axis batch=1 does not divide over data x model (32)",)
    assert _validity(plans["hidden"], cfg, 1).ok
    assert _validity(plans["replicated"], cfg, 1).ok


def test_every_shipped_plan_is_valid_for_tiny_on_4x8_at_batch_32():
    cfg = get_preset("tiny")
    for plan in load_plans().values():
        assert _validity(plan, cfg, 32).ok, (plan.name, _validity(plan, cfg, 32).reason)


@pytest.mark.parametrize("text, message", [
    ("[p]\nparams = { embedding = 'data' }", "plan 'p': unknown logical axis 'embedding' in params; known: batch"),
    ("[p]\nactivations = { batch = 'rows' }", "plan 'p': activations.batch names unknown mesh axis 'rows'"),
    ("[p]\nparams = { embed = ['data', 'data'] }", "plan 'p': params.embed uses mesh axis 'data' twice in one array"),
    ("[p]\nparams = { embed = [] }", "params.embed must be a mesh axis name or a non-empty list"),
    ("[p]\nshard = {}", "plan 'p': unknown key(s) ['shard']"),
    ("[p\n", "not valid TOML"),
    ("p = 3", "top-level key 'p' must be a plan table"),
    ('["../x"]\nparams = {}', "plan name '../x' must be letters, digits"),
    ('["a b"]\nparams = {}', "plan name 'a b' must be letters, digits"),
    ('[".hidden"]\nparams = {}', "plan name '.hidden' must be letters, digits"),
])
def test_bad_plan_files_fail_with_one_line_naming_the_problem(text, message):
    with pytest.raises(PlanError) as err:
        parse_plans(text, "my_plans.toml")
    assert message in str(err.value) and str(err.value).startswith("my_plans.toml: ")


def test_user_plan_files_add_and_replace_plans(tmp_path):
    extra = tmp_path / "mine.toml"
    extra.write_text('[dp]\ndescription = "mine"\nactivations = { batch = "data" }\n'
                     '[heads-only]\nparams = { head_dim = "model" }\n')
    plans = load_plans([extra])
    assert plans["dp"].description == "mine" and plans["dp"].source == str(extra)
    assert "heads-only" in plans
    with pytest.raises(PlanError, match="plan file not found"):
        load_plans([tmp_path / "missing.toml"])
    with pytest.raises(PlanError, match="unknown plan 'nope'; available: replicated, dp"):
        select_plans(plans, ["nope"])


def _golden_snapshot() -> dict:
    cfg = get_preset("base")
    names = logical_names(cfg)
    snapshot = {}
    for plan in load_plans().values():
        specs = param_specs(plan, names)
        flat = jax.tree_util.tree_flatten_with_path(specs, is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))[0]
        validity = _validity(plan, cfg, 32)
        snapshot[plan.name] = {
            "valid_at_batch_32": validity.ok, "reasons": list(validity.reasons),
            "params": {".".join(k.key for k in path): str(spec) for path, spec in flat},
        }
    return snapshot


def test_golden_partition_specs_for_base_on_4x8():
    """Every parameter's PartitionSpec per plan. On purpose changes: UPDATE_GOLDEN=1 pytest ..."""
    current = json.dumps(_golden_snapshot(), indent=1, sort_keys=True) + "\n"
    if os.environ.get("UPDATE_GOLDEN") == "1" or not GOLDEN.exists():
        GOLDEN.write_text(current)
    expected = GOLDEN.read_text()
    if current != expected:
        diff = "".join(difflib.unified_diff(expected.splitlines(True), current.splitlines(True),
                                            "golden", "current", n=2))
        pytest.fail(f"PartitionSpecs changed (UPDATE_GOLDEN=1 to accept):\n{diff[:6000]}")


def test_golden_snapshot_covers_every_parameter():
    snapshot = _golden_snapshot()
    n_params = len(jax.tree.leaves(logical_names(get_preset("base")), is_leaf=is_names))
    assert all(len(entry["params"]) == n_params for entry in snapshot.values())
    fsdp = snapshot["fsdp"]["params"]
    assert fsdp["vision.blocks.qkv.kernel"] == "P(None, ('data', 'model'), None, None, None)"
    assert snapshot["fsdp-tp"]["params"]["text_decoder.blocks.mlp.fc1.kernel"] == "P(None, 'data', 'model')"


def _constraints(lowered) -> list[str]:
    return [line.split("<@mesh", 1)[1] for line in lowered.as_text().splitlines() if "sdy.sharding_constraint" in line]


def test_a_program_lowered_under_a_second_plan_takes_that_plans_activation_rules():
    """JAX caches a trace per function object and never sees the plan's (flax) activation
    rules: before programs.traced_afresh, the second lowering of one program reused the
    first plan's sharding constraints (a replicated decode_step ran with dp's batch split)."""
    from capibara_export.matrix.programs import build_program, lower
    from capibara_export.matrix.targets import get_target, make_mesh
    from capibara_export.matrix.serving import serving_function
    from capibara_export.matrix.serving import sharded_jit
    from sharding import get_policy

    mesh = make_mesh(get_target("cpu"), (4, 8))
    plans = load_plans()

    def program():
        return build_program(get_preset("tiny"), "encode_image", get_policy("fp32"), 32)

    shared = program()
    first = _constraints(lower(shared, plans["hidden"], mesh))
    second = _constraints(lower(shared, plans["fsdp-tp"], mesh))
    assert second == _constraints(lower(program(), plans["fsdp-tp"], mesh))
    assert first != second and any('{"data"}' in c for c in second), (first, second)

    def serving():
        return serving_function(get_preset("tiny"), "encode_image", get_policy("fp32"), 32)

    def sharded(s, plan):
        _, lowered, abstract = sharded_jit(s, plans[plan], mesh)
        return _constraints(lowered(*abstract))

    shared = serving()
    assert sharded(shared, "hidden") == first
    assert sharded(shared, "fsdp-tp") == sharded(serving(), "fsdp-tp") == second
