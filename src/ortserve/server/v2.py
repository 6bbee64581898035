"""The Open Inference Protocol (KServe v2) servicer: translation between its messages and numpy, nothing else.

Decoding and encoding of tensors live in ortserve.server.codec (shared with the clients); checking a request
against the model and running it live behind Model.infer; status codes live in ortserve.server.errors.
"""

from __future__ import annotations

import ortserve
from ortserve._proto import grpc_service_pb2 as pb
from ortserve._proto import grpc_service_pb2_grpc as pb_grpc
from ortserve.server import codec
from ortserve.server.errors import ModelNotFound, grpc_errors
from ortserve.server.gate import Gate
from ortserve.server.repository import Repository
from ortserve.server.runtime import TensorSpec

SERVER_NAME = "ortserve"
# The protocol specification's platform name for ONNX models ("onnx_onnxv1"); Triton itself reports
# "onnxruntime_onnx". Clients read it as information and do not branch on it.
PLATFORM = "onnx_onnxv1"


def tensor_metadata(spec: TensorSpec) -> pb.ModelMetadataResponse.TensorMetadata:
    shape = [] if spec.shape is None else [d if isinstance(d, int) else -1 for d in spec.shape]
    return pb.ModelMetadataResponse.TensorMetadata(name=spec.name, datatype=codec.datatype_of(spec.dtype), shape=shape)


class InferenceServicer(pb_grpc.GRPCInferenceServiceServicer):
    def __init__(self, repository: Repository, gate: Gate) -> None:
        self.repository = repository
        self.gate = gate

    @grpc_errors
    async def ServerLive(self, request, context):
        return pb.ServerLiveResponse(live=True)

    @grpc_errors
    async def ServerReady(self, request, context):
        return pb.ServerReadyResponse(ready=not self.gate.draining)

    @grpc_errors
    async def ServerMetadata(self, request, context):
        return pb.ServerMetadataResponse(name=SERVER_NAME, version=ortserve.__version__, extensions=[])

    @grpc_errors
    async def ModelReady(self, request, context):
        # A question, not a lookup: an unknown model or version is simply not ready.
        try:
            self.repository.get(request.name, request.version)
        except ModelNotFound:
            return pb.ModelReadyResponse(ready=False)
        return pb.ModelReadyResponse(ready=not self.gate.draining)

    @grpc_errors
    async def ModelMetadata(self, request, context):
        model = self.repository.get(request.name, request.version)
        return pb.ModelMetadataResponse(
            name=model.name,
            versions=[str(v) for v in self.repository.versions(model.name)],
            platform=PLATFORM,
            inputs=[tensor_metadata(s) for s in model.inputs.values()],
            outputs=[tensor_metadata(s) for s in model.outputs.values()],
        )

    @grpc_errors
    async def ModelInfer(self, request, context):
        model = self.repository.get(request.model_name, request.model_version)
        inputs = codec.decode_request_inputs(request)
        requested = [o.name for o in request.outputs]
        with self.gate.admit():
            outputs = await model.infer(inputs, requested)
        response = pb.ModelInferResponse(model_name=model.name, model_version=str(model.version), id=request.id)
        codec.encode_response_outputs(response, outputs)
        return response
