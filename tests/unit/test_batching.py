"""ortserve.server.batching on its own, over real ONNX Runtime sessions of tiny models (tests/unit/conftest.py):
which models batch, which requests join one run, how answers, failures, cancellations and deadlines come back.

Requests sent by one asyncio.gather queue in the same event-loop turn, so whether they join is decided, not timed.
"""

from __future__ import annotations

import asyncio
import re
import threading
import time

import numpy as np
import pytest

from ortserve.server.batching import Batcher, BatchingDefaults, batchable, runner_for
from ortserve.server.errors import DeadlineExceeded, InvalidInput, RepositoryError
from ortserve.server.repository import ModelConfig
from ortserve.server.runtime import RunTiming, TensorSpec

from .conftest import LOOKUP_TABLE
from .sessions import CountingSession

F32 = np.dtype(np.float32)


def rows(n: int, k: int = 3, start: int = 0) -> np.ndarray:
    return (start + np.arange(n * k, dtype=np.float32)).reshape(n, k)


@pytest.fixture
def batcher_on(sessions, executor):
    """batcher_on(model, **settings) -> (Batcher, CountingSession, observed rows of each run)."""

    def make(name, gate=None, max_batch_size=64, delay_us=2000, max_runs=1):
        session = CountingSession(sessions[name], gate)
        batcher = Batcher(session, executor, f"model {name!r}", max_batch_size, delay_us, max_runs)
        heard: list[int] = []
        batcher.observe_run = lambda rows_, seconds: heard.append(rows_)
        return batcher, session, heard

    return make


def send(batcher, *requests, timings=None):
    """Run every (feeds, output_names[, deadline]) through the batcher in one loop turn; exceptions are returned."""

    async def main():
        calls = [batcher(r[0], r[1], timings[i] if timings else None, *r[2:]) for i, r in enumerate(requests)]
        return await asyncio.gather(*calls, return_exceptions=True)

    return asyncio.run(main())


def check_pair(answer, x, names=("double", "total")):
    assert sorted(answer) == sorted(set(names))
    if "double" in names:
        assert answer["double"].tolist() == (2 * x).tolist()
    if "total" in names:
        assert answer["total"].tolist() == x.sum(axis=1).tolist()


# --------------------------------------------------------------------------------------------------
# Which models batch


def spec(*shape) -> TensorSpec:
    """A TensorSpec of this shape; spec(...) is one whose shape the model does not give."""
    return TensorSpec("t", F32, shape if shape != (...,) else None)


@pytest.mark.parametrize(
    "inputs, outputs, want",
    [
        ([spec("batch", 3)], [spec("batch")], True),
        ([spec(None, 3), spec(None)], [spec(None, 2)], True),
        ([], [spec("batch")], False),  # no inputs: nothing to join
        ([spec(...)], [spec("batch")], False),  # rank unknown
        ([spec()], [spec("batch")], False),  # a scalar has no first axis
        ([spec(2, 3)], [spec("batch")], False),  # fixed first axis
        ([spec("batch")], [spec(7, 3)], False),  # an output with a fixed first axis
        ([spec("batch")], [spec()], False),  # a scalar output
    ],
)  # fmt: skip
def test_batchable_needs_a_variable_first_axis_everywhere(inputs, outputs, want):
    named = lambda specs: {f"t{i}": s for i, s in enumerate(specs)}  # noqa: E731
    assert batchable(named(inputs), named(outputs)) is want


