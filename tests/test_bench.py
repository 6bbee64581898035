"""The timing helper and the load generator measure what they claim to (counts and statuses, never speed)."""

import asyncio
import json
import threading

import grpc
import numpy as np
import pytest

from ortserve import bench


def test_timing_statistics_from_known_samples():
    timing = bench.Timing.from_seconds([0.001 * i for i in range(1, 101)])
    assert timing.n == 100 and timing.min_ms == pytest.approx(1.0)
    assert timing.median_ms == pytest.approx(50.5) and timing.p99_ms == pytest.approx(99.01)


def test_time_calls_warms_up_then_repeats():
    calls = []
    timing = bench.time_calls(lambda: calls.append(1), warmup=3, repeats=10, min_seconds=0.0)
    assert timing.n == 10 and len(calls) == 13


def test_timing_refuses_no_samples():
    with pytest.raises(ValueError, match="no samples"):
        bench.Timing.from_seconds([])


class _RawServer:
    """A grpc.aio server on a free port whose ModelInfer answers `reply`, or fails every `fail_every`-th call."""

    def __init__(self, reply: bytes = b"", fail_every: int = 0):
        self.reply, self.fail_every, self.calls = reply, fail_every, 0
        self.loop = asyncio.new_event_loop()
        self.ready = threading.Event()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)

    async def _handle(self, request: bytes, context):
        self.calls += 1
        if self.fail_every and self.calls % self.fail_every == 0:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "every third call fails")
        return self.reply

    async def _start(self):
        handler = grpc.method_handlers_generic_handler(
            "inference.GRPCInferenceService", {"ModelInfer": grpc.unary_unary_rpc_method_handler(self._handle)}
        )
        self.server = grpc.aio.server(handlers=[handler])
        self.port = self.server.add_insecure_port("127.0.0.1:0")
        await self.server.start()

    def __enter__(self):
        self.thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self.loop).result(10)
        return self

    def __exit__(self, *exc):
        asyncio.run_coroutine_threadsafe(self.server.stop(None), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


def test_load_counts_answers_and_latencies():
    with _RawServer() as server:
        result = bench.run_load(f"127.0.0.1:{server.port}", b"\x0a\x01x", concurrency=4, seconds=0.5,
                                warmup_seconds=0.2)
    assert result.concurrency == 4 and result.errors == 0 and result.requests > 0
    assert result.latency.n == result.requests and result.throughput == result.requests / 0.5
    assert server.calls >= result.requests  # warm-up calls are sent but not counted


def test_load_counts_errors_apart():
    with _RawServer(fail_every=3) as server:
        result = bench.run_load(f"127.0.0.1:{server.port}", b"", concurrency=2, seconds=0.5, warmup_seconds=0.1)
    assert result.errors > 0 and result.requests > 0
    assert abs(result.errors * 2 - result.requests) <= 4  # one in three fails


def test_load_rejects_zero_callers():
    with pytest.raises(ValueError, match="at least 1"):
        bench.run_load("127.0.0.1:1", b"", concurrency=0)


def test_load_generator_in_worker_processes_merges_their_counts():
    with _RawServer() as server, bench.LoadGenerator(processes=2) as load:
        result = load.run(f"127.0.0.1:{server.port}", b"", concurrency=3, seconds=0.3, warmup_seconds=0.1)
    assert result.concurrency == 3 and result.errors == 0 and result.requests > 0
    assert server.calls >= result.requests


def test_bench_command_reports_every_server_and_ratio(tmp_path, capsys):
    from ortserve.__main__ import main

    out = tmp_path / "bench.json"
    args = ["bench", "--model", "digits_cnn", "--concurrency", "1,2", "--seconds", "0.2", "--warmup", "0.1",
            "--rounds", "3", "--json", str(out)]  # fmt: skip
    assert main(args) == 0
    report = json.loads(out.read_text())
    assert report["in_process"]["throughput"] > 0 and report["in_process"]["batch"] == 1
    assert report["rounds"] == 3
    for kind in ("served", "baseline", "handoff", "protocol", "echo"):
        assert [r["concurrency"] for r in report["servers"][kind]] == [1, 2], kind
        assert all(r["requests"] > 0 and r["errors"] == 0 for r in report["servers"][kind]), kind
        for point in report["servers"][kind]:  # the median of three rounds, each of which measured the point
            rounds = sorted(point["throughput_rounds"])
            assert len(rounds) == 3 and point["throughput"] == rounds[1], kind
    assert [r["concurrency"] for r in report["ratios"]] == [1, 2]
    for ratio in report["ratios"]:
        assert {"served/echo", "protocol/echo", "handoff/echo", "served/handoff", "served/baseline",
                "served/in_process", "p50_ms_served-baseline"} <= set(ratio)  # fmt: skip
        assert all(np.isfinite(v) for v in ratio.values())
    printed = capsys.readouterr().out
    for label in ("in-process ONNX Runtime", "served", "baseline", "handoff", "protocol", "echo", "served/echo",
                  "protocol/echo", "handoff/echo", "served/handoff", "served/baseline", "served/in-process",
                  "median of 3 interleaved rounds"):  # fmt: skip
        assert label in printed


def test_bench_command_refuses_zero_rounds(capsys):
    from ortserve.__main__ import main

    with pytest.raises(SystemExit):
        main(["bench", "--rounds", "0"])
    assert "--rounds must be at least 1, got 0" in capsys.readouterr().err


# --------------------------------------------------------------------------------------------------
# The HTTP path: the same closed loop POSTing a pre-built body, every answer checked


@pytest.fixture(scope="module")
def rest_server():
    """A real server (gRPC and REST, each on a free port) serving the digits CNN as `default`."""
    from ortserve import zoo
    from ortserve.server.app import BackgroundServer, ServerOptions

    with BackgroundServer(zoo.ensure("digits_cnn"), ServerOptions(port=0, http_port=0)) as running:
        yield running


@pytest.fixture(scope="module")
def digits_and_logits():
    """Two test images and the CNN's logits for them, computed in this process."""
    import onnxruntime as ort

    from ortserve import data, zoo

    images = data.as_images(data.load_digits_split().X_test[:2])
    session = ort.InferenceSession(str(zoo.ensure("digits_cnn")), providers=["CPUExecutionProvider"])
    return images, session.run(["logits"], {"input": images})[0]


def json_infer_body(images: np.ndarray) -> bytes:
    tensor = {"name": "input", "shape": list(images.shape), "datatype": "FP32", "data": images.ravel().tolist()}
    return json.dumps({"inputs": [tensor]}).encode()


def binary_infer_request(images: np.ndarray, expected: dict) -> bench.HttpRequest:
    """The binary data extension both ways: raw float32 after the JSON header, logits back as raw bytes."""
    raw = images.tobytes()
    header = json.dumps({"inputs": [{"name": "input", "shape": list(images.shape), "datatype": "FP32",
                                     "parameters": {"binary_data_size": len(raw)}}],
                         "parameters": {"binary_data_output": True}}).encode()  # fmt: skip
    headers = (("Content-Type", "application/octet-stream"), ("Inference-Header-Content-Length", str(len(header))))
    return bench.HttpRequest("/v2/models/default/infer", header + raw, headers, expected)


def test_http_load_checks_json_and_binary_answers(rest_server, digits_and_logits):
    images, logits = digits_and_logits
    requests = {
        "json": bench.HttpRequest("/v2/models/default/infer", json_infer_body(images), expected={"logits": logits}),
        "binary": binary_infer_request(images, {"logits": logits}),
    }
    for form, request in requests.items():
        result = bench.run_load(rest_server.http_address, request, concurrency=3, seconds=0.4, warmup_seconds=0.1)
        assert result.errors == 0 and result.requests > 0, form
        assert result.latency.n == result.requests and result.throughput == result.requests / 0.4, form


def test_http_wrong_answers_are_errors_not_answers(rest_server, digits_and_logits):
    images, logits = digits_and_logits
    wrong = bench.HttpRequest("/v2/models/default/infer", json_infer_body(images), expected={"logits": logits + 1})
    with pytest.raises(RuntimeError, match="every request failed.*output 'logits' is not the expected one"):
        bench.run_load(rest_server.http_address, wrong, concurrency=2, seconds=0.3, warmup_seconds=0.1)
    missing = bench.HttpRequest("/v2/models/default/infer", json_infer_body(images), expected={"probabilities": logits})
    with pytest.raises(RuntimeError, match="no output 'probabilities'.*'logits'"):
        bench.run_load(rest_server.http_address, missing, concurrency=1, seconds=0.2, warmup_seconds=0.0)


def test_http_errors_are_errors_not_answers(rest_server, digits_and_logits):
    images, _ = digits_and_logits
    unknown = bench.HttpRequest("/v2/models/digits_rnn/infer", json_infer_body(images))
    with pytest.raises(RuntimeError, match="every request failed.*HTTP 404.*digits_rnn"):
        bench.run_load(rest_server.http_address, unknown, concurrency=2, seconds=0.3, warmup_seconds=0.1)
    flat = bench.HttpRequest("/v2/models/default/infer", json_infer_body(images.reshape(2, 64)))
    with pytest.raises(RuntimeError, match="HTTP 400"):
        bench.run_load(rest_server.http_address, flat, concurrency=1, seconds=0.2, warmup_seconds=0.0)


def test_http_load_in_worker_processes(rest_server, digits_and_logits):
    images, logits = digits_and_logits
    request = binary_infer_request(images, {"logits": logits})  # pickled to the worker process, checked there
    with bench.LoadGenerator(processes=1) as load:
        result = load.run(rest_server.http_address, request, concurrency=2, seconds=0.3, warmup_seconds=0.1)
    assert result.concurrency == 2 and result.errors == 0 and result.requests > 0


class _RawHttpServer:
    """An aiohttp server on a free port answering {"label": [7]}, but every `fail_every`-th call a wrong label,
    the next one HTTP 500, in turn, so that both kinds of failure are counted."""

    def __init__(self, fail_every: int):
        self.fail_every, self.calls, self.failures = fail_every, 0, 0
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)

    async def _handle(self, request):
        from aiohttp import web

        await request.read()
        self.calls += 1
        if self.calls % self.fail_every:
            return web.json_response({"label": [7]})
        self.failures += 1
        if self.failures % 2:
            return web.json_response({"label": [3]})
        return web.json_response({"error": "failed on purpose"}, status=500)

    async def _start(self):
        from aiohttp import web

        app = web.Application()
        app.router.add_post("/predict", self._handle)
        self.runner = web.AppRunner(app)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        self.address = "127.0.0.1:%d" % site._server.sockets[0].getsockname()[1]

    def __enter__(self):
        self.thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self.loop).result(10)
        return self

    def __exit__(self, *exc):
        asyncio.run_coroutine_threadsafe(self.runner.cleanup(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


def test_http_load_counts_failures_apart_and_checks_any_json():
    request = bench.HttpRequest("/predict", b'{"pixels": [0.0]}', expected={"label": np.array([7])})
    with _RawHttpServer(fail_every=3) as server:
        result = bench.run_load(server.address, request, concurrency=1, seconds=0.5, warmup_seconds=0.0)
    assert result.errors > 0 and result.requests > 0
    assert abs(result.errors * 2 - result.requests) <= 2  # one in three fails, wrong label or HTTP 500
    assert server.calls >= result.requests + result.errors


def test_http_load_spreads_calls_over_addresses():
    request = bench.HttpRequest("/predict", b"{}", expected={"label": np.array([7])})
    with _RawHttpServer(fail_every=10**9) as a, _RawHttpServer(fail_every=10**9) as b:
        result = bench.run_load([a.address, b.address], request, concurrency=2, seconds=0.3, warmup_seconds=0.0)
    assert result.errors == 0 and result.requests > 0
    assert a.calls > 0 and b.calls > 0 and abs(a.calls - b.calls) <= 2  # taken in turn


@pytest.mark.parametrize("kind", ["protocol", "handoff"])
def test_the_parsing_ceilings_answer_each_request_with_its_own_id_and_the_fixed_outputs(tmp_path, kind):
    import grpc

    from ortserve._proto import grpc_service_pb2 as pb
    from ortserve.yardsticks import YardstickProcess

    reply = pb.ModelInferResponse(model_name="digits_cnn", model_version="1", id="from the reply file")
    reply.outputs.add(name="logits", datatype="FP32", shape=[1, 2])
    reply.raw_output_contents.append(np.array([[1.5, -2.0]], dtype=np.float32).tobytes())
    (tmp_path / "reply.bin").write_bytes(reply.SerializeToString())
    with YardstickProcess([kind, "--reply", str(tmp_path / "reply.bin")]) as ceiling:
        with grpc.insecure_channel(ceiling.address) as channel:
            call = channel.unary_unary(bench.MODEL_INFER, request_serializer=pb.ModelInferRequest.SerializeToString,
                                       response_deserializer=pb.ModelInferResponse.FromString)  # fmt: skip
            pending = [call.future(pb.ModelInferRequest(model_name="digits_cnn", id=f"call {i}"), timeout=30)
                       for i in range(3)]  # fmt: skip
            answers = [p.result() for p in pending]  # concurrent: the hand-off ceiling joins them
            with pytest.raises(grpc.RpcError):  # it parses: bytes that are not a ModelInferRequest fail
                channel.unary_unary(bench.MODEL_INFER)(b"\xff\xff\xff", timeout=30)
    assert [a.id for a in answers] == ["call 0", "call 1", "call 2"]
    for answer in answers:
        assert (answer.model_name, list(answer.outputs[0].shape)) == ("digits_cnn", [1, 2])
        assert answer.raw_output_contents == reply.raw_output_contents
