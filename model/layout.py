"""Where each dense kernel's axes sit: the canonical layout and the GPU serving layout.

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

`to_layout` turns any canonical per-parameter tree (arrays, int8 `QArray`s, shape
structs, logical names, PartitionSpecs) into the config's layout by permuting the kernel
axes, so values, names and shardings stay in step. int8 scales are computed in the
canonical layout first (sharding/precision.py reads the contracting axes from canonical
names) and then moved with their kernel.
"""

from __future__ import annotations

import functools

import jax
import numpy as np
from flax import nnx
from jax.sharding import PartitionSpec

from .config import BlipConfig
from .layers import Dense
from .quant import QArray
from .state import abstract_model

CANONICAL = "in-out"


def canonical(config: BlipConfig) -> BlipConfig:
    """The same model in the checkpoint layout."""
    return config if config.text.kernel_layout == CANONICAL else config.with_kernel_layout(CANONICAL)


def serving_layout(platform: str) -> str:
    """The text kernels' layout for programs that run on `platform` ("cpu", "gpu", "tpu"):
    out-in on a GPU, canonical on a TPU and a CPU (see the module docstring)."""
    return "out-in" if platform == "gpu" else CANONICAL


@functools.lru_cache(maxsize=32)
def _moved_kernels(config: BlipConfig) -> tuple[tuple[tuple, int, int, int], ...]:
    """(path to kernel, rank, inputs, outputs) of every dense kernel `config` stores out-in."""
    if config.text.kernel_layout == CANONICAL:
        return ()
    model = abstract_model(config)
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


def _convert(tree: dict, config: BlipConfig, forward: bool) -> dict:
    moved = _moved_kernels(config)
    if not moved:
        return tree
    out = _copy_dicts(tree)
    for path, rank, n_in, n_out in moved:
        parent = out
        for key in path[:-1]:
            if key not in parent:
                break
            parent = parent[key]
        else:
            if path[-1] in parent:
                parent[path[-1]] = _move(parent[path[-1]], rank, n_in, n_out, forward)
    return out


def _copy_dicts(tree):
    return {k: _copy_dicts(v) for k, v in tree.items()} if isinstance(tree, dict) else tree


def to_layout(tree: dict, config: BlipConfig) -> dict:
    """A canonical (in-out) per-parameter tree in `config`'s layout; the input is unchanged."""
    return _convert(tree, config, forward=True)


def from_layout(tree: dict, config: BlipConfig) -> dict:
    """A tree in `config`'s layout back in the canonical layout."""
    return _convert(tree, config, forward=False)
