#!/usr/bin/env bash
# Start the course's gRPC inference server with the old ONNX Runtime Server's flags, e.g.
#   ./run_ort_server.sh --model_path model.onnx --grpc_port 50051 --log_level info
#   ./run_ort_server.sh --model_repository models/repository --grpc_port 0
# With no model flag it serves models/repository (the digits models, built on first use).
# Every flag: ./run_ort_server.sh --help   (the server is `python -m ortserve serve`).
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
python="$here/.venv/bin/python"
if [[ ! -x "$python" ]]; then
    python="python3"
fi
# exec: signals (SIGTERM/SIGINT for the graceful shutdown) go straight to the server.
exec "$python" -m ortserve serve "$@"
