"""The dynamic batcher: unit tests with a scripted session, then a batching server under heavy mixed load.

The unit tests drive ortserve.server.batching.Batcher with a fake session that records every run, so they can say
which requests ran together. The server test compares every answer of a batching server with in-process ONNX
Runtime, element by element, and checks that requests were in fact joined.
"""

from __future__ import annotations

import asyncio
import os
import threading
from types import SimpleNamespace

import numpy as np
import pytest

from ortserve.client import AsyncInferenceClient
from ortserve.server import cli, runtime
from ortserve.server.app import BackgroundServer, ServerOptions
from ortserve.server.batching import Batcher, BatchingDefaults, batchable, runner_for
from ortserve.server.errors import ModelRunError, RepositoryError
from ortserve.server.repository import ModelConfig, Repository, discover
from ortserve.server.runtime import LONE_SESSION_MIN_RUN, LoneSessions, SessionSettings

# --------------------------------------------------------------------------------------------------
# A scripted session


class FakeSession:
    """x (n, k) -> double = 2x, total = sum over the last axis. Fails any run holding a negative value.

    `gate`, when given, holds every run until the test sets it; `started` counts runs begun (for those tests).
    `fixed_rows` makes `total` one row whatever the batch (a model whose outputs are not row-wise).
    """

    def __init__(self, gate: threading.Event | None = None, fixed_rows: bool = False) -> None:
        self.runs: list[tuple[np.ndarray, list[str]]] = []
        self.gate = gate
        self.fixed_rows = fixed_rows
        self.started = threading.Semaphore(0)
        self.lock = threading.Lock()

    def get_outputs(self):
        return [SimpleNamespace(name="double"), SimpleNamespace(name="total")]

    def run(self, names, feeds):
        x = feeds["x"]
        with self.lock:
            self.runs.append((x.copy(), list(names)))
        self.started.release()
        if self.gate is not None:
            self.gate.wait(30)
        if (x < 0).any():
            raise RuntimeError("negative input")
        total = x.sum(axis=-1)
        values = {"double": 2 * x, "total": total[:1] if self.fixed_rows else total}
        return [values[n] for n in names]


def make_batcher(session=None, max_batch_size=64, delay_us=50_000, max_runs=1, lone_session=None) -> Batcher:
    return Batcher(session or FakeSession(), None, "fake", max_batch_size, delay_us, max_runs, lone_session)


def rows(n: int, k: int = 3, start: float = 0.0) -> np.ndarray:
    return (start + np.arange(n * k, dtype=np.float32)).reshape(n, k)


async def call_all(batcher: Batcher, requests) -> list:
    """Send every (x, output_names) in the same loop turn, so they queue together; exceptions are returned."""
    return await asyncio.gather(*(batcher({"x": x}, names) for x, names in requests), return_exceptions=True)


def check_answer(answer, x, names=None):
    names = names or ["double", "total"]
    assert sorted(answer) == sorted(names)
    if "double" in names:
        np.testing.assert_array_equal(answer["double"], 2 * x)
    if "total" in names:
        np.testing.assert_array_equal(answer["total"], x.sum(axis=-1))


# --------------------------------------------------------------------------------------------------
# Grouping, order, size


def test_requests_with_the_same_trailing_shape_run_together_and_split_back_in_order():
    session = FakeSession()
    batcher = make_batcher(session)
    inputs = [rows(1, 3, 0), rows(2, 3, 100), rows(1, 4, 200), rows(3, 3, 300), rows(2, 4, 400)]
    answers = asyncio.run(call_all(batcher, [(x, None) for x in inputs]))
    for x, answer in zip(inputs, answers):
        check_answer(answer, x)
    ran = [x for x, _ in session.runs]
    assert len(ran) == 2  # one run per trailing shape
    np.testing.assert_array_equal(ran[0], np.concatenate([inputs[0], inputs[1], inputs[3]]))
    np.testing.assert_array_equal(ran[1], np.concatenate([inputs[2], inputs[4]]))


def test_batches_never_exceed_max_batch_size_and_a_bigger_request_runs_alone():
    session = FakeSession()
    batcher = make_batcher(session, max_batch_size=4)
    inputs = [rows(2, start=0), rows(2, start=10), rows(6, start=20), rows(3, start=40), rows(1, start=50)]
    answers = asyncio.run(call_all(batcher, [(x, None) for x in inputs]))
    for x, answer in zip(inputs, answers):
        check_answer(answer, x)
    sizes = sorted(len(x) for x, _ in session.runs)
    assert max(size for size in sizes if size != 6) <= 4
    assert 6 in sizes  # the big one, on its own
    assert sum(sizes) == sum(len(x) for x in inputs)


