"""Clients of the inference server: numpy in, numpy out, over the Open Inference Protocol (KServe v2).

    with InferenceClient("127.0.0.1:50051") as client:
        client.server_ready()
        outputs = client.infer("digits_cnn", {"input": images})          # {"logits": array}
        logits = client.infer("digits_cnn", images)["logits"]            # a model with one input takes an array

    async with AsyncInferenceClient("127.0.0.1:50051") as client:
        outputs = await client.infer("digits_cnn", images)

Both talk to any server of the protocol (this one, Triton, MLServer, KServe). Tensors travel as raw contents;
BYTES tensors come back as object arrays of bytes. Every failed call raises InferenceServerError carrying the
gRPC status code and the server's message. The encode/decode code is ortserve.server.codec, shared with the server.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import grpc
import numpy as np
from grpc_health.v1 import health_pb2, health_pb2_grpc
from pydantic import BaseModel

from ortserve._proto import grpc_service_pb2 as pb
from ortserve._proto import grpc_service_pb2_grpc as pb_grpc
from ortserve.server import codec

DEFAULT_ADDRESS = "127.0.0.1:50051"
DEFAULT_TIMEOUT = 30.0
DEFAULT_MAX_MESSAGE_BYTES = 64 * 1024 * 1024

Inputs = Mapping[str, np.ndarray] | np.ndarray


class InferenceServerError(Exception):
    """A call failed: `code` is the grpc.StatusCode, `message` the server's (or gRPC's) explanation."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(f"{code.name}: {message}")
        self.code = code
        self.message = message

    @classmethod
    def from_rpc_error(cls, error: grpc.RpcError) -> "InferenceServerError":
        return cls(error.code(), error.details() or "")


class TensorMetadata(BaseModel):
    name: str
    datatype: str
    shape: list[int]  # -1 for a free dimension


class ModelMetadata(BaseModel):
    name: str
    versions: list[str]
    platform: str
    inputs: list[TensorMetadata]
    outputs: list[TensorMetadata]

    @classmethod
    def from_message(cls, message: pb.ModelMetadataResponse) -> "ModelMetadata":
        def tensors(items) -> list[TensorMetadata]:
            return [TensorMetadata(name=t.name, datatype=t.datatype, shape=list(t.shape)) for t in items]

        return cls(name=message.name, versions=list(message.versions), platform=message.platform,
                   inputs=tensors(message.inputs), outputs=tensors(message.outputs))  # fmt: skip


class ServerMetadata(BaseModel):
    name: str
    version: str
    extensions: list[str]


# --------------------------------------------------------------------------------------------------
# What both flavours share: building requests and reading answers


def channel_options(max_message_bytes: int) -> list[tuple[str, int]]:
    return [("grpc.max_send_message_length", max_message_bytes), ("grpc.max_receive_message_length", max_message_bytes)]


def infer_request(model: str, inputs: Mapping[str, np.ndarray], outputs: Sequence[str] | None,
                  version: str | int | None) -> pb.ModelInferRequest:  # fmt: skip
    request = pb.ModelInferRequest(model_name=model, model_version=version_string(version))
    codec.encode_request_inputs(request, inputs)
    for name in outputs or ():
        request.outputs.add(name=name)
    return request


def version_string(version: str | int | None) -> str:
    """The protocol's version field: empty for "the latest"."""
    return "" if version is None else str(version)


def name_single_input(model: str, array: np.ndarray, metadata: ModelMetadata) -> dict[str, np.ndarray]:
    if len(metadata.inputs) != 1:
        names = ", ".join(t.name for t in metadata.inputs)
        raise ValueError(f"model {model!r} takes {len(metadata.inputs)} inputs ({names}); pass a dict of arrays")
    return {metadata.inputs[0].name: array}


def health_status(response: health_pb2.HealthCheckResponse) -> str:
    return health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)


