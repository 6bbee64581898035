"""`python -m ortserve serve` (and ./run_ort_server.sh): start the inference server from the command line.

The flags are those of the old ONNX Runtime Server (--model_path, --grpc_port, --http_port, --address,
--log_level, --num_threads) plus ours (--model_repository, --max_message_mb, --grace_period, ...). With no model
flag the server serves the course's default repository (models/repository, built by ortserve.zoo when missing).

Once it listens, the server prints exactly one line on stdout (logs go to stderr):

    ortserve: serving on HOST:PORT (models: NAME vVERSION, NAME vVERSION, ...)

for example `ortserve: serving on 127.0.0.1:50051 (models: digits_cnn v1, digits_forest v1)`; a secured server
says how after the address: `... on 127.0.0.1:50051 with mutual TLS, bearer tokens (models: ...)`. PORT is the port
actually bound, so `--grpc_port 0` (any free port) can be found from this line; READY_PATTERN matches it and
ServerProcess starts a server in a subprocess and reads it. SIGTERM or SIGINT shut the server down gracefully
(exit status 0). With `--replicas N` a supervisor runs N servers, a port each (ortserve.server.replicas), and
prints one such line listing every address, comma-separated: `ortserve: serving on 127.0.0.1:50051,127.0.0.1:50052
(models: ...)`; ServerProcess.addresses has them all.

Before it, each extra endpoint prints one line, `ortserve: NAME endpoint on HOST:PORT` (ENDPOINT_LINE, matched by
ENDPOINT_PATTERN; ServerProcess.endpoints maps NAME to HOST:PORT). The HTTP/REST form of the protocol
(ortserve.server.rest) is one: `ortserve: REST endpoint on 127.0.0.1:9001`. --http_port 0 picks a free port for it
and a negative --http_port (e.g. -1) turns REST off. The Prometheus metrics endpoint (ortserve.server.observe) is
another: `ortserve: metrics endpoint on 127.0.0.1:8002` (--metrics_port, 0 and negative alike); --request_log
adds one JSON line per inference request to stderr or a file. ServerProcess passes `<flag> 0` for every flag of
EPHEMERAL_PORT_FLAGS its args do not set, so servers started side by side never collide on a default port.
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
from ortserve.server.control import DEFAULT_POLL_SECS, MODES
from ortserve.server.observe import DEFAULT_METRICS_PORT, configure_request_log
from ortserve.server.errors import ConfigurationError, RepositoryError
from ortserve.server.runtime import SessionSettings
from ortserve.server.security import TOKEN_ENV, TlsSettings, TokenAuthority, describe

log = logging.getLogger("ortserve.server")

READY_LINE = "ortserve: serving on {address} (models: {models})"
# `addresses`: one HOST:PORT, or several comma-separated (--replicas); host and port are those of the first.
READY_PATTERN = re.compile(
    r"^ortserve: serving on (?P<addresses>(?P<host>[^\s,]+):(?P<port>\d+)(?:,[^\s,]+)*)"
    r"(?: with (?P<security>[^()]+))? \(models: (?P<models>.*)\)$"
)
DEFAULT_HTTP_PORT = 9001
ENDPOINT_LINE = "ortserve: {name} endpoint on {address}"
# `address`: one HOST:PORT, or several comma-separated (--replicas); host and port are those of the first.
ENDPOINT_PATTERN = re.compile(
    r"^ortserve: (?P<name>\S+) endpoint on (?P<address>(?P<host>[^\s,]+):(?P<port>\d+)(?:,[^\s,]+)*)$"
)
# Port flags ServerProcess sets to `0` (any free port) when it is not given them, so that no server a test or a
# notebook starts ever binds a default port another one holds.
EPHEMERAL_PORT_FLAGS: tuple[str, ...] = ("--grpc_port", "--http_port", "--metrics_port")
SERVE_COMMAND = ("-m", "ortserve", "serve")
# The old server's log levels.
LOG_LEVELS = {
    "verbose": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
    "fatal": logging.CRITICAL,
}


def count(text: str) -> int:
    """argparse type of the thread and batching flags: a whole number, 0 or more (0 means the default or off)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number (0 or more), got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected 0 or more, got {value}")
    return value


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
                        help="HTTP/REST port of the Open Inference Protocol (default: %(default)s; 0 picks a free "
                             "port, printed on the 'REST endpoint on' line; a negative value, e.g. -1, turns REST "
                             "off)")  # fmt: skip
    parser.add_argument("--log_level", choices=list(LOG_LEVELS), default="info",
                        help="logging verbosity, as the old server named it (default: %(default)s)")
    parser.add_argument("--num_threads", type=count, default=None, metavar="N",
                        help="ONNX Runtime intra-op threads per session (default: cores / workers, so that the "
                             "runs in flight at once never use more threads than there are cores); a model's "
                             "config.json intra_op_threads wins")  # fmt: skip
    parser.add_argument("--inter_op_threads", type=count, default=None, metavar="N",
                        help="ONNX Runtime inter-op threads per session (default: 1)")
    parser.add_argument("--workers", type=count, default=None, metavar="N",
                        help="session runs in flight at once, each in its own thread (default: one per core; with "
                             "the default --num_threads, workers x intra-op threads = cores: the busy server runs "
                             "one thread per core, none waiting for a core)")
    parser.add_argument("--lone_request_threads", type=count, default=None, metavar="N",
                        help="a request that finds its model idle runs on a second session of the model with N "
                             "intra-op threads that spin when idle, as in-process ONNX Runtime (default: one per "
                             "core; 0: no second session, such requests run like the others)")  # fmt: skip
    parser.add_argument("--max_batch_size", type=count, default=BatchingDefaults.max_batch_size, metavar="N",
                        help="dynamic batching: join concurrent requests to a model into runs of up to N rows "
                             "(default: %(default)s); applies to models whose inputs and outputs all have a "
                             "variable first axis and whose config.json sets no max_batch_size; 0 turns batching "
                             "off")  # fmt: skip
    parser.add_argument("--max_queue_delay_us", type=count, default=BatchingDefaults.max_queue_delay_us,
                        metavar="US", help="dynamic batching: longest a request waits in the queue for company "
                        "before it starts a run (given a free worker), in microseconds (default: %(default)s); a "
                        "request finding its model idle and no sign of concurrent callers never waits")  # fmt: skip
    parser.add_argument("--max_message_mb", type=float, default=DEFAULT_MAX_MESSAGE_BYTES / MiB, metavar="MB",
                        help="largest request and response in MiB (default: %(default)g); larger ones get "
                             "RESOURCE_EXHAUSTED")  # fmt: skip
    parser.add_argument("--grace_period", type=float, default=DEFAULT_GRACE_PERIOD, metavar="SECONDS",
                        help="on SIGTERM/SIGINT, how long calls in flight may take to finish (default: %(default)g)")
    observe = parser.add_argument_group("observability", "Prometheus metrics and the request log "
                                        "(ortserve.server.observe)")  # fmt: skip
    observe.add_argument("--metrics_port", type=int, default=DEFAULT_METRICS_PORT, metavar="PORT",
                         help="port of the Prometheus metrics endpoint, GET /metrics (default: %(default)s, as "
                              "Triton's; 0 picks a free port, printed on the 'metrics endpoint on' line; a negative "
                              "value, e.g. -1, turns it off)")  # fmt: skip
    observe.add_argument("--request_log", nargs="?", const="-", default=None, metavar="FILE",
                         help="log every inference request as one JSON line (model, version, protocol, id, status, "
                              "batch size, queue/run/total ms, error) to stderr, or appended to FILE; off by default "
                              "(at thousands of requests per second it costs throughput)")  # fmt: skip
    parser.add_argument("--replicas", type=int, default=1, metavar="N",
                        help="run N server processes under a supervisor, a port each (--grpc_port, +1, ...; every "
                             "other port flag likewise), the cores shared among them; 0: one per core (default: "
                             "%(default)s). See ortserve.server.replicas")  # fmt: skip
    control = parser.add_argument_group("model control", "loading and unloading models while serving, as Triton's "
                                        "model repository extension (ortserve.server.control); needs a "
                                        "--model_repository directory for explicit and poll")  # fmt: skip
    control.add_argument("--model_control_mode", "--model-control-mode", choices=MODES, default="none",
                         help="none: serve the models loaded at start, refuse load/unload (default); explicit: "
                              "load/unload calls decide, --load_model picks the models of the start; poll: re-read "
                              "the repository every --repository_poll_secs by itself, refuse load/unload")  # fmt: skip
    control.add_argument("--load_model", "--load-model", action="append", default=[], metavar="NAME",
                         help="with --model_control_mode explicit: load this model at start (repeat for more; "
                              "'*' for all); without it, none is loaded")  # fmt: skip
    control.add_argument("--repository_poll_secs", "--repository-poll-secs", type=float, default=DEFAULT_POLL_SECS,
                         metavar="SECONDS", help="with --model_control_mode poll: seconds between two reads of the "
                         "repository (default: %(default)g, as Triton's)")  # fmt: skip
    security = parser.add_argument_group("security", f"TLS and bearer tokens (ortserve.server.security). Tokens "
                                         f"come from --auth_token_file or ${TOKEN_ENV} (one token, or several "
                                         "separated by commas), not both; with either, every call except the "
                                         "health checks needs 'authorization: Bearer <token>'.")  # fmt: skip
    security.add_argument("--tls_cert", type=Path, metavar="PEM",
                          help="serve TLS with this certificate (chain), the server's own first; needs --tls_key")
    security.add_argument("--tls_key", type=Path, metavar="PEM", help="the certificate's private key (unencrypted)")
    security.add_argument("--tls_client_ca", type=Path, metavar="PEM",
                          help="mutual TLS: accept only clients whose certificate this CA signed")
    security.add_argument("--auth_token_file", type=Path, metavar="FILE",
                          help="accept the bearer tokens in FILE, one per line (# comments); re-read when it "
                               "changes, so tokens rotate without a restart")  # fmt: skip
    return parser


