"""`python -m ortserve serve` (and ./run_ort_server.sh): start the inference server from the command line.

The flags are those of the old ONNX Runtime Server (--model_path, --grpc_port, --http_port, --address,
--log_level, --num_threads) plus ours (--model_repository, --max_message_mb, --grace_period, ...). With no model
flag the server serves the course's default repository (models/repository, built by ortserve.zoo when missing).

Once it listens, the server prints exactly one line on stdout (logs go to stderr):

    ortserve: serving on HOST:PORT (models: NAME vVERSION, NAME vVERSION, ...)

for example `ortserve: serving on 127.0.0.1:50051 (models: digits_cnn v1, digits_forest v1)`. PORT is the port
actually bound, so `--grpc_port 0` (any free port) can be found from this line; READY_PATTERN matches it and
ServerProcess starts a server in a subprocess and reads it. SIGTERM or SIGINT shut the server down gracefully
(exit status 0).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import queue
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Sequence

from ortserve.server.app import (
    DEFAULT_GRACE_PERIOD,
    DEFAULT_MAX_MESSAGE_BYTES,
    DEFAULT_PORT,
    MiB,
    InferenceServer,
    ServerOptions,
)
from ortserve.server.batching import BatchingDefaults
from ortserve.server.errors import RepositoryError
from ortserve.server.runtime import SessionSettings

log = logging.getLogger("ortserve.server")

READY_LINE = "ortserve: serving on {address} (models: {models})"
READY_PATTERN = re.compile(r"^ortserve: serving on (?P<host>\S+):(?P<port>\d+) \(models: (?P<models>.*)\)$")
DEFAULT_HTTP_PORT = 9001
# The old server's log levels.
LOG_LEVELS = {
    "verbose": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
    "fatal": logging.CRITICAL,
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m ortserve serve",
        description="Serve ONNX models over gRPC: the Open Inference Protocol (KServe v2, as Triton speaks it), "
        "the old ONNX Runtime Server's PredictionService, grpc.health.v1 and server reflection.",
        epilog="With neither --model_path nor --model_repository, serves the course's default repository "
        "(models/repository: digits_cnn, digits_forest, digits_xgb), building it first if it is missing. "
        "Prints 'ortserve: serving on HOST:PORT (models: ...)' once listening. SIGTERM/SIGINT stop it gracefully.",
    )
    models = parser.add_mutually_exclusive_group()
    models.add_argument("--model_path", type=Path, metavar="FILE",
                        help="one .onnx file, served as the model named 'default' (version 1)")
    models.add_argument("--model_repository", type=Path, metavar="DIR_OR_JSON",
                        help="a repository directory <DIR>/<name>/<version>/model.onnx (+ optional "
                             "<name>/config.json), or a JSON file {\"model_config_list\": [{\"name\", \"base_path\", "
                             "\"model_platform\", \"max_batch_size\"}]}")  # fmt: skip
    parser.add_argument("--address", default="127.0.0.1",
                        help="address to listen on (default: %(default)s; 0.0.0.0 or [::] for every interface)")
    parser.add_argument("--grpc_port", type=int, default=DEFAULT_PORT,
                        help="gRPC port (default: %(default)s; 0 picks a free port, printed on the serving line)")
    parser.add_argument("--http_port", type=int, default=DEFAULT_HTTP_PORT,
                        help="HTTP/REST port (default: %(default)s); reserved: the REST endpoint is not served yet")
    parser.add_argument("--log_level", choices=list(LOG_LEVELS), default="info",
                        help="logging verbosity, as the old server named it (default: %(default)s)")
    parser.add_argument("--num_threads", type=int, default=None, metavar="N",
                        help="ONNX Runtime intra-op threads per session (default: cores / workers, so that the "
                             "runs in flight at once never use more threads than there are cores); a model's "
                             "config.json intra_op_threads wins")  # fmt: skip
    parser.add_argument("--inter_op_threads", type=int, default=None, metavar="N",
                        help="ONNX Runtime inter-op threads per session (default: 1)")
    parser.add_argument("--workers", type=int, default=None, metavar="N",
                        help="session runs in flight at once, each in its own thread (default: one per core; with "
                             "the default --num_threads, workers x intra-op threads = cores: the busy server runs "
                             "one thread per core, none waiting for a core)")
    parser.add_argument("--max_batch_size", type=int, default=BatchingDefaults.max_batch_size, metavar="N",
                        help="dynamic batching: join concurrent requests to a model into runs of up to N rows "
                             "(default: %(default)s); applies to models whose inputs and outputs all have a "
                             "variable first axis and whose config.json sets no max_batch_size; 0 turns batching "
                             "off")  # fmt: skip
    parser.add_argument("--max_queue_delay_us", type=int, default=BatchingDefaults.max_queue_delay_us,
                        metavar="US", help="dynamic batching: longest a request waits in the queue for company "
                        "before it starts a run (given a free worker), in microseconds (default: %(default)s); a "
                        "request finding its model idle and no sign of concurrent callers never waits")  # fmt: skip
    parser.add_argument("--max_message_mb", type=float, default=DEFAULT_MAX_MESSAGE_BYTES / MiB, metavar="MB",
                        help="largest request and response in MiB (default: %(default)g); larger ones get "
                             "RESOURCE_EXHAUSTED")  # fmt: skip
    parser.add_argument("--grace_period", type=float, default=DEFAULT_GRACE_PERIOD, metavar="SECONDS",
                        help="on SIGTERM/SIGINT, how long calls in flight may take to finish (default: %(default)g)")
    return parser


def options_from(args: argparse.Namespace) -> ServerOptions:
    return ServerOptions(
        address=args.address,
        port=args.grpc_port,
        max_message_bytes=int(args.max_message_mb * MiB),
        grace_period=args.grace_period,
        session=SessionSettings(intra_op_threads=args.num_threads, inter_op_threads=args.inter_op_threads),
        workers=args.workers,
        max_batch_size=args.max_batch_size,
        max_queue_delay_us=args.max_queue_delay_us,
    )


def model_location(args: argparse.Namespace) -> Path:
    if args.model_path is not None:
        if not args.model_path.is_file():
            raise RepositoryError(f"--model_path {args.model_path}: no such file")
        return args.model_path
    if args.model_repository is not None:
        return args.model_repository
    from ortserve import zoo

    log.info("no model flag: serving the default repository (building missing models first)")
    return zoo.ensure_repository()


def ready_line(server: InferenceServer) -> str:
    models = ", ".join(f"{m.name} v{m.version}" for m in server.repository)
    return READY_LINE.format(address=server.address, models=models)


async def run(args: argparse.Namespace) -> int:
    server = InferenceServer.from_location(model_location(args), options_from(args))
    await server.start()
    if args.http_port:
        log.info("HTTP/REST is not served yet: --http_port %d is reserved for it", args.http_port)
    print(ready_line(server), flush=True)
    await server.serve_until_signalled()
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=LOG_LEVELS[args.log_level], stream=sys.stderr, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        return asyncio.run(run(args))
    except (RepositoryError, OSError) as error:
        log.error("%s", error)
        return 1


# --------------------------------------------------------------------------------------------------
# Starting the server in a subprocess (tests, notebooks)


class ServerProcess:
    """`python -m ortserve serve ARGS` in a subprocess, started and waited for until it serves.

        with ServerProcess(["--grpc_port", "0", "--model_path", "model.onnx"]) as server:
            client = InferenceClient(server.address)

    With capture_log=True the server's log (stderr) is kept, line by line, for `wait_for_log`.
    """

    command: tuple[str, ...] = ("-m", "ortserve", "serve")  # what follows the interpreter (subclasses change it)

    def __init__(self, args: Sequence[str] = ("--grpc_port", "0"), python: str = sys.executable,
                 startup_timeout: float = 300.0, capture_log: bool = False) -> None:  # fmt: skip
        self.args = list(args)
        self.python = python
        self.startup_timeout = startup_timeout
        self.capture_log = capture_log
        self.process: subprocess.Popen | None = None
        self.host = ""
        self.port = 0
        self.models = ""
        self.log_lines: queue.Queue[str | None] = queue.Queue()

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def start(self) -> "ServerProcess":
        self.process = subprocess.Popen(
            [self.python, *self.command, *self.args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE if self.capture_log else None,
            text=True,
        )
        # Reader threads keep draining the pipes, so waits can time out and the pipes never fill up.
        stdout_lines: queue.Queue[str | None] = queue.Queue()
        _drain(self.process.stdout, stdout_lines)
        if self.capture_log:
            _drain(self.process.stderr, self.log_lines)
        deadline = time.monotonic() + self.startup_timeout
        while (line := _next_line(stdout_lines, deadline)) is not None:
            match = READY_PATTERN.match(line.strip())
            if match:
                self.host, self.port, self.models = match["host"], int(match["port"]), match["models"]
                return self
        self.process.kill()
        code = self.process.wait()
        raise RuntimeError(f"the server exited (status {code}) or never said it was serving: {self.args}")

    def wait_for_log(self, pattern: str, timeout: float = 60.0) -> re.Match:
        """The first log line (from now on) matching the regex `pattern`; needs capture_log=True."""
        if not self.capture_log:
            raise RuntimeError("start the ServerProcess with capture_log=True")
        deadline = time.monotonic() + timeout
        while (line := _next_line(self.log_lines, deadline)) is not None:
            match = re.search(pattern, line)
            if match:
                return match
        raise TimeoutError(f"no server log line matched {pattern!r} within {timeout} s")

    def terminate(self, timeout: float = 60.0) -> int:
        """SIGTERM (graceful shutdown) and wait; returns the exit status."""
        if self.process is None:
            return 0
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
            raise

    def __enter__(self) -> "ServerProcess":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.terminate()


def _drain(stream, lines: queue.Queue) -> None:
    def read() -> None:
        for text in stream:
            lines.put(text)
        lines.put(None)

    threading.Thread(target=read, name="ortserve-server-pipe", daemon=True).start()


def _next_line(lines: queue.Queue, deadline: float) -> str | None:
    """The next line, or None at end of stream or deadline."""
    try:
        return lines.get(timeout=max(0.0, deadline - time.monotonic()))
    except queue.Empty:
        return None
