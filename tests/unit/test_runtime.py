"""ortserve.server.runtime on its own: a Model's checks of a request against real ONNX Runtime sessions of tiny
models, the accepted-signature cache, the specs, the lone-session choice, and running with ONNX Runtime's
failures and deadlines turned into the server's errors."""

from __future__ import annotations

import asyncio
import os
import re
import time

import numpy as np
import onnx
import pytest
import server_models  # tests/server/server_models.py (on sys.path: tests/unit/conftest.py)
from onnx import TensorProto, helper

from ortserve.server import runtime
from ortserve.server.errors import DeadlineExceeded, InvalidInput, ModelRunError, RepositoryError
from ortserve.server.runtime import (LONE_SESSION_MIN_RUN, LoneSessions, RunTiming, SessionRunner, SessionSettings,
                                     TensorSpec, run_session)  # fmt: skip

from .sessions import CountingSession

F32 = np.float32
ADD_SUB = "model 'add_sub' version 1"
A_SPEC = f"{ADD_SUB} input 'a' (float32 [-1, 4])"
B_SPEC = f"{ADD_SUB} input 'b' (float32 [-1, 4])"
TEXT_SPEC = "model 'shout' version 1 input 'text' (string [-1])"


def raises(kind, fragment: str):
    return pytest.raises(kind, match=re.escape(fragment))


def rows(n: int, k: int = 4, dtype=F32) -> np.ndarray:
    return np.arange(n * k).reshape(n, k).astype(dtype)


# --------------------------------------------------------------------------------------------------
# Specs


def test_a_model_reads_its_inputs_and_outputs_from_the_session(make_model):
    model = make_model("add_sub")
    assert model.inputs == {n: TensorSpec(n, np.dtype(F32), ("batch", 4)) for n in ("a", "b")}
    assert list(model.outputs) == ["sum", "difference"]
    assert make_model("echo_fp32").inputs["x"] == TensorSpec("x", np.dtype(F32), (None, 3))
    assert make_model("shout").inputs["text"] == TensorSpec("text", np.dtype(object), (None,))


@pytest.mark.parametrize(
    "spec, text",
    [
        (TensorSpec("x", np.dtype(F32), (None, 4)), "float32 [-1, 4]"),
        (TensorSpec("x", np.dtype(F32), ("batch", 3, 2)), "float32 [-1, 3, 2]"),
        (TensorSpec("x", np.dtype("i8"), ()), "int64 []"),
        (TensorSpec("x", np.dtype("i8"), None), "int64 of any shape"),
        (TensorSpec("t", np.dtype(object), (None,)), "string [-1]"),
        (TensorSpec("t", np.dtype(object), None), "string of any shape"),
    ],
)
def test_tensor_spec_describe(spec, text):
    assert spec.describe() == text


def test_an_output_type_the_server_cannot_carry_is_a_repository_error(tmp_path):
    model = server_models._model(
        [helper.make_node("SequenceConstruct", ["x"], ["s"])],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None])],
        [helper.make_tensor_sequence_value_info("s", TensorProto.FLOAT, None)],
    )
    path = server_models.save(model, tmp_path / "seq.onnx")
    session = runtime.load_session(path, SessionSettings(1))
    with raises(RepositoryError, "model 'seq' version 1: output 's' has type seq(tensor(float)), which the server "
                                 "cannot carry; supported: tensor(bool), tensor(uint8)"):  # fmt: skip
        runtime.Model("seq", 1, path, session)


def test_a_file_onnx_runtime_cannot_load_is_a_repository_error(tmp_path):
    path = tmp_path / "model.onnx"
    path.write_bytes(b"not a model")
    with raises(RepositoryError, f"ONNX Runtime cannot load {path}: "):
        runtime.load_session(path, SessionSettings(1))


