"""Observability: Prometheus metrics and the structured request log, one `Observer` per server.

Every inference call, whatever its protocol, goes through one `with` block in its servicer:

    with observer.request("grpc", request.model_name, request.model_version, request.id) as record:
        model = record.model = repository.get(request.model_name, request.model_version)  # what the labels name
        ...
        outputs = await model.infer(inputs, requested, record.timing)
        ...                                                     # the answer is built inside the block too

The protocol label is "grpc" (v2 over gRPC), "rest" (v2 over HTTP) or "legacy" (the old ONNX Runtime Server's
PredictionService, counted under the model it serves).

On the way out the block counts the call with its status -- the gRPC status code name that
ortserve.server.errors gives the exception (REST answers are counted under the same names), "OK" without one,
"CANCELLED" when the caller went away -- and the runner's RunTiming (see ortserve.server.runtime) gives its queue
and run times. A request turned away before it reached a run has batch size 0 and no queue time.

Metrics (on a CollectorRegistry of the server's own, so several servers in one process never clash), served on the
metrics endpoint (`serve --metrics_port`, 8002 as Triton's; prometheus_client's own HTTP server) at /metrics:

    ortserve_requests_total{model,version,protocol,status}    inference requests by outcome
    ortserve_request_duration_seconds{model,version,protocol}  requests answered OK: from the servicer getting
                                                                the decoded message to the answer being built
    ortserve_queue_duration_seconds{model,version}              wait for a run (batch queue + worker thread hop)
    ortserve_run_duration_seconds{model,version}                one per session.run (a joined batch counts once)
    ortserve_batch_size{model,version}                          rows per session.run
    ortserve_inflight_requests                                  admitted inference calls not yet finished
    ortserve_model_info{model,version,max_batch_size}           1 per model version served
    process_resident_memory_bytes, process_cpu_seconds_total, ... and python_gc_*, python_info

`scrape_metrics(address)` reads the endpoint back, parsed by prometheus_client's own parser (the soak, the tests
and the notebooks use it); `requests_by_status` sums the request counter of a scrape by status.

The model and version labels only ever name what the server serves, so no client can grow the metrics without
bound: a request for a model the server does not have counts under model="" version="", one for a version it does
not have under the model's name and version="".

The request log (off by default: at thousands of requests per second it costs throughput) is one JSON object per
inference request on the logger "ortserve.requests": time, protocol, model, version, id, status, rows, batch_size,
queue_ms, run_ms, total_ms, and error (the message the client got) for failures. It never holds request contents,
headers or tokens. `serve --request_log [FILE]` sends it, one object per line, to stderr or FILE
(`configure_request_log`).
"""

from __future__ import annotations

import asyncio
import collections
import json
import logging
import queue
import sys
import threading
import time
import urllib.request
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    GCCollector,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    disable_created_metrics,
    start_http_server,
)

from ortserve.server.errors import status_of
from ortserve.server.runtime import RunObserver, RunTiming
from ortserve.server.statistics import Statistics

if TYPE_CHECKING:
    from ortserve.server.gate import Gate
    from ortserve.server.repository import Repository
    from ortserve.server.runtime import Model

log = logging.getLogger(__name__)
request_log = logging.getLogger("ortserve.requests")

DEFAULT_METRICS_PORT = 8002
UNRESOLVED = ""  # the model or version label of a request for a model or version the server does not have
MAX_LOGGED_ID = 200  # longer request ids are cut in the log (a client could send megabytes)

# Seconds, from 100 us to 10 s: the server answers small models in well under a millisecond alone and in tens of
# milliseconds under load; the top buckets catch stalls.
LATENCY_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
                   5.0, 10.0)  # fmt: skip
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)


