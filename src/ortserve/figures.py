"""Static pictures of model graphs for the notebooks, taken from Netron itself by a headless Chromium.

    python -m ortserve.figures            # or: make figures
    python -m ortserve.figures --list     # what it would write

A reader who opens a lesson without a running kernel still sees the graphs: each figure is a screenshot of the
Netron web app (the `netron` package's own server on 127.0.0.1, a free port) showing one model file, cropped to
the graph, or to the graph plus Netron's sidebar with a node's properties open.

Needs Chromium (on Debian/Ubuntu: `apt-get install chromium`; any Chrome or Chromium works, or set $CHROMIUM to
its path) and a font with the CJK angle brackets 〈 〉 that Netron draws around shapes (`fonts-wqy-microhei`).
The figures are written to figures/ as palette PNGs under 300 KB each. Nothing is downloaded: the model files
are built locally by `ortserve.zoo`, Netron is served from the Python package, and the browser is told that every
host name but loopback does not exist, so Netron's consent check and telemetry never leave the machine.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from ortserve import zoo

FIGURES_DIR = Path(__file__).resolve().parents[2] / "figures"
MAX_BYTES = 300 * 1024

CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-extensions",
    "--hide-scrollbars",
    "--mute-audio",
    # Every host name fails to resolve; Netron's own server is reached by its IP literal 127.0.0.1.
    "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1",
]

INSTALL_HINT = (
    "Chromium is needed to screenshot Netron. On Debian/Ubuntu:\n"
    "    apt-get update && apt-get install -y chromium fonts-wqy-microhei\n"
    "(or set CHROMIUM=/path/to/chrome). Then run `make figures` again."
)


def find_chromium() -> str | None:
    """Path of a Chromium or Chrome executable: $CHROMIUM, else the usual names on PATH."""
    env = os.environ.get("CHROMIUM")
    if env:
        return env if Path(env).exists() else shutil.which(env)
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable", "chrome"):
        path = shutil.which(name)
        if path:
            return path
    return None


# --------------------------------------------------------------------------------------------------
# A minimal Chrome DevTools Protocol client (websocket-client is already installed with Jupyter)


class DevTools:
    """Send CDP commands to one page target and wait for their results (events are skipped)."""

    def __init__(self, ws_url: str) -> None:
        import websocket

        self._ws = websocket.create_connection(ws_url, timeout=60, suppress_origin=True)
        self._next_id = 0

    def __call__(self, method: str, **params):
        self._next_id += 1
        message_id = self._next_id
        self._ws.send(json.dumps({"id": message_id, "method": method, "params": params}))
        while True:
            reply = json.loads(self._ws.recv())
            if reply.get("id") == message_id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply.get("result", {})

    def evaluate(self, expression: str):
        result = self("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in result:
            raise RuntimeError(f"page script failed: {result['exceptionDetails']}")
        return result["result"].get("value")

    def close(self) -> None:
        self._ws.close()


class Chromium:
    """A headless Chromium with a fresh profile and a DevTools port, stopped (and its profile deleted) on exit."""

    def __init__(self, executable: str, width: int = 1200, height: int = 900) -> None:
        self.executable = executable
        self.width, self.height = width, height

    def __enter__(self) -> "Chromium":
        self._profile = Path(tempfile.mkdtemp(prefix="ortserve-chromium-"))
        self._process = subprocess.Popen(
            [self.executable, *CHROMIUM_FLAGS, f"--user-data-dir={self._profile}", "--remote-debugging-port=0",
             f"--window-size={self.width},{self.height}", "about:blank"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            port = self._devtools_port()
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=10) as reply:
                targets = json.load(reply)
            page = next(t for t in targets if t["type"] == "page")
            self.page = DevTools(page["webSocketDebuggerUrl"])
        except BaseException:
            self._stop()
            raise
        return self

    def _devtools_port(self, timeout: float = 30.0) -> int:
        marker = self._profile / "DevToolsActivePort"
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                raise RuntimeError(f"Chromium exited with code {self._process.returncode}")
            if marker.exists():
                lines = marker.read_text().split()
                if lines:
                    return int(lines[0])
            time.sleep(0.1)
        raise TimeoutError("Chromium did not open its DevTools port")

    def __exit__(self, *exc) -> None:
        try:
            self.page.close()
        finally:
            self._stop()

    def _stop(self) -> None:
        self._process.terminate()
        try:
            self._process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self._process.kill()
            self._process.wait()
        shutil.rmtree(self._profile, ignore_errors=True)


# --------------------------------------------------------------------------------------------------
# Netron in the browser


@dataclass(frozen=True)
class Figure:
    """One screenshot: a model file shown by Netron, cropped to a part of the page."""

    name: str  # file name under figures/
    model: Callable[[], Path]  # builds (if needed) and returns the model file
    viewport: tuple[int, int] = (900, 1100)  # browser window (CSS pixels)
    click: str | None = None  # op type of the node whose properties the sidebar should show (first such node)
    expand: tuple[str, ...] = ()  # sidebar rows (e.g. the input "W") to expand with their "+" button
    max_graph_height: int | None = None  # crop the graph to its top part (CSS pixels)
    device_scale: float = 1.5  # screenshot pixels per CSS pixel: Netron's labels are small, render them sharp
    description: str = field(default="", compare=False)


NETRON_READY = """
(() => {
  if (!document.body || document.body.classList.contains('spinner')) return -1;
  return document.querySelectorAll('#canvas g.node').length;
})()
"""


def _open_in_netron(page: DevTools, url: str, timeout: float = 90.0) -> None:
    """Load Netron and wait until the graph is drawn and has stopped changing."""
    page("Page.enable")
    page("Network.enable")
    # Netron asks for consent to telemetry on first visit; answer it with its own cookie so no dialog covers
    # the graph (the telemetry itself cannot reach the internet: no host name resolves in this browser).
    page("Network.setCookie", name="consent", value=str(int(time.time() * 1000)), url=url)
    page("Page.navigate", url=url)
    deadline = time.monotonic() + timeout
    last, stable = None, 0
    while time.monotonic() < deadline:
        count = page.evaluate(NETRON_READY)
        if count and count > 0 and count == last:
            stable += 1
            if stable >= 3:
                break
        else:
            stable = 0
        last = count
        time.sleep(0.3)
    else:
        raise TimeoutError(f"Netron did not draw the graph at {url} within {timeout:.0f} s")
    # Nodes fade in (opacity animation); give it time to finish.
    time.sleep(1.0)


def _click_node(page: DevTools, op_type: str) -> None:
    script = f"""
    (() => {{
      const items = Array.from(document.querySelectorAll('#canvas .node-item-type'));
      const label = (element) => element.querySelector('text').textContent.trim();
      const item = items.find((element) => label(element) === {json.dumps(op_type)});
      if (!item) return false;
      item.dispatchEvent(new MouseEvent('click', {{bubbles: true}}));
      return true;
    }})()
    """
    if not page.evaluate(script):
        raise RuntimeError(f"no {op_type} node to click")
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if page.evaluate("document.getElementById('sidebar').getBoundingClientRect().left < innerWidth - 100"):
            time.sleep(1.0)  # the sidebar slides in
            return
        time.sleep(0.2)
    raise TimeoutError("Netron's sidebar did not open")


def _expand_sidebar_row(page: DevTools, label: str) -> None:
    script = f"""
    (() => {{
      const rows = Array.from(document.querySelectorAll('#sidebar-content .sidebar-item'));
      const name = (row) => {{
        const input = row.querySelector('.sidebar-item-name input');
        return input && input.value;
      }};
      const row = rows.find((r) => name(r) === {json.dumps(label)});
      const expander = row && row.querySelector('.sidebar-item-value-expander');
      if (!expander) return false;
      expander.click();
      return true;
    }})()
    """
    if not page.evaluate(script):
        raise RuntimeError(f"no sidebar row {label!r} to expand")
    time.sleep(0.5)


def _graph_box(page: DevTools) -> dict:
    """Bounding box (CSS pixels) of everything drawn: nodes, edges, edge labels; and the sidebar if open."""
    return page.evaluate("""
    (() => {
      const parts = document.querySelectorAll('#canvas g.node, #canvas .edge-path, #canvas .edge-label');
      let left = Infinity, top = Infinity, right = -Infinity, bottom = -Infinity;
      for (const part of parts) {
        const r = part.getBoundingClientRect();
        if (r.width === 0 && r.height === 0) continue;
        left = Math.min(left, r.left); top = Math.min(top, r.top);
        right = Math.max(right, r.right); bottom = Math.max(bottom, r.bottom);
      }
      const s = document.getElementById('sidebar').getBoundingClientRect();
      const open = s.left < window.innerWidth - 100;  // a closed sidebar sits off-screen to the right
      return {left, top, right, bottom, sidebar_left: open ? s.left : null, sidebar_bottom: s.bottom};
    })()
    """)


def screenshot(figure: Figure, chromium: str, out_dir: Path = FIGURES_DIR) -> Path:
    """Serve the model with netron, load it in headless Chromium, crop, shrink, save as PNG."""
    import netron
    from PIL import Image

    model_path = figure.model()
    width, height = figure.viewport
    address = netron.start(str(model_path), address=("127.0.0.1", 0), browse=False)
    try:
        with Chromium(chromium, width, height) as browser:
            page = browser.page
            page("Emulation.setDeviceMetricsOverride", width=width, height=height,
                 deviceScaleFactor=figure.device_scale, mobile=False)
            _open_in_netron(page, f"http://{address[0]}:{address[1]}/")
            if figure.click:
                _click_node(page, figure.click)
            for label in figure.expand:
                _expand_sidebar_row(page, label)
            box = _graph_box(page)
            png = base64.b64decode(page("Page.captureScreenshot", format="png")["data"])
    finally:
        netron.stop(address)

    image = Image.open(io.BytesIO(png)).convert("RGB")
    k = figure.device_scale
    margin = 12
    left, top = max(0, box["left"] - margin), max(0, box["top"] - margin)
    right, bottom = box["right"] + margin, box["bottom"] + margin
    if figure.max_graph_height:
        bottom = min(bottom, top + figure.max_graph_height)
    if box["sidebar_left"] is not None:  # keep the sidebar whole, from the top of the page
        right, top = width, 0
        bottom = max(bottom, box["sidebar_bottom"])
    crop = [round(v * k) for v in (left, top, min(right, width), min(bottom, height))]
    image = image.crop(tuple(crop))
    out_dir.mkdir(parents=True, exist_ok=True)
    out = out_dir / figure.name
    _save_small(image, out)
    return out


def _save_small(image, out: Path) -> None:
    """Save as PNG, reducing to a 256-colour palette (and then size) until it is under MAX_BYTES."""
    from PIL import Image

    candidate = image
    for _ in range(6):
        paletted = candidate.quantize(colors=256, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE)
        buffer = io.BytesIO()
        paletted.save(buffer, format="PNG", optimize=True)
        if buffer.tell() <= MAX_BYTES:
            out.write_bytes(buffer.getvalue())
            return
        candidate = candidate.resize((round(candidate.width * 0.85), round(candidate.height * 0.85)), Image.LANCZOS)
    raise RuntimeError(f"{out.name} stays above {MAX_BYTES} bytes")


# --------------------------------------------------------------------------------------------------
# The model files shown, and the figures


def _save_whole(model, path: Path) -> Path:
    """Save under a temporary name, then rename: a reader (the lesson, another figure) never sees half a file."""
    import onnx

    tmp = path.with_suffix(".tmp")
    onnx.save(model, tmp)
    tmp.replace(path)
    return path


def netron_lesson_dir() -> Path:
    """Where lesson 04 writes its exports (the figures script writes the same files)."""
    path = zoo.models_dir() / "lessons" / "04_netron"
    path.mkdir(parents=True, exist_ok=True)
    return path


def cnn_torchscript() -> Path:
    """The digits CNN exported by the TorchScript exporter: the zoo's own file."""
    return zoo.ensure("digits_cnn")


