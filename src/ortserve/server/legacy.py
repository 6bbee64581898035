"""The old ONNX Runtime Server's protocol: PredictionService/Predict (gRPC) and its HTTP form, translated between
onnx.TensorProto maps and numpy; the data plane (ortserve.server.dataplane) does the rest.

The gRPC form names no model, so it serves the repository's default one (called `default`, else the only one).
The HTTP form, POST /v1/models/{name}[/versions/{version}]:predict (and /score), names one: `default` falls back
to the only model the same way, since the old server's clients say `default` whatever the model is called.

Its bodies, as the old server took and gave them: a PredictRequest as protobuf JSON (application/json) or binary
(application/octet-stream, application/vnd.google.protobuf, application/x-protobuf); the answer is the encoding
the Accept header names, binary protobuf when it names none or */* (old clients parse that), and errors are
{"error_code": <HTTP status>, "error_message": "..."}. onnx.numpy_helper does the TensorProto conversions.
"""

from __future__ import annotations

import json

from google.protobuf import json_format
from google.protobuf.message import DecodeError
from onnx import numpy_helper

from ortserve._proto import predict_pb2 as pb
from ortserve._proto import predict_pb2_grpc as pb_grpc
from ortserve.server import codec
from ortserve.server.dataplane import DataPlane, RequestedOutput
from ortserve.server.errors import InvalidInput, UnsupportedMediaType, grpc_errors
from ortserve.server.repository import DEFAULT_MODEL_NAME, Repository

JSON = "application/json"
PROTOBUF = ("application/octet-stream", "application/vnd.google.protobuf", "application/x-protobuf")
MEDIA_TYPES = (JSON, *PROTOBUF)
REQUEST_ID = "x-ms-request-id"  # the server's id of the call, on every answer
CLIENT_REQUEST_ID = "x-ms-client-request-id"  # the client's own, echoed back when it sends one
_JSON_SHAPE = '{"inputs": {"<name>": {"dims": ["1", "64"], "dataType": 1, "rawData": "<base64>"}}, "outputFilter": []}'


def tensor_to_array(name: str, tensor):
    try:
        return numpy_helper.to_array(tensor)
    except Exception as error:  # wrong raw_data length, unknown data_type, ...
        raise InvalidInput(f"input {name!r} is not a readable onnx.TensorProto: {error}") from None


def served_name(repository: Repository, name: str) -> str:
    """The model a URL's `name` means: `default`, when no model has that name, is the only model there is."""
    names = repository.names()
    if name == DEFAULT_MODEL_NAME and name not in names and len(names) == 1:
        return names[0]
    return name


async def predict(plane: DataPlane, request: pb.PredictRequest, protocol: str, name: str | None = None,
                  version: str = "", request_id: str = "") -> pb.PredictResponse:  # fmt: skip
    """Answer one PredictRequest; `name` None: the repository's default model (what the gRPC form serves)."""
    if name is not None:
        name = served_name(plane.repository, name)
    with plane.request(protocol, name, version, request_id) as call:
        inputs = {name: tensor_to_array(name, tensor) for name, tensor in request.inputs.items()}
        requested = [RequestedOutput(n) for n in request.output_filter]
        outputs = await call.infer(inputs, requested)
        response = pb.PredictResponse()
        for output_name, array in outputs.items():
            response.outputs[output_name].CopyFrom(numpy_helper.from_array(array, output_name))
    return response


class PredictionServicer(pb_grpc.PredictionServiceServicer):
    def __init__(self, plane: DataPlane) -> None:
        self.plane = plane

    @grpc_errors
    async def Predict(self, request, context):
        return await predict(self.plane, request, "legacy")


# --------------------------------------------------------------------------------------------------
# The HTTP form's bodies


def _media_type(header: str) -> str:
    """'application/json' of 'Application/JSON; charset=utf-8'."""
    return header.split(";", 1)[0].strip().lower()


def decode_request(body: bytes, content_type: str | None) -> pb.PredictRequest:
    """The PredictRequest of an HTTP body in the encoding its Content-Type names."""
    kind = _media_type(content_type or "")
    if kind not in MEDIA_TYPES:
        came = f"Content-Type {content_type!r}" if content_type else "no Content-Type"
        raise UnsupportedMediaType(f"the request came with {came}; send a PredictRequest as {JSON} (protobuf's "
                                   f"JSON form) or binary protobuf as {' or '.join(PROTOBUF)}")  # fmt: skip
    if kind == JSON:
        return _from_json(body)
    request = pb.PredictRequest()
    try:
        request.ParseFromString(body)
    except DecodeError as error:
        raise InvalidInput(f"the body is not a binary onnxruntime.server.PredictRequest ({kind}): {error}") from None
    return request


def _from_json(body: bytes) -> pb.PredictRequest:
    try:
        payload = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise InvalidInput(f"the request body is not valid JSON: {error}") from None
    if not isinstance(payload, dict):
        raise InvalidInput(f"the request body must be a PredictRequest object {_JSON_SHAPE}, "
                           f"got {codec.json_type(payload)}")  # fmt: skip
    try:
        return json_format.ParseDict(payload, pb.PredictRequest())
    except json_format.ParseError as error:
        raise InvalidInput(f"the body is not an onnxruntime.server.PredictRequest in protobuf's JSON form "
                           f"{_JSON_SHAPE}: {error}") from None  # fmt: skip


def response_media_type(accept: str | None) -> str:
    """The media type of the answer: the first one Accept lists that this endpoint gives, binary protobuf for
    none or a wildcard (what the old server did)."""
    if not accept or not accept.strip():
        return PROTOBUF[0]
    for kind in map(_media_type, accept.split(",")):
        if kind in MEDIA_TYPES:
            return kind
        if kind in ("*/*", "application/*"):
            return PROTOBUF[0]
    raise InvalidInput(f"Accept {accept!r} names no encoding this endpoint answers in; ask for "
                       f"{', '.join(MEDIA_TYPES)} or */*")  # fmt: skip


def encode_response(response: pb.PredictResponse, media_type: str) -> bytes:
    """The answer's body: protobuf's JSON form (int64 dims as strings, rawData as base64) or binary protobuf."""
    if media_type == JSON:
        return json.dumps(json_format.MessageToDict(response), separators=(",", ":")).encode()
    return response.SerializeToString()


def error_body(status: int, message: str) -> bytes:
    """The old server's error answer, always JSON."""
    return (json.dumps({"error_code": status, "error_message": message}) + "\n").encode()
