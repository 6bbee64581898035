"""Triton's extensions through tritonclient (grpc and http) and raw calls: model configuration, statistics,
classification, streaming, timeouts, log settings, and the server metadata that lists them.

One server of its own over a copy of the digits CNN (batched, with a label file) and forest (batching off), so the
statistics count only this file's calls.
"""

from __future__ import annotations

import json
import logging
import queue

import grpc
import httpx
import numpy as np
import pytest
import tritonclient.grpc as triton_grpc
import tritonclient.http as triton_http
import server_models
from server_models import digits_inputs
from tritonclient.utils import InferenceServerException

from ortserve._proto import grpc_service_pb2 as pb
from ortserve._proto import grpc_service_pb2_grpc as pb_grpc
from ortserve.server import codec, dataplane
from ortserve.server.app import BackgroundServer, ServerOptions

LABELS = [f"digit {i}" for i in range(10)]


@pytest.fixture(scope="module")
def own_server(tmp_path_factory, digits_repository):
    root = tmp_path_factory.mktemp("extensions")
    for name in ("digits_cnn", "digits_forest"):
        server_models.copy_version(digits_repository, root, name)
    (root / "digits_cnn" / "labels.txt").write_text("\n".join(LABELS) + "\n")
    config = {"output": [{"name": "logits", "label_filename": "labels.txt"}], "max_queue_delay_us": 3000}
    (root / "digits_cnn" / "config.json").write_text(json.dumps(config))
    (root / "digits_forest" / "config.json").write_text(json.dumps({"max_batch_size": 0}))
    with BackgroundServer(root, ServerOptions(port=0, http_port=0)) as running:
        yield running


@pytest.fixture(scope="module")
def grpc_client(own_server):
    return triton_grpc.InferenceServerClient(own_server.address)


@pytest.fixture(scope="module")
def http_client(own_server):
    return triton_http.InferenceServerClient(own_server.http_address)


def grpc_input(x: np.ndarray) -> triton_grpc.InferInput:
    tensor = triton_grpc.InferInput("input", list(x.shape), "FP32")
    tensor.set_data_from_numpy(x)
    return tensor


def http_input(x: np.ndarray) -> triton_http.InferInput:
    tensor = triton_http.InferInput("input", list(x.shape), "FP32")
    tensor.set_data_from_numpy(x)
    return tensor


# --------------------------------------------------------------------------------------------------
# Configuration


def test_config_of_a_batched_model_drops_the_batch_axis(grpc_client, http_client):
    over_http = http_client.get_model_config("digits_cnn")
    over_grpc = grpc_client.get_model_config("digits_cnn", as_json=True)["config"]
    assert over_http["platform"] == over_grpc["platform"] == "onnxruntime_onnx"
    assert over_http["backend"] == "onnxruntime" and over_http["max_batch_size"] == 64
    assert over_http["input"] == [{"name": "input", "data_type": "TYPE_FP32", "dims": [1, 8, 8]}]
    assert over_http["output"][0]["dims"] == [10] and over_http["output"][0]["label_filename"] == "labels.txt"
    assert over_http["dynamic_batching"] == {"max_queue_delay_microseconds": 3000}
    assert over_http["instance_group"][0]["kind"] == "KIND_CPU" and over_http["instance_group"][0]["count"] >= 1
    assert over_grpc["input"][0]["dims"] == ["1", "8", "8"]  # protobuf's JSON form of int64


def test_config_of_an_unbatched_model_keeps_every_axis(http_client):
    config = http_client.get_model_config("digits_forest")
    assert config.get("max_batch_size", 0) == 0 and "dynamic_batching" not in config
    assert config["input"][0]["dims"] == [-1, 64]


def test_config_of_an_unknown_model_is_not_found(grpc_client, own_server):
    with pytest.raises(InferenceServerException) as caught:
        grpc_client.get_model_config("nope")
    assert caught.value.status() == "StatusCode.NOT_FOUND" and "no model 'nope'" in caught.value.message()
    answer = httpx.get(f"http://{own_server.http_address}/v2/models/digits_cnn/versions/7/config")
    assert answer.status_code == 404 and "no version '7'" in answer.json()["error"]


