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
            "--json", str(out)]  # fmt: skip
    assert main(args) == 0
    report = json.loads(out.read_text())
    assert report["in_process"]["throughput"] > 0 and report["in_process"]["batch"] == 1
    for kind in ("served", "baseline", "echo"):
        assert [r["concurrency"] for r in report["servers"][kind]] == [1, 2], kind
        assert all(r["requests"] > 0 and r["errors"] == 0 for r in report["servers"][kind]), kind
    assert [r["concurrency"] for r in report["ratios"]] == [1, 2]
    for ratio in report["ratios"]:
        assert {"served/echo", "served/baseline", "served/in_process", "p50_ms_served-baseline"} <= set(ratio)
        assert all(np.isfinite(v) for v in ratio.values())
    printed = capsys.readouterr().out
    for label in ("in-process ONNX Runtime", "served", "baseline", "echo", "served/echo", "served/baseline",
                  "served/in-process"):  # fmt: skip
        assert label in printed
