"""The server's errors, and the one place that turns them into status codes: gRPC's and HTTP's.

Code below the servicers raises these plain exceptions and never touches gRPC or HTTP; `grpc_errors` wraps every
servicer method and aborts the call with the status this module assigns, and the REST endpoint
(ortserve.server.rest) answers with the HTTP status of the same row (`http_status_of`). The messages are meant
for the person who sent the request: they name what was expected and what came.
"""

from __future__ import annotations

import functools
import logging
from typing import Any, Awaitable, Callable, NamedTuple, TypeVar

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


class UnsupportedMediaType(ServingError):
    """The request body comes in an encoding (Content-Type) the endpoint does not take."""


class ModelRunError(ServingError, RuntimeError):
    """The model failed while running (ONNX Runtime's own message is kept)."""


class ShuttingDown(ServingError):
    """The server is draining before it stops and takes no new work."""


class DeadlineExceeded(ServingError):
    """The request was still queued when its timeout or the call's deadline passed, so it was not run."""


class MessageTooLarge(ServingError):
    """A request (or its answer) is larger than the server's message limit (gRPC enforces its own)."""


class Unauthenticated(ServingError):
    """The call carries no bearer token, a malformed one, or one the server does not accept (never echoed)."""


class ModelControlDisabled(ServingError):
    """A repository load/unload the server's --model_control_mode does not allow (or its repository cannot do)."""


class ModelLoadError(ServingError):
    """A model (version) could not be loaded: unreadable file or config, ONNX Runtime's refusal, a failed warm-up."""


class RepositoryError(Exception):
    """The model repository or a model's config is unusable. Raised at start-up, never sent to a client."""


class ConfigurationError(Exception):
    """A server setting is unusable (TLS files, token file). Raised at start-up, never sent to a client."""


class Status(NamedTuple):
    grpc: grpc.StatusCode
    http: int


# The mapping: each error's gRPC status code and HTTP status. Order matters only for subclasses, and there are
# none among these.
STATUS_CODES: dict[type[ServingError], Status] = {
    ModelNotFound: Status(grpc.StatusCode.NOT_FOUND, 404),
    InvalidInput: Status(grpc.StatusCode.INVALID_ARGUMENT, 400),
    MessageTooLarge: Status(grpc.StatusCode.RESOURCE_EXHAUSTED, 413),
    UnsupportedMediaType: Status(grpc.StatusCode.INVALID_ARGUMENT, 415),
    ModelRunError: Status(grpc.StatusCode.INTERNAL, 500),
    ShuttingDown: Status(grpc.StatusCode.UNAVAILABLE, 503),
    DeadlineExceeded: Status(grpc.StatusCode.DEADLINE_EXCEEDED, 504),
    Unauthenticated: Status(grpc.StatusCode.UNAUTHENTICATED, 401),
    ModelControlDisabled: Status(grpc.StatusCode.FAILED_PRECONDITION, 400),
    ModelLoadError: Status(grpc.StatusCode.INTERNAL, 500),  # as Triton answers a failed load
}
INTERNAL = Status(grpc.StatusCode.INTERNAL, 500)  # anything unexpected: a bug of ours


def _status(error: BaseException) -> tuple[Status, str]:
    for kind, status in STATUS_CODES.items():
        if isinstance(error, kind):
            return status, error.message
    return INTERNAL, f"internal server error: {type(error).__name__}: {error}"


def status_of(error: BaseException) -> tuple[grpc.StatusCode, str]:
    """The gRPC status code and message a client gets for `error`; anything unexpected is INTERNAL."""
    status, message = _status(error)
    return status.grpc, message


def http_status_of(error: BaseException) -> tuple[int, str]:
    """The HTTP status and message a REST client gets for `error`; anything unexpected is 500."""
    status, message = _status(error)
    return status.http, message


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
