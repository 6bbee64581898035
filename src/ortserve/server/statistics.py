"""Triton's statistics extension: per model version, how many requests succeeded and failed, the time they spent in
each stage, how many session.runs the model made and of how many rows.

The Observer owns one `Statistics` and feeds it from two sides: `finish` on the event loop, once per inference
request that reached a model version (success with its total, queue, decode, run and encode times; or failure with
its total), and `ran` from the worker threads, once per session.run (a joined batch counts once). Each version's
counters sit behind a lock of their own: worker threads of one model count at the same time, and a lost update
would make the counts tests read wrong. `report` answers in Triton's JSON form (ModelStatistics), every version the
repository serves, with zeros for one never called.

Keyed by the Model object, not by name: a version loaded again starts from zero (as Triton's do), and `forget`
drops a version the server no longer serves so its session is not kept alive here.
"""

from __future__ import annotations

import threading
import time
from typing import TYPE_CHECKING

from ortserve.server.errors import InvalidInput

if TYPE_CHECKING:
    from ortserve.server.repository import Repository
    from ortserve.server.runtime import Model, RunObserver

NS = 1_000_000_000
_STAGES = ("success", "fail", "queue", "compute_input", "compute_infer", "compute_output", "cache_hit", "cache_miss")


def duration(count: int = 0, ns: int = 0) -> dict:
    return {"count": count, "ns": ns}


class VersionStatistics:
    """The counters of one model version (see the module docstring); durations are [count, nanoseconds]."""

    __slots__ = ("lock", "last_inference", "inference_count", "execution_count", "stages", "batches")

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.last_inference = 0  # ms since the epoch of the last success
        self.inference_count = 0  # rows answered OK
        self.execution_count = 0  # session.runs
        self.stages = {stage: [0, 0] for stage in _STAGES}
        self.batches: dict[int, list[int]] = {}  # rows of a run -> [runs, nanoseconds running]

    def succeeded(self, rows: int, total: float, queue: float, decode: float, run: float, encode: float) -> None:
        stages = self.stages
        with self.lock:
            self.last_inference = int(time.time() * 1000)
            self.inference_count += rows
            for stage, seconds in (("success", total), ("queue", queue), ("compute_input", decode),
                                   ("compute_infer", run), ("compute_output", encode)):  # fmt: skip
                entry = stages[stage]
                entry[0] += 1
                entry[1] += int(seconds * NS)

    def failed(self, total: float) -> None:
        with self.lock:
            entry = self.stages["fail"]
            entry[0] += 1
            entry[1] += int(total * NS)

    def ran(self, rows: int, seconds: float) -> None:
        with self.lock:
            self.execution_count += 1
            entry = self.batches.get(rows)
            if entry is None:
                entry = self.batches[rows] = [0, 0]
            entry[0] += 1
            entry[1] += int(seconds * NS)

    def report(self, name: str, version: str) -> dict:
        with self.lock:
            stages = {stage: duration(*entry) for stage, entry in self.stages.items()}
            batches = sorted((rows, tuple(entry)) for rows, entry in self.batches.items())
            counts = self.last_inference, self.inference_count, self.execution_count
        return {
            "name": name,
            "version": version,
            "last_inference": counts[0],
            "inference_count": counts[1],
            "execution_count": counts[2],
            "inference_stats": stages,
            # Decode and encode are timed per request (inference_stats), not per run: 0 here.
            "batch_stats": [{"batch_size": rows, "compute_input": duration(), "compute_infer": duration(runs, ns),
                             "compute_output": duration()} for rows, (runs, ns) in batches],  # fmt: skip
        }


def zero_report(name: str, version: str) -> dict:
    return VersionStatistics().report(name, version)


class Statistics:
    """Every served model version's VersionStatistics (see the module docstring)."""

    def __init__(self) -> None:
        self._versions: dict[Model, VersionStatistics] = {}

    def watch(self, model: "Model") -> "RunObserver":
        """Start counting a model version; returns its per-run observer (called from worker threads)."""
        stats = self._versions.setdefault(model, VersionStatistics())
        return stats.ran

    def forget(self, model: "Model") -> None:
        self._versions.pop(model, None)

    def of(self, model: "Model") -> VersionStatistics | None:
        """A watched version's counters; None for one not watched (or no longer served: its counts went with it)."""
        return self._versions.get(model)

    def report(self, repository: "Repository", name: str = "", version: str | int | None = "") -> list[dict]:
        """Triton's ModelStatistics of every served version (name ""), of every version of `name` (version ""),
        or of one version; ModelNotFound (the repository's message) for an unknown model or version."""
        if not name:
            if version not in ("", None):
                raise InvalidInput(f"statistics of version {str(version)!r} need a model name; none was given")
            models = list(repository)
        elif version in ("", None):
            repository.get(name)  # ModelNotFound for an unknown model
            models = [repository.get(name, v) for v in repository.versions(name)]
        else:
            models = [repository.get(name, version)]
        reports = []
        for model in models:
            stats = self._versions.get(model)
            version_name = str(model.version)
            reports.append(stats.report(model.name, version_name) if stats else zero_report(model.name, version_name))
        return reports
