"""ortserve: the course's shared package -- digits data, the model zoo, and a gRPC inference server on ONNX Runtime."""

__version__ = "0.1.0"
