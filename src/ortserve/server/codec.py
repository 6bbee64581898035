"""numpy <-> Open Inference Protocol tensors: the datatype table and the encode/decode code, shared by the
v2 servicer (ortserve.server.v2) and the clients (ortserve.client), so both sides read and write tensors alike.

Raw contents (`raw_input_contents` / `raw_output_contents`) are the fast path: numeric tensors are their
row-major little-endian bytes, decoded zero-copy with np.frombuffer and encoded with one .tobytes(). BYTES
tensors are, per element, a little-endian uint32 length followed by the bytes. Typed contents
(InferTensorContents) are decoded too; FP16 has no typed field and travels raw only.

BYTES tensors come out as numpy object arrays of `bytes`, like tritonclient's. Errors in what a peer sent raise
InvalidInput (a ValueError).
"""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np

from ortserve._proto import grpc_service_pb2 as pb
from ortserve.server.errors import InvalidInput


@dataclass(frozen=True)
class Datatype:
    name: str  # the protocol's name, e.g. "FP32"
    dtype: np.dtype  # little-endian numpy dtype; object for BYTES
    contents_field: str | None  # the InferTensorContents field that carries it; None: raw only


def _table(*rows: tuple[str, str, str | None]) -> dict[str, Datatype]:
    return {name: Datatype(name, np.dtype(dtype), field) for name, dtype, field in rows}


# The one datatype table of the package.
DATATYPES: dict[str, Datatype] = _table(
    ("BOOL", "?", "bool_contents"),
    ("UINT8", "<u1", "uint_contents"),
    ("UINT16", "<u2", "uint_contents"),
    ("UINT32", "<u4", "uint_contents"),
    ("UINT64", "<u8", "uint64_contents"),
    ("INT8", "<i1", "int_contents"),
    ("INT16", "<i2", "int_contents"),
    ("INT32", "<i4", "int_contents"),
    ("INT64", "<i8", "int64_contents"),
    ("FP16", "<f2", None),
    ("FP32", "<f4", "fp32_contents"),
    ("FP64", "<f8", "fp64_contents"),
    ("BYTES", "O", "bytes_contents"),
)
_BY_KIND: dict[tuple[str, int], Datatype] = {
    (t.dtype.kind, t.dtype.itemsize): t for t in DATATYPES.values() if t.name != "BYTES"
}
_LENGTH = struct.Struct("<I")
# Native numeric dtypes -> datatype name: the lookup on every encoded tensor.
_NAME_OF: dict[np.dtype, str] = {t.dtype.newbyteorder("="): t.name for t in DATATYPES.values() if t.name != "BYTES"}


def datatype_of(dtype: np.dtype) -> str:
    """The protocol datatype of a numpy dtype; str/bytes/object arrays are BYTES."""
    known = _NAME_OF.get(dtype)
    if known is not None:
        return known
    dtype = np.dtype(dtype)
    if dtype.kind in "OSU":
        return "BYTES"
    found = _BY_KIND.get((dtype.kind, dtype.itemsize))
    if found is None:
        raise InvalidInput(f"numpy dtype {dtype} has no Open Inference Protocol datatype; "
                           f"supported: {', '.join(DATATYPES)}")
    return found.name


def lookup(datatype: str) -> Datatype:
    try:
        return DATATYPES[datatype]
    except KeyError:
        raise InvalidInput(f"unknown datatype {datatype!r}; expected one of {', '.join(DATATYPES)}") from None


# --------------------------------------------------------------------------------------------------
# Single tensors


def element_count(shape: Sequence[int], what: str) -> int:
    if any(d < 0 for d in shape):
        raise InvalidInput(f"{what}: shape {list(shape)} has a negative dimension")
    return math.prod(shape)


def from_raw(datatype: str, shape: Sequence[int], raw: bytes, what: str) -> np.ndarray:
    """A tensor from its raw bytes. Numeric tensors are a read-only view on `raw` (no copy)."""
    kind = lookup(datatype)
    count = element_count(shape, what)
    if kind.name == "BYTES":
        return deserialize_bytes(raw, count, what).reshape(shape)
    expected = count * kind.dtype.itemsize
    if len(raw) != expected:
        raise InvalidInput(
            f"{what}: {datatype} shape {list(shape)} needs {expected} bytes of raw contents "
            f"({count} elements x {kind.dtype.itemsize}), got {len(raw)}"
        )
    return np.frombuffer(raw, dtype=kind.dtype).reshape(shape)


def from_contents(datatype: str, shape: Sequence[int], contents: pb.InferTensorContents, what: str) -> np.ndarray:
    """A tensor from typed contents; only the field of its datatype may be filled."""
    kind = lookup(datatype)
    count = element_count(shape, what)
    if kind.contents_field is None:
        raise InvalidInput(f"{what}: {datatype} has no typed contents field; send it in raw_input_contents")
    filled = [field.name for field, _ in contents.ListFields()]
    stray = [name for name in filled if name != kind.contents_field]
    if stray:
        raise InvalidInput(f"{what}: {datatype} data belongs in contents.{kind.contents_field}, got {', '.join(stray)}")
    values = getattr(contents, kind.contents_field)
    if len(values) != count:
        raise InvalidInput(
            f"{what}: {datatype} shape {list(shape)} needs {count} elements in contents.{kind.contents_field}, "
            f"got {len(values)}"
        )
    if kind.name == "BYTES":
        array = np.empty(count, dtype=object)
        array[:] = list(values)
        return array.reshape(shape)
    try:
        return np.array(values, dtype=kind.dtype).reshape(shape)
    except OverflowError as error:  # e.g. 300 in int_contents for INT8
        field = kind.contents_field
        raise InvalidInput(f"{what}: a value in contents.{field} does not fit {datatype}: {error}") from None


