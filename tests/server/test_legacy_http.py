"""The old ONNX Runtime Server's HTTP endpoint, POST /v1/models/{name}[/versions/{version}]:predict, on the REST
port: PredictRequest/PredictResponse as protobuf JSON or binary, its request-id headers and its error shape."""

from __future__ import annotations

import base64
import shutil
import uuid
from pathlib import Path

import grpc
import httpx
import numpy as np
import pytest
import requests
from google.protobuf import json_format
from onnx import TensorProto, numpy_helper
from server_models import digits_inputs

from ortserve._proto import predict_pb2, predict_pb2_grpc
from ortserve.server.app import BackgroundServer, ServerOptions
from ortserve.server.legacy import PROTOBUF

JSON = "application/json"
CNN = ("digits_cnn", "1", "model.onnx")


def predict_request(inputs: dict[str, np.ndarray], output_filter=()) -> predict_pb2.PredictRequest:
    request = predict_pb2.PredictRequest(output_filter=list(output_filter))
    for name, array in inputs.items():
        request.inputs[name].CopyFrom(numpy_helper.from_array(array, name))
    return request


def as_json(request: predict_pb2.PredictRequest) -> bytes:
    return json_format.MessageToJson(request).encode()


def outputs_of(response: predict_pb2.PredictResponse) -> dict[str, np.ndarray]:
    return {name: numpy_helper.to_array(tensor) for name, tensor in response.outputs.items()}


def parse_answer(answer: httpx.Response) -> predict_pb2.PredictResponse:
    assert answer.status_code == 200, answer.text
    if answer.headers["content-type"] == JSON:
        return json_format.Parse(answer.content, predict_pb2.PredictResponse())
    return predict_pb2.PredictResponse.FromString(answer.content)


def post(base: str, path: str, body: bytes, content_type: str | None = JSON, **headers: str) -> httpx.Response:
    sent = {"content-type": content_type} if content_type else {}
    sent.update({k.replace("_", "-"): v for k, v in headers.items()})
    return httpx.post(f"{base}{path}", content=body, headers=sent, timeout=60)


@pytest.fixture(scope="module")
def file_url(digits_repository):
    """A server given one .onnx file (run_ort_server.sh --model_path): its model is called `default`."""
    options = ServerOptions(port=0, http_port=0)
    with BackgroundServer(digits_repository.joinpath(*CNN), options) as running:
        yield f"http://{running.http_address}", running


@pytest.fixture(scope="module")
def lone_url(tmp_path_factory, digits_repository):
    """A repository of one model that is not called `default`."""
    root = tmp_path_factory.mktemp("lone")
    (root / "digits_forest" / "1").mkdir(parents=True)
    model = Path("digits_forest", "1", "model.onnx")
    shutil.copyfile(digits_repository / model, root / model)
    with BackgroundServer(root, ServerOptions(port=0, http_port=0)) as running:
        yield f"http://{running.http_address}"


@pytest.fixture(scope="module")
def cnn_expected(ort_session, digits_repository):
    x = digits_inputs("digits_cnn", 3)
    return x, ort_session(digits_repository.joinpath(*CNN)).run(None, {"input": x})[0]


def assert_serves_cnn(base: str, cnn_expected, path: str = "/v1/models/default/versions/1:predict") -> None:
    x, want = cnn_expected
    got = outputs_of(parse_answer(post(base, path, as_json(predict_request({"input": x})), accept=JSON)))
    np.testing.assert_array_equal(got["logits"], want)


# --------------------------------------------------------------------------------------------------
# Round trips


def test_json_round_trip(file_url, cnn_expected):
    base, _ = file_url
    x, want = cnn_expected
    answer = post(base, "/v1/models/default/versions/1:predict", as_json(predict_request({"input": x})), accept=JSON)
    assert answer.headers["content-type"] == JSON
    tensor = answer.json()["outputs"]["logits"]
    assert tensor["dims"] == ["3", "10"] and tensor["dataType"] == TensorProto.FLOAT  # int64 dims are strings
    np.testing.assert_array_equal(np.frombuffer(base64.b64decode(tensor["rawData"]), np.float32).reshape(3, 10), want)


