"""One ONNX Runtime session per model version: what it takes and gives, checking a request against that, running.

The runtime knows ONNX Runtime and numpy, not gRPC. `Model.infer` is the seam the protocols call:

    outputs = await model.infer({"input": array}, ["logits"])

It first checks the request against the model's metadata (names, dtypes, ranks, fixed dimensions, requested
outputs) and raises InvalidInput on any mismatch, so a bad request never gets further; then it hands the checked
feeds to the model's `runner`. Today the runner calls session.run in a worker thread (ONNX Runtime releases the
GIL, and the event loop never blocks on a run). A dynamic batcher slots in as another runner with the same call
signature -- `await runner(feeds, output_names)` -- that joins requests agreeing on all axes but the first.
"""

from __future__ import annotations

import asyncio
from concurrent.futures import Executor
from dataclasses import dataclass
from pathlib import Path
from typing import Awaitable, Callable, Mapping, Sequence

import numpy as np

from ortserve.server.errors import InvalidInput, ModelRunError, RepositoryError

# ONNX Runtime's tensor type names -> numpy dtypes. Strings are object arrays of str on the ONNX Runtime side.
ORT_DTYPES: dict[str, np.dtype] = {
    f"tensor({name})": np.dtype(dtype)
    for name, dtype in [
        ("bool", "?"), ("uint8", "u1"), ("uint16", "u2"), ("uint32", "u4"), ("uint64", "u8"),
        ("int8", "i1"), ("int16", "i2"), ("int32", "i4"), ("int64", "i8"),
        ("float16", "f2"), ("float", "f4"), ("double", "f8"), ("string", "O"),
    ]
}  # fmt: skip

Feeds = dict[str, np.ndarray]
MAX_REMEMBERED_SIGNATURES = 1024
Runner = Callable[[Feeds, "list[str] | None"], Awaitable[Feeds]]


@dataclass(frozen=True)
class TensorSpec:
    """A model input or output: name, numpy dtype (object for strings) and shape."""

    name: str
    dtype: np.dtype
    # Per axis: a fixed size, a symbol ("batch": any size, but the same wherever the symbol appears) or None
    # (any size). None for the whole shape: the model does not say (any rank).
    shape: tuple[int | str | None, ...] | None

    @property
    def is_string(self) -> bool:
        return self.dtype.kind == "O"

    def describe(self) -> str:
        kind = "string" if self.is_string else str(self.dtype)
        if self.shape is None:
            return f"{kind} of any shape"
        return f"{kind} [{', '.join(str(d) if isinstance(d, int) else '-1' for d in self.shape)}]"


@dataclass(frozen=True)
class SessionSettings:
    """ONNX Runtime thread settings; None leaves ONNX Runtime's default (one intra-op thread per core)."""

    intra_op_threads: int | None = None
    inter_op_threads: int | None = None


def load_session(path: Path, settings: SessionSettings):
    import onnxruntime as ort

    options = ort.SessionOptions()
    # Idle intra-op threads would spin waiting for work, taking cores from the event loop that feeds them.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if settings.intra_op_threads is not None:
        options.intra_op_num_threads = settings.intra_op_threads
    if settings.inter_op_threads is not None:
        options.inter_op_num_threads = settings.inter_op_threads
    try:
        return ort.InferenceSession(str(path), sess_options=options, providers=["CPUExecutionProvider"])
    except Exception as error:
        raise RepositoryError(f"ONNX Runtime cannot load {path}: {error}") from error


def _spec(node_arg, where: str) -> TensorSpec:
    dtype = ORT_DTYPES.get(node_arg.type)
    if dtype is None:
        raise RepositoryError(
            f"{where} {node_arg.name!r} has type {node_arg.type}, which the server cannot carry; "
            f"supported: {', '.join(ORT_DTYPES)}"
        )
    shape = node_arg.shape
    if shape is None:
        return TensorSpec(node_arg.name, dtype, None)
    dims = tuple(d if (isinstance(d, int) and d >= 0) or (isinstance(d, str) and d) else None for d in shape)
    return TensorSpec(node_arg.name, dtype, dims)


