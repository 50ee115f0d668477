"""How parameters and the decode cache are laid out: the canonical (checkpoint) layout and
each platform's serving layout.

Checkpoints, the TPU programs and every parameter tree the pipeline is handed keep the
canonical "in-out" layout (inputs first). A config whose text towers say
`kernel_layout="out-in"` stores those towers' dense kernels outputs first, so a batch-1
decode dot reads each output's weights contiguously. Measured on a lent H200
(docs/performance.md): XLA:GPU turns a batch-1 dot into a reduction, over columns for
in-out kernels (a handful of blocks) and over rows for out-in ones; `base` caption at
batch 1 bf16 went from 20.1 to 13.6 ms, batch 32 within 1%. On XLA:CPU the same layout
did not help the whole model (a pure 12-layer GEMV chain ran 3.5x faster, the caption
program did not), so CPU programs keep the canonical layout; the vision tower keeps it
everywhere (its dots are matrix-matrix).

A tower whose config says `layer_storage="per-layer"` stores each of its layers as its own
arrays (`blocks/0/...`, `blocks/1/...`) instead of stacked on a leading `layers` axis, and
runs them straight-line instead of with `lax.scan`; `TextConfig.cross_cache="head-major"`
caches the cross-attention keys and values (L, B, 2, N, H, P). Both are the CPU serving
layout: XLA:CPU hands a dot only a whole buffer, so a scanned layer's weights were copied
out of the stacked array before every dot of every decode step (160 of 388 thread-ms of the
`small` caption, fp32, batch 1), and the patch-major cache was transposed before both
attention dots of every layer and step. Measured side by side on the 2-core development
host (`python -m tools.studies.cpu_layers_probe`, docs/performance.md): caption 1.23x, decode_step
1.25x, encode_image 1.06x faster, compile 2.8 -> 7.2 s. TPU and GPU programs keep stacked,
patch-major layouts (their dots read slices in place, and a scan keeps compile time flat in
depth); so do checkpoints.

`to_layout` turns any canonical per-parameter tree (arrays, int8 `QArray`s, shape
structs, logical names, PartitionSpecs) into the config's layout by permuting the kernel
axes and splitting per-layer towers, so values, names and shardings stay in step. int8
scales are computed in the canonical layout first (sharding/precision.py reads the
contracting axes from canonical names) and then moved and split with their kernel.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import numpy as np
from flax import nnx
from jax.sharding import PartitionSpec

from .axes import LAYERS
from .config import BlipConfig
from .layers import Dense
from .quant import QArray
from .state import abstract_model

CANONICAL = "in-out"


def canonical(config: BlipConfig) -> BlipConfig:
    """The same model in the checkpoint layout: in-out kernels, stacked layers."""
    text = dataclasses.replace(config.text, kernel_layout=CANONICAL, layer_storage="stacked", cross_cache="patch-major")
    vision = dataclasses.replace(config.vision, layer_storage="stacked")
    same = text == config.text and vision == config.vision
    return config if same else dataclasses.replace(config, vision=vision, text=text)


def serving_layout(platform: str) -> str:
    """The text kernels' layout for programs that run on `platform` ("cpu", "gpu", "tpu"):
    out-in on a GPU, canonical on a TPU and a CPU (see the module docstring)."""
    return "out-in" if platform == "gpu" else CANONICAL


def serving_storage(platform: str) -> str:
    """How programs that run on `platform` store the text towers' layers: per-layer on a CPU,
    stacked on a TPU and a GPU (see the module docstring)."""
    return "per-layer" if platform == "cpu" else "stacked"


def serving_cross_cache(platform: str) -> str:
    """How programs that run on `platform` cache cross-attention keys and values
    (TextConfig.cross_cache): head-major on a CPU, patch-major on a TPU and a GPU."""
    return "head-major" if platform == "cpu" else "patch-major"


def for_platform(config: BlipConfig, platform: str, kernel_layout: str | None = None,
                 layer_storage: str | None = None, cross_cache: str | None = None) -> BlipConfig:
    """`config` in the serving layout of `platform` (kernel layout, layer storage, cross
    cache), each with the value given here instead where one is given."""
    return (config.with_kernel_layout(kernel_layout or serving_layout(platform))
            .with_layer_storage(layer_storage or serving_storage(platform))
            .with_cross_cache(cross_cache or serving_cross_cache(platform)))


@functools.lru_cache(maxsize=32)
def _moved_kernels(config: BlipConfig) -> tuple[tuple[tuple, int, int, int], ...]:
    """(path to kernel, rank, inputs, outputs) of every dense kernel `config` stores out-in,
    in the stacked tree (the kernels move before per-layer towers are split)."""
    if config.text.kernel_layout == CANONICAL:
        return ()
    model = abstract_model(config.with_layer_storage("stacked"))
    return tuple((tuple(path) + ("kernel",), len(node.kernel.get_value().shape), node.n_in, node.n_out)
                 for path, node in nnx.iter_graph(model) if isinstance(node, Dense) and node.layout == "out-in")


def _permutation(ndim: int, n_in: int, n_out: int, forward: bool) -> tuple[int, ...]:
    lead = ndim - n_in - n_out
    if forward:   # (lead, in, out) -> (lead, out, in)
        return (*range(lead), *range(lead + n_in, ndim), *range(lead, lead + n_in))
    return (*range(lead), *range(lead + n_out, ndim), *range(lead, lead + n_out))


def _move(leaf, rank: int, n_in: int, n_out: int, forward: bool):
    perm = _permutation(rank, n_in, n_out, forward)
    if isinstance(leaf, QArray):
        return QArray(q=_move(leaf.q, rank, n_in, n_out, forward), scale=_move(leaf.scale, rank, n_in, n_out, forward))
    if isinstance(leaf, PartitionSpec):   # trailing unsharded axes may be left out of a spec
        entries = tuple(leaf) + (None,) * (rank - len(leaf))
        return PartitionSpec(*(entries[i] for i in perm))
    if isinstance(leaf, tuple):   # logical names
        return tuple(leaf[i] for i in perm)
    if isinstance(leaf, jax.ShapeDtypeStruct):
        return jax.ShapeDtypeStruct(tuple(leaf.shape[i] for i in perm), leaf.dtype)
    if isinstance(leaf, np.ndarray):
        return np.ascontiguousarray(np.transpose(leaf, perm))
    return jax.numpy.transpose(leaf, perm)


@functools.lru_cache(maxsize=32)
def _per_layer_towers(config: BlipConfig) -> tuple[tuple[tuple, int], ...]:
    """(path, depth) of every layer stack `config` stores per layer (a tower's `blocks`)."""
    if config.text.layer_storage == config.vision.layer_storage == "stacked":
        return ()
    return tuple((tuple(path), len(node)) for path, node in nnx.iter_graph(abstract_model(config))
                 if isinstance(node, nnx.List))


def _layer(leaf, i: int):
    """Layer i of a stacked leaf: the leading `layers` axis dropped from values, names and specs."""
    if isinstance(leaf, dict):
        return {k: _layer(v, i) for k, v in leaf.items()}
    if isinstance(leaf, QArray):
        return QArray(q=_layer(leaf.q, i), scale=_layer(leaf.scale, i))
    if isinstance(leaf, PartitionSpec):
        return PartitionSpec(*tuple(leaf)[1:])
    if isinstance(leaf, tuple):   # logical names
        return leaf[1:]
    if isinstance(leaf, jax.ShapeDtypeStruct):
        return jax.ShapeDtypeStruct(leaf.shape[1:], leaf.dtype)
    return leaf[i]


def _stacked(layers: list):
    """The per-layer leaves stacked back on a leading `layers` axis (values, names, specs)."""
    first = layers[0]
    if isinstance(first, dict):
        return {k: _stacked([layer[k] for layer in layers]) for k in first}
    if isinstance(first, QArray):
        return QArray(q=_stacked([a.q for a in layers]), scale=_stacked([a.scale for a in layers]))
    if isinstance(first, PartitionSpec):
        return PartitionSpec(None, *first)
    if isinstance(first, tuple):
        return (LAYERS, *first)
    if isinstance(first, jax.ShapeDtypeStruct):
        return jax.ShapeDtypeStruct((len(layers), *first.shape), first.dtype)
    if isinstance(first, np.ndarray):
        return np.stack(layers)
    return jax.numpy.stack(layers)


def _replace_at(tree: dict, path: tuple, change) -> None:
    """tree[path] = change(tree[path]) in place, when the tree holds that path (a tree may
    hold only some parameters, e.g. one tower's)."""
    parent = tree
    for key in path[:-1]:
        if key not in parent:
            return
        parent = parent[key]
    if path[-1] in parent:
        parent[path[-1]] = change(parent[path[-1]])


def _split_towers(tree: dict, config: BlipConfig, forward: bool) -> dict:
    for path, depth in _per_layer_towers(config):
        if forward:
            _replace_at(tree, path, lambda layers, depth=depth: {i: _layer(layers, i) for i in range(depth)})
        else:
            _replace_at(tree, path, lambda layers: _stacked([layers[i] for i in sorted(layers)]))
    return tree


def _convert(tree: dict, config: BlipConfig, forward: bool) -> dict:
    """Kernels move in the stacked tree; per-layer towers are split after (and joined before)."""
    moved = _moved_kernels(config)
    towers = _per_layer_towers(config)
    if not moved and not towers:
        return tree
    out = _copy_dicts(tree)
    if not forward:
        out = _split_towers(out, config, forward)
    for path, rank, n_in, n_out in moved:
        _replace_at(out, path, lambda leaf, r=rank, i=n_in, o=n_out: _move(leaf, r, i, o, forward))
    return _split_towers(out, config, forward) if forward else out


def _copy_dicts(tree):
    return {k: _copy_dicts(v) for k, v in tree.items()} if isinstance(tree, dict) else tree


def to_layout(tree: dict, config: BlipConfig) -> dict:
    """A canonical (in-out) per-parameter tree in `config`'s layout; the input is unchanged."""
    return _convert(tree, config, forward=True)


def from_layout(tree: dict, config: BlipConfig) -> dict:
    """A tree in `config`'s layout back in the canonical layout."""
    return _convert(tree, config, forward=False)
