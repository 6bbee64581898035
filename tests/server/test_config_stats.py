"""The model configuration and statistics extensions in detail: every field of the configuration against what the
server does with the model (batched or not, data types, dims, instance count, label files, warm-up), the
statistics' counts after known calls (rows, requests, failures, runs, batch sizes), both over tritonclient grpc and
http and over raw calls (the grpc stubs, httpx), and our model_config.proto against Triton's field for field.

One server of its own (two workers, a known queue delay) over a repository made here, so only this file's calls
are counted.
"""

from __future__ import annotations

import json
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import httpx
import numpy as np
import pytest
import server_models
import tritonclient.grpc as triton_grpc
import tritonclient.http as triton_http
from google.protobuf import json_format
from tritonclient.utils import InferenceServerException

from ortserve._proto import grpc_service_pb2 as pb
from ortserve._proto import grpc_service_pb2_grpc as pb_grpc
from ortserve._proto import model_config_pb2
from ortserve.server.app import BackgroundServer, ServerOptions

WORKERS = 2
DELAY_US = 2500
WARMUP = {"name": "zeros", "batch_size": 2, "count": 1,
          "inputs": {n: {"data_type": "TYPE_FP32", "dims": [4], "zero_data": True} for n in ("a", "b")}}  # fmt: skip


@pytest.fixture(scope="module")
def served(tmp_path_factory, digits_repository):
    root = tmp_path_factory.mktemp("config_stats")
    server_models.copy_version(digits_repository, root, "digits_cnn")
    for datatype in ("FP32", "INT64", "FP16", "BYTES"):
        server_models.save(server_models.echo(datatype), root / f"echo_{datatype.lower()}" / "1" / "model.onnx")
    (root / "echo_fp32" / "config.json").write_text('{"max_batch_size": 0}')  # batchable, but told not to
    server_models.save(server_models.broken(), root / "fixed_output" / "1" / "model.onnx")  # y (7, 3): cannot batch
    server_models.save(server_models.add_sub(), root / "add_sub" / "1" / "model.onnx")
    (root / "add_sub" / "labels.txt").write_text("a\nb\nc\nd\n")
    config = {"max_batch_size": 8, "output": [{"name": "sum", "label_filename": "labels.txt"}],
              "model_warmup": [WARMUP]}  # fmt: skip
    (root / "add_sub" / "config.json").write_text(json.dumps(config))
    for version in (1, 2):
        server_models.save(server_models.plus_constant(version), root / "versioned" / str(version) / "model.onnx")
    options = ServerOptions(port=0, http_port=0, workers=WORKERS, max_queue_delay_us=DELAY_US)
    with BackgroundServer(root, options) as running:
        yield running


@pytest.fixture(scope="module")
def grpc_client(served):
    return triton_grpc.InferenceServerClient(served.address)


@pytest.fixture(scope="module")
def http_client(served):
    return triton_http.InferenceServerClient(served.http_address)


@pytest.fixture(scope="module")
def stub(served):
    with grpc.insecure_channel(served.address) as channel:
        yield pb_grpc.GRPCInferenceServiceStub(channel)


def both_configs(grpc_client, http_client, name: str) -> dict:
    """The config over http (JSON numbers), checked to be the same message as the one gRPC sends."""
    over_http = http_client.get_model_config(name)
    over_grpc = grpc_client.get_model_config(name).config
    assert json_format.ParseDict(over_http, type(over_grpc)()) == over_grpc, name  # tritonclient's message
    return over_http


def echo_fp32(rows: int) -> triton_grpc.InferInput:
    tensor = triton_grpc.InferInput("x", [rows, 3], "FP32")
    tensor.set_data_from_numpy(np.arange(rows * 3, dtype=np.float32).reshape(rows, 3))
    return tensor


def stats_of(http_client, name: str, version: str = "") -> list[dict]:
    return http_client.get_inference_statistics(name, version)["model_stats"]


# --------------------------------------------------------------------------------------------------
# Configuration


def test_our_model_config_proto_matches_tritons_field_for_field():
    """Every message, field (name, number, type, repeated) and enum value we declare is Triton's."""
    from tritonclient.grpc import model_config_pb2 as theirs

    def fields(descriptor):
        return {(f.name, f.number, f.type, f.is_repeated) for f in descriptor.fields}

    def values(enum):
        return {(v.name, v.number) for v in enum.values}

    def walk(ours, their):
        assert fields(ours) <= fields(their), ours.full_name
        for enum in ours.enum_types:
            assert values(enum) <= values(their.enum_types_by_name[enum.name]), enum.full_name
        for nested in ours.nested_types:
            walk(nested, their.nested_types_by_name[nested.name])

    ours = model_config_pb2.DESCRIPTOR
    assert ours.package == theirs.DESCRIPTOR.package == "inference"
    for name, enum in ours.enum_types_by_name.items():
        assert values(enum) <= values(theirs.DESCRIPTOR.enum_types_by_name[name]), name
    for name, message in ours.message_types_by_name.items():
        walk(message, theirs.DESCRIPTOR.message_types_by_name[name])
    # Each field we declare is Triton's (a subset, so <=); and we do declare the ones this server fills.
    assert {"dynamic_batching", "instance_group", "model_warmup", "version_policy"} <= {
        f.name for f in ours.message_types_by_name["ModelConfig"].fields}


