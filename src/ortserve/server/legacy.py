"""The old ONNX Runtime Server's PredictionService/Predict: translation between onnx.TensorProto maps and numpy.

That protocol names no model, so it serves the repository's default model (named `default`, else the only one).
onnx.numpy_helper does the TensorProto conversions; Model.infer does the checking and running.
"""

from __future__ import annotations

from onnx import numpy_helper

from ortserve._proto import predict_pb2 as pb
from ortserve._proto import predict_pb2_grpc as pb_grpc
from ortserve.server.errors import InvalidInput, grpc_errors
from ortserve.server.gate import Gate
from ortserve.server.observe import Observer
from ortserve.server.repository import Repository


def tensor_to_array(name: str, tensor):
    try:
        return numpy_helper.to_array(tensor)
    except Exception as error:  # wrong raw_data length, unknown data_type, ...
        raise InvalidInput(f"input {name!r} is not a readable onnx.TensorProto: {error}") from None


class PredictionServicer(pb_grpc.PredictionServiceServicer):
    def __init__(self, repository: Repository, gate: Gate, observer: Observer | None = None) -> None:
        self.repository = repository
        self.gate = gate
        self.observer = observer or Observer(repository, gate)

    @grpc_errors
    async def Predict(self, request, context):
        with self.observer.request("legacy", "") as record:  # the protocol names no model: counted under its model
            model = record.model = self.repository.default_model()
            inputs = {name: tensor_to_array(name, tensor) for name, tensor in request.inputs.items()}
            with self.gate.admit():
                outputs = await model.infer(inputs, list(request.output_filter), record.timing)
            response = pb.PredictResponse()
            for name, array in outputs.items():
                response.outputs[name].CopyFrom(numpy_helper.from_array(array, name))
        return response