@pytest.mark.parametrize("settings, threads", [
    (SessionSettings(intra_op_threads=3), 3),
    (SessionSettings(intra_op_threads=1, inter_op_threads=4), 1),
    (SessionSettings(), os.cpu_count()),
    (SessionSettings(intra_op_threads=0), os.cpu_count()),  # 0 is ONNX Runtime's "one per core"
])  # fmt: skip
def test_session_settings_threads(settings, threads):
    assert settings.threads() == threads


# --------------------------------------------------------------------------------------------------
# Checking a request


@pytest.mark.parametrize(
    "inputs, message",
    [
        ({"a": rows(1)}, f"{ADD_SUB} takes inputs 'a' (float32 [-1, 4]), 'b' (float32 [-1, 4]); missing 'b'"),
        ({"a": rows(1), "b": rows(1), "c": rows(1)}, f"{ADD_SUB} takes inputs 'a' (float32 [-1, 4]), "
                                                     "'b' (float32 [-1, 4]); unknown 'c'"),
        ({"a": rows(1), "c": rows(1)}, "; missing 'b'; unknown 'c'"),
        ({}, "; missing 'a', 'b'"),
        ({"a": rows(1, dtype=np.float64), "b": rows(1)}, f"{A_SPEC}: expected dtype float32, got float64"),
        ({"a": rows(1), "b": np.array([["1"] * 4])}, f"{B_SPEC}: expected dtype float32, got strings"),
        ({"a": np.zeros(4, F32), "b": rows(1)}, f"{A_SPEC}: expected rank 2, got shape [4]"),
        ({"a": rows(1), "b": np.zeros((1, 4, 1), F32)}, f"{B_SPEC}: expected rank 2, got shape [1, 4, 1]"),
        ({"a": rows(2, 5), "b": rows(2)}, f"{A_SPEC}: expected dimension 1 to be 4, got shape [2, 5]"),
        ({"a": rows(2), "b": rows(3)}, f"{B_SPEC}: dimension 0 ('batch') is 3, but input 'a' has 2 for 'batch'; "
                                       "they must agree"),
    ],
)  # fmt: skip
def test_requests_that_do_not_fit_the_model_name_what_was_expected(make_model, inputs, message):
    with raises(InvalidInput, message):
        make_model("add_sub").check_inputs(inputs)


def test_a_free_dimension_takes_any_size_and_a_fixed_one_only_its_own(make_model):
    model = make_model("echo_fp32")  # x (-1, 3)
    for n in (0, 1, 7):
        assert model.check_inputs({"x": rows(n, 3)})["x"].shape == (n, 3)
    with raises(InvalidInput, "input 'x' (float32 [-1, 3]): expected dimension 1 to be 3, got shape [7, 4]"):
        model.check_inputs({"x": rows(7, 4)})


@pytest.mark.parametrize(
    "text, want",
    [
        (np.array([b"hi", "été".encode()], dtype=object), ["hi", "été"]),
        (np.array(["hi", "été"], dtype=object), ["hi", "été"]),
        (np.array(["hi", "été"]), ["hi", "été"]),  # numpy str
        (np.array([b"hi", b""]), ["hi", ""]),  # numpy bytes
        (np.array([], dtype=object), []),
    ],
)
def test_string_inputs_reach_onnx_runtime_as_str(make_model, text, want):
    feed = make_model("shout").check_inputs({"text": text})["text"]
    assert feed.dtype == object and feed.tolist() == want
    assert all(type(item) is str for item in feed.tolist())


@pytest.mark.parametrize(
    "text, message",
    [
        (np.array([b"ok", b"\xffno"], dtype=object), f"{TEXT_SPEC}: element 1 is not UTF-8 text ('utf-8' codec "
                                                     "can't decode byte 0xff in position 0"),
        (np.array(["ok", 5], dtype=object), f"{TEXT_SPEC}: element 1 is a int, expected text"),
        (np.array([1, 2]), f"{TEXT_SPEC}: expected strings, got int64"),
    ],
)  # fmt: skip
def test_string_inputs_that_are_not_text_name_the_element(make_model, text, message):
    with raises(InvalidInput, message):
        make_model("shout").check_inputs({"text": text})


