"""The model interface: everything the pipeline knows about a model, in one frozen dataclass.

Build, analysis, selection, plan search, export, verify and serving read a model only
through a `ModelFamily` (docs/models.md). A family names its configs and presets, makes
its parameters abstractly (nothing materialised), and builds each entry as a `Program`: a
pure function of (params, inputs...) with abstract inputs for a batch size and the logical
axis names of every input and output. The sharding plans map those names to a mesh; the
model never sees one.

The split follows orbax-export's `JaxModule(params, {name: fn})` with one serving config
per signature: the parameters are one tree for every entry, and each `Entry` is one
signature (its input names, its output names, which axis of each input is the batch).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

from .errors import UserError


class ProgramError(UserError):
    """An entry that cannot be built for this model and options (reported as invalid)."""


@dataclass(frozen=True)
class ProgramOptions:
    """The static shapes and settings of the entry programs: generated length and prompt length,
    the padded text length, rematerialisation and learning rate for training, beam width.
    A family reads the ones its entries need and ignores the rest."""
    max_new_tokens: int = 20      # generation: generated tokens (static loop length)
    prompt_len: int = 1           # generation: prompt length ([BOS] alone by default)
    text_len: int = 32            # scoring / training: padded text length
    remat: str = "none"           # training: none | full | dots-saveable
    learning_rate: float = 1e-5   # training: AdamW
    beams: int = 3                # beam search: beam width

    @property
    def cache_len(self) -> int:
        """A decoder's KV-cache length: the prompt and every generated token."""
        return self.prompt_len + self.max_new_tokens


@dataclass
class Program:
    """One entry as a pure function with abstract arguments and logical names.

    `args[0]` is the parameter tree (ShapeDtypeStructs, QArrays of them for int8 weights),
    named "params"; a training entry's optimizer state is named "opt_state". Every other
    argument and the outputs are trees of logical-name tuples, one per array."""
    entry: str
    fn: Callable
    args: tuple                   # pytrees of ShapeDtypeStruct (QArray for int8 weights)
    arg_names: tuple              # logical names per argument; "params" / "opt_state" for those
    out_names: Any                # pytree of logical-name tuples, or "params"/"opt_state" markers
    donate: tuple[int, ...] = ()
    axis_sizes: dict[str, set[int]] = field(default_factory=dict)
    analytic_flops: int = 0       # whole program, all devices; 0: the family gives no count
    config: Any = None
    policy: Any = None
    optimizer: Any = None         # a training entry: the optax transformation (for opt_state specs)


@dataclass(frozen=True)
class Entry:
    """One entry's signature: what a SavedModel signature, a jax.export artifact, the manifest
    and the server call it by.

    `inputs` names the program's arguments after the parameters; a tree argument (a cache)
    names its leaves NAME/KEY. `outputs` names the output: one name, a name per element of a
    tuple output, or None for a dict output (named by its keys). `batch_axes` gives, per input,
    the axis that is the batch (None: the input has none, like a decode position), applied to
    every leaf of a tree input. `serving` entries are what a build compiles and a bundle
    exports by default; a `trains` entry returns new parameters and optimizer state; a
    `tf_signature` entry is also a signature of the bundle's SavedModels."""
    name: str
    inputs: tuple[str, ...]
    outputs: str | tuple[str, ...] | None
    batch_axes: tuple[int | None, ...] = ()
    serving: bool = True
    trains: bool = False
    tf_signature: bool = True      # a TF SavedModel signature (needs every input batched on axis 0)

    def batch_axis(self, i: int) -> int | None:
        return self.batch_axes[i] if i < len(self.batch_axes) else 0


def _same_config(config, platform, kernel_layout=None, layer_storage=None):
    return config


def _same(config):
    return config


def _tree_as_is(tree, config):
    return tree