def test_batched_model_config(grpc_client, http_client):
    config = both_configs(grpc_client, http_client, "digits_cnn")
    assert (config["name"], config["platform"], config["backend"]) == ("digits_cnn", "onnxruntime_onnx", "onnxruntime")
    assert config["max_batch_size"] == ServerOptions.max_batch_size
    assert config["input"] == [{"name": "input", "data_type": "TYPE_FP32", "dims": [1, 8, 8]}]  # no batch axis
    assert config["output"] == [{"name": "logits", "data_type": "TYPE_FP32", "dims": [10]}]
    assert config["dynamic_batching"] == {"max_queue_delay_microseconds": DELAY_US}
    assert config["instance_group"] == [{"name": "digits_cnn_0", "kind": "KIND_CPU", "count": WORKERS}]
    assert config["version_policy"] == {"all": {}}
    assert config["default_model_filename"] == "model.onnx"


def test_unbatched_model_configs_keep_the_batch_axis(grpc_client, http_client):
    told = both_configs(grpc_client, http_client, "echo_fp32")  # config.json: max_batch_size 0
    assert told["max_batch_size"] == 0 and "dynamic_batching" not in told
    assert [t["dims"] for t in told["input"] + told["output"]] == [[-1, 3], [-1, 3]]
    fixed = both_configs(grpc_client, http_client, "fixed_output")  # its output's first axis is fixed: no batching
    assert fixed["max_batch_size"] == 0 and "dynamic_batching" not in fixed
    assert fixed["input"][0]["dims"] == [-1] and fixed["output"][0]["dims"] == [7, 3]
    assert fixed["instance_group"][0]["count"] == WORKERS  # the runs the worker threads allow


@pytest.mark.parametrize("datatype, expected", [("FP32", "TYPE_FP32"), ("INT64", "TYPE_INT64"),
                                                ("FP16", "TYPE_FP16"), ("BYTES", "TYPE_STRING")])  # fmt: skip
def test_data_types(grpc_client, http_client, datatype, expected):
    config = both_configs(grpc_client, http_client, f"echo_{datatype.lower()}")
    assert [t["data_type"] for t in config["input"] + config["output"]] == [expected, expected]


def test_label_file_and_warmup_are_echoed(grpc_client, http_client):
    config = both_configs(grpc_client, http_client, "add_sub")
    assert config["max_batch_size"] == 8
    assert {o["name"]: o.get("label_filename") for o in config["output"]} == {"sum": "labels.txt",
                                                                             "difference": None}  # fmt: skip
    assert config["model_warmup"] == [WARMUP]


def test_raw_config_calls_and_unknown_model_or_version(served, stub):
    answer = stub.ModelConfig(pb.ModelConfigRequest(name="versioned", version="1")).config
    batched = ("versioned", ServerOptions.max_batch_size, [])  # x (-1,): its one axis is the batch axis
    assert (answer.name, answer.max_batch_size, list(answer.input[0].dims)) == batched
    base = f"http://{served.http_address}/v2/models"
    config = httpx.get(f"{base}/versioned/versions/2/config").json()
    assert config["name"] == "versioned" and config["input"][0]["data_type"] == "TYPE_FP32"
    for name, version, mentions in (("nope", "", "no model 'nope'"), ("versioned", "9", "no version '9'")):
        with pytest.raises(grpc.RpcError) as raised:
            stub.ModelConfig(pb.ModelConfigRequest(name=name, version=version))
        assert raised.value.code() == grpc.StatusCode.NOT_FOUND and mentions in raised.value.details()
        path = f"{base}/{name}/versions/{version}/config" if version else f"{base}/{name}/config"
        answer = httpx.get(path)
        assert answer.status_code == 404 and mentions in answer.json()["error"]


# --------------------------------------------------------------------------------------------------
# Statistics


