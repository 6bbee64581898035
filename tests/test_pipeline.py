"""The typed pipeline (ortserve.pipeline): Pydantic models and protobuf messages in step, conversion, the service.

Agreement is checked for every pair, and the checker itself is shown to catch each kind of one-sided change
(a field added on one side, a type, repeated-ness or optionality changed, a nested message swapped) with
deliberately mismatched pairs: Pydantic subclasses, and protobuf messages rebuilt in a private descriptor pool.
The service tests start real grpc.aio servers on port 0 and call them over real channels.
"""

from __future__ import annotations

import io
from concurrent.futures import ThreadPoolExecutor

import grpc
import numpy as np
import onnxruntime as ort
import pytest
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
from grpc_health.v1 import health_pb2, health_pb2_grpc
from PIL import Image as PILImage
from pydantic import ValidationError
from scipy.special import softmax

from ortserve import data, zoo
from ortserve._proto import pipeline_pb2 as pb
from ortserve._proto import pipeline_pb2_grpc as pb_grpc
from ortserve.pipeline import (
    WIRE_MODELS,
    BoundingBox,
    ClassScore,
    Detection,
    DigitsCnnModel,
    EncodedImage,
    ImageResult,
    InvalidInput,
    MockModel,
    PipelineServer,
    ProcessRequest,
    ProcessResponse,
    VisionModel,
    decode_image,
    encode_png,
    field_differences,
    from_message,
    ink_box,
    message_fields,
    model_fields,
    process_request,
    to_message,
)
from ortserve.server.app import BackgroundServer

# --------------------------------------------------------------------------------------------------
# Agreement


@pytest.mark.parametrize("model_type", WIRE_MODELS, ids=lambda m: m.__name__)
def test_pydantic_model_agrees_with_its_message_field_by_field(model_type):
    ours, theirs = model_fields(model_type), message_fields(model_type.message_type.DESCRIPTOR)
    assert model_type.__name__ == model_type.message_type.DESCRIPTOR.name
    assert sorted(ours) == sorted(theirs)
    for name in ours:
        assert (ours[name].kind, ours[name].repeated) == (theirs[name].kind, theirs[name].repeated), name
    assert field_differences(model_type) == []


def test_every_message_of_pipeline_proto_has_one_pydantic_twin():
    twins = [m.message_type.DESCRIPTOR.full_name for m in WIRE_MODELS]
    assert sorted(twins) == sorted(m.full_name for m in pb.DESCRIPTOR.message_types_by_name.values())


def rebuilt_message(name: str, edit) -> type:
    """pipeline.proto's message `name` after `edit(DescriptorProto)`, in a private pool: as if the .proto changed."""
    file = descriptor_pb2.FileDescriptorProto()
    pb.DESCRIPTOR.CopyToProto(file)
    edit(next(m for m in file.message_type if m.name == name))
    pool = descriptor_pool.DescriptorPool()
    pool.Add(file)
    return message_factory.GetMessageClass(pool.FindMessageTypeByName(f"{pb.DESCRIPTOR.package}.{name}"))


def add_field(name: str, number: int, kind: int, label: int = descriptor_pb2.FieldDescriptorProto.LABEL_OPTIONAL):
    return lambda message: message.field.add(name=name, number=number, type=kind, label=label)


def set_field_type(name: str, kind: int):
    def edit(message):
        next(f for f in message.field if f.name == name).type = kind

    return edit


def in_a_oneof(name: str):
    def edit(message):
        message.oneof_decl.add(name="choice")
        next(f for f in message.field if f.name == name).oneof_index = len(message.oneof_decl) - 1

    return edit


FDP = descriptor_pb2.FieldDescriptorProto


class BoxWithAngle(BoundingBox):
    angle: float = 0.0


class BoxWithIntegers(BoundingBox):
    x_min: int


class ScoreWithLabelList(ClassScore):
    label: list[str]


class ScoreWithOptionalLabel(ClassScore):
    label: str | None = None


class ImageWithRequiredId(EncodedImage):
    id: str = ""


class DetectionWithWrongBox(Detection):
    box: ClassScore | None = None


