"""The Open Inference Protocol's HTTP/REST form (KServe v2, as Triton and tritonclient.http speak it), on FastAPI:
translation between HTTP/JSON and the data plane (ortserve.server.dataplane), nothing else.

    GET  /v2/health/live | /v2/health/ready | /v2                   liveness, readiness (400 false), server metadata
    GET  /v2/models/{name}[/versions/{v}][/ready|/config|/stats]    metadata, readiness, configuration, statistics
    POST /v2/models/{name}[/versions/{v}]/infer                     {"id", "parameters", "inputs", "outputs"}
    GET  /v2/models/stats                                           statistics of every model
    POST /v2/repository/index | /v2/repository/models/{name}/load | /unload
    GET|POST /v2/logging                                            log settings
    POST /v1/models/{name}[/versions/{v}]:predict | /score          the old ONNX Runtime Server's predict

Every v2 error is `{"error": "<message>"}` with the HTTP status of its row in ortserve.server.errors (the /v1
routes answer in the old server's forms, see ortserve.server.legacy). Inference takes
JSON tensors or, with the binary tensor data extension, raw bytes after the JSON header
(Inference-Header-Content-Length), gzip or deflate bodies too; tensors are (de)coded by ortserve.server.codec.
The hot path reads the raw body and json.loads it: no pydantic validation of tensor data.

`RestEndpoint` runs uvicorn on the grpc.aio server's event loop, so both protocols share one batcher; it never
installs signal handlers and stops when InferenceServer.stop() has drained. Given a TokenAuthority, `build_app`
puts BearerTokenMiddleware in front of every route but health (ortserve.server.security).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import socket
import uuid
import zlib
from typing import Any, Awaitable, Callable

import uvicorn
from fastapi import FastAPI, Request, Response
from starlette.exceptions import HTTPException

import ortserve
from ortserve.server import codec, legacy
from ortserve.server.dataplane import DataPlane, RequestedOutput
from ortserve.server.errors import InvalidInput, MessageTooLarge, ServingError, Unauthenticated, http_status_of
from ortserve.server.repository import DEFAULT_MODEL_NAME
from ortserve.server.security import AUTHORIZATION, TokenAuthority, is_health_route

log = logging.getLogger(__name__)

HEADER_LENGTH = "Inference-Header-Content-Length"
JSON = "application/json"
BINARY = "application/octet-stream"
_DECOMPRESSORS = {"gzip": 16 + zlib.MAX_WBITS, "deflate": zlib.MAX_WBITS}  # zlib window bits per Content-Encoding


def dumps(body: Any) -> bytes:
    return json.dumps(body, separators=(",", ":")).encode()


def json_response(body: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(dumps(body), status, headers=headers, media_type=JSON)


def error_response(status: int, message: str, headers: dict[str, str] | None = None) -> Response:
    return json_response({"error": message}, status, headers)


def failure(request: Request, error: Exception) -> tuple[int, str]:
    """The HTTP status and message a route's exception answers with (ortserve.server.errors), logged; call it
    from the except block."""
    status, message = http_status_of(error)
    if isinstance(error, ServingError):
        log.debug("%s %s -> %d: %s", request.method, request.url.path, status, message)
    else:  # a bug of ours: log it in full, tell the client it is ours
        log.exception("unexpected error in %s %s", request.method, request.url.path)
    return status, message


def rest_errors(handler: Callable[..., Awaitable[Response]]) -> Callable[..., Awaitable[Response]]:
    """Turn any exception of a route into {"error": message} with its status (ortserve.server.errors)."""

    @functools.wraps(handler)
    async def wrapper(self, request: Request) -> Response:
        try:
            return await handler(self, request)
        except Exception as error:
            return error_response(*failure(request, error))

    return wrapper


def legacy_http(handler: Callable[..., Awaitable[Response]]) -> Callable[..., Awaitable[Response]]:
    """The old ONNX Runtime Server's HTTP conventions around a route: every answer carries a new x-ms-request-id
    (also request.state.request_id) and the client's x-ms-client-request-id back; an exception answers
    {"error_code", "error_message"} with its status (ortserve.server.legacy)."""

    @functools.wraps(handler)
    async def wrapper(self, request: Request) -> Response:
        ids = {legacy.REQUEST_ID: str(uuid.uuid4())}
        if request.headers.get(legacy.CLIENT_REQUEST_ID):
            ids[legacy.CLIENT_REQUEST_ID] = request.headers[legacy.CLIENT_REQUEST_ID]
        request.state.request_id = ids[legacy.REQUEST_ID]
        try:
            response = await handler(self, request)
        except Exception as error:
            status, message = failure(request, error)
            response = Response(legacy.error_body(status, message), status, media_type=JSON)
        response.headers.update(ids)
        return response

    return wrapper


class RestApi:
    """The route handlers, over one data plane (ortserve.server.dataplane)."""

    def __init__(self, plane: DataPlane, max_message_bytes: int) -> None:
        self.plane = plane
        self.max_message_bytes = max_message_bytes

    @rest_errors
    async def server_live(self, request: Request) -> Response:
        return json_response({"live": True})

    @rest_errors
    async def server_ready(self, request: Request) -> Response:
        if not self.plane.server_ready():
            return json_response({"ready": False, "error": "the server is shutting down"}, 400)
        return json_response({"ready": True})

    @rest_errors
    async def server_metadata(self, request: Request) -> Response:
        return json_response(self.plane.server_metadata())

    @rest_errors
    async def model_metadata(self, request: Request) -> Response:
        name, version = _model_path(request)
        return json_response(self.plane.model_metadata(name, version))

    @rest_errors
    async def model_ready(self, request: Request) -> Response:
        name, version = _model_path(request)
        ready, why = self.plane.model_readiness(name, version)
        if not ready:
            return json_response({"name": name, "ready": False, "error": why}, 400)
        return json_response({"name": name, "ready": True})

    @rest_errors
    async def model_config(self, request: Request) -> Response:
        name, version = _model_path(request)
        return json_response(self.plane.model_config(name, version))

    @rest_errors
    async def model_statistics(self, request: Request) -> Response:
        params = request.path_params
        return json_response(self.plane.model_statistics(params.get("name", ""), params.get("version", "")))

    @rest_errors
    async def repository_index(self, request: Request) -> Response:
        body = await self._json_body(request)
        ready = body.get("ready", False)
        if not isinstance(ready, bool):
            raise InvalidInput(f"'ready' must be true or false, got {codec.json_type(ready)}")
        return json_response(self.plane.repository_index(ready_only=ready))

    @rest_errors
    async def load_model(self, request: Request) -> Response:
        parameters = await self._parameters(request)
        await self.plane.load_model(request.path_params["name"], parameters)
        return json_response({})

    @rest_errors
    async def unload_model(self, request: Request) -> Response:
        parameters = await self._parameters(request)
        await self.plane.unload_model(request.path_params["name"], parameters)
        return json_response({})

    @rest_errors
    async def log_settings(self, request: Request) -> Response:
        if request.method == "GET":
            return json_response(self.plane.log_settings())
        return json_response(self.plane.update_log_settings(await self._json_body(request)))

    @rest_errors
    async def infer(self, request: Request) -> Response:
        name, version = _model_path(request)
        with self.plane.request("rest", name, version) as call:
            payload, binary = parse_body(await self._read_body(request), request.headers)
            request_id = call.record.request_id = codec.json_field(payload, "id", str, "the request",
                                                                   required=False) or ""  # fmt: skip
            parameters = codec.json_field(payload, "parameters", dict, "the request", required=False) or {}
            inputs = codec.decode_json_inputs(codec.json_field(payload, "inputs", list, "the request"), binary)
            requested, as_binary = requested_outputs(payload, parameters)
            outputs = await call.infer(inputs, requested, parameters)
            model = call.model
            answer: dict[str, Any] = {"model_name": model.name, "model_version": str(model.version)}
            if request_id:
                answer["id"] = request_id
            answer["outputs"], raw = codec.encode_json_outputs(outputs, as_binary)
            header = dumps(answer)
            if len(header) + len(raw) > self.max_message_bytes:
                raise MessageTooLarge(f"the answer would be {len(header) + len(raw)} bytes; this server sends at "
                                      f"most {self.max_message_bytes} (--max_message_mb); ask for fewer rows or "
                                      "outputs")  # fmt: skip
        if not any(as_binary(name) for name in outputs):
            return Response(header, media_type=JSON)
        return Response(header + raw, media_type=BINARY, headers={HEADER_LENGTH: str(len(header))})

    @legacy_http
    async def legacy_predict(self, request: Request) -> Response:
        """The old server's POST /v1/models/{name}[/versions/{version}]:predict, and /score (model `default`)."""
        params = request.path_params
        media_type = legacy.response_media_type(request.headers.get("accept"))
        message = legacy.decode_request(await self._read_body(request), request.headers.get("content-type"))
        answer = await legacy.predict(self.plane, message, "legacy", params.get("name", DEFAULT_MODEL_NAME),
                                      params.get("version", ""), request.state.request_id)  # fmt: skip
        body = legacy.encode_response(answer, media_type)
        if len(body) > self.max_message_bytes:
            raise MessageTooLarge(f"the answer would be {len(body)} bytes; this server sends at most "
                                  f"{self.max_message_bytes} (--max_message_mb); ask for fewer rows or "
                                  "outputs")  # fmt: skip
        return Response(body, media_type=media_type)

    async def _json_body(self, request: Request) -> dict:
        """A management call's JSON object body ({} when empty)."""
        body = await self._read_body(request)
        if not body.strip():
            return {}
        try:
            payload = json.loads(body)
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise InvalidInput(f"the request body is not valid JSON: {error}") from None
        if not isinstance(payload, dict):
            raise InvalidInput(f"the request body must be a JSON object, got {codec.json_type(payload)}")
        return payload

    async def _parameters(self, request: Request) -> dict:
        """The "parameters" object of a repository load/unload body."""
        body = await self._json_body(request)
        return codec.json_field(body, "parameters", dict, "the request", required=False) or {}

    async def _read_body(self, request: Request) -> bytes:
        """The request body, decompressed, refused once it passes the message limit."""
        limit = self.max_message_bytes
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > limit:
            raise MessageTooLarge(f"the request body has {declared} bytes; this server takes at most {limit} "
                                  "(--max_message_mb)")  # fmt: skip
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise MessageTooLarge(f"the request body is over {limit} bytes, the most this server takes "
                                      "(--max_message_mb)")  # fmt: skip
            chunks.append(chunk)
        body = b"".join(chunks)
        encoding = request.headers.get("content-encoding", "identity").strip().lower()
        if encoding == "identity":
            return body
        if encoding not in _DECOMPRESSORS:
            raise InvalidInput(f"Content-Encoding {encoding!r} is not supported; send identity, gzip or deflate")
        decompressor = zlib.decompressobj(_DECOMPRESSORS[encoding])
        try:
            plain = decompressor.decompress(body, limit + 1)
        except zlib.error as error:
            raise InvalidInput(f"the body is not valid {encoding} data: {error}") from None
        if len(plain) > limit:
            raise MessageTooLarge(f"the decompressed request body is over {limit} bytes, the most this server takes")
        if not decompressor.eof:
            raise InvalidInput(f"the {encoding} body ends before its compressed stream does")
        return plain


