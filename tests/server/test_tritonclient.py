"""Wire compatibility: Triton's own client library (tritonclient.grpc) against our server, unchanged."""

from __future__ import annotations

import numpy as np
import pytest
import tritonclient.grpc as triton
from server_models import digits_inputs, sample

from ortserve._proto import grpc_service_pb2
from ortserve.client import InferenceClient
from ortserve.server import codec
from ortserve.server.app import BackgroundServer, ServerOptions
from ortserve.zoo import DEFAULT_REPOSITORY_MODELS


@pytest.fixture(scope="module")
def triton_client(server):
    client = triton.InferenceServerClient(server.address)
    yield client
    client.close()


def test_liveness_readiness_metadata(triton_client):
    assert triton_client.is_server_live()
    assert triton_client.is_server_ready()
    assert triton_client.is_model_ready("add_sub")
    assert triton_client.is_model_ready("versioned", "2")
    assert not triton_client.is_model_ready("no_such_model")
    assert triton_client.get_server_metadata().name == "ortserve"
    meta = triton_client.get_model_metadata("add_sub", as_json=True)
    assert meta["platform"] == "onnx_onnxv1"
    inputs = [(t["name"], t["datatype"], t["shape"]) for t in meta["inputs"]]
    assert inputs == [("a", "FP32", ["-1", "4"]), ("b", "FP32", ["-1", "4"])]


def test_infer_raw_with_requested_output(triton_client):
    a = np.arange(12, dtype=np.float32).reshape(3, 4)
    inputs = [triton.InferInput("a", [3, 4], "FP32"), triton.InferInput("b", [3, 4], "FP32")]
    inputs[0].set_data_from_numpy(a)
    inputs[1].set_data_from_numpy(np.ones_like(a))
    result = triton_client.infer("add_sub", inputs, outputs=[triton.InferRequestedOutput("sum")], request_id="t1")
    np.testing.assert_array_equal(result.as_numpy("sum"), a + 1)
    assert result.as_numpy("difference") is None
    assert result.get_response().id == "t1"


@pytest.mark.parametrize("datatype", ["BOOL", "UINT8", "INT16", "INT64", "FP16", "FP64", "BYTES"])
def test_infer_datatypes(triton_client, datatype):
    array = sample(datatype)
    tensor = triton.InferInput("x", list(array.shape), datatype)
    tensor.set_data_from_numpy(array)
    out = triton_client.infer(f"echo_{datatype.lower()}", [tensor]).as_numpy("y")
    assert out.tolist() == array.tolist()


def test_server_error_reaches_triton_client(triton_client):
    tensor = triton.InferInput("x", [4], "FP32")
    tensor.set_data_from_numpy(np.zeros(4, np.float32))
    with pytest.raises(triton.InferenceServerException) as caught:
        triton_client.infer("broken", [tensor])
    assert caught.value.status() == "StatusCode.INTERNAL" and "Reshape" in caught.value.message()


@pytest.mark.parametrize("name", DEFAULT_REPOSITORY_MODELS)
def test_digits_predictions_match_onnxruntime(triton_client, client, ort_session, repository, name):
    x = digits_inputs(name)
    session = ort_session(repository / name / "1" / "model.onnx")
    expected = dict(zip([o.name for o in session.get_outputs()], session.run(None, {"input": x})))
    tensor = triton.InferInput("input", list(x.shape), "FP32")
    tensor.set_data_from_numpy(x)
    via_triton = triton_client.infer(name, [tensor])
    via_ours = client.infer(name, x)
    assert set(via_ours) == set(expected)
    for output, want in expected.items():
        np.testing.assert_array_equal(via_triton.as_numpy(output), want)
        np.testing.assert_array_equal(via_ours[output], want)


def test_our_messages_match_tritons_field_for_field():
    """Names, numbers and types of every field of every message both define (the wire contract)."""
    from tritonclient.grpc import service_pb2 as theirs

    def fields(descriptor):
        return {(f.name, f.number, f.type, f.is_repeated) for f in descriptor.fields}

    def walk(ours, theirs_):
        assert fields(ours) == fields(theirs_), ours.full_name
        for nested in ours.nested_types:
            walk(nested, theirs_.nested_types_by_name[nested.name])

    ours = grpc_service_pb2.DESCRIPTOR
    assert ours.package == theirs.DESCRIPTOR.package == "inference"
    for name, message in ours.message_types_by_name.items():
        walk(message, theirs.DESCRIPTOR.message_types_by_name[name])
    their_service = theirs.DESCRIPTOR.services_by_name["GRPCInferenceService"]
    for method in ours.services_by_name["GRPCInferenceService"].methods:
        their_method = their_service.methods_by_name[method.name]
        assert (method.input_type.name, method.output_type.name) == (
            their_method.input_type.name,
            their_method.output_type.name,
        )


def test_every_datatype_is_in_the_codec_table():
    assert set(codec.DATATYPES) == {"BOOL", "UINT8", "UINT16", "UINT32", "UINT64", "INT8", "INT16", "INT32",
                                    "INT64", "FP16", "FP32", "FP64", "BYTES"}  # fmt: skip


def test_default_repository_served_as_shipped(digits_repository, ort_session):
    """The repository `run_ort_server.sh` serves with no model flag, through our client."""
    with BackgroundServer(digits_repository, ServerOptions(port=0)) as running, InferenceClient(running.address) as c:
        for name in DEFAULT_REPOSITORY_MODELS:
            x = digits_inputs(name, 5)
            session = ort_session(digits_repository / name / "1" / "model.onnx")
            want = session.run(None, {"input": x})[0]
            np.testing.assert_array_equal(c.infer(name, x)[session.get_outputs()[0].name], want)
