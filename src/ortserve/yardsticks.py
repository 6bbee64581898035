"""Four servers to measure the inference server against, each run in its own process by `python -m ortserve bench`.

- The **baseline**: the server people would write after the gRPC-basics lesson (04) -- a thread-pool
  `grpc.server`, the generated Open Inference Protocol stubs, one `session.run` per request, no batching. It
  answers ModelInfer for one model with raw contents, like the real server; it checks nothing.
- The **echo ceiling**: a grpc.aio server that answers every ModelInfer with one fixed, pre-serialised reply and
  does no work at all (no parsing, no model). No Python gRPC server can answer faster on the same machine, so
  served/echo says how much of the possible speed the real server reaches.
- The **protocol ceiling**: the echo plus the least a server must do to speak the protocol -- parse each request
  into a ModelInferRequest and answer a reply of its own, carrying the request's id (a copy of the model's real
  answer), serialised per call. No model, no numpy, no thread. It shows how much of the distance between the echo
  and the real server is the protocol's per-message work, which no Python server that reads its requests avoids.
- The **hand-off ceiling**: the protocol ceiling plus the hand-off the real server makes so that its event loop
  never blocks on a model: each request waits on a future; the requests that arrive in one loop turn go together
  to a worker thread, which does nothing but hand them back. The cheapest server that runs its model off the event
  loop, with perfect batching and a model that costs nothing.

All print the serving line of `python -m ortserve serve` (ortserve.server.cli.READY_LINE), so ServerProcess
starts and finds them:

    python -m ortserve.yardsticks baseline --model_path models/digits_cnn/model.onnx --name digits_cnn
    python -m ortserve.yardsticks echo --reply reply.bin          # reply.bin: a serialised ModelInferResponse
    python -m ortserve.yardsticks protocol --reply reply.bin
    python -m ortserve.yardsticks handoff --reply reply.bin
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Sequence

import grpc
import numpy as np

from ortserve.server.cli import READY_LINE, ServerProcess

SERVICE = "inference.GRPCInferenceService"
# Lesson 07 uses 4 threads; 8 keeps the pool from being the limit at the concurrencies the bench uses, while
# one session.run per request stays the limit, as in the lesson's server.
BASELINE_WORKERS = 8
MESSAGE_OPTIONS = [("grpc.max_send_message_length", -1), ("grpc.max_receive_message_length", -1)]


def serve_baseline(model_path: Path, name: str, port: int, workers: int = BASELINE_WORKERS) -> None:
    """The lesson-04 way: grpc.server(ThreadPoolExecutor), generated stubs, session.run per request."""
    import onnxruntime as ort

    from ortserve._proto import grpc_service_pb2 as pb
    from ortserve._proto import grpc_service_pb2_grpc as pb_grpc
    from ortserve.server.codec import DATATYPES, datatype_of

    session = ort.InferenceSession(str(model_path), providers=["CPUExecutionProvider"])
    output_names = [o.name for o in session.get_outputs()]

    class Servicer(pb_grpc.GRPCInferenceServiceServicer):
        def ModelInfer(self, request, context):
            feeds = {
                t.name: np.frombuffer(raw, dtype=DATATYPES[t.datatype].dtype).reshape(t.shape)
                for t, raw in zip(request.inputs, request.raw_input_contents)
            }
            values = session.run(output_names, feeds)
            response = pb.ModelInferResponse(model_name=name, model_version="1", id=request.id)
            for out_name, value in zip(output_names, values):
                response.outputs.add(name=out_name, datatype=datatype_of(value.dtype), shape=value.shape)
                response.raw_output_contents.append(value.tobytes())
            return response

    server = grpc.server(ThreadPoolExecutor(max_workers=workers), options=MESSAGE_OPTIONS)
    pb_grpc.add_GRPCInferenceServiceServicer_to_server(Servicer(), server)
    bound = server.add_insecure_port(f"127.0.0.1:{port}")
    server.start()
    print(READY_LINE.format(address=f"127.0.0.1:{bound}", models=f"{name} v1 (baseline)"), flush=True)
    stopped = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stopped.set())
    stopped.wait()
    server.stop(1).wait()


async def _serve_methods(methods: dict, port: int, description: str) -> None:
    """A grpc.aio server with these ModelInfer-style method handlers, until SIGTERM or SIGINT."""
    handler = grpc.method_handlers_generic_handler(SERVICE, methods)
    server = grpc.aio.server(handlers=[handler], options=MESSAGE_OPTIONS)
    bound = server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    print(READY_LINE.format(address=f"127.0.0.1:{bound}", models=description), flush=True)
    loop = asyncio.get_running_loop()
    stopped = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stopped.set)
    await stopped.wait()
    await server.stop(1)


def serve_echo(reply: bytes, port: int) -> None:
    async def model_infer(request: bytes, context) -> bytes:
        return reply

    # No (de)serialisers: the request stays bytes, the reply is sent as it is.
    methods = {"ModelInfer": grpc.unary_unary_rpc_method_handler(model_infer)}
    asyncio.run(_serve_methods(methods, port, "echo v1 (fixed reply)"))


def _parsing_handler(reply: bytes, handed_off: bool):
    """ModelInfer for the protocol ceiling (handed_off=False) and the hand-off ceiling (True); see the docstring."""
    from ortserve._proto import grpc_service_pb2 as pb

    answer = pb.ModelInferResponse.FromString(reply)

    def answer_to(request: pb.ModelInferRequest) -> pb.ModelInferResponse:
        response = pb.ModelInferResponse()
        response.CopyFrom(answer)
        response.id = request.id
        return response

    async def answer_at_once(request: pb.ModelInferRequest, context) -> pb.ModelInferResponse:
        return answer_to(request)

    worker = ThreadPoolExecutor(1, thread_name_prefix="handoff")
    waiting: list[asyncio.Future] = []  # requests of this loop turn, not yet handed off

    def hand_off(loop: asyncio.AbstractEventLoop) -> None:
        turn = waiting[:]
        waiting.clear()
        worker.submit(loop.call_soon_threadsafe, _release, turn)

    async def answer_after_hand_off(request: pb.ModelInferRequest, context) -> pb.ModelInferResponse:
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        waiting.append(future)
        if len(waiting) == 1:
            loop.call_soon(hand_off, loop)
        await future
        return answer_to(request)

    return grpc.unary_unary_rpc_method_handler(answer_after_hand_off if handed_off else answer_at_once,
                                               request_deserializer=pb.ModelInferRequest.FromString,
                                               response_serializer=pb.ModelInferResponse.SerializeToString)


def _release(futures: list[asyncio.Future]) -> None:
    for future in futures:
        if not future.done():  # the caller may have gone
            future.set_result(None)


def serve_protocol(reply: bytes, port: int) -> None:
    methods = {"ModelInfer": _parsing_handler(reply, handed_off=False)}
    asyncio.run(_serve_methods(methods, port, "protocol v1 (parsed request, copied reply)"))


def serve_handoff(reply: bytes, port: int) -> None:
    methods = {"ModelInfer": _parsing_handler(reply, handed_off=True)}
    asyncio.run(_serve_methods(methods, port, "handoff v1 (parsed request, worker-thread hand-off, copied reply)"))


class YardstickProcess(ServerProcess):
    """A yardstick in a subprocess: `with YardstickProcess(["echo", "--reply", path]) as echo: echo.address`."""

    command = ("-m", "ortserve.yardsticks")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ortserve.yardsticks", description=__doc__.split("\n\n")[0])
    kinds = parser.add_subparsers(dest="kind", required=True)
    baseline = kinds.add_parser("baseline", help="thread-pool grpc.server, one session.run per request")
    baseline.add_argument("--model_path", type=Path, required=True)
    baseline.add_argument("--name", default="default", help="model name it answers as (default: %(default)s)")
    baseline.add_argument("--workers", type=int, default=BASELINE_WORKERS,
                          help="thread pool size (default: %(default)s)")
    echo = kinds.add_parser("echo", help="grpc.aio server answering a fixed reply, doing no work")
    protocol = kinds.add_parser("protocol", help="grpc.aio server parsing each request and answering a copy of a "
                                "fixed reply with the request's id")  # fmt: skip
    handoff = kinds.add_parser("handoff", help="the protocol ceiling plus a batched hand-off to a worker thread "
                               "that does nothing")  # fmt: skip
    for sub in (echo, protocol, handoff):
        sub.add_argument("--reply", type=Path, required=True, help="file holding the serialised ModelInferResponse")
    for sub in (baseline, echo, protocol, handoff):
        sub.add_argument("--grpc_port", type=int, default=0, help="port (default: any free one)")
    args = parser.parse_args(argv)
    if args.kind == "baseline":
        serve_baseline(args.model_path, args.name, args.grpc_port, args.workers)
    elif args.kind == "echo":
        serve_echo(args.reply.read_bytes(), args.grpc_port)
    elif args.kind == "protocol":
        serve_protocol(args.reply.read_bytes(), args.grpc_port)
    else:
        serve_handoff(args.reply.read_bytes(), args.grpc_port)
    return 0


if __name__ == "__main__":
    sys.exit(main())
