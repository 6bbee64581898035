"""Triton's extensions in depth, on gRPC and REST alike: classification (every kind of output, labels, clamping,
refusals), streaming (many ids, bad requests inside, closing, asyncio, metrics, a client that goes away), timeouts
and deadlines (requests not run, measured by the runs counter and the statistics), log settings (the level
really changes) and the server metadata's list of extensions. tests/server/test_triton_extensions.py has the
first-look tests of the same extensions.

One server of its own with ONE worker thread (so a request can be queued behind a slow run on purpose) and a
metrics endpoint, over copies of the digits models, echo models and a slow one, some with label files.
"""

from __future__ import annotations

import asyncio
import gc
import json
import logging
import queue
import threading
import time

import grpc
import httpx
import numpy as np
import onnx
import pytest
import server_models
import tritonclient.grpc as triton_grpc
import tritonclient.grpc.aio as triton_aio
import tritonclient.http as triton_http
from onnx import TensorProto, helper
from server_models import digits_inputs
from tritonclient.utils import InferenceServerException

from ortserve._proto import grpc_service_pb2 as pb
from ortserve._proto import grpc_service_pb2_grpc as pb_grpc
from ortserve.server import codec, dataplane
from ortserve.server.app import BackgroundServer, ServerOptions
from ortserve.server.classification import classify, read_labels
from ortserve.server.errors import InvalidInput, RepositoryError
from ortserve.server.observe import scrape_metrics

DIGIT_LABELS = [f"digit {i}" for i in range(10)]
SLOW_WIDTH = 1024  # server_models.slow(SLOW_WIDTH, 64): about 0.8 s for 1024 rows on one core of the dev machine


