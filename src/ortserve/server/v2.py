"""The Open Inference Protocol (KServe v2) servicer, with Triton's extensions: translation between its messages
and the data plane (ortserve.server.dataplane), nothing else.

Tensors are decoded and encoded by ortserve.server.codec (shared with the clients); status codes come from
ortserve.server.errors. The data plane answers management calls as dicts in the protocol's JSON form, which
json_format turns into the messages (so the REST and gRPC forms cannot drift apart).
"""

from __future__ import annotations

import asyncio
import logging
import time

from google.protobuf import json_format
from google.protobuf.message import DecodeError

from ortserve._proto import grpc_service_pb2 as pb
from ortserve._proto import grpc_service_pb2_grpc as pb_grpc
from ortserve.server import codec
from ortserve.server.dataplane import DataPlane, RequestedOutput
from ortserve.server.errors import InvalidInput, ServingError, grpc_errors, status_of

log = logging.getLogger(__name__)


def parameter_values(parameters) -> dict:
    """A map<string, InferParameter> (or a repository/log SettingValue map) as plain Python values."""
    values = {}
    for key, parameter in parameters.items():
        kind = parameter.WhichOneof("parameter_choice")
        values[key] = None if kind is None else getattr(parameter, kind)
    return values


def requested_outputs(request: pb.ModelInferRequest) -> list[RequestedOutput]:
    outputs = []
    for output in request.outputs:
        classification = 0
        if output.parameters:
            params = parameter_values(output.parameters)
            if "shared_memory_region" in params:
                raise InvalidInput(f"output {output.name!r}: shared memory is not supported by this server")
            classification = params.get("classification", 0)
            if type(classification) is not int or classification < 0:
                raise InvalidInput(f"output {output.name!r}: parameter 'classification' must be a whole number of "
                                   f"classes, got {classification!r}")  # fmt: skip
        outputs.append(RequestedOutput(output.name, classification))
    return outputs


def transport_deadline(context) -> float | None:
    """The call's gRPC deadline on time.monotonic(), None without one."""
    remaining = context.time_remaining()
    return None if remaining is None else time.monotonic() + remaining


def _setting(value) -> pb.LogSettingsResponse.SettingValue:
    if isinstance(value, bool):
        return pb.LogSettingsResponse.SettingValue(bool_param=value)
    if isinstance(value, int):
        return pb.LogSettingsResponse.SettingValue(uint32_param=value)
    return pb.LogSettingsResponse.SettingValue(string_param=value)


class InferenceServicer(pb_grpc.GRPCInferenceServiceServicer):
    def __init__(self, plane: DataPlane) -> None:
        self.plane = plane

    @grpc_errors
    async def ServerLive(self, request, context):
        return pb.ServerLiveResponse(live=True)

    @grpc_errors
    async def ServerReady(self, request, context):
        return pb.ServerReadyResponse(ready=self.plane.server_ready())

    @grpc_errors
    async def ServerMetadata(self, request, context):
        return pb.ServerMetadataResponse(**self.plane.server_metadata())

    @grpc_errors
    async def ModelReady(self, request, context):
        ready, _ = self.plane.model_readiness(request.name, request.version)
        return pb.ModelReadyResponse(ready=ready)

    @grpc_errors
    async def ModelMetadata(self, request, context):
        return pb.ModelMetadataResponse(**self.plane.model_metadata(request.name, request.version))

    @grpc_errors
    async def ModelInfer(self, request, context):
        return await self._infer(request, transport_deadline(context))

    async def _infer(self, request: pb.ModelInferRequest, deadline: float | None) -> pb.ModelInferResponse:
        with self.plane.request("grpc", request.model_name, request.model_version, request.id) as call:
            inputs = codec.decode_request_inputs(request)
            requested = requested_outputs(request) if request.outputs else None
            parameters = parameter_values(request.parameters) if request.parameters else None
            outputs = await call.infer(inputs, requested, parameters, deadline)
            model = call.model
            response = pb.ModelInferResponse(model_name=model.name, model_version=str(model.version), id=request.id)
            codec.encode_response_outputs(response, outputs)
        return response

    async def ModelStreamInfer(self, request_iterator, context):
        """Each request runs as soon as it comes (so the batcher can join them); answers go back as they are ready,
        each with its request's id. A failed request is answered with its error_message; the stream goes on. A
        message that is not a ModelInferRequest ends the stream with INVALID_ARGUMENT."""
        answers: asyncio.Queue = asyncio.Queue()
        deadline = transport_deadline(context)
        running: set[asyncio.Task] = set()

        async def answer(request: pb.ModelInferRequest) -> None:
            try:
                response = pb.ModelStreamInferResponse(infer_response=await self._infer(request, deadline))
            except Exception as error:
                if not isinstance(error, ServingError):
                    log.exception("unexpected error in ModelStreamInfer")
                _, message = status_of(error)
                response = pb.ModelStreamInferResponse(
                    error_message=message,
                    infer_response=pb.ModelInferResponse(model_name=request.model_name,
                                                         model_version=request.model_version, id=request.id),
                )  # fmt: skip
            await answers.put(response)

        async def read() -> None:
            try:
                async for request in request_iterator:
                    task = asyncio.ensure_future(answer(request))
                    running.add(task)
                    task.add_done_callback(running.discard)
                await asyncio.gather(*running)
            except DecodeError as error:  # grpc parses each message as the servicer reads it
                raise InvalidInput(f"a message on the stream is not a ModelInferRequest ({error}); the stream "
                                   "ends here") from None  # fmt: skip
            finally:  # the requests ended, or reading them failed: either way the writer must stop waiting
                answers.put_nowait(None)

        reader = asyncio.ensure_future(read())
        try:
            while (response := await answers.get()) is not None:
                yield response
            await reader  # the stream's own failure, if any
        except ServingError as error:
            await context.abort(*status_of(error))
        finally:
            reader.cancel()
            for task in list(running):
                task.cancel()

    @grpc_errors
    async def ModelConfig(self, request, context):
        config = self.plane.model_config(request.name, request.version)
        response = pb.ModelConfigResponse()
        json_format.ParseDict(config, response.config)
        return response

    @grpc_errors
    async def ModelStatistics(self, request, context):
        stats = self.plane.model_statistics(request.name, request.version)
        return json_format.ParseDict(stats, pb.ModelStatisticsResponse())

    @grpc_errors
    async def RepositoryIndex(self, request, context):
        index = self.plane.repository_index(ready_only=request.ready)
        return json_format.ParseDict({"models": index}, pb.RepositoryIndexResponse())

    @grpc_errors
    async def RepositoryModelLoad(self, request, context):
        await self.plane.load_model(request.model_name, parameter_values(request.parameters))
        return pb.RepositoryModelLoadResponse()

    @grpc_errors
    async def RepositoryModelUnload(self, request, context):
        await self.plane.unload_model(request.model_name, parameter_values(request.parameters))
        return pb.RepositoryModelUnloadResponse()

    @grpc_errors
    async def LogSettings(self, request, context):
        changes = parameter_values(request.settings)
        settings = self.plane.update_log_settings(changes) if changes else self.plane.log_settings()
        response = pb.LogSettingsResponse()
        for key, value in settings.items():
            response.settings[key].CopyFrom(_setting(value))
        return response
