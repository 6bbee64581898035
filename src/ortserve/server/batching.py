"""The dynamic batcher: joins concurrent requests for one model version into one session.run.

A `Batcher` is a runner (see ortserve.server.runtime): `await batcher(feeds, output_names)`. Requests whose
inputs agree on every axis but the first are concatenated along that axis, up to `max_batch_size` rows, run
once in a worker thread, and the outputs are sliced back to their callers in order.

When a request waits, and for how long (all decided at the end of an event-loop turn, so the requests that
arrived in the same turn always go together):

- If the model has no run in flight and the last run held a single request, the request runs at once, with
  whatever is queued. A lone caller therefore never waits for company that is not coming: its latency is that of
  an unbatched server (plus one hop to a worker thread). A request that runs alone on an idle model may run on the
  model's lone session (every core, as in-process ONNX Runtime; see ortserve.server.runtime.LoneSessions).
- While a run is in flight, requests collect in the queue ("batch whatever arrives during the previous run").
- Once a run has joined several requests, the callers are concurrent, and most of them come straight back for
  more: so when a run ends, the next one waits until as many rows are queued as were queued plus answered at
  that moment (every caller it knows of is back), or until the batch is full -- but never past
  `max_queue_delay_us` after that run ended: callers that have not come back by then are not coming, so a
  request arriving after a burst is over runs at once.
- `max_queue_delay_us` bounds every such wait: a request queued that long starts a run as soon as a worker is
  free, even beside a run in flight (up to `max_runs` runs of the model at once). When callers leave, this is
  what turns the waiting off again: the first run that goes alone restores the first rule.

On a busy server the batch size thus grows with the number of callers by itself, which is what amortises the
per-run costs (a hop to a worker thread, ONNX Runtime's per-call overhead) that cap an unbatched server.

A request larger than max_batch_size runs on its own. Requests asking for different subsets of the outputs
share a run that computes the union. If a batched run fails, every member is run again on its own, so only the
request at fault sees the error. Batching applies only to models whose inputs and outputs all have a variable
first axis (`batchable`); a run whose outputs do not have one row per input row is redone member by member.

For metrics (see ortserve.server.runtime): each member's RunTiming gets its wait in the queue, its run's duration
and rows; `observe_run`, when set, hears of every session.run the batcher makes, joined or alone.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from concurrent.futures import Executor, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Mapping

import numpy as np

from ortserve.server.runtime import (Feeds, LoneSessions, RunObserver, RunTiming, SessionRunner, TensorSpec,
                                    deadline_exceeded, run_session)  # fmt: skip

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class BatchingDefaults:
    """The server's batching settings, for models whose config does not give its own."""

    max_batch_size: int = 64  # 0: no batching unless a model's config asks for it
    max_queue_delay_us: int = 4000
    max_runs: int = 2  # runs of one model in flight at once (the server's worker threads)


def runner_for(model, defaults: BatchingDefaults, executor: Executor | None) -> "Batcher | None":
    """A Batcher for `model` (a runtime.Model) if its config or the defaults turn batching on, else None.

    RepositoryError if the config asks for batching on a model that cannot batch.
    """
    from ortserve.server.errors import RepositoryError

    config = model.config
    size = config.max_batch_size if config is not None else None
    delay = config.max_queue_delay_us if config is not None else None
    can = batchable(model.inputs, model.outputs)
    if size is not None and size > 0 and not can:
        raise RepositoryError(
            f"{model.label} has max_batch_size {size} in its config, but batching needs a variable first axis on "
            f"every input and output; set max_batch_size to 0"
        )
    size = defaults.max_batch_size if size is None else size
    if size == 0 or not can:
        return None
    delay = defaults.max_queue_delay_us if delay is None else delay
    return Batcher(model.session, executor, model.label, size, delay, defaults.max_runs, model.lone_session)


def batchable(inputs: Mapping[str, TensorSpec], outputs: Mapping[str, TensorSpec]) -> bool:
    """Whether every input and output has a known rank of at least 1 with a variable first axis."""
    specs = [*inputs.values(), *outputs.values()]
    return bool(inputs) and all(s.shape is not None and len(s.shape) >= 1 and not isinstance(s.shape[0], int)
                                for s in specs)  # fmt: skip


@dataclass(eq=False)
class _Request:
    feeds: Feeds
    output_names: list[str] | None  # None: all outputs
    rows: int
    key: tuple  # requests with equal keys can be concatenated
    future: asyncio.Future
    queued_at: float  # loop.time(), which is time.monotonic()
    timing: RunTiming | None
    deadline: float | None  # time.monotonic() by which it must start running; None: no limit


@dataclass(eq=False)
class _Batch:
    members: list[_Request] = field(default_factory=list)
    rows: int = 0
    lone: bool = False  # one request, started while no other run of the model was in flight


