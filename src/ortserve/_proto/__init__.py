"""Code generated from protos/ by grpcio-tools: do not edit the *_pb2* files, run `make protos`.

How the files get here (ortserve.server.codegen): the .proto files live at protos/ortserve/_proto/ and are compiled
with `-I protos`, so protoc names them `ortserve/_proto/...` and the generated modules import each other as
`ortserve._proto.xxx_pb2` -- no sys.path tricks. predict.proto imports the onnx wheel's own onnx/onnx-ml.proto
(`-I site-packages`), so its code imports `onnx.onnx_ml_pb2` rather than a second copy of onnx.TensorProto.

One edit is made after protoc: grpc_service_pb2 registers its descriptors in POOL below instead of protobuf's
process-wide default pool. tritonclient.grpc (and MLServer, and any other Open Inference Protocol client) registers
the same message names (`inference.ModelInferRequest`, ...) in the default pool, and protobuf refuses a second
definition of a symbol ("duplicate symbol 'inference.ServerLiveRequest'"). With its own pool our v2 code can live
in the same process as tritonclient, which the tests and lessons rely on; on the wire nothing changes.
"""

from google.protobuf import descriptor_pool

# Descriptors of the Open Inference Protocol messages (grpc_service.proto), kept apart from the default pool.
POOL = descriptor_pool.DescriptorPool()
