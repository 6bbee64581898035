"""The Open Inference Protocol over HTTP/REST (ortserve.server.rest): real servers, real HTTP.

httpx for the protocol by hand (JSON and the binary tensor data extension), tritonclient.http unchanged, the
bad-request table of test_bad_input replayed over REST, REST and gRPC side by side on one batching server, and
`python -m ortserve serve` announcing its REST endpoint and draining REST calls on SIGTERM.
"""

from __future__ import annotations

import asyncio
import gzip
import json
import signal
import socket
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import grpc
import httpx
import numpy as np
import onnxruntime as ort
import pytest
import server_models
import tritonclient.http as triton_http
from google.protobuf import json_format
from server_models import digits_inputs, sample
from test_bad_input import CASES  # the gRPC bad-request table: each case is replayed over REST below

from ortserve._proto import grpc_service_pb2 as pb
from ortserve.client import AsyncInferenceClient
from ortserve.server import codec, dataplane
from ortserve.server.app import BackgroundServer, ServerOptions
from ortserve.server.cli import ServerProcess
from ortserve.yardsticks import YardstickProcess
from ortserve.zoo import DEFAULT_REPOSITORY_MODELS

A = np.arange(8, dtype=np.float32).reshape(2, 4)
HEADER = "Inference-Header-Content-Length"
HTTP_STATUS = {grpc.StatusCode.INVALID_ARGUMENT: 400, grpc.StatusCode.NOT_FOUND: 404, grpc.StatusCode.INTERNAL: 500}


@pytest.fixture(scope="module")
def http(rest_url):
    with httpx.Client(base_url=rest_url, timeout=60) as c:
        yield c


def tensor(name: str, array: np.ndarray, **fields) -> dict:
    return {"name": name, "shape": list(array.shape), "datatype": codec.datatype_of(array.dtype),
            "data": array.reshape(-1).tolist(), **fields}  # fmt: skip


def add_sub_json(a: np.ndarray = A, b: np.ndarray | None = None) -> dict:
    return {"inputs": [tensor("a", a), tensor("b", np.ones_like(a) if b is None else b)]}


def binary_body(request: dict, raw: list[bytes]) -> tuple[dict[str, str], bytes]:
    """(headers, body) of a request whose inputs' bytes follow the JSON header (the binary data extension)."""
    header = json.dumps(request).encode()
    return {HEADER: str(len(header))}, header + b"".join(raw)


def outputs_of(response: httpx.Response) -> dict[str, np.ndarray]:
    """The answer's tensors, JSON or binary, as numpy (the client side of codec's REST form)."""
    assert response.status_code == 200, response.text
    length = response.headers.get(HEADER)
    content = response.content
    answer = json.loads(content if length is None else content[: int(length)])
    binary = memoryview(content)[int(length) :] if length is not None else memoryview(b"")
    arrays, offset = {}, 0
    for out in answer["outputs"]:
        size = out.get("parameters", {}).get("binary_data_size")
        if size is None:
            dtype = codec.lookup(out["datatype"]).dtype
            data = [s.encode() for s in out["data"]] if out["datatype"] == "BYTES" else out["data"]
            arrays[out["name"]] = np.array(data, dtype=dtype).reshape(out["shape"])
        else:
            arrays[out["name"]] = codec.from_raw(out["datatype"], out["shape"], binary[offset : offset + size], "out")
            offset += size
    assert offset == len(binary)
    return arrays


def assert_still_serving(http: httpx.Client) -> None:
    answer = outputs_of(http.post("/v2/models/add_sub/infer", json=add_sub_json()))
    np.testing.assert_array_equal(answer["sum"], A + 1)
    np.testing.assert_array_equal(answer["difference"], A - 1)


def assert_error(response: httpx.Response, status: int, *words: str) -> None:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/json"
    message = response.json()["error"]
    for word in words:
        assert word in message, message


# --------------------------------------------------------------------------------------------------
# Health and metadata


def test_live_and_ready(http):
    live, ready = http.get("/v2/health/live"), http.get("/v2/health/ready")
    assert (live.status_code, live.json()) == (200, {"live": True})
    assert (ready.status_code, ready.json()) == (200, {"ready": True})


def test_server_metadata(http):
    answer = http.get("/v2")
    assert answer.status_code == 200
    assert answer.json()["name"] == "ortserve" and answer.json()["extensions"] == list(dataplane.EXTENSIONS)


@pytest.mark.parametrize("path, version", [("add_sub", ""), ("versioned", ""), ("versioned", "2"), ("shout", ""),
                                           ("digits_forest", "1")])  # fmt: skip