class Batcher:
    """Dynamic batching runner for one model version (see the module docstring)."""

    def __init__(self, session, executor: Executor | None, label: str, max_batch_size: int,
                 max_queue_delay_us: int, max_runs: int = 2, lone_session=None) -> None:  # fmt: skip
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be at least 1, got {max_batch_size}")
        self.session = session
        self.lone = LoneSessions(session, lone_session)  # the session of a request that runs alone on an idle model
        self.label = label
        self.max_batch_size = max_batch_size
        self.max_queue_delay = max_queue_delay_us / 1e6
        self.max_runs = max(1, max_runs)
        self._executor = executor or ThreadPoolExecutor(self.max_runs, thread_name_prefix="batch")
        self.all_outputs = [o.name for o in session.get_outputs()]
        self._run_alone = SessionRunner(session, self._executor, label)  # for requests that cannot join a batch
        self.in_flight = 0
        self.row_wise: bool | None = None  # False once a run showed outputs not split by row: batching stops
        self.runs = 0  # batches run so far (for tests and logs)
        self._queue: deque[_Request] = deque()
        self._queued_rows = 0
        self._timer: asyncio.TimerHandle | None = None
        self._decide_soon = False
        self._joining = False  # the last run joined several requests: callers are concurrent
        self._expected_rows = 0  # rows queued plus rows answered when the last run ended
        self._finished_at = 0.0  # loop.time() when the last run ended

    @property
    def observe_run(self) -> RunObserver | None:
        return self._run_alone.observe_run

    @observe_run.setter
    def observe_run(self, observer: RunObserver | None) -> None:
        self._run_alone.observe_run = observer  # one observer for joined runs and lone ones

    async def __call__(self, feeds: Feeds, output_names: list[str] | None, timing: RunTiming | None = None,
                       deadline: float | None = None) -> Feeds:  # fmt: skip
        loop = asyncio.get_running_loop()
        request = self._request(feeds, output_names, loop, timing, deadline)
        if request is None:  # cannot join a batch: run it as it is
            return await self._run_alone(feeds, output_names, timing, deadline)
        self._queue.append(request)
        self._queued_rows += request.rows
        if not self._decide_soon:
            # Decide at the end of this loop turn, so the requests that arrived in the same turn go together.
            self._decide_soon = True
            loop.call_soon(self._decide, loop)
        return await request.future

    def _request(self, feeds: Feeds, output_names: list[str] | None, loop, timing: RunTiming | None,
                 deadline: float | None) -> _Request | None:  # fmt: skip
        rows = None
        trailing = []
        for name, array in feeds.items():
            if array.ndim == 0 or (rows is not None and array.shape[0] != rows):
                return None
            rows = array.shape[0]
            trailing.append((name, array.shape[1:]))
        if rows is None or rows == 0 or rows > self.max_batch_size or self.row_wise is False:
            return None
        if timing is not None:
            timing.rows = rows
        return _Request(feeds, output_names, rows, tuple(trailing), loop.create_future(), loop.time(), timing, deadline)

    # ----------------------------------------------------------------------------------------------
    # Forming batches

    def _decide(self, loop) -> None:
        """Start every run that is due (see the module docstring), then keep a timer for the next deadline."""
        self._decide_soon = False
        now = loop.time()
        while self._queue and self.in_flight < self.max_runs:
            if self.in_flight == 0:
                # Idle model: go at once, unless callers are concurrent; then go once everyone known is back.
                ready = not self._joining or self._queued_rows >= self._expected_rows
            else:
                ready = False  # a run is in flight: wait for it (it brings company), up to the delay
            due = now >= self._deadline()
            if not (ready or due or self._queued_rows >= self.max_batch_size):
                break
            self._dispatch(loop)
        self._arm(loop)

    def _dispatch(self, loop) -> None:
        """Start one run with the oldest queued request and every queued one that fits with it."""
        batch = self._take()
        if batch.members:
            batch.lone = len(batch.members) == 1 and self.in_flight == 0
            self.in_flight += 1
            self.runs += 1
            # Requests that ran together mean concurrent callers: until a run goes alone, wait for company.
            self._joining = len(batch.members) > 1
            self._start(batch, loop)

    def _arm(self, loop) -> None:
        """Keep a timer for the oldest queued request's deadline while a run slot could take it."""
        if not self._queue:
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None
        elif self._timer is None and self.in_flight < self.max_runs:
            self._timer = loop.call_at(self._deadline(), self._on_timer, loop)

    def _deadline(self) -> float:
        """When the oldest queued request must start: the delay after it queued, or, on an idle model waiting for
        callers to come back, the delay after the last run ended (whichever is sooner)."""
        due = self._queue[0].queued_at + self.max_queue_delay
        if self.in_flight == 0 and self._joining:
            due = min(due, self._finished_at + self.max_queue_delay)
        return due

    def _take(self) -> _Batch:
        batch = _Batch()
        queue = self._queue
        while queue and queue[0].future.done():  # cancelled while queued (the caller went away)
            self._queued_rows -= queue.popleft().rows
        if not queue:
            return batch
        key = queue[0].key
        kept: deque[_Request] = deque()
        now = time.monotonic()
        while queue:
            request = queue.popleft()
            if request.deadline is not None and now > request.deadline and not request.future.done():
                request.future.set_exception(deadline_exceeded(self.label, now - request.queued_at))
            if request.future.done():
                self._queued_rows -= request.rows
            elif request.key == key and batch.rows + request.rows <= self.max_batch_size:
                batch.members.append(request)
                batch.rows += request.rows
                self._queued_rows -= request.rows
            else:
                kept.append(request)
        self._queue = kept
        return batch

    def _on_timer(self, loop) -> None:
        self._timer = None
        self._decide(loop)

    def _finished(self, batch: _Batch, loop) -> None:
        self.in_flight -= 1
        # Closed-loop callers answered now come straight back: the next run waits for them and those queued.
        self._expected_rows = self._queued_rows + batch.rows
        self._finished_at = loop.time()
        self._decide(loop)

    # ----------------------------------------------------------------------------------------------
    # Running: all of it in the worker thread, which hands the loop one callback per run with every answer.
    # (No asyncio Task or wrapped future per run: at one caller, each loop turn saved is latency saved.)

    def _start(self, batch: _Batch, loop) -> None:
        try:
            self._executor.submit(self._work, batch, loop)
        except RuntimeError as error:  # the executor is shut down: the server is stopping
            self._complete(batch, [(None, error)] * len(batch.members), loop)

    def _work(self, batch: _Batch, loop) -> None:
        members = batch.members
        if len(members) == 1:
            answers = [self._attempt(members[0], batch.lone)]
        else:
            answers = self._run_joined(batch)
        try:
            loop.call_soon_threadsafe(self._complete, batch, answers, loop)
        except RuntimeError:  # the loop is closed: nobody is waiting any more
            pass

    def _run_joined(self, batch: _Batch) -> list[tuple[Feeds | None, BaseException | None]]:
        members = batch.members
        names = self._union_outputs(members)
        feeds = {name: np.concatenate([m.feeds[name] for m in members]) for name in members[0].feeds}
        started = time.monotonic()
        try:
            try:
                outputs = run_session(self.session, feeds, names, self.label)
            finally:
                self._ran(members, batch.rows, started)
            if any(np.ndim(v) == 0 or len(v) != batch.rows for v in outputs.values()):
                self.row_wise = False
                log.warning("%s: outputs do not have one row per input row; batching turned off", self.label)
                raise _NotRowWise()
        except Exception as error:
            log.debug("%s: a batch of %d requests failed (%s); running each alone", self.label, len(members), error)
            return [self._attempt(m) for m in members]
        answers = []
        start = 0
        for member in members:
            stop = start + member.rows
            wanted = member.output_names or self.all_outputs
            answers.append(({name: outputs[name][start:stop] for name in wanted}, None))
            start = stop
        return answers

    def _attempt(self, member: _Request, lone: bool = False) -> tuple[Feeds | None, BaseException | None]:
        session = self.lone.pick() if lone else self.session
        started = time.monotonic()
        try:
            return run_session(session, member.feeds, member.output_names or self.all_outputs, self.label), None
        except Exception as error:
            return None, error
        finally:
            seconds = self._ran([member], member.rows, started)
            if lone:
                self.lone.ran(seconds)

    def _ran(self, members: list[_Request], rows: int, started: float) -> float:
        """Note a session.run of `rows` rows for `members`, begun at `started`: their timings, the run observer.
        Returns the run's duration in seconds."""
        seconds = time.monotonic() - started
        for member in members:
            if member.timing is not None:
                timing = member.timing
                timing.queue, timing.run, timing.batch = started - member.queued_at, seconds, rows
        observer = self._run_alone.observe_run
        if observer is not None:
            observer(rows, seconds)
        return seconds

    def _complete(self, batch: _Batch, answers, loop) -> None:
        for member, (result, error) in zip(batch.members, answers):
            if member.future.done():  # the caller went away
                continue
            if error is None:
                member.future.set_result(result)
            else:
                member.future.set_exception(error)
        self._finished(batch, loop)

    def _union_outputs(self, members: list[_Request]) -> list[str]:
        if any(m.output_names is None for m in members):
            return self.all_outputs
        wanted = set().union(*(m.output_names for m in members))
        return [name for name in self.all_outputs if name in wanted]  # the model's order


class _NotRowWise(Exception):
    """A batched run's outputs do not have one row per input row, so they cannot be split back."""