def test_requests_for_different_outputs_share_a_run_and_get_what_they_asked():
    session = FakeSession()
    batcher = make_batcher(session)
    requests = [(rows(1, start=0), ["double"]), (rows(2, start=10), ["total"]), (rows(1, start=20), None)]
    answers = asyncio.run(call_all(batcher, requests))
    for (x, names), answer in zip(requests, answers):
        check_answer(answer, x, names)
    assert len(session.runs) == 1 and session.runs[0][1] == ["double", "total"]


def test_requests_for_one_output_run_only_that_output():
    session = FakeSession()
    answers = asyncio.run(call_all(make_batcher(session), [(rows(1), ["total"]), (rows(2, start=5), ["total"])]))
    check_answer(answers[1], rows(2, start=5), ["total"])
    assert [names for _, names in session.runs] == [["total"]]


# --------------------------------------------------------------------------------------------------
# Failures


def test_a_failed_batch_is_retried_member_by_member_so_only_the_bad_request_fails():
    session = FakeSession()
    batcher = make_batcher(session)
    good = [rows(1, start=0), rows(2, start=10), rows(1, start=20)]
    bad = -rows(1, start=1)
    answers = asyncio.run(call_all(batcher, [(good[0], None), (good[1], None), (bad, None), (good[2], None)]))
    for x, answer in zip(good, [answers[0], answers[1], answers[3]]):
        check_answer(answer, x)
    assert isinstance(answers[2], ModelRunError) and "negative input" in str(answers[2])
    assert [len(x) for x, _ in session.runs] == [5, 1, 2, 1, 1]  # the batch, then each member alone


def test_outputs_that_are_not_row_wise_turn_batching_off_and_every_answer_stays_right():
    session = FakeSession(fixed_rows=True)  # `total` has one row whatever the batch
    batcher = make_batcher(session)
    inputs = [rows(1, start=0), rows(1, start=10)]
    answers = asyncio.run(call_all(batcher, [(x, None) for x in inputs]))
    for x, answer in zip(inputs, answers):
        check_answer(answer, x)
    assert batcher.row_wise is False
    asyncio.run(call_all(batcher, [(x, None) for x in inputs]))
    assert [len(x) for x, _ in session.runs] == [2, 1, 1, 1, 1]  # joined once, then never again


# --------------------------------------------------------------------------------------------------
# The lone session: a request that finds its model idle, once such runs are slow enough to gain from more threads


def test_lone_sessions_follow_the_running_average_of_lone_runs():
    shared, lone = object(), object()
    choice = LoneSessions(shared, lone)
    assert choice.pick() is shared  # nothing known yet: the first lone runs show what a run costs
    for _ in range(10):
        choice.ran(10 * LONE_SESSION_MIN_RUN)
    assert choice.pick() is lone
    for _ in range(30):
        choice.ran(LONE_SESSION_MIN_RUN / 100)  # runs got short (a tiny model, or the lone session is fast)
    assert choice.pick() is shared
    without = LoneSessions(shared)
    for _ in range(10):
        without.ran(1.0)
    assert without.pick() is shared  # no lone session: always the shared one


def test_a_lone_request_runs_on_the_lone_session_once_lone_runs_are_slow_and_joined_runs_never_do():
    shared, lone = FakeSession(), FakeSession()
    batcher = make_batcher(shared, lone_session=lone)

    async def main():
        first = await batcher({"x": rows(1)}, None)  # average 0: the shared session, which times it
        batcher.lone.average_run = 10 * LONE_SESSION_MIN_RUN  # as if lone runs took 10 ms
        second = await batcher({"x": rows(1, 3, 10)}, None)
        joined = await call_all(batcher, [(rows(1, 3, 100 + 10 * i), None) for i in range(5)])
        return first, second, joined

    first, second, joined = asyncio.run(main())
    check_answer(first, rows(1))
    check_answer(second, rows(1, 3, 10))
    for i, answer in enumerate(joined):
        check_answer(answer, rows(1, 3, 100 + 10 * i))
    assert [len(x) for x, _ in shared.runs] == [1, 5]  # the first lone request, then the five joined
    assert [len(x) for x, _ in lone.runs] == [1]  # the second lone request


