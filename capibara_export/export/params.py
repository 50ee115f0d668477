"""The flat parameter dict (`matrix.serving.flatten`: {"vision/blocks/qkv/kernel": array},
int8 weights as ".../kernel.int8" and ".../kernel.scale") saved and restored as an orbax
checkpoint, so `exported.call(checkpointer.restore(params_dir), pixels)` works without
this package.
"""

from __future__ import annotations

from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp

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