@pytest.mark.parametrize(
    "name, config, defaults, want",
    [
        ("pair", None, BatchingDefaults(), (64, 0.004, 2)),
        ("pair", None, BatchingDefaults(max_batch_size=0), None),
        ("pair", ModelConfig(max_batch_size=0), BatchingDefaults(), None),
        ("pair", ModelConfig(max_batch_size=8, max_queue_delay_us=100), BatchingDefaults(max_runs=3), (8, 1e-4, 3)),
        ("pair", ModelConfig(max_batch_size=8), BatchingDefaults(max_batch_size=0, max_queue_delay_us=7), (8, 7e-6, 2)),
        ("pair", ModelConfig(max_queue_delay_us=5), BatchingDefaults(max_batch_size=16), (16, 5e-6, 2)),
        ("echo_fp32", ModelConfig(), BatchingDefaults(max_batch_size=4, max_runs=0), (4, 0.004, 1)),
        ("broken", None, BatchingDefaults(), None),  # fixed output axis: quietly unbatched
        ("broken", ModelConfig(max_batch_size=0), BatchingDefaults(), None),
        ("grand_total", ModelConfig(), BatchingDefaults(), None),  # scalar output
    ],
)  # fmt: skip
def test_runner_for_takes_the_config_then_the_server_defaults(make_model, executor, name, config, defaults, want):
    batcher = runner_for(make_model(name, config=config), defaults, executor)
    if want is None:
        assert batcher is None
    else:
        assert isinstance(batcher, Batcher)
        assert (batcher.max_batch_size, batcher.max_queue_delay, batcher.max_runs) == pytest.approx(want)


def test_a_config_cannot_batch_a_model_without_a_variable_first_axis(make_model, executor):
    model = make_model("broken", config=ModelConfig(max_batch_size=4))
    message = ("model 'broken' version 1 has max_batch_size 4 in its config, but batching needs a variable first "
               "axis on every input and output; set max_batch_size to 0")  # fmt: skip
    with pytest.raises(RepositoryError, match=re.escape(message)):
        runner_for(model, BatchingDefaults(), executor)


def test_a_batcher_needs_room_for_a_row(sessions):
    with pytest.raises(ValueError, match=re.escape("max_batch_size must be at least 1, got 0")):
        Batcher(sessions["pair"], None, "m", 0, 100)


# --------------------------------------------------------------------------------------------------
# Joining and splitting


def test_concurrent_requests_run_once_and_each_gets_its_own_rows(batcher_on):
    batcher, session, heard = batcher_on("pair")
    xs = [rows(2), rows(1, start=100), rows(3, start=-50)]
    timings = [RunTiming() for _ in xs]
    answers = send(batcher, *[({"x": x}, None) for x in xs], timings=timings)
    for answer, x in zip(answers, xs):
        check_pair(answer, x)
    assert (batcher.runs, session.rows, heard) == (1, [6], [6])
    assert [(t.rows, t.batch) for t in timings] == [(2, 6), (1, 6), (3, 6)]
    assert timings[0].run > 0 and timings[0].run == timings[1].run == timings[2].run  # one run, one duration
    assert all(t.queue >= 0 for t in timings)


def test_requests_of_different_trailing_shapes_do_not_join(batcher_on):
    batcher, session, heard = batcher_on("pair")
    xs = [rows(2, 3), rows(1, 5), rows(1, 3, start=9)]
    answers = send(batcher, *[({"x": x}, None) for x in xs])
    for answer, x in zip(answers, xs):
        check_pair(answer, x)
    assert (batcher.runs, session.rows, heard) == (2, [3, 1], [3, 1])


def test_a_request_larger_than_max_batch_size_runs_alone_and_the_rest_still_join(batcher_on):
    batcher, session, heard = batcher_on("pair", max_batch_size=4)
    xs = [rows(2), rows(6, start=10), rows(2, start=40), rows(1, start=70)]
    timings = [RunTiming() for _ in xs]
    answers = send(batcher, *[({"x": x}, None) for x in xs], timings=timings)
    for answer, x in zip(answers, xs):
        check_pair(answer, x)
    # the 6 rows on their own; 2 + 2 fill a batch of 4; the last row waits for the next run
    assert sorted(session.rows) == [1, 4, 6] and sorted(heard) == [1, 4, 6]
    assert batcher.runs == 2
    assert [(t.rows, t.batch) for t in timings] == [(2, 4), (6, 6), (2, 4), (1, 1)]


