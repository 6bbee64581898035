"""`python -m ortserve COMMAND ...`: one entry point for the package's command-line tools."""

from __future__ import annotations

import importlib
import sys

# command -> (module, one-line help). Modules are imported only when their command runs.
COMMANDS = {
    "bench": ("ortserve.bench", "measure the server against a baseline, an echo ceiling and in-process ONNX Runtime"),
    "exercises": ("ortserve.exercises", "regenerate exercises/ from solutions/"),
    "health": ("ortserve.health", "check a server's grpc.health.v1 status: exit 0 when SERVING, 1 otherwise"),
    "models": ("ortserve.zoo_cli", "build the course's models into models/ (what `ortserve.zoo.ensure` does)"),
    "serve": ("ortserve.server.cli", "run the gRPC inference server (Open Inference Protocol + the old ORT Server's)"),
    "soak": ("ortserve.soak", "hold a server under mixed good and bad load; check answers, errors, memory, shutdown"),
}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        width = max(map(len, COMMANDS))
        lines = [f"  {name:<{width}}  {help_}" for name, (_, help_) in COMMANDS.items()]
        print("usage: python -m ortserve COMMAND [ARGS]\n\ncommands:\n" + "\n".join(lines))
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    module = importlib.import_module(COMMANDS[argv[0]][0])
    return module.main(argv[1:])


if __name__ == "__main__":
    sys.exit(main())