def test_model_metadata_equals_grpc(http, v2_stub, path, version):
    url = f"/v2/models/{path}" + (f"/versions/{version}" if version else "")
    over_rest = http.get(url)
    assert over_rest.status_code == 200
    message = v2_stub.ModelMetadata(pb.ModelMetadataRequest(name=path, version=version), timeout=60)
    over_grpc = json_format.MessageToDict(message, preserving_proto_field_name=True)
    for tensor_list in ("inputs", "outputs"):  # MessageToDict writes int64 as strings
        for t in over_grpc[tensor_list]:
            t["shape"] = [int(d) for d in t.get("shape", [])]
    assert over_rest.json() == over_grpc


def test_model_metadata_values(http):
    meta = http.get("/v2/models/add_sub").json()
    assert meta["platform"] == "onnx_onnxv1" and meta["versions"] == ["1"]
    assert meta["inputs"] == [{"name": "a", "datatype": "FP32", "shape": [-1, 4]},
                              {"name": "b", "datatype": "FP32", "shape": [-1, 4]}]  # fmt: skip
    assert http.get("/v2/models/versioned").json()["versions"] == ["1", "2", "3"]


def test_model_ready(http):
    assert http.get("/v2/models/add_sub/ready").json() == {"name": "add_sub", "ready": True}
    assert http.get("/v2/models/versioned/versions/3/ready").status_code == 200
    for path, words in [("/v2/models/nope/ready", ["'nope'", "add_sub"]),
                        ("/v2/models/versioned/versions/9/ready", ["no version '9'", "1, 2, 3"])]:  # fmt: skip
        answer = http.get(path)
        assert answer.status_code == 400 and answer.json()["ready"] is False
        for word in words:
            assert word in answer.json()["error"]


def test_unknown_model_and_version_metadata_are_404(http):
    assert_error(http.get("/v2/models/nope"), 404, "'nope'", "add_sub")
    assert_error(http.get("/v2/models/versioned/versions/7"), 404, "no version '7'", "1, 2, 3")
    assert_still_serving(http)


@pytest.mark.parametrize("method, path, allowed", [("GET", "/v2/models/add_sub/infer", "POST"),
                                                   ("POST", "/v2/health/live", "GET"),
                                                   ("DELETE", "/v2/models/add_sub", "GET"),
                                                   ("PUT", "/v2", "GET")])  # fmt: skip
def test_wrong_method_is_405(http, method, path, allowed):
    answer = http.request(method, path)
    assert_error(answer, 405, method, path, f"use {allowed}")
    assert answer.headers["allow"] == allowed
    assert_still_serving(http)


def test_unknown_route_is_404(http):
    assert_error(http.get("/v2/modelz/add_sub"), 404, "no route GET /v2/modelz/add_sub", "/v2/models/{name}")
    assert_error(http.post("/v1/models/add_sub:explain", json={}), 404, "no route POST")  # :predict is a route
    assert_still_serving(http)


# --------------------------------------------------------------------------------------------------
# Inference over httpx: JSON, nested JSON, binary data


def test_infer_json_with_id_and_requested_output(http):
    request = {"id": "r-1", **add_sub_json(A, 2 * A), "outputs": [{"name": "difference"}]}
    answer = http.post("/v2/models/add_sub/infer", json=request)
    body = answer.json()
    assert (body["model_name"], body["model_version"], body["id"]) == ("add_sub", "1", "r-1")
    assert [o["name"] for o in body["outputs"]] == ["difference"]
    assert body["outputs"][0] == {"name": "difference", "datatype": "FP32", "shape": [2, 4],
                                  "data": (A - 2 * A).reshape(-1).tolist()}  # fmt: skip
    assert HEADER not in answer.headers


def test_infer_nested_data(http):
    request = {"inputs": [{"name": "a", "shape": [2, 4], "datatype": "FP32", "data": A.tolist()},
                          {"name": "b", "shape": [2, 4], "datatype": "FP32", "data": A.reshape(-1).tolist()}]}  # fmt: skip
    np.testing.assert_array_equal(outputs_of(http.post("/v2/models/add_sub/infer", json=request))["sum"], 2 * A)


@pytest.mark.parametrize("version, added", [("1", 100.0), ("2", 200.0), ("3", 300.0), ("", 300.0)])
def test_infer_versions(http, version, added):
    path = "/v2/models/versioned" + (f"/versions/{version}" if version else "") + "/infer"
    answer = http.post(path, json={"inputs": [tensor("x", np.array([1.0, 2.0], np.float32))]})
    assert answer.json()["model_version"] == (version or "3")
    np.testing.assert_array_equal(outputs_of(answer)["y"], [1 + added, 2 + added])


