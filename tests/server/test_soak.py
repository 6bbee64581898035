"""`python -m ortserve soak` (ortserve.soak): how it judges a call, then short real soaks of a real server.

The judging tests feed the classifier answers that are wrong on purpose -- a changed score, a bad request answered,
a cancelled call -- and check that each counts as an unexpected failure. The soaks start `python -m ortserve
serve`, run callers in worker processes for a few seconds, and check the report: no unexpected failure, every bad
kind rejected with its status, the server's own count equal to the callers', memory sampled; and with
--shutdown_after, a SIGTERM in the middle of the load that loses no call and ends with exit status 0.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from ortserve import soak
from ortserve.__main__ import main
from ortserve._proto import grpc_service_pb2 as pb
from ortserve.server import codec


@pytest.fixture(scope="module")
def cases() -> dict[str, soak.Case]:
    return {case.name: case for case in soak.soak_cases()}


def reply(outputs: dict[str, np.ndarray]) -> bytes:
    response = pb.ModelInferResponse(model_name="m")
    codec.encode_response_outputs(response, outputs)
    return response.SerializeToString()


def test_every_bad_kind_and_good_request_is_in_the_mix(cases):
    assert set(soak.BAD_KINDS) <= set(cases)
    good = [c for c in cases.values() if c.expected_status == "OK"]
    assert len(good) == len(soak.GOOD_REQUESTS) and all(c.expected_outputs for c in good)
    order = soak.schedule(list(cases.values()))
    assert len(order) == soak.GOOD_WEIGHT * len(good) + len(soak.BAD_KINDS)


def test_a_right_answer_is_ok_and_a_changed_one_is_not(cases):
    case = cases["digits_forest x8"]
    expected = case.expected_outputs
    assert soak.classify(case, "OK", "", reply(expected), shutdown=False) == (soak.OK, "")
    changed = dict(expected, probabilities=expected["probabilities"] + 0.01)
    outcome, message = soak.classify(case, "OK", "", reply(changed), shutdown=False)
    assert outcome == "wrong answer" and "'probabilities'" in message
    relabelled = dict(expected, label=(expected["label"] + 1) % 10)
    assert soak.classify(case, "OK", "", reply(relabelled), shutdown=False)[0] == "wrong answer"
    missing = {"label": expected["label"]}
    assert soak.classify(case, "OK", "", reply(missing), shutdown=False)[0] == "wrong answer"


def test_bad_requests_must_get_their_own_status(cases):
    case = cases["wrong_datatype"]
    assert soak.classify(case, "INVALID_ARGUMENT", "expected dtype float32", None, shutdown=False)[0] == soak.REJECTED
    assert soak.classify(case, "INTERNAL", "boom", None, shutdown=False)[0] == "INTERNAL"
    assert soak.classify(case, "OK", "", reply({}), shutdown=False)[0] == "OK"  # answered: unexpected


def test_shutdown_refusals_are_expected_only_during_a_shutdown(cases):
    case = cases["digits_cnn x1"]
    draining = "the server is shutting down and takes no new requests; retry on another replica"
    gone = "failed to connect to all addresses; last error: UNKNOWN: ipv4:127.0.0.1:1: Connection refused"
    assert soak.classify(case, "UNAVAILABLE", draining, None, shutdown=True)[0] == soak.REFUSED_DRAINING
    assert soak.classify(case, "UNAVAILABLE", gone, None, shutdown=True)[0] == soak.REFUSED_GONE
    assert soak.classify(case, "UNAVAILABLE", draining, None, shutdown=False)[0] == "UNAVAILABLE"
    assert soak.classify(case, "UNAVAILABLE", "Socket closed", None, shutdown=True)[0] == "UNAVAILABLE"
    assert soak.classify(case, "CANCELLED", "CANCELLED", None, shutdown=True)[0] == "CANCELLED"


def soak_command(tmp_path, *flags: str) -> dict:
    """`python -m ortserve soak FLAGS` (in-process), which must exit 0; its JSON report."""
    out = tmp_path / "soak.json"
    assert main(["soak", "--concurrency", "16", "--sample_every", "1", *flags, "--json", str(out)]) == 0
    return json.loads(out.read_text())


def test_short_soak_has_no_unexpected_failure(tmp_path):
    report = soak_command(tmp_path, "--seconds", "10", "--warmup", "3")
    assert report["passed"] and report["problems"] == []
    assert report["unexpected_total"] == 0 and report["unexpected"] == {}
    assert set(report["ok"]) == {f"{m} x{rows}" + (" typed" if typed else "") for m, rows, typed in soak.GOOD_REQUESTS}
    assert all(n > 0 for n in report["ok"].values())
    rejected = report["expected_rejections"]
    assert set(rejected) == set(soak.BAD_KINDS)
    for kind, (status, _) in soak.BAD_KINDS.items():
        assert rejected[kind]["status"] == status and rejected[kind]["count"] > 0, kind
    assert report["calls"] == sum(report["ok"].values()) + sum(r["count"] for r in rejected.values())
    assert report["server_counts"] == report["client_counts"]  # the server's metrics saw what the callers saw
    memory = report["memory"]
    assert len(memory["samples"]) >= 5 and memory["after_warmup_at_seconds"] >= 3
    assert memory["max_mib"] >= memory["end_mib"] > 0
    assert report["server_exit_status"] == 0
    assert sum(sum(slot[k] for k in ("ok", "rejected")) for slot in report["timeline"]) == report["calls"]


def test_soak_with_a_shutdown_in_the_middle_loses_no_call(tmp_path):
    report = soak_command(tmp_path, "--seconds", "30", "--shutdown_after", "4")
    assert report["passed"] and report["unexpected_total"] == 0
    assert report["server_exit_status"] == 0
    shutdown = report["shutdown"]
    assert isinstance(shutdown["calls_in_flight_at_signal"], int)
    # Every caller ended refused (draining, or the server gone), none cut off; so the run ended well before 30 s.
    assert shutdown["refused_while_draining"] + shutdown["refused_after_exit"] == 16
    assert report["seconds"] < 20
    assert sum(report["ok"].values()) > 0
