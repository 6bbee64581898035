"""A typed vision pipeline: encoded images in, typed results out, over gRPC (lesson 10).

A result type is defined twice: for Python as Pydantic models (validation, editor types, JSON), and for the wire as
protobuf messages (protos/ortserve/_proto/pipeline.proto: compact, versioned, any language). Each Pydantic model
subclasses `WireModel` and names its protobuf twin in `message_type`; the two have the same field names, scalar
types, repeated-ness and nesting. Nothing is copied by hand between them:

    message = detection.to_message()               # Pydantic -> protobuf, walking the fields recursively
    detection = Detection.from_message(message)    # protobuf -> Pydantic, validated on the way in
    field_differences(Detection)                   # [] when the pair agrees; what differs otherwise

Conversion checks the pair first (once per class) and raises TypeError naming every difference, so a field added
on one side only fails loudly instead of being dropped. tests/test_pipeline.py checks every pair.

Models implement `VisionModel.process(pixels) -> ImageResult`. `MockModel` needs no weights (for testing the
wire); `DigitsCnnModel` runs the course's digits CNN with ONNX Runtime. `process_request` runs a model over a
`ProcessRequest` in-process; `PipelineServicer` is the same over gRPC, and `PipelineServer` serves it with
grpc.health.v1 beside it:

    with BackgroundServer(server=PipelineServer(DigitsCnnModel())) as server:   # ortserve.server.app
        stub = pipeline_pb2_grpc.PipelineStub(grpc.insecure_channel(server.address))
        reply = ProcessResponse.from_message(stub.Process(request.to_message()))

Images travel as the bytes of an image file (PNG, or anything Pillow reads) and are decoded on the server to the
mode the model asks for (`VisionModel.image_mode`; "L", 8-bit grayscale, for the digits). A request that is not
valid -- no images, bytes that are not an image, an image the model cannot take -- gets INVALID_ARGUMENT naming the
image (index and id) and what came.
"""

from __future__ import annotations

import asyncio
import functools
import io
import types
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, ClassVar, TypeVar, Union, get_args, get_origin

import grpc
import numpy as np
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import Message
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from ortserve import data
from ortserve._proto import pipeline_pb2 as pb
from ortserve._proto import pipeline_pb2_grpc as pb_grpc
from ortserve.client import channel_options
from ortserve.server.app import DEFAULT_GRACE_PERIOD, DEFAULT_MAX_MESSAGE_BYTES
from ortserve.server.errors import InvalidInput, grpc_errors

W = TypeVar("W", bound="WireModel")

# --------------------------------------------------------------------------------------------------
# Keeping a Pydantic model and a protobuf message in step


class WireModel(BaseModel):
    """Base of the Pydantic models that have a protobuf twin (`message_type`) with the same fields."""

    # extra="forbid": a misspelled or unknown field is an error, never silently dropped.
    model_config = ConfigDict(extra="forbid", frozen=True)
    message_type: ClassVar[type[Message]]

    def to_message(self) -> Message:
        return to_message(self)

    @classmethod
    def from_message(cls: type[W], message: Message) -> W:
        return from_message(message, cls)


@dataclass(frozen=True)
class FieldShape:
    """What the two sides must agree on for one field."""

    kind: str  # "int", "float", "str", "bool", "bytes", or a nested message's full name ("ortserve.pipeline.v1.X")
    repeated: bool
    optional: bool  # may be absent: None in Pydantic, HasField() false on the wire
    nested: type[WireModel] | None = None  # the Pydantic class of a nested message (Pydantic side only)

    @property
    def is_message(self) -> bool:
        return self.kind not in _PYTHON_SCALARS

    def describe(self) -> str:
        text = f"list[{self.kind}]" if self.repeated else self.kind
        return f"{text} | None" if self.optional else text


