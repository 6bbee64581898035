"""The model repository: which models and versions the server serves, from where, with which settings.

Two ways to describe it:

1. A directory, one folder per model, one numbered folder per version, and an optional config.json per model
   (Triton's layout)::

       repository/
         digits_cnn/
           config.json          optional, see ModelConfig
           1/model.onnx
           2/model.onnx         a request naming no version gets the highest number
         digits_forest/
           1/model.onnx

2. A JSON file listing the models, as the old ONNX Runtime Server / TensorFlow Serving docs show it; relative
   base_paths are relative to the file. base_path is a version directory as above, a folder holding model.onnx,
   or an .onnx file (the last two serve as version 1)::

       {"model_config_list": [
          {"name": "digits_cnn", "base_path": "digits_cnn", "model_platform": "onnx", "max_batch_size": 32}]}

A single .onnx file (run_ort_server.sh --model_path) is a repository of one model named `default`, version 1.
"""

from __future__ import annotations

import asyncio
import json
import logging
from concurrent.futures import Executor
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from ortserve.server.batching import BatchingDefaults, runner_for
from ortserve.server.classification import read_labels
from ortserve.server.errors import ModelControlDisabled, ModelNotFound, RepositoryError
from ortserve.server.runtime import Model, SessionSettings, load_session
from ortserve.server.warmup import warm_up

log = logging.getLogger(__name__)

CONFIG_FILE = "config.json"
MODEL_FILE = "model.onnx"
DEFAULT_MODEL_NAME = "default"
# model_platform values the JSON list may carry (the old server's docs say "onnx"; Triton says onnxruntime_onnx).
ONNX_PLATFORMS = {"onnx", "onnxruntime", "onnxruntime_onnx", "onnx_onnxv1"}


class OutputConfig(BaseModel):
    """Settings of one output: its labels for the classification extension, one per line (line i: class i)."""

    model_config = ConfigDict(extra="forbid")
    name: str = Field(min_length=1)
    label_filename: str | None = Field(None, min_length=1, description="file in the model's folder")


class WarmupInput(BaseModel):
    """One input of a warm-up request: its datatype and dims (without the batch axis when the model batches)."""

    model_config = ConfigDict(extra="forbid")
    data_type: str = Field(description="TYPE_FP32 (Triton's) or FP32 (the protocol's)")
    dims: list[int]
    zero_data: bool = False
    random_data: bool = False

    @model_validator(mode="after")
    def _one_kind_of_data(self) -> "WarmupInput":
        if self.zero_data == self.random_data:  # Triton's oneof: exactly one of them
            raise ValueError("a warm-up input needs exactly one of zero_data: true or random_data: true")
        return self


class WarmupConfig(BaseModel):
    """A warm-up request, as Triton's model_warmup: `count` runs of `batch_size` rows of zero or random inputs."""

    model_config = ConfigDict(extra="forbid")
    name: str = "warmup"
    batch_size: int = Field(1, ge=0)
    inputs: dict[str, WarmupInput] = Field(default_factory=dict)
    count: int = Field(1, ge=1)


