"""`python -m ortserve health`: ask a server's grpc.health.v1 service whether it is SERVING; exit 0 if so, else 1.

    python -m ortserve health                                   # the server on 127.0.0.1:50051 as a whole
    python -m ortserve health --address 10.0.0.7:50051 --service digits_cnn --timeout 2

Prints one line, `HOST:PORT[ SERVICE]: STATUS` -- STATUS is the health status (SERVING, NOT_SERVING, ...) or the
failed call's gRPC status and message (UNAVAILABLE when nothing listens, NOT_FOUND for an unknown service). The
container image's HEALTHCHECK runs it; Kubernetes asks the same service with its own `grpc:` probes (deploy/).
A draining server (SIGTERM) answers NOT_SERVING, so a load balancer that asks stops sending it work.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Sequence

from ortserve.client import DEFAULT_ADDRESS, ClientTls, InferenceClient, InferenceServerError

DEFAULT_TIMEOUT = 3.0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m ortserve health",
        description="Check a server's grpc.health.v1 status: exit 0 when SERVING, 1 otherwise (one line of output).",
    )
    parser.add_argument("--address", default=DEFAULT_ADDRESS, metavar="HOST:PORT",
                        help="the server's gRPC address (default: %(default)s)")
    parser.add_argument("--service", default="", metavar="NAME",
                        help="a service or model name; empty (the default) asks about the server as a whole")
    parser.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT, metavar="SECONDS",
                        help="give up after this long (default: %(default)g)")
    tls = parser.add_argument_group("TLS", "for a server started with --tls_cert (health checks need no token)")
    tls.add_argument("--tls_ca", type=Path, metavar="PEM", help="check the server's certificate against this CA")
    tls.add_argument("--tls_cert", type=Path, metavar="PEM", help="mutual TLS: this client's certificate")
    tls.add_argument("--tls_key", type=Path, metavar="PEM", help="mutual TLS: its private key")
    return parser  # fmt: skip


def check(address: str, service: str = "", timeout: float = DEFAULT_TIMEOUT,
          tls: ClientTls | None = None) -> tuple[bool, str]:  # fmt: skip
    """(serving?, what to print)."""
    where = f"{address} {service}" if service else address
    try:
        with InferenceClient(address, timeout=timeout, tls=tls) as client:
            status = client.health(service)
    except InferenceServerError as error:
        return False, f"{where}: {error.code.name}: {' '.join(error.message.split())}"
    return status == "SERVING", f"{where}: {status}"


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    secured = args.tls_ca or args.tls_cert or args.tls_key
    try:
        tls = ClientTls(args.tls_ca, args.tls_cert, args.tls_key) if secured else None
        serving, line = check(args.address, args.service, args.timeout, tls)
    except (ValueError, OSError) as error:  # a bad TLS file
        serving, line = False, f"{args.address}: {error}"
    print(line, flush=True)
    return 0 if serving else 1
