"""What every protocol does alike, in plain Python: the servicers (v2, rest, legacy) only translate to and from it.

The data plane owns the model lookup, the admission gate, the observer's record, inference, metadata, readiness,
and Triton's extensions: model configuration, statistics, the repository's index, load and unload, log settings.
Its answers are plain dicts in the protocol's JSON form (what REST sends); the gRPC servicer turns them into
messages with protobuf's json_format, so both forms say the same thing by construction.

An inference call is one `with` block, so that a failure anywhere in it -- decoding too -- is counted and logged:

    with plane.request("grpc", name, version, request_id) as call:   # looks the model up
        inputs = decode(...)
        outputs = await call.infer(inputs, requested, parameters, deadline)
        answer = encode(call.model, outputs)
"""

from __future__ import annotations

import logging
import time
from typing import Any, Mapping, NamedTuple, Sequence

import numpy as np

import ortserve
from ortserve.server import codec
from ortserve.server.classification import classify
from ortserve.server.errors import InvalidInput, ModelNotFound
from ortserve.server.gate import Gate
from ortserve.server.modelconfig import model_config
from ortserve.server.observe import Observer, RequestRecord
from ortserve.server.repository import Repository
from ortserve.server.runtime import Feeds, Model, TensorSpec

log = logging.getLogger(__name__)

SERVER_NAME = "ortserve"
# The protocol specification's platform name for ONNX models, in the model metadata. The model configuration says
# "onnxruntime_onnx", as Triton's does, because perf_analyzer and Triton's tools read it from there.
PLATFORM = "onnx_onnxv1"
# Exactly the protocol extensions this server implements, as ServerMetadata lists them (Triton's names).
EXTENSIONS = ("binary_tensor_data", "classification", "model_configuration", "model_repository", "statistics",
              "logging")  # fmt: skip


class RequestedOutput(NamedTuple):
    """An output a request asks for; `classification` > 0 asks for its top classes instead of its values."""

    name: str
    classification: int = 0


def tensor_metadata(spec: TensorSpec) -> dict:
    """{"name", "datatype", "shape"} of a model input or output: -1 for a variable axis, [] for an unknown shape."""
    return {"name": spec.name, "datatype": codec.datatype_of(spec.dtype), "shape": spec.dims()}


def timeout_deadline(parameters: Mapping[str, Any] | None, deadline: float | None) -> float | None:
    """The time.monotonic() by which a request must start running: the sooner of the transport's deadline and
    the request's `timeout` parameter (microseconds, Triton's schedule-policy parameter)."""
    if not parameters or "timeout" not in parameters:
        return deadline
    timeout = parameters["timeout"]
    if type(timeout) is not int or timeout < 0:
        raise InvalidInput(f"parameter 'timeout' must be a whole number of microseconds (0 or more), got {timeout!r}")
    if timeout == 0:  # Triton's meaning: no timeout
        return deadline
    own = time.monotonic() + timeout / 1e6
    return own if deadline is None else min(own, deadline)


class InferenceCall:
    """One inference request through the data plane (see the module docstring)."""

    __slots__ = ("plane", "record", "model", "default")

    def __init__(self, plane: "DataPlane", record: RequestRecord, default: bool = False) -> None:
        self.plane = plane
        self.record = record
        self.model: Model | None = None
        self.default = default  # the protocol names no model: serve the repository's default one

    def __enter__(self) -> "InferenceCall":
        record = self.record.__enter__()
        try:
            repository = self.plane.repository
            if self.default:
                self.model = record.model = repository.default_model()
            else:
                self.model = record.model = repository.get(record.model_name, record.version)
        except BaseException as error:
            record.__exit__(type(error), error, error.__traceback__)
            raise
        repository.calls.enter(self.model)  # in the lookup's loop turn: an unload waits for this call
        return self

    def __exit__(self, kind, error, traceback) -> None:
        self.plane.repository.calls.leave(self.model)
        self.record.__exit__(kind, error, traceback)

    async def infer(self, inputs: Mapping[str, np.ndarray], outputs: Sequence[RequestedOutput] | None = None,
                    parameters: Mapping[str, Any] | None = None, deadline: float | None = None) -> Feeds:  # fmt: skip
        """Check and run the request; the answer holds the requested outputs (all when none is named) by name.

        `deadline` (time.monotonic()) is the transport's: a request still queued then is not run (DeadlineExceeded).
        """
        model = self.model
        deadline = timeout_deadline(parameters, deadline)
        names = [o.name for o in outputs] if outputs else None
        record = self.record
        with self.plane.gate.admit():
            record.infer_started = time.monotonic()
            answer = await model.infer(inputs, names, record.timing, deadline=deadline)
            record.infer_finished = time.monotonic()
        if outputs and any(o.classification for o in outputs):
            answer = self.plane.classify(model, answer, outputs)
        return answer