def test_the_thread_plan_adds_a_spinning_lone_session_only_where_it_has_more_threads():
    cores = os.cpu_count() or 2
    plan = ServerOptions(workers=cores).thread_plan()
    assert plan.session == SessionSettings(intra_op_threads=1, inter_op_threads=1, spinning=False)
    if cores > 1:
        assert plan.lone == SessionSettings(intra_op_threads=cores, inter_op_threads=1, spinning=True)
    assert ServerOptions(workers=1).thread_plan().lone is None  # its one session already has every core
    assert ServerOptions(lone_request_threads=0).thread_plan().lone is None
    assert ServerOptions(workers=cores, lone_request_threads=cores + 2).thread_plan().lone.intra_op_threads == cores + 2


@pytest.mark.skipif((os.cpu_count() or 1) < 2, reason="a lone session needs more threads than the shared one")
def test_a_server_answers_lone_requests_on_the_lone_session_like_onnx_runtime(repository, ort_session, monkeypatch):
    monkeypatch.setattr(runtime, "LONE_SESSION_MIN_RUN", 0.0)  # every lone request goes to the lone session
    reference = ort_session(repository / "digits_cnn" / "1" / "model.onnx")
    rng = np.random.default_rng(5)
    singles = [rng.random((1, 1, 8, 8), dtype=np.float32) for _ in range(12)]
    crowd = [rng.random((1, 1, 8, 8), dtype=np.float32) for _ in range(48)]
    with BackgroundServer(repository, ServerOptions(port=0, max_queue_delay_us=20_000)) as server:
        model = server.server.repository.get("digits_cnn")
        assert model.lone_session is not None
        lone_runs = []
        run_lone = model.lone_session.run
        model.lone_session.run = lambda names, feeds: lone_runs.append(len(feeds["input"])) or run_lone(names, feeds)

        async def main():
            async with AsyncInferenceClient(server.address, timeout=60) as client:
                alone = [await client.infer("digits_cnn", {"input": x}) for x in singles]  # one at a time
                together = await asyncio.gather(*(client.infer("digits_cnn", {"input": x}) for x in crowd))
                return alone, together

        alone, together = asyncio.run(main())
        runs = model.runner.runs
    for x, answer in zip(singles + crowd, alone + together):
        np.testing.assert_allclose(answer["logits"], reference.run(["logits"], {"input": x})[0], rtol=1e-6, atol=1e-6)
    assert lone_runs[: len(singles)] == [1] * len(singles)  # each lone caller ran on the lone session
    assert runs < len(singles) + len(crowd)  # the crowd was joined into batches, which the lone session never runs
    assert sum(lone_runs) < len(singles) + len(crowd)


def test_thread_and_batching_flags_take_counts_and_refuse_negative_ones(capsys):
    options = cli.options_from(cli.build_parser().parse_args(["--lone_request_threads", "0", "--workers", "3"]))
    assert (options.lone_request_threads, options.workers) == (0, 3)
    for flag in ("--workers", "--num_threads", "--lone_request_threads", "--max_batch_size", "--max_queue_delay_us"):
        with pytest.raises(SystemExit):
            cli.build_parser().parse_args([flag, "-1"])
        assert f"argument {flag}: expected 0 or more, got -1" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.build_parser().parse_args(["--workers", "two"])
    assert "expected a whole number (0 or more), got 'two'" in capsys.readouterr().err


# --------------------------------------------------------------------------------------------------
# Waiting


def test_a_lone_request_on_an_idle_model_does_not_wait_for_the_queue_delay():
    batcher = make_batcher(delay_us=60_000_000)  # a minute: waiting for it would time the test out

    async def main():
        return await asyncio.wait_for(batcher({"x": rows(1)}, None), 10)

    check_answer(asyncio.run(main()), rows(1))


@pytest.mark.parametrize("max_runs, second_runs_during_first", [(2, True), (1, False)])
def test_a_request_queued_longer_than_the_delay_starts_its_own_run_if_a_slot_is_free(max_runs,
                                                                                        second_runs_during_first):
    gate = threading.Event()
    session = FakeSession(gate=gate)
    batcher = make_batcher(session, delay_us=20_000, max_runs=max_runs)

    async def main():
        loop = asyncio.get_running_loop()
        first = asyncio.ensure_future(batcher({"x": rows(1, start=0)}, None))
        assert await loop.run_in_executor(None, session.started.acquire, True, 10)  # the first run has begun
        second = asyncio.ensure_future(batcher({"x": rows(2, start=10)}, None))
        started = await loop.run_in_executor(None, session.started.acquire, True, 0.5)
        gate.set()
        return started, await first, await second

    started, first, second = asyncio.run(main())
    assert started is second_runs_during_first
    check_answer(first, rows(1, start=0))
    check_answer(second, rows(2, start=10))


