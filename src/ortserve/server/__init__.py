"""The gRPC inference server on ONNX Runtime.

    python -m ortserve serve --help            # or ./run_ort_server.sh --help

Rooms (data flows down this list and back):

    cli.py         command line (the old ONNX Runtime Server's flags), the "serving on" line, ServerProcess
    replicas.py    `serve --replicas N`: a supervisor running N server processes, a port each
    app.py         the grpc.aio server: servicers, health, reflection, message limits, graceful shutdown
    gate.py        admission of inference calls; turns new ones away while the server drains
    security.py    TLS (mutual optional) and bearer tokens: credentials, the token check on gRPC and REST
    observe.py     Prometheus metrics (the metrics endpoint) and the JSON request log, around every inference call
    v2.py          Open Inference Protocol (KServe v2) servicer and Triton's extensions: messages <-> data plane
    rest.py        the same protocol over HTTP/REST (FastAPI on uvicorn), and the old server's HTTP endpoint
    legacy.py      the old ONNX Runtime Server's PredictionService: onnx.TensorProto <-> data plane
    dataplane.py   what every protocol does alike: lookup, admission, inference, metadata, management calls
    codec.py       the v2 datatype table and tensor encode/decode, shared with ortserve.client
    modelconfig.py Triton's model configuration of a served version; statistics.py its counters
    classification.py  the classification extension's top-N strings and label files
    control.py     live model management: index, load, unload, polling (--model_control_mode)
    repository.py  which models and versions are served, from where, with which ModelConfig; warmup.py
    runtime.py     one ONNX Runtime session per model version: checks a request, runs it (Model.infer)
    batching.py    the dynamic batcher, a runner like runtime's SessionRunner
    errors.py      the server's errors and their gRPC and HTTP status codes
    codegen.py     regenerates ortserve/_proto from protos/ (`make protos`)

Kept light on purpose: ortserve.client imports ortserve.server.codec, which should not pull in the server.
"""
