"""numpy <-> Open Inference Protocol tensors: the datatype table and the encode/decode code, shared by the
v2 servicer (ortserve.server.v2) and the clients (ortserve.client), so both sides read and write tensors alike.

Raw contents (`raw_input_contents` / `raw_output_contents`) are the fast path: numeric tensors are their
row-major little-endian bytes, decoded zero-copy with np.frombuffer and encoded with one .tobytes(). BYTES
tensors are, per element, a little-endian uint32 length followed by the bytes. Typed contents
(InferTensorContents) are decoded too; FP16 has no typed field and travels raw only.

BYTES tensors come out as numpy object arrays of `bytes`, like tritonclient's. Errors in what a peer sent raise
InvalidInput (a ValueError).

The REST form of the protocol (ortserve.server.rest) has its tensors here too, at the end: JSON tensors, whose
elements are checked strictly against the datatype (no float taken for an integer, no number for a boolean, no
value that does not fit), and the binary tensor data extension, whose bytes are the raw contents above.
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass
from typing import Callable, Mapping, Sequence

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


# Triton's model configuration names the datatypes TYPE_<name>, and BYTES TYPE_STRING.
_CONFIG_PREFIX = "TYPE_"
_CONFIG_STRING = "STRING"


def config_datatype(datatype: str) -> str:
    """The model configuration's name of a protocol datatype: FP32 -> TYPE_FP32, BYTES -> TYPE_STRING."""
    return _CONFIG_PREFIX + (_CONFIG_STRING if datatype == "BYTES" else datatype)


def protocol_datatype(name: str) -> str:
    """The protocol datatype of a model configuration's name, which may also be given without TYPE_ or as the
    protocol's own (TYPE_STRING, STRING and BYTES -> BYTES); the name unchanged when it is neither."""
    bare = name.removeprefix(_CONFIG_PREFIX)
    return "BYTES" if bare == _CONFIG_STRING else bare


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
    kind = DATATYPES.get(datatype) or lookup(datatype)
    if kind.name != "BYTES" and min(shape, default=0) >= 0:
        # On every request's path: numpy checks the sizes itself, and the message is built only when they disagree
        # (a negative dimension is refused first: reshape would read -1 as "whatever fits").
        try:
            return np.frombuffer(raw, dtype=kind.dtype).reshape(shape)
        except ValueError:
            pass
    count = element_count(shape, what)
    if kind.name == "BYTES":
        return deserialize_bytes(raw, count, what).reshape(shape)
    expected = count * kind.dtype.itemsize
    raise InvalidInput(
        f"{what}: {datatype} shape {list(shape)} needs {expected} bytes of raw contents "
        f"({count} elements x {kind.dtype.itemsize}), got {len(raw)}"
    )


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


# --------------------------------------------------------------------------------------------------
# The REST form: JSON tensors and the binary tensor data extension (ortserve.server.rest)
#
# A JSON tensor is {"name", "shape", "datatype", "data"}: "data" holds the elements row-major, flat or nested as
# the shape; numbers for the numeric datatypes (FP16 too), true/false for BOOL, strings for BYTES. With the binary
# data extension a tensor has parameters {"binary_data_size": N} instead of "data", and its raw bytes (as in
# raw_input_contents) follow the JSON header in the body, in the order of the tensors.

_JSON_TYPES = {dict: "an object", list: "an array", str: "a string", bool: "true/false", int: "a number",
               float: "a number", type(None): "null"}  # fmt: skip
_EXPECTED = {str: "a string", list: "an array", dict: "an object", int: "an integer", bool: "true or false"}
# Python types json.loads gives that each datatype accepts (bool is not an int here, nor an int a bool).
_JSON_ELEMENT_TYPES: dict[str, set[type]] = {"b": {bool}, "i": {int}, "u": {int}, "f": {int, float}, "O": {str}}


def json_type(value: object) -> str:
    """The JSON name of a parsed JSON value ("an object", "a string", ...), for messages."""
    return _JSON_TYPES.get(type(value), type(value).__name__)


