"""The KServe v2 / Open Inference Protocol over gRPC: `inference.GRPCInferenceService` on grpcio's
asyncio server, in the same event loop as the REST routes.

The messages and the servicer base are the ones `tritonclient` ships (generated from Triton's
`grpc_service.proto`, the superset of KServe's `grpc_predict_v2.proto`: same package, service,
methods, message and field numbers), so one generated module serves both and a process that
also imports `tritonclient.grpc` meets no duplicate protobuf symbols (kserve issue 3099).
Served: ServerLive, ServerReady, ModelReady, ServerMetadata, ModelMetadata, ModelInfer; the
rest of Triton's methods (repository, shared memory, statistics, streaming) answer UNIMPLEMENTED.

Tensors come as `raw_input_contents` (what tritonclient sends) or typed `contents`; answers are
`raw_output_contents`. The request's gRPC deadline shortens the server's timeout.
"""

from __future__ import annotations

import grpc
import numpy as np
from google.protobuf.message import DecodeError
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc import service_pb2_grpc as pb_grpc

from .batcher import BadRequest, ServingError
from . import tensors
from .frontend import Frontend
from .kserve_http import np_dtype
from .models import SERVER_NAME

CODES = {"invalid_argument": grpc.StatusCode.INVALID_ARGUMENT, "not_found": grpc.StatusCode.NOT_FOUND,
         "unavailable": grpc.StatusCode.UNAVAILABLE, "resource_exhausted": grpc.StatusCode.RESOURCE_EXHAUSTED,
         "deadline_exceeded": grpc.StatusCode.DEADLINE_EXCEEDED}
_CONTENTS = {"FP32": "fp32_contents", "FP64": "fp64_contents", "INT32": "int_contents", "INT8": "int_contents",
             "INT64": "int64_contents", "UINT8": "uint_contents", "BOOL": "bool_contents"}


def tensor_from_proto(t, raw: bytes | None) -> np.ndarray:
    shape = list(t.shape)
    if len(shape) > 8 or any(d < 0 for d in shape):
        raise BadRequest(f"input {t.name!r}: shape must be at most 8 non-negative integers")
    dtype = np_dtype(t.datatype, t.name)
    count = int(np.prod(shape, dtype=np.int64)) if shape else 1
    if t.datatype == "BYTES":
        if raw is not None:
            return tensors.bytes_from_wire(t.name, raw, shape)
        values = list(t.contents.bytes_contents)
        if len(values) != count:
            raise BadRequest(f"input {t.name!r}: {len(values)} values in contents.bytes_contents for shape {shape}")
        return np.array(values, dtype=object).reshape(shape)
    if raw is not None:
        if len(raw) != count * dtype.itemsize:
            raise BadRequest(f"input {t.name!r}: {len(raw)} raw bytes; shape {shape} of {t.datatype} is "
                             f"{count * dtype.itemsize} bytes")
        return np.frombuffer(raw, dtype=dtype).reshape(shape)
    field = _CONTENTS.get(t.datatype)
    if field is None:
        raise BadRequest(f"input {t.name!r}: {t.datatype} travels in raw_input_contents only")
    values = getattr(t.contents, field)
    if len(values) != count:
        raise BadRequest(f"input {t.name!r}: {len(values)} values in contents.{field} for shape {shape}")
    return np.asarray(values).astype(dtype).reshape(shape)


def parse_infer(request) -> dict[str, np.ndarray]:
    raw = list(request.raw_input_contents)
    if raw and len(raw) != len(request.inputs):
        raise BadRequest(f"{len(raw)} raw_input_contents for {len(request.inputs)} inputs: give one per input")
    inputs = {}
    for i, t in enumerate(request.inputs):
        if t.name in inputs:
            raise BadRequest(f"input {t.name!r} is given twice")
        inputs[t.name] = tensor_from_proto(t, raw[i] if raw else None)
    return inputs


