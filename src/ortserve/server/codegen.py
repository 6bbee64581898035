"""Generate src/ortserve/_proto/ from protos/ (what `make protos` runs; tests check the committed files match).

    python -m ortserve.server.codegen [OUT_DIR]      # default: the package's source directory (src/)

protoc runs with `-I protos` (our files, laid out as protos/ortserve/_proto/*.proto so the generated imports read
`from ortserve._proto import ...`) and `-I <site-packages>` (the onnx wheel's onnx/onnx-ml.proto, whose generated
module onnx.onnx_ml_pb2 we import instead of generating it again). It writes *_pb2.py, *_pb2.pyi and *_pb2_grpc.py.
Then grpc_service_pb2.py is pointed at ortserve._proto.POOL (see that package's docstring for why).
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

# Files whose descriptors go to ortserve._proto.POOL instead of protobuf's default pool.
PRIVATE_POOL_MODULES = ("grpc_service_pb2.py", "model_config_pb2.py")
_DEFAULT_POOL_LINE = "DESCRIPTOR = _descriptor_pool.Default().AddSerializedFile("
_PRIVATE_POOL_LINE = (
    "from ortserve._proto import POOL as _private_pool  # ortserve codegen: see ortserve/_proto/__init__.py\n"
    "DESCRIPTOR = _private_pool.AddSerializedFile("
)


def checkout_root() -> Path:
    return Path(__file__).resolve().parents[3]


def proto_files(protos_dir: Path) -> list[Path]:
    return sorted((protos_dir / "ortserve" / "_proto").glob("*.proto"))


def generate(out_dir: Path, protos_dir: Path | None = None) -> list[Path]:
    """Compile every proto into `out_dir` (files land in out_dir/ortserve/_proto/); returns the files written."""
    import onnx

    protos_dir = protos_dir or checkout_root() / "protos"
    sources = proto_files(protos_dir)
    if not sources:
        raise FileNotFoundError(f"no .proto files under {protos_dir / 'ortserve' / '_proto'}")
    out_dir.mkdir(parents=True, exist_ok=True)
    onnx_include = Path(onnx.__file__).resolve().parents[1]
    well_known_include = Path(importlib.util.find_spec("grpc_tools").origin).resolve().parent / "_proto"
    command = [
        sys.executable,
        "-m",
        "grpc_tools.protoc",
        f"-I{protos_dir}",
        f"-I{onnx_include}",
        f"-I{well_known_include}",
        f"--python_out={out_dir}",
        f"--pyi_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        *(str(p.relative_to(protos_dir)) for p in sources),
    ]
    # protoc resolves the relative source names against the -I directories. It runs in a process of its own: its
    # native code, loaded into this one, makes onnxruntime-extensions' library abort when that is loaded later.
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"protoc failed: {' '.join(command)}\n{done.stderr}")
    generated = out_dir / "ortserve" / "_proto"
    for name in PRIVATE_POOL_MODULES:
        _use_private_pool(generated / name)
    return sorted(p for p in generated.iterdir() if "_pb2" in p.name)


def _use_private_pool(path: Path) -> None:
    text = path.read_text()
    if text.count(_DEFAULT_POOL_LINE) != 1:
        raise RuntimeError(f"{path}: protoc's output changed shape; update ortserve.server.codegen")
    path.write_text(text.replace(_DEFAULT_POOL_LINE, _PRIVATE_POOL_LINE))


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    out_dir = Path(argv[0]) if argv else checkout_root() / "src"
    for path in generate(out_dir):
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
