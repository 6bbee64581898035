"""One ONNX Runtime session per model version: what it takes and gives, checking a request against that, running.

The runtime knows ONNX Runtime and numpy, not gRPC. `Model.infer` is the seam the protocols call:

    outputs = await model.infer({"input": array}, ["logits"])

It first checks the request against the model's metadata (names, dtypes, ranks, fixed dimensions, requested
outputs) and raises InvalidInput on any mismatch, so a bad request never gets further; then it hands the checked
feeds to the model's `runner`. Today the runner calls session.run in a worker thread (ONNX Runtime releases the
GIL, and the event loop never blocks on a run). A dynamic batcher slots in as another runner with the same call
signature -- `await runner(feeds, output_names)` -- that joins requests agreeing on all axes but the first.

A model may have two sessions on the same file: `session`, on few threads that do not spin, for the runs that
share the cores (batches, overlapping requests), and `lone_session`, on every core with threads that spin within
a run, for a request that finds the model idle: ONNX Runtime's own defaults, so a lone caller of a big model gets
every core, as in-process ONNX Runtime would give it (see LoneSessions for when it is used).

Runners also say how a request went, for metrics and the request log (ortserve.server.observe): given a
`RunTiming`, they fill in how long it waited for a run, how long the run took and how many rows the run held;
and each runner calls its `observe_run(rows, seconds)`, when set, once per session.run.

Strings: a string input takes BYTES (UTF-8 bytes, decoded here; anything else is InvalidInput naming the element)
or str. A model whose graph imports onnxruntime-extensions' operator domain (a tokenizer in the graph, say) gets
that custom-op library registered on its session; other models never load it.
"""

from __future__ import annotations

import asyncio
import os
import time
from concurrent.futures import Executor
from dataclasses import dataclass
from pathlib import Path
from typing import Awaitable, Callable, Mapping, Sequence

import numpy as np

from ortserve.server.errors import DeadlineExceeded, InvalidInput, ModelRunError, RepositoryError

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
RunObserver = Callable[[int, float], None]  # (rows, seconds) of one session.run; called in the worker thread


class RunTiming:
    """How one request went through its runner (filled in by the runner; all zero if it never reached a run).

    Times are seconds on time.monotonic(), the event loop's clock: `queue` from the request reaching the runner
    to its session.run starting, `run` that run's duration, `batch` the rows in that run, `rows` the request's own.
    """

    __slots__ = ("queue", "run", "batch", "rows")

    def __init__(self) -> None:
        self.queue = 0.0
        self.run = 0.0
        self.batch = 0
        self.rows = 0


# await runner(feeds, output_names, timing, deadline): deadline is the time.monotonic() by which the run must start.
Runner = Callable[[Feeds, "list[str] | None", "RunTiming | None", "float | None"], Awaitable[Feeds]]


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

    def dims(self) -> list[int]:
        """The shape as the protocols give it: -1 for a variable axis, [] when the model does not say."""
        return [] if self.shape is None else [d if isinstance(d, int) else -1 for d in self.shape]

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
    # Whether intra-op threads spin between the parallel parts of a run (ONNX Runtime's default) rather than sleep.
    # Off for the sessions whose runs share the cores: a spinning thread takes a core from the event loop. On, they
    # still stop at the end of each run (ONNX Runtime would go on spinning for about 50 ms: measured, 57 ms of CPU
    # after one run of a tiny model), so an idle server burns nothing.
    spinning: bool = False

    def threads(self) -> int:
        """The intra-op threads a run uses (ONNX Runtime's default: one per core)."""
        return self.intra_op_threads or os.cpu_count() or 1


def load_session(path: Path, settings: SessionSettings):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.add_session_config_entry("session.intra_op.allow_spinning", "1" if settings.spinning else "0")
    options.add_session_config_entry("session.force_spinning_stop", "1")
    if settings.intra_op_threads is not None:
        options.intra_op_num_threads = settings.intra_op_threads
    if settings.inter_op_threads is not None:
        options.inter_op_num_threads = settings.inter_op_threads
    custom = imported_domains(path) & EXTENSIONS_DOMAINS
    if custom:  # only models that use them load the custom-op library: the others pay nothing
        options.register_custom_ops_library(extensions_library(path, custom))
    try:
        return ort.InferenceSession(str(path), sess_options=options, providers=["CPUExecutionProvider"])
    except Exception as error:
        raise RepositoryError(f"ONNX Runtime cannot load {path}: {error}") from error


# The operator domains of onnxruntime-extensions (tokenizers, string ops...): not built into ONNX Runtime.
EXTENSIONS_DOMAINS = frozenset({"ai.onnx.contrib", "com.microsoft.extensions"})