def test_one_sided_changes_are_caught():
    """Deliberately mismatched pairs: each must be reported, naming the field."""
    cases = [
        # (Pydantic model, protobuf message, expected difference)
        (BoxWithAngle, pb.BoundingBox, "'angle' only in the Pydantic model"),
        (BoundingBox, rebuilt_message("BoundingBox", add_field("angle", 5, FDP.TYPE_DOUBLE)),
         "'angle' only in the protobuf message"),
        (BoxWithIntegers, pb.BoundingBox, "'x_min' is int in Pydantic, float in protobuf"),
        (BoundingBox, rebuilt_message("BoundingBox", set_field_type("x_min", FDP.TYPE_FLOAT)),
         "'x_min' is float in Pydantic, float32 in protobuf (a protobuf `float` is float32; use `double`)"),
        (ScoreWithLabelList, pb.ClassScore, "'label' is list[str] in Pydantic, str in protobuf"),
        (ClassScore, rebuilt_message("ClassScore", lambda m: setattr(m.field[0], "label", FDP.LABEL_REPEATED)),
         "'label' is str in Pydantic, list[str] in protobuf"),
        (ScoreWithOptionalLabel, pb.ClassScore, "'label' is str | None in Pydantic, str in protobuf"),
        (ImageWithRequiredId, pb.EncodedImage, "'id' is `optional` in protobuf but required in Pydantic"),
        (ClassScore, rebuilt_message("ClassScore", in_a_oneof("label")), "'label' is str in Pydantic, oneof choice"),
        (DetectionWithWrongBox, pb.Detection,
         "'box' is ortserve.pipeline.v1.ClassScore | None in Pydantic, ortserve.pipeline.v1.BoundingBox | None"),
    ]  # fmt: skip
    for model_type, message_type, expected in cases:
        differences = field_differences(model_type, message_type)
        assert len(differences) == 1 and expected in differences[0], (model_type.__name__, differences)


def test_conversion_refuses_a_disagreeing_pair():
    box = BoxWithAngle(x_min=0, y_min=0, x_max=1, y_max=1, angle=30.0)
    with pytest.raises(TypeError, match="'angle' only in the Pydantic model"):
        box.to_message()  # the angle would otherwise be dropped without a word
    with pytest.raises(TypeError, match="'angle' only in the Pydantic model"):
        BoxWithAngle.from_message(pb.BoundingBox(x_max=1, y_max=1))
    # ... also when the odd one is nested inside an agreeing model
    detection = Detection(box=box, label="a", scores=[ClassScore(label="a", score=1.0)])
    with pytest.raises(TypeError, match="'angle'"):
        detection.to_message()


def test_unsupported_annotations_are_named():
    class WithDict(ClassScore):
        extra: dict[str, int] = {}

    with pytest.raises(TypeError, match=r"WithDict.extra: .* has no protobuf counterpart"):
        field_differences(WithDict)


# --------------------------------------------------------------------------------------------------
# Conversion

BOX = BoundingBox(x_min=1, y_min=0, x_max=7, y_max=8)
SCORES = [ClassScore(label="7", score=0.75), ClassScore(label="1", score=0.2), ClassScore(label="4", score=0.05)]
DETECTION = Detection(box=BOX, label="7", scores=SCORES)
UNBOXED = Detection(label="1", scores=[ClassScore(label="1", score=0.1 + 0.2)])  # a float with no short decimal
EXAMPLES = [
    BOX,
    SCORES[0],
    DETECTION,
    UNBOXED,
    ImageResult(id="a", width=8, height=8, detections=[DETECTION, UNBOXED]),
    ImageResult(width=3, height=5),
    ImageResult(id="", width=1, height=1),
    EncodedImage(data=b"\x89PNG\x00\xff"),
    EncodedImage(data=b"x", id="seven"),
    ProcessRequest(images=[EncodedImage(data=b"1"), EncodedImage(data=b"2", id="b")]),
    ProcessResponse(model="m", results=[ImageResult(id="a", width=8, height=8, detections=[DETECTION])]),
    ProcessResponse(model="", results=[]),
]