def rank3_echo() -> onnx.ModelProto:
    """y = x, FP32 of shape (-1, 2, 3): an output classification cannot read (rank 3)."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 2, 3])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 2, 3])
    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "rank3", [x], [y])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", server_models.OPSET)],
                             ir_version=server_models.IR_VERSION)  # fmt: skip


def write_config(folder, config: dict) -> None:
    (folder / "config.json").write_text(json.dumps(config))


@pytest.fixture(scope="module")
def ext_repository(tmp_path_factory, digits_repository):
    root = tmp_path_factory.mktemp("ext_repository")
    for name in ("digits_cnn", "digits_forest"):
        server_models.copy_version(digits_repository, root, name)
    (root / "digits_cnn" / "labels.txt").write_text("\n".join(DIGIT_LABELS) + "\n")
    write_config(root / "digits_cnn", {"output": [{"name": "logits", "label_filename": "labels.txt"}]})
    write_config(root / "digits_forest", {"max_batch_size": 0})
    for datatype in ("UINT8", "INT32", "FP16", "FP64", "BOOL", "BYTES"):
        server_models.save(server_models.echo(datatype), root / f"echo_{datatype.lower()}" / "1" / "model.onnx")
    (root / "echo_int32" / "names.txt").write_text("first\r\nsecond\r\n")  # fewer labels than classes, CRLF
    write_config(root / "echo_int32", {"output": [{"name": "y", "label_filename": "names.txt"}]})
    server_models.save(server_models.plus_constant(0.5), root / "plus_half" / "1" / "model.onnx")
    server_models.save(rank3_echo(), root / "rank3" / "1" / "model.onnx")
    server_models.save(server_models.slow(SLOW_WIDTH, 64), root / "slow" / "1" / "model.onnx")
    write_config(root / "slow", {"max_batch_size": 0})
    return root


@pytest.fixture(scope="module")
def ext_server(ext_repository):
    options = ServerOptions(port=0, http_port=0, metrics_port=0, workers=1, lone_request_threads=0)
    with BackgroundServer(ext_repository, options) as running:
        yield running


@pytest.fixture(scope="module")
def grpc_client(ext_server):
    client = triton_grpc.InferenceServerClient(ext_server.address)
    yield client
    client.close()


@pytest.fixture(scope="module")
def http_client(ext_server):
    client = triton_http.InferenceServerClient(ext_server.http_address)
    yield client
    client.close()


@pytest.fixture(scope="module")
def stub(ext_server):
    with grpc.insecure_channel(ext_server.address) as channel:
        yield pb_grpc.GRPCInferenceServiceStub(channel)


def infer_url(server, model: str) -> str:
    return f"http://{server.http_address}/v2/models/{model}/infer"


def tensors(module, inputs: dict[str, np.ndarray]) -> list:
    """tritonclient InferInputs (grpc or http `module`) holding `inputs`."""
    out = []
    for name, array in inputs.items():
        tensor = module.InferInput(name, list(array.shape), codec.datatype_of(array.dtype))
        tensor.set_data_from_numpy(array)
        out.append(tensor)
    return out


def classes_both_ways(grpc_client, http_client, model: str, inputs: dict, output: str, count: int) -> np.ndarray:
    """The classification strings over tritonclient grpc and http (checked equal), as str."""
    over_grpc = grpc_client.infer(model, tensors(triton_grpc, inputs),
                                  outputs=[triton_grpc.InferRequestedOutput(output, class_count=count)])  # fmt: skip
    over_http = http_client.infer(model, tensors(triton_http, inputs),
                                  outputs=[triton_http.InferRequestedOutput(output, class_count=count)])  # fmt: skip
    assert over_grpc.get_output(output).datatype == "BYTES"
    assert over_http.get_output(output)["datatype"] == "BYTES"
    grpc_strings, http_strings = over_grpc.as_numpy(output), over_http.as_numpy(output)
    assert grpc_strings.tolist() == http_strings.tolist()
    return np.vectorize(bytes.decode, otypes=[object])(grpc_strings)


def runs_of(server, model: str) -> int:
    """Session runs the server made for `model` (its statistics' execution_count, from the server itself)."""
    stats = httpx.get(f"http://{server.http_address}/v2/models/{model}/stats").json()
    return stats["model_stats"][0]["execution_count"]


# --------------------------------------------------------------------------------------------------
# Classification


def test_classification_of_the_digits_cnn_has_labels_and_triton_formatting(grpc_client, http_client):
    x = digits_inputs("digits_cnn", 4)
    logits = grpc_client.infer("digits_cnn", tensors(triton_grpc, {"input": x})).as_numpy("logits")
    classes = classes_both_ways(grpc_client, http_client, "digits_cnn", {"input": x}, "logits", 3)
    assert classes.shape == (4, 3)
    for row, answer in zip(logits, classes):
        best = np.argsort(-row, kind="stable")[:3]
        assert [int(a.split(":")[1]) for a in answer] == best.tolist()
        assert [a.split(":", 2)[2] for a in answer] == [DIGIT_LABELS[i] for i in best]
        value = answer[0].split(":")[0]
        assert value == f"{float(row[best[0]]):.6f}"  # six decimals: std::to_string, as Triton prints it


def test_asking_for_more_classes_than_there_are_gives_them_all(grpc_client, http_client):
    x = np.array([[5, 200, 7], [9, 9, 1]], np.uint8)  # unsigned: an order that negating would break
    classes = classes_both_ways(grpc_client, http_client, "echo_uint8", {"x": x}, "y", 10)
    assert classes.tolist() == [["200:1", "7:2", "5:0"], ["9:0", "9:1", "1:2"]]  # integers as digits; ties: lower


def test_labels_cover_the_classes_they_have_and_crlf_is_not_a_label(grpc_client, http_client):
    x = np.array([[3, -4, 10]], np.int32)
    classes = classes_both_ways(grpc_client, http_client, "echo_int32", {"x": x}, "y", 3)
    assert classes.tolist() == [["10:2", "3:0:first", "-4:1:second"]]  # no label for class 2: value:index


def test_a_rank_one_output_is_one_row(grpc_client, http_client):
    x = np.array([0.25, 2.0, -1.0, 1.0], np.float32)  # plus_half adds 0.5
    classes = classes_both_ways(grpc_client, http_client, "plus_half", {"x": x}, "y", 2)
    assert classes.tolist() == ["2.500000:1", "1.500000:3"]


@pytest.mark.parametrize("datatype", ["FP16", "FP64"])
def test_float_outputs_of_every_width_classify(grpc_client, http_client, datatype):
    x = np.array([[0.125, -3.5, 1e-7]], dtype=server_models.ECHO_TYPES[datatype][1])
    classes = classes_both_ways(grpc_client, http_client, f"echo_{datatype.lower()}", {"x": x}, "y", 2)
    assert classes.tolist() == [[f"{float(x[0, 0]):.6f}:0", f"{float(x[0, 2]):.6f}:2"]]


def test_only_the_output_asked_for_is_classified(grpc_client):
    x = digits_inputs("digits_forest", 2)
    outputs = [triton_grpc.InferRequestedOutput("probabilities", class_count=1),
               triton_grpc.InferRequestedOutput("label")]  # fmt: skip
    result = grpc_client.infer("digits_forest", tensors(triton_grpc, {"input": x}), outputs=outputs)
    labels, top = result.as_numpy("label"), result.as_numpy("probabilities")
    assert result.get_output("label").datatype == "INT64" and top.shape == (2, 1)
    assert [int(t.decode().split(":")[1]) for t in top[:, 0]] == labels.tolist()


@pytest.mark.parametrize(("model", "inputs", "expected"), [
    ("echo_bytes", {"x": np.array([[b"a", b"b", b"c"]], dtype=object)}, "holds strings"),
    ("echo_bool", {"x": np.array([[True, False, True]])}, "holds bool values"),
    ("rank3", {"x": np.zeros((1, 2, 3), np.float32)}, "has shape [1, 2, 3]"),
])  # fmt: skip
def test_outputs_that_have_no_classes_are_refused_on_both_protocols(ext_server, grpc_client, model, inputs, expected):
    with pytest.raises(InferenceServerException) as caught:
        grpc_client.infer(model, tensors(triton_grpc, inputs),
                          outputs=[triton_grpc.InferRequestedOutput("y", class_count=1)])  # fmt: skip
    assert caught.value.status() == "StatusCode.INVALID_ARGUMENT"
    assert expected in caught.value.message() and f"model {model!r} version 1 output 'y'" in caught.value.message()
    body = {"inputs": [codec.to_json(a, n) | {"name": n} for n, a in inputs.items()],
            "outputs": [{"name": "y", "parameters": {"classification": 1}}]}  # fmt: skip
    answer = httpx.post(infer_url(ext_server, model), json=body)
    assert answer.status_code == 400 and expected in answer.json()["error"]


def test_raw_grpc_and_rest_json_classification(ext_server, stub):
    x = np.array([[1.0, 3.0, 2.0]], np.float32)
    request = pb.ModelInferRequest(model_name="echo_fp64")
    codec.encode_request_inputs(request, {"x": x.astype(np.float64)})
    request.outputs.add(name="y").parameters["classification"].int64_param = 2
    response = stub.ModelInfer(request, timeout=30)
    assert response.outputs[0].datatype == "BYTES" and list(response.outputs[0].shape) == [1, 2]
    assert codec.decode_response_outputs(response)["y"].tolist() == [[b"3.000000:1", b"2.000000:2"]]
    body = {"inputs": [{"name": "x", "shape": [1, 3], "datatype": "FP64", "data": [1.0, 3.0, 2.0]}],
            "outputs": [{"name": "y", "parameters": {"classification": 2}}]}  # fmt: skip
    answer = httpx.post(infer_url(ext_server, "echo_fp64"), json=body).json()
    assert answer["outputs"] == [{"name": "y", "datatype": "BYTES", "shape": [1, 2],
                                  "data": ["3.000000:1", "2.000000:2"]}]  # fmt: skip


def test_classification_count_must_be_a_whole_number(ext_server, stub):
    request = pb.ModelInferRequest(model_name="echo_fp64")
    codec.encode_request_inputs(request, {"x": np.zeros((1, 3))})
    request.outputs.add(name="y").parameters["classification"].string_param = "two"
    with pytest.raises(grpc.RpcError) as caught:
        stub.ModelInfer(request, timeout=30)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "'two'" in caught.value.details()
    body = {"inputs": [{"name": "x", "shape": [1, 3], "datatype": "FP64", "data": [0, 0, 0]}],
            "outputs": [{"name": "y", "parameters": {"classification": 1.5}}]}  # fmt: skip
    answer = httpx.post(infer_url(ext_server, "echo_fp64"), json=body)
    assert answer.status_code == 400 and "classification must be a whole number" in answer.json()["error"]


def test_classify_and_read_labels_directly(tmp_path):
    assert classify(np.array([np.nan, 1.0, np.inf]), 3).tolist() == [b"nan:0", b"inf:2", b"1.000000:1"]
    assert classify(np.array([[1, 2]], np.int64), 0).shape == (1, 0)
    with pytest.raises(InvalidInput, match="needs numbers"):
        classify(np.array(["a"]), 1)
    (tmp_path / "l.txt").write_text("a\n\nc")  # an empty line is the empty label of class 1
    assert read_labels({"y": "l.txt"}, tmp_path) == {"y": ["a", "", "c"]}
    with pytest.raises(RepositoryError, match=str(tmp_path / "missing.txt")):
        read_labels({"y": "missing.txt"}, tmp_path)
    (tmp_path / "bad.txt").write_bytes(b"\xff\xfe")
    with pytest.raises(RepositoryError, match="bad.txt"):
        read_labels({"y": "bad.txt"}, tmp_path)


def test_a_missing_label_file_stops_the_server_naming_the_path(tmp_path):
    server_models.save(server_models.echo("FP32"), tmp_path / "m" / "1" / "model.onnx")
    write_config(tmp_path / "m", {"output": [{"name": "y", "label_filename": "nowhere.txt"}]})
    with pytest.raises(RepositoryError, match=str(tmp_path / "m" / "nowhere.txt")):
        BackgroundServer(tmp_path, ServerOptions(port=0))


# --------------------------------------------------------------------------------------------------
# Streaming


def stream_tasks(server) -> list[str]:
    """The tasks ModelStreamInfer left on the server's event loop (its readers and per-request answers)."""

    async def names() -> list[str]:
        qualnames = [getattr(t.get_coro(), "__qualname__", "") for t in asyncio.all_tasks()]
        return [name for name in qualnames if "ModelStreamInfer" in name]

    return asyncio.run_coroutine_threadsafe(names(), server._loop).result(timeout=10)


def wait_for(condition, what: str, seconds: float = 30.0) -> None:
    """Poll `condition` until it holds (a bound against hanging, not a timing claim)."""
    give_up = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < give_up, f"still waiting for {what} after {seconds} s"
        time.sleep(0.01)


@pytest.fixture
def warnings_seen():
    """WARNING and worse records of the server's, grpc's and asyncio's loggers while a test runs."""
    records: list[logging.LogRecord] = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = records.append
    loggers = [logging.getLogger(name) for name in ("ortserve", "asyncio", "grpc")]
    for logger in loggers:
        logger.addHandler(handler)
    yield records
    for logger in loggers:
        logger.removeHandler(handler)


def test_a_stream_answers_many_requests_by_id_with_their_own_values(grpc_client, ext_server):
    inputs = {f"req-{i}": digits_inputs("digits_cnn", 1 + i % 5) for i in range(24)}
    expected = {rid: grpc_client.infer("digits_cnn", tensors(triton_grpc, {"input": x})).as_numpy("logits")
                for rid, x in inputs.items()}  # fmt: skip
    bad = {"bad-model": ("nope", digits_inputs("digits_cnn", 1), "no model 'nope'"),
           "bad-shape": ("digits_cnn", np.zeros((2, 64), np.float32), "expected rank 4, got shape [2, 64]"),
           "bad-type": ("digits_cnn", np.zeros((1, 1, 8, 8), np.float64), "expected dtype float32, got float64")}
    answers: queue.Queue = queue.Queue()
    grpc_client.start_stream(callback=lambda result, error: answers.put((result, error)))
    try:
        for i, (rid, x) in enumerate(inputs.items()):
            grpc_client.async_stream_infer("digits_cnn", tensors(triton_grpc, {"input": x}), request_id=rid)
            if i in (3, 10, 17):  # bad requests between good ones
                name = list(bad)[(i - 3) // 7]
                model, array, _ = bad[name]
                grpc_client.async_stream_infer(model, tensors(triton_grpc, {"input": array}), request_id=name)
        got = [answers.get(timeout=60) for _ in range(len(inputs) + len(bad))]
    finally:
        grpc_client.stop_stream()
    results = {result.get_response().id: result for result, error in got if error is None}
    assert set(results) == set(inputs)
    for rid, result in results.items():
        np.testing.assert_allclose(result.as_numpy("logits"), expected[rid], rtol=1e-5, atol=1e-6)
    errors = sorted(str(error) for _, error in got if error is not None)
    assert len(errors) == 3
    for (_, _, message), error in zip(sorted(bad.values(), key=lambda b: b[2]), sorted(errors)):
        assert message in error
    wait_for(lambda: not stream_tasks(ext_server), "the stream's tasks to end")


def test_a_stream_can_be_closed_and_opened_again(grpc_client, ext_server, warnings_seen):
    for round_ in range(2):
        answers: queue.Queue = queue.Queue()
        grpc_client.start_stream(callback=lambda result, error: answers.put((result, error)))
        grpc_client.async_stream_infer("plus_half", tensors(triton_grpc, {"x": np.ones(3, np.float32)}),
                                       request_id=f"round-{round_}")  # fmt: skip
        result, error = answers.get(timeout=30)
        grpc_client.stop_stream()
        assert error is None and result.get_response().id == f"round-{round_}"
        assert result.as_numpy("y").tolist() == [1.5, 1.5, 1.5]
    wait_for(lambda: not stream_tasks(ext_server), "the stream's tasks to end")
    assert not warnings_seen


def test_the_asyncio_client_streams_too(ext_server):
    async def requests():
        for i in range(8):
            model = "nope" if i == 5 else "plus_half"
            yield {"model_name": model, "inputs": tensors(triton_aio, {"x": np.full(2, i, np.float32)}),
                   "request_id": f"aio-{i}"}  # fmt: skip

    async def run() -> list:
        async with triton_aio.InferenceServerClient(ext_server.address) as client:
            return [answer async for answer in client.stream_infer(requests(), stream_timeout=60)]

    got = asyncio.run(run())
    ok = {result.get_response().id: result.as_numpy("y").tolist() for result, error in got if error is None}
    assert ok == {f"aio-{i}": [i + 0.5] * 2 for i in range(8) if i != 5}
    errors = [str(error) for _, error in got if error is not None]
    assert len(errors) == 1 and "no model 'nope'" in errors[0]


def test_stream_requests_are_counted_under_protocol_grpc(ext_server, stub):
    def counts() -> dict[str, float]:
        samples = scrape_metrics(ext_server.metrics_address)["ortserve_requests_total"]
        return {dict(k)["status"]: v for k, v in samples.items()
                if dict(k)["model"] == "echo_fp64" and dict(k)["protocol"] == "grpc"}  # fmt: skip

    def requests():
        for i in range(5):
            request = pb.ModelInferRequest(model_name="echo_fp64", id=str(i))
            codec.encode_request_inputs(request, {"x": np.zeros((1, 3)) if i != 2 else np.zeros((1, 4))})
            yield request

    before = counts()
    answers = list(stub.ModelStreamInfer(requests(), timeout=30))
    after = counts()
    assert sorted(a.infer_response.id for a in answers) == ["0", "1", "2", "3", "4"]
    assert [a.infer_response.id for a in answers if a.error_message] == ["2"]
    assert after.get("OK", 0) - before.get("OK", 0) == 4
    assert after.get("INVALID_ARGUMENT", 0) - before.get("INVALID_ARGUMENT", 0) == 1


def test_a_client_that_goes_away_mid_stream_leaves_nothing_running(ext_server, warnings_seen):
    slow = ext_server.server.repository.get("slow")
    release = threading.Event()

    def requests():
        request = pb.ModelInferRequest(model_name="slow", id="long")
        codec.encode_request_inputs(request, {"x": np.ones((1024, SLOW_WIDTH), np.float32)})
        yield request
        release.wait(60)  # the client keeps its side open until it cancels

    with grpc.insecure_channel(ext_server.address) as channel:
        call = pb_grpc.GRPCInferenceServiceStub(channel).ModelStreamInfer(requests(), timeout=60)
        wait_for(lambda: slow.runner.in_flight == 1, "the slow request to reach its runner")
        assert stream_tasks(ext_server)  # the reader and the request's answer
        call.cancel()
        release.set()
        wait_for(lambda: not stream_tasks(ext_server), "the stream's tasks to end")
    wait_for(lambda: slow.runner.in_flight == 0, "the slow run to finish")
    gc.collect()  # a pending task destroyed now would log "Task was destroyed but it is pending"
    assert not warnings_seen, [r.getMessage() for r in warnings_seen]


def test_a_message_that_is_not_a_request_ends_the_stream_with_a_clear_error(ext_server, warnings_seen):
    request = pb.ModelInferRequest(model_name="plus_half", id="fine")
    codec.encode_request_inputs(request, {"x": np.ones(2, np.float32)})
    with grpc.insecure_channel(ext_server.address) as channel:
        stream = channel.stream_stream("/inference.GRPCInferenceService/ModelStreamInfer",
                                       response_deserializer=pb.ModelStreamInferResponse.FromString)  # fmt: skip
        answers = stream(iter([request.SerializeToString(), b"\xff\xff\xff"]), timeout=60)
        with pytest.raises(grpc.RpcError) as caught:
            for answer in answers:
                assert answer.infer_response.id == "fine" and not answer.error_message
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "a message on the stream is not a ModelInferRequest" in caught.value.details()
    wait_for(lambda: not stream_tasks(ext_server), "the stream's tasks to end")
    assert not warnings_seen, [r.getMessage() for r in warnings_seen]


# --------------------------------------------------------------------------------------------------
# Timeouts and deadlines


def digits_body(rows: int = 1, parameters: dict | None = None) -> dict:
    x = digits_inputs("digits_cnn", rows)
    body = {"inputs": [{"name": "input", "shape": list(x.shape), "datatype": "FP32", "data": x.ravel().tolist()}]}
    return body | ({"parameters": parameters} if parameters is not None else {})


def test_a_one_microsecond_timeout_is_not_run_by_the_batcher(ext_server, grpc_client):
    batcher = ext_server.server.repository.get("digits_cnn").runner
    runs, executions = batcher.runs, runs_of(ext_server, "digits_cnn")
    with pytest.raises(InferenceServerException) as caught:
        grpc_client.infer("digits_cnn", tensors(triton_grpc, {"input": digits_inputs("digits_cnn", 2)}), timeout=1)
    assert caught.value.status() == "StatusCode.DEADLINE_EXCEEDED" and "it was not run" in caught.value.message()
    expired = httpx.post(infer_url(ext_server, "digits_cnn"), json=digits_body(2, {"timeout": 1}))
    assert expired.status_code == 504 and "it was not run" in expired.json()["error"]
    assert (batcher.runs, runs_of(ext_server, "digits_cnn")) == (runs, executions)


def test_a_generous_timeout_runs_normally_on_both_protocols(ext_server, grpc_client):
    x = digits_inputs("digits_cnn", 2)
    plain = grpc_client.infer("digits_cnn", tensors(triton_grpc, {"input": x})).as_numpy("logits")
    timed = grpc_client.infer("digits_cnn", tensors(triton_grpc, {"input": x}), timeout=30_000_000)
    np.testing.assert_allclose(timed.as_numpy("logits"), plain, rtol=1e-5, atol=1e-6)
    answer = httpx.post(infer_url(ext_server, "digits_cnn"), json=digits_body(2, {"timeout": 30_000_000}))
    assert answer.status_code == 200
    np.testing.assert_allclose(np.array(answer.json()["outputs"][0]["data"]).reshape(2, 10), plain, rtol=1e-5,
                               atol=1e-6)  # fmt: skip
    assert httpx.post(infer_url(ext_server, "digits_cnn"), json=digits_body(1, {"timeout": 0})).status_code == 200


@pytest.mark.parametrize("value", [-5, "soon", 1.5, True])
def test_a_bad_timeout_is_refused_on_both_protocols(ext_server, stub, value):
    answer = httpx.post(infer_url(ext_server, "digits_cnn"), json=digits_body(1, {"timeout": value}))
    assert answer.status_code == 400
    assert "'timeout' must be a whole number of microseconds (0 or more)" in answer.json()["error"]
    request = pb.ModelInferRequest(model_name="digits_cnn")
    codec.encode_request_inputs(request, {"input": digits_inputs("digits_cnn", 1)})
    kind = {int: "int64_param", str: "string_param", float: "double_param", bool: "bool_param"}[type(value)]
    setattr(request.parameters["timeout"], kind, value)
    with pytest.raises(grpc.RpcError) as caught:
        stub.ModelInfer(request, timeout=30)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT and f"got {value!r}" in caught.value.details()


@pytest.fixture
def busy_slow_model(ext_server, grpc_client):
    """The one worker thread busy with a long run of the slow model; yields the model's runner."""
    slow = ext_server.server.repository.get("slow")
    wait_for(lambda: slow.runner.in_flight == 0, "the slow model to be idle")
    done: queue.Queue = queue.Queue()
    big = {"x": np.ones((1024, SLOW_WIDTH), np.float32)}
    grpc_client.async_infer("slow", tensors(triton_grpc, big), callback=lambda result, error: done.put(error))
    wait_for(lambda: slow.runner.in_flight == 1, "the long run to reach the runner")
    yield slow.runner
    assert done.get(timeout=120) is None  # the long run itself succeeds


def test_a_grpc_deadline_passing_in_the_queue_is_not_run(ext_server, grpc_client, busy_slow_model, warnings_seen):
    before = runs_of(ext_server, "slow")
    small = tensors(triton_grpc, {"x": np.ones((1, SLOW_WIDTH), np.float32)})
    with pytest.raises(InferenceServerException) as caught:
        grpc_client.infer("slow", small, client_timeout=0.05)  # queued behind the long run
    assert caught.value.status() == "StatusCode.DEADLINE_EXCEEDED"
    wait_for(lambda: busy_slow_model.in_flight == 0, "the long run to finish")
    assert runs_of(ext_server, "slow") - before == 1  # the long run only
    assert not warnings_seen, [r.getMessage() for r in warnings_seen]


def test_a_timeout_passing_in_the_queue_is_answered_by_the_server(ext_server, grpc_client, busy_slow_model,
                                                                  warnings_seen):  # fmt: skip
    before = runs_of(ext_server, "slow")
    small = {"x": np.ones((1, SLOW_WIDTH), np.float32)}
    over_grpc: queue.Queue = queue.Queue()  # no gRPC deadline: the answer is the server's own
    grpc_client.async_infer("slow", tensors(triton_grpc, small), callback=lambda result, error: over_grpc.put(error),
                            timeout=50_000)  # fmt: skip
    body = {"inputs": [{"name": "x", "shape": [1, SLOW_WIDTH], "datatype": "FP32", "data": [1.0] * SLOW_WIDTH}],
            "parameters": {"timeout": 50_000}}  # fmt: skip
    over_rest = httpx.post(infer_url(ext_server, "slow"), json=body, timeout=60)  # queued behind the long run too
    assert over_rest.status_code == 504 and "in the queue, before it could run" in over_rest.json()["error"]
    error = over_grpc.get(timeout=60)
    assert error.status() == "StatusCode.DEADLINE_EXCEEDED" and "it was not run" in error.message()
    wait_for(lambda: busy_slow_model.in_flight == 0, "the long run to finish")
    assert runs_of(ext_server, "slow") - before == 1  # the long run only
    assert not warnings_seen, [r.getMessage() for r in warnings_seen]


def test_a_timeout_inside_a_stream_is_that_request_s_error(ext_server, stub):
    def requests():
        for i, timeout in enumerate([0, 1, 0]):
            request = pb.ModelInferRequest(model_name="digits_cnn", id=str(i))
            codec.encode_request_inputs(request, {"input": digits_inputs("digits_cnn", 1)})
            if timeout:
                request.parameters["timeout"].int64_param = timeout
            yield request

    answers = {a.infer_response.id: a.error_message for a in stub.ModelStreamInfer(requests(), timeout=30)}
    assert answers["0"] == answers["2"] == "" and "it was not run" in answers["1"]


# --------------------------------------------------------------------------------------------------
# Log settings


@pytest.fixture
def server_log():
    """Every record of the "ortserve" logger while a test runs (whatever the level lets through); the logger's
    level is restored afterwards, as the in-process servers of other tests share it."""
    logger = logging.getLogger("ortserve")
    saved = logger.level
    records: list[logging.LogRecord] = []
    handler = logging.Handler(logging.NOTSET)
    handler.emit = records.append
    logger.addHandler(handler)
    yield records
    logger.removeHandler(handler)
    logger.setLevel(saved)


def grpc_settings(client) -> dict:
    """tritonclient.grpc's log settings as plain values, like REST's."""
    return {key: next(iter(value.values())) for key, value in client.get_log_settings(as_json=True)["settings"].items()}


def test_log_settings_turn_debug_lines_on_and_off(ext_server, grpc_client, http_client, server_log):
    def debug_lines() -> list[str]:
        httpx.get(f"http://{ext_server.http_address}/v2/models/no_such_model")  # a refusal logged at DEBUG
        return [r.getMessage() for r in server_log if r.levelno == logging.DEBUG and "no_such_model" in r.getMessage()]

    grpc_client.update_log_settings({"log_verbose_level": 0, "log_info": True})
    assert debug_lines() == []
    settings = http_client.update_log_settings({"log_verbose_level": 1})
    assert settings["log_verbose_level"] == 1 and grpc_settings(grpc_client) == http_client.get_log_settings()
    assert len(debug_lines()) == 1
    grpc_client.update_log_settings({"log_verbose_level": 0})
    assert len(debug_lines()) == 1 and logging.getLogger("ortserve").getEffectiveLevel() == logging.INFO
    http_client.update_log_settings({"log_info": False, "log_warning": False})
    assert http_client.get_log_settings() == {"log_file": "", "log_info": False, "log_warning": False,
                                              "log_error": True, "log_verbose_level": 0, "log_format": "default"}


@pytest.mark.parametrize(("settings", "expected"), [
    ({"log_colour": True}, "unknown log setting 'log_colour'"),
    ({"log_info": False, "log_colour": True}, "unknown log setting 'log_colour'"),  # nothing applies then
    ({"log_verbose_level": "1"}, "'log_verbose_level' must be a whole number, 0 or more, got '1'"),
    ({"log_verbose_level": -1}, "'log_verbose_level' must be a whole number, 0 or more, got -1"),
    ({"log_info": 1}, "'log_info' must be true or false, got 1"),
    ({"log_file": "/tmp/server.log"}, "log_file cannot be changed"),
    ({"log_format": "ISO8601"}, "log_format 'ISO8601' is not supported"),
])  # fmt: skip
def test_bad_log_settings_are_refused_over_rest(ext_server, server_log, settings, expected):
    before = httpx.get(f"http://{ext_server.http_address}/v2/logging").json()
    answer = httpx.post(f"http://{ext_server.http_address}/v2/logging", json=settings)
    assert answer.status_code == 400 and expected in answer.json()["error"]
    assert httpx.get(f"http://{ext_server.http_address}/v2/logging").json() == before


@pytest.mark.parametrize(("settings", "expected"), [
    ({"log_info": ("string_param", "yes")}, "'log_info' must be true or false, got 'yes'"),
    ({"log_verbose_level": ("bool_param", True)}, "'log_verbose_level' must be a whole number, 0 or more, got True"),
    ({"log_file": ("string_param", "x.log")}, "log_file cannot be changed"),
    ({"verbose": ("uint32_param", 1)}, "unknown log setting 'verbose'"),
])  # fmt: skip
def test_bad_log_settings_are_refused_over_grpc(grpc_client, stub, server_log, settings, expected):
    """Raw calls: tritonclient.grpc picks each setting's type by its name, so it cannot send a wrong one."""
    before = grpc_settings(grpc_client)
    request = pb.LogSettingsRequest()
    for key, (kind, value) in settings.items():
        setattr(request.settings[key], kind, value)
    with pytest.raises(grpc.RpcError) as caught:
        stub.LogSettings(request, timeout=30)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT and expected in caught.value.details()
    assert grpc_settings(grpc_client) == before


def test_a_log_settings_body_must_be_a_json_object(ext_server):
    answer = httpx.post(f"http://{ext_server.http_address}/v2/logging", content=b"[1, 2]")
    assert answer.status_code == 400 and "must be a JSON object, got an array" in answer.json()["error"]


# --------------------------------------------------------------------------------------------------
# Server metadata: the extensions it lists are the ones that answer


def test_every_listed_extension_answers_on_both_protocols(ext_server, grpc_client, http_client):
    listed = list(dataplane.EXTENSIONS)
    assert list(grpc_client.get_server_metadata().extensions) == listed
    assert http_client.get_server_metadata()["extensions"] == listed
    x = np.array([[1.0, 2.0, 0.0]])
    checks = {
        "binary_tensor_data": lambda: http_client.infer("echo_fp64", tensors(triton_http, {"x": x}), outputs=[
            triton_http.InferRequestedOutput("y", binary_data=True)]).as_numpy("y").tolist() == x.tolist(),
        "classification": lambda: grpc_client.infer("echo_fp64", tensors(triton_grpc, {"x": x}), outputs=[
            triton_grpc.InferRequestedOutput("y", class_count=1)]).as_numpy("y").tolist() == [[b"2.000000:1"]],
        "model_configuration": lambda: http_client.get_model_config("echo_fp64")["name"] == "echo_fp64"
        and grpc_client.get_model_config("echo_fp64").config.name == "echo_fp64",
        "model_repository": lambda: "echo_fp64" in {m["name"] for m in http_client.get_model_repository_index()}
        and "echo_fp64" in {m.name for m in grpc_client.get_model_repository_index().models},
        "statistics": lambda: http_client.get_inference_statistics("echo_fp64")["model_stats"][0]["name"]
        == grpc_client.get_inference_statistics("echo_fp64").model_stats[0].name == "echo_fp64",
        "logging": lambda: grpc_settings(grpc_client) == http_client.get_log_settings(),
    }  # fmt: skip
    assert sorted(checks) == sorted(listed)  # a new extension in the list needs its check here
    assert {name: check() for name, check in checks.items()} == dict.fromkeys(checks, True)
