"""The old ONNX Runtime Server protocol: onnxruntime.server.PredictionService/Predict with onnx.TensorProto maps."""

from __future__ import annotations

import json

import grpc
import numpy as np
import pytest
from onnx import TensorProto, numpy_helper
from server_models import digits_inputs

from ortserve._proto import predict_pb2, predict_pb2_grpc
from ortserve.server.app import BackgroundServer, ServerOptions
from ortserve.zoo import DEFAULT_REPOSITORY_MODELS


def predict_request(inputs: dict[str, np.ndarray], output_filter=()) -> predict_pb2.PredictRequest:
    request = predict_pb2.PredictRequest(output_filter=list(output_filter))
    for name, array in inputs.items():
        request.inputs[name].CopyFrom(numpy_helper.from_array(array, name))
    return request


def outputs_of(response: predict_pb2.PredictResponse) -> dict[str, np.ndarray]:
    return {name: numpy_helper.to_array(tensor) for name, tensor in response.outputs.items()}


def serve_as_default(tmp_path, base_path, name: str = "default"):
    """A server given a model_config_list JSON with one model (the old server's config format)."""
    entry = {"name": name, "base_path": str(base_path), "model_platform": "onnx", "max_batch_size": 0}
    listing = {"model_config_list": [entry]}
    config = tmp_path / "models.json"
    config.write_text(json.dumps(listing))
    return BackgroundServer(config, ServerOptions(port=0))


@pytest.fixture(scope="module", params=DEFAULT_REPOSITORY_MODELS)
def digits_default(request, tmp_path_factory, digits_repository):
    name = request.param
    with serve_as_default(tmp_path_factory.mktemp(name), digits_repository / name) as running:
        with grpc.insecure_channel(running.address) as channel:
            yield name, predict_pb2_grpc.PredictionServiceStub(channel)


def test_digits_predictions_match_onnxruntime(digits_default, ort_session, digits_repository):
    name, stub = digits_default
    x = digits_inputs(name)
    session = ort_session(digits_repository / name / "1" / "model.onnx")
    expected = dict(zip([o.name for o in session.get_outputs()], session.run(None, {"input": x})))
    got = outputs_of(stub.Predict(predict_request({"input": x}), timeout=60))
    assert set(got) == set(expected)
    for output, want in expected.items():
        np.testing.assert_array_equal(got[output], want)


def test_output_filter(digits_default):
    name, stub = digits_default
    wanted, shape = ("logits", (3, 10)) if name == "digits_cnn" else ("label", (3,))
    got = outputs_of(stub.Predict(predict_request({"input": digits_inputs(name, 3)}, [wanted]), timeout=60))
    assert list(got) == [wanted] and got[wanted].shape == shape


def test_model_path_server_is_default(legacy_stub, ort_session, digits_repository):
    x = digits_inputs("digits_cnn", 4)
    want = ort_session(digits_repository / "digits_cnn" / "1" / "model.onnx").run(None, {"input": x})[0]
    response = legacy_stub.Predict(predict_request({"input": x}), timeout=60)
    assert response.outputs["logits"].data_type == TensorProto.FLOAT
    np.testing.assert_array_equal(numpy_helper.to_array(response.outputs["logits"]), want)


BAD = {
    "wrong dtype": (lambda: predict_request({"input": digits_inputs("digits_cnn", 2).astype(np.float64)}), ["float64"]),
    "wrong name": (lambda: predict_request({"image": digits_inputs("digits_cnn", 2)}), ["missing 'input'", "'image'"]),
    "unknown output": (lambda: predict_request({"input": digits_inputs("digits_cnn", 2)}, ["probs"]), ["'probs'"]),
    "raw_data too short": (
        lambda: predict_pb2.PredictRequest(
            inputs={"input": TensorProto(data_type=TensorProto.FLOAT, dims=[2, 1, 8, 8], raw_data=b"\0" * 12)}
        ),
        ["'input'", "onnx.TensorProto"],
    ),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_request_then_good(legacy_stub, case):
    make, words = BAD[case]
    with pytest.raises(grpc.RpcError) as caught:
        legacy_stub.Predict(make(), timeout=60)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    for word in words:
        assert word in caught.value.details()
    response = legacy_stub.Predict(predict_request({"input": digits_inputs("digits_cnn", 2)}), timeout=60)
    assert numpy_helper.to_array(response.outputs["logits"]).shape == (2, 10)


def test_no_default_model_is_not_found(channel):
    stub = predict_pb2_grpc.PredictionServiceStub(channel)
    with pytest.raises(grpc.RpcError) as caught:
        stub.Predict(predict_request({"x": np.zeros(3, np.float32)}), timeout=60)
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    assert "'default'" in caught.value.details() and "add_sub" in caught.value.details()


def test_only_model_is_served_and_strings_travel(tmp_path, repository):
    with serve_as_default(tmp_path, repository / "shout", name="shout") as running:
        with grpc.insecure_channel(running.address) as channel:
            stub = predict_pb2_grpc.PredictionServiceStub(channel)
            text = np.array(["caf\u00e9", ""], dtype=object)
            got = outputs_of(stub.Predict(predict_request({"text": text}), timeout=60))
    assert [s.decode() if isinstance(s, bytes) else s for s in got["shout"]] == ["caf\u00e9!", "!"]