def _model_path(request: Request) -> tuple[str, str]:
    params = request.path_params
    return params["name"], params.get("version", "")


def parse_body(body: bytes, headers) -> tuple[dict, memoryview]:
    """(the JSON request object, the binary data after it) of an inference request body."""
    declared = headers.get(HEADER_LENGTH)
    if declared is None:
        header, binary = body, memoryview(b"")
    else:
        if not declared.strip().isdigit():
            raise InvalidInput(f"{HEADER_LENGTH} must be the JSON header's length in bytes, got {declared!r}")
        length = int(declared)
        if length > len(body):
            raise InvalidInput(f"{HEADER_LENGTH} is {length} but the body has only {len(body)} bytes")
        header, binary = body[:length], memoryview(body)[length:]
    try:
        payload = json.loads(header)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        hint = ""
        if declared is None and (isinstance(error, UnicodeDecodeError) or error.msg == "Extra data"):
            hint = f" (binary data after the JSON needs the {HEADER_LENGTH} header)"
        raise InvalidInput(f"the request body is not valid JSON: {error}{hint}") from None
    if not isinstance(payload, dict):
        raise InvalidInput('the request body must be a JSON object {"inputs": [...]}, '
                           f"got {codec.json_type(payload)}")  # fmt: skip
    return payload, binary