@dataclass(frozen=True, repr=False)
class ModelFamily:
    """A model as the pipeline takes it (docs/models.md has a worked example).

    Required: a name, the config class and how a config is read back from a recorded dict,
    the presets, the entries and how to build one, the abstract parameters and their logical
    names, the sizes each logical axis takes, and fixed example inputs (what `verify`
    compares on). Optional: a platform's serving form of a config (BLIP's kernel layouts),
    random and checkpoint parameters, a context that makes the model's kernels portable for
    an export, and assets a bundle ships beside the parameters (BLIP's processor)."""
    name: str
    description: str                                # the manifest's "for": who serves the model, what it does
    config_type: type
    presets: Mapping[str, Any]
    entries: tuple[Entry, ...]
    config_from_dict: Callable[[dict], Any]
    abstract_params: Callable[[Any], dict]          # config → ShapeDtypeStructs, f32, canonical layout
    logical_names: Callable[[Any], dict]            # config → the same tree of logical-name tuples
    # build(config, entry, policy, batch, options, params) → Program; `params` is the parameter
    # template in the policy's storage form, `policy` has .name, .compute, .output_dtype, .trainable
    build: Callable[..., Program]
    axis_sizes: Callable[[Any], dict[str, set[int]]]
    # example_inputs(config, entry, abstract_inputs, numpy Generator) → numpy arrays
    example_inputs: Callable[..., tuple]
    scopes: tuple[str, ...] = ()                    # named parts a plan may give rules of their own
    logical_axes: tuple[str, ...] = ()              # names beyond modelapi.axes.LOGICAL_AXES it uses
    precisions: tuple[str, ...] = ("fp32", "bf16-mixed", "bf16", "int8-weights")
    config_to_dict: Callable[[Any], dict] = lambda config: config.to_dict()
    # the config's form for one platform's programs; kernel_layout/layer_storage None: the platform's
    for_platform: Callable[..., Any] = _same_config
    kernel_layouts: tuple[str, ...] = ()            # choices of --kernel-layout beside auto
    layer_storages: tuple[str, ...] = ()            # choices of --layer-storage beside auto
    canonical: Callable[[Any], Any] = _same         # the config whose layout checkpoints hold
    to_layout: Callable[[dict, Any], dict] = _tree_as_is   # canonical tree → the config's layout
    init_params: Callable[[Any, int], dict] | None = None        # (config, seed) → random params
    checkpoint_config: Callable[[Any], Any] | None = None        # folder → config
    load_checkpoint: Callable[[Any], tuple[Any, dict]] | None = None   # folder → (config, params)
    portable: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext
    # write_assets(folder, config, checkpoint, allowed_file_names) → where they came from, for the
    # manifest: the tokenizer or processor files serving needs (only names the bundle reader allows)
    write_assets: Callable[..., str] | None = None
    bundle_entries: Callable[[Any], tuple[str, ...]] | None = None   # config → what a bundle exports
    manifest_fields: Callable[[Any], dict] = lambda config: {}         # config → extra `model` fields
    default_signature: str | None = None            # the SavedModels' serving_default (None: the first)
    # tie_check(config, options, entry, params, inputs, tolerance) → check(got_ids, want_ids) →
    # (accepted, note), or None: how `verify` accepts generated ids that differ from the reference's
    # only where the reference itself nearly tied (params: the nested stored tree, computed in f32)
    tie_check: Callable[..., Any] | None = None
    # check_assets(folder, config) → a note: load what write_assets wrote, as serving would
    check_assets: Callable[..., str] | None = None
    # open_processor(folder, config) → the model's processor over write_assets' files (BLIP's
    # Preprocessor: images, texts, prompt, decode), for applications that take raw inputs
    open_processor: Callable[..., Any] | None = None

    def __repr__(self) -> str:
        return f"ModelFamily({self.name!r}, presets={sorted(self.presets)}, entries={list(self.entry_names)})"

    def entry(self, name: str) -> Entry:
        for e in self.entries:
            if e.name == name:
                return e
        raise ProgramError(f"unknown entry {name!r} for model {self.name}; choose from "
                           f"{', '.join(e.name for e in self.entries)}")

    @property
    def entry_names(self) -> tuple[str, ...]:
        return tuple(e.name for e in self.entries)

    @property
    def serving_entries(self) -> tuple[str, ...]:
        return tuple(e.name for e in self.entries if e.serving)

    def exported_entries(self, config) -> tuple[str, ...]:
        """The entries a bundle exports for `config` (by default the serving entries)."""
        return self.bundle_entries(config) if self.bundle_entries else self.serving_entries

    def preset(self, name: str):
        try:
            return self.presets[name]
        except KeyError:
            raise UserError(f"unknown model preset {name!r} for {self.name}; choose one of "
                            f"{sorted(self.presets)}") from None
