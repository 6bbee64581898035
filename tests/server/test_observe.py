"""Metrics and the request log (ortserve.server.observe): real servers, metrics scraped over real HTTP.

Each module-level server here is this module's own, so its counters move only by what these tests send, and the
tests check that they move by exactly that: requests by model, version, protocol and status (gRPC, REST and the
legacy protocol), latency and queue-time histograms, rows per run under concurrency, the in-flight gauge. The
request log is checked line by line as JSON, and off unless asked for.
"""

from __future__ import annotations

import asyncio
import json
import logging
from concurrent.futures import ThreadPoolExecutor

import grpc
import httpx
import numpy as np
import pytest
import server_models
from onnx import numpy_helper
from server_models import digits_inputs

from ortserve._proto import grpc_service_pb2_grpc as pb_grpc
from ortserve._proto import predict_pb2, predict_pb2_grpc
from ortserve.client import AsyncInferenceClient, InferenceClient, InferenceServerError, infer_request
from ortserve.server.app import BackgroundServer, ServerOptions
from ortserve.server.cli import ServerProcess
from ortserve.server.observe import requests_by_status, scrape_metrics

REQUESTS = "ortserve_requests_total"


@pytest.fixture(scope="module")
def observed(repository):
    """A server of this module's own with the metrics endpoint, REST and the request log on."""
    options = ServerOptions(port=0, http_port=0, metrics_port=0, request_log=True)
    with BackgroundServer(repository, options) as running:
        yield running


@pytest.fixture(scope="module")
def stub(observed):
    with grpc.insecure_channel(observed.address) as channel:
        yield pb_grpc.GRPCInferenceServiceStub(channel)


def metric(samples: dict, name: str, **labels) -> float:
    """One sample's value (0 when the series does not exist yet)."""
    return samples.get(name, {}).get(tuple(sorted(labels.items())), 0.0)


def requests_of(samples: dict, model: str, version: str, protocol: str, status: str) -> float:
    return metric(samples, REQUESTS, model=model, version=version, protocol=protocol, status=status)


def grpc_infer(stub, model: str, inputs: dict, version: str = "", outputs=(), request_id: str = "") -> str:
    """The status code name of one ModelInfer call."""
    request = infer_request(model, inputs, list(outputs), version)
    request.id = request_id
    try:
        stub.ModelInfer(request, timeout=60)
    except grpc.RpcError as error:
        return error.code().name
    return "OK"


def test_counters_move_by_exactly_what_was_sent(observed, stub):
    images = digits_inputs("digits_cnn", 3)
    flat = digits_inputs("digits_forest", 2)
    before = scrape_metrics(observed.metrics_address)
    sent = (
        [grpc_infer(stub, "digits_cnn", {"input": images}) for _ in range(5)]
        + [grpc_infer(stub, "digits_cnn", {"input": images.astype(np.float64)}) for _ in range(3)]
        + [grpc_infer(stub, "no_such_model", {"input": images}) for _ in range(2)]
        + [grpc_infer(stub, "digits_cnn", {"input": images}, version="7")]
    )
    assert sent == ["OK"] * 5 + ["INVALID_ARGUMENT"] * 3 + ["NOT_FOUND"] * 3
    body = {"inputs": [{"name": "input", "datatype": "FP32", "shape": [2, 64], "data": flat.reshape(-1).tolist()}]}
    with httpx.Client(base_url=f"http://{observed.http_address}", timeout=60) as http:
        assert [http.post("/v2/models/digits_forest/infer", json=body).status_code for _ in range(4)] == [200] * 4
        wrong = {"inputs": [{**body["inputs"][0], "name": "pixels"}]}
        assert http.post("/v2/models/digits_forest/infer", json=wrong).status_code == 400
    after = scrape_metrics(observed.metrics_address)

    def moved(name: str, **labels) -> float:
        return metric(after, name, **labels) - metric(before, name, **labels)

    assert moved(REQUESTS, model="digits_cnn", version="1", protocol="grpc", status="OK") == 5
    assert moved(REQUESTS, model="digits_cnn", version="1", protocol="grpc", status="INVALID_ARGUMENT") == 3
    # Names the server does not serve never become labels: "" for an unknown model, and for an unknown version.
    assert moved(REQUESTS, model="", version="", protocol="grpc", status="NOT_FOUND") == 2
    assert moved(REQUESTS, model="digits_cnn", version="", protocol="grpc", status="NOT_FOUND") == 1
    assert moved(REQUESTS, model="digits_forest", version="1", protocol="rest", status="OK") == 4
    assert moved(REQUESTS, model="digits_forest", version="1", protocol="rest", status="INVALID_ARGUMENT") == 1
    assert sum(requests_by_status(after).values()) - sum(requests_by_status(before).values()) == 16
    # Latency counts the answered requests; queue time every request that reached a run; rows add up exactly.
    assert moved("ortserve_request_duration_seconds_count", model="digits_cnn", version="1", protocol="grpc") == 5
    assert moved("ortserve_request_duration_seconds_count", model="digits_forest", version="1", protocol="rest") == 4
    assert moved("ortserve_queue_duration_seconds_count", model="digits_cnn", version="1") == 5
    assert moved("ortserve_queue_duration_seconds_count", model="digits_forest", version="1") == 4
    assert moved("ortserve_batch_size_sum", model="digits_cnn", version="1") == 5 * 3
    assert moved("ortserve_batch_size_sum", model="digits_forest", version="1") == 4 * 2
    assert moved("ortserve_request_duration_seconds_sum", model="digits_cnn", version="1", protocol="grpc") > 0
    assert metric(after, "ortserve_inflight_requests") == 0