@pytest.mark.parametrize("datatype", list(server_models.ECHO_TYPES))
@pytest.mark.parametrize("form", ["json", "binary"])
def test_every_datatype_round_trips(http, datatype, form):
    array = sample(datatype)
    if form == "json":
        data = [b.decode() for b in array.reshape(-1)] if datatype == "BYTES" else array.reshape(-1).tolist()
        request = {"inputs": [{"name": "x", "shape": [2, 3], "datatype": datatype, "data": data}]}
        answer = http.post(f"/v2/models/echo_{datatype.lower()}/infer", json=request)
    else:
        _, shape, raw = codec.to_raw(array)
        request = {"inputs": [{"name": "x", "shape": shape, "datatype": datatype,
                               "parameters": {"binary_data_size": len(raw)}}],
                   "parameters": {"binary_data_output": True}}  # fmt: skip
        headers, body = binary_body(request, [raw])
        answer = http.post(f"/v2/models/echo_{datatype.lower()}/infer", content=body, headers=headers)
        assert answer.headers["content-type"] == "application/octet-stream"
        assert answer.json is not None and int(answer.headers[HEADER]) < len(answer.content)
    out = outputs_of(answer)["y"]
    assert out.dtype == array.dtype and out.tolist() == array.tolist()


def test_binary_and_json_outputs_in_one_answer(http):
    request = {**add_sub_json(A, A),
               "outputs": [{"name": "sum", "parameters": {"binary_data": True}}, {"name": "difference"}]}  # fmt: skip
    answer = http.post("/v2/models/add_sub/infer", json=request)
    length = int(answer.headers[HEADER])
    header = json.loads(answer.content[:length])
    assert header["outputs"][0]["parameters"] == {"binary_data_size": 32} and "data" not in header["outputs"][0]
    assert header["outputs"][1]["data"] == [0.0] * 8
    assert answer.content[length:] == (2 * A).tobytes()


def test_bytes_json_decode_like_the_grpc_codec(http):
    """JSON strings become the object array of bytes that the raw (gRPC) form gives, and answer alike."""
    words = np.array(["a", "été", "", "tab\tnew\nline"], dtype=object)
    via_json = codec.from_json("BYTES", [4], list(words), "input 'text'")
    via_raw = codec.from_raw("BYTES", [4], codec.serialize_bytes(words), "input 'text'")
    assert via_json.dtype == via_raw.dtype == object and via_json.tolist() == via_raw.tolist()
    assert all(type(item) is bytes for item in via_json)
    request = {"inputs": [{"name": "text", "shape": [4], "datatype": "BYTES", "data": list(words)}]}
    answer = http.post("/v2/models/shout/infer", json=request).json()
    assert answer["outputs"][0]["data"] == [w + "!" for w in words]


def test_compressed_request_body(http):
    body = gzip.compress(json.dumps(add_sub_json(A, A)).encode())
    answer = http.post("/v2/models/add_sub/infer", content=body, headers={"Content-Encoding": "gzip"})
    np.testing.assert_array_equal(outputs_of(answer)["sum"], 2 * A)


@pytest.mark.parametrize("name", DEFAULT_REPOSITORY_MODELS)
def test_json_answers_equal_grpc_for_digits(http, client, name):
    x = digits_inputs(name, 8)
    over_rest = outputs_of(http.post(f"/v2/models/{name}/infer", json={"inputs": [tensor("input", x)]}))
    over_grpc = client.infer(name, x)
    assert set(over_rest) == set(over_grpc)
    for output, want in over_grpc.items():
        assert over_rest[output].dtype == want.dtype
        np.testing.assert_array_equal(over_rest[output], want, err_msg=f"{name}.{output}")


# --------------------------------------------------------------------------------------------------
# tritonclient.http, unchanged


@pytest.fixture(scope="module")
def triton(server):
    client = triton_http.InferenceServerClient(url=server.http_address, network_timeout=60)
    yield client
    client.close()


def test_triton_health_and_metadata(triton):
    assert triton.is_server_live() and triton.is_server_ready()
    assert triton.is_model_ready("add_sub") and triton.is_model_ready("versioned", "2")
    assert not triton.is_model_ready("no_such_model") and not triton.is_model_ready("versioned", "9")
    assert triton.get_server_metadata()["name"] == "ortserve"
    meta = triton.get_model_metadata("add_sub")
    assert [(t["name"], t["datatype"], t["shape"]) for t in meta["inputs"]] == [("a", "FP32", [-1, 4]),
                                                                                ("b", "FP32", [-1, 4])]  # fmt: skip
    assert triton.get_model_metadata("versioned", "2")["versions"] == ["1", "2", "3"]
    with pytest.raises(triton_http.InferenceServerException) as caught:
        triton.get_model_metadata("nope")
    assert caught.value.status() == "404" and "'nope'" in caught.value.message()


