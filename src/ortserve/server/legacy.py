"""The old ONNX Runtime Server's PredictionService/Predict: translation between onnx.TensorProto maps and numpy.

That protocol names no model, so it serves the repository's default model (named `default`, else the only one).
onnx.numpy_helper does the TensorProto conversions; the data plane (ortserve.server.dataplane) does the rest.
"""

from __future__ import annotations

from onnx import numpy_helper

from ortserve._proto import predict_pb2 as pb
from ortserve._proto import predict_pb2_grpc as pb_grpc
from ortserve.server.dataplane import DataPlane, RequestedOutput
from ortserve.server.errors import InvalidInput, grpc_errors


def tensor_to_array(name: str, tensor):
    try:
        return numpy_helper.to_array(tensor)
    except Exception as error:  # wrong raw_data length, unknown data_type, ...
        raise InvalidInput(f"input {name!r} is not a readable onnx.TensorProto: {error}") from None


async def predict(plane: DataPlane, request: pb.PredictRequest, protocol: str, name: str | None = None,
                  version: str = "") -> pb.PredictResponse:  # fmt: skip
    """Answer one PredictRequest; `name` None: the repository's default model (what the gRPC form serves)."""
    with plane.request(protocol, name, version) as call:
        inputs = {name: tensor_to_array(name, tensor) for name, tensor in request.inputs.items()}
        requested = [RequestedOutput(n) for n in request.output_filter]
        outputs = await call.infer(inputs, requested)
        response = pb.PredictResponse()
        for output_name, array in outputs.items():
            response.outputs[output_name].CopyFrom(numpy_helper.from_array(array, output_name))
    return response


class PredictionServicer(pb_grpc.PredictionServiceServicer):
    def __init__(self, plane: DataPlane) -> None:
        self.plane = plane

    @grpc_errors
    async def Predict(self, request, context):
        return await predict(self.plane, request, "legacy")
