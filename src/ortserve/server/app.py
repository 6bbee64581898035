"""Build, start and stop the grpc.aio inference server: servicers, health, reflection, options, signals.

    repository = Repository.load(discover("models/repository"))
    server = InferenceServer(repository, ServerOptions(port=0))
    port = await server.start()
    ...
    await server.stop()          # graceful: see below

Graceful shutdown (stop(), or SIGTERM/SIGINT under `serve`): health turns NOT_SERVING, ServerReady/ModelReady
answer false and new inference calls get UNAVAILABLE while health and metadata keep answering; the calls in
flight get up to `grace_period` seconds to finish; once they have and no inference call has come for
DRAIN_QUIET_PERIOD (the refused callers have gone elsewhere), gRPC stops, cancelling whatever is still running
when the grace period is over.

With `http_port` set the server also speaks the protocol's HTTP/REST form (ortserve.server.rest), served by
uvicorn on the same event loop, so both share the repository, the batchers and the gate: it drains and stops with
gRPC (ready answers 400 and inference 503 while draining). `server.http_port` tells the bound port.

Every server counts its inference calls in an ortserve.server.observe.Observer (`server.observer`: Prometheus
metrics on a registry of its own, and the request log when `request_log` is on); with `metrics_port` set it serves
them over HTTP at /metrics (`server.metrics_port` tells the bound port) until it has stopped.

With `tls` set the port serves TLS (mutual TLS when the settings name a client CA); with `auth` set every call
but the health checks needs a bearer token (ortserve.server.security).

`BackgroundServer` runs the same server on an event loop in a background thread, for tests and notebooks that
want it in-process.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from google.protobuf import descriptor_pool
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio
from grpc_reflection.v1alpha import reflection, reflection_pb2

from ortserve._proto import grpc_service_pb2, grpc_service_pb2_grpc, predict_pb2, predict_pb2_grpc
from ortserve.server.batching import BatchingDefaults
from ortserve.server.control import DEFAULT_POLL_SECS, open_repository
from ortserve.server.dataplane import DataPlane
from ortserve.server.gate import Gate
from ortserve.server.legacy import PredictionServicer
from ortserve.server.observe import Observer
from ortserve.server.repository import LoadSettings, Repository
from ortserve.server.rest import RestEndpoint, build_app
from ortserve.server.runtime import Model, SessionSettings
from ortserve.server.security import BearerTokenInterceptor, TlsSettings, TokenAuthority, describe
from ortserve.server.v2 import InferenceServicer

log = logging.getLogger(__name__)

MiB = 1024 * 1024
DEFAULT_PORT = 50051
DEFAULT_MAX_MESSAGE_BYTES = 64 * MiB
DEFAULT_GRACE_PERIOD = 10.0
DRAIN_QUIET_PERIOD = 0.2  # seconds without a new inference call before a draining server stops (see stop())

V2_SERVICE = grpc_service_pb2.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name
LEGACY_SERVICE = predict_pb2.DESCRIPTOR.services_by_name["PredictionService"].full_name
HEALTH_SERVICE = health_pb2.DESCRIPTOR.services_by_name["Health"].full_name
SERVICE_NAMES = (V2_SERVICE, LEGACY_SERVICE, HEALTH_SERVICE, reflection.SERVICE_NAME)


@dataclass(frozen=True)
class ServerOptions:
    address: str = "127.0.0.1"
    port: int = DEFAULT_PORT  # 0: let the system pick a free port (InferenceServer.port tells which)
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES  # both directions; gRPC answers RESOURCE_EXHAUSTED above
    grace_period: float = DEFAULT_GRACE_PERIOD  # seconds in-flight calls get to finish at shutdown
    session: SessionSettings = field(default_factory=SessionSettings)  # ONNX Runtime threads, unless a model says
    workers: int | None = None  # session runs in flight at once, each in its own thread (default: one per core)
    lone_request_threads: int | None = None  # threads of a lone request's session (None: every core; 0: no such session)
    max_batch_size: int = BatchingDefaults.max_batch_size  # batching defaults for models whose config says nothing
    max_queue_delay_us: int = BatchingDefaults.max_queue_delay_us
    http_port: int | None = None  # None: no REST endpoint; 0: any free port (InferenceServer.http_port tells which)
    metrics_port: int | None = None  # None: no metrics endpoint; 0: any free port (InferenceServer.metrics_port)
    request_log: bool = False  # one JSON line per inference request on the "ortserve.requests" logger
    tls: TlsSettings | None = None  # None: plaintext; see ortserve.server.security
    auth: TokenAuthority | None = None  # None: no token needed; else every call but health checks needs one
    # Triton's --model-control-mode: none, explicit or poll (see ortserve.server.control), with the models an
    # explicit server loads at start ("*": all) and the poll interval in seconds.
    model_control_mode: str = "none"
    load_models: tuple[str, ...] = ()
    repository_poll_secs: float = DEFAULT_POLL_SECS

    def thread_plan(self) -> "ThreadPlan":
        """Worker threads and session settings, chosen so that runs sharing the cores never oversubscribe them.

        Each worker thread runs one session.run at a time, and a run uses its session's intra-op threads (the
        calling thread among them), so the runs that overlap ask for at most workers x intra-op threads. Unless
        told otherwise: one worker per core and one intra-op and one inter-op thread per session, so a busy server
        has exactly one running thread per core, none waiting for a core and none spinning. Measured on 2 cores
        (resnet18, 8 callers): two one-thread runs side by side beat one two-thread run by about 20%, and a
        row's answer does not depend on the batch it ran in (several intra-op threads make some operators,
        such as tree ensembles, sum in a different order).

        A request that finds its model idle has the cores to itself, and one thread would give a big model one
        core of two: measured, resnet18 alone answered at 0.44x in-process ONNX Runtime's speed. So each model
        also gets a lone session (`lone`): ONNX Runtime's defaults, every core, threads that spin between the
        parallel parts of a run (without spinning, 0.78x) but stop at its end. Its cost is the memory of a second
        session; `lone_request_threads=0`, or sessions that already have every core, go without it.
        """
        cores = os.cpu_count() or 2
        workers = self.workers or cores
        intra = self.session.intra_op_threads or max(1, cores // workers)
        inter = self.session.inter_op_threads or 1
        lone_threads = cores if self.lone_request_threads is None else self.lone_request_threads
        lone = SessionSettings(lone_threads, inter, spinning=True) if lone_threads > intra else None
        return ThreadPlan(workers, SessionSettings(intra_op_threads=intra, inter_op_threads=inter), lone)


@dataclass(frozen=True)
class ThreadPlan:
    """What ServerOptions.thread_plan chose (see there)."""

    workers: int  # worker threads: runs in flight at once
    session: SessionSettings  # the sessions of batches and overlapping runs
    lone: SessionSettings | None  # the session of a request that finds its model idle; None: it uses `session`


def reflection_pool() -> descriptor_pool.DescriptorPool:
    """A pool with the files of every service we serve and their imports, for the reflection service.

    Needed because the v2 messages live in their own pool (see ortserve._proto), not protobuf's default one.
    """
    pool = descriptor_pool.DescriptorPool()
    added: set[str] = set()

    def add(file) -> None:
        if file.name in added:
            return
        for dependency in file.dependencies:
            add(dependency)
        pool.AddSerializedFile(file.serialized_pb)
        added.add(file.name)

    for file in (grpc_service_pb2.DESCRIPTOR, predict_pb2.DESCRIPTOR, health_pb2.DESCRIPTOR, reflection_pb2.DESCRIPTOR):
        add(file)
    return pool


class InferenceServer:
    def __init__(self, repository: Repository, options: ServerOptions = ServerOptions(),
                 executor: ThreadPoolExecutor | None = None) -> None:  # fmt: skip
        self.repository = repository
        self.options = options
        self.executor = executor
        self.gate = Gate()
        self.health = health_aio.HealthServicer()
        self.observer = Observer(repository, self.gate, options.request_log)
        self.observer.observe_runs()
        self.plane = DataPlane(repository, self.gate, self.observer)
        if repository.control is not None:  # health and metrics follow the models loaded and unloaded
            repository.control.listeners.append(self._model_changed)
        self.port: int | None = None
        self.metrics_port: int | None = None
        self.http_port: int | None = None
        self._server: grpc.aio.Server | None = None
        self._rest: RestEndpoint | None = None
        self._stopping: asyncio.Task | None = None

    @classmethod
    def from_location(cls, location: Path | str, options: ServerOptions = ServerOptions()) -> "InferenceServer":
        """Load the repository at `location` (directory, model_config_list JSON or .onnx) with one worker pool."""
        plan = options.thread_plan()
        executor = ThreadPoolExecutor(max_workers=plan.workers, thread_name_prefix="ort")
        batching = BatchingDefaults(options.max_batch_size, options.max_queue_delay_us, max_runs=plan.workers)
        loading = LoadSettings(plan.session, executor, batching, plan.lone)
        repository = open_repository(location, loading, options.model_control_mode, options.load_models,
                                     options.repository_poll_secs)  # fmt: skip
        return cls(repository, options, executor)

    @property
    def address(self) -> str:
        return f"{self.options.address}:{self.port}"

    @property
    def http_address(self) -> str | None:
        """HOST:PORT of the REST endpoint, None when it does not serve one."""
        return None if self.http_port is None else f"{self.options.address}:{self.http_port}"

    @property
    def metrics_address(self) -> str | None:
        """HOST:PORT of the metrics endpoint (GET /metrics), None when it does not serve one."""
        return None if self.metrics_port is None else f"{self.options.address}:{self.metrics_port}"

    async def start(self) -> int:
        """Bind, start serving, mark everything SERVING; returns the bound port."""
        limit = self.options.max_message_bytes
        server = grpc.aio.server(
            interceptors=[BearerTokenInterceptor(self.options.auth)] if self.options.auth else None,
            options=[
                ("grpc.max_receive_message_length", limit),
                ("grpc.max_send_message_length", limit),
                # Without this a second server could bind the same port and silently share its traffic.
                ("grpc.so_reuseport", 0),
            ]
        )
        grpc_service_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(InferenceServicer(self.plane), server)
        predict_pb2_grpc.add_PredictionServiceServicer_to_server(PredictionServicer(self.plane), server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        reflection.enable_server_reflection(SERVICE_NAMES, server, pool=reflection_pool())
        target = f"{self.options.address}:{self.options.port}"
        try:
            if self.options.tls is None:
                self.port = server.add_insecure_port(target)
            else:
                self.port = server.add_secure_port(target, self.options.tls.grpc_credentials())
        except RuntimeError as error:
            raise OSError(f"cannot listen on {target}: {error}") from None
        if not self.port:
            raise OSError(f"cannot listen on {target}")
        await server.start()
        self._server = server
        if self.options.http_port is not None:
            try:
                rest_app = build_app(self.plane, limit, self.options.auth)
                tls = self.options.tls.uvicorn_kwargs() if self.options.tls else {}
                self._rest = RestEndpoint(rest_app, self.options.address, self.options.http_port, **tls)
                await self._rest.start()
            except OSError:
                await server.stop(0)
                raise
            self.http_port = self._rest.port
        if self.options.metrics_port is not None:
            try:
                self.metrics_port = self.observer.serve(self.options.address, self.options.metrics_port)
            except OSError:
                await server.stop(0)
                if self._rest is not None:
                    await self._rest.stop(0)
                raise
        if self.options.tls or self.options.auth:
            log.info("listening on %s with %s", self.address, describe(self.options.tls, self.options.auth))
        if self.options.auth and not self.options.tls:
            log.warning("bearer tokens without TLS travel in clear text: fine on localhost or behind a proxy that "
                        "terminates TLS, not across a network")  # fmt: skip
        serving = health_pb2.HealthCheckResponse.SERVING
        for service in ("", V2_SERVICE, LEGACY_SERVICE, *self.repository.names()):
            await self.health.set(service, serving)
        if self.repository.control is not None:
            await self.repository.control.start()  # polls the directory in poll mode
        return self.port

    async def _model_changed(self, name: str, added: list[Model], dropped: list[Model]) -> None:
        for model in dropped:
            self.observer.forget(model)
        for model in added:
            self.observer.watch(model)
        served = name in self.repository.names()
        status = health_pb2.HealthCheckResponse.SERVING if served else health_pb2.HealthCheckResponse.NOT_SERVING
        await self.health.set(name, status)

    async def stop(self, grace: float | None = None) -> None:
        """Drain and stop (see the module docstring); calling it again waits for the first call's shutdown."""
        if self._stopping is None:
            self._stopping = asyncio.ensure_future(self._drain_and_stop(grace))
        await asyncio.shield(self._stopping)

    async def _drain_and_stop(self, grace: float | None) -> None:
        grace = self.options.grace_period if grace is None else grace
        loop = asyncio.get_running_loop()
        deadline = loop.time() + grace
        if self.repository.control is not None:
            await self.repository.control.stop()
        await self.health.enter_graceful_shutdown()
        self.gate.close()
        if self.gate.in_flight:
            log.info("draining: waiting up to %.1f s for %d call(s) in flight", grace, self.gate.in_flight)
        if not await self.gate.wait_idle(grace):
            log.warning("grace period over with %d call(s) still running; cancelling them", self.gate.in_flight)
        await self._wait_for_quiet(deadline)
        remaining = max(0.0, deadline - loop.time())
        stopping = [self._server.stop(remaining)] if self._server is not None else []
        if self._rest is not None:
            stopping.append(self._rest.stop(remaining))
        await asyncio.gather(*stopping)
        if self.executor is not None:
            self.executor.shutdown(wait=False, cancel_futures=True)
        await asyncio.to_thread(self.observer.close)  # metrics stay up until here, so the drain can be watched
        log.info("server stopped")

    async def _wait_for_quiet(self, deadline: float) -> None:
        """Keep refusing inference calls until none has come for DRAIN_QUIET_PERIOD, or the grace period is over.

        Stopping gRPC cancels the calls it has received but not yet handed to a servicer, and under load there
        always are some (measured: a dozen CANCELLED calls out of 16 busy callers). Callers refused with
        UNAVAILABLE go to another replica; once they have, nothing is pending, and stopping loses no call.
        """
        loop = asyncio.get_running_loop()
        while (quiet := loop.time() - self.observer.last_arrival) < DRAIN_QUIET_PERIOD and loop.time() < deadline:
            await asyncio.sleep(DRAIN_QUIET_PERIOD - quiet)

    async def wait_for_termination(self) -> None:
        if self._server is not None:
            await self._server.wait_for_termination()

    async def serve_until_signalled(self) -> None:
        """Run until SIGTERM or SIGINT, then shut down gracefully (a second signal cuts the grace period)."""
        loop = asyncio.get_running_loop()
        signals = (signal.SIGTERM, signal.SIGINT)

        def on_signal(signum: int) -> None:
            if self._stopping is None:
                log.info("received %s: shutting down (grace period %.1f s)", signal.Signals(signum).name,
                         self.options.grace_period)  # fmt: skip
                self._stopping = asyncio.ensure_future(self._drain_and_stop(None))
            elif self._server is not None:
                log.info("received %s again: stopping now", signal.Signals(signum).name)
                asyncio.ensure_future(self._server.stop(0))
                if self._rest is not None:
                    self._rest.force_stop()

        for signum in signals:
            loop.add_signal_handler(signum, on_signal, signum)
        try:
            await self.wait_for_termination()
            if self._stopping is not None:
                await self._stopping
        finally:
            for signum in signals:
                loop.remove_signal_handler(signum)