# --------------------------------------------------------------------------------------------------
# Statistics


def test_statistics_count_rows_requests_and_failures(grpc_client, http_client):
    before = http_client.get_inference_statistics("digits_forest")["model_stats"][0]
    for _ in range(3):
        grpc_client.infer("digits_forest", [grpc_input(digits_inputs("digits_forest", 4))])
    with pytest.raises(InferenceServerException):
        grpc_client.infer("digits_forest", [grpc_input(np.zeros((2, 3), np.float32))])
    after = http_client.get_inference_statistics("digits_forest")["model_stats"][0]
    assert after["inference_count"] - before["inference_count"] == 12
    assert after["execution_count"] - before["execution_count"] == 3
    stats, was = after["inference_stats"], before["inference_stats"]
    assert stats["success"]["count"] - was["success"]["count"] == 3
    assert stats["fail"]["count"] - was["fail"]["count"] == 1
    assert stats["compute_infer"]["ns"] > was["compute_infer"]["ns"] and after["last_inference"] > 0
    assert {b["batch_size"] for b in after["batch_stats"]} == {4}  # not batched: each run is one request


def test_statistics_of_every_model_and_of_an_unknown_one(grpc_client, own_server):
    everything = grpc_client.get_inference_statistics(as_json=True)["model_stats"]
    assert {s["name"] for s in everything} == {"digits_cnn", "digits_forest"}
    stub = pb_grpc.GRPCInferenceServiceStub(grpc.insecure_channel(own_server.address))
    with pytest.raises(grpc.RpcError) as caught:
        stub.ModelStatistics(pb.ModelStatisticsRequest(name="nope"))
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    assert httpx.get(f"http://{own_server.http_address}/v2/models/stats").json()["model_stats"]


# --------------------------------------------------------------------------------------------------
# Classification


def test_classification_is_the_same_over_grpc_and_rest(grpc_client, http_client):
    x = digits_inputs("digits_cnn", 3)
    logits = grpc_client.infer("digits_cnn", [grpc_input(x)]).as_numpy("logits")
    over_grpc = grpc_client.infer("digits_cnn", [grpc_input(x)],
                                  outputs=[triton_grpc.InferRequestedOutput("logits", class_count=2)])  # fmt: skip
    over_http = http_client.infer("digits_cnn", [http_input(x)],
                                  outputs=[triton_http.InferRequestedOutput("logits", class_count=2)])  # fmt: skip
    classes = over_grpc.as_numpy("logits")
    assert classes.shape == (3, 2)
    np.testing.assert_array_equal(classes, over_http.as_numpy("logits"))
    for row, answer in zip(logits, classes):
        best = int(np.argmax(row))
        value, index, label = answer[0].decode().split(":")
        assert int(index) == best and label == LABELS[best] and float(value) == pytest.approx(row[best], abs=1e-5)


def test_classification_needs_a_count(own_server):
    body = {"inputs": [{"name": "input", "shape": [1, 1, 8, 8], "datatype": "FP32", "data": [0.0] * 64}],
            "outputs": [{"name": "logits", "parameters": {"classification": -1}}]}  # fmt: skip
    answer = httpx.post(f"http://{own_server.http_address}/v2/models/digits_cnn/infer", json=body)
    assert answer.status_code == 400 and "classification must be a whole number" in answer.json()["error"]


# --------------------------------------------------------------------------------------------------
# Streaming


def test_stream_answers_each_request_by_id_and_survives_a_bad_one(grpc_client):
    answers: queue.Queue = queue.Queue()
    grpc_client.start_stream(callback=lambda result, error: answers.put((result, error)))
    try:
        x = digits_inputs("digits_cnn", 2)
        for i in range(6):
            model = "nope" if i == 3 else "digits_cnn"
            grpc_client.async_stream_infer(model, [grpc_input(x)], request_id=f"r{i}")
        got = [answers.get(timeout=30) for _ in range(6)]
    finally:
        grpc_client.stop_stream()
    ok = {result.get_response().id: result.as_numpy("logits") for result, error in got if error is None}
    errors = [error for _, error in got if error is not None]
    assert set(ok) == {"r0", "r1", "r2", "r4", "r5"} and all(v.shape == (2, 10) for v in ok.values())
    assert len(errors) == 1 and "no model 'nope'" in errors[0].message()