@pytest.mark.parametrize("content_type", PROTOBUF)
def test_binary_round_trip(file_url, cnn_expected, content_type):
    base, _ = file_url
    x, want = cnn_expected
    body = predict_request({"input": x}).SerializeToString()
    answer = post(base, "/v1/models/default/versions/1:predict", body, content_type, accept=content_type)
    assert answer.headers["content-type"] == content_type
    np.testing.assert_array_equal(outputs_of(parse_answer(answer))["logits"], want)


@pytest.mark.parametrize(
    "accept, answered",
    [
        (None, PROTOBUF[0]),  # the old server answered binary protobuf unless asked otherwise
        ("*/*", PROTOBUF[0]),
        (JSON, JSON),
        ("application/x-protobuf", "application/x-protobuf"),
        ("text/html;q=0.9, application/json;q=0.8", JSON),
    ],
)
def test_accept_picks_the_answer_encoding(file_url, cnn_expected, accept, answered):
    base, _ = file_url
    x, want = cnn_expected
    with httpx.Client(timeout=60) as http:
        request = http.build_request("POST", f"{base}/v1/models/default/versions/1:predict",
                                     content=as_json(predict_request({"input": x})), headers={"content-type": JSON})
        if accept is None:
            del request.headers["accept"]  # httpx sends */* unless told otherwise
        else:
            request.headers["accept"] = accept
        answer = http.send(request)
    assert answer.headers["content-type"] == answered
    np.testing.assert_array_equal(outputs_of(parse_answer(answer))["logits"], want)


def test_same_answer_as_the_grpc_form(file_url, cnn_expected):
    base, running = file_url
    request = predict_request({"input": cnn_expected[0]})
    over_http = parse_answer(post(base, "/v1/models/default/versions/1:predict", request.SerializeToString(),
                                  PROTOBUF[0]))  # fmt: skip
    with grpc.insecure_channel(running.address) as channel:
        over_grpc = predict_pb2_grpc.PredictionServiceStub(channel).Predict(request, timeout=60)
    assert over_http == over_grpc


@pytest.mark.parametrize("path", ["/v1/models/default:predict", "/score"])
def test_the_old_servers_short_paths(file_url, cnn_expected, path):
    assert_serves_cnn(file_url[0], cnn_expected, path)


def test_output_filter(rest_url):
    x = digits_inputs("digits_forest", 4)
    for wanted in (["label"], ["probabilities"], ["label", "probabilities"]):
        body = as_json(predict_request({"input": x}, wanted))
        got = outputs_of(parse_answer(post(rest_url, "/v1/models/digits_forest/versions/1:predict", body)))
        assert sorted(got) == sorted(wanted)
    assert got["label"].shape == (4,) and got["probabilities"].shape == (4, 10)


# --------------------------------------------------------------------------------------------------
# Which model a URL names


def test_named_models_and_versions(rest_url, ort_session, repository):
    x = digits_inputs("digits_forest", 5)
    want = ort_session(repository / "digits_forest" / "1" / "model.onnx").run(None, {"input": x})
    got = outputs_of(parse_answer(post(rest_url, "/v1/models/digits_forest/versions/1:predict",
                                       predict_request({"input": x}).SerializeToString(), PROTOBUF[1])))  # fmt: skip
    np.testing.assert_array_equal(got["label"], want[0])
    np.testing.assert_array_equal(got["probabilities"], want[1])
    values = np.array([1.0, -2.5], dtype=np.float32)
    for version in ("1", "2", "3"):
        body = as_json(predict_request({"x": values}))
        got = outputs_of(parse_answer(post(rest_url, f"/v1/models/versioned/versions/{version}:predict", body)))
        np.testing.assert_array_equal(got["y"], values + 100 * int(version))
    body = as_json(predict_request({"x": values}))
    latest = outputs_of(parse_answer(post(rest_url, "/v1/models/versioned:predict", body)))
    np.testing.assert_array_equal(latest["y"], values + 300)