def requested_outputs(payload: dict, parameters: dict) -> tuple[list[RequestedOutput] | None, Callable[[str], bool]]:
    """(the outputs asked for, None for all; whether an output goes back as binary data)."""
    default = parameters.get("binary_data_output", False)
    if not isinstance(default, bool):
        raise InvalidInput(f"parameters.binary_data_output must be true or false, got {codec.json_type(default)}")
    listed = codec.json_field(payload, "outputs", list, "the request", required=False)
    if not listed:
        return None, lambda name: default
    names, binary = [], {}
    for i, output in enumerate(listed):
        if not isinstance(output, dict):
            raise InvalidInput(f'outputs[{i}] must be an object {{"name", "parameters"}}, '
                               f"got {codec.json_type(output)}")  # fmt: skip
        name = codec.json_field(output, "name", str, f"outputs[{i}]")
        what = f"output {name!r}"
        params = codec.json_field(output, "parameters", dict, what, required=False) or {}
        if "shared_memory_region" in params:
            raise InvalidInput(f"{what}: shared memory is not supported by this server; send the data in the body")
        classification = params.get("classification", 0)
        if type(classification) is not int or classification < 0:
            raise InvalidInput(f"{what}: parameters.classification must be a whole number of classes, "
                               f"got {codec.json_type(classification)}")  # fmt: skip
        flag = params.get("binary_data", default)
        if not isinstance(flag, bool):
            raise InvalidInput(f"{what}: parameters.binary_data must be true or false, got {codec.json_type(flag)}")
        names.append(RequestedOutput(name, classification))
        binary[name] = flag
    return names, lambda name: binary.get(name, default)