_PYTHON_SCALARS = {"int", "float", "str", "bool", "bytes"}
_INTEGER_TYPES = {
    FieldDescriptor.TYPE_INT32, FieldDescriptor.TYPE_INT64, FieldDescriptor.TYPE_UINT32, FieldDescriptor.TYPE_UINT64,
    FieldDescriptor.TYPE_SINT32, FieldDescriptor.TYPE_SINT64, FieldDescriptor.TYPE_FIXED32,
    FieldDescriptor.TYPE_FIXED64, FieldDescriptor.TYPE_SFIXED32, FieldDescriptor.TYPE_SFIXED64,
}  # fmt: skip
# `float` is float32 on the wire and has no Python twin: it would round every Python float. Use `double`.
_PROTO_SCALARS = {
    **{t: "int" for t in _INTEGER_TYPES},
    FieldDescriptor.TYPE_DOUBLE: "float",
    FieldDescriptor.TYPE_FLOAT: "float32",
    FieldDescriptor.TYPE_BOOL: "bool",
    FieldDescriptor.TYPE_STRING: "str",
    FieldDescriptor.TYPE_BYTES: "bytes",
}


def message_fields(descriptor: Descriptor) -> dict[str, FieldShape]:
    """The protobuf side: each field's kind, repeated-ness and presence, from the message's descriptor."""
    shapes = {}
    for field in descriptor.fields:
        if field.type == FieldDescriptor.TYPE_MESSAGE:
            entry = field.message_type
            kind = "map" if entry.GetOptions().map_entry else entry.full_name
        else:
            kind = _PROTO_SCALARS.get(field.type, "enum")  # enums and maps have no twin here: reported as such
        oneof = field.containing_oneof
        if oneof is not None and oneof.name != f"_{field.name}":  # a real oneof, not proto3 `optional`'s own
            kind = f"oneof {oneof.name}"  # no twin either: protobuf would keep only the last member set
        shapes[field.name] = FieldShape(kind, repeated=field.is_repeated and kind != "map", optional=field.has_presence)
    return shapes


def model_fields(model_type: type[BaseModel]) -> dict[str, FieldShape]:
    """The Pydantic side, read from the annotations: `T`, `T | None`, `list[T]`, T a scalar or a WireModel."""
    fields = model_type.model_fields
    return {name: _annotation_shape(model_type, name, info.annotation) for name, info in fields.items()}


def _annotation_shape(model_type: type, name: str, annotation: Any) -> FieldShape:
    hint, optional, repeated = _strip_annotated(annotation), False, False
    if get_origin(hint) in (Union, types.UnionType) and type(None) in get_args(hint):
        others = [a for a in get_args(hint) if a is not type(None)]
        optional, hint = True, _strip_annotated(others[0] if len(others) == 1 else Union[tuple(others)])
    if get_origin(hint) is list:
        repeated, hint = True, _strip_annotated(get_args(hint)[0])
    if isinstance(hint, type) and issubclass(hint, WireModel):
        return FieldShape(hint.message_type.DESCRIPTOR.full_name, repeated, optional, nested=hint)
    if isinstance(hint, type) and hint.__name__ in _PYTHON_SCALARS:
        return FieldShape(hint.__name__, repeated, optional)
    raise TypeError(
        f"{model_type.__name__}.{name}: {annotation!r} has no protobuf counterpart here; use int, float, str, bool, "
        "bytes, a WireModel, a list of one of those, or `X | None`"
    )


def _strip_annotated(hint: Any) -> Any:
    return get_args(hint)[0] if get_origin(hint) is Annotated else hint