def json_field(obj: Mapping, key: str, kind: type, what: str, required: bool = True):
    """obj[key] if it is of `kind` (None when absent and not required), else InvalidInput naming both types."""
    value = obj.get(key)
    if value is None:
        if required:
            raise InvalidInput(f"{what} has no {key!r}; expected {_EXPECTED[kind]}")
        return None
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise InvalidInput(f"{what}: {key!r} must be {_EXPECTED[kind]}, got {json_type(value)}: {_excerpt(value)}")
    return value


def json_shape(tensor: Mapping, what: str) -> list[int]:
    shape = json_field(tensor, "shape", list, what)
    if not all(type(d) is int for d in shape):
        raise InvalidInput(f"{what}: 'shape' must be an array of integers, got {_excerpt(shape)}")
    return shape


def from_json(datatype: str, shape: Sequence[int], data: object, what: str) -> np.ndarray:
    """A tensor from the "data" of a JSON tensor, checked against its datatype and shape."""
    kind = lookup(datatype)
    count = element_count(shape, what)
    if not isinstance(data, list):
        raise InvalidInput(f"{what}: 'data' must be an array of values, flat or nested as the shape, "
                           f"got {json_type(data)}")  # fmt: skip
    flat: Sequence = data
    if data and type(data[0]) is list:  # nested: numpy finds the nesting (ragged rows stay lists, caught below)
        nested = np.array(data, dtype=object)
        flat = nested.reshape(-1)
        if any(type(v) is list for v in flat):
            raise InvalidInput(f"{what}: 'data' is nested unevenly; send it flat or nested as the shape {list(shape)}")
        if nested.shape != tuple(shape):
            raise InvalidInput(f"{what}: 'data' is nested as {list(nested.shape)}, which is not the shape "
                               f"{list(shape)}; send it flat or nested as the shape")  # fmt: skip
    if len(flat) != count:
        raise InvalidInput(f"{what}: {len(flat)} values for shape {list(shape)} ({count} expected)")
    allowed = _JSON_ELEMENT_TYPES[kind.dtype.kind]
    found = set(map(type, flat))
    if not found <= allowed:
        bad = next(v for v in flat if type(v) not in allowed)
        if isinstance(bad, list):
            raise InvalidInput(f"{what}: 'data' is nested unevenly; send it flat or nested as the shape {list(shape)}")
        wanted = {"b": "true/false", "i": "integers", "u": "integers", "f": "numbers", "O": "strings"}
        raise InvalidInput(f"{what}: {datatype} data must be {wanted[kind.dtype.kind]}, got {_excerpt(bad)}")
    if kind.name == "BYTES":
        array = np.empty(count, dtype=object)
        array[:] = [s.encode("utf-8") for s in flat]  # the bytes the binary form would carry, as gRPC's codec gives
        return array.reshape(shape)
    try:
        with np.errstate(over="ignore"):
            array = np.array(flat, dtype=kind.dtype)
    except OverflowError:
        info = np.iinfo(kind.dtype)
        bad = next(v for v in flat if not info.min <= v <= info.max)
        raise InvalidInput(f"{what}: value {bad} does not fit {datatype} ({info.min} to {info.max})") from None
    if kind.dtype.kind == "f" and kind.dtype.itemsize < 8 and not np.isfinite(array).all():
        source = np.asarray(flat, dtype=np.float64)
        overflow = np.isfinite(source) & ~np.isfinite(array)
        if overflow.any():
            bad = source[overflow][0]
            raise InvalidInput(f"{what}: value {bad:g} does not fit {datatype} (largest {np.finfo(kind.dtype).max:g})")
    return array.reshape(shape)