class Metrics:
    """The server's Prometheus metrics, on a registry of its own (see the module docstring for the list)."""

    def __init__(self) -> None:
        # No `*_created` series (one timestamp per labelled series): they double what a scrape shows and nobody
        # here reads them. (A process-wide prometheus_client setting.)
        disable_created_metrics()
        self.registry = CollectorRegistry()
        registry = self.registry
        self.requests = Counter("ortserve_requests", "Inference requests, by model, version, protocol and status "
                                "(a gRPC status code name)", ["model", "version", "protocol", "status"],
                                registry=registry)  # fmt: skip
        self.latency = Histogram("ortserve_request_duration_seconds", "Time in the server of the inference requests "
                                 "answered OK", ["model", "version", "protocol"], buckets=LATENCY_BUCKETS,
                                 registry=registry)  # fmt: skip
        self.queue_time = Histogram("ortserve_queue_duration_seconds", "Wait of a request for its session.run "
                                    "(batch queue and worker thread)", ["model", "version"], buckets=LATENCY_BUCKETS,
                                    registry=registry)  # fmt: skip
        self.run_time = Histogram("ortserve_run_duration_seconds", "Duration of a session.run (a joined batch counts "
                                  "once)", ["model", "version"], buckets=LATENCY_BUCKETS, registry=registry)
        self.batch_size = Histogram("ortserve_batch_size", "Rows per session.run", ["model", "version"],
                                    buckets=BATCH_BUCKETS, registry=registry)  # fmt: skip
        self.in_flight = Gauge("ortserve_inflight_requests", "Admitted inference calls not yet finished",
                               registry=registry)  # fmt: skip
        self.model_info = Gauge("ortserve_model_info", "1 per model version served; max_batch_size 0: no batching",
                                ["model", "version", "max_batch_size"], registry=registry)  # fmt: skip
        # The server process's own: resident memory, CPU seconds, open files, ... (a soak watches the memory).
        ProcessCollector(registry=registry)
        PlatformCollector(registry=registry)
        GCCollector(registry=registry)


class _Series:
    """The labelled children one (protocol, model, version) uses, looked up once: .labels() is not free."""

    __slots__ = ("metrics", "labels", "by_status", "latency", "queue_time")

    def __init__(self, metrics: Metrics, protocol: str, model: str, version: str) -> None:
        self.metrics = metrics
        self.labels = (model, version, protocol)
        self.by_status: dict[str, Counter] = {}
        self.latency = metrics.latency.labels(model, version, protocol)
        self.queue_time = metrics.queue_time.labels(model, version)

    def counter(self, status: str) -> Counter:
        child = self.by_status.get(status)
        if child is None:
            child = self.by_status[status] = self.metrics.requests.labels(*self.labels, status)
        return child


class RequestRecord:
    """One inference request on its way through the server; a context manager (see the module docstring)."""

    __slots__ = ("observer", "protocol", "model_name", "version", "request_id", "model", "timing", "started",
                 "infer_started", "infer_finished")  # fmt: skip

    def __init__(self, observer: "Observer", protocol: str, model_name: str, version: str, request_id: str) -> None:
        self.observer = observer
        self.protocol = protocol
        self.model_name = model_name  # as the client asked
        self.version = version
        self.request_id = request_id
        self.model: Model | None = None  # the model version serving it, once known
        self.timing = RunTiming()
        self.started = 0.0
        self.infer_started = 0.0  # time.monotonic() when the decoded request reached the model (0: never)
        self.infer_finished = 0.0  # ... and when its answer came back

    def __enter__(self) -> "RequestRecord":
        self.started = self.observer.last_arrival = time.monotonic()
        return self

    def __exit__(self, kind, error, traceback) -> None:
        self.observer.finish(self, error)