class DataPlane:
    """The protocol-neutral server: one per InferenceServer, shared by every servicer."""

    def __init__(self, repository: Repository, gate: Gate, observer: Observer) -> None:
        self.repository = repository
        self.gate = gate
        self.observer = observer

    # ----------------------------------------------------------------------------------------------
    # Health and metadata

    def server_ready(self) -> bool:
        return not self.gate.draining

    def server_metadata(self) -> dict:
        return {"name": SERVER_NAME, "version": ortserve.__version__, "extensions": list(EXTENSIONS)}

    def model_metadata(self, name: str, version: str | int | None) -> dict:
        """The protocol's model metadata (ModelNotFound for an unknown model or version)."""
        model = self.repository.get(name, version)
        return {
            "name": model.name,
            "versions": [str(v) for v in self.repository.versions(model.name)],
            "platform": PLATFORM,
            "inputs": [tensor_metadata(s) for s in model.inputs.values()],
            "outputs": [tensor_metadata(s) for s in model.outputs.values()],
        }

    def model_readiness(self, name: str, version: str | int | None) -> tuple[bool, str]:
        """(ready, why not). A question, not a lookup: an unknown model or version is simply not ready."""
        try:
            model = self.repository.get(name, version)
        except ModelNotFound as error:
            return False, error.message
        if self.gate.draining:
            return False, f"{model.label} is not ready: the server is shutting down"
        return True, ""

    # ----------------------------------------------------------------------------------------------
    # Inference

    def request(self, protocol: str, name: str | None, version: str | int | None = "",
                request_id: str = "") -> InferenceCall:  # fmt: skip
        """The `with` block of one inference call; `name` None: the repository's default model (the old protocol)."""
        record = self.observer.request(protocol, name or "", version, request_id)
        return InferenceCall(self, record, default=name is None)

    # ----------------------------------------------------------------------------------------------
    # Triton's extensions: configuration, statistics, the repository, log settings

    def model_config(self, name: str, version: str | int | None) -> dict:
        """The model's configuration in Triton's JSON form (inference.ModelConfig)."""
        return model_config(self.repository.get(name, version))

    def model_statistics(self, name: str = "", version: str | int | None = "") -> dict:
        """{"model_stats": [...]} for one version, every version of one model, or every model (name "")."""
        return {"model_stats": self.observer.statistics.report(self.repository, name, version)}

    def repository_index(self, ready_only: bool = False) -> list[dict]:
        """[{"name", "version", "state", "reason"}] of every model the repository holds."""
        return self.repository.index(ready_only)

    async def load_model(self, name: str, parameters: Mapping[str, Any] | None = None) -> None:
        await self.repository.load_model(name, parameters or {})

    async def unload_model(self, name: str, parameters: Mapping[str, Any] | None = None) -> None:
        await self.repository.unload_model(name, parameters or {})

    def log_settings(self) -> dict:
        return log_settings()

    def update_log_settings(self, changes: Mapping[str, Any]) -> dict:
        return update_log_settings(changes)

    def classify(self, model: Model, outputs: Feeds, requested: Sequence[RequestedOutput]) -> Feeds:
        counts = {o.name: o.classification for o in requested}
        return {name: classify(array, counts[name], model.labels(name), f"{model.label} output {name!r}")
                if counts.get(name) else array for name, array in outputs.items()}  # fmt: skip


# --------------------------------------------------------------------------------------------------
# Log settings (Triton's logging extension), over the "ortserve" logger

_LOGGER = logging.getLogger("ortserve")
_SETTING_TYPES = {"log_file": str, "log_info": bool, "log_warning": bool, "log_error": bool, "log_verbose_level": int,
                  "log_format": str}  # fmt: skip


def log_settings() -> dict:
    """Triton's log settings of the server's logger: which levels are on, and where logs go (stderr: "")."""
    level = _LOGGER.getEffectiveLevel()
    return {"log_file": "", "log_info": level <= logging.INFO, "log_warning": level <= logging.WARNING,
            "log_error": level <= logging.ERROR, "log_verbose_level": int(level <= logging.DEBUG),
            "log_format": "default"}  # fmt: skip


def update_log_settings(changes: Mapping[str, Any]) -> dict:
    """Apply Triton's log settings: the most detailed level turned on wins; InvalidInput for what cannot apply."""
    for key, value in changes.items():
        kind = _SETTING_TYPES.get(key)
        if kind is None:
            raise InvalidInput(f"unknown log setting {key!r}; the settings are {', '.join(_SETTING_TYPES)}")
        if type(value) is not kind or (kind is int and value < 0):
            wanted = {str: "a string", bool: "true or false", int: "a whole number, 0 or more"}[kind]
            raise InvalidInput(f"log setting {key!r} must be {wanted}, got {value!r}")
    if changes.get("log_file", "") != "":
        raise InvalidInput("log_file cannot be changed: this server logs to stderr (log_file \"\")")
    if changes.get("log_format", "default") != "default":
        raise InvalidInput(f"log_format {changes['log_format']!r} is not supported; the format is \"default\"")
    settings = {**log_settings(), **changes}
    if settings["log_verbose_level"] > 0:
        level = logging.DEBUG
    elif settings["log_info"]:
        level = logging.INFO
    elif settings["log_warning"]:
        level = logging.WARNING
    elif settings["log_error"]:
        level = logging.ERROR
    else:
        level = logging.CRITICAL
    _LOGGER.setLevel(level)
    log.info("log level set to %s", logging.getLevelName(level))
    return log_settings()
