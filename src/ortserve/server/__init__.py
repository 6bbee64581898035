"""The gRPC inference server on ONNX Runtime.

    python -m ortserve serve --help            # or ./run_ort_server.sh --help

Rooms (data flows down this list and back):

    cli.py         command line (the old ONNX Runtime Server's flags), the "serving on" line, ServerProcess
    replicas.py    `serve --replicas N`: a supervisor running N server processes, a port each
    app.py         the grpc.aio server: servicers, health, reflection, message limits, graceful shutdown
    gate.py        admission of inference calls; turns new ones away while the server drains
    security.py    TLS (mutual optional) and bearer tokens: credentials, the token check on gRPC and REST
    observe.py     Prometheus metrics (the metrics endpoint) and the JSON request log, around every inference call
    v2.py          Open Inference Protocol (KServe v2) servicer: messages <-> numpy
    legacy.py      the old ONNX Runtime Server's PredictionService: onnx.TensorProto <-> numpy
    codec.py       the v2 datatype table and tensor encode/decode, shared with ortserve.client
    repository.py  which models and versions are served, from where, with which ModelConfig
    runtime.py     one ONNX Runtime session per model version: checks a request, runs it (Model.infer)
    errors.py      the server's errors and their gRPC status codes
    codegen.py     regenerates ortserve/_proto from protos/ (`make protos`)

Kept light on purpose: ortserve.client imports ortserve.server.codec, which should not pull in the server.
"""
