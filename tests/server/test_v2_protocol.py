"""The Open Inference Protocol over gRPC: every RPC, every datatype, raw and typed contents, BYTES, outputs."""

from __future__ import annotations

import struct

import grpc
import numpy as np
import pytest
import server_models
from server_models import sample

from ortserve._proto import grpc_service_pb2 as pb
from ortserve.server import codec

ROWS = 2


def typed_request(model: str, name: str, array: np.ndarray, datatype: str) -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name=model)
    tensor = request.inputs.add(name=name, datatype=datatype, shape=list(array.shape))
    field = codec.DATATYPES[datatype].contents_field
    getattr(tensor.contents, field).extend(array.reshape(-1).tolist())
    return request


def test_server_live_ready_metadata(v2_stub):
    assert v2_stub.ServerLive(pb.ServerLiveRequest()).live is True
    assert v2_stub.ServerReady(pb.ServerReadyRequest()).ready is True
    meta = v2_stub.ServerMetadata(pb.ServerMetadataRequest())
    assert meta.name == "ortserve" and meta.version


def test_model_ready(v2_stub):
    assert v2_stub.ModelReady(pb.ModelReadyRequest(name="add_sub")).ready is True
    assert v2_stub.ModelReady(pb.ModelReadyRequest(name="versioned", version="2")).ready is True
    assert v2_stub.ModelReady(pb.ModelReadyRequest(name="versioned", version="9")).ready is False
    assert v2_stub.ModelReady(pb.ModelReadyRequest(name="no_such_model")).ready is False


def test_model_metadata(v2_stub):
    meta = v2_stub.ModelMetadata(pb.ModelMetadataRequest(name="add_sub"))
    assert meta.name == "add_sub" and list(meta.versions) == ["1"] and meta.platform == "onnx_onnxv1"
    inputs = [(t.name, t.datatype, list(t.shape)) for t in meta.inputs]
    assert inputs == [("a", "FP32", [-1, 4]), ("b", "FP32", [-1, 4])]
    assert [t.name for t in meta.outputs] == ["sum", "difference"]
    cnn = v2_stub.ModelMetadata(pb.ModelMetadataRequest(name="digits_cnn"))
    assert [(t.name, t.datatype, list(t.shape)) for t in cnn.inputs] == [("input", "FP32", [-1, 1, 8, 8])]
    versioned = v2_stub.ModelMetadata(pb.ModelMetadataRequest(name="versioned", version="1"))
    assert list(versioned.versions) == ["1", "2", "3"]


@pytest.mark.parametrize("datatype", list(server_models.ECHO_TYPES))
def test_metadata_names_every_datatype(v2_stub, datatype):
    meta = v2_stub.ModelMetadata(pb.ModelMetadataRequest(name=f"echo_{datatype.lower()}"))
    assert (meta.inputs[0].datatype, list(meta.inputs[0].shape)) == (datatype, [-1, 3])
    assert meta.outputs[0].datatype == datatype


@pytest.mark.parametrize("datatype", list(server_models.ECHO_TYPES))
def test_raw_round_trip_every_datatype(client, datatype):
    array = sample(datatype)
    result = client.infer(f"echo_{datatype.lower()}", {"x": array})
    assert list(result) == ["y"]
    assert result["y"].dtype == array.dtype and result["y"].shape == array.shape
    if datatype == "BYTES":
        assert result["y"].tolist() == array.tolist()
    else:
        np.testing.assert_array_equal(result["y"], array)


@pytest.mark.parametrize("datatype", [d for d in server_models.ECHO_TYPES if d != "FP16"])
def test_typed_contents_every_datatype(v2_stub, datatype):
    array = sample(datatype)
    response = v2_stub.ModelInfer(typed_request(f"echo_{datatype.lower()}", "x", array, datatype))
    (output,) = response.outputs
    assert (output.name, output.datatype, list(output.shape)) == ("y", datatype, [ROWS, 3])
    decoded = codec.decode_response_outputs(response)["y"]
    if datatype == "BYTES":
        assert decoded.tolist() == array.tolist()
    else:
        np.testing.assert_array_equal(decoded, array)


