"""What the server tests serve and send: small ONNX models built with onnx.helper in milliseconds, digits inputs."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

OPSET = 18
# onnx 1.23 writes IR version 14 by default, newer than onnxruntime 1.31 reads.
IR_VERSION = 10

# v2 datatype -> (onnx element type, numpy dtype) for the echo models.
ECHO_TYPES = {
    "BOOL": (TensorProto.BOOL, np.bool_),
    "UINT8": (TensorProto.UINT8, np.uint8),
    "UINT16": (TensorProto.UINT16, np.uint16),
    "UINT32": (TensorProto.UINT32, np.uint32),
    "UINT64": (TensorProto.UINT64, np.uint64),
    "INT8": (TensorProto.INT8, np.int8),
    "INT16": (TensorProto.INT16, np.int16),
    "INT32": (TensorProto.INT32, np.int32),
    "INT64": (TensorProto.INT64, np.int64),
    "FP16": (TensorProto.FLOAT16, np.float16),
    "FP32": (TensorProto.FLOAT, np.float32),
    "FP64": (TensorProto.DOUBLE, np.float64),
    "BYTES": (TensorProto.STRING, object),
}


def _model(nodes, inputs, outputs, initializers=(), opset: int = OPSET) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "test", inputs, outputs, initializer=list(initializers))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=IR_VERSION)
    onnx.checker.check_model(model)
    return model


def echo(datatype: str) -> onnx.ModelProto:
    """y = x for one datatype, shape (-1, 3)."""
    elem = ECHO_TYPES[datatype][0]
    return _model(
        [helper.make_node("Identity", ["x"], ["y"])],
        [helper.make_tensor_value_info("x", elem, [None, 3])],
        [helper.make_tensor_value_info("y", elem, [None, 3])],
    )


def add_sub() -> onnx.ModelProto:
    """Two FP32 inputs a, b (-1, 4); outputs sum = a + b and difference = a - b."""
    shape = ["batch", 4]
    return _model(
        [helper.make_node("Add", ["a", "b"], ["sum"]), helper.make_node("Sub", ["a", "b"], ["difference"])],
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, shape) for n in ("a", "b")],
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, shape) for n in ("sum", "difference")],
    )


def shout() -> onnx.ModelProto:
    """Strings in; out the same strings with "!" appended (StringConcat, opset 20), plus an unchanged copy."""
    suffix = numpy_helper.from_array(np.array(["!"], dtype=object), "suffix")
    return _model(
        [
            helper.make_node("StringConcat", ["text", "suffix"], ["shout"]),
            helper.make_node("Identity", ["text"], ["same"]),
        ],
        [helper.make_tensor_value_info("text", TensorProto.STRING, [None])],
        [
            helper.make_tensor_value_info("shout", TensorProto.STRING, [None]),
            helper.make_tensor_value_info("same", TensorProto.STRING, [None]),
        ],
        [suffix],
        opset=20,
    )


def broken() -> onnx.ModelProto:
    """Loads fine, fails at run time: reshapes any x (-1) to (7, 3), impossible unless x has 21 elements."""
    target = numpy_helper.from_array(np.array([7, 3], dtype=np.int64), "target")
    return _model(
        [helper.make_node("Reshape", ["x", "target"], ["y"])],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [7, 3])],
        [target],
    )


def plus_constant(value: float) -> onnx.ModelProto:
    """y = x + value, x FP32 (-1,): one per version of the versioned model, so answers tell versions apart."""
    const = numpy_helper.from_array(np.array([value], dtype=np.float32), "c")
    return _model(
        [helper.make_node("Add", ["x", "c"], ["y"])],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None])],
        [const],
    )


def slow(size: int = 384, layers: int = 24) -> onnx.ModelProto:
    """x (-1, size) FP32 through `layers` MatMuls with one shared weight: a model that takes a while to run."""
    rng = np.random.default_rng(0)
    weight = numpy_helper.from_array((rng.standard_normal((size, size)) / np.sqrt(size)).astype(np.float32), "w")
    nodes, previous = [], "x"
    for i in range(layers):
        out = "y" if i == layers - 1 else f"h{i}"
        nodes.append(helper.make_node("MatMul", [previous, "w"], [out]))
        previous = out
    return _model(
        nodes,
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, size])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, size])],
        [weight],
    )


def save(model: onnx.ModelProto, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, path)
    return path


def copy_version(source: Path, root: Path, name: str, version: int = 1) -> Path:
    """Copy version `version` of model `name` from the repository `source` into the repository `root`."""
    target = root / name / str(version) / "model.onnx"
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(source / name / str(version) / "model.onnx", target)
    return target


def build_repository(root: Path) -> Path:
    """The test repository: echo_<datatype> for every datatype, add_sub, shout, broken, versioned (1, 2, 3)."""
    for datatype in ECHO_TYPES:
        save(echo(datatype), root / f"echo_{datatype.lower()}" / "1" / "model.onnx")
    save(add_sub(), root / "add_sub" / "1" / "model.onnx")
    (root / "add_sub" / "config.json").write_text('{"max_batch_size": 8, "intra_op_threads": 1}')
    save(shout(), root / "shout" / "1" / "model.onnx")
    save(broken(), root / "broken" / "1" / "model.onnx")
    for version in (1, 2, 3):
        save(plus_constant(100.0 * version), root / "versioned" / str(version) / "model.onnx")
    return root


def digits_inputs(name: str, n: int = 16) -> np.ndarray:
    """n random "digits" in [0, 1) the way model `name` takes them: (n, 1, 8, 8) for the CNN, (n, 64) for the trees.

    Random pixels, not the data set: comparing the server with in-process ONNX Runtime needs only inputs of the
    right shape, and this keeps scikit-learn's slow import out of the tests.
    """
    pixels = np.random.default_rng(n).random((n, 64), dtype=np.float32)
    return pixels.reshape(n, 1, 8, 8) if name == "digits_cnn" else pixels


def sample(datatype: str, rows: int = 2) -> np.ndarray:
    """A (rows, 3) array of the datatype with values near its extremes where that is interesting."""
    n = rows * 3
    if datatype == "BYTES":
        words = [b"", b"a", "\u00e9t\u00e9".encode(), b"x" * 300, b"tab\tand\nnewline", b"zz"]
        return np.array((words * n)[:n], dtype=object).reshape(rows, 3)
    dtype = np.dtype(ECHO_TYPES[datatype][1])
    if dtype.kind == "b":
        return (np.arange(n) % 2 == 0).reshape(rows, 3)
    if dtype.kind in "iu":
        info = np.iinfo(dtype)
        values = [info.min, info.max, 0, 1, info.max - 1, info.min + 1]
        return np.array((values * n)[:n], dtype=dtype).reshape(rows, 3)
    return np.array(([-1.5, 0.0, 3.25, 1e-3, 6.5e4, -2.0] * n)[:n], dtype=dtype).reshape(rows, 3)
