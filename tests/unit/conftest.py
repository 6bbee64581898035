"""Fixtures of the unit tests: real ONNX Runtime sessions of tiny models, built with onnx.helper in milliseconds.

The models come from tests/server/server_models.py (put on sys.path here, so `pytest tests/unit` runs on its own)
plus two made here for the batcher: `lookup` (fails on an index out of range, so one request of a batch can be
at fault) and `pair` (a free second axis, so requests of different widths cannot join).
"""

from __future__ import annotations

import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

sys.path.insert(0, str(Path(__file__).parents[1] / "server"))
import server_models  # noqa: E402  (tests/server/server_models.py)

from ortserve.server.runtime import Model, SessionSettings, load_session  # noqa: E402

LOOKUP_TABLE = np.arange(6, dtype=np.float32).reshape(3, 2)


def lookup():
    """idx INT64 (batch,) -> row = LOOKUP_TABLE[idx] (batch, 2), same = idx; an idx outside 0..2 fails the run."""
    return server_models._model(
        [helper.make_node("Gather", ["table", "idx"], ["row"], axis=0), helper.make_node("Identity", ["idx"], ["same"])],
        [helper.make_tensor_value_info("idx", TensorProto.INT64, ["batch"])],
        [helper.make_tensor_value_info("row", TensorProto.FLOAT, ["batch", 2]),
         helper.make_tensor_value_info("same", TensorProto.INT64, ["batch"])],
        [numpy_helper.from_array(LOOKUP_TABLE, "table")],
    )  # fmt: skip


def pair():
    """x FP32 (batch, n) -> double = x + x (batch, n), total = x summed over axis 1 (batch,)."""
    axes = numpy_helper.from_array(np.array([1], dtype=np.int64), "axes")
    return server_models._model(
        [helper.make_node("Add", ["x", "x"], ["double"]),
         helper.make_node("ReduceSum", ["x", "axes"], ["total"], keepdims=0)],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "n"])],
        [helper.make_tensor_value_info("double", TensorProto.FLOAT, ["batch", "n"]),
         helper.make_tensor_value_info("total", TensorProto.FLOAT, ["batch"])],
        [axes],
    )  # fmt: skip


def grand_total():
    """x FP32 (batch, n) -> total = the sum of every element, a scalar: outputs that are not one row per row."""
    return server_models._model(
        [helper.make_node("ReduceSum", ["x"], ["total"], keepdims=0)],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "n"])],
        [helper.make_tensor_value_info("total", TensorProto.FLOAT, [])],
    )


BUILDERS = {
    "add_sub": server_models.add_sub,
    "echo_fp32": lambda: server_models.echo("FP32"),
    "shout": server_models.shout,
    "broken": server_models.broken,
    "lookup": lookup,
    "pair": pair,
    "grand_total": grand_total,
}


@pytest.fixture(scope="session")
def model_files(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("unit_models")
    return {name: server_models.save(build(), root / f"{name}.onnx") for name, build in BUILDERS.items()}


@pytest.fixture(scope="session")
def sessions(model_files) -> dict:
    """One single-threaded ONNX Runtime session per model (sessions are safe to share: run() is thread-safe)."""
    return {name: load_session(path, SessionSettings(intra_op_threads=1)) for name, path in model_files.items()}


@pytest.fixture
def make_model(model_files, sessions):
    """make_model(name, **kwargs): a fresh runtime.Model (its own accepted-signature cache) on the shared session."""

    def make(name: str, **kwargs) -> Model:
        return Model(name, 1, model_files[name], sessions[name], **kwargs)

    return make


@pytest.fixture
def executor():
    with ThreadPoolExecutor(2, thread_name_prefix="unit") as pool:
        yield pool
