"""Triton's model repository extension and live model management: index, load, unload, poll, warm-up.

Every test starts its own server over a temp repository it changes (in-process BackgroundServer, or the CLI in a
subprocess for the flags), and drives it with tritonclient (grpc and http) and raw calls (grpc stubs, httpx).
Waits are on a condition with a deadline, never a bare sleep.
"""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path

import grpc
import httpx
import numpy as np
import onnx
import pytest
import server_models
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from grpc_health.v1 import health_pb2, health_pb2_grpc
from onnx import TensorProto, helper
from tritonclient.utils import InferenceServerException

from ortserve._proto import grpc_service_pb2 as pb
from ortserve._proto import grpc_service_pb2_grpc
from ortserve.server.app import BackgroundServer, ServerOptions
from ortserve.server.cli import ServerProcess

SLOW_SIZE = 384
SLOW_LAYERS = 600  # about 1 s for 2048 rows on 2 cores: long enough to watch a call in flight or a warm-up


# --------------------------------------------------------------------------------------------------
# Helpers


def put(model: onnx.ModelProto | bytes, path: Path) -> None:
    """Write a model file the way a deployment should: to a temp name, then rename (a poll never sees half)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temp = path.with_name(path.name + ".part")
    temp.write_bytes(model if isinstance(model, bytes) else model.SerializeToString())
    os.replace(temp, path)


def put_config(folder: Path, config: dict) -> None:
    temp = folder / "config.json.part"
    temp.write_text(json.dumps(config))
    os.replace(temp, folder / "config.json")


def wait_for(condition, what: str, timeout: float = 60.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def wrong_opset() -> onnx.ModelProto:
    """A well-formed ONNX file whose default-domain opset (99) ONNX Runtime does not support."""
    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "test",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None])])  # fmt: skip
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 99)], ir_version=server_models.IR_VERSION)


@pytest.fixture
def root(tmp_path) -> Path:
    """versioned (version 1 adds 100), add_sub and slow: small models a test may change."""
    put(server_models.plus_constant(100.0), tmp_path / "versioned" / "1" / "model.onnx")
    put(server_models.add_sub(), tmp_path / "add_sub" / "1" / "model.onnx")
    put(server_models.slow(SLOW_SIZE, SLOW_LAYERS), tmp_path / "slow" / "1" / "model.onnx")
    return tmp_path


class Served:
    """A BackgroundServer with its clients: tritonclient grpc and http, raw stub, httpx."""

    def __init__(self, root: Path, **options) -> None:
        self.background = BackgroundServer(root, ServerOptions(port=0, http_port=0, **options)).start()
        self.grpc = grpcclient.InferenceServerClient(self.background.address)
        self.http = httpclient.InferenceServerClient(self.background.http_address, concurrency=4)
        self.channel = grpc.insecure_channel(self.background.address)
        self.stub = grpc_service_pb2_grpc.GRPCInferenceServiceStub(self.channel)
        self.rest = httpx.Client(base_url=f"http://{self.background.http_address}", timeout=60)

    def close(self) -> None:
        self.rest.close()
        self.channel.close()
        self.http.close()
        self.grpc.close()
        self.background.stop(grace=5)

    def index(self, ready: bool = False) -> list[dict]:
        answer = self.rest.post("/v2/repository/index", json={"ready": ready})
        assert answer.status_code == 200, answer.text
        return answer.json()

    def states(self) -> dict[tuple[str, str], str]:
        return {(row["name"], row["version"]): row["state"] for row in self.index()}

    def versioned(self, value: float = 1.0, client=None) -> tuple[str, float]:
        """(version that answered, y - x) of one call to `versioned`, no version named."""
        client = client or self.grpc
        module = httpclient if isinstance(client, httpclient.InferenceServerClient) else grpcclient
        tensor = module.InferInput("x", [1], "FP32")
        tensor.set_data_from_numpy(np.array([value], np.float32))
        result = client.infer("versioned", [tensor])
        answer = result.get_response()
        version = answer["model_version"] if module is httpclient else answer.model_version
        return version, float(result.as_numpy("y")[0] - value)


@pytest.fixture
def serve():
    started: list[Served] = []

    def start(root: Path, **options) -> Served:
        started.append(Served(root, **options))
        return started[-1]

    yield start
    for served in started:
        served.close()


def slow_input(rows: int) -> np.ndarray:
    return np.random.default_rng(0).random((rows, SLOW_SIZE), dtype=np.float32)


# --------------------------------------------------------------------------------------------------
# The index, load and unload (explicit mode)


def test_index_lists_every_model_on_disk_with_state_and_reason(root, serve):
    served = serve(root, model_control_mode="explicit", load_models=("versioned",))
    rows = served.index()
    assert {"name": "versioned", "version": "1", "state": "READY", "reason": ""} in rows
    assert {"name": "add_sub", "version": "", "state": "UNAVAILABLE", "reason": "not loaded"} in rows
    assert sorted(r["name"] for r in rows) == ["add_sub", "slow", "versioned"]
    assert served.index(ready=True) == [{"name": "versioned", "version": "1", "state": "READY", "reason": ""}]
    # The same through tritonclient (grpc and http) and the raw stub.
    grpc_rows = served.grpc.get_model_repository_index(as_json=True)["models"]
    assert {(r["name"], r.get("state")) for r in grpc_rows} == {("add_sub", "UNAVAILABLE"), ("slow", "UNAVAILABLE"),
                                                                ("versioned", "READY")}  # fmt: skip
    assert served.http.get_model_repository_index() == rows
    ready = served.stub.RepositoryIndex(pb.RepositoryIndexRequest(ready=True))
    assert [(m.name, m.version, m.state) for m in ready.models] == [("versioned", "1", "READY")]


def test_load_and_unload_with_both_clients(root, serve):
    served = serve(root, model_control_mode="explicit")
    assert not served.grpc.is_model_ready("add_sub")
    served.http.load_model("add_sub")
    assert served.grpc.is_model_ready("add_sub") and served.http.is_model_ready("add_sub")
    assert ("add_sub", "1") in served.states() and served.states()[("add_sub", "1")] == "READY"
    health = health_pb2_grpc.HealthStub(served.channel)
    check = health.Check(health_pb2.HealthCheckRequest(service="add_sub"))
    assert check.status == health_pb2.HealthCheckResponse.SERVING

    served.grpc.unload_model("add_sub")
    assert not served.http.is_model_ready("add_sub")
    assert served.states()[("add_sub", "1")] == "UNAVAILABLE"
    assert {"name": "add_sub", "version": "1", "state": "UNAVAILABLE", "reason": "unloaded"} in served.index()
    check = health.Check(health_pb2.HealthCheckRequest(service="add_sub"))
    assert check.status == health_pb2.HealthCheckResponse.NOT_SERVING
    with pytest.raises(grpc.RpcError) as caught:
        served.stub.ModelMetadata(pb.ModelMetadataRequest(name="add_sub"))
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND and "was unloaded" in caught.value.details()
    answer = served.rest.post("/v2/models/add_sub/infer", json={"inputs": []})
    assert answer.status_code == 404 and "was unloaded" in answer.json()["error"]

    # Load again over raw REST and gRPC: it serves again.
    assert served.rest.post("/v2/repository/models/add_sub/load").status_code == 200
    served.stub.RepositoryModelLoad(pb.RepositoryModelLoadRequest(model_name="add_sub"))
    assert served.http.is_model_ready("add_sub")
    served.stub.RepositoryModelUnload(pb.RepositoryModelUnloadRequest(model_name="add_sub"))
    assert served.rest.post("/v2/repository/models/add_sub/unload").status_code == 200  # not loaded: fine
    assert not served.grpc.is_model_ready("add_sub")


def test_load_applies_new_removed_and_changed_versions(root, serve):
    served = serve(root, model_control_mode="explicit", load_models=("versioned",))
    assert served.versioned() == ("1", 100.0)
    put(server_models.plus_constant(200.0), root / "versioned" / "2" / "model.onnx")
    assert served.versioned() == ("1", 100.0)  # explicit mode: nothing changes until a load
    served.grpc.load_model("versioned")
    assert served.grpc.get_model_metadata("versioned", as_json=True)["versions"] == ["1", "2"]
    assert served.versioned(client=served.http) == ("2", 200.0)

    (root / "versioned" / "2" / "model.onnx").unlink()
    (root / "versioned" / "2").rmdir()
    put(server_models.plus_constant(150.0), root / "versioned" / "1" / "model.onnx")  # version 1 rewritten
    served.http.load_model("versioned")
    assert served.http.get_model_metadata("versioned")["versions"] == ["1"]
    assert served.versioned() == ("1", 150.0)
    assert served.grpc.is_model_ready("versioned", "1") and not served.grpc.is_model_ready("versioned", "2")


def test_load_applies_a_changed_config(root, serve):
    served = serve(root, model_control_mode="explicit", load_models=("add_sub",), max_batch_size=0)
    repository = served.background.server.repository
    assert getattr(repository.get("add_sub").runner, "max_batch_size", 0) == 0
    put_config(root / "add_sub", {"max_batch_size": 4})
    served.grpc.load_model("add_sub")
    assert repository.get("add_sub").runner.max_batch_size == 4


def test_none_mode_refuses_load_and_unload(root, serve):
    served = serve(root)  # the default: none
    assert {r["name"] for r in served.index(ready=True)} == {"add_sub", "slow", "versioned"}
    with pytest.raises(InferenceServerException) as caught:
        served.grpc.load_model("versioned")
    assert caught.value.status() == "StatusCode.FAILED_PRECONDITION"
    assert "--model_control_mode" in caught.value.message()
    answer = served.rest.post("/v2/repository/models/versioned/unload")
    assert answer.status_code == 400 and "--model_control_mode explicit" in answer.json()["error"]
    assert served.grpc.is_model_ready("versioned")


def test_unknown_model_and_unsupported_parameters(root, serve):
    served = serve(root, model_control_mode="explicit")
    with pytest.raises(InferenceServerException) as caught:
        served.grpc.load_model("nope")
    assert caught.value.status() == "StatusCode.NOT_FOUND"
    assert "'nope'" in caught.value.message() and "'add_sub', 'slow', 'versioned'" in caught.value.message()
    answer = served.rest.post("/v2/repository/models/nope/unload")
    assert answer.status_code == 404 and "'versioned'" in answer.json()["error"]

    with pytest.raises(InferenceServerException) as caught:
        served.grpc.load_model("versioned", config='{"max_batch_size": 2}')
    assert caught.value.status() == "StatusCode.INVALID_ARGUMENT" and "'config'" in caught.value.message()
    with pytest.raises(InferenceServerException) as caught:
        served.http.load_model("versioned", files={"file:1/model.onnx": b"\x00"})
    assert "'file:1/model.onnx'" in caught.value.message()
    answer = served.rest.post("/v2/repository/models/versioned/unload", json={"parameters": {"force": True}})
    assert answer.status_code == 400 and "'force'" in answer.json()["error"]
    answer = served.rest.post("/v2/repository/models/versioned/unload",
                              json={"parameters": {"unload_dependents": True}})  # fmt: skip
    assert answer.status_code == 200  # no model depends on another here
    assert not served.grpc.is_model_ready("versioned")


@pytest.mark.parametrize("bad", ["not_onnx", "wrong_opset"])
def test_a_broken_version_fails_its_load_and_the_old_one_keeps_serving(root, serve, bad):
    served = serve(root, model_control_mode="explicit", load_models=("versioned",))
    put(b"this is not an ONNX file" if bad == "not_onnx" else wrong_opset(), root / "versioned" / "2" / "model.onnx")
    with pytest.raises(InferenceServerException) as caught:
        served.http.load_model("versioned")
    message = caught.value.message()
    assert str(root / "versioned" / "2" / "model.onnx") in message and "ONNX Runtime cannot load" in message
    assert ("opset" in message.lower()) if bad == "wrong_opset" else ("protobuf" in message.lower())
    row = next(r for r in served.index() if r["version"] == "2")
    assert row["state"] == "UNAVAILABLE" and "ONNX Runtime cannot load" in row["reason"]
    assert served.versioned() == ("1", 100.0)
    with pytest.raises(InferenceServerException) as caught:
        served.grpc.load_model("versioned")
    assert caught.value.status() == "StatusCode.INTERNAL"

    put(server_models.plus_constant(200.0), root / "versioned" / "2" / "model.onnx")  # fixed: loads
    served.grpc.load_model("versioned")
    assert served.versioned() == ("2", 200.0)
    assert all(r["state"] == "READY" for r in served.index() if r["name"] == "versioned")


def test_a_broken_first_load_is_unavailable_with_its_reason(root, serve):
    put(b"garbage", root / "add_sub" / "1" / "model.onnx")
    served = serve(root, model_control_mode="explicit")
    with pytest.raises(InferenceServerException):
        served.grpc.load_model("add_sub")
    row = next(r for r in served.index() if r["name"] == "add_sub")
    assert row["state"] == "UNAVAILABLE" and "ONNX Runtime cannot load" in row["reason"]
    ready = served.stub.ModelReady(pb.ModelReadyRequest(name="add_sub"))
    assert not ready.ready


def test_unload_waits_for_a_call_in_flight_which_succeeds(root, serve):
    served = serve(root, model_control_mode="explicit", load_models=("slow",), max_batch_size=0)
    repository = served.background.server.repository
    model = repository.get("slow")
    answers, states = [], []

    def call() -> None:
        tensor = httpclient.InferInput("x", [2048, SLOW_SIZE], "FP32")
        tensor.set_data_from_numpy(slow_input(2048))
        answers.append(served.http.infer("slow", [tensor]).as_numpy("y").shape)

    def watch() -> None:
        states.append(wait_for(lambda: served.states().get(("slow", "1")) == "UNLOADING", "state UNLOADING"))

    caller = threading.Thread(target=call)
    caller.start()
    wait_for(lambda: repository.calls.of(model) > 0, "the slow call to be in flight")
    watcher = threading.Thread(target=watch)
    watcher.start()
    served.grpc.unload_model("slow")
    assert repository.calls.of(model) == 0  # the unload returned once the call in flight had finished
    caller.join()
    watcher.join()
    assert answers == [(2048, SLOW_SIZE)]  # and that call succeeded
    assert states == [True]  # seen while the unload waited for it
    assert served.states()[("slow", "1")] == "UNAVAILABLE"
    with pytest.raises(InferenceServerException) as caught:
        served.grpc.infer("slow", [grpcclient.InferInput("x", [1, SLOW_SIZE], "FP32").set_data_from_numpy(
            slow_input(1))])  # fmt: skip
    assert caught.value.status() == "StatusCode.NOT_FOUND" and "was unloaded" in caught.value.message()


# --------------------------------------------------------------------------------------------------
# Reload under load: no call fails, answers switch to the new version


def _callers(served: Served, stop: threading.Event, seen: list, failures: list, count: int = 4) -> list:
    def loop(kind) -> None:  # a client per thread: tritonclient's are not shared across threads
        with kind.InferenceServerClient(served.background.address if kind is grpcclient
                                        else served.background.http_address) as client:  # fmt: skip
            while not stop.is_set():
                try:
                    seen.append(served.versioned(client=client))
                except Exception as error:  # noqa: BLE001 -- every failure is what the test counts
                    failures.append(repr(error))

    threads = [threading.Thread(target=loop, args=(kind,)) for kind in [grpcclient, httpclient] * (count // 2)]
    for thread in threads:
        thread.start()
    return threads


@pytest.mark.parametrize("mode", ["explicit", "poll"])
def test_reload_under_load_fails_no_call(root, serve, mode):
    options = {"model_control_mode": mode, "repository_poll_secs": 0.2}
    if mode == "explicit":
        options["load_models"] = ("versioned",)
    served = serve(root, **options)
    stop, seen, failures = threading.Event(), [], []
    threads = _callers(served, stop, seen, failures)
    try:
        wait_for(lambda: len(seen) > 20, "calls on version 1")
        put(server_models.plus_constant(200.0), root / "versioned" / "2" / "model.onnx")
        if mode == "explicit":
            served.grpc.load_model("versioned")
            mark = len(seen)
            wait_for(lambda: len(seen) > mark + 20, "calls after the load")
            # Calls that started on version 1 before the load returned finish on it; the latest are all on 2.
            # (A version-1 answer more than one per caller after the return was seen once and is not explained.)
            recent = seen[-10:]
            assert all(answer == ("2", 200.0) for answer in recent), recent
        else:
            wait_for(lambda: ("2", 200.0) in seen, "the poll to serve version 2")
        put(server_models.plus_constant(300.0), root / "versioned" / "2" / "model.onnx")  # rewrite version 2
        if mode == "explicit":
            served.http.load_model("versioned")
        wait_for(lambda: seen[-1] == ("2", 300.0), "the rewritten version 2")
        mark = len(seen)
        wait_for(lambda: len(seen) > mark + 20, "more calls")
    finally:
        stop.set()
        for thread in threads:
            thread.join()
    assert failures == []
    assert seen[0] == ("1", 100.0) and ("2", 200.0) in seen and seen[-1] == ("2", 300.0)


# --------------------------------------------------------------------------------------------------
# Poll mode


def test_poll_mode_follows_the_directory(root, serve):
    served = serve(root, model_control_mode="poll", repository_poll_secs=0.2)
    with pytest.raises(InferenceServerException) as caught:
        served.http.load_model("versioned")
    assert "poll" in caught.value.message() and "change the files there" in caught.value.message()

    put(server_models.plus_constant(200.0), root / "versioned" / "2" / "model.onnx")  # added version
    wait_for(lambda: served.grpc.is_model_ready("versioned", "2"), "version 2")
    (root / "versioned" / "1" / "model.onnx").unlink()  # removed version
    (root / "versioned" / "1").rmdir()
    wait_for(lambda: not served.grpc.is_model_ready("versioned", "1"), "version 1 to go")
    assert served.grpc.get_model_metadata("versioned", as_json=True)["versions"] == ["2"]

    repository = served.background.server.repository
    put_config(root / "add_sub", {"max_batch_size": 3})  # changed config
    wait_for(lambda: getattr(repository.get("add_sub").runner, "max_batch_size", 0) == 3, "max_batch_size 3")

    put(server_models.echo("FP32"), root / "echo" / "1" / "model.onnx")  # added model
    wait_for(lambda: served.http.is_model_ready("echo"), "the added model")
    health = health_pb2_grpc.HealthStub(served.channel)
    assert health.Check(health_pb2.HealthCheckRequest(service="echo")).status == health_pb2.HealthCheckResponse.SERVING

    for path in sorted((root / "echo").rglob("*"), reverse=True):  # removed model
        path.rmdir() if path.is_dir() else path.unlink()
    (root / "echo").rmdir()
    wait_for(lambda: not served.http.is_model_ready("echo"), "the removed model to go")
    assert "echo" not in {r["name"] for r in served.index()}
    assert health.Check(health_pb2.HealthCheckRequest(service="echo")).status == \
        health_pb2.HealthCheckResponse.NOT_SERVING  # fmt: skip


def test_poll_mode_reports_a_broken_file_once_and_keeps_serving(root, serve):
    served = serve(root, model_control_mode="poll", repository_poll_secs=0.2)
    put(wrong_opset(), root / "versioned" / "2" / "model.onnx")
    row = wait_for(lambda: next((r for r in served.index() if r["version"] == "2" and r["state"] == "UNAVAILABLE"),
                                None), "version 2 to fail")  # fmt: skip
    assert "opset" in row["reason"].lower()
    assert served.versioned() == ("1", 100.0)


# --------------------------------------------------------------------------------------------------
# The command line


def test_cli_explicit_mode_with_load_model(root):
    args = ["--model_repository", str(root), "--model-control-mode", "explicit", "--load-model", "versioned",
            "--load_model", "add_sub", "--metrics_port", "-1"]  # fmt: skip
    with ServerProcess(args) as server:
        client = grpcclient.InferenceServerClient(server.address)
        rows = client.get_model_repository_index(as_json=True)["models"]
        assert sorted(m["name"] for m in rows if m.get("state") == "READY") == ["add_sub", "versioned"]
        client.load_model("slow")
        assert client.is_model_ready("slow")
        client.close()


def test_cli_refuses_model_control_without_a_directory(root, tmp_path):
    model = root / "versioned" / "1" / "model.onnx"
    with pytest.raises(RuntimeError):
        ServerProcess(["--model_path", str(model), "--model_control_mode", "poll"], capture_log=True).start()
    import subprocess
    import sys

    result = subprocess.run([sys.executable, "-m", "ortserve", "serve", "--model_path", str(model),
                             "--model_control_mode", "explicit", "--grpc_port", "0", "--http_port", "-1",
                             "--metrics_port", "-1"], capture_output=True, text=True, timeout=120)  # fmt: skip
    assert result.returncode == 1
    assert "needs a repository directory" in result.stderr and "single model file" in result.stderr
    result = subprocess.run([sys.executable, "-m", "ortserve", "serve", "--model_repository", str(root),
                             "--load_model", "versioned", "--grpc_port", "0", "--http_port", "-1",
                             "--metrics_port", "-1"], capture_output=True, text=True, timeout=120)  # fmt: skip
    assert result.returncode == 1 and "needs --model_control_mode explicit" in result.stderr


# --------------------------------------------------------------------------------------------------
# Warm-up


def slow_warmup(count: int, batch_size: int = 64, **inputs) -> dict:
    given = inputs or {"x": {"data_type": "TYPE_FP32", "dims": [SLOW_SIZE], "random_data": True}}
    return {"model_warmup": [{"name": "warm", "batch_size": batch_size, "inputs": given, "count": count}]}


def test_a_model_is_ready_only_after_its_warm_up(root, serve, caplog):
    put_config(root / "slow", slow_warmup(count=40))
    served = serve(root, model_control_mode="explicit")
    loading = threading.Thread(target=served.grpc.load_model, args=("slow",))
    with caplog.at_level("INFO", logger="ortserve.server.warmup"):
        loading.start()
        wait_for(lambda: served.states().get(("slow", "1")) == "LOADING", "state LOADING")
        assert not served.grpc.is_model_ready("slow")
        assert not served.stub.ModelReady(pb.ModelReadyRequest(name="slow")).ready
        loading.join()
    assert served.http.is_model_ready("slow")
    assert any("warm-up 'warm' ran 40 time(s) with batch size 64" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("inputs, expected", [
    ({"y": {"data_type": "TYPE_FP32", "dims": [SLOW_SIZE], "zero_data": True}}, "lists no 'x'"),
    ({"x": {"data_type": "TYPE_FP32", "dims": [7], "zero_data": True}}, "does not fit the model"),
    ({"x": {"data_type": "TYPE_INT8", "dims": [SLOW_SIZE], "zero_data": True}}, "does not fit the model"),
    ({"x": {"data_type": "TYPE_FLOAT", "dims": [SLOW_SIZE], "zero_data": True}}, "has data_type 'TYPE_FLOAT'"),
    ({"x": {"data_type": "TYPE_FP32", "dims": [SLOW_SIZE]}}, "exactly one of zero_data"),
])  # fmt: skip
def test_a_bad_warm_up_config_fails_the_load_clearly(root, serve, inputs, expected):
    served = serve(root, model_control_mode="explicit", load_models=("slow",))
    put_config(root / "slow", slow_warmup(count=1, **inputs))
    with pytest.raises(InferenceServerException) as caught:
        served.grpc.load_model("slow")
    assert expected in caught.value.message() and "slow" in caught.value.message()
    row = next(r for r in served.index() if r["name"] == "slow")
    assert row["state"] == "READY" and expected in row["reason"]  # the version loaded before keeps serving
    assert served.grpc.is_model_ready("slow")


def test_a_bad_warm_up_config_refuses_to_start(root):
    put_config(root / "slow", slow_warmup(count=1, y={"data_type": "FP32", "dims": [3], "zero_data": True}))
    from ortserve.server.errors import RepositoryError

    with pytest.raises(RepositoryError, match="lists no 'x'"):
        BackgroundServer(root, ServerOptions(port=0))