async def http_error(request: Request, error: HTTPException) -> Response:
    """Routing errors (no such route, wrong method) in the protocol's error shape."""
    if error.status_code == 405:
        allowed = (error.headers or {}).get("Allow", "")
        message = f"{request.method} is not allowed on {request.url.path}; use {allowed or 'another method'}"
        return error_response(405, message, error.headers)
    if error.status_code == 404:
        message = (f"no route {request.method} {request.url.path}; the routes are /v2, /v2/health/live|ready, "
                   "/v2/models/{name}[/versions/{version}][/ready|/infer] and the old ONNX Runtime Server's "
                   "/v1/models/{name}[/versions/{version}]:predict")  # fmt: skip
        return error_response(404, message)
    return error_response(error.status_code, str(error.detail))


class BearerTokenMiddleware:
    """REST's form of security.BearerTokenInterceptor: every request but the health routes needs a good bearer
    token, else 401 {"error"} with `WWW-Authenticate: Bearer`. Plain ASGI: it sits on every request's path."""

    def __init__(self, app, authority: TokenAuthority) -> None:
        self.app = app
        self.authority = authority
        self._name = AUTHORIZATION.encode()

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http" and not is_health_route(scope["path"]):
            try:
                self.authority.check([v.decode("latin-1") for k, v in scope["headers"] if k == self._name])
            except Unauthenticated as error:
                status, message = http_status_of(error)
                log.info("refused %s %s: %s", scope["method"], scope["path"], message)
                challenge = {"WWW-Authenticate": 'Bearer realm="ortserve"'}
                return await error_response(status, message, challenge)(scope, receive, send)
        await self.app(scope, receive, send)


def build_app(plane: DataPlane, max_message_bytes: int, auth: TokenAuthority | None = None) -> FastAPI:
    """The REST app: every route of the module docstring over the data plane, to callers with a bearer token
    `auth` accepts when it is given (see ortserve.server.security)."""
    app = FastAPI(title="ortserve: Open Inference Protocol (REST)", version=ortserve.__version__,
                  docs_url=None, redoc_url=None)  # fmt: skip  (docs pages would load scripts from a CDN)
    api = RestApi(plane, max_message_bytes)
    app.add_api_route("/v2/health/live", api.server_live, methods=["GET"])
    app.add_api_route("/v2/health/ready", api.server_ready, methods=["GET"])
    app.add_api_route("/v2", api.server_metadata, methods=["GET"])
    app.add_api_route("/v2/models/stats", api.model_statistics, methods=["GET"])  # before /v2/models/{name}
    for model in ("/v2/models/{name}", "/v2/models/{name}/versions/{version}"):
        app.add_api_route(model, api.model_metadata, methods=["GET"])
        app.add_api_route(f"{model}/ready", api.model_ready, methods=["GET"])
        app.add_api_route(f"{model}/infer", api.infer, methods=["POST"])
        app.add_api_route(f"{model}/config", api.model_config, methods=["GET"])
        app.add_api_route(f"{model}/stats", api.model_statistics, methods=["GET"])
    app.add_api_route("/v2/repository/index", api.repository_index, methods=["POST"])
    app.add_api_route("/v2/repository/models/{name}/load", api.load_model, methods=["POST"])
    app.add_api_route("/v2/repository/models/{name}/unload", api.unload_model, methods=["POST"])
    app.add_api_route("/v2/logging", api.log_settings, methods=["GET", "POST"])
    app.add_api_route("/v1/models/{name}:predict", api.legacy_predict, methods=["POST"])
    app.add_api_route("/v1/models/{name}/versions/{version}:predict", api.legacy_predict, methods=["POST"])
    app.add_api_route("/score", api.legacy_predict, methods=["POST"])
    app.add_exception_handler(HTTPException, http_error)
    if auth is not None:
        app.add_middleware(BearerTokenMiddleware, authority=auth)
    return app


