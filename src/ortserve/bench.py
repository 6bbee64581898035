"""Measuring speed: timing in-process calls, and a load generator for a served model.

Two tools, one set of statistics:

- `time_calls(fn)` times a Python callable the way a benchmark should: warm-up calls first (caches, lazy
  initialisation, thread pools), then enough repeats to fill a minimum time, and a summary of the distribution
  (median and tail percentiles, not the mean of a handful of runs).
- `run_load(address, request, concurrency)` drives a gRPC server that speaks the Open Inference Protocol with a
  closed loop of N callers: each sends a pre-serialised ModelInfer request, waits for the answer, sends the next.
  After a warm-up, it counts answers and latencies for a fixed duration.
- The same closed loop drives an HTTP endpoint when the request is an `HttpRequest`: a body built once (the
  protocol's REST form, JSON or with the binary data extension, or any JSON body), POSTed by aiohttp, each answer
  checked (a 2xx status, and the outputs `expected`, if given): an HTTP error or a wrong answer counts as an
  error, not as an answer. aiohttp costs several times less client CPU per request than httpx on this machine
  (measured for lesson 11), and the client shares the cores with the server.

The load generator sends bytes that were serialised once, so that it spends as little of the machine as it can:
on a 2-core machine the client and the server share the CPU, and every microsecond the client saves is one the
server can use. The same generator drives every server that is compared, so the comparison stays fair.
`LoadGenerator` runs it in separate processes (the callers split among them), so that it never competes with the
measuring process itself for the GIL.

`python -m ortserve bench` (see `main`) puts it together: one model served by this server, by a baseline server and
by three ceilings -- echo, protocol, hand-off (ortserve.yardsticks) -- each in its own process, driven by the same load generator at each
concurrency, beside the model's in-process ONNX Runtime throughput at the same batch size, all in one run. The
points are measured in interleaved rounds (each round visits every server at every concurrency) and each reports
its median round: on a shared VM whose speed drifts, a ratio of two numbers taken minutes apart means little.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import shutil
import sys
import tempfile
import time
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Awaitable, Callable, Iterable, Mapping, Sequence

import numpy as np

MODEL_INFER = "/inference.GRPCInferenceService/ModelInfer"


@dataclass(frozen=True)
class Timing:
    """Latency statistics in milliseconds over `n` timed calls."""

    n: int
    mean_ms: float
    median_ms: float
    p90_ms: float
    p99_ms: float
    min_ms: float

    @classmethod
    def from_seconds(cls, samples: Sequence[float]) -> "Timing":
        ms = np.asarray(samples, dtype=np.float64) * 1e3
        if ms.size == 0:
            raise ValueError("no samples to summarise")
        p50, p90, p99 = np.percentile(ms, [50, 90, 99])
        return cls(int(ms.size), float(ms.mean()), float(p50), float(p90), float(p99), float(ms.min()))

    def as_dict(self) -> dict:
        return asdict(self)


def time_calls(
    fn: Callable[[], object],
    *,
    warmup: int = 5,
    repeats: int = 20,
    min_seconds: float = 0.2,
    max_repeats: int = 100_000,
) -> Timing:
    """Time `fn()`: `warmup` untimed calls, then at least `repeats` timed ones and at least `min_seconds` of them."""
    for _ in range(warmup):
        fn()
    samples: list[float] = []
    started = time.perf_counter()
    while len(samples) < max_repeats and (len(samples) < repeats or time.perf_counter() - started < min_seconds):
        t0 = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - t0)
    return Timing.from_seconds(samples)


@dataclass(frozen=True)
class LoadResult:
    """What a closed-loop load run measured: throughput and latency at one concurrency."""

    concurrency: int
    requests: int
    errors: int
    seconds: float
    throughput: float  # answered requests per second
    latency: Timing | None

    def as_dict(self) -> dict:
        out = asdict(self)
        out["latency"] = self.latency.as_dict() if self.latency else None
        return out


class WrongAnswer(Exception):
    """An HTTP answer that is not the one an HttpRequest expects (status, or outputs)."""


@dataclass(frozen=True)
class HttpRequest:
    """An HTTP POST for the load generator: `body` sent to `path` at each address, and what a right answer is.

    The answer must have a 2xx status; with `expected` (output name -> array) it must also carry those outputs,
    equal within rtol/atol. An Open Inference Protocol answer ({"outputs": [...]}, JSON data or binary data after
    the Inference-Header-Content-Length header) is read by output name; any other JSON object by top-level key,
    e.g. {"label": [7]} for expected={"label": np.array([7])}.
    """

    path: str  # e.g. "/v2/models/digits_cnn/infer"
    body: bytes
    headers: tuple[tuple[str, str], ...] = (("Content-Type", "application/json"),)
    expected: Mapping[str, np.ndarray] | None = None
    rtol: float = 1e-4
    atol: float = 1e-5

    def wrong_answer(self, status: int, header_length: str | None, body: bytes) -> str | None:
        """Why the answer (status, Inference-Header-Content-Length, body) is not a right one; None when it is."""
        if not 200 <= status < 300:
            return f"HTTP {status}: {body[:300].decode('utf-8', 'replace')}"
        if self.expected is None:
            return None
        try:
            got = _answer_tensors(header_length, body)
            for name, want in self.expected.items():
                if name not in got:
                    return f"the answer has no output {name!r} (it has {', '.join(map(repr, got)) or 'none'})"
                value = np.asarray(got[name])
                if value.shape != np.shape(want) or not np.allclose(value, want, rtol=self.rtol, atol=self.atol):
                    return f"output {name!r} is not the expected one: got {_excerpt(value)}, expected {_excerpt(want)}"
        except (ValueError, TypeError) as error:  # not JSON, not tensors, not numbers (InvalidInput is a ValueError)
            return f"the answer is not of the expected form: {error}"
        return None


def _answer_tensors(header_length: str | None, body: bytes) -> Mapping[str, object]:
    """The outputs of an HTTP answer by name: an Open Inference Protocol answer's tensors, or a JSON object."""
    from ortserve.server import codec

    length = int(header_length) if header_length is not None else len(body)
    answer = json.loads(body[:length])
    if isinstance(answer, dict) and isinstance(answer.get("outputs"), list):
        return codec.decode_json_inputs(answer["outputs"], memoryview(body)[length:])  # outputs: the same tensors
    if not isinstance(answer, dict):
        raise TypeError(f"a JSON object was expected, got {codec.json_type(answer)}")
    return answer