def extensions_library(path: Path, domains: set[str]) -> str:
    """The path of onnxruntime-extensions' custom-op library, or RepositoryError if it is not installed."""
    try:
        extensions = import_extensions()
    except ImportError:
        raise RepositoryError(
            f"{path} uses operators of the domain {', '.join(sorted(domains))}, which need onnxruntime-extensions; "
            "install it (pip install onnxruntime-extensions)"
        ) from None
    return extensions.get_library_path()


PROTOBUF_IMPLEMENTATION = "PROTOCOL_BUFFERS_PYTHON_IMPLEMENTATION"


def import_extensions():
    """The onnxruntime_extensions module, imported without its side effect on the environment.

    Importing it sets PROTOCOL_BUFFERS_PYTHON_IMPLEMENTATION=python in os.environ (onnxruntime_extensions.cvt, 0.15):
    too late to change this process's protobuf, but every process started afterwards (a server from a notebook, a
    replica, a test's subprocess) would run pure-Python protobuf, slow and stricter about duplicate descriptors.
    """
    saved = os.environ.get(PROTOBUF_IMPLEMENTATION)
    try:
        import onnxruntime_extensions
    finally:
        if saved is None:
            os.environ.pop(PROTOBUF_IMPLEMENTATION, None)
        else:
            os.environ[PROTOBUF_IMPLEMENTATION] = saved
    return onnxruntime_extensions


def imported_domains(path: Path) -> set[str]:
    """The operator domains a model file imports (ModelProto.opset_import), read without parsing its graph.

    Walks the file's top-level protobuf fields and skips the others by their length, so a 100 MB model costs a
    few reads. A file that is not a model gives what was found before the damage; ONNX Runtime then says why.
    """
    from google.protobuf.message import DecodeError
    from onnx import OperatorSetIdProto

    opset_import = 8  # the field number in onnx.proto
    domains: set[str] = set()
    with open(path, "rb") as file:
        while (key := _read_varint(file)) is not None:
            field, wire_type = key >> 3, key & 7
            if wire_type == 0:
                _read_varint(file)
            elif wire_type in (1, 5):  # fixed 64 or 32 bits
                file.seek(8 if wire_type == 1 else 4, 1)
            elif wire_type == 2:  # length-delimited: a message, string or bytes
                size = _read_varint(file) or 0
                if field != opset_import:
                    file.seek(size, 1)
                    continue
                try:
                    domains.add(OperatorSetIdProto.FromString(file.read(size)).domain)
                except DecodeError:
                    break
            else:
                break
    return domains


def _read_varint(file) -> int | None:
    value = shift = 0
    while byte := file.read(1):
        value |= (byte[0] & 0x7F) << shift
        if byte[0] < 0x80:
            return value
        shift += 7
    return None


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
    """One version of one model: its session(s), metadata and config. Safe to call concurrently.

    `session` runs batches and concurrent requests; `lone_session`, when the server opens one, runs a request
    that finds the model idle, on more threads (see SessionRunner).
    """

    def __init__(self, name: str, version: int, path: Path, session, config=None, runner: Runner | None = None,
                 executor: Executor | None = None, lone_session=None) -> None:  # fmt: skip
        self.name = name
        self.version = version
        self.path = path
        self.config = config  # the repository's ModelConfig (batching settings live there)
        self.session = session
        self.lone_session = lone_session
        where = f"model {name!r} version {version}:"
        self.inputs: dict[str, TensorSpec] = {a.name: _spec(a, f"{where} input") for a in session.get_inputs()}
        self.outputs: dict[str, TensorSpec] = {a.name: _spec(a, f"{where} output") for a in session.get_outputs()}
        self.runner: Runner = runner or SessionRunner(session, executor, self.label, lone_session)
        self.output_labels: dict[str, list[str]] = {}  # output name -> class labels (the repository reads them)
        self._accepted: set[tuple] = set()  # input signatures that passed check_inputs
        self._cacheable = not any(s.is_string for s in self.inputs.values())  # strings are converted, not just checked

    @property
    def label(self) -> str:
        return f"model {self.name!r} version {self.version}"

    @property
    def max_batch_size(self) -> int:
        """The batcher's largest batch; 0: the model is not batched."""
        return getattr(self.runner, "max_batch_size", 0)

    async def infer(self, inputs: Mapping[str, np.ndarray], outputs: Sequence[str] | None = None,
                    timing: RunTiming | None = None, deadline: float | None = None) -> Feeds:  # fmt: skip
        """Check the request, then run it; the answer holds the requested outputs (all when None) by name.

        `timing`, when given, is filled in with the request's queue and run times (see RunTiming). A request still
        waiting for its run at `deadline` (time.monotonic()) is not run: DeadlineExceeded.
        """
        feeds = self.check_inputs(inputs)
        output_names = self.check_outputs(outputs)
        return await self.runner(feeds, output_names, timing, deadline)

    def labels(self, output: str) -> list[str]:
        """The class labels of an output for the classification extension ([] when its config names no file)."""
        return self.output_labels.get(output, [])

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


