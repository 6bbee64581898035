"""Bad requests get the right status and a message naming what was expected and what came -- and the server
keeps answering: every case is followed by a good request that must still be answered correctly."""

from __future__ import annotations

import json
import struct

import grpc
import numpy as np
import pytest

from ortserve._proto import grpc_service_pb2 as pb
from ortserve.client import InferenceClient, InferenceServerError
from ortserve.server.app import BackgroundServer, ServerOptions

INVALID = grpc.StatusCode.INVALID_ARGUMENT
A = np.arange(8, dtype=np.float32).reshape(2, 4)


def add_sub_request(*tensors: tuple[str, str, list[int], bytes], **fields) -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name="add_sub", **fields)
    for name, datatype, shape, raw in tensors:
        request.inputs.add(name=name, datatype=datatype, shape=shape)
        request.raw_input_contents.append(raw)
    return request


GOOD_A = ("a", "FP32", [2, 4], A.tobytes())
GOOD_B = ("b", "FP32", [2, 4], A.tobytes())


def bytes_request(model: str, name: str, shape: list[int], raw: bytes) -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name=model)
    request.inputs.add(name=name, datatype="BYTES", shape=shape)
    request.raw_input_contents.append(raw)
    return request


def typed(model: str, name: str, datatype: str, shape: list[int], **contents) -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name=model)
    request.inputs.add(name=name, datatype=datatype, shape=shape, contents=pb.InferTensorContents(**contents))
    return request


def both_raw_and_typed() -> pb.ModelInferRequest:
    request = add_sub_request(GOOD_A, GOOD_B)
    request.inputs[0].contents.fp32_contents.extend(A.reshape(-1).tolist())
    return request


def neither() -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name="add_sub")
    request.inputs.add(name="a", datatype="FP32", shape=[2, 4])
    request.inputs.add(name="b", datatype="FP32", shape=[2, 4])
    return request


def with_outputs(request: pb.ModelInferRequest, *names: str) -> pb.ModelInferRequest:
    for name in names:
        request.outputs.add(name=name)
    return request


# id -> (request, status, words the message must contain)
CASES = {
    "unknown model": (pb.ModelInferRequest(model_name="nope"), grpc.StatusCode.NOT_FOUND, ["'nope'", "add_sub"]),
    "unknown version": (add_sub_request(GOOD_A, GOOD_B, model_version="9"), grpc.StatusCode.NOT_FOUND, ["'9'", "1"]),
    "non-numeric version": (
        add_sub_request(GOOD_A, GOOD_B, model_version="latest"),
        grpc.StatusCode.NOT_FOUND,
        ["'latest'"],
    ),
    "missing input": (add_sub_request(GOOD_A), INVALID, ["missing 'b'", "'a' (float32 [-1, 4])"]),
    "extra input": (add_sub_request(GOOD_A, GOOD_B, ("c", "FP32", [2, 4], A.tobytes())), INVALID, ["unknown 'c'"]),
    "misnamed input": (
        add_sub_request(GOOD_A, ("B", "FP32", [2, 4], A.tobytes())),
        INVALID,
        ["missing 'b'", "unknown 'B'"],
    ),
    "duplicate input": (add_sub_request(GOOD_A, GOOD_A, GOOD_B), INVALID, ["'a' is given twice"]),
    "wrong datatype": (
        add_sub_request(GOOD_A, ("b", "FP64", [2, 4], A.astype(np.float64).tobytes())),
        INVALID,
        ["expected dtype float32", "got float64"],
    ),
    "strings for numbers": (
        add_sub_request(GOOD_A, ("b", "BYTES", [2, 4], b"".join(struct.pack("<I", 1) + b"7" for _ in range(8)))),
        INVALID,
        ["expected dtype float32, got strings"],
    ),
    "unknown datatype": (add_sub_request(GOOD_A, ("b", "FP128", [2, 4], b"")), INVALID, ["'FP128'", "FP32"]),
    "wrong rank": (add_sub_request(GOOD_A, ("b", "FP32", [8], A.tobytes())), INVALID, ["expected rank 2", "[8]"]),
    "wrong dimension": (
        add_sub_request(GOOD_A, ("b", "FP32", [2, 2], A[:, :2].tobytes())),
        INVALID,
        ["dimension 1 to be 4", "[2, 2]"],
    ),
    "batch sizes disagree": (
        add_sub_request(GOOD_A, ("b", "FP32", [3, 4], np.zeros((3, 4), np.float32).tobytes())),
        INVALID,
        ["('batch') is 3", "input 'a' has 2"],
    ),
    "negative dimension": (add_sub_request(GOOD_A, ("b", "FP32", [-2, 4], b"")), INVALID, ["negative"]),
    "raw length": (
        add_sub_request(GOOD_A, ("b", "FP32", [2, 4], A.tobytes()[:-4])),
        INVALID,
        ["needs 32 bytes", "got 28"],
    ),
    "raw count": (
        pb.ModelInferRequest(model_name="add_sub", inputs=neither().inputs, raw_input_contents=[A.tobytes()]),
        INVALID,
        ["1 entries for 2 inputs"],
    ),
    "raw and typed": (both_raw_and_typed(), INVALID, ["typed contents", "raw_input_contents"]),
    "neither raw nor typed": (neither(), INVALID, ["has no data"]),
    "typed in the wrong field": (
        typed("echo_fp32", "x", "FP32", [1, 3], fp64_contents=[1, 2, 3]),
        INVALID,
        ["fp32_contents", "fp64_contents"],
    ),
    "typed count": (typed("echo_fp32", "x", "FP32", [1, 3], fp32_contents=[1, 2]), INVALID, ["needs 3", "got 2"]),
    "typed FP16": (typed("echo_fp16", "x", "FP16", [1, 3], fp32_contents=[1, 2, 3]), INVALID, ["raw_input_contents"]),
    "typed overflow": (typed("echo_int8", "x", "INT8", [1, 3], int_contents=[1, 2, 300]), INVALID, ["INT8"]),
    "bytes length past the end": (
        bytes_request("shout", "text", [1], struct.pack("<I", 100) + b"abc"),
        INVALID,
        ["declares 100 bytes", "3 remain"],
    ),
    "bytes truncated header": (
        bytes_request("shout", "text", [2], struct.pack("<I", 1) + b"a" + b"\x01"),
        INVALID,
        ["end after 1 of 2"],
    ),
    "bytes left over": (
        bytes_request("shout", "text", [1], struct.pack("<I", 1) + b"ab"),
        INVALID,
        ["1 bytes left over"],
    ),
    "bytes not utf-8": (
        bytes_request("shout", "text", [1], struct.pack("<I", 2) + b"\xff\xfe"),
        INVALID,
        ["not UTF-8"],
    ),
    "unknown output": (
        with_outputs(add_sub_request(GOOD_A, GOOD_B), "sum", "product"),
        INVALID,
        ["no output 'product'", "'sum'"],
    ),
    "model fails while running": (
        pb.ModelInferRequest(
            model_name="broken",
            inputs=[pb.ModelInferRequest.InferInputTensor(name="x", datatype="FP32", shape=[5])],
            raw_input_contents=[np.zeros(5, np.float32).tobytes()],
        ),
        grpc.StatusCode.INTERNAL,
        ["'broken'", "failed while running", "Reshape"],
    ),
}