def field_differences(model_type: type[WireModel], message_type: type[Message] | None = None) -> list[str]:
    """How `model_type` and its protobuf twin (or `message_type`) disagree, one line per difference; [] if they agree.

    They agree when they have the same field names, and for each field the same kind (Python scalar type, or the
    same nested message), the same repeated-ness, and the same optionality (for a nested message, the Pydantic
    side may require what the wire may leave out: a missing value then fails validation, loudly).
    """
    message_type = message_type or model_type.message_type
    ours, theirs = model_fields(model_type), message_fields(message_type.DESCRIPTOR)
    where = f"{model_type.__name__} vs {message_type.DESCRIPTOR.full_name}"
    differences = [f"{where}: {n!r} only in the Pydantic model" for n in ours if n not in theirs]
    differences += [f"{where}: {n!r} only in the protobuf message" for n in theirs if n not in ours]
    for name in ours.keys() & theirs.keys():
        py, wire = ours[name], theirs[name]
        if (py.kind, py.repeated) != (wire.kind, wire.repeated) or (py.optional and not wire.optional):
            hint = " (a protobuf `float` is float32; use `double`)" if wire.kind == "float32" else ""
            differences.append(f"{where}: {name!r} is {py.describe()} in Pydantic, {wire.describe()} in protobuf{hint}")
        elif wire.optional and not py.optional and not wire.is_message:
            differences.append(f"{where}: {name!r} is `optional` in protobuf but required in Pydantic")
    return sorted(differences)


@functools.cache
def _checked_fields(model_type: type[WireModel]) -> dict[str, FieldShape]:
    differences = field_differences(model_type)
    if differences:
        raise TypeError("the Pydantic model and its protobuf message disagree:\n  " + "\n  ".join(differences))
    return model_fields(model_type)


def to_message(model: WireModel) -> Message:
    """The protobuf twin of a Pydantic model, field by field, nested models and lists included; None stays unset."""
    values = {}
    for name, shape in _checked_fields(type(model)).items():
        value = getattr(model, name)
        if value is None:
            continue
        if shape.is_message:
            value = [to_message(item) for item in value] if shape.repeated else to_message(value)
        values[name] = value
    return type(model).message_type(**values)


def from_message(message: Message, model_type: type[W]) -> W:
    """The Pydantic model of a protobuf message, validated (pydantic.ValidationError if it breaks a rule).

    The message is read into plain values first and validated once, so an error names the full path of the field
    (`images.0.data`). A field with presence that the message does not set is left out: Pydantic applies the
    model's default or reports the field as missing.
    """
    expected = model_type.message_type.DESCRIPTOR
    if message.DESCRIPTOR is not expected:
        raise TypeError(f"{model_type.__name__}.from_message takes a {expected.full_name}, got a "
                        f"{message.DESCRIPTOR.full_name}")  # fmt: skip
    return model_type.model_validate(_message_values(message, model_type))


def _message_values(message: Message, model_type: type[WireModel]) -> dict[str, Any]:
    values: dict[str, Any] = {}
    for name, shape in _checked_fields(model_type).items():
        if message.DESCRIPTOR.fields_by_name[name].has_presence and not message.HasField(name):
            continue
        value = getattr(message, name)
        if shape.repeated:
            value = [_message_values(item, shape.nested) for item in value] if shape.nested else list(value)
        elif shape.nested:
            value = _message_values(value, shape.nested)
        values[name] = value
    return values


def validation_summary(error: ValidationError) -> str:
    """A pydantic ValidationError on one line: `field.path: what is wrong; ...` (the input values left out)."""
    return "; ".join(f"{'.'.join(map(str, e['loc'])) or 'value'}: {e['msg']}" for e in error.errors())


# --------------------------------------------------------------------------------------------------
# The types (twins of pipeline.proto's messages; the rules below are what protobuf cannot say)

Score = Annotated[float, Field(ge=0.0, le=1.0)]
Coordinate = Annotated[float, Field(ge=0.0)]


class BoundingBox(WireModel):
    """A box in pixel-edge coordinates: pixel (row r, column c) covers [c, c+1) x [r, r+1); origin top-left."""

    message_type = pb.BoundingBox
    x_min: Coordinate
    y_min: Coordinate
    x_max: Coordinate
    y_max: Coordinate

    @model_validator(mode="after")
    def _ordered(self) -> "BoundingBox":
        if self.x_min > self.x_max or self.y_min > self.y_max:
            raise ValueError(f"expected x_min <= x_max and y_min <= y_max, got x {self.x_min}..{self.x_max}, "
                             f"y {self.y_min}..{self.y_max}")  # fmt: skip
        return self