def cnn_dynamo() -> Path:
    """The digits CNN exported by the dynamo exporter, stack traces stripped (as in lessons 02 and 04)."""
    path = netron_lesson_dir() / "cnn_dynamo.onnx"
    if path.exists():
        return path
    import warnings

    import torch

    from ortserve import data

    cnn = zoo.load_native("digits_cnn")
    example = torch.zeros(1, 1, data.IMAGE_SIDE, data.IMAGE_SIDE)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            cnn,
            (example,),
            dynamo=True,
            input_names=["input"],
            output_names=["logits"],
            dynamic_shapes={"x": {0: torch.export.Dim("batch")}},
            opset_version=zoo.OPSET,
            verbose=False,
        )
    proto = program.model_proto
    for node in proto.graph.node:
        kept = [p for p in node.metadata_props if p.key != "pkg.torch.onnx.stack_trace"]
        del node.metadata_props[:]
        node.metadata_props.extend(kept)
    return _save_whole(proto, path)


def resnet18() -> Path:
    return zoo.ensure("resnet18")


def capstone_breast_cancer() -> Path:
    """Lesson 14's model: StandardScaler + LogisticRegression on scikit-learn's breast-cancer data, via skl2onnx."""
    path = zoo.models_dir() / "lessons" / "14_capstone" / "breast_cancer.onnx"
    if path.exists():
        return path
    from skl2onnx import to_onnx
    from skl2onnx.common.data_types import FloatTensorType, Int64TensorType
    from sklearn.datasets import load_breast_cancer
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import train_test_split
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    X, y = load_breast_cancer(return_X_y=True)
    X_train, _, y_train, _ = train_test_split(X, y, test_size=0.25, random_state=zoo.SEED, stratify=y)
    pipeline = make_pipeline(StandardScaler(), LogisticRegression(max_iter=1000)).fit(X_train, y_train)
    onx = to_onnx(
        pipeline,
        initial_types=[("input", FloatTensorType([None, X.shape[1]]))],
        final_types=[("label", Int64TensorType([None])), ("probabilities", FloatTensorType([None, 2]))],
        options={LogisticRegression: {"zipmap": False}},
        target_opset={"": zoo.OPSET, "ai.onnx.ml": 3},
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    return _save_whole(onx, path)


FIGURES = [
    Figure("04_cnn_torchscript.png", cnn_torchscript, viewport=(600, 1000), device_scale=1.25,
           description="digits CNN, TorchScript exporter (dynamo=False): the whole graph"),
    Figure("04_cnn_dynamo.png", cnn_dynamo, viewport=(600, 1000), device_scale=1.25,
           description="digits CNN, dynamo exporter (dynamo=True): the whole graph"),
    Figure("04_cnn_conv_sidebar.png", cnn_torchscript, viewport=(1100, 820), click="Conv", expand=("W",),
           device_scale=1.0,
           description="digits CNN with the first Conv's properties open in Netron's sidebar"),
    Figure("04_resnet18_top.png", resnet18, viewport=(800, 1300), max_graph_height=1250, device_scale=1.0,
           description="resnet18: the stem and the first residual blocks"),
    Figure("14_breast_cancer_sidebar.png", capstone_breast_cancer, viewport=(1000, 700), click="LinearClassifier",
           device_scale=1.0,
           description="lesson 14's scikit-learn pipeline with its LinearClassifier's properties open"),
]


def _has_cjk_brackets() -> bool:
    """Whether fontconfig knows a font with 〈 〉 (True when fontconfig is absent: nothing to check with)."""
    fc_list = shutil.which("fc-list")
    if fc_list is None:
        return True
    found = subprocess.run([fc_list, ":charset=3008 3009", "family"], capture_output=True, text=True)
    return bool(found.stdout.strip())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ortserve.figures", description=__doc__.split("\n\n")[0])
    parser.add_argument("--list", action="store_true", help="list the figures and exit")
    parser.add_argument("names", nargs="*", help="only these figure files (default: all)")
    args = parser.parse_args(argv)
    if args.list:
        for figure in FIGURES:
            print(f"figures/{figure.name}: {figure.description}")
        return 0
    chromium = find_chromium()
    if chromium is None:
        print(INSTALL_HINT, file=sys.stderr)
        return 2
    # netron.start() calls logging.basicConfig(level=INFO) unless logging is configured, which would let every
    # library's INFO messages through (the dynamo exporter's among them): configure it first, warnings only.
    logging.basicConfig(level=logging.WARNING, format="%(name)s: %(message)s")
    if not _has_cjk_brackets():
        print("warning: no font has U+3008/U+3009, the brackets Netron draws around shapes (W〈16×1×3×3〉); they\n"
              "will show as boxes. On Debian/Ubuntu: apt-get install fonts-wqy-microhei (or fonts-noto-cjk).",
              file=sys.stderr)
    selected = [f for f in FIGURES if not args.names or f.name in args.names]
    for figure in selected:
        start = time.perf_counter()
        out = screenshot(figure, chromium)
        print(f"figures/{out.name}: {out.stat().st_size / 1024:.0f} KB in {time.perf_counter() - start:.1f} s"
              f" ({figure.description})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
