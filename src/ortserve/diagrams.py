"""The course's diagrams, drawn with matplotlib (boxes and arrows) into figures/.

    python -m ortserve.diagrams [--out DIR]      # or: make figures

figures/02_export_path.png    framework -> exporter -> ONNX file -> checker -> ONNX Runtime
figures/08_request_path.png   one ModelInfer call through ortserve.server and back
figures/13_deployment.png     deploy/: pods, Services, HorizontalPodAutoscaler, PodDisruptionBudget, probes

Fixed size and dpi, matplotlib's own DejaVu fonts and no version in the PNG, so the same packages draw the
same bytes. Colours are Paul Tol's "light" scheme, which stays distinct under every colour-vision deficiency.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.patches import FancyArrowPatch, FancyBboxPatch  # noqa: E402

from ortserve.figures import FIGURES_DIR  # noqa: E402

DPI = 100
# Paul Tol's light scheme: dark text reads on every one of them.
BLUE, CYAN, MINT, PEAR, YELLOW, ORANGE, PINK, GREY = (
    "#77AADD", "#99DDFF", "#44BB99", "#BBCC33", "#EEDD88", "#EE8866", "#FFAABB", "#DDDDDD")  # fmt: skip
INK = "#222222"
MONO = "DejaVu Sans Mono"


def canvas(width: float, height: float, title: str):
    """A figure of width x height inches whose data units are inches (so sizes below read as inches)."""
    fig = plt.figure(figsize=(width, height), dpi=DPI)
    ax = fig.add_axes((0, 0, 1, 1))
    ax.set_xlim(0, width)
    ax.set_ylim(0, height)
    ax.axis("off")
    ax.text(0.25, height - 0.3, title, fontsize=15, fontweight="bold", color=INK, va="center")
    return fig, ax


def box(ax, x, y, w, h, title, lines=(), colour=GREY, *, dashed=False, size=10.5):
    """A rounded box with its lower left corner at (x, y): a bold title, then lines in monospace."""
    ax.add_patch(FancyBboxPatch((x, y), w, h, boxstyle="round,pad=0,rounding_size=0.08", facecolor=colour,
                                edgecolor=INK, linewidth=1.2, linestyle="--" if dashed else "-"))
    top = y + h - 0.22
    ax.text(x + w / 2, top, title, ha="center", va="center", fontsize=size + 1, fontweight="bold", color=INK)
    for i, line in enumerate(lines):
        ax.text(x + w / 2, top - 0.3 - 0.24 * i, line, ha="center", va="center", fontsize=size - 1,
                family=MONO, color=INK)
    return (x, y, w, h)


def frame(ax, x, y, w, h, label):
    """A dashed grouping frame with its label at the top left (a Deployment, a pod, the cluster)."""
    ax.add_patch(FancyBboxPatch((x, y), w, h, boxstyle="round,pad=0,rounding_size=0.12", facecolor="none",
                                edgecolor=INK, linewidth=1.0, linestyle=(0, (4, 3))))
    ax.text(x + 0.12, y + h - 0.18, label, ha="left", va="center", fontsize=10, fontstyle="italic", color=INK)


def arrow(ax, start, end, label=None, *, offset=(0.0, 0.14), dashed=False, size=9.5, bend=None):
    """An arrow from start to end (points), elbowed by `bend` (a matplotlib connection style) if given, with an
    optional label at the middle of the straight line between them, shifted by offset."""
    ax.add_patch(FancyArrowPatch(start, end, arrowstyle="-|>", mutation_scale=16, linewidth=1.4, color=INK,
                                 linestyle="--" if dashed else "-", shrinkA=0, shrinkB=0,
                                 connectionstyle=bend or "arc3"))
    if label:
        mx, my = (start[0] + end[0]) / 2 + offset[0], (start[1] + end[1]) / 2 + offset[1]
        ax.text(mx, my, label, ha="center", va="center", fontsize=size, color=INK,
                bbox=dict(boxstyle="round,pad=0.15", facecolor="white", edgecolor="none"))


def right(b, dy=0.0):
    return (b[0] + b[2], b[1] + b[3] / 2 + dy)


def left(b, dy=0.0):
    return (b[0], b[1] + b[3] / 2 + dy)


def top(b, dx=0.0):
    return (b[0] + b[2] / 2 + dx, b[1] + b[3])


def bottom(b, dx=0.0):
    return (b[0] + b[2] / 2 + dx, b[1])


def export_path():
    """Lessons 01-05: each framework has its exporter; every exporter writes one format that one runtime reads."""
    fig, ax = canvas(13.6, 5.0, "The export path: one file format between the frameworks and the runtime")
    rows = [("scikit-learn", "RandomForest", "skl2onnx", "convert_sklearn"),
            ("XGBoost", "XGBClassifier", "onnxmltools", "convert_xgboost"),
            ("PyTorch", "digits CNN, eval()", "torch.onnx", "export(model, x)")]
    onnx_file = box(ax, 6.35, 1.55, 1.95, 1.5, "ONNX file", ["model.onnx", "graph + weights", "opset, IR version"],
                    YELLOW)
    for i, (framework, example, exporter, call) in enumerate(rows):
        y = 3.05 - 1.2 * i
        src = box(ax, 0.3, y, 2.1, 0.95, framework, [example], BLUE)
        exp = box(ax, 3.2, y, 2.1, 0.95, exporter, [call], CYAN)
        arrow(ax, right(src), left(exp))
        arrow(ax, right(exp), left(onnx_file, 0.45 - 0.45 * i))
    checker = box(ax, 8.9, 1.55, 2.0, 1.5, "checker",
                  ["check_model", "infer_shapes", "(onnx.checker,", "shape_inference)"], MINT)
    runtime = box(ax, 11.5, 1.55, 1.8, 1.5, "ONNX Runtime", ["onnxruntime.", "InferenceSession", ".run()"], ORANGE)
    arrow(ax, right(onnx_file), left(checker))
    arrow(ax, right(checker), left(runtime))
    steps = [(1.35, 4.25, "1  framework (lesson 01)"), (4.25, 4.25, "2  exporter (lesson 02)"),
             (7.33, 3.45, "3  one format"), (9.9, 3.45, "4  check (lesson 03)"), (12.4, 3.45, "5  run (05, 06)"),
             (9.9, 1.15, "valid graph, known\nshapes and types"), (12.4, 1.15, "any language,\nCPU or GPU")]
    for x, y, text in steps:
        ax.text(x, y, text, ha="center", va="center", fontsize=10.5 if y > 2 else 9.5, color=INK)
    ax.text(0.3, 0.3, "Netron (lesson 04) opens the same file to show the graph; graph optimisation and "
            "onnxruntime.quantization (lesson 05) rewrite it.", fontsize=10, color=INK)
    return fig


def request_path():
    """Lessons 08-09: one ModelInfer call through the modules of ortserve.server, and its answer back."""
    fig, ax = canvas(14.0, 5.8, "A ModelInfer call's path through the server (ortserve.server) and back")
    w, h, step, y = 1.95, 1.5, 2.28, 3.45
    specs = [("client", ["tritonclient.grpc", "or ortserve.client", "numpy in"], BLUE),
             ("gRPC (HTTP/2)", ["app.py", "grpc.aio.server", "port 50051"], CYAN),
             ("servicer: decode", ["v2.py ModelInfer", "codec.py", "decode_request_inputs"], MINT),
             ("data plane", ["repository.py get", "gate.py admit", "runtime.py", "Model.check_inputs"], PEAR),
             ("batcher", ["batching.py", "Batcher joins rows", "≤ max_batch_size"], YELLOW),
             ("worker thread", ["app.py", "ThreadPoolExecutor", "GIL released", "during the run"], PINK)]
    top_row = [box(ax, 0.3 + step * i, y, w, h, title, lines, colour, size=10)
               for i, (title, lines, colour) in enumerate(specs)]
    for a, b in zip(top_row, top_row[1:]):
        arrow(ax, right(a), left(b))
    y = 1.1
    runtime = box(ax, top_row[5][0], y, w, h, "ONNX Runtime", ["runtime.py", "run_session", "session.run"], ORANGE,
                  size=10)
    split = box(ax, top_row[4][0], y, w, h, "batcher", ["batching.py", "slices the rows", "back to each caller"],
                YELLOW, size=10)
    encode = box(ax, top_row[2][0], y, w, h, "servicer: encode", ["v2.py ModelInfer", "codec.py",
                 "encode_response_outputs"], MINT, size=10)  # fmt: skip
    reply = box(ax, top_row[1][0], y, w, h, "gRPC (HTTP/2)", ["app.py", "ModelInferResponse", "raw_output_contents"],
                CYAN, size=10)
    arrow(ax, bottom(top_row[5]), top(runtime), "feeds", offset=(0.38, 0.0))
    arrow(ax, left(runtime), right(split))
    arrow(ax, left(split), right(encode), "Model.infer returns arrays", offset=(0.0, 0.22))
    arrow(ax, left(reply), bottom(top_row[0]), bend="angle,angleA=180,angleB=90,rad=0")
    arrow(ax, left(encode), right(reply))
    ax.text(1.35, 2.65, "numpy out", ha="left", va="center", fontsize=9.5, color=INK)
    ax.text(0.3, 0.45, "An error anywhere on the way (unknown model, wrong datatype or shape, a draining server) is "
            "raised once; errors.py turns it into a gRPC status code.",
            fontsize=10, color=INK)
    return fig


def deployment():
    """Lesson 13: what `kubectl apply -k deploy/` creates, and who talks to what."""
    fig, ax = canvas(14.0, 7.6, "The deployment (deploy/): pods behind Services, scaled on CPU, probed over gRPC")
    frame(ax, 4.9, 0.95, 8.8, 5.15, "Deployment ortserve · RollingUpdate: maxSurge 1, maxUnavailable 0")
    servers = [pod(ax, 5.15, 3.5, "pod 1"), pod(ax, 5.15, 1.15, "pod 2")]
    ax.text(13.02, 3.45, "… up to\n10 pods", ha="center", va="center", fontsize=10.5, color=INK)
    hpa = box(ax, 5.2, 6.35, 4.0, 0.75, "HorizontalPodAutoscaler", ["CPU 70 % of request · 2-10 pods"], PEAR,
              size=10)
    pdb = box(ax, 9.6, 6.35, 4.1, 0.75, "PodDisruptionBudget", ["minAvailable: 1 (drains, upgrades)"], PINK,
              size=10)
    arrow(ax, bottom(hpa, 0.2), (hpa[0] + 2.2, 6.1), "scales", offset=(0.45, 0.0), size=9)
    arrow(ax, bottom(pdb), (pdb[0] + 2.05, 6.1), "guards", offset=(0.45, 0.0), dashed=True, size=9)
    services(ax, servers)
    kubelet = box(ax, 0.3, 0.95, 4.3, 1.4, "kubelet: probes (grpc.health.v1)",
                  ["startupProbe   grpc :50051", "readinessProbe grpc :50051", "livenessProbe  grpc :50051"], GREY,
                  size=10)
    arrow(ax, right(kubelet, -0.2), left(servers[1], -0.45))
    ax.text(0.3, 0.45, "Readiness takes a draining pod out of the Services at once; liveness restarts a server "
            "unhealthy for 30 s; Prometheus scrapes :8002/metrics (pod annotations).", fontsize=10, color=INK)
    return fig


def pod(ax, x, y, label):
    """One pod: the server container (ports, probes, resources) and the init container that copied the models."""
    frame(ax, x, y, 7.2, 2.15, label)
    server = box(ax, x + 0.2, y + 0.2, 4.4, 1.55, "container ortserve",
                 ["serve --model_repository /models", "50051 grpc · 9001 http · 8002 metrics",
                  "probes: startup · readiness · liveness", "cpu 2 · memory 1Gi · --workers 2"], ORANGE, size=9.5)
    init = box(ax, x + 5.1, y + 0.2, 1.9, 1.55, "init: models", ["runs first:", "cp -R models", "→ /models"],
               GREY, size=9.5)
    arrow(ax, left(init), right(server))
    return server


def services(ax, servers):
    """The two Services of service.yaml, their clients, and the connections they send to the pods."""
    ax.text(0.3, 5.75, "clients in the cluster", fontsize=10.5, fontstyle="italic", color=INK)
    one = box(ax, 0.3, 4.75, 1.75, 0.7, "one channel", ["ortserve:50051"], BLUE, size=9)
    rr = box(ax, 0.3, 3.05, 1.75, 0.9, "round_robin", ["dns:///ortserve-", "headless:50051"], BLUE, size=9)
    plain = box(ax, 2.4, 4.6, 2.2, 1.0, "Service ortserve", ["ClusterIP 50051·9001·8002", "one pod per connection"],
                CYAN, size=9.5)
    headless = box(ax, 2.4, 3.0, 2.2, 1.0, "ortserve-headless", ["clusterIP: None · 50051", "a DNS record per pod"],
                   CYAN, size=9.5)
    arrow(ax, right(one), left(plain))
    arrow(ax, right(rr), left(headless))
    arrow(ax, right(plain), left(servers[0], 0.45))
    arrow(ax, right(headless, 0.15), left(servers[0], -0.3))
    arrow(ax, right(headless, -0.15), left(servers[1], 0.4))


DIAGRAMS = {"02_export_path.png": export_path, "08_request_path.png": request_path,
            "13_deployment.png": deployment}


def draw(name: str, out: Path) -> Path:
    """Draw one diagram into out/name; the bytes depend only on the code and the package versions."""
    fig = DIAGRAMS[name]()
    path = Path(out) / name
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=DPI, metadata={"Software": None})
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ortserve.diagrams", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=FIGURES_DIR, help="directory to write to (default: figures/)")
    args = parser.parse_args(argv)
    for name in DIAGRAMS:
        path = draw(name, args.out)
        print(f"{args.out.name or args.out}/{path.name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
