"""Clients of the inference server: numpy in, numpy out, over the Open Inference Protocol (KServe v2).

    with InferenceClient("127.0.0.1:50051") as client:
        client.server_ready()
        outputs = client.infer("digits_cnn", {"input": images})          # {"logits": array}
        logits = client.infer("digits_cnn", images)["logits"]            # a model with one input takes an array

    async with AsyncInferenceClient("127.0.0.1:50051") as client:
        outputs = await client.infer("digits_cnn", images)

Several addresses -- the replicas of `serve --replicas N`, say -- spread the calls round-robin (gRPC's own
round_robin policy: a connection to each, calls taken in turn, a replica that is down skipped until it is back):

    with InferenceClient(["127.0.0.1:50051", "127.0.0.1:50052"]) as client: ...

A secured server (see ortserve.server.security) takes a token and TLS settings:

    tls = ClientTls(ca="ca.crt", cert="client.crt", key="client.key")   # cert/key only for mutual TLS
    with InferenceClient("localhost:50051", token=token, tls=tls) as client: ...

Both talk to any server of the protocol (this one, Triton, MLServer, KServe). Tensors travel as raw contents;
BYTES tensors come back as object arrays of bytes. Every failed call raises InferenceServerError carrying the
gRPC status code and the server's message. The encode/decode code is ortserve.server.codec, shared with the server.
"""

from __future__ import annotations

import json
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

import grpc
import numpy as np
from grpc_health.v1 import health_pb2, health_pb2_grpc
from pydantic import BaseModel

from ortserve._proto import grpc_service_pb2 as pb
from ortserve._proto import grpc_service_pb2_grpc as pb_grpc
from ortserve.server import codec
from ortserve.server.security import bearer_metadata

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


@dataclass(frozen=True)
class ClientTls:
    """TLS for a client, as PEM file paths: `ca` checks the server's certificate (None: the system's trusted
    roots); `cert` and `key` prove who the client is to a server that asks for it (mutual TLS)."""

    ca: Path | str | None = None
    cert: Path | str | None = None
    key: Path | str | None = None

    def credentials(self) -> grpc.ChannelCredentials:
        if (self.cert is None) != (self.key is None):
            raise ValueError("ClientTls: give both cert and key (mutual TLS), or neither")

        def read(path: Path | str | None) -> bytes | None:
            return None if path is None else Path(path).read_bytes()

        return grpc.ssl_channel_credentials(read(self.ca), read(self.key), read(self.cert))


def open_channel(address: str | Sequence[str], max_message_bytes: int, tls: ClientTls | None, aio: bool = False):
    """A grpc (or grpc.aio) channel to `address` (several: round robin, see channel_target), plaintext unless
    `tls` is given."""
    grpc_module = grpc.aio if aio else grpc
    target, balancing = channel_target(address)
    options = [*channel_options(max_message_bytes), *balancing]
    if tls is None:
        return grpc_module.insecure_channel(target, options=options)
    return grpc_module.secure_channel(target, tls.credentials(), options=options)


# Calls in turn over every address; a call answered UNAVAILABLE -- a replica draining (SIGTERM) turns new calls
# away before running them, or went away -- is tried again, on the next address, up to 3 times in all.
ROUND_ROBIN = json.dumps({
    "loadBalancingConfig": [{"round_robin": {}}],
    "methodConfig": [{"name": [{}], "retryPolicy": {
        "maxAttempts": 3, "initialBackoff": "0.01s", "maxBackoff": "0.1s", "backoffMultiplier": 2,
        "retryableStatusCodes": ["UNAVAILABLE"]}}],
})  # fmt: skip


def channel_target(address: str | Sequence[str]) -> tuple[str, list[tuple[str, str]]]:
    """(gRPC target, extra channel options) for one address, or for several to spread calls over round-robin.

    One address (a string: HOST:PORT, or any gRPC target such as dns:///name:port) goes to gRPC as it is. Several
    HOST:PORT become one `ipv4:A,B,...` (or `ipv6:`) target under gRPC's round_robin policy, UNAVAILABLE answers
    retried on the next address (ROUND_ROBIN). Host names among them are resolved here, once; the channel keeps
    the first address's name as its authority (what TLS checks).
    """
    if isinstance(address, str):
        return address, []
    addresses = list(address)
    if len(addresses) <= 1:
        if not addresses:
            raise ValueError("no server address given")
        return addresses[0], []
    resolved = [_resolve(a) for a in addresses]
    families = {family for family, _ in resolved}
    if len(families) > 1:
        raise ValueError(f"addresses {addresses} mix IPv4 and IPv6; give addresses of one family")
    scheme = "ipv6" if families == {socket.AF_INET6} else "ipv4"
    options = [("grpc.service_config", ROUND_ROBIN), ("grpc.default_authority", addresses[0])]
    return f"{scheme}:" + ",".join(host_port for _, host_port in resolved), options


def _resolve(address: str) -> tuple[int, str]:
    """(address family, IP:PORT) of HOST:PORT ([IPv6]:PORT too), preferring IPv4 when a name has both."""
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit() or not host:
        raise ValueError(f"expected HOST:PORT, got {address!r}")
    try:
        infos = socket.getaddrinfo(host.strip("[]"), int(port), type=socket.SOCK_STREAM)
    except socket.gaierror as error:
        raise ValueError(f"cannot resolve {address!r}: {error}") from None
    family, *_, sockaddr = min(infos, key=lambda info: info[0] != socket.AF_INET)
    ip = sockaddr[0] if family == socket.AF_INET else f"[{sockaddr[0]}]"
    return family, f"{ip}:{port}"


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


class _ClientBase:
    """What both clients set up: the channel (plain or grpc.aio, by `aio`), stubs, call metadata, metadata cache."""

    aio = False

    def __init__(self, address: str | Sequence[str] = DEFAULT_ADDRESS, timeout: float | None = DEFAULT_TIMEOUT,
                 max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES, token: str | None = None,
                 tls: ClientTls | None = None) -> None:  # fmt: skip
        self.address = address if isinstance(address, str) else ",".join(address)
        self.timeout = timeout
        self._auth = bearer_metadata(token) if token is not None else None
        self.channel = open_channel(address, max_message_bytes, tls, aio=self.aio)
        self.stub = pb_grpc.GRPCInferenceServiceStub(self.channel)
        self.health_stub = health_pb2_grpc.HealthStub(self.channel)
        self._metadata: dict[tuple[str, str], ModelMetadata] = {}


class InferenceClient(_ClientBase):
    """Blocking client. `address`: HOST:PORT (or any gRPC target), or a list of them to spread calls over
    round-robin (channel_target). `timeout` (seconds) bounds every call unless a call passes its own. `token` goes
    with every call as `authorization: Bearer <token>`; `tls` (ClientTls) makes the channel a TLS one."""

    def _call(self, method, request, timeout: float | None):
        try:
            return method(request, timeout=self.timeout if timeout is None else timeout, metadata=self._auth)
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


class AsyncInferenceClient(_ClientBase):
    """The asyncio flavour of InferenceClient (grpc.aio): the same methods, awaited."""

    aio = True

    async def _call(self, method, request, timeout: float | None):
        try:
            return await method(request, timeout=self.timeout if timeout is None else timeout, metadata=self._auth)
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