class CountChecks:
    """Counts a Model's full checks (the work the accepted-signature cache saves)."""

    def __init__(self, model, monkeypatch) -> None:
        self.calls = 0
        full = model._check_all

        def counted(inputs):
            self.calls += 1
            return full(inputs)

        monkeypatch.setattr(model, "_check_all", counted)


def test_a_request_like_one_that_passed_is_not_checked_again_but_a_new_shape_is(make_model, monkeypatch):
    model = make_model("add_sub")
    checks = CountChecks(model, monkeypatch)
    request = {"a": rows(2), "b": rows(2)}
    assert model.check_inputs(request).keys() == {"a", "b"}
    assert model.check_inputs({"a": rows(2) + 1, "b": rows(2)})["a"].tolist() == (rows(2) + 1).tolist()
    assert checks.calls == 1
    model.check_inputs({"a": rows(3), "b": rows(3)})
    assert checks.calls == 2
    with raises(InvalidInput, "dimension 0 ('batch') is 3, but input 'a' has 2"):  # refused, so never remembered
        model.check_inputs({"a": rows(2), "b": rows(3)})
    with raises(InvalidInput, "dimension 0 ('batch') is 3, but input 'a' has 2"):
        model.check_inputs({"a": rows(2), "b": rows(3)})
    assert checks.calls == 4


def test_the_cache_is_bounded_and_string_models_are_always_checked(make_model, monkeypatch):
    monkeypatch.setattr(runtime, "MAX_REMEMBERED_SIGNATURES", 2)
    model = make_model("echo_fp32")
    checks = CountChecks(model, monkeypatch)
    for n in (1, 2, 3, 1, 2, 3):
        model.check_inputs({"x": rows(n, 3)})
    assert checks.calls == 4  # 1 and 2 remembered; 3 checked both times

    shout = make_model("shout")
    checks = CountChecks(shout, monkeypatch)
    for _ in range(2):  # bytes must be decoded to str on every request
        assert shout.check_inputs({"text": np.array([b"a"], dtype=object)})["text"].tolist() == ["a"]
    assert checks.calls == 2


@pytest.mark.parametrize(
    "outputs, want",
    [(None, None), ([], None), (["sum"], ["sum"]), (["difference", "sum", "difference", "sum"], ["difference", "sum"])],
)
def test_requested_outputs_keep_their_order_without_repeats(make_model, outputs, want):
    assert make_model("add_sub").check_outputs(outputs) == want


def test_an_unknown_output_names_the_ones_there_are(make_model):
    with raises(InvalidInput, f"{ADD_SUB} has outputs 'sum', 'difference'; no output 'product', 'ratio'"):
        make_model("add_sub").check_outputs(["sum", "product", "ratio"])


def test_infer_checks_then_runs_and_answers_the_requested_outputs(make_model, executor):
    model = make_model("add_sub", executor=executor)
    a, b = rows(2), np.ones((2, 4), F32)
    answer = asyncio.run(model.infer({"a": a, "b": b}, ["difference"]))
    assert list(answer) == ["difference"] and answer["difference"].tolist() == (a - b).tolist()
    answer = asyncio.run(model.infer({"a": a, "b": b}))
    assert list(answer) == ["sum", "difference"] and answer["sum"].tolist() == (a + b).tolist()


# --------------------------------------------------------------------------------------------------
# Running


def test_lone_sessions_follow_the_running_average_of_lone_runs():
    shared, lone = object(), object()
    assert LoneSessions(shared).pick() is shared
    sessions = LoneSessions(shared, lone)
    assert sessions.pick() is shared  # the average starts at 0
    picks = []
    for seconds in (4 * LONE_SESSION_MIN_RUN, 4 * LONE_SESSION_MIN_RUN, 0.0, 0.0):
        sessions.ran(seconds)
        picks.append((round(sessions.average_run / LONE_SESSION_MIN_RUN, 4), sessions.pick() is lone))
    # each run moves the average a fifth of the way towards it
    assert picks == [(0.8, False), (1.44, True), (1.152, True), (0.9216, False)]


