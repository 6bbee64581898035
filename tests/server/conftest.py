"""Fixtures of the server tests: real servers on ephemeral ports, real channels.

Most tests share one in-process server (BackgroundServer: the grpc.aio server and the REST endpoint on one event
loop in a thread) over a repository of small models built here (server_models) plus the zoo's digits models.
Shutdown and CLI tests start `python -m ortserve serve --grpc_port 0` as a subprocess. Every directory is a
per-session or per-test temp dir and every port is picked by the system, so the tests run side by side under
pytest-xdist.
"""

from __future__ import annotations

from pathlib import Path

import grpc
import onnxruntime as ort
import pytest

import server_models  # tests/server/server_models.py (pytest puts this folder on sys.path)
from ortserve import zoo
from ortserve._proto import grpc_service_pb2_grpc, predict_pb2_grpc
from ortserve.client import InferenceClient
from ortserve.server.app import BackgroundServer, ServerOptions

DIGITS_MODELS = zoo.DEFAULT_REPOSITORY_MODELS


@pytest.fixture(scope="session")
def digits_repository() -> Path:
    """The server's default repository (digits_cnn, digits_forest, digits_xgb), built once if missing."""
    return zoo.ensure_repository()


@pytest.fixture(scope="session")
def repository(tmp_path_factory, digits_repository) -> Path:
    """Small test models plus copies of the digits models."""
    root = server_models.build_repository(tmp_path_factory.mktemp("repository"))
    for name in DIGITS_MODELS:
        server_models.copy_version(digits_repository, root, name)
    return root


@pytest.fixture(scope="session")
def server(repository):
    """The shared server: gRPC and the REST endpoint (ortserve.server.rest), each on a free port."""
    with BackgroundServer(repository, ServerOptions(port=0, http_port=0)) as running:
        yield running


@pytest.fixture(scope="session")
def rest_url(server) -> str:
    """http://HOST:PORT of the shared server's REST endpoint."""
    return f"http://{server.http_address}"


@pytest.fixture(scope="session")
def channel(server):
    with grpc.insecure_channel(server.address) as ch:
        yield ch


@pytest.fixture(scope="session")
def v2_stub(channel):
    return grpc_service_pb2_grpc.GRPCInferenceServiceStub(channel)


@pytest.fixture(scope="session")
def client(server):
    with InferenceClient(server.address, timeout=60) as c:
        yield c


@pytest.fixture(scope="session")
def legacy_server(digits_repository):
    """A server given one model file, as run_ort_server.sh --model_path does: it is called `default`."""
    with BackgroundServer(digits_repository / "digits_cnn" / "1" / "model.onnx", ServerOptions(port=0)) as running:
        yield running


@pytest.fixture(scope="session")
def legacy_stub(legacy_server):
    with grpc.insecure_channel(legacy_server.address) as ch:
        yield predict_pb2_grpc.PredictionServiceStub(ch)


@pytest.fixture(scope="session")
def ort_session():
    """In-process ONNX Runtime sessions, by model path, to compare the server's answers with."""
    sessions: dict[Path, ort.InferenceSession] = {}

    def get(path: Path) -> ort.InferenceSession:
        if path not in sessions:
            sessions[path] = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        return sessions[path]

    return get

