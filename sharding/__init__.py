"""Sharding plans and precision policies, as data."""

from .plans import MESH_AXES, PlanError, ShardingPlan, load_plans, param_specs, parse_plans, select_plans
from .precision import DEFAULT_PRECISIONS, POLICIES, PrecisionError, PrecisionPolicy, get_policy
from .validity import Validity, check

__all__ = ["MESH_AXES", "PlanError", "ShardingPlan", "load_plans", "param_specs", "parse_plans", "select_plans",
           "DEFAULT_PRECISIONS", "POLICIES", "PrecisionError", "PrecisionPolicy", "get_policy", "Validity", "check"]