@pytest.mark.parametrize("example", EXAMPLES, ids=lambda e: type(e).__name__)
def test_round_trip_through_the_message_and_its_bytes(example):
    message = to_message(example)
    assert type(message) is type(example).message_type
    assert from_message(message, type(example)) == example
    parsed = type(message).FromString(message.SerializeToString())
    assert type(example).from_message(parsed) == example


def test_to_message_maps_every_field():
    expected = pb.Detection(
        box=pb.BoundingBox(x_min=1, y_min=0, x_max=7, y_max=8),
        label="7",
        scores=[pb.ClassScore(label="7", score=0.75), pb.ClassScore(label="1", score=0.2),
                pb.ClassScore(label="4", score=0.05)],
    )  # fmt: skip
    assert DETECTION.to_message() == expected
    assert not UNBOXED.to_message().HasField("box")
    assert not ImageResult(width=1, height=1).to_message().HasField("id")
    assert ImageResult(id="", width=1, height=1).to_message().HasField("id")  # "" is a value, not "unset"
    assert UNBOXED.to_message().scores[0].score == 0.1 + 0.2  # double on the wire: not rounded


def test_from_message_validates_and_checks_the_type():
    with pytest.raises(ValidationError, match="less than or equal to 1"):
        ClassScore.from_message(pb.ClassScore(label="a", score=1.5))
    with pytest.raises(ValidationError, match="label must be the best-scored label"):
        Detection.from_message(pb.Detection(label="b", scores=[pb.ClassScore(label="a", score=0.5)]))
    with pytest.raises(ValidationError, match="at least 1 item"):
        ProcessRequest.from_message(pb.ProcessRequest())
    with pytest.raises(TypeError, match=r"takes a ortserve\.pipeline\.v1\.ClassScore, got a .*\.BoundingBox"):
        ClassScore.from_message(pb.BoundingBox())


def test_validation_rules():
    with pytest.raises(ValidationError, match="x_min <= x_max"):
        BoundingBox(x_min=5, y_min=0, x_max=2, y_max=1)
    with pytest.raises(ValidationError, match="greater than or equal to 0"):
        BoundingBox(x_min=-1, y_min=0, x_max=2, y_max=1)
    with pytest.raises(ValidationError, match="best first"):
        Detection(label="1", scores=list(reversed(SCORES)))
    with pytest.raises(ValidationError, match="scored once"):
        Detection(label="7", scores=[SCORES[0], SCORES[0]])
    with pytest.raises(ValidationError, match="outside the 4x4 image"):
        ImageResult(width=4, height=4, detections=[DETECTION])
    with pytest.raises(ValidationError, match="Extra inputs are not permitted"):
        ClassScore(label="a", score=0.5, confidence=0.5)
    with pytest.raises(ValidationError, match="frozen"):
        SCORES[0].score = 0.9


# --------------------------------------------------------------------------------------------------
# Images and models, in-process


def test_png_round_trip_and_ink_box():
    pixels = np.zeros((6, 9), np.uint8)
    pixels[1:4, 2:7] = 200
    pixels[2, 8] = 10  # faint: inside the box at threshold 1, outside at 64
    assert np.array_equal(decode_image(encode_png(pixels)), pixels)
    assert ink_box(pixels) == BoundingBox(x_min=2, y_min=1, x_max=9, y_max=4)
    assert ink_box(pixels, threshold=64) == BoundingBox(x_min=2, y_min=1, x_max=7, y_max=4)
    assert ink_box(np.zeros((3, 3), np.uint8)) is None
    floats = np.linspace(0, 1, 64, dtype=np.float32).reshape(8, 8)
    assert np.abs(decode_image(encode_png(floats)) / 255.0 - floats).max() <= 0.5 / 255 + 1e-7


def test_colour_images_are_decoded_to_the_model_mode():
    rgb = np.zeros((4, 5, 3), np.uint8)
    rgb[..., 0] = 255
    buffer = io.BytesIO()
    PILImage.fromarray(rgb).save(buffer, format="PNG")
    assert decode_image(buffer.getvalue(), "RGB").shape == (4, 5, 3)
    assert decode_image(buffer.getvalue()).shape == (4, 5)  # "L": Pillow's luma of pure red is 76
    assert int(decode_image(buffer.getvalue())[0, 0]) == 76