def test_requests_arriving_during_a_run_go_together_in_the_next():
    gate = threading.Event()
    session = FakeSession(gate=gate)
    batcher = make_batcher(session, delay_us=60_000_000, max_runs=2)
    later = [rows(1, start=10 * i) for i in range(1, 6)]

    async def main():
        loop = asyncio.get_running_loop()
        first = asyncio.ensure_future(batcher({"x": rows(1)}, None))
        assert await loop.run_in_executor(None, session.started.acquire, True, 10)
        rest = [asyncio.ensure_future(batcher({"x": x}, None)) for x in later]
        await asyncio.sleep(0.05)  # let them all queue behind the run in flight
        gate.set()
        return await first, await asyncio.gather(*rest)

    _, answers = asyncio.run(main())
    for x, answer in zip(later, answers):
        check_answer(answer, x)
    assert [len(x) for x, _ in session.runs] == [1, 5]


def test_after_a_joined_run_the_next_waits_for_its_callers_to_come_back():
    session = FakeSession()
    batcher = make_batcher(session, delay_us=60_000_000)  # a minute: only the callers coming back can end the wait

    async def main():
        loop = asyncio.get_running_loop()
        await call_all(batcher, [(rows(1, start=0), None), (rows(1, start=10), None)])  # one run of 2 rows
        assert session.started.acquire(timeout=10)  # the joined run's
        first = asyncio.ensure_future(batcher({"x": rows(1, start=20)}, None))
        ran_alone = await loop.run_in_executor(None, session.started.acquire, True, 0.3)
        second = asyncio.ensure_future(batcher({"x": rows(1, start=30)}, None))
        return ran_alone, await first, await second

    ran_alone, first, second = asyncio.run(main())
    assert not ran_alone
    check_answer(first, rows(1, start=20))
    check_answer(second, rows(1, start=30))
    assert [len(x) for x, _ in session.runs] == [2, 2]


def test_a_request_after_a_burst_is_over_runs_at_once_instead_of_waiting_for_callers_that_left():
    session = FakeSession()
    batcher = make_batcher(session, delay_us=1_500_000)  # 1.5 s: a wait for the departed callers would show

    async def main():
        loop = asyncio.get_running_loop()
        await call_all(batcher, [(rows(1, start=10 * i), None) for i in range(4)])  # a burst: one joined run
        await asyncio.sleep(1.6)  # the burst's callers do not come back
        started = loop.time()
        answer = await batcher({"x": rows(1, start=100)}, None)
        return answer, loop.time() - started

    answer, waited = asyncio.run(main())
    check_answer(answer, rows(1, start=100))
    assert [len(x) for x, _ in session.runs] == [4, 1]
    assert waited < 0.5, f"the lone request waited {waited:.2f} s for callers that had left"


def test_the_queue_delay_bounds_the_wait_for_callers_that_do_not_come_back():
    session = FakeSession()
    batcher = make_batcher(session, delay_us=50_000)

    async def main():
        await call_all(batcher, [(rows(1, start=0), None), (rows(1, start=10), None)])
        return await asyncio.wait_for(batcher({"x": rows(1, start=20)}, None), 10)  # one of two came back

    check_answer(asyncio.run(main()), rows(1, start=20))
    assert [len(x) for x, _ in session.runs] == [2, 1]


def test_a_cancelled_caller_is_left_out_of_the_batch():
    gate = threading.Event()
    session = FakeSession(gate=gate)
    batcher = make_batcher(session, max_runs=1)

    async def main():
        loop = asyncio.get_running_loop()
        first = asyncio.ensure_future(batcher({"x": rows(1)}, None))
        assert await loop.run_in_executor(None, session.started.acquire, True, 10)
        gone = asyncio.ensure_future(batcher({"x": rows(1, start=50)}, None))
        kept = asyncio.ensure_future(batcher({"x": rows(2, start=90)}, None))
        await asyncio.sleep(0)
        gone.cancel()
        gate.set()
        return await first, await kept

    _, kept = asyncio.run(main())
    check_answer(kept, rows(2, start=90))
    assert [len(x) for x, _ in session.runs] == [1, 2]


# --------------------------------------------------------------------------------------------------
# Which models batch