def to_raw(array: np.ndarray) -> tuple[str, list[int], bytes]:
    """(datatype, shape, raw bytes) of a numpy array."""
    datatype = datatype_of(array.dtype)
    if datatype == "BYTES":
        return datatype, list(array.shape), serialize_bytes(array)
    # astype to the table's little-endian dtype is a no-op (no copy) on little-endian machines.
    dtype = DATATYPES[datatype].dtype
    return datatype, list(array.shape), np.ascontiguousarray(array, dtype=dtype).tobytes()


def serialize_bytes(array: np.ndarray) -> bytes:
    """BYTES wire format: per element, row-major, a little-endian uint32 length then the bytes (str as UTF-8)."""
    parts = []
    for item in np.asarray(array).reshape(-1):
        if isinstance(item, str):
            item = item.encode("utf-8")
        elif not isinstance(item, (bytes, bytearray)):
            item = str(item).encode("utf-8")
        parts.append(_LENGTH.pack(len(item)))
        parts.append(bytes(item))
    return b"".join(parts)


def deserialize_bytes(raw: bytes, count: int, what: str) -> np.ndarray:
    """`count` BYTES elements from the wire format, as a 1-D object array of bytes."""
    items = np.empty(count, dtype=object)
    view = memoryview(raw)
    offset = 0
    for i in range(count):
        if offset + 4 > len(view):
            raise InvalidInput(
                f"{what}: BYTES contents end after {i} of {count} elements (each is a 4-byte little-endian "
                f"length then the bytes; {len(raw)} bytes in all)"
            )
        (length,) = _LENGTH.unpack_from(view, offset)
        offset += 4
        if offset + length > len(view):
            raise InvalidInput(
                f"{what}: BYTES element {i} declares {length} bytes but only {len(view) - offset} remain"
            )
        items[i] = bytes(view[offset : offset + length])
        offset += length
    if offset != len(view):
        raise InvalidInput(f"{what}: {len(view) - offset} bytes left over after {count} BYTES elements")
    return items


# --------------------------------------------------------------------------------------------------
# Whole messages


def decode_request_inputs(request: pb.ModelInferRequest) -> dict[str, np.ndarray]:
    """The input tensors of a ModelInferRequest, by name (server side)."""
    raw_contents = request.raw_input_contents
    use_raw = len(raw_contents) > 0
    if use_raw and len(raw_contents) != len(request.inputs):
        raise InvalidInput(
            f"raw_input_contents has {len(raw_contents)} entries for {len(request.inputs)} inputs; "
            "send one per input, in the order of `inputs`"
        )
    arrays: dict[str, np.ndarray] = {}
    for i, tensor in enumerate(request.inputs):
        name = tensor.name
        if name in arrays:
            raise InvalidInput(f"input {name!r} is given twice")
        if use_raw:
            if tensor.HasField("contents"):
                raise InvalidInput(f"input {name!r} has typed contents but the request also has raw_input_contents; "
                                   "use one")  # fmt: skip
            arrays[name] = from_raw(tensor.datatype, tensor.shape, raw_contents[i], f"input {name!r}")
        elif tensor.HasField("contents"):
            arrays[name] = from_contents(tensor.datatype, tensor.shape, tensor.contents, f"input {name!r}")
        else:
            raise InvalidInput(f"input {name!r} has no data: fill its contents or the request's raw_input_contents")
    return arrays


def encode_request_inputs(request: pb.ModelInferRequest, inputs: Mapping[str, np.ndarray]) -> None:
    """Add `inputs` to a ModelInferRequest as raw contents (client side)."""
    for name, array in inputs.items():
        datatype, shape, raw = to_raw(np.asarray(array))
        request.inputs.add(name=name, datatype=datatype, shape=shape)
        request.raw_input_contents.append(raw)


def encode_response_outputs(response: pb.ModelInferResponse, outputs: Mapping[str, np.ndarray]) -> None:
    """Add `outputs` to a ModelInferResponse as raw contents (server side)."""
    for name, array in outputs.items():
        datatype, shape, raw = to_raw(array)
        response.outputs.add(name=name, datatype=datatype, shape=shape)
        response.raw_output_contents.append(raw)


def decode_response_outputs(response: pb.ModelInferResponse) -> dict[str, np.ndarray]:
    """The output tensors of a ModelInferResponse, raw or typed, by name (client side)."""
    raw_contents = response.raw_output_contents
    arrays = {}
    for i, tensor in enumerate(response.outputs):
        what = f"output {tensor.name!r}"
        if i < len(raw_contents):
            arrays[tensor.name] = from_raw(tensor.datatype, tensor.shape, raw_contents[i], what)
        else:
            arrays[tensor.name] = from_contents(tensor.datatype, tensor.shape, tensor.contents, what)
    return arrays
