"""Plans proposed by the hotspots (capibara_export/analysis/plan_search.py): per-tower rules in the
plan format, a build that compiles the proposal as an extra unit, and a selection that takes
it only when it predicts faster."""

from __future__ import annotations

import json

import pytest
from jax.sharding import PartitionSpec

from sharding.plans import PlanError, load_plans, param_specs, parse_plans

# dp, except that the vocabulary is sharded over every device: the vision tower runs as under
# dp, the text decoder gathers the lm head at every decode step. Beside `replicated` (whose
# text decoder needs no collective at all) the towers disagree: vision is cheapest here, the
# text decoder under replicated.
VOCAB_PLAN = """
[dp-vocab]
description = "dp with the vocabulary sharded over every device"
params = { vocab = ["data", "model"] }
activations = { batch = ["data", "model"] }
"""

TOWER_PLAN = """
[mix]
description = "replicated, with the vision tower on dp"
params = {}
activations = {}
[mix.towers.vision]
params = { embed = ["data", "model"] }
activations = { batch = ["data", "model"] }
"""


def test_a_plan_may_give_a_tower_rules_of_its_own():
    from model import get_preset
    from model.state import logical_names

    plan = parse_plans(TOWER_PLAN, "test")["mix"]
    assert plan.spec(("batch", "embed"), "activations") == PartitionSpec(None, None)
    assert plan.spec(("batch", "embed"), "activations", "vision") == PartitionSpec(("data", "model"), None)
    specs = param_specs(plan, logical_names(get_preset("tiny")))
    assert specs["vision"]["class_embed"] == PartitionSpec(("data", "model"))      # the tower's rules
    assert not any(any(s) for s in _leaves(specs["text_decoder"]))                       # the plan's own
    assert type(plan).from_dict(plan.to_dict()) == plan
    assert "towers" not in load_plans()["dp"].to_dict()   # shipped plans record (and cache) as before
    # a scope the model lacks: the plan parses (another model may have it) and is invalid for this one
    from model.family import FAMILY
    from sharding.validity import check

    foreign = parse_plans("[p]\n[p.towers.lm_head]\nparams = {}\n", "test")["p"]
    cfg = get_preset("tiny")
    validity = check(foreign, FAMILY.logical_names(cfg), FAMILY.abstract_params(cfg), cfg.axis_sizes(),
                     {"data": 4, "model": 8}, "blip", FAMILY.scopes)
    assert validity.reason == ("plan gives rules to scope 'lm_head', which model blip does not have "
                               "(its scopes: vision, text_decoder, text_encoder)")
    with pytest.raises(PlanError, match="tower 'lm/head' is not a scope name"):
        parse_plans("[p]\n[p.towers.\"lm/head\"]\nparams = {}\n", "test")
    with pytest.raises(PlanError, match="unknown logical axis 'width' in towers.vision.params"):
        parse_plans("[p]\n[p.towers.vision]\nparams = { width = 'model' }\n", "test")


@pytest.fixture(scope="module")
def out(tmp_path_factory):
    folder = tmp_path_factory.mktemp("search")
    (folder / "vocab.toml").write_text(VOCAB_PLAN)
    return folder


@pytest.fixture
def work_bound_tpu(monkeypatch):
    """The default target's entry without its per-kernel overhead. With it, the tiny model on a
    TPU is launch-bound (caption: ~2,400 kernel launches, 1.4 ms of a 1.5 ms prediction), so
    whichever plan launches fewest kernels wins and no tower mix can pay; these tests are about
    the search's mechanics where the towers' work decides, as it does for the base model."""
    from dataclasses import replace

    from capibara_export.analysis.hardware import HARDWARE

    monkeypatch.setitem(HARDWARE, "tpu-v4-chip", replace(HARDWARE["tpu-v4-chip"], kernel_overhead=0.0))


def _build(out, plans: tuple[str, ...], **kw):
    from capibara_export.matrix.driver import BuildRequest, run_build
    from capibara_export.matrix.derive import derive

    request = BuildRequest(model="tiny", entries=("caption",), plans=plans, plan_files=(str(out / "vocab.toml"),),
                           precisions=("fp32",), out=out, name="-".join(plans), **kw)
    result = run_build(request, finish=lambda staging, _: derive(staging))
    return result, json.loads((result.folder / "selection.json").read_text())["selections"][0]


