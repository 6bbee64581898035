"""`python -m ortserve soak`: hold the server under mixed good and bad load for a while and check that it holds up.

    python -m ortserve soak --seconds 300 --concurrency 64            # the production check: exit status 0 or not
    python -m ortserve soak --seconds 20 --shutdown_after 10          # SIGTERM in the middle of the load

It starts `python -m ortserve serve` on the default repository (extra flags: --serve_args), or drives a running
server (--address; it must serve the digits models). N callers run a closed loop for a set time, each cycling
through a shuffled mix of requests:

- good ones: the digits models (digits_cnn, digits_forest, digits_xgb) on real test images, batches of several
  sizes, raw and typed contents. An answer counts as ok only if it holds the outputs in-process ONNX Runtime gives
  for the same inputs: labels equal, scores equal within float tolerance;
- bad ones of known kinds (BAD_KINDS: wrong datatype, wrong shape, unknown model, version, input or output,
  truncated raw contents, an input without data), each with the status it must get. Getting it is an expected
  rejection; anything else -- another status, a wrong answer, a timeout, an answer to a bad request -- is an
  unexpected failure.

Meanwhile it samples the server's resident memory (from /proc when it runs the server or knows its --pid, else
from the metrics endpoint's process_resident_memory_bytes) every few seconds, and at the end compares the
server's own count of requests by status (its metrics endpoint) with what the callers saw. The report (printed,
and as JSON with --json) gives throughput, ok answers by request, expected rejections by kind, unexpected
failures by status with an example message, latency percentiles, a timeline, and the memory after the warm-up,
at the end, at its highest and its growth from after the warm-up. Exit status 1 on any unexpected failure, on
memory growth over --max_growth percent, on a count mismatch, or on a server that does not exit 0.

--shutdown_after S sends the server SIGTERM S seconds into the load and checks that no call it had accepted is
lost: every call ends with its answer, its expected rejection, the draining server's UNAVAILABLE ("shutting
down"), or -- once the server has gone -- a refused connection (the call never reached it). A call cut off
(CANCELLED, a reset connection, any other UNAVAILABLE) is a lost call, and the server must exit 0. A caller
refused that way stops, as a client would that goes to another replica (the server stops once its callers have
gone: see ortserve.server.app).

The callers run in worker processes (ortserve.bench.LoadGenerator), so that the soak's own sampling never
competes with them for the GIL.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import re
import signal
import sys
import time
from collections import Counter
from concurrent.futures import wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from ortserve.bench import MODEL_INFER, LoadGenerator, Timing
from ortserve.server.observe import requests_by_status, scrape_metrics

SOAK_MODELS = ("digits_cnn", "digits_forest", "digits_xgb")
# (model, rows per request, typed contents instead of raw)
GOOD_REQUESTS = (
    ("digits_cnn", 1, False), ("digits_cnn", 8, False), ("digits_cnn", 32, False),
    ("digits_forest", 1, False), ("digits_forest", 8, False), ("digits_forest", 4, True),
    ("digits_xgb", 1, False), ("digits_xgb", 8, False),
)  # fmt: skip
GOOD_WEIGHT = 4  # each good request is sent this many times as often as each bad one (about 4 in 5 calls are good)
# bad kind -> (the status it must get, what is wrong with it)
BAD_KINDS = {
    "wrong_datatype": ("INVALID_ARGUMENT", "digits_cnn images as FP64"),
    "wrong_shape": ("INVALID_ARGUMENT", "digits_cnn images of 7x7 pixels"),
    "unknown_model": ("NOT_FOUND", "a model the server does not have"),
    "unknown_version": ("NOT_FOUND", "digits_cnn version 99"),
    "unknown_input": ("INVALID_ARGUMENT", "digits_forest with its input misnamed"),
    "unknown_output": ("INVALID_ARGUMENT", "digits_xgb asked for an output it does not have"),
    "truncated_raw": ("INVALID_ARGUMENT", "raw contents 4 bytes short of the shape"),
    "no_data": ("INVALID_ARGUMENT", "an input with neither contents nor raw contents"),
}
DRAINING = "shutting down"  # in the message of ShuttingDown (ortserve.server.gate)
# A call that never reached a server: gRPC could not connect (the server has gone).
NOT_CONNECTED = re.compile(r"failed to connect|connection refused|connect failed", re.IGNORECASE)
# Outcomes that are not failures; everything else a caller sees is an unexpected failure.
OK, REJECTED, REFUSED_DRAINING, REFUSED_GONE = "ok", "rejected", "refused: draining", "refused: server gone"
MiB = 1024 * 1024


@dataclass(frozen=True)
class Case:
    """One request the callers send: its bytes, the status it must get and, for good ones, the outputs."""

    name: str
    payload: bytes
    expected_status: str  # a grpc.StatusCode name
    expected_outputs: dict[str, np.ndarray] | None = None


# --------------------------------------------------------------------------------------------------
# The requests


def expected_outputs(model_path: Path, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """What in-process ONNX Runtime answers (one thread, as the server's sessions run by default)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(str(model_path), options, providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(names, inputs)))


def good_cases(model_paths: dict[str, Path]) -> list[Case]:
    from ortserve import data
    from ortserve._proto import grpc_service_pb2 as pb
    from ortserve.client import infer_request

    pixels = data.load_digits_split().X_test
    cases = []
    for i, (model, rows, typed) in enumerate(GOOD_REQUESTS):
        flat = pixels[i * 40 : i * 40 + rows]  # different images for each request
        inputs = {"input": data.as_images(flat) if model == "digits_cnn" else flat}
        request = infer_request(model, inputs, None, None)
        if typed:  # the same tensor as typed contents (fp32_contents) instead of raw bytes
            request.ClearField("raw_input_contents")
            request.inputs[0].contents.CopyFrom(pb.InferTensorContents(fp32_contents=flat.reshape(-1).tolist()))
        name = f"{model} x{rows}" + (" typed" if typed else "")
        cases.append(Case(name, request.SerializeToString(), "OK", expected_outputs(model_paths[model], inputs)))
    return cases


def bad_cases() -> list[Case]:
    from ortserve import data
    from ortserve.client import infer_request

    flat = data.load_digits_split().X_test[:2]
    images = data.as_images(flat)
    requests = {
        "wrong_datatype": infer_request("digits_cnn", {"input": images.astype(np.float64)}, None, None),
        "wrong_shape": infer_request("digits_cnn", {"input": images[:, :, :7, :7].copy()}, None, None),
        "unknown_model": infer_request("no_such_model", {"input": images}, None, None),
        "unknown_version": infer_request("digits_cnn", {"input": images}, None, 99),
        "unknown_input": infer_request("digits_forest", {"pixels": flat}, None, None),
        "unknown_output": infer_request("digits_xgb", {"input": flat}, ["no_such_output"], None),
        "truncated_raw": infer_request("digits_forest", {"input": flat}, None, None),
        "no_data": infer_request("digits_forest", {"input": flat}, None, None),
    }
    requests["truncated_raw"].raw_input_contents[0] = requests["truncated_raw"].raw_input_contents[0][:-4]
    requests["no_data"].ClearField("raw_input_contents")
    return [Case(kind, requests[kind].SerializeToString(), BAD_KINDS[kind][0]) for kind in BAD_KINDS]


def soak_cases() -> list[Case]:
    """The good requests (answers computed in-process) and one of each bad kind; builds missing models first."""
    from ortserve import zoo

    return good_cases({name: zoo.ensure(name) for name in SOAK_MODELS}) + bad_cases()


def schedule(cases: list[Case]) -> list[int]:
    """Indices into `cases`: each good one GOOD_WEIGHT times, each bad one once (callers shuffle it)."""
    return [i for i, case in enumerate(cases) for _ in range(GOOD_WEIGHT if case.expected_outputs else 1)]


def check_answer(case: Case, reply: bytes) -> str | None:
    """None if `reply` holds exactly the expected outputs (scores within float tolerance), else what differs."""
    from ortserve._proto import grpc_service_pb2 as pb
    from ortserve.server import codec

    outputs = codec.decode_response_outputs(pb.ModelInferResponse.FromString(reply))
    expected = case.expected_outputs or {}
    if sorted(outputs) != sorted(expected):
        return f"{case.name}: outputs {sorted(outputs)}, expected {sorted(expected)}"
    for name, want in expected.items():
        got = outputs[name]
        if got.shape != want.shape or got.dtype != want.dtype:
            return (f"{case.name}: output {name!r} is {got.dtype} {list(got.shape)}, expected {want.dtype} "
                    f"{list(want.shape)}")  # fmt: skip
        same = np.array_equal(got, want) if want.dtype.kind in "iub" else np.allclose(got, want, rtol=1e-4, atol=1e-5)
        if not same:
            return f"{case.name}: output {name!r} differs from in-process ONNX Runtime's"
    return None


# --------------------------------------------------------------------------------------------------
# The callers (in a LoadGenerator worker process)


@dataclass(frozen=True)
class Job:
    address: str
    cases: list[Case]
    callers: int
    started: float  # wall clock (time.time()) the timeline counts from
    stop_at: float  # wall clock
    window: float  # seconds per timeline slot
    timeout: float
    shutdown: bool  # the server is told to stop mid-load: draining and refused calls are expected
    seed: int


@dataclass
class Tally:
    """What one worker's callers saw."""

    outcomes: Counter = field(default_factory=Counter)  # (case name, outcome) -> calls
    examples: dict[str, str] = field(default_factory=dict)  # unexpected outcome -> first message
    latencies: list[float] = field(default_factory=list)  # seconds, ok answers
    timeline: Counter = field(default_factory=Counter)  # (slot, "ok" | "rejected" | "refused" | "unexpected") -> n
    began: float = 0.0  # wall clock of the first call and after the last one
    ended: float = 0.0

    def merge(self, other: "Tally") -> None:
        self.outcomes.update(other.outcomes)
        for key, message in other.examples.items():
            self.examples.setdefault(key, message)
        self.latencies += other.latencies
        self.timeline.update(other.timeline)
        self.began = min(self.began, other.began) if self.began else other.began
        self.ended = max(self.ended, other.ended)


def classify(case: Case, code: str, details: str, reply: bytes | None, shutdown: bool) -> tuple[str, str]:
    """(outcome, message): OK, REJECTED, REFUSED_* or an unexpected status name (or "wrong answer")."""
    if code == "OK":
        if case.expected_outputs is None:
            return "OK", f"{case.name}: answered, but it should have got {case.expected_status}"
        problem = check_answer(case, reply or b"")
        return (OK, "") if problem is None else ("wrong answer", problem)
    if code == case.expected_status:
        return REJECTED, ""
    if shutdown and code == "UNAVAILABLE":
        if DRAINING in details:
            return REFUSED_DRAINING, ""
        if NOT_CONNECTED.search(details):
            return REFUSED_GONE, ""
    return code, f"{case.name}: {code}: {details}"


TIMELINE_SLOT = {OK: "ok", REJECTED: "rejected", REFUSED_DRAINING: "refused", REFUSED_GONE: "refused"}


async def _callers(job: Job) -> Tally:
    import grpc

    tally = Tally(began=time.time())
    options = [("grpc.max_send_message_length", -1), ("grpc.max_receive_message_length", -1)]
    async with grpc.aio.insecure_channel(job.address, options=options) as channel:
        call = channel.unary_unary(MODEL_INFER, request_serializer=None, response_deserializer=None)
        order = schedule(job.cases)

        async def caller(index: int) -> None:
            mine = order[:]
            random.Random(job.seed * 1000 + index).shuffle(mine)
            n = 0
            while time.time() < job.stop_at:
                case = job.cases[mine[n % len(mine)]]
                n += 1
                t0 = time.perf_counter()
                reply, details = None, ""
                try:
                    reply = await call(case.payload, timeout=job.timeout)
                    code = "OK"
                except grpc.aio.AioRpcError as error:
                    code, details = error.code().name, error.details() or ""
                seconds = time.perf_counter() - t0
                outcome, message = classify(case, code, details, reply, job.shutdown)
                tally.outcomes[case.name, outcome] += 1
                slot = int((time.time() - job.started) // job.window)
                tally.timeline[slot, TIMELINE_SLOT.get(outcome, "unexpected")] += 1
                if outcome == OK:
                    tally.latencies.append(seconds)
                elif message:
                    tally.examples.setdefault(outcome, message)
                if outcome in (REFUSED_DRAINING, REFUSED_GONE):
                    return  # as a client with another replica to go to would: this caller is done

        await asyncio.gather(*(caller(i) for i in range(job.callers)))
    tally.ended = time.time()
    return tally


def run_callers(job: Job) -> Tally:
    """The worker process's entry point."""
    return asyncio.run(_callers(job))


# --------------------------------------------------------------------------------------------------
# Watching the server


def rss_from_proc(pid: int) -> int | None:
    """Resident memory of process `pid` in bytes (None once it has gone)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def rss_from_metrics(metrics_address: str) -> int | None:
    try:
        values = scrape_metrics(metrics_address, timeout=5).get("process_resident_memory_bytes", {})
    except OSError:
        return None
    return int(next(iter(values.values()))) if values else None


# --------------------------------------------------------------------------------------------------
# The soak


@dataclass
class SoakSettings:
    seconds: float = 300.0
    concurrency: int = 64
    warmup: float | None = None  # None: a fifth of the run, at most 30 s
    sample_every: float = 5.0
    max_growth: float = 10.0  # percent, from after the warm-up to the end
    shutdown_after: float | None = None
    address: str | None = None  # None: start a server
    metrics_address: str | None = None  # with --address: where its metrics are
    pid: int | None = None  # with --address: the server's process, for /proc
    serve_args: list[str] = field(default_factory=list)
    load_processes: int = 1
    timeout: float = 30.0

    @property
    def warmup_seconds(self) -> float:
        return min(30.0, self.seconds / 5) if self.warmup is None else self.warmup


def run_soak(settings: SoakSettings, progress=print) -> dict:
    """Soak a server (see the module docstring); returns the report `main` prints."""
    from ortserve.server.cli import ServerProcess

    progress("building the requests (and the digits models, if missing) ...")
    cases = soak_cases()
    server = None
    if settings.address is None:
        server = ServerProcess(["--grpc_port", "0", "--log_level", "warning", *settings.serve_args]).start()
        address = server.address
        metrics_address = server.endpoints.get("metrics")
        pid: int | None = server.process.pid
    else:
        address, metrics_address, pid = settings.address, settings.metrics_address, settings.pid
    progress(f"soaking {address} for {settings.seconds:g} s with {settings.concurrency} callers ...")
    try:
        report = _soak(settings, cases, address, metrics_address, pid, server)
        if server is not None and report.get("server_exit_status") is None:
            report["server_exit_status"] = server.terminate()  # SIGTERM with nothing in flight: must exit 0
    finally:
        if server is not None:
            server.terminate()
    return _judge(report, settings)


def _soak(settings: SoakSettings, cases: list[Case], address: str, metrics_address: str | None, pid: int | None,
          server) -> dict:  # fmt: skip
    def rss() -> int | None:
        if pid is not None:
            return rss_from_proc(pid)
        return rss_from_metrics(metrics_address) if metrics_address else None

    counts_before = requests_by_status(scrape_metrics(metrics_address)) if metrics_address else None
    samples: list[tuple[float, int]] = []
    signalled_at = None
    exit_status = None
    in_flight_at_signal = None
    with LoadGenerator(settings.load_processes) as load:
        started = time.time()
        stop_at = started + settings.seconds
        shutdown = settings.shutdown_after is not None
        jobs = [Job(address, cases, share, started, stop_at, settings.sample_every, settings.timeout, shutdown, i)
                for i, share in enumerate(load.shares(settings.concurrency))]  # fmt: skip
        futures = [load.submit(run_callers, job) for job in jobs]
        next_sample = started
        while True:
            now = time.time()
            if now >= next_sample:
                value = rss()
                if value is not None:
                    samples.append((round(now - started, 1), value))
                next_sample += settings.sample_every
            if shutdown and signalled_at is None and now - started >= settings.shutdown_after:
                in_flight_at_signal = _in_flight(metrics_address)
                signalled_at = now - started
                if server is not None:
                    server.process.send_signal(signal.SIGTERM)
                elif pid is not None:
                    os.kill(pid, signal.SIGTERM)
            if all(f.done() for f in futures):
                break
            wait(futures, timeout=max(0.05, min(next_sample - time.time(), 1.0)))
        tally = Tally()
        for future in futures:
            tally.merge(future.result())
    if server is not None and signalled_at is not None:
        exit_status = server.process.wait(120)
    counts_after = None
    if metrics_address and signalled_at is None:
        counts_after = requests_by_status(scrape_metrics(metrics_address))
    report = _report(settings, tally, samples, address)
    if counts_before is not None and counts_after is not None:
        server_counts = {status: counts_after[status] - counts_before.get(status, 0) for status in counts_after}
        report["server_counts"] = {k: v for k, v in sorted(server_counts.items()) if v}
    if signalled_at is not None:
        report["shutdown"] = {
            "signal_at_seconds": round(signalled_at, 1),
            "calls_in_flight_at_signal": in_flight_at_signal,
            "refused_while_draining": sum(n for (_, o), n in tally.outcomes.items() if o == REFUSED_DRAINING),
            "refused_after_exit": sum(n for (_, o), n in tally.outcomes.items() if o == REFUSED_GONE),
        }
        report["server_exit_status"] = exit_status
    return report


def _in_flight(metrics_address: str | None) -> int | None:
    """The server's in-flight gauge (None without a metrics endpoint): the calls a SIGTERM now must let finish."""
    if metrics_address is None:
        return None
    return int(scrape_metrics(metrics_address, timeout=5)["ortserve_inflight_requests"][()])


def _report(settings: SoakSettings, tally: Tally, samples: list[tuple[float, int]], address: str) -> dict:
    seconds = max(tally.ended - tally.began, 1e-9)
    calls = sum(tally.outcomes.values())
    ok: Counter = Counter()
    rejected: dict[str, dict] = {}
    unexpected: dict[str, dict] = {}
    for (case, outcome), n in sorted(tally.outcomes.items()):
        if outcome == OK:
            ok[case] += n
        elif outcome == REJECTED:
            rejected[case] = {"status": BAD_KINDS[case][0], "count": n}
        elif outcome not in (REFUSED_DRAINING, REFUSED_GONE):
            entry = unexpected.setdefault(outcome, {"count": 0, "requests": {}, "example": tally.examples.get(outcome)})
            entry["count"] += n
            entry["requests"][case] = n
    client_counts: Counter = Counter()
    for (case, outcome), n in tally.outcomes.items():
        if outcome in (OK, "wrong answer"):
            client_counts["OK"] += n
        elif outcome == REJECTED:
            client_counts[BAD_KINDS[case][0]] += n
        elif outcome not in (REFUSED_DRAINING, REFUSED_GONE):
            client_counts[outcome] += n
    rss = _memory(samples, settings.warmup_seconds)
    slots = sorted({slot for slot, _ in tally.timeline})
    timeline = [{"t": slot * settings.sample_every,
                 **{kind: tally.timeline[slot, kind] for kind in ("ok", "rejected", "refused", "unexpected")}}
                for slot in slots]  # fmt: skip
    return {
        "address": address,
        "seconds": round(seconds, 2),
        "concurrency": settings.concurrency,
        "calls": calls,
        "throughput": calls / seconds,
        "ok_throughput": sum(ok.values()) / seconds,
        "ok": dict(ok),
        "expected_rejections": rejected,
        "unexpected": unexpected,
        "unexpected_total": sum(e["count"] for e in unexpected.values()),
        "latency_ms": Timing.from_seconds(tally.latencies).as_dict() if tally.latencies else None,
        "client_counts": dict(sorted(client_counts.items())),
        "memory": rss,
        "timeline": timeline,
    }


def _memory(samples: list[tuple[float, int]], warmup: float) -> dict | None:
    if not samples:
        return None
    after = next(((t, v) for t, v in samples if t >= warmup), samples[-1])
    end = samples[-1]
    return {
        "start_mib": round(samples[0][1] / MiB, 1),
        "after_warmup_mib": round(after[1] / MiB, 1),
        "after_warmup_at_seconds": after[0],
        "end_mib": round(end[1] / MiB, 1),
        "max_mib": round(max(v for _, v in samples) / MiB, 1),
        "growth_percent": round((end[1] - after[1]) * 100 / after[1], 2),
        "samples": [[t, round(v / MiB, 1)] for t, v in samples],
    }


def _judge(report: dict, settings: SoakSettings) -> dict:
    """Add `problems` (why the soak fails, if it does) and `passed`."""
    problems = []
    if report["unexpected_total"]:
        kinds = ", ".join(f"{k} x{v['count']}" for k, v in report["unexpected"].items())
        problems.append(f"{report['unexpected_total']} unexpected failure(s): {kinds}")
    if not report["ok"]:
        problems.append("no good request was answered")
    memory = report["memory"]
    if settings.shutdown_after is None:
        if memory is None:
            report["memory_note"] = "server memory not measured (give --pid or --metrics_address with --address)"
        elif memory["after_warmup_at_seconds"] >= report["seconds"]:
            report["memory_note"] = "the run ended before the warm-up did: no growth measured"
        elif memory["growth_percent"] > settings.max_growth:
            problems.append(f"server memory grew {memory['growth_percent']:.1f}% after the warm-up "
                            f"(limit {settings.max_growth:g}%)")  # fmt: skip
    server_counts = report.get("server_counts")
    if server_counts is not None and server_counts != report["client_counts"]:
        problems.append(f"the server counted {server_counts}, the callers saw {report['client_counts']}")
    status = report.get("server_exit_status")
    if status not in (None, 0):
        problems.append(f"the server exited with status {status}")
    report["problems"] = problems
    report["passed"] = not problems
    return report


def format_report(report: dict) -> str:
    lines = [
        f"soak of {report['address']}: {report['concurrency']} callers, {report['seconds']:g} s, "
        f"{report['calls']} calls, {report['throughput']:.1f} calls/s ({report['ok_throughput']:.1f} ok answers/s)",
    ]
    latency = report["latency_ms"]
    if latency:
        lines.append(f"latency of ok answers: p50 {latency['median_ms']:.2f} ms, p90 {latency['p90_ms']:.2f} ms, "
                     f"p99 {latency['p99_ms']:.2f} ms")  # fmt: skip
    lines += ["", "ok answers (checked against in-process ONNX Runtime):"]
    lines += [f"  {case:<24} {n:>9}" for case, n in report["ok"].items()]
    lines += ["expected rejections:"]
    lines += [f"  {kind:<24} {r['count']:>9}  {r['status']}" for kind, r in report["expected_rejections"].items()]
    lines += [f"unexpected failures: {report['unexpected_total']}"]
    for outcome, entry in report["unexpected"].items():
        lines.append(f"  {outcome:<24} {entry['count']:>9}  e.g. {entry['example']}")
    if "server_counts" in report:
        same = "same as" if report["server_counts"] == report["client_counts"] else "DIFFERENT from"
        lines.append(f"server's count by status {report['server_counts']}: {same} the callers'")
    memory = report["memory"]
    if memory:
        lines += ["", f"server memory (RSS): {memory['start_mib']} MiB at the start, {memory['after_warmup_mib']} MiB "
                      f"after the warm-up ({memory['after_warmup_at_seconds']:g} s), {memory['end_mib']} MiB at the "
                      f"end, {memory['max_mib']} MiB at most: {memory['growth_percent']:+.2f}% since the warm-up"]
    elif report.get("memory_note"):
        lines.append(report["memory_note"])
    if report.get("memory_note") and memory:
        lines.append(report["memory_note"])
    shutdown = report.get("shutdown")
    if shutdown:
        in_flight = shutdown["calls_in_flight_at_signal"]
        in_flight = "an unknown number of" if in_flight is None else in_flight
        lines += ["", f"SIGTERM at {shutdown['signal_at_seconds']:g} s with {in_flight} "
                      f"call(s) in flight; {shutdown['refused_while_draining']} call(s) refused while draining, "
                      f"{shutdown['refused_after_exit']} after the server had gone; server exit status "
                      f"{report.get('server_exit_status')}"]  # fmt: skip
    lines += ["", "PASSED" if report["passed"] else "FAILED: " + "; ".join(report["problems"])]
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m ortserve soak",
        description="Hold the inference server under mixed good and bad requests from many callers for a set time; "
        "check every answer, count expected rejections by kind apart from unexpected failures, watch the server's "
        "memory. Exit status 1 on any unexpected failure or too much memory growth.",
    )
    parser.add_argument("--seconds", type=float, default=300.0, help="how long (default: %(default)g)")
    parser.add_argument("--concurrency", type=int, default=64, help="concurrent callers (default: %(default)s)")
    parser.add_argument("--warmup", type=float, default=None, metavar="SECONDS",
                        help="memory growth is measured from this point (default: a fifth of the run, at most 30 s)")
    parser.add_argument("--sample_every", type=float, default=5.0, metavar="SECONDS",
                        help="memory sample and timeline interval (default: %(default)g)")
    parser.add_argument("--max_growth", type=float, default=10.0, metavar="PERCENT",
                        help="fail if the server's memory grows more than this after the warm-up (default: "
                             "%(default)g)")  # fmt: skip
    parser.add_argument("--shutdown_after", type=float, default=None, metavar="SECONDS",
                        help="send the server SIGTERM this long into the load and check that no accepted call is lost")
    parser.add_argument("--serve_args", default="", metavar="'ARGS'",
                        help="extra flags for the server it starts, e.g. '--max_batch_size 0 --workers 1'")
    parser.add_argument("--address", default=None, metavar="HOST:PORT",
                        help="soak this running server (serving the digits models) instead of starting one")
    parser.add_argument("--metrics_address", default=None, metavar="HOST:PORT",
                        help="with --address: its metrics endpoint (memory, and the server's own counts)")
    parser.add_argument("--pid", type=int, default=None, help="with --address: its process id (memory from /proc)")
    parser.add_argument("--load_processes", type=int, default=1, metavar="N",
                        help="processes the callers run in (default: %(default)s)")
    parser.add_argument("--timeout", type=float, default=30.0, metavar="SECONDS",
                        help="deadline of each call (default: %(default)g)")
    parser.add_argument("--json", type=Path, metavar="FILE", help="also write the report as JSON to FILE")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    settings = SoakSettings(
        seconds=args.seconds, concurrency=args.concurrency, warmup=args.warmup, sample_every=args.sample_every,
        max_growth=args.max_growth, shutdown_after=args.shutdown_after, address=args.address,
        metrics_address=args.metrics_address, pid=args.pid, serve_args=args.serve_args.split(),
        load_processes=args.load_processes, timeout=args.timeout,
    )  # fmt: skip
    report = run_soak(settings, progress=lambda text: print(text, file=sys.stderr, flush=True))
    print(format_report(report), flush=True)
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    return 0 if report["passed"] else 1