@pytest.mark.parametrize("binary", [True, False])
def test_triton_infer_with_requested_output(triton, binary):
    a = np.arange(12, dtype=np.float32).reshape(3, 4)
    inputs = [triton_http.InferInput("a", [3, 4], "FP32"), triton_http.InferInput("b", [3, 4], "FP32")]
    inputs[0].set_data_from_numpy(a, binary_data=binary)
    inputs[1].set_data_from_numpy(np.ones_like(a), binary_data=binary)
    outputs = [triton_http.InferRequestedOutput("sum", binary_data=binary)]
    result = triton.infer("add_sub", inputs, outputs=outputs, request_id="t1")
    np.testing.assert_array_equal(result.as_numpy("sum"), a + 1)
    assert result.as_numpy("difference") is None
    assert result.get_response()["id"] == "t1"


@pytest.mark.parametrize("datatype", ["BOOL", "UINT8", "INT16", "UINT64", "INT64", "FP16", "FP64", "BYTES"])
@pytest.mark.parametrize("binary", [True, False])
def test_triton_infer_datatypes(triton, datatype, binary):
    array = sample(datatype)
    tensor_in = triton_http.InferInput("x", list(array.shape), datatype)
    tensor_in.set_data_from_numpy(array, binary_data=binary)
    out = triton.infer(f"echo_{datatype.lower()}", [tensor_in],
                       outputs=[triton_http.InferRequestedOutput("y", binary_data=binary)]).as_numpy("y")  # fmt: skip
    if datatype == "BYTES" and not binary:  # JSON strings come back as str
        out = np.vectorize(str.encode, otypes=[object])(out)
    assert out.tolist() == array.tolist()


def test_triton_error_carries_status_and_message(triton):
    tensor_in = triton_http.InferInput("x", [4], "FP32")
    tensor_in.set_data_from_numpy(np.zeros(4, np.float32))
    with pytest.raises(triton_http.InferenceServerException) as caught:
        triton.infer("broken", [tensor_in])
    assert caught.value.status() == "500" and "Reshape" in caught.value.message()
    wrong = triton_http.InferInput("x", [1, 3], "FP64")
    wrong.set_data_from_numpy(np.zeros((1, 3)))
    with pytest.raises(triton_http.InferenceServerException) as caught:
        triton.infer("echo_fp32", [wrong])
    assert caught.value.status() == "400" and "expected dtype float32, got float64" in caught.value.message()


@pytest.mark.parametrize("name", DEFAULT_REPOSITORY_MODELS)
@pytest.mark.parametrize("binary", [True, False])
def test_triton_digits_match_onnxruntime(triton, ort_session, repository, name, binary):
    x = digits_inputs(name)
    session = ort_session(repository / name / "1" / "model.onnx")
    expected = dict(zip([o.name for o in session.get_outputs()], session.run(None, {"input": x})))
    tensor_in = triton_http.InferInput("input", list(x.shape), "FP32")
    tensor_in.set_data_from_numpy(x, binary_data=binary)
    outputs = [triton_http.InferRequestedOutput(o, binary_data=binary) for o in expected]
    result = triton.infer(name, [tensor_in], outputs=outputs)
    for output, want in expected.items():
        np.testing.assert_array_equal(result.as_numpy(output), want)


def test_triton_infer_without_named_outputs_gets_all_as_binary(triton):
    """tritonclient asks for binary_data_output when it names no outputs."""
    inputs = [triton_http.InferInput("a", [2, 4], "FP32"), triton_http.InferInput("b", [2, 4], "FP32")]
    inputs[0].set_data_from_numpy(A)
    inputs[1].set_data_from_numpy(A)
    result = triton.infer("add_sub", inputs)
    assert all("binary_data_size" in o["parameters"] for o in result.get_response()["outputs"])
    np.testing.assert_array_equal(result.as_numpy("difference"), np.zeros_like(A))


# --------------------------------------------------------------------------------------------------
# Bad input: test_bad_input's table over REST, then the HTTP form's own


def rest_form(request: pb.ModelInferRequest) -> tuple[str, dict[str, str], bytes]:
    """A ModelInferRequest as a REST request: typed contents as JSON data, raw contents as binary data."""
    version = f"/versions/{request.model_version}" if request.model_version else ""
    raw = list(request.raw_input_contents)
    inputs = []
    for i, t in enumerate(request.inputs):
        entry = {"name": t.name, "datatype": t.datatype, "shape": list(t.shape)}
        if t.HasField("contents"):
            ((_, values),) = t.contents.ListFields()
            entry["data"] = [v.decode() if isinstance(v, bytes) else v for v in values]
        if i < len(raw):
            entry["parameters"] = {"binary_data_size": len(raw[i])}
        inputs.append(entry)
    body = {"inputs": inputs}
    if request.outputs:
        body["outputs"] = [{"name": o.name} for o in request.outputs]
    headers, content = binary_body(body, raw[: len(inputs)])
    return f"/v2/models/{request.model_name}{version}/infer", headers, content


