"""Parameters as serving teams see them: one flat dict {"vision/blocks/qkv/kernel": array},
int8 weights as two entries ".../kernel.int8" and ".../kernel.scale". Every exported
program takes this dict as its first argument, and the orbax checkpoint stores it, so
`exported.call(checkpointer.restore(params_dir), pixels)` works without this package.
"""

from __future__ import annotations

from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp

from model.quant import QArray

SEP = "/"


def _key(path) -> str:
    return SEP.join(str(getattr(k, "key", k)) for k in path)


def flatten(params: dict) -> dict[str, jax.Array]:
    flat = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(params, is_leaf=lambda x: isinstance(x, QArray))[0]:
        name = _key(path)
        if isinstance(leaf, QArray):
            flat[f"{name}.int8"], flat[f"{name}.scale"] = leaf.q, leaf.scale
        else:
            flat[name] = leaf
    return flat


def unflatten(flat: dict, template: dict) -> dict:
    """The nested tree (QArrays where the template has them) from a flat dict."""
    def rebuild(path, leaf):
        name = _key(path)
        if isinstance(leaf, QArray):
            return QArray(flat[f"{name}.int8"], flat[f"{name}.scale"])
        return flat[name]
    return jax.tree_util.tree_map_with_path(rebuild, template, is_leaf=lambda x: isinstance(x, QArray))


def save(folder: Path, flat: dict) -> None:
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(Path(folder).absolute(), {k: np.asarray(v) for k, v in flat.items()})
    checkpointer.wait_until_finished()


def restore(folder: Path, abstract: dict | None = None, partial: bool = False) -> dict:
    """The flat dict; with `abstract` (ShapeDtypeStructs carrying shardings) each array is
    placed with its sharding as it is read; `partial` restores only the arrays named there."""
    path = Path(folder).absolute()
    if abstract is None:
        return ocp.StandardCheckpointer().restore(path)
    if partial:
        args = ocp.args.PyTreeRestore(item=abstract, restore_args=jax.tree.map(
            lambda s: ocp.ArrayRestoreArgs(sharding=s.sharding), abstract), partial_restore=True)
        return ocp.PyTreeCheckpointer().restore(path, args=args)
    return ocp.StandardCheckpointer().restore(path, abstract)
