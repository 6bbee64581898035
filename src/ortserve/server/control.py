"""Live model management, as Triton's --model-control-mode: the repository index, load, unload, and polling.

    none       every model is loaded at start and stays so; load and unload are refused (the default)
    explicit   load/unload calls decide; --load_model NAME (repeatable, "*" for all) picks the models of the start
    poll       every --repository_poll_secs the server re-reads the directory by itself; load/unload are refused

A reload never fails a call: the changed versions are opened and warmed in a thread while the old ones serve,
then the served set is swapped in one event-loop step (Repository.install); calls already holding an old version
finish on it. Unload takes the model out of service at once, then waits for its calls in flight. A version that
fails to load leaves what was served before, and the index says why. Only a repository directory can be reloaded.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Awaitable, Callable, Mapping

from ortserve.server.errors import (ConfigurationError, ModelControlDisabled, ModelLoadError, ModelNotFound,
                                    InvalidInput, RepositoryError, ServingError)  # fmt: skip
from ortserve.server.repository import (CONFIG_FILE, LoadSettings, ModelSource, Repository, _versions, discover,
                                        open_model, read_config)  # fmt: skip
from ortserve.server.runtime import Model

log = logging.getLogger(__name__)

MODES = ("none", "explicit", "poll")
DEFAULT_POLL_SECS = 15.0  # Triton's --repository-poll-secs default
READY, UNAVAILABLE, LOADING, UNLOADING = "READY", "UNAVAILABLE", "LOADING", "UNLOADING"  # Triton's state names
# Unload parameters Triton defines that hold here: this server has no ensembles, so no model depends on another.
UNLOAD_PARAMETERS = {"unload_dependents": bool}

Stamp = tuple[int, int, int]  # (mtime_ns, size, inode) of a file: changes when the file is rewritten or replaced
Listener = Callable[[str, list[Model], list[Model]], Awaitable[None]]  # (name, versions added, versions dropped)


@dataclass(frozen=True)
class Survey:
    """What the disk holds for one model now: its version sources and the stamps of its files."""

    sources: dict[int, ModelSource]
    config: Stamp | None
    files: dict[int, Stamp]

    def stamps(self) -> tuple:
        return self.config, tuple(sorted(self.files.items()))


@dataclass
class Record:
    """What the index says of one model beyond its served versions: per version (None: the model) state, reason."""

    states: dict[int | None, tuple[str, str]] = field(default_factory=dict)
    served: tuple | None = None  # Survey.stamps() of what is served
    failed: tuple | None = None  # Survey.stamps() of the last failed load (poll retries only when they change)


def stamp(path: Path) -> Stamp | None:
    try:
        info = path.stat()
    except FileNotFoundError:
        return None
    return info.st_mtime_ns, info.st_size, info.st_ino


def survey(folder: Path) -> Survey:
    """Read one model folder (RepositoryError when its config or versions are unusable). Blocking: disk reads."""
    sources = {s.version: s for s in _versions(folder.name, folder, read_config(folder / CONFIG_FILE))}
    return Survey(sources, stamp(folder / CONFIG_FILE), {v: stamp(s.path) for v, s in sources.items()})


class VersionFailed(Exception):
    """One version of a load failed (args: the version, the reason)."""


def open_versions(sources: list[ModelSource], loading: LoadSettings) -> dict[int, Model]:
    """Open and warm each source, in the calling thread (VersionFailed at the first that fails)."""
    opened = {}
    for source in sources:
        try:
            opened[source.version] = open_model(source, loading)
        except RepositoryError as error:
            raise VersionFailed(source.version, str(error)) from None
    return opened


class ModelControl:
    """Loads, unloads and polls the models of one repository directory for a running server (see the module)."""

    def __init__(self, repository: Repository, location: Path, loading: LoadSettings, mode: str = "none",
                 poll_secs: float = DEFAULT_POLL_SECS) -> None:  # fmt: skip
        if mode not in MODES:
            raise ConfigurationError(f"model control mode {mode!r}: expected one of {', '.join(MODES)}")
        self.repository = repository
        self.location = Path(location)
        self.loading = loading
        self.mode = mode
        self.poll_secs = poll_secs
        self.listeners: list[Listener] = []  # told of every change: the server's health and observer follow
        self._records: dict[str, Record] = {}
        self._locks: dict[str, asyncio.Lock] = {}
        self._poller: asyncio.Task | None = None
        repository.control = self

    # ----------------------------------------------------------------------------------------------
    # The calls

    def index(self, ready_only: bool = False) -> list[dict]:
        """[{"name", "version", "state", "reason"}] of every model on disk or served, by name and version."""
        rows = []
        for name in sorted(set(self._names_on_disk()) | set(self.repository.names())):
            served = self.repository.served(name)
            states = self._record(name).states
            versions = sorted(set(served) | {v for v in states if v is not None})
            if not versions:
                state, reason = states.get(None, (UNAVAILABLE, "not loaded"))
                rows.append({"name": name, "version": "", "state": state, "reason": reason})
            for version in versions:
                if version in served:
                    state, reason = READY, self._reload_failure(states, version)
                else:
                    state, reason = states.get(version, (UNAVAILABLE, "not loaded"))
                rows.append({"name": name, "version": str(version), "state": state, "reason": reason})
        return [r for r in rows if r["state"] == READY] if ready_only else rows

    async def load(self, name: str, parameters: Mapping) -> None:
        if parameters:
            raise InvalidInput(f"load parameter(s) {', '.join(map(repr, parameters))} are not supported: this server "
                               f"loads models only from its repository directory {self.location} (put the files "
                               "there and load again) and takes no load parameters")  # fmt: skip
        self._check_allowed("load", name)
        await self.reload(name, retry_failed=True)

    async def unload(self, name: str, parameters: Mapping) -> None:
        for key, value in parameters.items():
            kind = UNLOAD_PARAMETERS.get(key)
            if kind is None:
                raise InvalidInput(f"unload parameter {key!r} is not supported; the unload parameters are "
                                   f"{', '.join(UNLOAD_PARAMETERS)}")  # fmt: skip
            if type(value) is not kind:
                raise InvalidInput(f"unload parameter {key!r} must be true or false, got {value!r}")
        self._check_allowed("unload", name)
        await self.take_down(name, "unloaded")

    def _check_allowed(self, action: str, name: str) -> None:
        if self.mode == "none":
            raise ModelControlDisabled(f"cannot {action} model {name!r}: the server runs with --model_control_mode "
                                       "none, which serves the models loaded at start; start it with "
                                       "--model_control_mode explicit to load and unload models")  # fmt: skip
        if self.mode == "poll":
            raise ModelControlDisabled(f"cannot {action} model {name!r}: the server runs with --model_control_mode "
                                       f"poll and loads and unloads by itself, every {self.poll_secs:g} s, what "
                                       f"changes in {self.location}; change the files there instead")  # fmt: skip

    # ----------------------------------------------------------------------------------------------
    # Loading and unloading

    async def reload(self, name: str, retry_failed: bool = False) -> None:
        """Serve what the disk holds for `name` now, opening only changed or new versions (ModelLoadError if one
        fails: then what was served stays served). Without `retry_failed`, files that failed before are skipped."""
        if not (self.location / name).is_dir():
            raise ModelNotFound(f"no model {name!r} in the repository {self.location}; it has "
                                f"{', '.join(map(repr, self._names_on_disk())) or 'none'}")  # fmt: skip
        async with self._lock(name):
            record = self._record(name)
            served = self.repository.served(name)
            try:
                found = await asyncio.to_thread(survey, self.location / name)
            except RepositoryError as error:
                self._failed(name, record, served, list(served) or [None], str(error), None)
                raise ModelLoadError(f"cannot load model {name!r}: {error}") from None
            if found.stamps() == record.served and set(served) == set(found.sources):
                return  # nothing changed
            if not retry_failed and found.stamps() == record.failed:
                return  # the same files failed before: wait for them to change
            config_changed = record.served is None or found.config != record.served[0]
            old_files = dict(record.served[1]) if record.served else {}
            opening = [s for v, s in found.sources.items()
                       if config_changed or v not in served or old_files.get(v) != found.files[v]]  # fmt: skip
            await self._open_and_install(name, record, served, found, opening)

    async def _open_and_install(self, name: str, record: Record, served: dict[int, Model], found: Survey,
                                opening: list[ModelSource]) -> None:  # fmt: skip
        for source in opening:
            record.states[source.version] = (LOADING, "loading")
        if not served:
            self.repository.install(name, {}, "is loading")
        try:
            opened = await asyncio.to_thread(open_versions, opening, self.loading)
        except VersionFailed as failure:
            version, reason = failure.args
            others = [s.version for s in opening if s.version != version]
            self._failed(name, record, served, others, f"not loaded: version {version} failed to load, and a load "
                         "is all or nothing", found.stamps())  # fmt: skip
            self._failed(name, record, served, [version], reason, found.stamps())
            raise ModelLoadError(f"cannot load model {name!r} version {version}: {reason}") from None
        versions = {v: opened.get(v) or served[v] for v in found.sources}
        dropped = self.repository.install(name, versions)
        record.states, record.served, record.failed = {}, found.stamps(), None
        log.info("model %r now serves version(s) %s", name, ", ".join(map(str, sorted(versions))))
        await self._tell(name, list(opened.values()), dropped)

    def _failed(self, name: str, record: Record, served: dict[int, Model], versions: list, reason: str,
                stamps: tuple | None) -> None:  # fmt: skip
        log.warning("model %r: %s", name, reason)
        for version in versions:
            record.states[version] = (UNAVAILABLE, reason)
        record.failed = stamps
        if not served:
            self.repository.install(name, {}, f"failed to load: {reason}")

    async def take_down(self, name: str, reason: str) -> None:
        """Stop serving `name` at once, then wait for its calls in flight (ModelNotFound if it is nowhere)."""
        async with self._lock(name):
            served = self.repository.served(name)
            if not served:
                if name in self._names_on_disk() or name in self._records:
                    return  # not loaded: nothing to do, as Triton answers
                raise ModelNotFound(f"no model {name!r} in the repository {self.location}; it has "
                                    f"{', '.join(map(repr, self._names_on_disk())) or 'none'}")  # fmt: skip
            record = self._record(name)
            dropped = self.repository.install(name, {}, f"was {reason}")
            for model in dropped:
                record.states[model.version] = (UNLOADING, f"{reason}: waiting for its calls in flight")
            record.served = record.failed = None
            await self._tell(name, [], [])  # health first: new calls are refused from now on
            await asyncio.gather(*(self.repository.calls.wait_idle(m) for m in dropped))
            for model in dropped:
                record.states[model.version] = (UNAVAILABLE, reason)
            log.info("model %r %s", name, reason)
            await self._tell(name, [], dropped)

    async def _tell(self, name: str, added: list[Model], dropped: list[Model]) -> None:
        for listener in self.listeners:
            await listener(name, added, dropped)

    # ----------------------------------------------------------------------------------------------
    # Polling

    async def start(self) -> None:
        if self.mode == "poll" and self._poller is None:
            self._poller = asyncio.ensure_future(self._poll_forever())

    async def stop(self) -> None:
        if self._poller is not None:
            self._poller.cancel()
            await asyncio.gather(self._poller, return_exceptions=True)
            self._poller = None

    async def _poll_forever(self) -> None:
        while True:
            await asyncio.sleep(self.poll_secs)
            try:
                await self.poll()
            except Exception:  # a bug of ours: keep polling, keep serving
                log.exception("polling the repository %s failed", self.location)

    async def poll(self) -> None:
        """Bring the served models in line with the directory: new and changed ones loaded, removed ones unloaded."""
        on_disk = set(await asyncio.to_thread(self._names_on_disk))
        for name in sorted(on_disk | set(self.repository.names())):
            if name not in on_disk:
                await self.take_down(name, "removed from the repository")
                self._records.pop(name, None)
                continue
            try:
                await self.reload(name)
            except ServingError as error:
                log.debug("poll: %s", error.message)

    # ----------------------------------------------------------------------------------------------

    def mark_loaded(self, names: list[str]) -> None:
        """Remember the files of the models loaded at start, so the first poll reloads only what changed since."""
        for name in names:
            try:
                self._record(name).served = survey(self.location / name).stamps()
            except RepositoryError:
                pass

    def _names_on_disk(self) -> list[str]:
        return sorted(p.name for p in self.location.iterdir() if p.is_dir() and not p.name.startswith("."))

    def _record(self, name: str) -> Record:
        return self._records.setdefault(name, Record())

    def _lock(self, name: str) -> asyncio.Lock:
        return self._locks.setdefault(name, asyncio.Lock())

    @staticmethod
    def _reload_failure(states: dict, version: int) -> str:
        state = states.get(version) or states.get(None)
        if state is None or state[0] == READY:
            return ""
        if state[0] == LOADING:
            return "reloading; the version loaded before serves meanwhile"
        return f"reload failed, the version loaded before keeps serving: {state[1]}"


def open_repository(location: Path | str, loading: LoadSettings, mode: str = "none", load: tuple[str, ...] = (),
                    poll_secs: float = DEFAULT_POLL_SECS) -> Repository:  # fmt: skip
    """The models to serve at start, under `mode` (ConfigurationError or RepositoryError when that cannot be)."""
    location = Path(location)
    if mode not in MODES:
        raise ConfigurationError(f"--model_control_mode {mode!r}: expected one of {', '.join(MODES)}")
    if load and mode != "explicit":
        raise ConfigurationError(f"--load_model {' '.join(load)}: needs --model_control_mode explicit (with "
                                 f"{mode}, the server loads every model at start)")  # fmt: skip
    if poll_secs <= 0:
        raise ConfigurationError(f"--repository_poll_secs must be more than 0, got {poll_secs:g}")
    if not location.is_dir():
        if mode != "none":
            what = "a model_config_list file" if location.suffix == ".json" else "a single model file"
            raise ConfigurationError(f"--model_control_mode {mode} needs a repository directory; {location} is "
                                     f"{what}, which cannot be reloaded")  # fmt: skip
        return Repository.load(discover(location), loading.settings, loading.executor, loading.batching,
                               loading.lone)  # fmt: skip
    sources = _startup_sources(location, mode, load)
    repository = Repository.load(sources, loading.settings, loading.executor, loading.batching, loading.lone)
    control = ModelControl(repository, location, loading, mode, poll_secs)
    control.mark_loaded(repository.names())
    return repository


def _startup_sources(location: Path, mode: str, load: tuple[str, ...]) -> list[ModelSource]:
    if mode != "explicit":
        return discover(location)
    if "*" in load:
        return [s for name in sorted(p.name for p in location.iterdir() if p.is_dir() and not p.name.startswith("."))
                for s in survey(location / name).sources.values()]  # fmt: skip
    unknown = [n for n in load if not (location / n).is_dir()]
    if unknown:
        there = sorted(p.name for p in location.iterdir() if p.is_dir() and not p.name.startswith("."))
        raise RepositoryError(f"--load_model {', '.join(map(repr, unknown))}: no such model in {location}; it has "
                              f"{', '.join(map(repr, there)) or 'none'}")  # fmt: skip
    return [s for name in dict.fromkeys(load) for s in survey(location / name).sources.values()]
