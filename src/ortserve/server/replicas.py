"""`python -m ortserve serve --replicas N`: N server processes on one machine, one port each, under one supervisor.

One server process runs its Python code (decoding, encoding, the event loop) on one core at a time, while ONNX
Runtime's threads use the others. When that Python code is the limit -- small models, many callers -- several
processes serve more than one. The supervisor

- starts N replicas, each `python -m ortserve serve` with the same flags, except that every port flag is shifted
  by the replica's index: --grpc_port 50051 gives 50051, 50052, ...; every extra endpoint's port flag
  (cli.EPHEMERAL_PORT_FLAGS: REST, metrics) moves the same way, so no two replicas ever ask for the same port. A
  port given as 0 stays 0 for every replica (each gets a free port of its own). With the defaults,
  `--replicas 2` serves gRPC on 50051 and 50052, REST on 9001 and 9002, metrics on 8002 and 8003;
- shares out the cores: unless --workers / --num_threads are given, each replica gets cores / N of them (at least
  one), so N replicas together run no more threads than there are cores;
- resolves the default model repository once (building it if missing) and gives every replica its path;
- waits until every replica serves, then prints one endpoint line per extra endpoint and one serving line listing
  every replica's address, comma-separated, in replica order (cli.READY_PATTERN and ServerProcess read it):

      ortserve: serving on 127.0.0.1:50051,127.0.0.1:50052 (models: digits_cnn v1, ...)

- prefixes each replica's log lines (stderr) with `replica I: `;
- forwards SIGTERM/SIGINT to every replica (each drains gracefully; a second signal cuts their grace period) and
  exits 0 once all exited 0;
- exits 1 if a replica exits on its own (it crashed, was killed, or could not start, e.g. its port was taken):
  it says which replica and how it ended, stops the others gracefully, and leaves restarting to whatever runs it
  (systemd, Docker's restart policy, Kubernetes);
- is followed by its replicas if it dies itself, even by SIGKILL: each replica's stdin is a pipe from the
  supervisor, and a replica that sees it close shuts down gracefully (`follow_supervisor`).

Why a port each, not one port shared with SO_REUSEPORT: one gRPC channel is one TCP connection, and the kernel
hands a connection to one of the processes listening on a shared port for the connection's whole life. So a
client with one channel -- the usual case -- pins all its calls to one replica, and a few clients land on the
replicas by the luck of a hash. With a port each, a client that knows every address spreads its calls itself:
`InferenceClient([address, address, ...])` uses gRPC's round_robin policy, one connection per replica, calls
taken in turn. (The server refuses to share a port on purpose: see ServerOptions in ortserve.server.app.)
In Kubernetes, run one replica per pod and let the Service and the HorizontalPodAutoscaler do this job (deploy/).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
import threading
from dataclasses import dataclass, field
from typing import Sequence

from ortserve.server import cli
from ortserve.server.errors import RepositoryError

log = logging.getLogger("ortserve.server.replicas")

# Set in each replica's environment to its index: the replica then follows its supervisor (follow_supervisor).
REPLICA_ENV = "ORTSERVE_REPLICA"
# How a replica may end once asked to stop: drained (0), or killed by the signal itself if it came before the
# replica had installed its handlers.
CLEAN_STOP = (0, -signal.SIGTERM, -signal.SIGINT)


def replica_count(requested: int) -> int:
    """--replicas: 0 means one per core."""
    if requested < 0:
        raise ValueError(f"--replicas must be 0 (one per core) or more, got {requested}")
    return requested or (os.cpu_count() or 1)


def port_flags() -> tuple[str, ...]:
    """Every flag that names a port a replica listens on."""
    return ("--grpc_port", *cli.EPHEMERAL_PORT_FLAGS)


def replica_args(argv: Sequence[str], args: argparse.Namespace, index: int, count: int,
                 model_repository: str | None = None) -> list[str]:  # fmt: skip
    """The flags of replica `index` of `count`: the supervisor's own, then the overrides (argparse: last wins)."""
    overrides = ["--replicas", "1"]
    for flag in port_flags():
        port = getattr(args, flag.lstrip("-"), None)
        if isinstance(port, int) and port > 0:  # 0 (any free port) and negative (off) hold for every replica
            overrides += [flag, str(port + index)]
    cores_each = max(1, (os.cpu_count() or 1) // count)
    workers = args.workers or cores_each
    if args.workers is None:
        overrides += ["--workers", str(workers)]
    if args.num_threads is None:
        overrides += ["--num_threads", str(max(1, cores_each // workers))]
    if model_repository is not None:
        overrides += ["--model_repository", model_repository]
    return [*argv, *overrides]


def describe_status(status: int) -> str:
    if status < 0:
        try:
            return f"killed by {signal.Signals(-status).name}"
        except ValueError:
            return f"killed by signal {-status}"
    return f"exit status {status}"


@dataclass
class Replica:
    index: int
    args: list[str]
    process: asyncio.subprocess.Process | None = None
    address: str = ""  # host:port, once serving
    models: str = ""
    security: str = ""  # how the replica said it is secured (cli.ready_line), e.g. "TLS, bearer tokens"
    endpoints: dict[str, str] = field(default_factory=dict)  # extra endpoints: name -> host:port
    ready: asyncio.Future | None = None  # True once serving, False if its stdout closed first

    @property
    def name(self) -> str:
        where = f", {self.address}" if self.address else ""
        pid = f"pid {self.process.pid}" if self.process else "not started"
        return f"replica {self.index} ({pid}{where})"

    async def start(self) -> None:
        env = {**os.environ, REPLICA_ENV: str(self.index)}
        self.ready = asyncio.get_running_loop().create_future()
        # Own session: a Ctrl-C in the terminal reaches only the supervisor, which forwards it once (a second
        # SIGINT would cut the replicas' grace period).
        self.process = await asyncio.create_subprocess_exec(
            sys.executable, *cli.SERVE_COMMAND, *self.args,
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
            env=env, start_new_session=True,
        )  # fmt: skip
        asyncio.ensure_future(self._read_stdout())
        asyncio.ensure_future(self._forward_log())

    async def _read_stdout(self) -> None:
        assert self.process is not None and self.process.stdout is not None and self.ready is not None
        async for raw in self.process.stdout:
            line = raw.decode(errors="replace").rstrip("\n")
            match = cli.READY_PATTERN.match(line)
            if match and not self.ready.done():
                self.address, self.models = match["addresses"], match["models"]
                self.security = match.groupdict().get("security") or ""
                self.ready.set_result(True)
            elif found := cli.ENDPOINT_PATTERN.match(line):
                self.endpoints[found["name"]] = found["address"]
            else:
                self._log_line(line)
        if not self.ready.done():
            self.ready.set_result(False)

    async def _forward_log(self) -> None:
        assert self.process is not None and self.process.stderr is not None
        async for raw in self.process.stderr:
            self._log_line(raw.decode(errors="replace").rstrip("\n"))

    def _log_line(self, line: str) -> None:
        sys.stderr.write(f"replica {self.index}: {line}\n")
        sys.stderr.flush()

    def send(self, signum: int) -> None:
        if self.process is not None and self.process.returncode is None:
            try:
                self.process.send_signal(signum)
            except ProcessLookupError:
                pass


def endpoint_lines(replicas: Sequence[Replica]) -> list[str]:
    """One `ortserve: NAME endpoint on A,B,...` line per extra endpoint, addresses in replica order."""
    return [cli.ENDPOINT_LINE.format(name=name, address=",".join(r.endpoints.get(name, "") for r in replicas))
            for name in replicas[0].endpoints]  # fmt: skip


async def supervise(argv: Sequence[str], args: argparse.Namespace) -> int:
    """Run the replicas until a signal (exit 0 when they all stop cleanly) or until one exits on its own (exit 1)."""
    count = replica_count(args.replicas)
    repository = None
    if args.model_path is None and args.model_repository is None:
        repository = str(cli.model_location(args))  # built once here, not by every replica at the same time
    replicas = [Replica(i, replica_args(argv, args, i, count, repository)) for i in range(count)]
    loop = asyncio.get_running_loop()
    stopping = asyncio.Event()
    failed: list[str] = []

    def on_signal(signum: int) -> None:
        log.info("received %s: stopping %d replica(s)", signal.Signals(signum).name, count)
        stopping.set()
        for replica in replicas:
            replica.send(signum)

    signals = (signal.SIGTERM, signal.SIGINT)
    for signum in signals:
        loop.add_signal_handler(signum, on_signal, signum)
    try:
        for replica in replicas:
            if not stopping.is_set():
                await replica.start()
        started = [r for r in replicas if r.process is not None]
        exits = {asyncio.ensure_future(r.process.wait()): r for r in started}  # type: ignore[union-attr]
        all_ready = asyncio.gather(*(r.ready for r in started))  # type: ignore[misc]
        stop_wait = asyncio.ensure_future(stopping.wait())
        pending = {*exits, stop_wait, all_ready}
        while any(task in pending for task in exits):
            done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            if all_ready in done and all(all_ready.result()) and not stopping.is_set():
                for line in endpoint_lines(replicas):
                    print(line, flush=True)
                address = ",".join(r.address for r in replicas)
                secured = f"{address} with {replicas[0].security}" if replicas[0].security else address
                print(cli.READY_LINE.format(address=secured, models=replicas[0].models), flush=True)
                log.info("%d replica(s) serving on %s", count, address)
            for task in done & exits.keys():
                replica, status = exits[task], task.result()
                if not stopping.is_set():
                    when = "while serving" if replica.address else "before it was serving"
                    failed.append(f"{replica.name} ended {when}: {describe_status(status)}")
                    log.error("%s; stopping the other replicas", failed[-1])
                    stopping.set()
                    for other in replicas:
                        other.send(signal.SIGTERM)
                elif status not in CLEAN_STOP:
                    failed.append(f"{replica.name} ended with {describe_status(status)} while stopping")
                    log.error("%s", failed[-1])
        stop_wait.cancel()
        all_ready.cancel()
    finally:
        for signum in signals:
            loop.remove_signal_handler(signum)
        for replica in replicas:  # only if the supervisor itself fails: never leave a replica behind
            replica.send(signal.SIGTERM)
    if failed:
        return 1
    log.info("all %d replica(s) stopped", count)
    return 0


def main(argv: Sequence[str], args: argparse.Namespace) -> int:
    try:
        replica_count(args.replicas)
    except ValueError as error:
        log.error("%s", error)
        return 2
    try:
        return asyncio.run(supervise(argv, args))
    except (RepositoryError, OSError) as error:  # the default repository could not be built, say
        log.error("%s", error)
        return 1


def follow_supervisor() -> None:
    """In a replica (REPLICA_ENV set): SIGTERM ourselves -- a graceful shutdown -- once the supervisor is gone.

    The supervisor holds the write end of our stdin; the kernel closes it when the supervisor exits, however it
    exits, and the read below returns.
    """
    if os.environ.get(REPLICA_ENV) is None:
        return

    def wait_for_eof() -> None:
        # os.read, not sys.stdin: a daemon thread blocked inside a buffered reader aborts the interpreter's exit.
        while os.read(0, 4096):
            pass
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=wait_for_eof, name="ortserve-follow-supervisor", daemon=True).start()