def test_model_info_lists_every_model_with_its_batching(observed):
    samples = scrape_metrics(observed.metrics_address)
    info = {dict(labels)["model"]: dict(labels) for labels in samples["ortserve_model_info"]}
    assert set(info) == {m.name for m in observed.server.repository}
    assert info["digits_cnn"]["max_batch_size"] == "64"
    assert info["broken"]["max_batch_size"] == "0"  # its output has no batch axis: never batched
    assert samples["process_resident_memory_bytes"][()] > 10 * 2**20


def test_concurrent_callers_make_batches_and_the_counts_add_up(observed):
    callers, calls, rows = 16, 6, 1
    before = scrape_metrics(observed.metrics_address)

    async def load() -> None:
        async with AsyncInferenceClient(observed.address, timeout=60) as client:
            images = digits_inputs("digits_cnn", rows)

            async def caller() -> None:
                for _ in range(calls):
                    await client.infer("digits_cnn", {"input": images})

            await asyncio.gather(*(caller() for _ in range(callers)))

    asyncio.run(load())
    after = scrape_metrics(observed.metrics_address)
    labels = {"model": "digits_cnn", "version": "1"}

    def moved(name: str, **more) -> float:
        return metric(after, name, **labels, **more) - metric(before, name, **labels, **more)

    runs = moved("ortserve_batch_size_count")
    assert moved("ortserve_batch_size_sum") == callers * calls * rows  # every row ran exactly once
    assert 0 < runs < callers * calls  # so some runs joined several requests
    assert moved("ortserve_batch_size_bucket", le="1.0") < runs  # ... runs of more than one row
    assert moved("ortserve_run_duration_seconds_count") == runs
    assert moved("ortserve_queue_duration_seconds_count") == callers * calls
    assert moved(REQUESTS, protocol="grpc", status="OK") == callers * calls
    assert metric(after, "ortserve_inflight_requests") == 0


def test_in_flight_gauge_counts_calls_being_run(tmp_path):
    server_models.save(server_models.slow(), tmp_path / "slow" / "1" / "model.onnx")
    x = np.ones((256, 384), np.float32)
    options = ServerOptions(port=0, metrics_port=0, workers=1, max_batch_size=0)
    with BackgroundServer(tmp_path, options) as server, InferenceClient(server.address, timeout=120) as client:
        with ThreadPoolExecutor(3) as pool:
            calls = [pool.submit(client.infer, "slow", {"x": x}) for _ in range(3)]
            seen = set()
            while not all(call.done() for call in calls):
                seen.add(metric(scrape_metrics(server.metrics_address), "ortserve_inflight_requests"))
            for call in calls:
                call.result()
        assert max(seen) >= 1
        assert metric(scrape_metrics(server.metrics_address), "ortserve_inflight_requests") == 0


def test_legacy_predict_is_counted_under_the_default_model(digits_repository):
    model_file = digits_repository / "digits_cnn" / "1" / "model.onnx"
    images = digits_inputs("digits_cnn", 2)
    with BackgroundServer(model_file, ServerOptions(port=0, metrics_port=0)) as server:
        with grpc.insecure_channel(server.address) as channel:
            stub = predict_pb2_grpc.PredictionServiceStub(channel)
            good = predict_pb2.PredictRequest()
            good.inputs["input"].CopyFrom(numpy_helper.from_array(images, "input"))
            bad = predict_pb2.PredictRequest()
            bad.inputs["image"].CopyFrom(numpy_helper.from_array(images, "image"))
            stub.Predict(good, timeout=60)
            stub.Predict(good, timeout=60)
            with pytest.raises(grpc.RpcError) as refused:
                stub.Predict(bad, timeout=60)
            assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        samples = scrape_metrics(server.metrics_address)
    assert requests_of(samples, "default", "1", "legacy", "OK") == 2
    assert requests_of(samples, "default", "1", "legacy", "INVALID_ARGUMENT") == 1