def test_models_batch_by_default_only_when_every_input_and_output_has_a_variable_first_axis(repository):
    repo = Repository.load(discover(repository), batching=BatchingDefaults(max_batch_size=16))
    runners = {m.name: m.runner for m in repo}
    for name in ("digits_cnn", "digits_forest", "digits_xgb", "shout", "versioned", "echo_fp32"):
        assert isinstance(runners[name], Batcher), name
    assert not isinstance(runners["broken"], Batcher)  # output (7, 3): no batch axis
    assert runners["add_sub"].max_batch_size == 8  # its config.json wins
    assert not batchable(repo.get("broken").inputs, repo.get("broken").outputs)


def test_batching_is_off_with_max_batch_size_0_and_a_config_cannot_force_it_on_a_fixed_axis(repository):
    repo = Repository.load(discover(repository), batching=BatchingDefaults(max_batch_size=0))
    assert [m.name for m in repo if isinstance(m.runner, Batcher)] == ["add_sub"]  # the one whose config asks
    broken = repo.get("broken")
    broken.config = ModelConfig(max_batch_size=4)
    with pytest.raises(RepositoryError, match="max_batch_size"):
        runner_for(broken, BatchingDefaults(), None)


def test_serve_flags_set_the_batching_defaults():
    options = cli.options_from(cli.build_parser().parse_args(["--max_batch_size", "0", "--max_queue_delay_us", "7"]))
    assert (options.max_batch_size, options.max_queue_delay_us) == (0, 7)
    plan = ServerOptions(workers=2).thread_plan()
    assert plan.workers == 2 and plan.session.intra_op_threads * plan.workers <= max(2, os.cpu_count())


# --------------------------------------------------------------------------------------------------
# A batching server under heavy concurrency

N_REQUESTS = 400


def test_a_batching_server_answers_like_unbatched_onnx_runtime_under_heavy_mixed_load(repository, ort_session):
    rng = np.random.default_rng(11)
    models = {name: ort_session(repository / name / "1" / "model.onnx")
              for name in ("digits_cnn", "digits_forest", "digits_xgb")}  # fmt: skip
    jobs = []
    for i in range(N_REQUESTS):
        batch = int(rng.choice([1, 1, 1, 2, 3, 5, 20]))  # mostly single rows, some above max_batch_size
        kind = i % 5
        if kind in (0, 1, 2):
            name = ("digits_cnn", "digits_forest", "digits_xgb")[kind]
            shape = (batch, 1, 8, 8) if name == "digits_cnn" else (batch, 64)
            x = rng.random(shape, dtype=np.float32)
            outputs = None if name == "digits_cnn" or i % 2 else ["probabilities"]
            names = [o.name for o in models[name].get_outputs()] if outputs is None else outputs
            expected = dict(zip(names, models[name].run(names, {"input": x})))
            jobs.append((name, {"input": x}, outputs, expected))
        elif kind == 3:
            a, b = rng.random((batch, 4), dtype=np.float32), rng.random((batch, 4), dtype=np.float32)
            outputs = ["difference"] if i % 2 else None
            expected = {"difference": a - b} if outputs else {"sum": a + b, "difference": a - b}
            jobs.append(("add_sub", {"a": a, "b": b}, outputs, expected))
        else:
            words = np.array([f"w{i}-{j}".encode() for j in range(batch)], dtype=object)
            shouted = np.array([w + b"!" for w in words], dtype=object)
            jobs.append(("shout", {"text": words}, ["shout"], {"shout": shouted}))

    options = ServerOptions(port=0, max_batch_size=16, max_queue_delay_us=2000)
    with BackgroundServer(repository, options) as server:

        async def main():
            async with AsyncInferenceClient(server.address, timeout=120) as client:
                return await asyncio.gather(*(client.infer(m, x, outputs) for m, x, outputs, _ in jobs))

        answers = asyncio.run(main())
        runners = {m.name: m.runner for m in server.server.repository}
    for (model, _, _, expected), answer in zip(jobs, answers):
        assert set(answer) == set(expected), model
        for name, want in expected.items():
            if want.dtype == object:
                assert list(answer[name]) == list(want), f"{model}.{name}"
            else:
                np.testing.assert_allclose(answer[name], want, rtol=1e-6, atol=1e-6, err_msg=f"{model}.{name}")
    counts = {name: sum(1 for m, *_ in jobs if m == name) for name in ("digits_cnn", "add_sub", "shout")}
    assert any(runners[name].runs < count for name, count in counts.items())  # requests were joined