class InferenceClient:
    """Blocking client. `timeout` (seconds) bounds every call unless a call passes its own."""

    def __init__(self, address: str = DEFAULT_ADDRESS, timeout: float | None = DEFAULT_TIMEOUT,
                 max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES) -> None:  # fmt: skip
        self.address = address
        self.timeout = timeout
        self.channel = grpc.insecure_channel(address, options=channel_options(max_message_bytes))
        self.stub = pb_grpc.GRPCInferenceServiceStub(self.channel)
        self.health_stub = health_pb2_grpc.HealthStub(self.channel)
        self._metadata: dict[tuple[str, str], ModelMetadata] = {}

    def _call(self, method, request, timeout: float | None):
        try:
            return method(request, timeout=self.timeout if timeout is None else timeout)
        except grpc.RpcError as error:
            raise InferenceServerError.from_rpc_error(error) from None

    def server_live(self, timeout: float | None = None) -> bool:
        return self._call(self.stub.ServerLive, pb.ServerLiveRequest(), timeout).live

    def server_ready(self, timeout: float | None = None) -> bool:
        return self._call(self.stub.ServerReady, pb.ServerReadyRequest(), timeout).ready

    def server_metadata(self, timeout: float | None = None) -> ServerMetadata:
        m = self._call(self.stub.ServerMetadata, pb.ServerMetadataRequest(), timeout)
        return ServerMetadata(name=m.name, version=m.version, extensions=list(m.extensions))

    def model_ready(self, model: str, version: str | int | None = None, timeout: float | None = None) -> bool:
        request = pb.ModelReadyRequest(name=model, version=version_string(version))
        return self._call(self.stub.ModelReady, request, timeout).ready

    def model_metadata(self, model: str, version: str | int | None = None,
                       timeout: float | None = None) -> ModelMetadata:  # fmt: skip
        request = pb.ModelMetadataRequest(name=model, version=version_string(version))
        return ModelMetadata.from_message(self._call(self.stub.ModelMetadata, request, timeout))

    def health(self, service: str = "", timeout: float | None = None) -> str:
        """grpc.health.v1 status of the server ("") or of a model by name: "SERVING", "NOT_SERVING", ..."""
        request = health_pb2.HealthCheckRequest(service=service)
        return health_status(self._call(self.health_stub.Check, request, timeout))

    def infer(self, model: str, inputs: Inputs, outputs: Sequence[str] | None = None,
              version: str | int | None = None, timeout: float | None = None) -> dict[str, np.ndarray]:  # fmt: skip
        """Run `model` on `inputs` (name -> array, or one array for a one-input model); returns name -> array."""
        if not isinstance(inputs, Mapping):
            key = (model, version_string(version))
            if key not in self._metadata:
                self._metadata[key] = self.model_metadata(model, version, timeout)
            inputs = name_single_input(model, np.asarray(inputs), self._metadata[key])
        response = self._call(self.stub.ModelInfer, infer_request(model, inputs, outputs, version), timeout)
        return codec.decode_response_outputs(response)

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> "InferenceClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class AsyncInferenceClient:
    """The asyncio flavour of InferenceClient (grpc.aio): the same methods, awaited."""

    def __init__(self, address: str = DEFAULT_ADDRESS, timeout: float | None = DEFAULT_TIMEOUT,
                 max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES) -> None:  # fmt: skip
        self.address = address
        self.timeout = timeout
        self.channel = grpc.aio.insecure_channel(address, options=channel_options(max_message_bytes))
        self.stub = pb_grpc.GRPCInferenceServiceStub(self.channel)
        self.health_stub = health_pb2_grpc.HealthStub(self.channel)
        self._metadata: dict[tuple[str, str], ModelMetadata] = {}

    async def _call(self, method, request, timeout: float | None):
        try:
            return await method(request, timeout=self.timeout if timeout is None else timeout)
        except grpc.RpcError as error:
            raise InferenceServerError.from_rpc_error(error) from None

    async def server_live(self, timeout: float | None = None) -> bool:
        return (await self._call(self.stub.ServerLive, pb.ServerLiveRequest(), timeout)).live

    async def server_ready(self, timeout: float | None = None) -> bool:
        return (await self._call(self.stub.ServerReady, pb.ServerReadyRequest(), timeout)).ready

    async def server_metadata(self, timeout: float | None = None) -> ServerMetadata:
        m = await self._call(self.stub.ServerMetadata, pb.ServerMetadataRequest(), timeout)
        return ServerMetadata(name=m.name, version=m.version, extensions=list(m.extensions))

    async def model_ready(self, model: str, version: str | int | None = None, timeout: float | None = None) -> bool:
        request = pb.ModelReadyRequest(name=model, version=version_string(version))
        return (await self._call(self.stub.ModelReady, request, timeout)).ready

    async def model_metadata(self, model: str, version: str | int | None = None,
                             timeout: float | None = None) -> ModelMetadata:  # fmt: skip
        request = pb.ModelMetadataRequest(name=model, version=version_string(version))
        return ModelMetadata.from_message(await self._call(self.stub.ModelMetadata, request, timeout))

    async def health(self, service: str = "", timeout: float | None = None) -> str:
        request = health_pb2.HealthCheckRequest(service=service)
        return health_status(await self._call(self.health_stub.Check, request, timeout))

    async def infer(self, model: str, inputs: Inputs, outputs: Sequence[str] | None = None,
                    version: str | int | None = None,
                    timeout: float | None = None) -> dict[str, np.ndarray]:  # fmt: skip
        if not isinstance(inputs, Mapping):
            key = (model, version_string(version))
            if key not in self._metadata:
                self._metadata[key] = await self.model_metadata(model, version, timeout)
            inputs = name_single_input(model, np.asarray(inputs), self._metadata[key])
        response = await self._call(self.stub.ModelInfer, infer_request(model, inputs, outputs, version), timeout)
        return codec.decode_response_outputs(response)

    async def close(self) -> None:
        await self.channel.close()

    async def __aenter__(self) -> "AsyncInferenceClient":
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()