def test_towers_that_disagree_propose_a_plan_the_selection_takes(out, work_bound_tpu):
    result, chosen = _build(out, ("replicated", "dp-vocab"))
    derived = [r for r in result.records if r.origin]
    assert len(derived) == 1 and len(result.records) == 3
    record = derived[0]
    name = record.unit.plan
    assert name == "replicated_vision-dp-vocab" and name not in load_plans([out / "vocab.toml"])
    origin = record.origin
    assert origin["proposed_by"] == "caption-replicated-fp32-b32" and origin["round"] == 1
    assert origin["hotspot"].startswith("vision (") and "is cheapest under dp-vocab" in origin["hotspot"]
    assert origin["estimate_s"]["vision"]["dp-vocab"] < origin["estimate_s"]["vision"]["replicated"]
    assert origin["estimate_s"]["text_decoder"]["replicated"] < origin["estimate_s"]["text_decoder"]["dp-vocab"]
    # compiled, it predicts faster than both plans it came from, so the selection takes it and says why
    analysis = json.loads((result.folder / "analysis.json").read_text())["units"]
    latency = {u["unit"]["plan"]: u["roofline"]["latency_s"] for u in analysis.values()}
    assert latency[name] < min(latency["replicated"], latency["dp-vocab"])
    assert chosen["plan"] == name and chosen["derived"]
    assert "a plan derived from the hotspots of caption-replicated-fp32-b32" in chosen["reason"]
    assert "next: replicated" in chosen["reason"]
    # the report lists it with its origin and outcome
    assert "Plans derived from the hotspots" in (result.folder / "report.html").read_text()
    assert f"| {record.unit.id} | " in (result.folder / "summary.md").read_text()
    assert "| selected |" in (result.folder / "summary.md").read_text()
    # written out as a plan file that the next build takes with --plan-file
    (again,) = load_plans([result.folder / "derived-plans.toml"])[name].towers
    assert again == result.plans[name].towers[0]


def test_no_plan_is_derived_when_one_plan_serves_every_tower_best(out, work_bound_tpu):
    """With dp beside them, dp is cheapest for both towers: nothing is proposed, dp is taken."""
    result, chosen = _build(out, ("replicated", "dp-vocab", "dp"))
    assert not any(r.origin for r in result.records) and len(result.records) == 3
    assert chosen["plan"] == "dp" and not chosen["derived"]
    assert not (result.folder / "derived-plans.toml").exists()
    result, _ = _build(out, ("replicated", "dp-vocab"), derive_rounds=0)   # or when the search is off
    assert len(result.records) == 2


def test_a_derived_unit_that_predicts_slower_is_not_selected():
    from capibara_export.analysis.selection import select

    def unit(plan, latency, origin=None):
        u = {"unit": {"entry": "caption", "batch": 32, "precision": "fp32", "plan": plan}, "status": "ok",
             "reason": "", "memory": {"peak": 100, "fits": True, "hbm_bytes": 1000, "budget_fraction": 0.9,
                                      "arguments_by_kind": {"params": 10}},
             "roofline": {"latency_s": latency, "binding": "memory", "mfu": 0.1}}
        return {**u, "origin": origin} if origin else u

    analysis = {"units": {"a": unit("dp", 1e-3), "b": unit("dp_vision-fsdp", 2e-3, {"proposed_by": "a",
                                                                                     "hotspot": "vision ..."})}}
    (chosen,) = select(analysis)["selections"]
    assert chosen["plan"] == "dp" and not chosen["derived"] and "next: dp_vision-fsdp 2 ms" in chosen["reason"]


def _leaves(tree):
    import jax

    return jax.tree.leaves(tree, is_leaf=lambda x: isinstance(x, PartitionSpec))


def test_a_communication_bound_unit_proposes_its_plan_without_the_gathered_parameter_axis():
    """decode_step of base on tpu-v4-64 in bf16-mixed, as measured: fsdp-tp is the fastest unit
    and communication-bound, most bytes all-gathered over `data`, where it shards `embed`."""
    from capibara_export.analysis.hardware import HARDWARE
    from capibara_export.analysis.plan_search import propose

    def unit(plan, latency, binding, by_axis, by_kind):
        return {"unit": {"entry": "decode_step", "batch": 32, "precision": "bf16-mixed", "plan": plan},
                "status": "ok", "memory": {"fits": True},
                "hotspots": {"towers": [{"scope": "text_decoder", "flops": 1.0, "bytes": 1.0, "comm_bytes": 0.0}]},
                "roofline": {"latency_s": latency, "binding": binding, "comm_s_by_axis": by_axis},
                "collectives": {"by_kind": by_kind}}

    gathers = [{"kind": "all-gather", "axis": "data", "bytes": 24772608.0},
               {"kind": "all-reduce", "axis": "model", "bytes": 3698624.0},
               {"kind": "all-gather", "axis": "model", "bytes": 1000.0}]
    analysis = {"units": {
        "decode_step-fsdp-tp-bf16-mixed-b32": unit("fsdp-tp", 1.6e-3, "communication",
                                                   {"data": 0.586e-3, "model": 0.943e-3}, gathers),
        "decode_step-dp-bf16-mixed-b32": unit("dp", 2.14e-3, "memory", {}, [])}}
    plans = load_plans()
    (proposal,) = propose(analysis, plans, HARDWARE["tpu-v4-chip"])
    plan = proposal.plan
    assert plan.name == "fsdp-tp_params-off-data" and plan.activations == plans["fsdp-tp"].activations
    assert dict(plan.params) == {"head_dim": ("model",), "mlp": ("model",)}   # embed -> data dropped
    assert proposal.groups == (("decode_step", "bf16-mixed", 32),)
    assert proposal.origin["kind"] == "relieve-gathers" and proposal.origin["axis"] == "data"
    assert "23.6 MiB per device are all-gathered over data" in proposal.origin["hotspot"]
    # memory-bound at the top: nothing to relieve
    analysis["units"]["decode_step-dp-bf16-mixed-b32"]["roofline"]["latency_s"] = 1e-3
    assert propose(analysis, plans, HARDWARE["tpu-v4-chip"]) == []