class ClassScore(WireModel):
    message_type = pb.ClassScore
    label: str = Field(min_length=1)
    score: Score


class Detection(WireModel):
    """One thing found: where (None: the model does not say) and what, with every class's score, best first."""

    message_type = pb.Detection
    box: BoundingBox | None = None
    label: str
    scores: list[ClassScore] = Field(min_length=1)

    @model_validator(mode="after")
    def _consistent(self) -> "Detection":
        labels = [s.label for s in self.scores]
        if len(set(labels)) != len(labels):
            raise ValueError(f"each label may be scored once, got {labels}")
        values = [s.score for s in self.scores]
        if values != sorted(values, reverse=True):
            raise ValueError(f"scores must be best first, got {values}")
        if self.label != labels[0]:
            raise ValueError(f"label must be the best-scored label {labels[0]!r}, got {self.label!r}")
        return self


class ImageResult(WireModel):
    message_type = pb.ImageResult
    id: str | None = None
    width: int = Field(ge=1, le=2**31 - 1)  # int32 on the wire
    height: int = Field(ge=1, le=2**31 - 1)
    detections: list[Detection] = []

    @model_validator(mode="after")
    def _boxes_inside(self) -> "ImageResult":
        for i, detection in enumerate(self.detections):
            box = detection.box
            if box is not None and (box.x_max > self.width or box.y_max > self.height):
                raise ValueError(f"detection {i}: box reaches ({box.x_max}, {box.y_max}), outside the "
                                 f"{self.width}x{self.height} image")  # fmt: skip
        return self


class EncodedImage(WireModel):
    message_type = pb.EncodedImage
    data: bytes = Field(min_length=1)
    id: str | None = None


class ProcessRequest(WireModel):
    message_type = pb.ProcessRequest
    images: list[EncodedImage] = Field(min_length=1)


class ProcessResponse(WireModel):
    message_type = pb.ProcessResponse
    model: str
    results: list[ImageResult]


# Every model with a twin in pipeline.proto (tests/test_pipeline.py checks each pair, and that none is missing).
WIRE_MODELS: tuple[type[WireModel], ...] = (
    BoundingBox, ClassScore, Detection, ImageResult, EncodedImage, ProcessRequest, ProcessResponse,
)  # fmt: skip


# --------------------------------------------------------------------------------------------------
# Images: bytes of an image file <-> pixels

# Larger images are refused before Pillow decodes them (a small PNG can declare an enormous canvas).
MAX_IMAGE_PIXELS = 4096 * 4096


def encode_png(pixels: np.ndarray) -> bytes:
    """PNG bytes of a 2-D image: uint8 as is, or floats in [0, 1] scaled to 0..255 (rounded)."""
    from PIL import Image as PILImage

    pixels = np.asarray(pixels)
    if pixels.ndim != 2:
        raise ValueError(f"expected a 2-D (height, width) image, got shape {pixels.shape}")
    if pixels.dtype != np.uint8:
        if pixels.min() < 0 or pixels.max() > 1:
            raise ValueError(f"expected uint8 pixels or floats in [0, 1], got {pixels.dtype} in "
                             f"[{pixels.min()}, {pixels.max()}]")  # fmt: skip
        pixels = np.rint(pixels * 255).astype(np.uint8)
    buffer = io.BytesIO()
    PILImage.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def describe_bytes(blob: bytes) -> str:
    return f"{len(blob)} bytes starting {blob[:16]!r}"