def test_default_is_the_only_model(lone_url, ort_session, digits_repository):
    x = digits_inputs("digits_forest", 3)
    want = ort_session(digits_repository / "digits_forest" / "1" / "model.onnx").run(None, {"input": x})
    for name in ("default", "digits_forest"):
        body = as_json(predict_request({"input": x}))
        got = outputs_of(parse_answer(post(lone_url, f"/v1/models/{name}/versions/1:predict", body)))
        np.testing.assert_array_equal(got["probabilities"], want[1])


def test_default_with_many_models_is_not_found(rest_url):
    answer = post(rest_url, "/v1/models/default/versions/1:predict", as_json(predict_request({})))
    assert answer.status_code == 404
    assert "no model 'default'" in answer.json()["error_message"] and "'digits_cnn'" in answer.json()["error_message"]


# --------------------------------------------------------------------------------------------------
# Headers


def test_request_id_headers(file_url, cnn_expected):
    base, _ = file_url
    body = as_json(predict_request({"input": cnn_expected[0]}))
    path = "/v1/models/default/versions/1:predict"
    first = post(base, path, body, x_ms_client_request_id="my-request-001", x_ms_request_id="not-mine")
    second = post(base, path, body)
    assert first.headers["x-ms-client-request-id"] == "my-request-001"
    assert "x-ms-client-request-id" not in second.headers
    ids = [str(uuid.UUID(answer.headers["x-ms-request-id"])) for answer in (first, second)]
    assert ids[0] == first.headers["x-ms-request-id"] and ids[0] != ids[1] and "not-mine" not in ids


# --------------------------------------------------------------------------------------------------
# Errors: the old server's {"error_code", "error_message"}, both headers, and the server keeps serving


def _cnn_json(x: np.ndarray) -> bytes:
    return as_json(predict_request({"input": x}))


SHORT_TENSOR = predict_pb2.PredictRequest(
    inputs={"input": TensorProto(data_type=TensorProto.FLOAT, dims=[2, 1, 8, 8], raw_data=b"\0" * 12)}
)
BAD = {
    "unknown model": ("/v1/models/nope/versions/1:predict", JSON, _cnn_json, 404, ["no model 'nope'"]),
    "unknown version": ("/v1/models/default/versions/7:predict", JSON, _cnn_json, 404, ["no version '7'", "it has 1"]),
    "negative version": ("/v1/models/default/versions/-1:predict", JSON, _cnn_json, 404, ["no version '-1'"]),
    "bad JSON": ("/v1/models/default/versions/1:predict", JSON, lambda x: b'{"inputs": ', 400, ["not valid JSON"]),
    "JSON not an object": ("/v1/models/default/versions/1:predict", JSON, lambda x: b"[1, 2]", 400, ["an array"]),
    "unknown field": ("/v1/models/default/versions/1:predict", JSON, lambda x: b'{"instances": [[1]]}', 400,
                      ['no field named "instances"', "PredictRequest"]),  # fmt: skip
    "bad TensorProto (JSON)": (
        "/v1/models/default/versions/1:predict", JSON,
        lambda x: b'{"inputs": {"input": {"dims": ["2", "1", "8", "8"], "dataType": 1, "rawData": "AAAA"}}}',
        400, ["'input'", "onnx.TensorProto"],
    ),  # fmt: skip
    "bad TensorProto (binary)": ("/v1/models/default/versions/1:predict", PROTOBUF[0],
                                 lambda x: SHORT_TENSOR.SerializeToString(), 400, ["'input'", "onnx.TensorProto"]),
    "not protobuf": ("/v1/models/default/versions/1:predict", PROTOBUF[2], lambda x: b"\xff\xff\xff\xff", 400,
                     ["binary onnxruntime.server.PredictRequest"]),  # fmt: skip
    "wrong content type": ("/v1/models/default/versions/1:predict", "text/plain", _cnn_json, 415,
                           ["'text/plain'", JSON, *PROTOBUF]),  # fmt: skip
    "no content type": ("/v1/models/default/versions/1:predict", None, _cnn_json, 415, ["no Content-Type", JSON]),
    "wrong input name": ("/v1/models/default/versions/1:predict", JSON,
                         lambda x: as_json(predict_request({"image": x})), 400, ["'input'", "'image'"]),
}


