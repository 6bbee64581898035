"""Warm-up, as Triton's model_warmup: requests a model version runs before it reports ready or takes calls.

The first session.run of a model pays for memory planning and kernel set-up; warming moves that cost from the
first caller to the load. Each ModelConfig.model_warmup entry runs `count` times with `batch_size` rows (the
batch axis is prepended to `dims` when the model batches, as Triton's max_batch_size > 0 does) on every session
of the model (the shared one and the lone one), in the loading thread, before the model is installed.

Every model input must be listed: an entry that leaves one out, names an unknown one, or gives the wrong
datatype or dims is refused with a RepositoryError naming it (no zeros are made up for what the config omits).
"""

from __future__ import annotations

import logging

import numpy as np

from ortserve.server import codec
from ortserve.server.errors import RepositoryError, ServingError
from ortserve.server.runtime import Feeds, Model, run_session

log = logging.getLogger(__name__)



def warm_up(model: Model) -> None:
    """Run the model's warm-up requests (RepositoryError when one is malformed or fails)."""
    warmups = model.config.model_warmup if model.config is not None else []
    sessions = [s for s in (model.session, model.lone_session) if s is not None]
    names = list(model.outputs)
    for warmup in warmups:
        feeds = warmup_feeds(model, warmup)
        where = f"{model.label}: warm-up {warmup.name!r}"
        for _ in range(warmup.count):
            for session in sessions:
                try:
                    run_session(session, feeds, names, where)
                except ServingError as error:
                    raise RepositoryError(f"{where} failed: {error.message}") from None
        log.info("%s ran %d time(s) with batch size %d", where, warmup.count, warmup.batch_size)


def warmup_feeds(model: Model, warmup) -> Feeds:
    """The inputs of one warm-up request, checked against the model like any request."""
    where = f"{model.label}: warm-up {warmup.name!r}"
    missing = [n for n in model.inputs if n not in warmup.inputs]
    unknown = [n for n in warmup.inputs if n not in model.inputs]
    if missing or unknown:
        parts = [f"lists no {', '.join(map(repr, missing))}" if missing else "",
                 f"names unknown input(s) {', '.join(map(repr, unknown))}" if unknown else ""]  # fmt: skip
        raise RepositoryError(f"{where} {' and '.join(p for p in parts if p)}; the model's inputs are "
                              f"{', '.join(map(repr, model.inputs))} and each needs data_type, dims and "
                              "zero_data or random_data")  # fmt: skip
    batched = model.max_batch_size > 0
    rng = np.random.default_rng(0)
    feeds = {}
    for name, given in warmup.inputs.items():
        datatype = codec.protocol_datatype(given.data_type)
        if datatype not in codec.DATATYPES:
            raise RepositoryError(f"{where}: input {name!r} has data_type {given.data_type!r}; expected one of "
                                  f"{', '.join(codec.DATATYPES)} (with or without TYPE_)")  # fmt: skip
        shape = ([warmup.batch_size] if batched and warmup.batch_size > 0 else []) + list(given.dims)
        feeds[name] = _data(codec.DATATYPES[datatype].dtype, shape, given.random_data, rng)
    try:
        return model.check_inputs(feeds)
    except ServingError as error:
        raise RepositoryError(f"{where} does not fit the model: {error.message}") from None


def _data(dtype: np.dtype, shape: list[int], random: bool, rng: np.random.Generator) -> np.ndarray:
    if dtype.kind == "O":
        return np.array([str(v) for v in rng.integers(0, 10**6, int(np.prod(shape)))] if random else
                        [""] * int(np.prod(shape)), dtype=object).reshape(shape)  # fmt: skip
    if not random:
        return np.zeros(shape, dtype)
    if dtype.kind == "f":
        return rng.random(shape).astype(dtype)
    if dtype.kind == "b":
        return rng.integers(0, 2, shape).astype(dtype)
    return rng.integers(0, 100, shape).astype(dtype)