def test_counts_after_known_calls(grpc_client, http_client):
    calls, rows = 5, 3
    for _ in range(calls):
        grpc_client.infer("echo_fp32", [echo_fp32(rows)])
    wrong = triton_grpc.InferInput("x", [2, 4], "FP32")  # the model takes (-1, 3)
    wrong.set_data_from_numpy(np.zeros((2, 4), np.float32))
    with pytest.raises(InferenceServerException):
        grpc_client.infer("echo_fp32", [wrong])
    [stats] = stats_of(http_client, "echo_fp32")
    assert (stats["name"], stats["version"]) == ("echo_fp32", "1")
    assert stats["inference_count"] == calls * rows and stats["execution_count"] == calls
    inference = stats["inference_stats"]
    for stage in ("success", "queue", "compute_input", "compute_infer", "compute_output"):
        assert inference[stage]["count"] == calls, stage
    assert inference["fail"]["count"] == 1
    assert inference["success"]["ns"] >= inference["compute_infer"]["ns"] > 0  # a run is part of its request
    assert inference["cache_hit"] == inference["cache_miss"] == {"count": 0, "ns": 0}
    assert [(b["batch_size"], b["compute_infer"]["count"]) for b in stats["batch_stats"]] == [(rows, calls)]
    assert abs(stats["last_inference"] / 1000 - time.time()) < 600  # milliseconds since the epoch, not seconds


def test_batched_calls_add_up(grpc_client, http_client):
    """Concurrent callers of a batched model: runs of several sizes, which must add up to the requests."""
    x = server_models.digits_inputs("digits_cnn", 2)
    tensor = triton_grpc.InferInput("input", list(x.shape), "FP32")
    tensor.set_data_from_numpy(x)
    calls = 48
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda _: grpc_client.infer("digits_cnn", [tensor]), range(calls)))
    over_grpc = grpc_client.get_inference_statistics("digits_cnn", "1").model_stats[0]
    [stats] = stats_of(http_client, "digits_cnn", "1")
    assert stats["inference_count"] == over_grpc.inference_count == calls * 2
    assert stats["inference_stats"]["success"]["count"] == calls
    batches = stats["batch_stats"]
    assert [b["batch_size"] for b in batches] == sorted({b["batch_size"] for b in batches})
    assert sum(b["compute_infer"]["count"] for b in batches) == stats["execution_count"] <= calls
    assert sum(b["batch_size"] * b["compute_infer"]["count"] for b in batches) == calls * 2


def test_every_model_one_model_and_versions_never_called(grpc_client, http_client, served):
    everything = http_client.get_inference_statistics()["model_stats"]
    names = {(s["name"], s["version"]) for s in everything}
    assert {("versioned", "1"), ("versioned", "2"), ("add_sub", "1"), ("digits_cnn", "1")} <= names
    assert len(names) == len(everything) == len(grpc_client.get_inference_statistics().model_stats)
    grpc_client.infer("versioned", [_scalar_rows()], model_version="2")
    by_version = {s["version"]: s for s in stats_of(http_client, "versioned")}
    assert sorted(by_version) == ["1", "2"]
    assert by_version["1"]["inference_count"] == by_version["1"]["last_inference"] == 0
    assert by_version["1"]["batch_stats"] == [] and by_version["1"]["inference_stats"]["success"]["count"] == 0
    assert by_version["2"]["inference_count"] == 4 and by_version["2"]["last_inference"] > 0


def _scalar_rows() -> triton_grpc.InferInput:
    tensor = triton_grpc.InferInput("x", [4], "FP32")
    tensor.set_data_from_numpy(np.ones(4, np.float32))
    return tensor


def test_unknown_model_or_version(grpc_client, http_client):
    for name, version, mentions in (("nope", "", "no model 'nope'"), ("versioned", "9", "no version '9'")):
        for client in (grpc_client, http_client):
            with pytest.raises(InferenceServerException) as raised:
                client.get_inference_statistics(name, version)
            assert mentions in raised.value.message()
            assert raised.value.status() in ("StatusCode.NOT_FOUND", "404"), raised.value.status()


def test_raw_statistics_calls(served, stub):
    answer = stub.ModelStatistics(pb.ModelStatisticsRequest(name="versioned", version="1"))
    assert [(s.name, s.version) for s in answer.model_stats] == [("versioned", "1")]
    base = f"http://{served.http_address}/v2/models"
    every = httpx.get(f"{base}/stats").json()["model_stats"]
    assert len(every) == len(stub.ModelStatistics(pb.ModelStatisticsRequest()).model_stats)
    one = httpx.get(f"{base}/versioned/versions/2/stats").json()["model_stats"]
    assert [s["version"] for s in one] == ["2"] and isinstance(one[0]["inference_count"], int)  # JSON numbers
    assert httpx.get(f"{base}/nope/stats").status_code == 404
    with pytest.raises(grpc.RpcError) as raised:  # a version of no model
        stub.ModelStatistics(pb.ModelStatisticsRequest(version="1"))
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "need a model name" in raised.value.details()