# --------------------------------------------------------------------------------------------------
# Serving it


def uvicorn_config(app: FastAPI, **settings: Any) -> uvicorn.Config:
    """uvicorn's settings for the REST endpoint, the one place for them (TLS: ssl_certfile=..., ssl_keyfile=...)."""
    quiet = logging.getLogger("ortserve").getEffectiveLevel() > logging.DEBUG
    return uvicorn.Config(
        app,
        lifespan="off",
        ws="none",
        log_config=None,  # keep the process's logging as it is
        log_level=logging.WARNING if quiet else logging.INFO,  # uvicorn's start/stop chatter only when verbose
        access_log=False,
        http="httptools",  # the C parser: h11, the pure-Python default, costs about half of a REST call's CPU
        proxy_headers=False,
        server_header=False,
        **settings,
    )


class _Uvicorn(uvicorn.Server):
    """uvicorn.Server without its own signal handlers: whoever runs the event loop handles signals."""

    @contextlib.contextmanager
    def capture_signals(self):
        yield


def listen(address: str, port: int) -> socket.socket:
    """A socket bound to address:port (port 0: any free one), OSError saying which when that fails."""
    host = address[1:-1] if address.startswith("[") and address.endswith("]") else address
    try:
        family, kind, proto, _, sockaddr = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                              flags=socket.AI_PASSIVE)[0]  # fmt: skip
        sock = socket.socket(family, kind, proto)
    except OSError as error:
        raise OSError(f"cannot listen on {address}:{port} (REST): {error}") from None
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # rebind at once after a restart; never shares
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)  # [::] takes IPv4 too, as gRPC's does
        sock.bind(sockaddr)
    except OSError as error:
        sock.close()
        raise OSError(f"cannot listen on {address}:{port} (REST): {error.strerror or error}") from None
    return sock


class RestEndpoint:
    """The REST app served by uvicorn as a task on the running event loop.

        endpoint = RestEndpoint(build_app(...), "127.0.0.1", 0)   # binds now: OSError if it cannot
        await endpoint.start()                                    # endpoint.port is the bound port
        await endpoint.stop(timeout)                              # after the gate has drained
    """

    def __init__(self, app: FastAPI, address: str, port: int, **settings: Any) -> None:
        self.server = _Uvicorn(uvicorn_config(app, **settings))
        self.socket = listen(address, port)
        self.port: int = self.socket.getsockname()[1]
        self._task: asyncio.Task | None = None

    async def start(self) -> None:
        self._task = asyncio.ensure_future(self.server.serve(sockets=[self.socket]))
        while not self.server.started:
            if self._task.done():
                self.socket.close()
                self._task.result()  # its exception, if any (a bad TLS file, say)
                raise OSError(f"the REST endpoint on port {self.port} stopped while starting")
            await asyncio.sleep(0.001)

    async def stop(self, timeout: float) -> None:
        """Stop listening, let answers being written finish for up to `timeout` seconds, then cancel the rest."""
        if self._task is None or self._task.done():  # never started, or failed to
            self.socket.close()
            return
        self.server.config.timeout_graceful_shutdown = timeout  # read by uvicorn's shutdown, which starts now
        self.server.should_exit = True
        await self._task

    def force_stop(self) -> None:
        """Stop without waiting for anything (a second signal)."""
        self.server.should_exit = True
        self.server.force_exit = True