def _excerpt(value: object, limit: int = 80) -> str:
    text = np.array2string(np.asarray(value), precision=4, threshold=8)
    return text if len(text) <= limit else text[: limit - 3] + "..."


async def _callers(
    send: Callable[[], Awaitable[object]], failures: tuple[type[BaseException], ...], concurrency: int,
    seconds: float, warmup_seconds: float,
) -> tuple[list[float], int, str | None]:  # fmt: skip
    """`concurrency` callers repeating `await send()` for `seconds` after the warm-up: (latencies in seconds,
    errors, first error); an exception of `failures` counts as an error."""
    latencies: list[float] = []
    errors = 0
    first_error: BaseException | None = None
    loop = asyncio.get_running_loop()
    measure_from = loop.time() + warmup_seconds
    stop_at = measure_from + seconds

    async def caller() -> None:
        nonlocal errors, first_error
        while True:
            t0 = loop.time()
            if t0 >= stop_at:
                return
            try:
                await send()
            except failures as err:
                if t0 >= measure_from:
                    errors += 1
                    first_error = first_error or err
                continue
            if t0 >= measure_from:
                latencies.append(loop.time() - t0)

    await asyncio.gather(*(caller() for _ in range(concurrency)))
    return latencies, errors, None if first_error is None else str(first_error) or repr(first_error)


async def _http_closed_loop(
    address: str | Sequence[str], request: HttpRequest, concurrency: int, seconds: float, warmup_seconds: float,
    timeout: float,
) -> tuple[list[float], int, str | None]:  # fmt: skip
    """_closed_loop over HTTP/1.1 with aiohttp: one kept-alive connection per caller, addresses taken in turn."""
    import itertools

    import aiohttp

    from ortserve.server.rest import HEADER_LENGTH

    urls = itertools.cycle([f"http://{a}{request.path}" for a in ([address] if isinstance(address, str) else address)])
    headers = dict(request.headers)
    connector = aiohttp.TCPConnector(limit=0)  # no pool limit: every caller keeps its own connection
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=timeout)) as session:

        async def send() -> None:
            async with session.post(next(urls), data=request.body, headers=headers) as response:
                body = await response.read()
                problem = request.wrong_answer(response.status, response.headers.get(HEADER_LENGTH), body)
            if problem is not None:
                raise WrongAnswer(problem)

        failures = (aiohttp.ClientError, asyncio.TimeoutError, WrongAnswer)
        return await _callers(send, failures, concurrency, seconds, warmup_seconds)


