"""The course's models: definitions, and `ensure(name)` that builds an artifact when it is missing.

Every notebook calls `ensure(...)` for what it needs instead of relying on an earlier notebook having run,
so lessons run on their own and in any order. Builds are deterministic (fixed seeds, one torch thread while
training) and atomic (written to a temporary name, then renamed, under a file lock), so two processes that
ask at once -- two notebooks under pytest-xdist, say -- build once and never see half a file.

Artifacts live in `models/` at the repository root (git-ignored), or in $ORTSERVE_MODELS:

    models/<name>/model.onnx        the exported model
    models/<name>/model.<native>    the framework's own file (joblib, xgboost json, torch state dict)
    models/repository/<name>/1/model.onnx   the server's default model repository (`ensure_repository`)
"""

from __future__ import annotations

import os
import shutil
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
from filelock import FileLock

from ortserve import data

SEED = 0
OPSET = 18
# onnxmltools' XGBoost converter supports opsets up to 15: converters lag behind the ONNX standard.
XGBOOST_OPSET = 15


def models_dir() -> Path:
    """Where artifacts go: $ORTSERVE_MODELS, else `models/` beside src/ in the course checkout."""
    env = os.environ.get("ORTSERVE_MODELS")
    if env:
        return Path(env)
    checkout = Path(__file__).resolve().parents[2]
    if (checkout / "pyproject.toml").exists():
        return checkout / "models"
    return Path.home() / ".cache" / "ortserve" / "models"


# --------------------------------------------------------------------------------------------------
# Model definitions


def make_digits_cnn():
    """A small CNN for 8x8 digits: two 3x3 convolutions, a 2x2 max-pool, two linear layers.

    Input (N, 1, 8, 8) float32 in [0, 1]; output (N, 10) logits.
    """
    import torch
    from torch import nn

    class DigitsCNN(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.features = nn.Sequential(
                nn.Conv2d(1, 16, kernel_size=3, padding=1),
                nn.ReLU(),
                nn.Conv2d(16, 32, kernel_size=3, padding=1),
                nn.ReLU(),
                nn.MaxPool2d(2),
            )
            self.classifier = nn.Sequential(
                nn.Flatten(),
                nn.Linear(32 * 4 * 4, 64),
                nn.ReLU(),
                nn.Linear(64, data.N_CLASSES),
            )

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.classifier(self.features(x))

    return DigitsCNN()


@dataclass(frozen=True)
class CnnRecipe:
    """How the digits CNN is trained; lesson 01 shows the same loop step by step."""

    epochs: int = 15
    batch_size: int = 64
    lr: float = 1e-3
    seed: int = SEED


def train_digits_cnn(
    recipe: CnnRecipe = CnnRecipe(),
    on_epoch: Callable[[int, float], None] | None = None,
):
    """Train the digits CNN deterministically and return it in eval mode.

    `on_epoch(epoch, mean_loss)` is called after each epoch (for a progress bar or a loss curve).
    """
    import torch
    from torch import nn

    split = data.load_digits_split()
    X = torch.from_numpy(data.as_images(split.X_train))
    y = torch.from_numpy(split.y_train)

    with torch_determinism(recipe.seed):
        model = make_digits_cnn()
        optimiser = torch.optim.Adam(model.parameters(), lr=recipe.lr)
        loss_fn = nn.CrossEntropyLoss()
        order = torch.Generator().manual_seed(recipe.seed)
        for epoch in range(recipe.epochs):
            model.train()
            perm = torch.randperm(len(X), generator=order)
            total = 0.0
            for start in range(0, len(X), recipe.batch_size):
                idx = perm[start : start + recipe.batch_size]
                optimiser.zero_grad()
                loss = loss_fn(model(X[idx]), y[idx])
                loss.backward()
                optimiser.step()
                total += loss.item() * len(idx)
            if on_epoch is not None:
                on_epoch(epoch, total / len(X))
    return model.eval()


@contextmanager
def torch_determinism(seed: int) -> Iterator[None]:
    """Seed torch and run on one thread, so the trained weights are the same on every run and machine."""
    import torch

    threads = torch.get_num_threads()
    torch.manual_seed(seed)
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def make_resnet18():
    """torchvision's resnet18 architecture with seeded random weights (weights=None).

    No pretrained weights can be downloaded here; for timing and export lessons the architecture is what counts.
    """
    import torch
    import torchvision

    torch.manual_seed(SEED)
    return torchvision.models.resnet18(weights=None).eval()


# --------------------------------------------------------------------------------------------------
# Builders: each writes the artifacts of one model into a (temporary) directory


def _build_digits_forest(out: Path) -> None:
    import joblib
    from skl2onnx import to_onnx
    from sklearn.ensemble import RandomForestClassifier

    split = data.load_digits_split()
    forest = RandomForestClassifier(n_estimators=100, max_depth=12, random_state=SEED, n_jobs=1)
    forest.fit(split.X_train, split.y_train)
    joblib.dump(forest, out / "model.joblib")
    # zipmap=False: probabilities as a plain (N, 10) tensor instead of a list of {class: prob} maps.
    onx = to_onnx(
        forest,
        split.X_train[:1],
        options={id(forest): {"zipmap": False}},
        target_opset={"": OPSET, "ai.onnx.ml": 3},
        final_types=None,
    )
    _rename_io(onx, inputs=["input"], outputs=["label", "probabilities"])
    _save_onnx(onx, out / "model.onnx")


def _build_digits_xgb(out: Path) -> None:
    import xgboost as xgb
    from onnxmltools import convert_xgboost
    from onnxmltools.convert.common.data_types import FloatTensorType

    split = data.load_digits_split()
    booster = xgb.XGBClassifier(
        n_estimators=100, max_depth=4, learning_rate=0.3, tree_method="hist", random_state=SEED, n_jobs=1
    )
    booster.fit(split.X_train, split.y_train)
    booster.save_model(out / "model.json")
    onx = convert_xgboost(
        booster, initial_types=[("input", FloatTensorType([None, data.N_FEATURES]))], target_opset=XGBOOST_OPSET
    )
    _rename_io(onx, inputs=["input"], outputs=["label", "probabilities"])
    _save_onnx(onx, out / "model.onnx")


def _build_digits_cnn(out: Path) -> None:
    import torch

    model = train_digits_cnn()
    torch.save(model.state_dict(), out / "model.pt")
    example = torch.zeros(1, 1, data.IMAGE_SIDE, data.IMAGE_SIDE)
    export_torch(model, example, out / "model.onnx")


def _build_resnet18(out: Path) -> None:
    import torch

    export_torch(make_resnet18(), torch.zeros(1, 3, 224, 224), out / "model.onnx")


def export_torch(model, example, path: Path) -> None:
    """Export with the TorchScript exporter, input `input`, output `logits`, a dynamic batch axis.

    The zoo uses the TorchScript exporter because it is quick and deterministic; lesson 02 compares it
    with the dynamo exporter.
    """
    import torch

    torch.onnx.export(
        model,
        (example,),
        str(path),
        input_names=["input"],
        output_names=["logits"],
        dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
        opset_version=OPSET,
        dynamo=False,
    )


def _rename_io(onx, inputs: list[str], outputs: list[str]) -> None:
    """Give a converted graph the zoo's conventional input and output names (converters pick their own)."""
    renames = {}
    for value, name in zip(onx.graph.input, inputs):
        renames[value.name] = name
    for value, name in zip(onx.graph.output, outputs):
        renames[value.name] = name
    for value in list(onx.graph.input) + list(onx.graph.output):
        value.name = renames.get(value.name, value.name)
    for node in onx.graph.node:
        node.input[:] = [renames.get(n, n) for n in node.input]
        node.output[:] = [renames.get(n, n) for n in node.output]


def _save_onnx(onx, path: Path) -> None:
    import onnx

    onnx.checker.check_model(onx, full_check=True)
    onnx.save(onx, path)


BUILDERS: dict[str, Callable[[Path], None]] = {
    "digits_forest": _build_digits_forest,
    "digits_xgb": _build_digits_xgb,
    "digits_cnn": _build_digits_cnn,
    "resnet18": _build_resnet18,
}

# The models the server serves when it is given no model flag.
DEFAULT_REPOSITORY_MODELS = ("digits_cnn", "digits_forest", "digits_xgb")


# --------------------------------------------------------------------------------------------------
# ensure(): build once, atomically, under a lock


def ensure(name: str) -> Path:
    """Path to `models/<name>/model.onnx`, building the model's artifacts first if they are missing."""
    return ensure_dir(name) / "model.onnx"


def ensure_dir(name: str) -> Path:
    """The directory holding all artifacts of `name`, built if missing."""
    if name not in BUILDERS:
        raise KeyError(f"unknown model {name!r}; the zoo has {sorted(BUILDERS)}")
    target = models_dir() / name
    if (target / "model.onnx").exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target.parent / f".{name}.lock")):
        if (target / "model.onnx").exists():  # built by another process while we waited
            return target
        staging = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=target.parent))
        try:
            BUILDERS[name](staging)
            if target.exists():
                shutil.rmtree(target)
            staging.rename(target)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return target


