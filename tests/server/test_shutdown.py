"""Graceful shutdown of `python -m ortserve serve` on SIGTERM/SIGINT, with calls in flight."""

from __future__ import annotations

import signal
import sys
from concurrent.futures import ThreadPoolExecutor

import grpc
import numpy as np
import onnxruntime as ort
import pytest
import server_models

from ortserve.client import InferenceClient, InferenceServerError
from ortserve.server.cli import ServerProcess

N_CALLS = 24


@pytest.fixture(scope="module")
def slow_repository(tmp_path_factory):
    root = tmp_path_factory.mktemp("slow_repository")
    server_models.save(server_models.slow(), root / "slow" / "1" / "model.onnx")
    return root


def start(repository, *extra: str) -> ServerProcess:
    # One worker and one ONNX Runtime thread: calls queue up, so several are in flight when the signal comes.
    # The verbose log says when each call is admitted (see ortserve.server.gate).
    args = ["--grpc_port", "0", "--model_repository", str(repository), "--workers", "1", "--num_threads", "1",
            "--log_level", "verbose", *extra]  # fmt: skip
    return ServerProcess(args, python=sys.executable, capture_log=True).start()


def test_sigterm_lets_calls_in_flight_finish(slow_repository):
    x = np.random.default_rng(0).random((128, 384), dtype=np.float32)
    model_file = slow_repository / "slow" / "1" / "model.onnx"
    session = ort.InferenceSession(str(model_file), providers=["CPUExecutionProvider"])
    expected = session.run(None, {"x": x})[0]
    server = start(slow_repository, "--grace_period", "120")
    try:
        with InferenceClient(server.address, timeout=120) as client, ThreadPoolExecutor(N_CALLS) as pool:
            calls = [pool.submit(client.infer, "slow", {"x": x}) for _ in range(N_CALLS)]
            server.wait_for_log(rf"admitted call #{N_CALLS} ")  # every call has reached the server
            server.process.send_signal(signal.SIGTERM)
            with InferenceClient(server.address, timeout=60) as observer:
                statuses = set()
                while "NOT_SERVING" not in statuses:
                    statuses.add(observer.health())
                assert observer.health("slow") == "NOT_SERVING"
                assert observer.server_ready() is False
                with pytest.raises(InferenceServerError) as refused:
                    observer.infer("slow", {"x": x})
                assert refused.value.code == grpc.StatusCode.UNAVAILABLE
                assert "shutting down" in refused.value.message
            for call in calls:
                np.testing.assert_allclose(call.result()["y"], expected, rtol=1e-5, atol=1e-5)
        assert server.process.wait(120) == 0
    finally:
        server.terminate()


def test_sigint_with_nothing_in_flight_exits_zero(slow_repository):
    server = start(slow_repository)
    try:
        with InferenceClient(server.address, timeout=60) as client:
            assert client.server_ready()
        server.process.send_signal(signal.SIGINT)
        assert server.process.wait(60) == 0
    finally:
        server.terminate()


def test_grace_period_cuts_long_drains(slow_repository):
    """With a short grace period the server stops on time: calls still queued fail, none hangs, exit status 0."""
    x = np.zeros((256, 384), np.float32)
    server = start(slow_repository, "--grace_period", "0.2")
    try:
        with InferenceClient(server.address, timeout=120) as client, ThreadPoolExecutor(N_CALLS) as pool:
            calls = [pool.submit(client.infer, "slow", {"x": x}) for _ in range(N_CALLS)]
            server.wait_for_log(rf"admitted call #{N_CALLS} ")
            server.process.send_signal(signal.SIGTERM)
            assert server.process.wait(120) == 0
            for call in calls:
                error = call.exception()
                if error is not None:
                    assert isinstance(error, InferenceServerError)
                    assert error.code in (grpc.StatusCode.CANCELLED, grpc.StatusCode.UNAVAILABLE), error
    finally:
        server.terminate()