async def _closed_loop(
    address: str | Sequence[str], payload: bytes | HttpRequest, concurrency: int, seconds: float,
    warmup_seconds: float, timeout: float,
) -> tuple[list[float], int, str | None]:
    """(latencies in seconds, errors, first error) of `concurrency` callers over `seconds` after the warm-up."""
    if isinstance(payload, HttpRequest):
        return await _http_closed_loop(address, payload, concurrency, seconds, warmup_seconds, timeout)
    import grpc

    from ortserve.client import channel_target

    target, balancing = channel_target(address)  # several addresses: calls spread round-robin
    options = [("grpc.max_send_message_length", -1), ("grpc.max_receive_message_length", -1), *balancing]
    async with grpc.aio.insecure_channel(target, options=options) as channel:
        # Identity (de)serialisers: the request is sent as the bytes it was serialised to once, the answer is
        # not parsed. Only its status is checked.
        call = channel.unary_unary(MODEL_INFER, request_serializer=None, response_deserializer=None)
        await asyncio.wait_for(channel.channel_ready(), timeout)
        return await _callers(lambda: call(payload, timeout=timeout), (grpc.aio.AioRpcError,), concurrency, seconds,
                              warmup_seconds)  # fmt: skip


def _load_result(concurrency: int, seconds: float, parts: Iterable[tuple[list[float], int, str | None]]) -> LoadResult:
    latencies: list[float] = []
    errors = 0
    first_error = None
    for part_latencies, part_errors, part_first in parts:
        latencies += part_latencies
        errors += part_errors
        first_error = first_error or part_first
    if errors and not latencies:
        raise RuntimeError(f"every request failed; the first error: {first_error}")
    return LoadResult(
        concurrency=concurrency,
        requests=len(latencies),
        errors=errors,
        seconds=seconds,
        throughput=len(latencies) / seconds,
        latency=Timing.from_seconds(latencies) if latencies else None,
    )


def _load_in_process(args: tuple) -> tuple[list[float], int, str | None]:
    return asyncio.run(_closed_loop(*args))


