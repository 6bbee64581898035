"""The Open Inference Protocol (KServe v2) servicer: translation between its messages and numpy, nothing else.

Decoding and encoding of tensors live in ortserve.server.codec (shared with the clients); checking a request
against the model and running it live behind Model.infer; status codes live in ortserve.server.errors. The
answers both protocol forms give alike -- server and model metadata, model readiness -- are built here as plain
dicts, which the REST endpoint (ortserve.server.rest) sends as JSON and this servicer turns into messages.
"""

from __future__ import annotations

import ortserve
from ortserve._proto import grpc_service_pb2 as pb
from ortserve._proto import grpc_service_pb2_grpc as pb_grpc
from ortserve.server import codec
from ortserve.server.errors import ModelNotFound, grpc_errors
from ortserve.server.gate import Gate
from ortserve.server.observe import Observer
from ortserve.server.repository import Repository
from ortserve.server.runtime import TensorSpec

SERVER_NAME = "ortserve"
# The protocol specification's platform name for ONNX models ("onnx_onnxv1"); Triton itself reports
# "onnxruntime_onnx". Clients read it as information and do not branch on it.
PLATFORM = "onnx_onnxv1"


def tensor_metadata(spec: TensorSpec) -> dict:
    """{"name", "datatype", "shape"} of a model input or output: -1 for a variable axis, [] for an unknown shape."""
    shape = [] if spec.shape is None else [d if isinstance(d, int) else -1 for d in spec.shape]
    return {"name": spec.name, "datatype": codec.datatype_of(spec.dtype), "shape": shape}


def model_metadata(repository: Repository, name: str, version: str | int | None) -> dict:
    """The protocol's model metadata (ModelNotFound for an unknown model or version)."""
    model = repository.get(name, version)
    return {
        "name": model.name,
        "versions": [str(v) for v in repository.versions(model.name)],
        "platform": PLATFORM,
        "inputs": [tensor_metadata(s) for s in model.inputs.values()],
        "outputs": [tensor_metadata(s) for s in model.outputs.values()],
    }


def server_metadata(extensions: list[str]) -> dict:
    return {"name": SERVER_NAME, "version": ortserve.__version__, "extensions": extensions}


def model_readiness(repository: Repository, gate: Gate, name: str, version: str | int | None) -> tuple[bool, str]:
    """(ready, why not). A question, not a lookup: an unknown model or version is simply not ready."""
    try:
        model = repository.get(name, version)
    except ModelNotFound as error:
        return False, error.message
    if gate.draining:
        return False, f"{model.label} is not ready: the server is shutting down"
    return True, ""


class InferenceServicer(pb_grpc.GRPCInferenceServiceServicer):
    def __init__(self, repository: Repository, gate: Gate, observer: Observer | None = None) -> None:
        self.repository = repository
        self.gate = gate
        self.observer = observer or Observer(repository, gate)

    @grpc_errors
    async def ServerLive(self, request, context):
        return pb.ServerLiveResponse(live=True)

    @grpc_errors
    async def ServerReady(self, request, context):
        return pb.ServerReadyResponse(ready=not self.gate.draining)

    @grpc_errors
    async def ServerMetadata(self, request, context):
        return pb.ServerMetadataResponse(**server_metadata(extensions=[]))

    @grpc_errors
    async def ModelReady(self, request, context):
        ready, _ = model_readiness(self.repository, self.gate, request.name, request.version)
        return pb.ModelReadyResponse(ready=ready)

    @grpc_errors
    async def ModelMetadata(self, request, context):
        return pb.ModelMetadataResponse(**model_metadata(self.repository, request.name, request.version))

    @grpc_errors
    async def ModelInfer(self, request, context):
        with self.observer.request("grpc", request.model_name, request.model_version, request.id) as record:
            model = record.model = self.repository.get(request.model_name, request.model_version)
            inputs = codec.decode_request_inputs(request)
            requested = [o.name for o in request.outputs]
            with self.gate.admit():
                outputs = await model.infer(inputs, requested, record.timing)
            response = pb.ModelInferResponse(model_name=model.name, model_version=str(model.version), id=request.id)
            codec.encode_response_outputs(response, outputs)
        return response
