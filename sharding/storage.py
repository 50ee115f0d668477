"""A model's parameters as a program takes them: the precision policy's storage form, in
the config's kernel layout, with the plan's shardings to match.

The one place the two conversions meet, in this order: a policy's storage form is taken
in the canonical layout (int8 scales are per output channel, read from canonical logical
names by sharding/precision.py), then the model family's `to_layout` (BLIP's model/layout.py)
moves every kernel, its int8 scale and its PartitionSpec together. The family is the
config's own, handed in by the caller (the pipeline's capibara_export/families.py finds it). Every caller that turns float parameters into
program arguments, or needs their shapes or shardings, goes through here.
"""

from __future__ import annotations

from modelapi.family import ModelFamily

from .plans import ShardingPlan, param_specs
from .precision import PrecisionPolicy, abstract_store, storage_specs, store


def stored_params(family: ModelFamily, params: dict, config, policy: PrecisionPolicy) -> dict:
    """Canonical float parameters (a checkpoint's, random ones of the canonical config) in the
    policy's storage form and `config`'s layout."""
    canon = family.canonical(config)
    return family.to_layout(store(params, family.logical_names(canon), policy), config)


def stored_template(family: ModelFamily, config, policy: PrecisionPolicy) -> dict:
    """ShapeDtypeStructs (QArrays of them for int8) of `stored_params`, nothing allocated."""
    canon = family.canonical(config)
    return family.to_layout(abstract_store(family.abstract_params(canon), family.logical_names(canon), policy),
                            config)


def stored_specs(family: ModelFamily, plan: ShardingPlan, config, policy: PrecisionPolicy) -> dict:
    """The plan's PartitionSpecs for `stored_params`, leaf for leaf."""
    names = family.logical_names(family.canonical(config))
    return family.to_layout(storage_specs(param_specs(plan, names), names, policy), config)