class Service(pb_grpc.GRPCInferenceServiceServicer):
    def __init__(self, front: Frontend):
        self.front = front

    async def _abort(self, context, err: ServingError):
        await context.abort(CODES.get(err.kind, grpc.StatusCode.INTERNAL), " ".join(str(err).split()))

    async def ServerLive(self, request, context):  # noqa: N802 - the protocol's method names
        return pb.ServerLiveResponse(live=self.front.live)

    async def ServerReady(self, request, context):  # noqa: N802
        return pb.ServerReadyResponse(ready=self.front.ready)

    async def ModelReady(self, request, context):  # noqa: N802
        try:
            self._model(request.name, request.version)
        except ServingError as err:
            await self._abort(context, err)
        return pb.ModelReadyResponse(ready=self.front.ready)

    async def ServerMetadata(self, request, context):  # noqa: N802
        return pb.ServerMetadataResponse(name=SERVER_NAME, version=self.front.version, extensions=[])

    async def ModelMetadata(self, request, context):  # noqa: N802
        try:
            meta = self._model(request.name, request.version).metadata()
        except ServingError as err:
            await self._abort(context, err)
        tensor = pb.ModelMetadataResponse.TensorMetadata
        return pb.ModelMetadataResponse(name=meta["name"], versions=meta["versions"], platform=meta["platform"],
                                        inputs=[tensor(**t) for t in meta["inputs"]],
                                        outputs=[tensor(**t) for t in meta["outputs"]])

    async def ModelInfer(self, request, context):  # noqa: N802
        try:
            model = self._model(request.model_name, request.model_version)
            inputs = parse_infer(request)
            left = context.time_remaining()
            _, outputs = await self.front.infer(model.name, inputs, "kserve-grpc", left)
            wanted = [o.name for o in request.outputs] or list(outputs)
            for name in wanted:
                if name not in outputs:
                    raise BadRequest(f"{model.name} has no output {name!r}; its outputs are {', '.join(outputs)}")
        except ServingError as err:
            await self._abort(context, err)
        spec = {t.name: t for t in model.outputs}
        response = pb.ModelInferResponse(model_name=model.name, model_version="1", id=request.id)
        for name in wanted:
            value = np.ascontiguousarray(outputs[name])
            response.outputs.add(name=name, datatype=spec[name].datatype, shape=list(value.shape))
            response.raw_output_contents.append(tensors.bytes_to_wire(value) if value.dtype == object
                                                else value.tobytes())
        return response

    def _model(self, name: str, version: str):
        return self.front.model(name, version)


SERVED = ("ServerLive", "ServerReady", "ModelReady", "ServerMetadata", "ModelMetadata", "ModelInfer")


def handlers(service: Service) -> grpc.GenericRpcHandler:
    """The served methods, each reading its own request bytes: grpcio's generated registration
    answers a message that does not parse with INTERNAL ("Exception deserializing request"); a
    malformed request is the client's error, INVALID_ARGUMENT, with its type named. Methods not
    served are not registered: grpcio answers them UNIMPLEMENTED."""
    methods = {m.name: m for m in pb.DESCRIPTOR.services_by_name["GRPCInferenceService"].methods}

    def parsed(method, request_type):
        async def call(raw: bytes, context):
            try:
                request = request_type.FromString(raw)
            except DecodeError:
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                    f"the request is not an inference.{request_type.__name__} protobuf message")
            return await method(request, context)
        return call
    table = {}
    for name in SERVED:
        m = methods[name]
        table[name] = grpc.unary_unary_rpc_method_handler(
            parsed(getattr(service, name), getattr(pb, m.input_type.name)), request_deserializer=None,
            response_serializer=getattr(pb, m.output_type.name).SerializeToString)
    return grpc.method_handlers_generic_handler("inference.GRPCInferenceService", table)


async def start(front: Frontend, host: str, port: int, max_message_bytes: int) -> tuple[grpc.aio.Server, int]:
    """The service listening on `host:port` (0: any free port); the server and its port."""
    server = grpc.aio.server(options=[("grpc.max_receive_message_length", max_message_bytes),
                                      ("grpc.max_send_message_length", max_message_bytes),
                                      ("grpc.so_reuseport", 0)])
    server.add_generic_rpc_handlers((handlers(Service(front)),))
    bound = server.add_insecure_port(f"{host}:{port}")
    if bound == 0:
        raise OSError(f"cannot listen for gRPC on {host}:{port} (in use?)")
    await server.start()
    return server, bound