class LoadGenerator:
    """The closed loop in `processes` worker processes, started once and reused for every server measured.

        with LoadGenerator(processes=1) as load:
            result = load.run(address, request, concurrency=32, seconds=3)

    The callers are split evenly among the processes; each warms up, then measures for the same `seconds`.
    `address` may be a list (the replicas of `serve --replicas N`): each process spreads its calls round-robin.
    With an HttpRequest for `request`, `address` is the HTTP endpoint's HOST:PORT (ServerProcess.endpoints["REST"]).
    Other load shapes (ortserve.soak) run their own module-level function in the same processes with `submit`.
    """

    def __init__(self, processes: int = 1) -> None:
        if processes < 1:
            raise ValueError(f"processes must be at least 1, got {processes}")
        self.processes = processes
        # spawn, not fork: a forked child inherits gRPC's threads and state, which gRPC does not support.
        self._pool = ProcessPoolExecutor(processes, mp_context=multiprocessing.get_context("spawn"))

    def run(self, address: str | Sequence[str], request, concurrency: int = 1, seconds: float = 3.0,
            warmup_seconds: float = 1.0, timeout: float = 30.0) -> LoadResult:  # fmt: skip
        if concurrency < 1:
            raise ValueError(f"concurrency must be at least 1, got {concurrency}")
        payload = serialise(request)
        jobs = [(address, payload, share, seconds, warmup_seconds, timeout) for share in self.shares(concurrency)]
        return _load_result(concurrency, seconds, self._pool.map(_load_in_process, jobs))

    def shares(self, concurrency: int) -> list[int]:
        """Callers per process: `concurrency` split as evenly as can be, processes left without one left out."""
        shares = [concurrency // self.processes + (i < concurrency % self.processes) for i in range(self.processes)]
        return [share for share in shares if share]

    def submit(self, fn: Callable, *args) -> Future:
        """Run fn(*args) in a worker process (a module-level function and picklable arguments, as for any pool)."""
        return self._pool.submit(fn, *args)

    def close(self) -> None:
        self._pool.shutdown()

    def __enter__(self) -> "LoadGenerator":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def serialise(request) -> bytes | HttpRequest:
    """A ModelInferRequest (or bytes already) as the bytes the load generator sends; an HttpRequest as it is."""
    return request if isinstance(request, (bytes, bytearray, HttpRequest)) else request.SerializeToString()


def run_load(
    address: str | Sequence[str],
    request,
    concurrency: int = 1,
    seconds: float = 3.0,
    warmup_seconds: float = 1.0,
    timeout: float = 30.0,
) -> LoadResult:
    """Closed loop against `address`: `concurrency` callers repeat `request` for `seconds` after a warm-up."""
    if concurrency < 1:
        raise ValueError(f"concurrency must be at least 1, got {concurrency}")
    parts = [asyncio.run(_closed_loop(address, serialise(request), concurrency, seconds, warmup_seconds, timeout))]
    return _load_result(concurrency, seconds, parts)


# --------------------------------------------------------------------------------------------------
# python -m ortserve bench

DEFAULT_CONCURRENCIES = (1, 8, 32)
SERVERS = ("served", "baseline", "handoff", "protocol", "echo")  # started in this order: served first (run_bench)


def example_request(model_path: Path, name: str, rows: int, seed: int = 0):
    """(ModelInferRequest, inputs): random inputs of `rows` rows for every input of the model at `model_path`."""
    import onnxruntime as ort

    from ortserve.client import infer_request
    from ortserve.server.runtime import ORT_DTYPES

    session = ort.InferenceSession(str(model_path), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(seed)
    inputs = {}
    for spec in session.get_inputs():
        dims = [d if isinstance(d, int) and d > 0 else 1 for d in spec.shape]
        shape = [rows, *dims[1:]] if not isinstance(spec.shape[0], int) else dims
        inputs[spec.name] = rng.random(shape).astype(ORT_DTYPES[spec.type])
    return infer_request(name, inputs, None, None), inputs


def in_process_throughput(model_path: Path, inputs: dict, seconds: float) -> dict:
    """ONNX Runtime's own speed on `inputs`, default session options: rows per second and call latency."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(model_path), providers=["CPUExecutionProvider"])
    rows = len(next(iter(inputs.values())))
    timing = time_calls(lambda: session.run(None, inputs), warmup=3, repeats=5, min_seconds=seconds)
    return {"batch": rows, "throughput": rows * 1e3 / timing.mean_ms, "latency": timing.as_dict()}


def _servers(model_path: Path, name: str, repository: Path, reply_file: Path, serve_args: Sequence[str]):
    from ortserve.server.cli import ServerProcess
    from ortserve.yardsticks import YardstickProcess

    return {
        "served": lambda: ServerProcess(["--grpc_port", "0", "--model_repository", str(repository),
                                         "--log_level", "warning", *serve_args]),
        "baseline": lambda: YardstickProcess(["baseline", "--model_path", str(model_path), "--name", name]),
        "handoff": lambda: YardstickProcess(["handoff", "--reply", str(reply_file)]),
        "protocol": lambda: YardstickProcess(["protocol", "--reply", str(reply_file)]),
        "echo": lambda: YardstickProcess(["echo", "--reply", str(reply_file)]),
    }  # fmt: skip


def run_bench(model: str, concurrencies: Sequence[int], seconds: float, warmup_seconds: float, rows: int = 1,
              processes: int = 1, serve_args: Sequence[str] = (), progress=print, rounds: int = 1) -> dict:  # fmt: skip
    """Measure (see the module docstring); returns the report `main` prints and saves.

    The three servers run side by side, and each round measures every concurrency on each of them in turn, so that a
    slow spell of the machine (a shared 2-core VM drifts by 20% and more within a minute) falls on all three alike;
    each point reports its median round (by throughput) and every round's throughput.
    """
    import contextlib

    import grpc

    from ortserve import zoo

    if rounds < 1:
        raise ValueError(f"rounds must be at least 1, got {rounds}")
    model_path = zoo.ensure(model)
    request, inputs = example_request(model_path, model, rows)
    payload = request.SerializeToString()
    report: dict = {"model": model, "rows_per_request": rows, "seconds": seconds, "warmup_seconds": warmup_seconds,
                    "rounds": rounds, "load_processes": processes, "serve_args": list(serve_args)}  # fmt: skip
    progress(f"in-process ONNX Runtime, batch {rows} ...")
    report["in_process"] = in_process_throughput(model_path, inputs, max(seconds, 0.2))
    workdir = Path(tempfile.mkdtemp(prefix="ortserve-bench-"))
    try:
        (workdir / "repository" / model / "1").mkdir(parents=True)
        shutil.copyfile(model_path, workdir / "repository" / model / "1" / "model.onnx")
        reply_file = workdir / "reply.bin"
        starters = _servers(model_path, model, workdir / "repository", reply_file, serve_args)
        measured: dict[tuple[str, int], list[LoadResult]] = {}
        with contextlib.ExitStack() as stack, LoadGenerator(processes) as load:
            servers = {}
            for kind in SERVERS:  # served first: the ceilings answer with the served model's real reply
                servers[kind] = stack.enter_context(starters[kind]())
                if kind == "served":
                    options = [("grpc.max_receive_message_length", -1)]
                    with grpc.insecure_channel(servers[kind].address, options=options) as channel:
                        reply_file.write_bytes(channel.unary_unary(MODEL_INFER)(payload, timeout=60))
            for round_number in range(1, rounds + 1):
                for concurrency in concurrencies:
                    for kind in SERVERS:
                        of = f" (round {round_number} of {rounds})" if rounds > 1 else ""
                        progress(f"{kind}, {concurrency} concurrent caller(s){of} ...")
                        result = load.run(servers[kind].addresses, payload, concurrency, seconds, warmup_seconds)
                        measured.setdefault((kind, concurrency), []).append(result)
        report["servers"] = {kind: [_median_round(measured[kind, c]) for c in concurrencies] for kind in SERVERS}
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    report["ratios"] = ratios(report)
    return report


def _median_round(results: list[LoadResult]) -> dict:
    """The round of median throughput (the lower middle one of an even count), with every round's throughput."""
    ordered = sorted(results, key=lambda r: r.throughput)
    median = ordered[(len(ordered) - 1) // 2].as_dict()
    median["throughput_rounds"] = [r.throughput for r in results]
    return median


def ratios(report: dict) -> list[dict]:
    """Per concurrency, throughput ratios: served/echo, protocol/echo and handoff/echo (how far below the echo each
    ceiling sits), served/handoff, served/baseline, and served/in-process in rows per second; and the p50 gap."""
    servers = report["servers"]
    in_process = report["in_process"]["throughput"]
    rows = report["rows_per_request"]
    out = []
    for point in zip(*(servers[kind] for kind in SERVERS)):
        results = dict(zip(SERVERS, point))
        by = {kind: result["throughput"] for kind, result in results.items()}
        out.append({
            "concurrency": results["served"]["concurrency"],
            "served/echo": by["served"] / by["echo"],
            "protocol/echo": by["protocol"] / by["echo"],
            "handoff/echo": by["handoff"] / by["echo"],
            "served/handoff": by["served"] / by["handoff"],
            "served/baseline": by["served"] / by["baseline"],
            "served/in_process": by["served"] * rows / in_process,
            "p50_ms_served-baseline": _p50(results["served"]) - _p50(results["baseline"]),
        })  # fmt: skip
    return out


def _p50(result: dict) -> float:
    return result["latency"]["median_ms"] if result["latency"] else float("nan")


def format_report(report: dict) -> str:
    ip = report["in_process"]
    rounds = report.get("rounds", 1)
    lines = [
        f"model {report['model']}, {report['rows_per_request']} row(s) per request, {report['seconds']:g} s per "
        f"point after {report['warmup_seconds']:g} s warm-up, load from {report['load_processes']} process(es)"
        + (f", median of {rounds} interleaved rounds (req/s range in brackets)" if rounds > 1 else ""),
        f"in-process ONNX Runtime, batch {ip['batch']}: {ip['throughput']:.1f} rows/s "
        f"(p50 {ip['latency']['median_ms']:.3f} ms, p99 {ip['latency']['p99_ms']:.3f} ms)",
        "",
        f"{'server':<9} {'callers':>7} {'req/s':>9} {'p50 ms':>8} {'p90 ms':>8} {'p99 ms':>8} {'errors':>6}",
    ]
    for kind in SERVERS:
        for r in report["servers"][kind]:
            lat = r["latency"] or {}
            p50, p90, p99 = (lat.get(key, float("nan")) for key in ("median_ms", "p90_ms", "p99_ms"))
            spread = r.get("throughput_rounds", [])
            spread = f"  [{min(spread):.0f}-{max(spread):.0f}]" if len(spread) > 1 else ""
            lines.append(f"{kind:<9} {r['concurrency']:>7} {r['throughput']:>9.1f} {p50:>8.3f} {p90:>8.3f} {p99:>8.3f} "
                         f"{r['errors']:>6}{spread}")  # fmt: skip
    columns = [("served/echo", "served/echo"), ("protocol/echo", "protocol/echo"), ("handoff/echo", "handoff/echo"),
               ("served/handoff", "served/handoff"), ("served/baseline", "served/baseline"),
               ("served/in-process", "served/in_process")]  # fmt: skip
    lines += ["", f"{'callers':>7} " + " ".join(f"{title:>{len(title) + 1}}" for title, _ in columns)
              + f" {'p50 - baseline p50':>19}"]  # fmt: skip
    for r in report["ratios"]:
        lines.append(f"{r['concurrency']:>7} " + " ".join(f"{r[key]:>{len(title) + 1}.3f}" for title, key in columns)
                     + f" {r['p50_ms_served-baseline']:>+16.3f} ms")  # fmt: skip
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m ortserve bench",
        description="Measure the inference server on one model against a baseline server (thread-pool grpc.server, "
        "one session.run per request), three ceilings -- echo (grpc.aio, fixed reply, no work), protocol (parses "
        "each request, answers a copied reply) and hand-off (the protocol ceiling plus a batched hand-off to a "
        "worker thread that does nothing) -- and in-process ONNX Runtime, in one run: closed-loop load at each "
        "concurrency, throughput and latency percentiles, ratios.",
    )
    parser.add_argument("--model", default="digits_cnn", help="a model of ortserve.zoo (default: %(default)s)")
    parser.add_argument("--concurrency", default=",".join(map(str, DEFAULT_CONCURRENCIES)), metavar="N,N,...",
                        help="concurrent callers, comma-separated (default: %(default)s)")
    parser.add_argument("--seconds", type=float, default=3.0, help="measured seconds per point (default: %(default)g)")
    parser.add_argument("--warmup", type=float, default=1.0, help="warm-up seconds per point (default: %(default)g)")
    parser.add_argument("--rounds", type=int, default=3,
                        help="interleaved rounds: each measures every point once on each server; a point reports its "
                             "median round, so a slow spell of the machine falls on all three servers alike "
                             "(default: %(default)s)")  # fmt: skip
    parser.add_argument("--rows", type=int, default=1, help="rows (samples) per request (default: %(default)s)")
    parser.add_argument("--load_processes", type=int, default=1, metavar="N",
                        help="processes the load generator runs in, callers split among them (default: %(default)s)")
    parser.add_argument("--serve_args", default="", metavar="'ARGS'",
                        help="extra flags for `python -m ortserve serve`, e.g. '--max_batch_size 0'")
    parser.add_argument("--json", type=Path, metavar="FILE", help="also write the report as JSON to FILE")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.rounds < 1:
        parser.error(f"--rounds must be at least 1, got {args.rounds}")
    concurrencies = [int(c) for c in args.concurrency.split(",") if c.strip()]
    report = run_bench(args.model, concurrencies, args.seconds, args.warmup, args.rows, args.load_processes,
                       args.serve_args.split(), progress=lambda text: print(text, file=sys.stderr, flush=True),
                       rounds=args.rounds)  # fmt: skip
    print(format_report(report), flush=True)
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    return 0