# --------------------------------------------------------------------------------------------------
# The request log


def log_entries(caplog) -> list[dict]:
    return [json.loads(r.getMessage()) for r in caplog.records if r.name == "ortserve.requests"]


def test_request_log_is_one_json_object_per_request(observed, stub, caplog):
    caplog.set_level(logging.INFO, logger="ortserve.requests")
    images = digits_inputs("digits_cnn", 4)
    assert grpc_infer(stub, "digits_cnn", {"input": images}, request_id="req-ok") == "OK"
    assert grpc_infer(stub, "digits_cnn", {"input": images}, outputs=["nope"], request_id="req-bad") == \
        "INVALID_ARGUMENT"  # fmt: skip
    assert grpc_infer(stub, "no_such_model", {"input": images}, request_id="req-lost") == "NOT_FOUND"
    ok, bad, lost = log_entries(caplog)[-3:]
    fields = {"time", "protocol", "model", "version", "id", "status", "rows", "batch_size", "queue_ms", "run_ms",
              "total_ms"}  # fmt: skip
    assert set(ok) == fields and set(bad) == set(lost) == fields | {"error"}
    assert ok["id"] == "req-ok" and ok["status"] == "OK" and ok["protocol"] == "grpc"
    assert ok["model"] == "digits_cnn" and ok["version"] == "1" and ok["rows"] == 4 and ok["batch_size"] >= 4
    assert 0 < ok["run_ms"] <= ok["total_ms"] and ok["queue_ms"] + ok["run_ms"] <= ok["total_ms"]
    assert bad["id"] == "req-bad" and bad["status"] == "INVALID_ARGUMENT" and "'nope'" in bad["error"]
    assert bad["batch_size"] == 0 and bad["run_ms"] == 0  # refused before it reached a run
    assert lost["model"] == "no_such_model" and lost["status"] == "NOT_FOUND" and "no model" in lost["error"]


def test_request_log_is_off_by_default(repository, caplog):
    caplog.set_level(logging.INFO, logger="ortserve.requests")
    with BackgroundServer(repository, ServerOptions(port=0)) as server, InferenceClient(server.address) as client:
        client.infer("digits_cnn", {"input": digits_inputs("digits_cnn", 1)})
        with pytest.raises(InferenceServerError):
            client.infer("digits_cnn", {"input": digits_inputs("digits_cnn", 1).astype(np.float64)})
    assert log_entries(caplog) == []


def test_serve_announces_metrics_and_writes_the_request_log_to_a_file(digits_repository, tmp_path):
    log_file = tmp_path / "requests.jsonl"
    args = ["--model_repository", str(digits_repository), "--request_log", str(log_file), "--log_level", "warning"]
    with ServerProcess(args) as server:
        assert set(server.endpoints) >= {"metrics"}
        with InferenceClient(server.address, timeout=60) as client:
            for i in range(3):
                client.infer("digits_forest", {"input": digits_inputs("digits_forest", 2)})
            with pytest.raises(InferenceServerError):
                client.infer("digits_forest", {"input": digits_inputs("digits_forest", 2)}, outputs=["nope"])
        samples = scrape_metrics(server.endpoints["metrics"])
        assert requests_of(samples, "digits_forest", "1", "grpc", "OK") == 3
    assert server.process.returncode == 0
    lines = log_file.read_text().splitlines()  # the writer thread has flushed by the time the server exited
    entries = [json.loads(line) for line in lines]  # nothing but JSON objects, one per line
    assert [e["status"] for e in entries] == ["OK"] * 3 + ["INVALID_ARGUMENT"]
    assert all(e["model"] == "digits_forest" for e in entries)
    assert [e["rows"] for e in entries] == [2, 2, 2, 0]  # the refused request never reached a run


def test_metrics_port_can_be_turned_off(digits_repository):
    args = ["--model_repository", str(digits_repository), "--metrics_port", "-1", "--http_port", "-1"]
    with ServerProcess(args) as server:
        assert "metrics" not in server.endpoints


def test_request_id_in_the_log_is_cut_when_huge(observed, stub, caplog):
    caplog.set_level(logging.INFO, logger="ortserve.requests")
    assert grpc_infer(stub, "digits_cnn", {"input": digits_inputs("digits_cnn", 1)}, request_id="x" * 10_000) == "OK"
    entry = log_entries(caplog)[-1]
    assert entry["id"].startswith("xxx") and len(entry["id"]) < 300
