"""Several server processes (`serve --replicas N`) and the clients that spread calls over them.

The supervisor runs as a real subprocess; its replicas' log lines carry a `replica I: ` prefix, and with
--log_level verbose each replica logs every call it admits, which is how these tests tell which replica answered.
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import socket
import sys
import time

import numpy as np
import psutil
import pytest
import server_models

from ortserve import bench
from ortserve.client import AsyncInferenceClient, InferenceClient, channel_target, infer_request
from ortserve.server.app import BackgroundServer, ServerOptions
from ortserve.server import cli
from ortserve.server.cli import ServerProcess
from ortserve.server.replicas import REPLICA_ENV

ONE = np.array([1.0], np.float32)


@pytest.fixture(scope="module")
def replica_repository(tmp_path_factory):
    root = tmp_path_factory.mktemp("replica_repository")
    server_models.save(server_models.plus_constant(1.0), root / "plus_one" / "1" / "model.onnx")
    return root


def start_replicas(repository, *extra: str, count: int = 2) -> ServerProcess:
    args = ["--replicas", str(count), "--grpc_port", "0", "--model_repository", str(repository), *extra]
    return ServerProcess(args, python=sys.executable, capture_log=True).start()


def replica_pids(server: ServerProcess) -> list[int]:
    return [child.pid for child in psutil.Process(server.process.pid).children()]


def wait_gone(pids: list[int], timeout: float = 60.0) -> list[int]:
    """The pids still running after `timeout` seconds (none, hopefully)."""
    deadline = time.monotonic() + timeout
    while (alive := [p for p in pids if psutil.pid_exists(p) and psutil.Process(p).status() != "zombie"]) and (
        time.monotonic() < deadline
    ):
        time.sleep(0.1)
    return alive


def test_replicas_share_the_calls_of_a_round_robin_client_and_stop_together(replica_repository):
    with socket.socket() as probe:  # a port that is free now (and, most likely, the next one too)
        probe.bind(("127.0.0.1", 0))
        base = probe.getsockname()[1]
    server = start_replicas(replica_repository, "--grpc_port", str(base), "--log_level", "verbose")
    try:
        # Replica i listens on --grpc_port + i; the extra endpoints (here on free ports) get ports of their own.
        assert server.addresses == [f"127.0.0.1:{base}", f"127.0.0.1:{base + 1}"]
        assert server.address == server.addresses[0]
        pids = replica_pids(server)
        assert len(pids) == 2
        # The cores are shared out: each replica gets its share of workers and one ONNX Runtime thread per worker.
        cores_each = max(1, (os.cpu_count() or 1) // 2)
        for pid in pids:
            command = psutil.Process(pid).cmdline()
            replica = cli.build_parser().parse_args(command[command.index("serve") + 1:])
            assert (replica.replicas, replica.workers, replica.num_threads) == (1, cores_each, 1)
        ports = [int(a.rpartition(":")[2]) for a in server.addresses]
        for name in ("REST", "metrics"):
            addresses = server.endpoints[name].split(",")
            assert len(addresses) == 2
            ports += [int(a.rpartition(":")[2]) for a in addresses]
        assert len(set(ports)) == 6
        with InferenceClient(server.addresses, timeout=60) as client:
            for _ in range(40):
                np.testing.assert_array_equal(client.infer("plus_one", ONE)["y"], [2.0])
        admitted = {0: 0, 1: 0}
        while sum(admitted.values()) < 40:
            match = server.wait_for_log(r"^replica (\d): .*admitted call #\d+")
            admitted[int(match[1])] += 1
        assert admitted[0] > 0 and admitted[1] > 0, admitted
        for address in server.addresses:
            with InferenceClient(address) as one:
                assert one.health() == "SERVING"
        server.process.send_signal(signal.SIGTERM)
        assert server.process.wait(120) == 0
        assert not wait_gone(pids)
    finally:
        server.terminate()


def test_a_replica_that_dies_stops_the_others_and_the_supervisor_says_which(replica_repository):
    server = start_replicas(replica_repository, "--log_level", "warning")
    try:
        survivor, victim = map(psutil.Process, replica_pids(server))
        index = victim.environ()[REPLICA_ENV]
        victim.kill()
        assert server.process.wait(120) == 1
        match = server.wait_for_log(r"replica (\d) \(pid (\d+), [^)]*\) ended while serving: killed by SIGKILL")
        assert (match[1], int(match[2])) == (index, victim.pid)
        assert not wait_gone([survivor.pid])  # the other one was stopped
    finally:
        server.terminate()


def test_replicas_follow_a_supervisor_that_is_killed(replica_repository):
    server = start_replicas(replica_repository, "--log_level", "warning")
    try:
        pids = replica_pids(server)
        server.process.kill()  # no chance to forward anything
        server.process.wait(60)
        assert not wait_gone(pids), "replicas outlived their supervisor"
    finally:
        server.terminate()


def test_a_replica_that_cannot_start_fails_the_supervisor(replica_repository):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            base = probe.getsockname()[1]
        # Replica 0 on a free port, replica 1 on the taken one: --grpc_port is the taken port - 1 when that is free.
        base = port - 1 if _free(port - 1) else base
        server = ServerProcess(["--replicas", "2", "--grpc_port", str(base), "--model_repository",
                                str(replica_repository)], capture_log=True)  # fmt: skip
        with pytest.raises(RuntimeError, match="exited"):
            server.start()
        assert server.process.returncode == 1
        if base == port - 1:
            server.wait_for_log(r"replica 1 \(pid \d+\) ended before it was serving: exit status 1")


def _free(port: int) -> bool:
    with socket.socket() as probe:
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def test_replicas_must_be_zero_or_more(replica_repository):
    server = ServerProcess(["--replicas", "-1", "--model_repository", str(replica_repository)], capture_log=True)
    with pytest.raises(RuntimeError):
        server.start()
    assert server.process.returncode == 2
    server.wait_for_log(r"--replicas must be 0 \(one per core\) or more, got -1")


# --------------------------------------------------------------------------------------------------
# Round robin on the client side: in-process servers, whose admission gates count the calls each answered


@pytest.fixture
def two_servers(replica_repository):
    with BackgroundServer(replica_repository, ServerOptions(port=0)) as a, \
            BackgroundServer(replica_repository, ServerOptions(port=0)) as b:  # fmt: skip
        yield a, b


def test_round_robin_spreads_calls_and_retries_a_draining_server_elsewhere(two_servers):
    a, b = two_servers
    with InferenceClient([a.address, b.address], timeout=60) as client:
        for _ in range(20):
            client.infer("plus_one", ONE)
        assert a.server.gate.admitted + b.server.gate.admitted == 20
        assert a.server.gate.admitted > 0 and b.server.gate.admitted > 0
        # What a server does first when it drains: it turns new calls away with UNAVAILABLE.
        b.server.gate.close()
        before = a.server.gate.admitted, b.server.gate.admitted
        with InferenceClient(b.address) as direct, pytest.raises(Exception, match="UNAVAILABLE"):
            direct.infer("plus_one", ONE)
        for _ in range(20):
            np.testing.assert_array_equal(client.infer("plus_one", ONE)["y"], [2.0])
        assert (a.server.gate.admitted, b.server.gate.admitted) == (before[0] + 20, before[1])
        # And once it is gone altogether, the calls keep going to the one left.
        b.stop(grace=0)
        for _ in range(10):
            np.testing.assert_array_equal(client.infer("plus_one", ONE)["y"], [2.0])
        assert a.server.gate.admitted == before[0] + 30


def test_async_client_and_load_generator_take_several_addresses(two_servers):
    a, b = two_servers

    async def calls() -> None:
        async with AsyncInferenceClient([a.address, b.address], timeout=60) as client:
            for _ in range(10):
                np.testing.assert_array_equal((await client.infer("plus_one", ONE))["y"], [2.0])

    asyncio.run(calls())
    assert a.server.gate.admitted > 0 and b.server.gate.admitted > 0
    admitted = a.server.gate.admitted, b.server.gate.admitted
    request = infer_request("plus_one", {"x": ONE}, None, None)
    result = bench.run_load([a.address, b.address], request, concurrency=4, seconds=0.5, warmup_seconds=0.2)
    assert result.errors == 0 and result.requests > 0
    assert a.server.gate.admitted > admitted[0] and b.server.gate.admitted > admitted[1]


def test_channel_target():
    assert channel_target("127.0.0.1:1") == ("127.0.0.1:1", [])
    assert channel_target("dns:///ortserve-headless:50051") == ("dns:///ortserve-headless:50051", [])
    assert channel_target(["127.0.0.1:1"]) == ("127.0.0.1:1", [])
    target, options = channel_target(["localhost:1", "127.0.0.1:2"])
    assert target == "ipv4:127.0.0.1:1,127.0.0.1:2"
    assert dict(options)["grpc.default_authority"] == "localhost:1"
    assert '"round_robin"' in dict(options)["grpc.service_config"]
    assert channel_target(["[::1]:1", "[::1]:2"])[0] == "ipv6:[::1]:1,[::1]:2"
    with pytest.raises(ValueError, match="mix IPv4 and IPv6"):
        channel_target(["127.0.0.1:1", "[::1]:2"])
    with pytest.raises(ValueError, match=re.escape("expected HOST:PORT, got '127.0.0.1'")):
        channel_target(["127.0.0.1", "127.0.0.1:2"])
    with pytest.raises(ValueError, match="no server address"):
        channel_target([])


def test_ready_line_lists_every_replica():
    line = cli.READY_LINE.format(address="127.0.0.1:50051,127.0.0.1:50052 with TLS", models="plus_one v1")
    match = cli.READY_PATTERN.match(line)
    assert match["addresses"].split(",") == ["127.0.0.1:50051", "127.0.0.1:50052"]
    assert (match["host"], match["port"], match["security"], match["models"]) == ("127.0.0.1", "50051", "TLS",
                                                                                  "plus_one v1")  # fmt: skip