def assert_still_serving(client: InferenceClient) -> None:
    result = client.infer("add_sub", {"a": A, "b": np.ones_like(A)})
    np.testing.assert_array_equal(result["sum"], A + 1)
    np.testing.assert_array_equal(result["difference"], A - 1)


@pytest.mark.parametrize("case", list(CASES))
def test_bad_request_then_good_request(v2_stub, client, case):
    request, status, words = CASES[case]
    with pytest.raises(grpc.RpcError) as caught:
        v2_stub.ModelInfer(request, timeout=60)
    assert caught.value.code() == status, caught.value.details()
    for word in words:
        assert word in caught.value.details()
    assert_still_serving(client)


def test_metadata_of_unknown_model_is_not_found(client):
    with pytest.raises(InferenceServerError) as caught:
        client.model_metadata("nope")
    assert caught.value.code == grpc.StatusCode.NOT_FOUND and "'nope'" in caught.value.message
    assert_still_serving(client)


def test_client_error_carries_code_and_message(client):
    with pytest.raises(InferenceServerError) as caught:
        client.infer("add_sub", {"a": A, "b": A.astype(np.float64)})
    assert caught.value.code == INVALID and "got float64" in caught.value.message
    assert str(caught.value).startswith("INVALID_ARGUMENT: ")


def test_client_rejects_single_array_for_multi_input_model(client):
    with pytest.raises(ValueError, match="takes 2 inputs"):
        client.infer("add_sub", A)


@pytest.fixture(scope="module")
def one_mib_server(tmp_path_factory, repository):
    """A server whose messages may be 1 MiB at most, serving echo_fp32 and shout."""
    listing = {"model_config_list": [{"name": n, "base_path": str(repository / n)} for n in ("echo_fp32", "shout")]}
    config = tmp_path_factory.mktemp("one_mib") / "models.json"
    config.write_text(json.dumps(listing))
    with BackgroundServer(config, ServerOptions(port=0, max_message_bytes=1024 * 1024)) as running:
        yield running


def test_message_over_the_limit_is_resource_exhausted(one_mib_server):
    with InferenceClient(one_mib_server.address) as c:
        big = np.zeros((2 * 1024 * 1024 // 12 + 1, 3), np.float32)  # just over 2 MiB of raw contents
        with pytest.raises(InferenceServerError) as caught:
            c.infer("echo_fp32", {"x": big})
        assert caught.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
        small_enough = np.ones((10, 3), np.float32)
        np.testing.assert_array_equal(c.infer("echo_fp32", {"x": small_enough})["y"], small_enough)


def test_answer_over_the_limit_is_resource_exhausted(one_mib_server):
    """The request fits, the answer does not (shout adds a byte per element): the server must not send it."""
    with InferenceClient(one_mib_server.address) as c:
        # each element travels as 4 + 1 bytes in; out it is "x!" (4 + 2) twice (shout and same)
        text = np.array(["x"] * 120_000, dtype=object)
        with pytest.raises(InferenceServerError) as caught:
            c.infer("shout", {"text": text})
        assert caught.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert c.infer("shout", {"text": text[:10]})["shout"].tolist() == [b"x!"] * 10
