"""A model's parameters as a program takes them: the precision policy's storage form, in
the config's kernel layout, with the plan's shardings to match.

The one place the two conversions meet, in this order: a policy's storage form is taken
in the canonical layout (int8 scales are per output channel, read from canonical logical
names by sharding/precision.py), then model/layout.py moves every text kernel, its int8
scale and its PartitionSpec together. Every caller that turns float parameters into
program arguments, or needs their shapes or shardings, goes through here.
"""

from __future__ import annotations

from model import BlipConfig
from model.layout import canonical, to_layout
from model.state import abstract_params, logical_names

from .plans import ShardingPlan, param_specs
from .precision import PrecisionPolicy, abstract_store, storage_specs, store


def stored_params(params: dict, config: BlipConfig, policy: PrecisionPolicy) -> dict:
    """Canonical float parameters (a checkpoint's, `init_params(canonical(config))`) in the
    policy's storage form and `config`'s layout."""
    canon = canonical(config)
    return to_layout(store(params, logical_names(canon), policy), config)


def stored_template(config: BlipConfig, policy: PrecisionPolicy) -> dict:
    """ShapeDtypeStructs (QArrays of them for int8) of `stored_params`, nothing allocated."""
    canon = canonical(config)
    return to_layout(abstract_store(abstract_params(canon), logical_names(canon), policy), config)


def stored_specs(plan: ShardingPlan, config: BlipConfig, policy: PrecisionPolicy) -> dict:
    """The plan's PartitionSpecs for `stored_params`, leaf for leaf."""
    names = logical_names(canonical(config))
    return to_layout(storage_specs(param_specs(plan, names), names, policy), config)
