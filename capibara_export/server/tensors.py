"""BYTES tensors on the wire, as every KServe v2 / Triton client sends them: each element is a
4-byte little-endian length and then its bytes, elements in row-major order. The codec is
tritonclient's own (`tritonclient.utils`), so what its clients send is what is read here;
this module only bounds it (a length past the buffer is a refusal, not a struct error) and
turns it into object arrays of `bytes`."""

from __future__ import annotations

import struct

import numpy as np
from tritonclient.utils import deserialize_bytes_tensor, serialize_byte_tensor

from .batcher import BadRequest


def bytes_from_wire(name: str, data: bytes | memoryview, shape: list[int]) -> np.ndarray:
    count = int(np.prod(shape, dtype=np.int64)) if shape else 1
    try:
        values = deserialize_bytes_tensor(bytes(data)) if len(data) else np.zeros(0, object)
    except (struct.error, ValueError):
        raise BadRequest(f"input {name!r}: BYTES data is not length-prefixed elements (4-byte little-endian "
                         "length, then the bytes)") from None
    if values.size != count:
        raise BadRequest(f"input {name!r}: {values.size} BYTES elements for shape {shape} ({count})")
    return values.reshape(shape)


def bytes_to_wire(value: np.ndarray) -> bytes:
    return serialize_byte_tensor(np.asarray(value, dtype=object).reshape(-1)).item() if value.size else b""


def bytes_from_strings(name: str, values, shape: list[int]) -> np.ndarray:
    """JSON's form: UTF-8 strings."""
    flat = np.asarray(values, dtype=object).reshape(-1)
    if not all(isinstance(v, str) for v in flat):
        raise BadRequest(f"input {name!r}: BYTES data in JSON is a list of strings (or send it as binary data)")
    count = int(np.prod(shape, dtype=np.int64)) if shape else 1
    if flat.size != count:
        raise BadRequest(f"input {name!r}: {flat.size} values for shape {shape} ({count} values)")
    return np.array([v.encode("utf-8") for v in flat], dtype=object).reshape(shape)


def strings(value: np.ndarray) -> list[str]:
    return [v.decode("utf-8", errors="replace") if isinstance(v, bytes) else str(v) for v in value.reshape(-1)]