@pytest.mark.parametrize(
    "asked, run",
    [
        ([["double"], ["total"]], ["double", "total"]),
        ([["total"], ["total", "total"]], ["total"]),
        ([["total"], None], ["double", "total"]),
        ([["total", "double"], ["double"]], ["double", "total"]),  # the model's order
    ],
)
def test_requests_for_different_outputs_share_a_run_of_their_union(batcher_on, asked, run):
    batcher, session, _ = batcher_on("pair")
    xs = [rows(1), rows(2, start=5)]
    answers = send(batcher, *[({"x": x}, names) for x, names in zip(xs, asked)])
    assert session.names == [run]
    for answer, x, names in zip(answers, xs, asked):
        check_pair(answer, x, names or ("double", "total"))


# --------------------------------------------------------------------------------------------------
# Failures, cancellations, deadlines


def test_a_failing_member_is_run_again_alone_so_only_it_fails(batcher_on):
    batcher, session, heard = batcher_on("lookup")
    indices = [np.array([0, 1]), np.array([5]), np.array([2])]
    answers = send(batcher, *[({"idx": i}, ["row"]) for i in indices])
    assert answers[0]["row"].tolist() == LOOKUP_TABLE[[0, 1]].tolist()
    assert answers[2]["row"].tolist() == LOOKUP_TABLE[[2]].tolist()
    assert isinstance(answers[1], InvalidInput)
    assert "model 'lookup': [ONNXRuntimeError] : 2 : INVALID_ARGUMENT" in str(answers[1])
    assert "idx=5 must be within the inclusive range [-3,2]" in str(answers[1])
    assert (batcher.runs, session.rows, heard) == (1, [4, 2, 1, 1], [4, 2, 1, 1])


def test_outputs_that_are_not_one_row_per_row_turn_batching_off_and_every_answer_stays_right(batcher_on):
    batcher, session, heard = batcher_on("grand_total")
    xs = [rows(2), rows(1, start=10)]
    answers = send(batcher, *[({"x": x}, None) for x in xs])
    assert [a["total"].tolist() for a in answers] == [float(x.sum()) for x in xs]
    assert batcher.row_wise is False and session.rows == [3, 2, 1]
    answers = send(batcher, ({"x": rows(1)}, None), ({"x": rows(1)}, None))  # no longer joined
    assert batcher.runs == 1 and session.rows[3:] == [1, 1] and heard == session.rows


def test_a_queued_request_cancelled_by_its_caller_is_skipped(batcher_on):
    gate = threading.Event()
    batcher, session, _ = batcher_on("pair", gate=gate, delay_us=60_000_000)

    async def main():
        first = asyncio.create_task(batcher({"x": rows(1)}, None))
        assert await asyncio.to_thread(session.started.acquire, timeout=30)  # the first run is under way
        cancelled = asyncio.create_task(batcher({"x": rows(2)}, None))
        kept = asyncio.create_task(batcher({"x": rows(3, start=7)}, None))
        await asyncio.sleep(0)  # both queued behind the held run
        cancelled.cancel()
        await asyncio.sleep(0)
        gate.set()
        return await asyncio.gather(first, cancelled, kept, return_exceptions=True)

    first, cancelled, kept = asyncio.run(main())
    check_pair(first, rows(1))
    assert isinstance(cancelled, asyncio.CancelledError)
    check_pair(kept, rows(3, start=7))
    assert (batcher.runs, session.rows) == (2, [1, 3])


def test_a_queued_request_past_its_deadline_is_not_run_and_the_others_are(batcher_on):
    batcher, session, heard = batcher_on("pair")
    late, on_time = rows(2), rows(1, start=3)
    answers = send(batcher, ({"x": late}, None, time.monotonic() - 1), ({"x": on_time}, None, time.monotonic() + 60))
    assert isinstance(answers[0], DeadlineExceeded)
    assert "model 'pair': the request's timeout or deadline passed after " in str(answers[0])
    assert "in the queue, before it could run; it was not run" in str(answers[0])
    check_pair(answers[1], on_time)
    assert (batcher.runs, session.rows, heard) == (1, [1], [1])
