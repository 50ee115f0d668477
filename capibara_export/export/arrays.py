"""Arrays in and out of `serve`: `.npz` files that keep every dtype a manifest names.

`numpy.savez` writes bfloat16 (and the other ml_dtypes types) as raw void bytes (`|V2`),
because NumPy has no name for them; read back, such an array must be viewed as the dtype
the manifest declares, byte for byte. That view is the only conversion made: a void array
whose item size differs from the declared dtype's, or any other dtype, is refused by the
caller's shape/dtype check, never cast. Pickled objects are never read (allow_pickle off).
"""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np

from ..bundle_error import BundleError


def read_npz(path: Path) -> dict[str, np.ndarray]:
    """An .npz of plain arrays by name."""
    try:
        with np.load(Path(path), allow_pickle=False) as data:
            return {k: data[k] for k in data.files}
    except FileNotFoundError:
        raise
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as err:
        raise BundleError(f"{path}: not an .npz of arrays ({err}); write it with numpy.savez") from None


def write_npz(path: Path, arrays: dict) -> None:
    """Whole or not at all: a temporary file beside it, renamed into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".partial")
    with open(tmp, "wb") as f:
        np.savez(f, **{k: np.asarray(v) for k, v in arrays.items()})
    tmp.replace(path)


def as_declared(value: np.ndarray, dtype) -> np.ndarray:
    """`value` as `dtype` when it holds that dtype's bytes under NumPy's void name (what
    savez makes of bfloat16 and the other ml_dtypes types, whose kind is also "V");
    otherwise `value` unchanged, for the caller to check."""
    dtype, value = np.dtype(dtype), np.asarray(value)
    raw_bytes = value.dtype.type is np.void and value.dtype.names is None and value.dtype.subdtype is None
    extension = dtype.kind == "V" and dtype.type is not np.void       # bfloat16, float8_*, int4, ...
    if raw_bytes and extension and value.dtype.itemsize == dtype.itemsize:
        return value.view(dtype)
    return value