class Observer:
    """Metrics and request log of one server: `request(...)` around every inference call, `serve(...)` the endpoint.

    `observe_runs()` hooks it to the repository's runners, for the per-run metrics (batch size, run time); the
    server does that once for its one observer (a runner reports to one observer only).
    """

    def __init__(self, repository: "Repository", gate: "Gate", log_requests: bool = False) -> None:
        self.repository = repository
        self.metrics = Metrics()
        self.statistics = Statistics()  # Triton's statistics extension (ortserve.server.statistics)
        self.log_requests = log_requests
        self._series: dict[tuple[str, str, str], _Series] = {}
        self._http: tuple | None = None  # (server, thread) of the metrics endpoint
        self.last_arrival = 0.0  # time.monotonic() of the latest inference call (a draining server waits for quiet)
        self.metrics.in_flight.set_function(lambda: gate.in_flight)

    def observe_runs(self) -> None:
        for model in self.repository:
            self.watch(model)

    def watch(self, model: "Model") -> None:
        """Start observing a model version the server now serves: its info series and its runs."""
        self.metrics.model_info.labels(model.name, str(model.version), str(model.max_batch_size)).set(1)
        model.runner.observe_run = self._run_observer(model.name, str(model.version), self.statistics.watch(model))

    def forget(self, model: "Model") -> None:
        """A model version the server no longer serves: its info series goes (its request counts stay)."""
        self.statistics.forget(model)
        try:
            self.metrics.model_info.remove(model.name, str(model.version), str(model.max_batch_size))
        except KeyError:
            pass

    @property
    def registry(self) -> CollectorRegistry:
        return self.metrics.registry

    def _run_observer(self, name: str, version: str, count_run: RunObserver) -> RunObserver:
        batch_size = self.metrics.batch_size.labels(name, version)
        run_time = self.metrics.run_time.labels(name, version)

        def observe(rows: int, seconds: float) -> None:
            batch_size.observe(rows)
            run_time.observe(seconds)
            count_run(rows, seconds)

        return observe

    # ----------------------------------------------------------------------------------------------
    # Requests

    def request(self, protocol: str, model_name: str, version: str | int | None = "",
                request_id: str = "") -> RequestRecord:  # fmt: skip
        return RequestRecord(self, protocol, model_name, "" if version is None else str(version), request_id)

    def finish(self, record: RequestRecord, error: BaseException | None) -> None:
        total = time.monotonic() - record.started
        if error is None:
            status, message = "OK", ""
        elif isinstance(error, asyncio.CancelledError):  # the caller went away: nobody gets a status
            status, message = "CANCELLED", "the call was cancelled"
        else:
            code, message = status_of(error)
            status = code.name
        series = self._series_of(record)
        series.counter(status).inc()
        self._count(record, error, total)
        timing = record.timing
        if timing.batch:
            series.queue_time.observe(timing.queue)
        if error is None:
            series.latency.observe(total)
        if self.log_requests:
            self._log(record, status, message, total)

    def _count(self, record: RequestRecord, error: BaseException | None, total: float) -> None:
        """The request in its model version's statistics (requests that found no model count nowhere)."""
        stats = self.statistics.of(record.model) if record.model is not None else None
        if stats is None:
            return
        if error is not None:
            stats.failed(total)
            return
        timing = record.timing
        decode = max(0.0, record.infer_started - record.started) if record.infer_started else 0.0
        encode = max(0.0, record.started + total - record.infer_finished) if record.infer_finished else 0.0
        stats.succeeded(timing.rows, total, timing.queue, decode, timing.run, encode)

    def _series_of(self, record: RequestRecord) -> _Series:
        model = record.model
        if model is not None:
            key = (record.protocol, model.name, str(model.version))
        elif record.model_name in self.repository.names():
            key = (record.protocol, record.model_name, UNRESOLVED)
        else:
            key = (record.protocol, UNRESOLVED, UNRESOLVED)
        series = self._series.get(key)
        if series is None:
            series = self._series[key] = _Series(self.metrics, *key)
        return series

    def _log(self, record: RequestRecord, status: str, message: str, total: float) -> None:
        model = record.model
        timing = record.timing
        request_id = record.request_id
        if len(request_id) > MAX_LOGGED_ID:
            request_id = request_id[:MAX_LOGGED_ID] + "..."
        entry = {
            "time": datetime.now(timezone.utc).isoformat(timespec="milliseconds"),
            "protocol": record.protocol,
            "model": model.name if model is not None else record.model_name,
            "version": str(model.version) if model is not None else record.version,
            "id": request_id,
            "status": status,
            "rows": timing.rows,
            "batch_size": timing.batch,
            "queue_ms": round(timing.queue * 1e3, 3),
            "run_ms": round(timing.run * 1e3, 3),
            "total_ms": round(total * 1e3, 3),
        }
        if status != "OK":
            entry["error"] = message
        if request_log.isEnabledFor(logging.INFO):
            # What request_log.info does, less looking up the caller's file and line (a fifth of the log's cost).
            request_log.handle(request_log.makeRecord(request_log.name, logging.INFO, "", 0, json.dumps(entry), None,
                                                      None))  # fmt: skip

    # ----------------------------------------------------------------------------------------------
    # The metrics endpoint

    def serve(self, address: str, port: int) -> int:
        """Serve /metrics on address:port (0: any free port) in a thread of its own; returns the bound port."""
        try:
            server, thread = start_http_server(port, addr=address.strip("[]"), registry=self.registry)
        except OSError as error:
            raise OSError(f"cannot serve metrics on {address}:{port}: {error}") from None
        self._http = (server, thread)
        return server.server_port

    def close(self) -> None:
        """Stop the metrics endpoint (blocks up to half a second: the HTTP server's poll interval)."""
        if self._http is not None:
            server, thread = self._http
            self._http = None
            server.shutdown()
            server.server_close()
            thread.join()