def test_onnx_runtime_failures_become_the_server_errors_with_its_message(sessions):
    with raises(ModelRunError, "lbl failed while running: [ONNXRuntimeError] : 1 : FAIL : Non-zero status code "
                               "returned while running Reshape node"):  # fmt: skip
        run_session(sessions["broken"], {"x": np.zeros(5, F32)}, ["y"], "lbl")
    with raises(InvalidInput, "lbl: [ONNXRuntimeError] : 2 : INVALID_ARGUMENT : Unexpected input data type. "
                              "Actual: (tensor(double)) , expected: (tensor(int64))"):  # fmt: skip
        run_session(sessions["lookup"], {"idx": np.zeros(1)}, ["row"], "lbl")
    assert run_session(sessions["broken"], {"x": np.zeros(21, F32)}, ["y"], "lbl")["y"].shape == (7, 3)


def test_a_session_runner_fills_the_timing_and_tells_the_observer_once(sessions, executor):
    session = CountingSession(sessions["add_sub"])
    runner = SessionRunner(session, executor, "lbl")
    heard = []
    runner.observe_run = lambda rows_, seconds: heard.append(rows_)
    timing = RunTiming()
    answer = asyncio.run(runner({"a": rows(3), "b": rows(3)}, None, timing))
    assert list(answer) == ["sum", "difference"] and answer["sum"].tolist() == (2 * rows(3)).tolist()
    assert (timing.rows, timing.batch, session.rows, heard) == (3, 3, [3], [3])
    assert timing.run > 0 and timing.queue >= 0


def test_a_session_runner_past_its_deadline_does_not_run(sessions, executor):
    session = CountingSession(sessions["add_sub"])
    runner = SessionRunner(session, executor, "model 'add_sub' version 1")
    with raises(DeadlineExceeded, "model 'add_sub' version 1: the request's timeout or deadline passed after "):
        asyncio.run(runner({"a": rows(1), "b": rows(1)}, None, None, time.monotonic() - 1))
    assert session.rows == []
    asyncio.run(runner({"a": rows(1), "b": rows(1)}, None, None, time.monotonic() + 60))
    assert session.rows == [1]


def test_a_lone_run_on_an_idle_model_takes_the_lone_session_once_runs_are_long(sessions, executor):
    shared, lone = CountingSession(sessions["add_sub"]), CountingSession(sessions["add_sub"])
    runner = SessionRunner(shared, executor, "lbl", lone)
    feeds = {"a": rows(1), "b": rows(1)}
    asyncio.run(runner(feeds, None))
    runner.lone.average_run = LONE_SESSION_MIN_RUN * 100  # as if the runs so far had been long
    asyncio.run(runner(feeds, None))
    assert (shared.rows, lone.rows) == ([1], [1])


# --------------------------------------------------------------------------------------------------
# Custom operator domains


def test_imported_domains_lists_the_model_opset_imports(tmp_path, model_files):
    assert runtime.imported_domains(model_files["add_sub"]) == {""}
    graph = helper.make_graph([], "g", [], [])
    imports = [helper.make_opsetid("", 18), helper.make_opsetid("ai.onnx.contrib", 1),
               helper.make_opsetid("com.example.custom", 1)]  # fmt: skip
    onnx.save(helper.make_model(graph, opset_imports=imports, ir_version=10), tmp_path / "custom.onnx")
    assert runtime.imported_domains(tmp_path / "custom.onnx") == {"", "ai.onnx.contrib", "com.example.custom"}


def test_imported_domains_of_a_file_that_is_not_a_model_is_empty(tmp_path):
    (tmp_path / "junk").write_bytes(b"\xff\xff\xff")
    assert runtime.imported_domains(tmp_path / "junk") == set()