# Cases whose REST form fails for a reason of its own, with words the message must hold instead.
REST_WORDS = {
    "raw count": ["input 'b' has no data"],  # one binary chunk for two inputs
    "raw and typed": ["both 'data' and parameters.binary_data_size"],
    "typed count": ["2 values for shape [1, 3] (3 expected)"],
}
# Cases that are errors only in gRPC's typed contents: JSON has a single "data" for every datatype.
NOT_ERRORS_IN_JSON = {
    "typed in the wrong field": "JSON data has no per-datatype fields",
    "typed FP16": "JSON carries FP16 as numbers",
}


def test_the_case_lists_name_real_cases():
    assert set(REST_WORDS) <= set(CASES) and set(NOT_ERRORS_IN_JSON) <= set(CASES)


@pytest.mark.parametrize("case", [c for c in CASES if c not in NOT_ERRORS_IN_JSON])
def test_grpc_bad_request_table_over_rest(http, case):
    request, code, words = CASES[case]
    path, headers, body = rest_form(request)
    assert_error(http.post(path, content=body, headers=headers), HTTP_STATUS[code], *REST_WORDS.get(case, words))
    assert_still_serving(http)


def good_with(**changes) -> dict:
    request = add_sub_json()
    request["inputs"][1].update(changes)
    return request


def case(request, status: int, *words: str, model: str = "add_sub") -> tuple:
    """A bad request to `model`: a JSON-able object, or (headers, body bytes); its status; words its message holds."""
    return model, request, status, words


def one_input(datatype: str, data: list, model: str, name: str = "x") -> dict:
    return {"inputs": [{"name": name, "shape": [len(data)] if model == "shout" else [1, len(data)],
                        "datatype": datatype, "data": data}]}  # fmt: skip