class BackgroundServer:
    """An InferenceServer on its own event loop in a daemon thread: `with BackgroundServer(path) as s: s.address`."""

    def __init__(self, location: Path | str | None = None, options: ServerOptions = ServerOptions(port=0),
                 server: InferenceServer | None = None) -> None:  # fmt: skip
        if server is None and location is None:
            raise ValueError("give a repository location or an InferenceServer")
        self.server = server or InferenceServer.from_location(location, options)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="ortserve-server", daemon=True)

    @property
    def address(self) -> str:
        return self.server.address

    @property
    def port(self) -> int:
        assert self.server.port is not None, "start() the server first"
        return self.server.port

    @property
    def http_address(self) -> str | None:
        return self.server.http_address

    @property
    def metrics_address(self) -> str | None:
        return self.server.metrics_address

    def start(self) -> "BackgroundServer":
        self._thread.start()
        try:
            asyncio.run_coroutine_threadsafe(self.server.start(), self._loop).result()
        except BaseException:
            self.stop(grace=0)
            raise
        return self

    def stop(self, grace: float | None = None) -> None:
        if not self._thread.is_alive():
            return
        try:
            asyncio.run_coroutine_threadsafe(self.server.stop(grace), self._loop).result()
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join()
            self._loop.close()

    def __enter__(self) -> "BackgroundServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
