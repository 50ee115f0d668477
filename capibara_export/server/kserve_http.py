"""The KServe v2 / Open Inference Protocol over HTTP (REST), on aiohttp, with Triton's binary
tensor data extension (what `tritonclient.http` sends and asks for by default).

    GET  /v2/health/live            200 while no host is lost, else 503
    GET  /v2/health/ready           200 once every host has warmed every program, else 503
    GET  /v2                        server metadata
    GET  /v2/models/<m>[/versions/1]            model metadata (-1: the batch dimension)
    GET  /v2/models/<m>[/versions/1]/ready
    POST /v2/models/<m>[/versions/1]/infer      named tensors in, named tensors out
    GET  /metrics                   Prometheus

A tensor's `data` is JSON (flat, row-major, or nested) or, with `parameters.binary_data_size`,
raw little-endian bytes after the JSON header (whose length the `Inference-Header-Content-Length`
header gives). BF16 travels as binary only, as in Triton; BYTES as JSON strings (UTF-8) or as
binary length-prefixed elements (tensors.py). Errors are `{"error": "<one line>"}`.
"""

from __future__ import annotations

import json

import numpy as np
from aiohttp import web

from .batcher import BadRequest, ServingError
from . import tensors
from .frontend import Frontend
from .models import DATATYPES, SERVER_NAME

_NP = {v: k for k, v in DATATYPES.items()}
STATUS = {"invalid_argument": 400, "not_found": 404, "unavailable": 503, "resource_exhausted": 503,
          "deadline_exceeded": 504}
EXTENSIONS = ["binary_tensor_data"]


def error(status: int, text: str) -> web.Response:
    return web.json_response({"error": " ".join(str(text).split())}, status=status)


def serving_error(err: ServingError) -> web.Response:
    return error(getattr(err, "status", None) or STATUS.get(err.kind, 500), str(err))


def np_dtype(datatype: str, name: str) -> np.dtype:
    if datatype not in _NP:
        raise BadRequest(f"input {name!r}: datatype {datatype!r} is not one of {', '.join(sorted(_NP))}")
    from .models import TensorSpec

    return TensorSpec(name, _NP[datatype], ()).np_dtype


def tensor_from_json(t: dict, binary: memoryview | None) -> np.ndarray:
    """One input of a request: its JSON form, or its bytes when `binary` is given."""
    name = t.get("name")
    if not isinstance(name, str):
        raise BadRequest("every input needs a \"name\" (a string)")
    shape = t.get("shape")
    if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0
                                              for d in shape) or len(shape) > 8:
        raise BadRequest(f"input {name!r}: \"shape\" must be a list of at most 8 non-negative integers")
    dtype = np_dtype(t.get("datatype"), name)
    count = int(np.prod(shape, dtype=np.int64)) if shape else 1
    if t["datatype"] == "BYTES":
        if binary is not None:
            return tensors.bytes_from_wire(name, binary, shape)
        if "data" not in t:
            raise BadRequest(f"input {name!r} has neither \"data\" nor parameters.binary_data_size")
        return tensors.bytes_from_strings(name, t["data"], shape)
    if binary is not None:
        if len(binary) != count * dtype.itemsize:
            raise BadRequest(f"input {name!r}: {len(binary)} bytes of binary data; shape {shape} of "
                             f"{t['datatype']} is {count * dtype.itemsize} bytes")
        return np.frombuffer(binary, dtype=dtype).reshape(shape)
    if "data" not in t:
        raise BadRequest(f"input {name!r} has neither \"data\" nor parameters.binary_data_size")
    if t["datatype"] == "BF16":
        raise BadRequest(f"input {name!r}: BF16 travels as binary data only (binary_data_size), as in Triton")
    try:
        value = np.asarray(t["data"], dtype=dtype if t["datatype"] != "BOOL" else None)
    except (ValueError, TypeError, OverflowError):
        raise BadRequest(f"input {name!r}: \"data\" is not a list of {t['datatype']} values") from None
    if value.dtype == object or value.size != count:
        raise BadRequest(f"input {name!r}: {value.size if value.dtype != object else 'ragged'} values for shape "
                         f"{shape} ({count} values)")
    if t["datatype"] == "BOOL" and value.dtype != np.bool_:
        raise BadRequest(f"input {name!r}: BOOL data must be true / false")
    return value.reshape(shape).astype(dtype, copy=False)


def parse_infer(body: bytes, header_length: str | None) -> tuple[dict, dict[str, np.ndarray]]:
    """The request's JSON and its inputs by name."""
    if header_length is not None:
        if not header_length.isdigit() or int(header_length) > len(body):
            raise BadRequest(f"Inference-Header-Content-Length {header_length!r} does not fit a {len(body)}-byte body")
        split = int(header_length)
    else:
        split = len(body)
    try:
        request = json.loads(bytes(body[:split]))
    except (ValueError, RecursionError):
        raise BadRequest("the body is not JSON (a KServe v2 inference request)") from None
    if not isinstance(request, dict) or not isinstance(request.get("inputs"), list):
        raise BadRequest("the request needs \"inputs\": a list of tensors")
    rest, offset, inputs = memoryview(body)[split:], 0, {}
    for t in request["inputs"]:
        if not isinstance(t, dict):
            raise BadRequest("every input must be an object with name, shape, datatype and data")
        size = (t.get("parameters") or {}).get("binary_data_size") if isinstance(t.get("parameters"), dict) else None
        binary = None
        if size is not None:
            if not isinstance(size, int) or size < 0 or offset + size > len(rest):
                raise BadRequest(f"input {t.get('name')!r}: binary_data_size {size!r} runs past the body")
            binary, offset = rest[offset:offset + size], offset + size
        value = tensor_from_json(t, binary)
        if t["name"] in inputs:
            raise BadRequest(f"input {t['name']!r} is given twice")
        inputs[t["name"]] = value
    if offset != len(rest):
        raise BadRequest(f"{len(rest) - offset} bytes after the last input's binary data")
    return request, inputs