HTTP_CASES = {
    "invalid JSON": case(({}, b'{"inputs": ['), 400, "not valid JSON"),
    "JSON not an object": case([1, 2], 400, "must be a JSON object", "got an array"),
    "no inputs": case({}, 400, "has no 'inputs'", "expected an array"),
    "inputs not an array": case({"inputs": {"a": 1}}, 400, "'inputs' must be an array, got an object"),
    "input not an object": case({"inputs": [1]}, 400, "inputs[0] must be an object", "got a number"),
    "input without name": case({"inputs": [{"shape": [1], "datatype": "FP32", "data": [1]}]}, 400,
                               "inputs[0] has no 'name'"),
    "name not a string": case(good_with(name=5), 400, "'name' must be a string, got a number: 5"),
    "no datatype": case({"inputs": [{"name": "a", "shape": [2, 4], "data": [0] * 8}]}, 400,
                        "input 'a' has no 'datatype'"),
    "shape not an array": case(good_with(shape="2,4"), 400, "'shape' must be an array, got a string"),
    "shape of strings": case(good_with(shape=[2, "4"]), 400, "'shape' must be an array of integers", '[2, "4"]'),
    "data not an array": case(good_with(data="12345678"), 400, "'data' must be an array", "got a string"),
    "too few values": case(good_with(data=[0.0] * 7), 400, "input 'b': 7 values for shape [2, 4] (8 expected)"),
    "too many values": case(good_with(data=[0.0] * 9), 400, "9 values for shape [2, 4] (8 expected)"),
    "nested other than the shape": case(good_with(data=[[1, 2], [3, 4], [5, 6], [7, 8]]), 400,
                                        "nested as [4, 2]", "not the shape [2, 4]"),
    "nested unevenly": case(good_with(data=[[1, 2, 3, 4], [5, 6, 7]]), 400, "nested unevenly"),
    "string among numbers": case(good_with(data=[1, 2, 3, "4", 5, 6, 7, 8]), 400, 'FP32 data must be numbers, got "4"'),
    "boolean among numbers": case(good_with(data=[1, 2, 3, True, 5, 6, 7, 8]), 400, "must be numbers, got true"),
    "null among numbers": case(good_with(data=[1, 2, 3, None, 5, 6, 7, 8]), 400, "must be numbers, got null"),
    "number too large for FP32": case(good_with(data=[1e39] + [0] * 7), 400, "1e+39 does not fit FP32"),
    "fraction for an integer": case(one_input("INT32", [1, 2.5, 3], "echo_int32"), 400,
                                    "INT32 data must be integers, got 2.5", model="echo_int32"),
    "number for a boolean": case(one_input("BOOL", [1, 0, 1], "echo_bool"), 400, "BOOL data must be true/false, got 1",
                                 model="echo_bool"),
    "negative for unsigned": case(one_input("UINT8", [1, -1, 3], "echo_uint8"), 400,
                                  "value -1 does not fit UINT8 (0 to 255)", model="echo_uint8"),
    "number for BYTES": case(one_input("BYTES", [7], "shout", name="text"), 400, "BYTES data must be strings, got 7",
                             model="shout"),
    "id not a string": case({"id": 5, **add_sub_json()}, 400, "'id' must be a string, got a number"),
    "parameters not an object": case({"parameters": [], **add_sub_json()}, 400, "'parameters' must be an object"),
    "outputs not an array": case({**add_sub_json(), "outputs": "sum"}, 400, "'outputs' must be an array"),
    "output without name": case({**add_sub_json(), "outputs": [{}]}, 400, "outputs[0] has no 'name'"),
    "binary_data not a boolean": case({**add_sub_json(), "outputs": [{"name": "sum", "parameters": {"binary_data": 1}}]},
                                      400, "binary_data must be true or false, got a number"),
    "binary_data_output not a boolean": case({**add_sub_json(), "parameters": {"binary_data_output": "yes"}}, 400,
                                             "binary_data_output must be true or false, got a string"),
    "classification not a count": case({**add_sub_json(), "outputs": [{"name": "sum",
                                                                        "parameters": {"classification": "2"}}]},
                                       400, "classification must be a whole number of classes, got a string"),
    "shared memory asked": case(good_with(data=None, parameters={"shared_memory_region": "r"}), 400,
                                "shared memory is not supported"),
    "binary_data_size past the end": case(binary_body(good_with(data=None, parameters={"binary_data_size": 40}),
                                                      [A.tobytes()]), 400,
                                          "binary_data_size 40 runs past the end", "only 32 bytes"),
    "binary data left over": case(binary_body(good_with(data=None, parameters={"binary_data_size": 32}),
                                              [A.tobytes(), b"\0" * 4]), 400,
                                  "36 bytes of binary data", "add up to 32"),
    "binary_data_size not a count": case(binary_body(good_with(data=None, parameters={"binary_data_size": -4}), []),
                                         400, "binary_data_size must be a byte count", "-4"),
    "binary data without the header": case(({}, json.dumps(good_with(data=None, parameters={"binary_data_size": 32}))
                                            .encode() + A.tobytes()), 400, "not valid JSON", HEADER),
    "header length past the body": case(({HEADER: "999"}, json.dumps(add_sub_json()).encode()), 400,
                                        f"{HEADER} is 999 but the body has only"),
    "header length not a number": case(({HEADER: "ten"}, json.dumps(add_sub_json()).encode()), 400,
                                       "must be the JSON header's length", "'ten'"),
    "unknown content encoding": case(({"Content-Encoding": "br"}, json.dumps(add_sub_json()).encode()), 400,
                                     "Content-Encoding 'br' is not supported"),
    "corrupt gzip": case(({"Content-Encoding": "gzip"}, b"not gzip at all"), 400, "not valid gzip data"),
}  # fmt: skip


@pytest.mark.parametrize("name", list(HTTP_CASES))
def test_http_bad_request_then_good_request(http, name):
    model, request, status, words = HTTP_CASES[name]
    headers, body = request if isinstance(request, tuple) else ({}, json.dumps(request).encode())
    assert_error(http.post(f"/v2/models/{model}/infer", content=body, headers=headers), status, *words)
    assert_still_serving(http)


@pytest.fixture(scope="module")
def one_mib_server(tmp_path_factory, repository):
    """REST with messages of 1 MiB at most, serving echo_fp32 and shout."""
    listing = {"model_config_list": [{"name": n, "base_path": str(repository / n)} for n in ("echo_fp32", "shout")]}
    config = tmp_path_factory.mktemp("one_mib_rest") / "models.json"
    config.write_text(json.dumps(listing))
    options = ServerOptions(port=0, http_port=0, max_message_bytes=1024 * 1024)
    with BackgroundServer(config, options) as running, httpx.Client(base_url=f"http://{running.http_address}",
                                                                    timeout=60) as c:  # fmt: skip
        yield c


def echo_binary(x: np.ndarray) -> tuple[dict[str, str], bytes]:
    raw = x.tobytes()
    request = {"inputs": [{"name": "x", "shape": list(x.shape), "datatype": "FP32",
                           "parameters": {"binary_data_size": len(raw)}}],
               "parameters": {"binary_data_output": True}}  # fmt: skip
    return binary_body(request, [raw])