# --------------------------------------------------------------------------------------------------
# Reading the metrics endpoint (the soak, tests, notebooks)


def scrape_metrics(metrics_address: str, timeout: float = 10.0) -> dict[str, dict[tuple, float]]:
    """GET http://HOST:PORT/metrics, parsed: sample name -> {tuple of sorted (label, value) pairs: value}.

        samples = scrape_metrics(server.metrics_address)
        samples["ortserve_requests_total"][(("model", "digits_cnn"), ("protocol", "grpc"), ("status", "OK"),
                                            ("version", "1"))]
    """
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(f"http://{metrics_address}/metrics", timeout=timeout) as response:
        text = response.read().decode()
    samples: dict[str, dict[tuple, float]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples.setdefault(sample.name, {})[tuple(sorted(sample.labels.items()))] = sample.value
    return samples


def requests_by_status(samples: dict[str, dict[tuple, float]]) -> collections.Counter:
    """ortserve_requests_total of a scrape, summed over model, version and protocol, by status."""
    counts: collections.Counter = collections.Counter()
    for labels, value in samples.get("ortserve_requests_total", {}).items():
        counts[dict(labels)["status"]] += int(value)
    return counts


# --------------------------------------------------------------------------------------------------
# Where the request log goes (the command line's --request_log)


def configure_request_log(destination: str | Path) -> "RequestLogWriter":
    """Write the request log, one JSON object per line and nothing else, to stderr ("-") or a file (appended).

    `stop()` the returned writer at exit: it writes what is queued and detaches from the logger.
    """
    if str(destination) == "-":
        return RequestLogWriter(sys.stderr, close=False)
    return RequestLogWriter(open(destination, "a", encoding="utf-8"), close=True)


class RequestLogWriter(logging.Handler):
    """The request log's handler: queues each line, and a thread of its own writes them, in batches.

    So the event loop never waits on a full pipe or a slow disk, and a busy server makes a few writes a second
    rather than one per request: the writer wakes at most every INTERVAL seconds and writes all that came. (Measured
    at 32 callers: logging's QueueListener, one write and flush per line, doubled the server's CPU time per request
    that the log costs.)
    """

    INTERVAL = 0.05  # seconds between writes: how late a line may reach the file

    def __init__(self, stream, close: bool) -> None:
        super().__init__(logging.INFO)
        self.stream = stream
        self._close = close
        self._lines: queue.SimpleQueue[str | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._write, name="ortserve-request-log", daemon=True)
        self._thread.start()
        request_log.addHandler(self)
        request_log.setLevel(logging.INFO)
        request_log.propagate = False  # not through the root handler too: its format would wrap the JSON

    def emit(self, record: logging.LogRecord) -> None:
        self._lines.put(record.getMessage())

    def _write(self) -> None:
        while True:
            batch = [self._lines.get()]
            while True:
                try:
                    batch.append(self._lines.get_nowait())
                except queue.Empty:
                    break
            last = batch.index(None) if None in batch else len(batch)  # None: stop() was called
            if last:
                self.stream.write("\n".join(batch[:last]) + "\n")  # type: ignore[arg-type]
                self.stream.flush()
            if last < len(batch):
                return
            time.sleep(self.INTERVAL)  # let lines gather: a busy server's log is written a few times a second

    def stop(self) -> None:
        request_log.removeHandler(self)
        if not request_log.handlers:
            request_log.propagate = True
        self._lines.put(None)
        self._thread.join()
        if self._close:
            self.stream.close()