class ModelConfig(BaseModel):
    """Per-model settings, from `<repository>/<name>/config.json` or a model_config_list entry. All optional.

    Batching (ortserve.server.batching): max_batch_size > 0 declares that the model's first axis is a batch axis
    along which the dynamic batcher joins concurrent requests, up to that many rows; a queued request waits at most
    max_queue_delay_us for a run. 0 turns batching off. Unset fields take the server's defaults (serve flags
    --max_batch_size, --max_queue_delay_us), which batch every model whose inputs and outputs all have a variable
    first axis.
    """

    # protected_namespaces=(): the old server's field names (model_platform, model_config_list) start with model_.
    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    max_batch_size: int | None = Field(None, ge=0, description="largest joined batch; 0 turns batching off "
                                       "(default: the server's)")
    max_queue_delay_us: int | None = Field(None, ge=0, description="longest wait in the batch queue, in "
                                           "microseconds (default: the server's)")
    intra_op_threads: int | None = Field(None, ge=0, description="ONNX Runtime intra-op threads (default: server's)")
    inter_op_threads: int | None = Field(None, ge=0, description="ONNX Runtime inter-op threads (default: server's)")
    output: list[OutputConfig] = Field(default_factory=list, description="per-output settings (Triton's name)")
    model_warmup: list[WarmupConfig] = Field(default_factory=list, description="requests run before the model "
                                             "reports ready (Triton's name)")  # fmt: skip

    def label_files(self) -> dict[str, str]:
        """Output name -> its label file, as the config names it (relative to the model's folder)."""
        return {o.name: o.label_filename for o in self.output if o.label_filename}

    def session_settings(self, server_default: SessionSettings) -> SessionSettings:
        """The model's own thread settings where it has them, the server's elsewhere."""
        intra, inter = self.intra_op_threads, self.inter_op_threads
        return SessionSettings(
            intra_op_threads=server_default.intra_op_threads if intra is None else intra,
            inter_op_threads=server_default.inter_op_threads if inter is None else inter,
        )


class ConfigListEntry(ModelConfig):
    name: str = Field(min_length=1)
    base_path: str = Field(min_length=1)
    model_platform: str = "onnx"


class ConfigList(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())
    model_config_list: list[ConfigListEntry] = Field(min_length=1)


@dataclass(frozen=True)
class ModelSource:
    """Where one version of one model comes from."""

    name: str
    version: int
    path: Path
    config: ModelConfig


# --------------------------------------------------------------------------------------------------
# Finding the models


def discover(location: Path | str) -> list[ModelSource]:
    """Every model version at `location`: a repository directory, a model_config_list JSON file, or one .onnx."""
    location = Path(location)
    if location.is_dir():
        return scan_directory(location)
    if not location.exists():
        raise RepositoryError(f"no model repository, config list or model at {location}")
    if location.suffix == ".json":
        return read_config_list(location)
    return [ModelSource(DEFAULT_MODEL_NAME, 1, location, ModelConfig())]


def scan_directory(root: Path) -> list[ModelSource]:
    sources = []
    for folder in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        sources += _versions(folder.name, folder, read_config(folder / CONFIG_FILE))
    if not sources:
        raise RepositoryError(f"{root} holds no models; expected {root}/<name>/<version>/{MODEL_FILE}")
    return sources


def read_config(path: Path) -> ModelConfig:
    if not path.exists():
        return ModelConfig()
    try:
        return ModelConfig.model_validate_json(path.read_bytes())
    except ValidationError as error:
        raise RepositoryError(f"{path}: {error}") from None


def read_config_list(path: Path) -> list[ModelSource]:
    try:
        listing = ConfigList.model_validate_json(path.read_bytes())
    except (ValidationError, json.JSONDecodeError) as error:
        raise RepositoryError(f"{path} is not a model_config_list: {error}") from None
    sources = []
    for entry in listing.model_config_list:
        if entry.model_platform.lower() not in ONNX_PLATFORMS:
            raise RepositoryError(
                f"{path}: model {entry.name!r} has model_platform {entry.model_platform!r}; this server runs "
                f"{', '.join(sorted(ONNX_PLATFORMS))}"
            )
        base = Path(entry.base_path)
        base = base if base.is_absolute() else path.parent / base
        config = ModelConfig(**entry.model_dump(include=set(ModelConfig.model_fields)))
        if base.is_file():
            sources.append(ModelSource(entry.name, 1, base, config))
        elif (base / MODEL_FILE).is_file():
            sources.append(ModelSource(entry.name, 1, base / MODEL_FILE, config))
        elif base.is_dir():
            sources += _versions(entry.name, base, config)
        else:
            raise RepositoryError(f"{path}: model {entry.name!r} has base_path {base}, which does not exist")
    seen = set()
    for source in sources:
        if (source.name, source.version) in seen:
            raise RepositoryError(f"{path}: model {source.name!r} version {source.version} is listed twice")
        seen.add((source.name, source.version))
    return sources


