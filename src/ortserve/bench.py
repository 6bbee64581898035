"""Measuring speed: timing in-process calls, and a load generator for a served model.

Two tools, one set of statistics:

- `time_calls(fn)` times a Python callable the way a benchmark should: warm-up calls first (caches, lazy
  initialisation, thread pools), then enough repeats to fill a minimum time, and a summary of the distribution
  (median and tail percentiles, not the mean of a handful of runs).
- `run_load(address, request, concurrency)` drives a gRPC server that speaks the Open Inference Protocol with a
  closed loop of N callers: each sends a pre-serialised ModelInfer request, waits for the answer, sends the next.
  After a warm-up, it counts answers and latencies for a fixed duration. `sweep` repeats it over concurrencies.

The load generator sends bytes that were serialised once, so that it spends as little of the machine as it can:
on a 2-core machine the client and the server share the CPU, and every microsecond the client saves is one the
server can use. The same generator drives every server that is compared, so the comparison stays fair.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import asdict, dataclass
from typing import Callable, Iterable, Sequence

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


async def _closed_loop(
    address: str, payload: bytes, concurrency: int, seconds: float, warmup_seconds: float, timeout: float
) -> LoadResult:
    import grpc

    options = [("grpc.max_send_message_length", -1), ("grpc.max_receive_message_length", -1)]
    async with grpc.aio.insecure_channel(address, options=options) as channel:
        # Identity (de)serialisers: the request is sent as the bytes it was serialised to once, the answer is
        # not parsed. Only its status is checked.
        call = channel.unary_unary(MODEL_INFER, request_serializer=None, response_deserializer=None)
        await asyncio.wait_for(channel.channel_ready(), timeout)
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
                    await call(payload, timeout=timeout)
                except grpc.aio.AioRpcError as err:
                    if t0 >= measure_from:
                        errors += 1
                        first_error = first_error or err
                    continue
                if t0 >= measure_from:
                    latencies.append(loop.time() - t0)

        await asyncio.gather(*(caller() for _ in range(concurrency)))
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


def serialise(request) -> bytes:
    """A ModelInferRequest (or bytes already) as the bytes the load generator sends."""
    return request if isinstance(request, (bytes, bytearray)) else request.SerializeToString()


def run_load(
    address: str,
    request,
    concurrency: int = 1,
    seconds: float = 3.0,
    warmup_seconds: float = 1.0,
    timeout: float = 30.0,
) -> LoadResult:
    """Closed loop against `address`: `concurrency` callers repeat `request` for `seconds` after a warm-up."""
    if concurrency < 1:
        raise ValueError(f"concurrency must be at least 1, got {concurrency}")
    return asyncio.run(_closed_loop(address, serialise(request), concurrency, seconds, warmup_seconds, timeout))


def sweep(
    address: str,
    request,
    concurrencies: Iterable[int] = (1, 2, 4, 8, 16, 32),
    seconds: float = 3.0,
    warmup_seconds: float = 1.0,
    progress: bool = False,
) -> list[LoadResult]:
    """`run_load` at each concurrency, in order (with a tqdm bar when `progress`)."""
    levels = list(concurrencies)
    if progress:
        from tqdm.auto import tqdm

        levels = tqdm(levels, desc="concurrency")
    payload = serialise(request)
    return [run_load(address, payload, c, seconds, warmup_seconds) for c in levels]
