"""TF Serving's REST predict API, so a TF Serving client runs unchanged against the slice.

    GET  /v1/models/<m>[/versions/1]                 model status (AVAILABLE once ready)
    GET  /v1/models/<m>[/versions/1]/metadata        the signature, as TF Serving describes it
    POST /v1/models/<m>[/versions/1]:predict         row ("instances") or columnar ("inputs") form

Row form: each instance is an object of named inputs (or a bare value for a one-input model),
answered as `{"predictions": [...]}`, one per instance (an object of named outputs, or a bare
value for a one-output model). Columnar form: `{"inputs": {name: batch}}` (or a bare batch),
answered as `{"outputs": ...}` the same way. Values are JSON numbers, cast to the model's
dtype where no information is lost (integers to a float input; never floats to an integer
input); a BYTES input takes strings or TF Serving's `{"b64": "..."}`. Errors are `{"error": "<one line>"}` with TF Serving's status codes.
"""

from __future__ import annotations

import json

import numpy as np
from aiohttp import web

from .batcher import BadRequest, ServingError
from . import tensors
from .frontend import Frontend
from .kserve_http import read_body, serving_error


def _cast(name: str, value, spec) -> np.ndarray:
    if spec.datatype == "BYTES":   # TF Serving's convention: a string, or {"b64": "..."} for binary data
        return np.array([_bytes(name, v) for v in (value if isinstance(value, list) else [value])], dtype=object)
    try:
        array = np.asarray(value)
    except (ValueError, TypeError):
        raise BadRequest(f"input {name!r} is ragged: every row must have the shape {list(spec.row_shape)}") from None
    want = spec.np_dtype
    if array.dtype == object or array.dtype.kind not in "biuf":
        raise BadRequest(f"input {name!r} must be numbers of shape {[-1, *spec.row_shape]}")
    if np.issubdtype(want, np.integer) and array.dtype.kind == "f":
        raise BadRequest(f"input {name!r} takes integers ({spec.datatype}); it was given floating-point numbers")
    if array.dtype.kind == "b" and want != np.bool_:
        raise BadRequest(f"input {name!r} takes {spec.datatype}, not true / false")
    if np.issubdtype(want, np.integer) and array.size and (array.min() < np.iinfo(want).min
                                                          or array.max() > np.iinfo(want).max):
        raise BadRequest(f"input {name!r}: a value is outside {spec.datatype}'s range")
    return array.astype(want)


def _bytes(name: str, v) -> bytes:
    import base64
    import binascii

    if isinstance(v, str):
        return v.encode("utf-8")
    if isinstance(v, dict) and set(v) == {"b64"} and isinstance(v["b64"], str):
        try:
            return base64.b64decode(v["b64"], validate=True)
        except binascii.Error:
            raise BadRequest(f"input {name!r}: \"b64\" is not base64") from None
    raise BadRequest(f"input {name!r} takes strings or {{\"b64\": \"...\"}}, one per row")


def parse_predict(model, body: bytes) -> tuple[str, dict[str, np.ndarray]]:
    """("row" or "columnar", the inputs by name as batches)."""
    try:
        request = json.loads(body)
    except (ValueError, RecursionError):
        raise BadRequest("the body is not JSON (a TF Serving predict request)") from None
    if not isinstance(request, dict) or ("instances" in request) == ("inputs" in request):
        raise BadRequest("a predict request has exactly one of \"instances\" (row form) or \"inputs\" (columnar form)")
    signature = request.get("signature_name", "serving_default")
    if signature not in ("serving_default", model.name):
        raise BadRequest(f"{model.name} has one signature, serving_default (not {signature!r})")
    specs = {t.name: t for t in model.inputs}
    required = [n for n in specs if n not in model.optional_inputs]
    single = required[0] if len(required) == 1 else None     # bare values are this input's

    def bare(r) -> bool:
        return not isinstance(r, dict) or set(r) == {"b64"}
    if "instances" in request:
        rows = request["instances"]
        if not isinstance(rows, list) or not rows:
            raise BadRequest("\"instances\" must be a non-empty list, one entry per row")
        if single is not None and all(bare(r) for r in rows):
            rows = [{single: r} for r in rows]
        if not all(isinstance(r, dict) for r in rows):
            raise BadRequest(f"{model.name} has several inputs: each instance is an object of {', '.join(specs)}")
        names = set(rows[0])
        if any(set(r) != names for r in rows):
            raise BadRequest("every instance must name the same inputs")
        return "row", {n: _cast(n, [r[n] for r in rows], specs[n]) if n in specs else np.zeros(0)
                       for n in names}
    columns = request["inputs"]
    if single is not None and bare(columns):
        columns = {single: columns}
    if not isinstance(columns, dict):
        raise BadRequest(f"{model.name} has several inputs: \"inputs\" is an object of {', '.join(specs)}")
    return "columnar", {n: _cast(n, v, specs[n]) if n in specs else np.zeros(0) for n, v in columns.items()}


def render_predict(model, form: str, outputs: dict[str, np.ndarray]) -> dict:
    lists = {name: tensors.strings(v) if v.dtype == object else
             np.asarray(v, dtype=np.float32 if v.dtype.kind == "V" or str(v.dtype) == "bfloat16" else None).tolist()
             for name, v in outputs.items()}
    single = next(iter(lists)) if len(lists) == 1 else None
    if form == "columnar":
        return {"outputs": lists[single] if single else lists}
    rows = len(next(iter(lists.values())))
    if single:
        return {"predictions": lists[single]}
    return {"predictions": [{name: value[i] for name, value in lists.items()} for i in range(rows)]}


def routes(front: Frontend) -> list:
    def model_of(request):
        return front.model(request.match_info["model"], request.match_info.get("version"))

    async def status(request):
        try:
            model = model_of(request)
        except ServingError as err:
            return serving_error(err)
        state = "AVAILABLE" if front.ready else ("END" if front.lost or front.draining else "LOADING")
        return web.json_response({"model_version_status": [{"version": "1", "state": state, "status": {
            "error_code": "OK", "error_message": ""}}], "model": model.name})

    async def metadata(request):
        try:
            model = model_of(request)
        except ServingError as err:
            return serving_error(err)

        def tensors(ts):
            return {t.name: {"dtype": "DT_" + {"FP32": "FLOAT", "FP16": "HALF", "BF16": "BFLOAT16", "FP64": "DOUBLE",
                                                "INT32": "INT32", "INT64": "INT64", "INT8": "INT8", "UINT8": "UINT8",
                                                "BOOL": "BOOL"}[t.datatype],
                             "tensor_shape": {"dim": [{"size": str(d)} for d in (-1, *t.row_shape)]}, "name": t.name}
                    for t in ts}
        return web.json_response({"model_spec": {"name": model.name, "version": "1"}, "metadata": {
            "signature_def": {"signature_def": {"serving_default": {
                "inputs": tensors(model.inputs), "outputs": tensors(model.outputs), "method_name": "predict"}}}}})

    async def predict(request):
        try:
            model = model_of(request)
            form, inputs = parse_predict(model, await read_body(request, front.max_body_bytes))
            _, outputs = await front.infer(model.name, inputs, "tf-serving-rest")
            return web.json_response(render_predict(model, form, outputs))
        except ServingError as err:
            return serving_error(err)

    name = "{model:[^/:]+}"
    out = []
    for base in (f"/v1/models/{name}", f"/v1/models/{name}/versions/{{version:[^/:]+}}"):
        out += [web.get(base, status), web.get(base + "/metadata", metadata), web.post(base + ":predict", predict)]
    return out
