"""What the server serves: each sharded program of the bundle as a model of named tensors.

A model is one entry of the bundle in one precision (`caption`, `encode_image`, `score`, and
the semiotic entries where they were exported), compiled at one or more batch sizes (the
build's `--batch`). Its tensors are the manifest's inputs and outputs with the batch
dimension taken off: a request carries any number of rows up to the largest compiled batch,
and the batcher pads a batch of requests to the smallest compiled size that holds them.

Entries whose inputs are not rows along a leading batch dimension (`decode_step`: a scalar
position and a cache batched along its second dimension) are not served as models; `serve`
runs them as one-shot programs.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..bundle_error import BundleError

# KServe v2 / Open Inference Protocol datatypes for the dtypes a manifest names
DATATYPES = {"float32": "FP32", "float16": "FP16", "bfloat16": "BF16", "float64": "FP64", "int32": "INT32",
             "int64": "INT64", "int8": "INT8", "uint8": "UINT8", "bool": "BOOL", "bytes": "BYTES"}
SERVER_NAME = "capibara-export"


@dataclass(frozen=True)
class TensorSpec:
    """One input or output of a model: one row's shape (the batch dimension taken off)."""
    name: str
    dtype: str                 # a NumPy / ml_dtypes name, as in the manifest
    row_shape: tuple[int, ...]

    @property
    def datatype(self) -> str:
        return DATATYPES[self.dtype]

    @property
    def np_dtype(self) -> np.dtype:
        if self.dtype == "bytes":
            return np.dtype(object)   # elements are `bytes` (tensors.py)
        return np.dtype(self.dtype) if self.dtype != "bfloat16" else np.dtype(_bfloat16())

    def metadata(self) -> dict:
        """KServe v2 tensor metadata: -1 marks the batch dimension."""
        return {"name": self.name, "datatype": self.datatype, "shape": [-1, *self.row_shape]}


@dataclass(frozen=True)
class ModelSpec:
    """One served model: an entry in one precision, at every batch size it was compiled for."""
    name: str
    entry: str
    precision: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    batch_sizes: tuple[int, ...]              # increasing; the last is the largest batch served
    artifacts: tuple[dict, ...]               # the manifest's sharded artifact for each batch size
    optional_inputs: tuple[str, ...] = ()     # inputs a request may leave out
    view_of: str | None = None                # a front for another model's programs (text_caption.py)

    @property
    def max_batch(self) -> int:
        return self.batch_sizes[-1]

    def padded(self, rows: int) -> int:
        """The smallest compiled batch that holds `rows` rows."""
        return next(b for b in self.batch_sizes if b >= rows)

    def metadata(self) -> dict:
        return {"name": self.name, "versions": ["1"], "platform": "jax",
                "inputs": [t.metadata() for t in self.inputs], "outputs": [t.metadata() for t in self.outputs],
                "parameters": {"entry": self.entry, "precision": self.precision,
                               "batch_sizes": list(self.batch_sizes), "optional_inputs": list(self.optional_inputs),
                               **({"runs": self.view_of} if self.view_of else {})}}


def _bfloat16():
    import ml_dtypes

    return ml_dtypes.bfloat16


def _rows(tensors: list[dict], batch: int) -> tuple[TensorSpec, ...] | None:
    out = []
    for t in tensors:
        shape = list(t["shape"])
        if not shape or shape[0] != batch or t["dtype"] not in DATATYPES:
            return None
        out.append(TensorSpec(t["name"], t["dtype"], tuple(shape[1:])))
    return tuple(out)


def catalogue(manifest: dict, precision: str | None = None) -> tuple[list[ModelSpec], list[str]]:
    """The bundle's servable models (in manifest order) and one note per sharded program not
    served, with the reason. `precision` chooses among an entry's precisions; where an entry
    has several and none is chosen, the refusal names them."""
    by_entry: dict[str, dict[str, list[dict]]] = {}
    for a in manifest["artifacts"]:
        if a["kind"] == "jax.export-sharded":
            by_entry.setdefault(a["entry"], {}).setdefault(a["precision"], []).append(a)
    models, notes = [], []
    for entry, by_precision in by_entry.items():
        if precision is not None:
            if precision not in by_precision:
                notes.append(f"{entry}: not served: the bundle has it in {', '.join(sorted(by_precision))}, "
                             f"not {precision}")
                continue
            chosen = precision
        elif len(by_precision) == 1:
            (chosen,) = by_precision
        else:
            raise BundleError(f"the bundle has {entry} in {len(by_precision)} precisions: choose one with "
                              f"--precision ({', '.join(sorted(by_precision))})")
        found = sorted(by_precision[chosen], key=lambda a: a["batch"])
        specs = [(_rows(a["inputs"], a["batch"]), _rows(a["outputs"], a["batch"]))
                 for a in found]
        if any(i is None or o is None for i, o in specs):
            notes.append(f"{entry}: not served as a model: its inputs or outputs are not rows along a leading batch "
                         "dimension (run it with `serve`)")
            continue
        if len({s for s in specs}) != 1:
            raise BundleError(f"{entry} ({chosen}): its programs at batch {', '.join(str(a['batch']) for a in found)} "
                              "disagree on their row shapes: the bundle is inconsistent, rebuild it")
        if len({a["batch"] for a in found}) != len(found):
            raise BundleError(f"{entry} ({chosen}): two programs at the same batch size: rebuild the bundle")
        inputs, outputs = specs[0]
        models.append(ModelSpec(entry, entry, chosen, inputs, outputs, tuple(a["batch"] for a in found), tuple(found)))
    if not models:
        raise BundleError("the bundle has no sharded program to serve (" + ("; ".join(notes) or "none exported")
                          + "): build it with --export")
    return models, notes