def _versions(name: str, folder: Path, config: ModelConfig) -> list[ModelSource]:
    found = [
        ModelSource(name, int(v.name), v / MODEL_FILE, config)
        for v in folder.iterdir()
        if v.is_dir() and v.name.isdigit() and (v / MODEL_FILE).is_file()
    ]
    if not found:
        raise RepositoryError(f"model folder {folder} has no version: expected {folder}/<number>/{MODEL_FILE}")
    return sorted(found, key=lambda s: s.version)


# --------------------------------------------------------------------------------------------------
# The loaded repository


@dataclass(frozen=True)
class LoadSettings:
    """How the server opens a model version: session threads, worker pool, batching defaults, lone sessions."""

    settings: SessionSettings = SessionSettings()
    executor: Executor | None = None
    batching: BatchingDefaults = BatchingDefaults(max_batch_size=0)
    lone: SessionSettings | None = None


def open_model(source: ModelSource, loading: LoadSettings = LoadSettings()) -> Model:
    """One servable, warmed-up model version (RepositoryError if it cannot be served). Blocking: seconds for a big
    model, so a server that is already serving calls it in a thread. The one place a loaded Model is built."""
    model_settings = source.config.session_settings(loading.settings)
    session = load_session(source.path, model_settings)
    lone_session = None
    if loading.lone is not None and loading.lone.threads() > model_settings.threads():
        lone_session = load_session(source.path, loading.lone)
    model = Model(source.name, source.version, source.path, session, source.config, executor=loading.executor,
                  lone_session=lone_session)  # fmt: skip
    batcher = runner_for(model, loading.batching, loading.executor)
    if batcher is not None:
        model.runner = batcher
    # Labels live in the model's folder: <folder>/<version>/model.onnx, or beside a lone model file.
    folder = source.path.parent.parent if source.path.parent.name.isdigit() else source.path.parent
    model.output_labels = read_labels(source.config.label_files(), folder)
    warm_up(model)  # last: a version is ready, and installed, only once warm
    log.info("loaded model %r version %d from %s (%s)", source.name, source.version, source.path,
             f"batching up to {batcher.max_batch_size}" if batcher else "no batching")  # fmt: skip
    return model


class CallsInFlight:
    """Inference calls in flight per model version (the Model object), counted on the event loop by the data plane
    from lookup to answer, so that an unload can wait for a version's calls to finish before dropping it."""

    def __init__(self) -> None:
        self._count: dict[Model, int] = {}
        self._idle: dict[Model, asyncio.Event] = {}

    def enter(self, model: Model) -> None:
        self._count[model] = self._count.get(model, 0) + 1

    def leave(self, model: Model) -> None:
        left = self._count[model] - 1
        if left:
            self._count[model] = left
            return
        del self._count[model]
        idle = self._idle.pop(model, None)
        if idle is not None:
            idle.set()

    def of(self, model: Model) -> int:
        return self._count.get(model, 0)

    async def wait_idle(self, model: Model) -> None:
        if self._count.get(model):
            await self._idle.setdefault(model, asyncio.Event()).wait()


