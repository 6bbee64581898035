"""The server's errors, and the one place that turns them into gRPC status codes.

Code below the servicers raises these plain exceptions and never touches gRPC; `grpc_errors` wraps every servicer
method and aborts the call with the status this module assigns. The messages are meant for the person who sent
the request: they name what was expected and what came.
"""

from __future__ import annotations

import functools
import logging
from typing import Any, Awaitable, Callable, TypeVar

import grpc

log = logging.getLogger(__name__)


class ServingError(Exception):
    """Base of every error the server reports to a client."""

    @property
    def message(self) -> str:
        return str(self.args[0]) if self.args else type(self).__name__


class ModelNotFound(ServingError, LookupError):
    """No such model, or no such version of it."""


class InvalidInput(ServingError, ValueError):
    """The request does not fit the protocol or the model: names, datatypes, shapes, contents, outputs."""


class ModelRunError(ServingError, RuntimeError):
    """The model failed while running (ONNX Runtime's own message is kept)."""


class ShuttingDown(ServingError):
    """The server is draining before it stops and takes no new work."""


class RepositoryError(Exception):
    """The model repository or a model's config is unusable. Raised at start-up, never sent to a client."""


# The mapping. Order matters only for subclasses, and there are none among these.
STATUS_CODES: dict[type[ServingError], grpc.StatusCode] = {
    ModelNotFound: grpc.StatusCode.NOT_FOUND,
    InvalidInput: grpc.StatusCode.INVALID_ARGUMENT,
    ModelRunError: grpc.StatusCode.INTERNAL,
    ShuttingDown: grpc.StatusCode.UNAVAILABLE,
}


def status_of(error: BaseException) -> tuple[grpc.StatusCode, str]:
    """The status code and message a client gets for `error`; anything unexpected is INTERNAL."""
    for kind, code in STATUS_CODES.items():
        if isinstance(error, kind):
            return code, error.message
    return grpc.StatusCode.INTERNAL, f"internal server error: {type(error).__name__}: {error}"


Handler = TypeVar("Handler", bound=Callable[..., Awaitable[Any]])


def grpc_errors(method: Handler) -> Handler:
    """Decorate an async unary servicer method so that any exception becomes a status on the call, not a crash."""

    @functools.wraps(method)
    async def wrapper(self, request, context: grpc.aio.ServicerContext):
        try:
            return await method(self, request, context)
        except ServingError as error:
            code, message = status_of(error)
            log.debug("%s -> %s: %s", method.__name__, code.name, message)
        except Exception as error:  # a bug of ours: log it in full, tell the client it is ours
            code, message = status_of(error)
            log.exception("unexpected error in %s", method.__name__)
        # abort() raises; called outside the except block so the traceback is not chained into gRPC's.
        await context.abort(code, message)

    return wrapper  # type: ignore[return-value]