def test_bad_image_bytes_are_named():
    with pytest.raises(InvalidInput, match=r"got 11 bytes starting b'hello world': Pillow cannot identify an image in them"):
        decode_image(b"hello world")
    png = encode_png(np.arange(64, dtype=np.uint8).reshape(8, 8))
    truncated = png[: len(png) // 2]
    with pytest.raises(InvalidInput, match="expected the bytes of an image file"):
        decode_image(truncated)


def test_too_large_images_are_refused_before_decoding():
    buffer = io.BytesIO()
    PILImage.new("L", (5000, 4000)).save(buffer, format="PNG")  # 30 kB of PNG, 20 million pixels
    with pytest.raises(InvalidInput, match="5000x4000 pixels; the pipeline takes at most 16777216"):
        decode_image(buffer.getvalue())


def test_vision_model_is_abstract():
    class Unfinished(VisionModel):
        pass

    with pytest.raises(TypeError, match="abstract"):
        Unfinished()


def test_mock_model_is_deterministic_and_image_dependent():
    dark, bright = np.zeros((4, 6), np.uint8), np.full((4, 6), 230, np.uint8)
    dark[1, 2] = 255
    result = MockModel().process(dark)
    assert result == MockModel().process(dark)
    assert (result.width, result.height, result.detections[0].label) == (6, 4, "dark")
    assert result.detections[0].box == BoundingBox(x_min=2, y_min=1, x_max=3, y_max=2)
    assert MockModel().process(bright).detections[0].label == "bright"


# --------------------------------------------------------------------------------------------------
# The service: real grpc.aio servers on port 0


@pytest.fixture(scope="module")
def cnn_model() -> DigitsCnnModel:
    return DigitsCnnModel()


def serve(model: VisionModel):
    return BackgroundServer(server=PipelineServer(model))


@pytest.fixture(scope="module")
def mock_stub():
    with serve(MockModel()) as server, grpc.insecure_channel(server.address) as channel:
        yield pb_grpc.PipelineStub(channel)


@pytest.fixture(scope="module")
def cnn_server(cnn_model):
    with serve(cnn_model) as server:
        yield server


@pytest.fixture(scope="module")
def cnn_stub(cnn_server):
    with grpc.insecure_channel(cnn_server.address) as channel:
        yield pb_grpc.PipelineStub(channel)


def digit_request(n: int, seed: int = 0) -> tuple[ProcessRequest, np.ndarray]:
    images, labels = data.sample_images(n, seed=seed)
    request = ProcessRequest(images=[EncodedImage(data=encode_png(x[0]), id=f"digit-{i}")
                                     for i, x in enumerate(images)])  # fmt: skip
    return request, labels


def call(stub, request: ProcessRequest) -> ProcessResponse:
    return ProcessResponse.from_message(stub.Process(request.to_message(), timeout=30))


def status_of(stub, request) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as caught:
        stub.Process(request, timeout=30)
    return caught.value.code(), caught.value.details()


def test_mock_service_answers_what_the_model_answers_in_process(mock_stub):
    request, _ = digit_request(5)
    request = request.model_copy(update={"images": [*request.images, EncodedImage(data=encode_png(np.ones((3, 4))))]})
    response = call(mock_stub, request)
    assert response == process_request(MockModel(), request)
    assert response.model == "mock"
    assert [r.id for r in response.results] == [f"digit-{i}" for i in range(5)] + [None]
    assert (response.results[-1].width, response.results[-1].height) == (4, 3)
    assert response.results[-1].detections[0].label == "bright"


def test_cnn_service_equals_onnx_runtime_in_process(cnn_stub):
    request, labels = digit_request(24, seed=3)
    response = call(cnn_stub, request)
    # The reference, computed here without ortserve.pipeline: PIL decodes, ONNX Runtime runs, scipy's softmax.
    pixels = np.stack([np.asarray(PILImage.open(io.BytesIO(image.data))) for image in request.images])
    session = ort.InferenceSession(zoo.ensure("digits_cnn"), providers=["CPUExecutionProvider"])
    logits = session.run(["logits"], {"input": (pixels / 255.0).astype(np.float32)[:, None]})[0]
    expected = softmax(logits.astype(np.float64), axis=1)
    assert response.model == "digits_cnn" and len(response.results) == len(labels)
    for result, probabilities, image in zip(response.results, expected, pixels):
        (detection,) = result.detections
        order = np.argsort(-probabilities, kind="stable")
        assert [s.label for s in detection.scores] == [str(i) for i in order]
        np.testing.assert_allclose([s.score for s in detection.scores], probabilities[order], rtol=1e-5, atol=1e-7)
        ink_rows, ink_cols = np.nonzero(image >= 64)
        assert detection.box == BoundingBox(x_min=ink_cols.min(), y_min=ink_rows.min(),
                                            x_max=ink_cols.max() + 1, y_max=ink_rows.max() + 1)  # fmt: skip
    predicted = np.array([int(r.detections[0].label) for r in response.results])
    assert np.array_equal(predicted, expected.argmax(1))
    assert np.mean(predicted == labels) >= 0.9  # the CNN reads PNG digits as well as the data set's


def test_concurrent_calls_get_their_own_answers(cnn_stub):
    requests = [digit_request(4, seed=s)[0] for s in range(8)]
    with ThreadPoolExecutor(max_workers=8) as pool:
        responses = list(pool.map(lambda r: call(cnn_stub, r), requests))
    cnn = DigitsCnnModel()
    for request, response in zip(requests, responses):
        assert [r.detections[0].label for r in response.results] == \
               [r.detections[0].label for r in process_request(cnn, request).results]  # fmt: skip


def test_bad_requests_get_invalid_argument_and_the_server_keeps_serving(cnn_stub):
    good, _ = digit_request(2)
    bad_bytes = pb.ProcessRequest(images=[good.images[0].to_message(), pb.EncodedImage(data=b"hello world", id="x")])
    code, details = status_of(cnn_stub, bad_bytes)
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert details == ("image 1 (id 'x'): expected the bytes of an image file (PNG, JPEG, ...), got 11 bytes "
                       "starting b'hello world': Pillow cannot identify an image in them")  # fmt: skip

    wrong_size = pb.ProcessRequest(images=[pb.EncodedImage(data=encode_png(np.zeros((16, 12), np.uint8)))])
    assert status_of(cnn_stub, wrong_size) == (
        grpc.StatusCode.INVALID_ARGUMENT, "image 0: expected an 8x8 grayscale digit, got an image of 12x16 pixels")
    assert status_of(cnn_stub, pb.ProcessRequest()) == (
        grpc.StatusCode.INVALID_ARGUMENT, "invalid ProcessRequest: images: List should have at least 1 item after "
        "validation, not 0")  # fmt: skip
    code, details = status_of(cnn_stub, pb.ProcessRequest(images=[pb.EncodedImage(id="empty")]))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and details.startswith("invalid ProcessRequest: images.0.data:")

    assert [r.id for r in call(cnn_stub, good).results] == ["digit-0", "digit-1"]


def test_a_model_bug_is_internal_and_the_server_keeps_serving():
    class Flaky(VisionModel):
        name = "flaky"

        def process(self, pixels):
            if pixels.max() == 0:
                raise ZeroDivisionError("no ink")
            return MockModel().process(pixels)

    black, grey = encode_png(np.zeros((2, 2), np.uint8)), encode_png(np.full((2, 2), 9, np.uint8))
    with serve(Flaky()) as server, grpc.insecure_channel(server.address) as channel:
        stub = pb_grpc.PipelineStub(channel)
        code, details = status_of(stub, ProcessRequest(images=[EncodedImage(data=black)]).to_message())
        assert code == grpc.StatusCode.INTERNAL and "ZeroDivisionError: no ink" in details
        assert call(stub, ProcessRequest(images=[EncodedImage(data=grey)])).model == "flaky"


def test_health_is_serving(cnn_server):
    with grpc.insecure_channel(cnn_server.address) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for service in ("", "ortserve.pipeline.v1.Pipeline"):
            reply = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=10)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