class Repository:
    """The served models, by name and version: what every call looks up.

    Loading and unloading while serving (Triton's model repository extension) is the job of a
    ortserve.server.control.ModelControl attached as `control`; without one (a repository built in code, as tests
    do) the index lists the loaded models and load/unload are refused.
    """

    def __init__(self, models: list[Model]) -> None:
        self._models: dict[str, dict[int, Model]] = {}
        for model in models:
            self._models.setdefault(model.name, {})[model.version] = model
        self._not_served: dict[str, str] = {}  # name -> why it is not served ("was unloaded"), for NOT_FOUND errors
        self.calls = CallsInFlight()
        self.control = None  # a ModelControl, when the server may load and unload models

    @classmethod
    def load(cls, sources: list[ModelSource], settings: SessionSettings = SessionSettings(),
             executor: Executor | None = None, batching: BatchingDefaults = BatchingDefaults(max_batch_size=0),
             lone: SessionSettings | None = None) -> "Repository":  # fmt: skip
        """Open an ONNX Runtime session for every source (RepositoryError if one cannot be served).

        `batching` gives the defaults for models whose config says nothing; by default here, no batching. With
        `lone`, a model whose sessions have fewer threads also gets a lone session with these settings (see
        ortserve.server.runtime.SessionRunner).
        """
        loading = LoadSettings(settings, executor, batching, lone)
        return cls([open_model(source, loading) for source in sources])

    def names(self) -> list[str]:
        return sorted(self._models)

    def versions(self, name: str) -> list[int]:
        return sorted(self._models.get(name, {}))

    def served(self, name: str) -> dict[int, Model]:
        """The served versions of `name` (a copy: {} when none)."""
        return dict(self._models.get(name, {}))

    def __iter__(self) -> Iterator[Model]:
        for name in self.names():
            yield from (self._models[name][v] for v in self.versions(name))

    def get(self, name: str, version: str | int | None = None) -> Model:
        """The model `name` at `version` (latest when None or ""), or ModelNotFound naming what there is."""
        versions = self._models.get(name)
        if not versions:
            why = self._not_served.get(name)
            there = ", ".join(map(repr, self.names())) or "none"
            if why:
                raise ModelNotFound(f"model {name!r} {why}; this server now serves {there}")
            raise ModelNotFound(f"no model {name!r}; this server has {there}")
        if version is None or version == "":
            return versions[max(versions)]
        number = int(version) if isinstance(version, int) or str(version).isdigit() else None
        if number not in versions:
            available = ", ".join(map(str, sorted(versions)))
            raise ModelNotFound(f"model {name!r} has no version {str(version)!r}; it has {available}")
        return versions[number]

    def default_model(self) -> Model:
        """The model of protocols that name none: the one called `default`, else the only one."""
        if DEFAULT_MODEL_NAME in self._models:
            return self.get(DEFAULT_MODEL_NAME)
        if len(self._models) == 1:
            return self.get(self.names()[0])
        raise ModelNotFound(
            f"this protocol names no model, so the server needs one called {DEFAULT_MODEL_NAME!r} or only one model; "
            f"it has {', '.join(map(repr, self.names()))}"
        )

    def install(self, name: str, versions: dict[int, Model], why_not: str = "") -> list[Model]:
        """Serve exactly `versions` of `name` from now on ({}: none, `why_not` saying why); in one step, so a call
        gets either the old set or the new one. Returns the Model objects no longer served."""
        old = self._models.pop(name, {})
        if versions:
            self._models[name] = dict(versions)
            self._not_served.pop(name, None)
        else:
            self._not_served[name] = why_not or "is not loaded"
        kept = {id(m) for m in versions.values()}
        return [m for m in old.values() if id(m) not in kept]

    # Triton's model repository extension (the data plane's repository_index, load_model, unload_model)

    def index(self, ready_only: bool = False) -> list[dict]:
        """[{"name", "version", "state", "reason"}] of every model (see ModelControl.index)."""
        if self.control is not None:
            return self.control.index(ready_only)
        return [{"name": m.name, "version": str(m.version), "state": "READY", "reason": ""} for m in self]

    async def load_model(self, name: str, parameters: dict) -> None:
        await self._controlled().load(name, parameters)

    async def unload_model(self, name: str, parameters: dict) -> None:
        await self._controlled().unload(name, parameters)

    def _controlled(self):
        if self.control is None:
            raise ModelControlDisabled("this repository was built in code, so its models cannot be loaded or "
                                       "unloaded; serve a repository directory with --model_control_mode explicit")
        return self.control