async def read_body(request, limit: int) -> bytes:
    try:
        return await request.read()
    except web.HTTPRequestEntityTooLarge:
        raise TooLarge(f"the body is over {limit} bytes (--max-body-mb): send fewer rows per request") from None


class TooLarge(BadRequest):
    status = 413


def render_infer(model, request: dict, outputs: dict[str, np.ndarray]) -> web.Response:
    params = request.get("parameters") if isinstance(request.get("parameters"), dict) else {}
    wanted = request.get("outputs")
    if wanted is None:
        chosen = [(name, bool(params.get("binary_data_output"))) for name in outputs]
    else:
        if not isinstance(wanted, list) or not all(isinstance(o, dict) and isinstance(o.get("name"), str)
                                                   for o in wanted):
            raise BadRequest("\"outputs\" must be a list of {\"name\": ...}")
        chosen = []
        for o in wanted:
            if o["name"] not in outputs:
                raise BadRequest(f"{model.name} has no output {o['name']!r}; its outputs are {', '.join(outputs)}")
            p = o.get("parameters") if isinstance(o.get("parameters"), dict) else {}
            chosen.append((o["name"], bool(p.get("binary_data", params.get("binary_data_output", False)))))
    spec = {t.name: t for t in model.outputs}
    body, blobs = {"model_name": model.name, "model_version": "1", "outputs": []}, []
    if isinstance(request.get("id"), str):
        body["id"] = request["id"]
    for name, binary in chosen:
        value = np.ascontiguousarray(outputs[name])
        out = {"name": name, "datatype": spec[name].datatype, "shape": list(value.shape)}
        if spec[name].datatype == "BYTES" and not binary:
            out["data"] = tensors.strings(value)
        elif binary or spec[name].datatype == "BF16":
            data = tensors.bytes_to_wire(value) if spec[name].datatype == "BYTES" else value.tobytes()
            out["parameters"] = {"binary_data_size": len(data)}
            blobs.append(data)
        else:
            out["data"] = value.reshape(-1).tolist()
        body["outputs"].append(out)
    text = json.dumps(body).encode()
    if not blobs:
        return web.Response(body=text, content_type="application/json")
    return web.Response(body=b"".join([text, *blobs]), content_type="application/octet-stream",
                        headers={"Inference-Header-Content-Length": str(len(text))})


def routes(front: Frontend) -> list:
    def model_or_404(request):
        return front.model(request.match_info["model"], request.match_info.get("version"))

    async def live(_):
        return web.json_response({"live": front.live}, status=200 if front.live else 503)

    async def ready(_):
        return web.json_response({"ready": front.ready}, status=200 if front.ready else 503)

    async def server_metadata(_):
        return web.json_response({"name": SERVER_NAME, "version": front.version, "extensions": EXTENSIONS})

    async def model_metadata(request):
        try:
            return web.json_response(model_or_404(request).metadata())
        except ServingError as err:
            return serving_error(err)

    async def model_ready(request):
        try:
            model_or_404(request)
        except ServingError as err:
            return serving_error(err)
        return web.json_response({"name": request.match_info["model"], "ready": front.ready},
                                 status=200 if front.ready else 503)

    async def infer(request):
        try:
            model = model_or_404(request)
            body = await read_body(request, front.max_body_bytes)
            parsed, inputs = parse_infer(body, request.headers.get("Inference-Header-Content-Length"))
            timeout = (parsed.get("parameters") or {}).get("timeout") if isinstance(parsed.get("parameters"), dict) \
                else None   # Triton's: microseconds
            if timeout is not None and (not isinstance(timeout, int) or isinstance(timeout, bool)):
                raise BadRequest("parameters.timeout must be an integer number of microseconds")
            _, outputs = await front.infer(model.name, inputs, "kserve-http",
                                           timeout / 1e6 if timeout is not None else None)
            return render_infer(model, parsed, outputs)
        except ServingError as err:
            return serving_error(err)

    async def metrics(_):
        return web.Response(body=front.metrics.exposition(), content_type="text/plain")

    out = [web.get("/v2/health/live", live), web.get("/v2/health/ready", ready), web.get("/v2", server_metadata),
           web.get("/metrics", metrics)]
    for base in ("/v2/models/{model}", "/v2/models/{model}/versions/{version}"):
        out += [web.get(base, model_metadata), web.get(base + "/ready", model_ready), web.post(base + "/infer", infer)]
    return out