def test_raw_request_by_hand_and_raw_answer(v2_stub):
    a = np.arange(8, dtype=np.float32).reshape(2, 4)
    b = np.full((2, 4), 0.5, dtype=np.float32)
    request = pb.ModelInferRequest(model_name="add_sub", id="req-7")
    for name in ("a", "b"):
        request.inputs.add(name=name, datatype="FP32", shape=[2, 4])
    request.raw_input_contents.extend([a.tobytes(), b.tobytes()])
    response = v2_stub.ModelInfer(request)
    assert (response.model_name, response.model_version, response.id) == ("add_sub", "1", "req-7")
    assert [o.name for o in response.outputs] == ["sum", "difference"]
    assert len(response.raw_output_contents) == 2 and not response.outputs[0].HasField("contents")
    np.testing.assert_array_equal(np.frombuffer(response.raw_output_contents[0], np.float32).reshape(2, 4), a + b)
    np.testing.assert_array_equal(np.frombuffer(response.raw_output_contents[1], np.float32).reshape(2, 4), a - b)


def test_requested_outputs_subset(client):
    a = np.ones((3, 4), np.float32)
    assert list(client.infer("add_sub", {"a": a, "b": a}, outputs=["difference"])) == ["difference"]
    both = client.infer("add_sub", {"a": a, "b": a}, outputs=["difference", "sum"])
    assert list(both) == ["difference", "sum"]
    np.testing.assert_array_equal(both["sum"], 2 * a)


def test_bytes_in_and_out_on_the_wire(v2_stub):
    words = ["h\u00e9llo", "", "world"]
    raw = b"".join(struct.pack("<I", len(w.encode())) + w.encode() for w in words)
    request = pb.ModelInferRequest(model_name="shout")
    request.inputs.add(name="text", datatype="BYTES", shape=[3])
    request.raw_input_contents.append(raw)
    response = v2_stub.ModelInfer(request)
    outputs = {o.name: (o, response.raw_output_contents[i]) for i, o in enumerate(response.outputs)}
    tensor, shout_raw = outputs["shout"]
    assert (tensor.datatype, list(tensor.shape)) == ("BYTES", [3])
    expected = b"".join(struct.pack("<I", len((w + "!").encode())) + (w + "!").encode() for w in words)
    assert shout_raw == expected
    assert outputs["same"][1] == raw


def test_versions_latest_when_none_named(client):
    x = np.array([1.0, 2.0], np.float32)
    np.testing.assert_array_equal(client.infer("versioned", {"x": x})["y"], x + 300)
    for version in (1, 2, 3):
        np.testing.assert_array_equal(client.infer("versioned", {"x": x}, version=version)["y"], x + 100 * version)


def test_several_models_in_one_server(client):
    x = np.array([[1, 2, 3]], np.int32)
    assert client.infer("echo_int32", {"x": x})["y"].tolist() == [[1, 2, 3]]
    assert client.infer("shout", {"text": np.array(["ab"], dtype=object)})["shout"].tolist() == [b"ab!"]


def test_unsupported_triton_rpc_is_unimplemented(server):
    from tritonclient.grpc import InferenceServerClient, InferenceServerException

    triton = InferenceServerClient(server.address)
    with pytest.raises(InferenceServerException) as caught:
        triton.get_system_shared_memory_status()
    assert "UNIMPLEMENTED" in str(caught.value.status())
    assert triton.is_server_live()  # and the server is fine


def test_response_id_echoed_for_typed_request(v2_stub):
    request = typed_request("echo_int64", "x", np.array([[1, 2, 3]], np.int64), "INT64")
    request.id = "abc"
    assert v2_stub.ModelInfer(request).id == "abc"


def test_channel_level_status_for_unknown_method(channel):
    call = channel.unary_unary("/inference.GRPCInferenceService/CudaSharedMemoryStatus")
    with pytest.raises(grpc.RpcError) as caught:
        call(b"")
    assert caught.value.code() == grpc.StatusCode.UNIMPLEMENTED
