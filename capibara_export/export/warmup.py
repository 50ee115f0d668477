"""TF Serving warmup requests (assets.extra/tf_serving_warmup_requests).

TF Serving reads a TFRecord file of PredictionLog protos. Their classes live in the
tensorflow-serving-api package, which depends on the full `tensorflow` distribution and
would replace the pinned tensorflow-cpu, so the few fields needed are encoded here by
hand with the protobuf wire format (field numbers from tensorflow_serving/apis/*.proto):

  PredictionLog  { PredictLog predict_log = 6; }
  PredictLog     { PredictRequest request = 1; }
  PredictRequest { ModelSpec model_spec = 1; map<string, TensorProto> inputs = 2; }
  ModelSpec      { string name = 1; string signature_name = 3; }
TensorProto bytes come from TensorFlow itself (tf.make_tensor_proto).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _field(number: int, payload: bytes) -> bytes:
    """A length-delimited field (wire type 2)."""
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


def prediction_log(model_name: str, signature: str, inputs: dict[str, np.ndarray]) -> bytes:
    import tensorflow as tf

    spec = _field(1, model_name.encode()) + _field(3, signature.encode())
    request = _field(1, spec)
    for name, value in inputs.items():
        entry = _field(1, name.encode()) + _field(2, tf.make_tensor_proto(value).SerializeToString())
        request += _field(2, entry)
    return _field(6, _field(1, request))


def write_warmup(saved_model_dir: Path, model_name: str, requests: list[tuple[str, dict[str, np.ndarray]]]) -> Path:
    import tensorflow as tf

    folder = Path(saved_model_dir) / "assets.extra"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "tf_serving_warmup_requests"
    with tf.io.TFRecordWriter(str(path)) as writer:
        for signature, inputs in requests:
            writer.write(prediction_log(model_name, signature, inputs))
    return path


def _read_varint(data: bytes, i: int) -> tuple[int, int]:
    value, shift = 0, 0
    while True:
        b = data[i]
        i += 1
        value |= (b & 0x7F) << shift
        shift += 7
        if not b & 0x80:
            return value, i


def read_fields(data: bytes) -> list[tuple[int, bytes]]:
    """Length-delimited fields of one message (enough to check what write_warmup wrote)."""
    fields, i = [], 0
    while i < len(data):
        key, i = _read_varint(data, i)
        length, i = _read_varint(data, i)
        fields.append((key >> 3, data[i:i + length]))
        i += length
    return fields