def test_request_over_the_limit_is_413(one_mib_server):
    headers, body = echo_binary(np.zeros((2 * 1024 * 1024 // 12 + 1, 3), np.float32))
    assert_error(one_mib_server.post("/v2/models/echo_fp32/infer", content=body, headers=headers), 413,
                 f"has {len(body)} bytes", "at most 1048576")  # fmt: skip
    bomb = gzip.compress(json.dumps({"inputs": [], "pad": " " * (2 * 1024 * 1024)}).encode())
    assert_error(one_mib_server.post("/v2/models/echo_fp32/infer", content=bomb, headers={"Content-Encoding": "gzip"}),
                 413, "decompressed request body is over 1048576")  # fmt: skip
    small = np.ones((10, 3), np.float32)
    headers, body = echo_binary(small)
    np.testing.assert_array_equal(outputs_of(one_mib_server.post("/v2/models/echo_fp32/infer", content=body,
                                                                 headers=headers))["y"], small)  # fmt: skip


def test_answer_over_the_limit_is_413(one_mib_server):
    """The request fits (binary, 5 bytes an element), the JSON answer does not."""
    text = ["x"] * 120_000
    raw = codec.serialize_bytes(np.array(text, dtype=object))
    request = {"inputs": [{"name": "text", "shape": [len(text)], "datatype": "BYTES",
                           "parameters": {"binary_data_size": len(raw)}}]}  # fmt: skip
    headers, body = binary_body(request, [raw])
    assert_error(one_mib_server.post("/v2/models/shout/infer", content=body, headers=headers), 413,
                 "the answer would be", "at most 1048576")  # fmt: skip
    answer = one_mib_server.post("/v2/models/shout/infer", json={"inputs": [
        {"name": "text", "shape": [2], "datatype": "BYTES", "data": ["a", "b"]}]})  # fmt: skip
    assert outputs_of(answer)["shout"].tolist() == [b"a!", b"b!"]


# --------------------------------------------------------------------------------------------------
# REST and gRPC together on one batching server


N_REST = 100


def test_100_rest_requests_mixed_with_grpc(server, repository, ort_session):
    rng = np.random.default_rng(11)
    cnn = ort_session(repository / "digits_cnn" / "1" / "model.onnx")
    jobs = []
    for i in range(N_REST + N_REST // 2):
        x = rng.random((int(rng.integers(1, 9)), 1, 8, 8), dtype=np.float32)
        over = "grpc" if i >= N_REST else ("binary" if i % 2 else "json")
        jobs.append((over, x, cnn.run(None, {"input": x})[0]))
        a, b = rng.random((int(rng.integers(1, 5)), 4), dtype=np.float32), rng.random((1, 4), dtype=np.float32)
        jobs.append((over, (a, np.repeat(b, len(a), axis=0)), None))

    async def call(http: httpx.AsyncClient, grpc_client: AsyncInferenceClient, over: str, x) -> dict[str, np.ndarray]:
        model = "add_sub" if isinstance(x, tuple) else "digits_cnn"
        inputs = {"a": x[0], "b": x[1]} if model == "add_sub" else {"input": x}
        if over == "grpc":
            return await grpc_client.infer(model, inputs)
        if over == "json":
            response = await http.post(f"/v2/models/{model}/infer",
                                       json={"inputs": [tensor(n, v) for n, v in inputs.items()]})  # fmt: skip
        else:
            raws = [v.tobytes() for v in inputs.values()]
            request = {"inputs": [{"name": n, "shape": list(v.shape), "datatype": "FP32",
                                   "parameters": {"binary_data_size": v.nbytes}} for n, v in inputs.items()],
                       "parameters": {"binary_data_output": True}}  # fmt: skip
            headers, body = binary_body(request, raws)
            response = await http.post(f"/v2/models/{model}/infer", content=body, headers=headers)
        return outputs_of(response)

    async def main():
        limits = httpx.Limits(max_connections=N_REST)
        async with httpx.AsyncClient(base_url=f"http://{server.http_address}", timeout=120, limits=limits) as http, \
                AsyncInferenceClient(server.address, timeout=120) as grpc_client:  # fmt: skip
            return await asyncio.gather(*(call(http, grpc_client, over, x) for over, x, _ in jobs))

    answers = asyncio.run(main())
    for (over, x, want), answer in zip(jobs, answers):
        if want is None:
            np.testing.assert_allclose(answer["sum"], x[0] + x[1], rtol=1e-6, err_msg=over)
            np.testing.assert_allclose(answer["difference"], x[0] - x[1], rtol=1e-6, err_msg=over)
        else:
            np.testing.assert_allclose(answer["logits"], want, rtol=1e-5, atol=1e-5, err_msg=over)


# --------------------------------------------------------------------------------------------------
# `python -m ortserve serve`: the endpoint line, REST off, port in use, graceful shutdown


@pytest.fixture(scope="module")
def plus_one(tmp_path_factory):
    return server_models.save(server_models.plus_constant(1.0), tmp_path_factory.mktemp("plus_one") / "m.onnx")


def test_serve_announces_its_rest_endpoint(plus_one):
    args = ["--grpc_port", "0", "--model_path", str(plus_one), "--log_level", "warning"]
    with ServerProcess(args, python=sys.executable) as server:
        given = server.args.index("--http_port")  # ServerProcess asked for any free port
        assert server.args[given + 1] == "0"
        host, port = server.endpoints["REST"].rsplit(":", 1)
        assert host == "127.0.0.1" and int(port) not in (0, server.port)
        with httpx.Client(base_url=f"http://{server.endpoints['REST']}", timeout=60) as http:
            assert http.get("/v2/health/ready").status_code == 200
            answer = http.post("/v2/models/default/infer", json={"inputs": [tensor("x", np.array([1.0], np.float32))]})
            np.testing.assert_array_equal(outputs_of(answer)["y"], [2.0])
    assert server.process.returncode == 0


def test_negative_http_port_turns_rest_off(plus_one):
    args = ["--grpc_port", "0", "--http_port", "-1", "--model_path", str(plus_one), "--log_level", "warning"]
    with ServerProcess(args, python=sys.executable) as server:
        assert "REST" not in server.endpoints and server.port > 0


def test_rest_port_in_use_exits_1(plus_one):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = subprocess.run([sys.executable, "-m", "ortserve", "serve", "--grpc_port", "0", "--http_port",
                                 str(port), "--model_path", str(plus_one)],
                                capture_output=True, text=True, timeout=120)  # fmt: skip
    assert result.returncode == 1
    assert f"cannot listen on 127.0.0.1:{port} (REST)" in result.stderr


def test_yardsticks_get_no_port_flags(tmp_path):
    """A yardstick parses only its own flags: an added --http_port would stop it before it serves."""
    reply = tmp_path / "reply.bin"
    reply.write_bytes(pb.ModelInferResponse(model_name="echo").SerializeToString())
    with YardstickProcess(["echo", "--reply", str(reply)], python=sys.executable) as echo:
        assert "--http_port" not in echo.args and echo.port > 0


@pytest.fixture(scope="module")
def slow_repository(tmp_path_factory):
    root = tmp_path_factory.mktemp("slow_rest")
    server_models.save(server_models.slow(), root / "slow" / "1" / "model.onnx")
    return root


def test_sigterm_drains_rest_calls_in_flight(slow_repository):
    n_calls = 12
    x = np.random.default_rng(0).random((64, 384), dtype=np.float32)
    session = ort.InferenceSession(str(slow_repository / "slow" / "1" / "model.onnx"), providers=["CPUExecutionProvider"])
    expected = session.run(None, {"x": x})[0]
    args = ["--grpc_port", "0", "--model_repository", str(slow_repository), "--workers", "1", "--num_threads", "1",
            "--log_level", "verbose", "--grace_period", "120"]  # fmt: skip
    server = ServerProcess(args, python=sys.executable, capture_log=True).start()
    headers, body = binary_body({"inputs": [{"name": "x", "shape": [64, 384], "datatype": "FP32",
                                             "parameters": {"binary_data_size": x.nbytes}}],
                                 "parameters": {"binary_data_output": True}}, [x.tobytes()])  # fmt: skip
    try:
        with httpx.Client(base_url=f"http://{server.endpoints['REST']}", timeout=120,
                          limits=httpx.Limits(max_connections=n_calls + 4)) as http, \
                ThreadPoolExecutor(n_calls) as pool:  # fmt: skip
            calls = [pool.submit(http.post, "/v2/models/slow/infer", content=body, headers=headers)
                     for _ in range(n_calls)]  # fmt: skip
            server.wait_for_log(rf"admitted call #{n_calls} ")  # every call has reached the server
            server.process.send_signal(signal.SIGTERM)
            while http.get("/v2/health/ready").status_code == 200:
                pass
            assert http.get("/v2/health/live").status_code == 200
            assert http.get("/v2/models/slow/ready").status_code == 400
            assert http.get("/v2/models/slow").status_code == 200  # metadata keeps answering
            assert_error(http.post("/v2/models/slow/infer", content=body, headers=headers), 503, "shutting down")
            for call in calls:
                np.testing.assert_allclose(outputs_of(call.result())["y"], expected, rtol=1e-5, atol=1e-5)
        assert server.process.wait(120) == 0
    finally:
        server.terminate()