class Model:
    """One version of one model: its session, metadata and config. Safe to call concurrently."""

    def __init__(self, name: str, version: int, path: Path, session, config=None, runner: Runner | None = None,
                 executor: Executor | None = None) -> None:  # fmt: skip
        self.name = name
        self.version = version
        self.path = path
        self.config = config  # the repository's ModelConfig (batching settings live there)
        self.session = session
        where = f"model {name!r} version {version}:"
        self.inputs: dict[str, TensorSpec] = {a.name: _spec(a, f"{where} input") for a in session.get_inputs()}
        self.outputs: dict[str, TensorSpec] = {a.name: _spec(a, f"{where} output") for a in session.get_outputs()}
        self.runner: Runner = runner or SessionRunner(session, executor, self.label)
        self._accepted: set[tuple] = set()  # input signatures that passed check_inputs
        self._cacheable = not any(s.is_string for s in self.inputs.values())  # strings are converted, not just checked

    @property
    def label(self) -> str:
        return f"model {self.name!r} version {self.version}"

    async def infer(self, inputs: Mapping[str, np.ndarray], outputs: Sequence[str] | None = None) -> Feeds:
        """Check the request, then run it; the answer holds the requested outputs (all when None) by name."""
        feeds = self.check_inputs(inputs)
        output_names = self.check_outputs(outputs)
        return await self.runner(feeds, output_names)

    def check_inputs(self, inputs: Mapping[str, np.ndarray]) -> Feeds:
        """The inputs as ONNX Runtime wants them, or InvalidInput saying what was expected and what came."""
        # Whether a request passes depends only on its names, dtypes and shapes: remember the ones that passed,
        # so that a server seeing the same kind of request again and again checks it with one lookup.
        signature = _signature(inputs) if self._cacheable else None
        if signature is not None and signature in self._accepted:
            return dict(inputs)
        feeds = self._check_all(inputs)
        if signature is not None and len(self._accepted) < MAX_REMEMBERED_SIGNATURES:
            self._accepted.add(signature)
        return feeds

    def _check_all(self, inputs: Mapping[str, np.ndarray]) -> Feeds:
        expected = self.inputs
        missing = [n for n in expected if n not in inputs]
        extra = [n for n in inputs if n not in expected]
        if missing or extra:
            parts = []
            if missing:
                parts.append(f"missing {', '.join(map(repr, missing))}")
            if extra:
                parts.append(f"unknown {', '.join(map(repr, extra))}")
            wanted = ", ".join(f"{s.name!r} ({s.describe()})" for s in expected.values())
            raise InvalidInput(f"{self.label} takes inputs {wanted}; {'; '.join(parts)}")
        feeds = {}
        symbols: dict[str, tuple[int, str]] = {}  # dimension symbol -> (size, first input that set it)
        for name, spec in expected.items():
            feeds[name] = self._check_tensor(spec, np.asarray(inputs[name]), symbols)
        return feeds

    def _check_tensor(self, spec: TensorSpec, array: np.ndarray, symbols: dict[str, tuple[int, str]]) -> np.ndarray:
        # `what` is built only for an error message: on the hot path its formatting would cost more than the checks.
        def what() -> str:
            return f"{self.label} input {spec.name!r} ({spec.describe()})"

        if spec.is_string:
            if array.dtype.kind not in "OSU":
                raise InvalidInput(f"{what()}: expected strings, got {array.dtype}")
            array = _as_str_array(array, what())
        elif array.dtype != spec.dtype:
            got = "strings" if array.dtype.kind in "OSU" else str(array.dtype)
            raise InvalidInput(f"{what()}: expected dtype {spec.dtype}, got {got}")
        if spec.shape is not None:
            if array.ndim != len(spec.shape):
                raise InvalidInput(f"{what()}: expected rank {len(spec.shape)}, got shape {list(array.shape)}")
            for axis, (want, got) in enumerate(zip(spec.shape, array.shape)):
                if want is None or want == got:
                    continue
                if isinstance(want, int):
                    raise InvalidInput(
                        f"{what()}: expected dimension {axis} to be {want}, got shape {list(array.shape)}"
                    )
                size, first = symbols.setdefault(want, (got, spec.name))
                if size != got:
                    raise InvalidInput(
                        f"{what()}: dimension {axis} ({want!r}) is {got}, but input {first!r} has {size} "
                        f"for {want!r}; they must agree"
                    )
        return array

    def check_outputs(self, outputs: Sequence[str] | None) -> list[str] | None:
        if not outputs:
            return None
        unknown = [n for n in outputs if n not in self.outputs]
        if unknown:
            raise InvalidInput(
                f"{self.label} has outputs {', '.join(map(repr, self.outputs))}; "
                f"no output {', '.join(map(repr, unknown))}"
            )
        return list(dict.fromkeys(outputs))  # drop repeats, keep order


def _signature(inputs: Mapping[str, np.ndarray]) -> tuple | None:
    try:
        return tuple((name, array.dtype, array.shape) for name, array in inputs.items())
    except AttributeError:  # not numpy arrays: check them the long way
        return None


def _as_str_array(array: np.ndarray, what: str) -> np.ndarray:
    """Object array of str, which is what ONNX Runtime takes for string tensors (it would print bytes as b'...')."""
    if array.dtype.kind == "U":
        return array.astype(object)
    out = np.empty(array.shape, dtype=object)
    flat_in, flat_out = array.reshape(-1), out.reshape(-1)
    for i, item in enumerate(flat_in):
        if isinstance(item, (bytes, np.bytes_)):
            try:
                item = item.decode("utf-8")
            except UnicodeDecodeError as error:
                raise InvalidInput(f"{what}: element {i} is not UTF-8 text ({error})") from None
        elif not isinstance(item, str):
            raise InvalidInput(f"{what}: element {i} is a {type(item).__name__}, expected text")
        flat_out[i] = item
    return out


class SessionRunner:
    """Run one request on the session in a worker thread: the runner used when no batching is configured."""

    def __init__(self, session, executor: Executor | None, label: str) -> None:
        self.session = session
        self.executor = executor
        self.label = label
        self.all_outputs = [o.name for o in session.get_outputs()]

    async def __call__(self, feeds: Feeds, output_names: list[str] | None) -> Feeds:
        loop = asyncio.get_running_loop()
        names = output_names or self.all_outputs
        return await loop.run_in_executor(self.executor, run_session, self.session, feeds, names, self.label)


def run_session(session, feeds: Feeds, names: list[str], label: str) -> Feeds:
    """session.run with ONNX Runtime's failures turned into our errors (keeping its message)."""
    from onnxruntime.capi.onnxruntime_pybind11_state import InvalidArgument

    try:
        values = session.run(names, feeds)
    except InvalidArgument as error:  # an input ONNX Runtime refuses that our checks let through
        raise InvalidInput(f"{label}: {error}") from None
    except Exception as error:
        raise ModelRunError(f"{label} failed while running: {error}") from None
    return dict(zip(names, values))
