"""grpc.health.v1, server reflection, and our clients (sync and asyncio)."""

from __future__ import annotations

import asyncio

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from ortserve.client import AsyncInferenceClient, InferenceClient, InferenceServerError
from ortserve.server.app import SERVICE_NAMES


def test_health_overall_and_per_model(channel, client):
    stub = health_pb2_grpc.HealthStub(channel)
    serving = health_pb2.HealthCheckResponse.SERVING
    for service in ("", "add_sub", "digits_cnn", "versioned", "inference.GRPCInferenceService"):
        assert stub.Check(health_pb2.HealthCheckRequest(service=service)).status == serving
    with pytest.raises(grpc.RpcError) as caught:
        stub.Check(health_pb2.HealthCheckRequest(service="no_such_model"))
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    assert client.health() == "SERVING" and client.health("shout") == "SERVING"


def reflect(channel, request: reflection_pb2.ServerReflectionRequest) -> reflection_pb2.ServerReflectionResponse:
    stub = reflection_pb2_grpc.ServerReflectionStub(channel)
    return next(iter(stub.ServerReflectionInfo(iter([request]))))


def test_reflection_lists_and_describes_every_service(channel):
    listed = reflect(channel, reflection_pb2.ServerReflectionRequest(list_services=""))
    names = {s.name for s in listed.list_services_response.service}
    assert names == set(SERVICE_NAMES)
    assert {"inference.GRPCInferenceService", "onnxruntime.server.PredictionService", "grpc.health.v1.Health",
            "grpc.reflection.v1alpha.ServerReflection"} <= names  # fmt: skip
    from google.protobuf import descriptor_pb2

    for symbol, file_name in [
        ("inference.ModelInferRequest", "ortserve/_proto/grpc_service.proto"),
        ("onnxruntime.server.PredictionService", "ortserve/_proto/predict.proto"),
    ]:
        answer = reflect(channel, reflection_pb2.ServerReflectionRequest(file_containing_symbol=symbol))
        serialized = answer.file_descriptor_response.file_descriptor_proto
        files = [descriptor_pb2.FileDescriptorProto.FromString(b) for b in serialized]
        assert file_name in {f.name for f in files}
    # predict.proto's import comes along, so a reflection client can build onnx.TensorProto too
    answer = reflect(channel, reflection_pb2.ServerReflectionRequest(file_by_filename="onnx/onnx-ml.proto"))
    assert answer.HasField("file_descriptor_response")


def test_sync_client_calls(client):
    assert client.server_live() and client.server_ready()
    assert client.server_metadata().name == "ortserve"
    assert client.model_ready("add_sub") and not client.model_ready("add_sub", version=5)
    meta = client.model_metadata("versioned")
    assert meta.versions == ["1", "2", "3"] and meta.inputs[0].shape == [-1]
    # one-input model: an array is enough
    np.testing.assert_array_equal(client.infer("versioned", np.zeros(2, np.float32), version=1)["y"], [100, 100])
    # numpy strings go as BYTES and come back as bytes
    assert client.infer("shout", {"text": np.array(["a", "bc"])})["shout"].tolist() == [b"a!", b"bc!"]


def test_client_timeout_is_deadline_exceeded():
    """A peer that accepts TCP but never speaks HTTP/2: the call can only end by its deadline."""
    import socket

    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        with InferenceClient(f"127.0.0.1:{silent.getsockname()[1]}", timeout=0.5) as waiting:
            with pytest.raises(InferenceServerError) as caught:
                waiting.server_live()
    assert caught.value.code == grpc.StatusCode.DEADLINE_EXCEEDED


def test_client_to_nowhere_is_unavailable(unused_port):
    with InferenceClient(f"127.0.0.1:{unused_port}", timeout=10) as lost:
        with pytest.raises(InferenceServerError) as caught:
            lost.server_live()
    assert caught.value.code == grpc.StatusCode.UNAVAILABLE


@pytest.fixture
def unused_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_async_client(server):
    async def main():
        async with AsyncInferenceClient(server.address, timeout=60) as c:
            assert await c.server_live() and await c.server_ready()
            assert (await c.server_metadata()).name == "ortserve"
            assert await c.model_ready("digits_cnn")
            assert await c.health() == "SERVING"
            meta = await c.model_metadata("add_sub")
            assert [t.name for t in meta.inputs] == ["a", "b"]
            a = np.ones((2, 4), np.float32)
            out = await c.infer("add_sub", {"a": a, "b": a}, outputs=["sum"])
            assert list(out) == ["sum"]
            np.testing.assert_array_equal(out["sum"], 2 * a)
            y = (await c.infer("versioned", np.zeros(1, np.float32)))["y"]
            np.testing.assert_array_equal(y, [300])
            with pytest.raises(InferenceServerError) as caught:
                await c.infer("nope", {"x": a})
            assert caught.value.code == grpc.StatusCode.NOT_FOUND

    asyncio.run(main())