def to_json(array: np.ndarray, what: str) -> dict:
    """{"datatype", "shape", "data"} of an array, "data" flat row-major; BYTES as UTF-8 strings."""
    datatype = datatype_of(array.dtype)
    flat = np.asarray(array).reshape(-1)
    if datatype == "BYTES":
        data = []
        for item in flat:
            if isinstance(item, (bytes, bytearray, np.bytes_)):
                try:
                    item = bytes(item).decode("utf-8")
                except UnicodeDecodeError:
                    raise InvalidInput(f"{what} holds bytes that are not UTF-8 text, which JSON cannot carry; ask "
                                       "for it as binary data (output parameters {\"binary_data\": true})") from None
            data.append(str(item))
    else:
        data = flat.tolist()
    return {"datatype": datatype, "shape": list(array.shape), "data": data}


def decode_json_inputs(inputs: object, binary: memoryview) -> dict[str, np.ndarray]:
    """The input tensors of a REST request, by name: its "inputs", with `binary` the body after the JSON header."""
    if not isinstance(inputs, list):
        raise InvalidInput(f"'inputs' must be an array of tensors {{\"name\", \"shape\", \"datatype\", \"data\"}}, "
                           f"got {json_type(inputs)}")  # fmt: skip
    arrays: dict[str, np.ndarray] = {}
    offset = 0
    for i, tensor in enumerate(inputs):
        if not isinstance(tensor, dict):
            raise InvalidInput(f"inputs[{i}] must be an object {{\"name\", \"shape\", \"datatype\", \"data\"}}, "
                               f"got {json_type(tensor)}")  # fmt: skip
        name = json_field(tensor, "name", str, f"inputs[{i}]")
        what = f"input {name!r}"
        if name in arrays:
            raise InvalidInput(f"{what} is given twice")
        datatype = json_field(tensor, "datatype", str, what)
        shape = json_shape(tensor, what)
        parameters = json_field(tensor, "parameters", dict, what, required=False) or {}
        if "shared_memory_region" in parameters:
            raise InvalidInput(f"{what}: shared memory is not supported by this server; send the data in the body")
        size, data = parameters.get("binary_data_size"), tensor.get("data")  # null counts as absent
        if size is None:
            if data is None:
                raise InvalidInput(f"{what} has no data: give its 'data', or binary data after the JSON header with "
                                   "parameters {\"binary_data_size\": N}")  # fmt: skip
            arrays[name] = from_json(datatype, shape, data, what)
            continue
        if data is not None:
            raise InvalidInput(f"{what} has both 'data' and parameters.binary_data_size; use one")
        if type(size) is not int or size < 0:
            raise InvalidInput(f"{what}: binary_data_size must be a byte count (an integer >= 0), got {_excerpt(size)}")
        if offset + size > len(binary):
            raise InvalidInput(f"{what}: binary_data_size {size} runs past the end of the body: only "
                               f"{len(binary) - offset} bytes of binary data remain after the tensors before it")
        arrays[name] = from_raw(datatype, shape, binary[offset : offset + size], what)
        offset += size
    if offset != len(binary):
        raise InvalidInput(f"the body carries {len(binary)} bytes of binary data after the JSON header, but the "
                           f"inputs' binary_data_size add up to {offset}")  # fmt: skip
    return arrays


def encode_json_outputs(outputs: Mapping[str, np.ndarray], binary: Callable[[str], bool]) -> tuple[list[dict], bytes]:
    """The "outputs" of a REST answer and the binary data to send after it: the outputs for which binary(name)
    is true carry parameters {"binary_data_size": N} and travel raw, in order; the others as JSON data."""
    tensors = []
    chunks = []
    for name, array in outputs.items():
        if binary(name):
            datatype, shape, raw = to_raw(array)
            tensors.append({"name": name, "datatype": datatype, "shape": shape,
                            "parameters": {"binary_data_size": len(raw)}})  # fmt: skip
            chunks.append(raw)
        else:
            tensors.append({"name": name, **to_json(array, f"output {name!r}")})
    return tensors, b"".join(chunks)


def _excerpt(value: object, limit: int = 60) -> str:
    """A JSON value as JSON text, cut short, for messages."""
    text = json.dumps(value, default=repr)
    return text if len(text) <= limit else text[: limit - 3] + "..."