def test_raw_stream_error_message_keeps_the_stream_open(own_server):
    stub = pb_grpc.GRPCInferenceServiceStub(grpc.insecure_channel(own_server.address))

    def requests():
        for i, model in enumerate(["digits_forest", "nope", "digits_forest"]):
            request = pb.ModelInferRequest(model_name=model, id=str(i))
            codec.encode_request_inputs(request, {"input": digits_inputs("digits_forest", 1)})
            yield request

    answers = sorted(stub.ModelStreamInfer(requests(), timeout=30), key=lambda a: a.infer_response.id)
    assert [a.infer_response.id for a in answers] == ["0", "1", "2"]
    assert answers[0].error_message == answers[2].error_message == ""
    assert "no model 'nope'" in answers[1].error_message


# --------------------------------------------------------------------------------------------------
# Timeouts


def test_a_timeout_of_one_microsecond_is_not_run(grpc_client, http_client):
    before = http_client.get_inference_statistics("digits_forest")["model_stats"][0]["execution_count"]
    with pytest.raises(InferenceServerException) as caught:
        grpc_client.infer("digits_forest", [grpc_input(digits_inputs("digits_forest", 1))], timeout=1)
    assert caught.value.status() == "StatusCode.DEADLINE_EXCEEDED"
    assert "it was not run" in caught.value.message()
    after = http_client.get_inference_statistics("digits_forest")["model_stats"][0]["execution_count"]
    assert after == before
    grpc_client.infer("digits_forest", [grpc_input(digits_inputs("digits_forest", 1))], timeout=10_000_000)


def test_rest_timeout_and_a_bad_timeout(own_server):
    url = f"http://{own_server.http_address}/v2/models/digits_forest/infer"
    tensor = {"name": "input", "shape": [1, 64], "datatype": "FP32", "data": [0.0] * 64}
    expired = httpx.post(url, json={"inputs": [tensor], "parameters": {"timeout": 1}})
    assert expired.status_code == 504 and "not run" in expired.json()["error"]
    bad = httpx.post(url, json={"inputs": [tensor], "parameters": {"timeout": "soon"}})
    assert bad.status_code == 400 and "'timeout' must be a whole number of microseconds" in bad.json()["error"]


# --------------------------------------------------------------------------------------------------
# Log settings and server metadata


def test_log_settings_change_the_level_over_both_protocols(grpc_client, http_client):
    logger = logging.getLogger("ortserve")
    saved = logger.level
    try:
        http_client.update_log_settings({"log_verbose_level": 1})
        assert logger.getEffectiveLevel() == logging.DEBUG
        assert grpc_client.get_log_settings(as_json=True)["settings"]["log_verbose_level"]["uint32_param"] == 1
        grpc_client.update_log_settings({"log_verbose_level": 0, "log_info": False})
        assert logger.getEffectiveLevel() == logging.WARNING and http_client.get_log_settings()["log_info"] is False
        with pytest.raises(InferenceServerException) as caught:
            http_client.update_log_settings({"log_colour": True})
        assert "unknown log setting 'log_colour'" in caught.value.message()
        with pytest.raises(InferenceServerException) as caught:
            grpc_client.update_log_settings({"log_file": "/var/log/x"})
        assert caught.value.status() == "StatusCode.INVALID_ARGUMENT" and "log_file" in caught.value.message()
    finally:
        logger.setLevel(saved)


def test_server_metadata_lists_the_same_extensions_on_both(grpc_client, http_client):
    assert list(grpc_client.get_server_metadata().extensions) == list(dataplane.EXTENSIONS)
    assert http_client.get_server_metadata()["extensions"] == list(dataplane.EXTENSIONS)