def decode_image(blob: bytes, mode: str = "L") -> np.ndarray:
    """The pixels of an image file's bytes in Pillow `mode` ("L": (H, W) uint8 grayscale; "RGB": (H, W, 3)).

    Raises InvalidInput, naming what came, when Pillow cannot read the bytes or the image is too large.
    """
    from PIL import Image as PILImage
    from PIL import UnidentifiedImageError

    expected = f"expected the bytes of an image file (PNG, JPEG, ...), got {describe_bytes(blob)}"
    try:
        image = PILImage.open(io.BytesIO(blob))  # reads the header only
        too_large = image.width * image.height > MAX_IMAGE_PIXELS
        if not too_large:
            image.load()
    except UnidentifiedImageError:
        raise InvalidInput(f"{expected}: Pillow cannot identify an image in them") from None
    except Exception as error:  # Pillow fails on corrupt bytes in many ways (mostly OSError): all the sender's
        raise InvalidInput(f"{expected}: {error}") from None
    if too_large:
        raise InvalidInput(f"the image is {image.width}x{image.height} pixels; the pipeline takes at most "
                           f"{MAX_IMAGE_PIXELS}")  # fmt: skip
    return np.asarray(image.convert(mode))


def ink_box(pixels: np.ndarray, threshold: int = 1) -> BoundingBox | None:
    """The smallest box around every pixel >= `threshold` of a 2-D image (bright ink on dark); None if there is none."""
    ink = np.asarray(pixels) >= threshold
    rows, cols = np.flatnonzero(ink.any(axis=1)), np.flatnonzero(ink.any(axis=0))
    if rows.size == 0:
        return None
    return BoundingBox(x_min=float(cols[0]), y_min=float(rows[0]), x_max=float(cols[-1] + 1), y_max=float(rows[-1] + 1))


# --------------------------------------------------------------------------------------------------
# Models


class VisionModel(ABC):
    """A model the pipeline can serve: decoded pixels in, an ImageResult out.

    Raise InvalidInput for an image the model cannot take (the client gets INVALID_ARGUMENT with the message);
    any other exception is a bug and reaches the client as INTERNAL. `process` runs in a worker thread, possibly
    several at once: keep it thread-safe.
    """

    name: ClassVar[str] = "model"  # reported in ProcessResponse.model
    image_mode: ClassVar[str] = "L"  # the Pillow mode images are decoded to before `process`

    @abstractmethod
    def process(self, pixels: np.ndarray) -> ImageResult:
        """Pixels as decoded in `image_mode` ((H, W) uint8 for "L") -> the result; leave `id` unset."""


class MockModel(VisionModel):
    """No weights, instant, deterministic: "bright" against "dark" by mean brightness, boxed around non-black pixels.

    For testing the types and the wire without a real model.
    """

    name = "mock"

    def process(self, pixels: np.ndarray) -> ImageResult:
        bright = float(pixels.mean()) / 255.0
        scores = sorted([ClassScore(label="bright", score=bright), ClassScore(label="dark", score=1.0 - bright)],
                        key=lambda s: -s.score)  # fmt: skip
        detection = Detection(box=ink_box(pixels), label=scores[0].label, scores=scores)
        height, width = pixels.shape[:2]
        return ImageResult(width=width, height=height, detections=[detection])


class DigitsCnnModel(VisionModel):
    """The course's digits CNN (zoo "digits_cnn") in ONNX Runtime, on 8x8 grayscale digits (bright ink on black).

    Pixels are scaled 0..255 -> 0..1, the range the CNN was trained on. One detection per image: the softmax
    score of every digit, best first, and the box around the pixels at least `ink_threshold` bright.
    """

    name = "digits_cnn"
    labels = tuple(str(digit) for digit in range(data.N_CLASSES))

    def __init__(self, path: Path | str | None = None, ink_threshold: int = 64) -> None:
        from ortserve import zoo
        from ortserve.server.runtime import SessionSettings, load_session

        # One intra-op thread: the CNN is tiny, and concurrent calls each get their own thread.
        self.session = load_session(Path(path or zoo.ensure("digits_cnn")), SessionSettings(intra_op_threads=1))
        self.ink_threshold = ink_threshold

    def process(self, pixels: np.ndarray) -> ImageResult:
        from scipy.special import softmax

        side = data.IMAGE_SIDE
        if pixels.shape != (side, side):
            raise InvalidInput(f"expected an {side}x{side} grayscale digit, got an image of "
                               f"{pixels.shape[1]}x{pixels.shape[0]} pixels")  # fmt: skip
        x = (pixels.astype(np.float32) / 255.0).reshape(1, 1, side, side)
        logits = self.session.run(["logits"], {"input": x})[0][0]
        probabilities = softmax(logits.astype(np.float64))
        order = np.argsort(-probabilities, kind="stable")
        scores = [ClassScore(label=self.labels[i], score=float(probabilities[i])) for i in order]
        detection = Detection(box=ink_box(pixels, self.ink_threshold), label=scores[0].label, scores=scores)
        return ImageResult(width=side, height=side, detections=[detection])