# A run that finds its model idle moves to the lone session once such runs take this long on average: below it, the
# threads' wake-up costs more than they save (measured on 2 cores: digits_cnn, 0.03 ms a run, answered one caller
# about 0.2 ms slower on two threads; resnet18, 40 ms a run on one thread, 25 ms on two).
LONE_SESSION_MIN_RUN = 0.001  # seconds
_LONE_AVERAGING = 0.2  # weight of the newest run in the running average


class LoneSessions:
    """Which session a request that finds its model idle runs on: the model's lone session (see the module
    docstring) once the running average of such runs reaches LONE_SESSION_MIN_RUN, else the shared one.

    The average starts at 0, so a model's first lone runs go to the shared session and show what a run costs;
    it follows the runs on either session, so a model moved to the lone session stays there while its runs
    stay long, and a tiny one never goes (or comes back). `ran` is called from worker threads: a lost update of
    a float under the GIL costs one sample, nothing more.
    """

    def __init__(self, session, lone_session=None) -> None:
        self.session = session
        self.lone_session = lone_session
        self.average_run = 0.0  # seconds

    def pick(self):
        if self.lone_session is not None and self.average_run >= LONE_SESSION_MIN_RUN:
            return self.lone_session
        return self.session

    def ran(self, seconds: float) -> None:
        self.average_run += _LONE_AVERAGING * (seconds - self.average_run)


class SessionRunner:
    """Run one request on the session in a worker thread: the runner used when no batching is configured.

    With a `lone_session`, a request that finds no other run of the model in flight may run on it instead (see
    LoneSessions): every core, threads that spin within a run, as in-process ONNX Runtime runs by default, so a
    lone caller of a big model gets every core (the one-thread `session` would give it one). Requests that
    overlap run on `session`, side by side, without oversubscribing the cores.
    """

    def __init__(self, session, executor: Executor | None, label: str, lone_session=None) -> None:
        self.session = session
        self.lone = LoneSessions(session, lone_session)
        self.executor = executor
        self.label = label
        self.all_outputs = [o.name for o in session.get_outputs()]
        self.observe_run: RunObserver | None = None
        self.in_flight = 0  # runs started and not finished (counted on the event loop)
        # Runs in flight at once at most (the model configuration's instance count): the executor's threads, or
        # those of asyncio's default executor (ThreadPoolExecutor's default size) when there is none.
        self.max_runs = getattr(executor, "_max_workers", None) or min(32, (os.cpu_count() or 1) + 4)

    async def __call__(self, feeds: Feeds, output_names: list[str] | None, timing: RunTiming | None = None,
                       deadline: float | None = None) -> Feeds:  # fmt: skip
        loop = asyncio.get_running_loop()
        names = output_names or self.all_outputs
        alone = self.in_flight == 0
        session = self.lone.pick() if alone else self.session
        self.in_flight += 1
        try:
            return await loop.run_in_executor(self.executor, self._run, session, feeds, names, timing, alone,
                                              time.monotonic(), deadline)  # fmt: skip
        finally:
            self.in_flight -= 1

    def _run(self, session, feeds: Feeds, names: list[str], timing: RunTiming | None, alone: bool,
             queued_at: float, deadline: float | None = None) -> Feeds:  # fmt: skip
        started = time.monotonic()
        if deadline is not None and started > deadline:
            raise deadline_exceeded(self.label, started - queued_at)
        try:
            return run_session(session, feeds, names, self.label)
        finally:
            seconds = time.monotonic() - started
            if alone:
                self.lone.ran(seconds)
            if timing is not None or self.observe_run is not None:
                rows = leading_rows(feeds)
                if timing is not None:
                    timing.queue, timing.run, timing.batch, timing.rows = started - queued_at, seconds, rows, rows
                if self.observe_run is not None:
                    self.observe_run(rows, seconds)


def deadline_exceeded(label: str, waited: float) -> DeadlineExceeded:
    return DeadlineExceeded(f"{label}: the request's timeout or deadline passed after {waited * 1e3:.3f} ms in the "
                            "queue, before it could run; it was not run (give it more time, or retry)")  # fmt: skip


def leading_rows(feeds: Feeds) -> int:
    """Rows of a request: the first axis of its first input (1 for a scalar or no input)."""
    for array in feeds.values():
        return int(array.shape[0]) if array.ndim else 1
    return 1


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