def tls_from(args: argparse.Namespace) -> TlsSettings | None:
    if args.tls_cert is None and args.tls_key is None:
        if args.tls_client_ca is not None:
            raise ConfigurationError("--tls_client_ca needs TLS: give --tls_cert and --tls_key too")
        return None
    if args.tls_cert is None or args.tls_key is None:
        raise ConfigurationError("TLS needs both --tls_cert and --tls_key (the certificate and its private key)")
    return TlsSettings.from_files(args.tls_cert, args.tls_key, args.tls_client_ca)


def options_from(args: argparse.Namespace) -> ServerOptions:
    return ServerOptions(
        address=args.address,
        port=args.grpc_port,
        max_message_bytes=int(args.max_message_mb * MiB),
        grace_period=args.grace_period,
        session=SessionSettings(intra_op_threads=args.num_threads, inter_op_threads=args.inter_op_threads),
        workers=args.workers,
        lone_request_threads=args.lone_request_threads,
        max_batch_size=args.max_batch_size,
        max_queue_delay_us=args.max_queue_delay_us,
        http_port=args.http_port if args.http_port >= 0 else None,
        metrics_port=args.metrics_port if args.metrics_port >= 0 else None,
        request_log=args.request_log is not None,
        tls=tls_from(args),
        auth=TokenAuthority.from_sources(args.auth_token_file),
        model_control_mode=args.model_control_mode,
        load_models=tuple(args.load_model),
        repository_poll_secs=args.repository_poll_secs,
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
    security = describe(server.options.tls, server.options.auth)  # e.g. "TLS, bearer tokens"
    address = f"{server.address} with {security}" if security else server.address
    return READY_LINE.format(address=address, models=models)


async def run(args: argparse.Namespace) -> int:
    options = options_from(args)  # before loading models: a bad TLS or token file fails fast
    server = InferenceServer.from_location(model_location(args), options)
    writer = configure_request_log(args.request_log) if args.request_log is not None else None
    try:
        await server.start()
        if server.http_address is not None:
            print(ENDPOINT_LINE.format(name="REST", address=server.http_address), flush=True)
        if server.metrics_address is not None:
            print(ENDPOINT_LINE.format(name="metrics", address=server.metrics_address), flush=True)
        print(ready_line(server), flush=True)
        await server.serve_until_signalled()
    finally:
        if writer is not None:
            writer.stop()  # writes what is queued
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=LOG_LEVELS[args.log_level], stream=sys.stderr, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    from ortserve.server import replicas  # imports this module: imported here, not at the top

    if args.replicas != 1:
        return replicas.main(argv, args)
    replicas.follow_supervisor()  # a replica stops with its supervisor
    try:
        return asyncio.run(run(args))
    except (RepositoryError, ConfigurationError, OSError) as error:
        log.error("%s", error)
        return 1


# --------------------------------------------------------------------------------------------------
# Starting the server in a subprocess (tests, notebooks)


class ServerProcess:
    """`python -m ortserve serve ARGS` in a subprocess, started and waited for until it serves.

        with ServerProcess(["--grpc_port", "0", "--model_path", "model.onnx"]) as server:
            client = InferenceClient(server.address)

    With capture_log=True the server's log (stderr) is kept, line by line, for `wait_for_log`. The extra
    endpoints it announces are in `endpoints` (e.g. endpoints["REST"] == "127.0.0.1:41234"); unless `args` set
    them, it asks for those of EPHEMERAL_PORT_FLAGS on any free port (the subclasses running another command,
    such as ortserve.yardsticks', are given their args as they are).
    """

    command: tuple[str, ...] = SERVE_COMMAND  # what follows the interpreter (subclasses change it)

    def __init__(self, args: Sequence[str] = (), python: str = sys.executable,
                 startup_timeout: float = 300.0, capture_log: bool = False) -> None:  # fmt: skip
        self.args = list(args)
        self.python = python
        self.startup_timeout = startup_timeout
        self.capture_log = capture_log
        self.process: subprocess.Popen | None = None
        self.host = ""
        self.port = 0
        self.models = ""
        self.security = ""  # how the server said it is secured, e.g. "mutual TLS, bearer tokens"
        self.addresses: list[str] = []  # every replica's HOST:PORT (one unless --replicas); address is the first
        self.endpoints: dict[str, str] = {}  # extra endpoints announced before the serving line: name -> HOST:PORT
        self.log_lines: queue.Queue[str | None] = queue.Queue()

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def start(self) -> "ServerProcess":
        if self.command == SERVE_COMMAND:
            self.args += [arg for flag in EPHEMERAL_PORT_FLAGS if not _sets(self.args, flag) for arg in (flag, "0")]
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
                self.security = match["security"] or ""
                self.addresses = match["addresses"].split(",")
                return self
            if endpoint := ENDPOINT_PATTERN.match(line.strip()):
                self.endpoints[endpoint["name"]] = endpoint["address"]
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


def _sets(args: Sequence[str], flag: str) -> bool:
    return any(arg == flag or arg.startswith(f"{flag}=") for arg in args)


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