@pytest.mark.parametrize("case", BAD)
def test_bad_requests(file_url, cnn_expected, case):
    base, _ = file_url
    path, content_type, body, status, fragments = BAD[case]
    answer = post(base, path, body(cnn_expected[0]), content_type, x_ms_client_request_id=f"case {case}")
    assert answer.status_code == status, answer.text
    assert answer.headers["content-type"] == JSON
    assert answer.headers["x-ms-client-request-id"] == f"case {case}"
    uuid.UUID(answer.headers["x-ms-request-id"])
    error = answer.json()
    assert set(error) == {"error_code", "error_message"} and error["error_code"] == status
    for fragment in fragments:
        assert fragment in error["error_message"]
    assert_serves_cnn(base, cnn_expected)


def test_unacceptable_accept(file_url, cnn_expected):
    base, _ = file_url
    answer = post(base, "/v1/models/default/versions/1:predict", _cnn_json(cnn_expected[0]), accept="text/html")
    assert answer.status_code == 400 and answer.headers["x-ms-request-id"]
    assert "'text/html'" in answer.json()["error_message"] and JSON in answer.json()["error_message"]
    assert_serves_cnn(base, cnn_expected)


def test_unknown_action_lists_the_route(file_url):
    answer = post(file_url[0], "/v1/models/default/versions/1:explain", b"{}")
    assert answer.status_code == 404 and "/v1/models/{name}[/versions/{version}]:predict" in answer.json()["error"]


# --------------------------------------------------------------------------------------------------
# Clients written for the old server


def test_old_servers_own_integration_client(file_url, cnn_expected):
    """As onnxruntime/test/server/integration_tests/function_tests.py posted JSON with `requests`."""
    base, _ = file_url
    x, want = cnn_expected
    request_headers = {"Content-Type": "application/json", "Accept": "application/json",
                       "x-ms-client-request-id": "This~is~my~id"}  # fmt: skip
    url = "http://{0}/v1/models/{1}/versions/{2}:predict".format(base.removeprefix("http://"), "default", 1)
    r = requests.post(url, headers=request_headers, data=json_format.MessageToJson(predict_request({"input": x})))
    assert r.status_code == 200
    assert r.headers.get("Content-Type") == "application/json"
    assert r.headers.get("x-ms-request-id")
    assert r.headers.get("x-ms-client-request-id") == "This~is~my~id"
    output = r.json()["outputs"]["logits"]
    assert output["dims"] == ["3", "10"] and output["dataType"] == 1
    np.testing.assert_array_equal(np.frombuffer(base64.b64decode(output["rawData"]), np.float32), want.ravel())


def test_json_in_binary_out_client(file_url, cnn_expected):
    """The clients of the old server's tutorials: JSON (MessageToJson) in, no Accept, the answer parsed as binary."""
    base, _ = file_url
    x, want = cnn_expected
    message_data = json_format.MessageToDict(predict_request({"input": x}))
    response = requests.post(f"{base}/v1/models/default/versions/1:predict",
                             headers={"Content-Type": "application/json"}, json=message_data)  # fmt: skip
    response_message = predict_pb2.PredictResponse()
    response_message.ParseFromString(response.content)
    output = np.frombuffer(response_message.outputs["logits"].raw_data, dtype=np.float32)
    np.testing.assert_array_equal(output, want.ravel())