def process_request(model: VisionModel, request: ProcessRequest) -> ProcessResponse:
    """Decode each image, run `model` on it, answer one result per image in order, each with its image's id."""
    results = []
    for index, image in enumerate(request.images):
        try:
            result = model.process(decode_image(image.data, model.image_mode))
        except InvalidInput as error:
            named = f" (id {image.id!r})" if image.id is not None else ""
            raise InvalidInput(f"image {index}{named}: {error.message}") from None
        if not isinstance(result, ImageResult):
            raise TypeError(f"{type(model).__name__}.process returned {type(result).__name__}, not ImageResult")
        results.append(result.model_copy(update={"id": image.id}))
    return ProcessResponse(model=model.name, results=results)


# --------------------------------------------------------------------------------------------------
# The gRPC service


class PipelineServicer(pb_grpc.PipelineServicer):
    """Translation only: message -> validated ProcessRequest -> process_request (in a thread) -> message."""

    def __init__(self, model: VisionModel) -> None:
        self.model = model

    @grpc_errors
    async def Process(self, request, context):
        try:
            parsed = from_message(request, ProcessRequest)
        except ValidationError as error:
            raise InvalidInput(f"invalid ProcessRequest: {validation_summary(error)}") from None
        return to_message(await asyncio.to_thread(process_request, self.model, parsed))


PIPELINE_SERVICE = pb.DESCRIPTOR.services_by_name["Pipeline"].full_name


class PipelineServer:
    """A grpc.aio server of the Pipeline service (and grpc.health.v1) around one VisionModel.

    A server of its own rather than a service of InferenceServer: that one serves a repository of ONNX files,
    this one serves any Python object with a `process` method (one defined in a notebook, say). It has
    InferenceServer's start/stop/address/port, so ortserve.server.app.BackgroundServer runs it on a background
    event loop: `with BackgroundServer(server=PipelineServer(model)) as server: ... server.address`.
    """

    def __init__(self, model: VisionModel, address: str = "127.0.0.1", port: int = 0,
                 max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
                 grace_period: float = DEFAULT_GRACE_PERIOD) -> None:  # fmt: skip
        self.model = model
        self.host = address
        self.requested_port = port
        self.max_message_bytes = max_message_bytes
        self.grace_period = grace_period
        self.health = health_aio.HealthServicer()
        self.port: int | None = None
        self._server: grpc.aio.Server | None = None

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    async def start(self) -> int:
        """Bind, start, mark SERVING; returns the bound port (a free one when `port` was 0)."""
        # so_reuseport 0: a second server must not bind the same port and silently share its traffic.
        server = grpc.aio.server(options=[*channel_options(self.max_message_bytes), ("grpc.so_reuseport", 0)])
        pb_grpc.add_PipelineServicer_to_server(PipelineServicer(self.model), server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        self.port = server.add_insecure_port(f"{self.host}:{self.requested_port}")
        await server.start()
        self._server = server
        for service in ("", PIPELINE_SERVICE):
            await self.health.set(service, health_pb2.HealthCheckResponse.SERVING)
        return self.port

    async def stop(self, grace: float | None = None) -> None:
        """Health turns NOT_SERVING, calls in flight get `grace` seconds (default grace_period), then it stops."""
        if self._server is None:
            return
        await self.health.enter_graceful_shutdown()
        await self._server.stop(self.grace_period if grace is None else grace)