def ensure_repository(root: Path | None = None, names: tuple[str, ...] = DEFAULT_REPOSITORY_MODELS) -> Path:
    """A model repository `<root>/<name>/1/model.onnx` for `names` (default: the digits models)."""
    root = Path(root) if root is not None else models_dir() / "repository"
    for name in names:
        version_dir = root / name / "1"
        if (version_dir / "model.onnx").exists():
            continue
        source = ensure(name)
        version_dir.mkdir(parents=True, exist_ok=True)
        tmp = version_dir / ".model.onnx.tmp"
        shutil.copyfile(source, tmp)
        tmp.replace(version_dir / "model.onnx")
    return root


# --------------------------------------------------------------------------------------------------
# Loading the framework's own models (for comparisons against ONNX Runtime)


def load_native(name: str):
    """The trained model in its own framework: sklearn forest, xgboost classifier or torch module."""
    folder = ensure_dir(name)
    if name == "digits_forest":
        import joblib

        return joblib.load(folder / "model.joblib")
    if name == "digits_xgb":
        import xgboost as xgb

        booster = xgb.XGBClassifier()
        booster.load_model(folder / "model.json")
        return booster
    if name == "digits_cnn":
        import torch

        model = make_digits_cnn()
        model.load_state_dict(torch.load(folder / "model.pt", weights_only=True))
        return model.eval()
    if name == "resnet18":
        return make_resnet18()
    raise KeyError(f"unknown model {name!r}; the zoo has {sorted(BUILDERS)}")


def digits_accuracy(predict: Callable[[np.ndarray], np.ndarray], images: bool = False) -> float:
    """Test-set accuracy of `predict` (flat features, or (N,1,8,8) images when `images`) on the digits split."""
    split = data.load_digits_split()
    X = data.as_images(split.X_test) if images else split.X_test
    return float(np.mean(np.asarray(predict(X)) == split.y_test))
