"""The model zoo builds each artifact deterministically, atomically, once, and the exports match the originals."""

import multiprocessing
import os
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from ortserve import data, zoo
from ortserve.server.runtime import import_extensions


@pytest.fixture()
def private_models_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("ORTSERVE_MODELS", str(tmp_path))
    return tmp_path


def test_split_is_stable_stratified_and_scaled():
    a, b = data.load_digits_split(), data.load_digits_split()
    assert np.array_equal(a.X_test, b.X_test) and np.array_equal(a.y_train, b.y_train)
    assert a.X_train.dtype == np.float32 and a.y_train.dtype == np.int64
    assert a.X_train.shape[1] == data.N_FEATURES and 0.0 <= a.X_train.min() and a.X_train.max() <= 1.0
    train_share = np.bincount(a.y_train) / len(a.y_train)
    test_share = np.bincount(a.y_test) / len(a.y_test)
    assert np.allclose(train_share, test_share, atol=0.01)


def test_as_images_rejects_wrong_width():
    with pytest.raises(ValueError, match=r"expected features of shape \(N, 64\), got \(2, 63\)"):
        data.as_images(np.zeros((2, 63)))


def test_unknown_model_names_the_known_ones():
    with pytest.raises(KeyError, match="digits_cnn"):
        zoo.ensure("no_such_model")


@pytest.mark.parametrize("name", ["digits_forest", "digits_xgb", "digits_cnn"])
def test_exported_digits_models_agree_with_their_framework(name):
    native = zoo.load_native(name)
    session = ort.InferenceSession(zoo.ensure(name), providers=["CPUExecutionProvider"])
    split = data.load_digits_split()
    if name == "digits_cnn":
        import torch

        images = data.as_images(split.X_test)
        with torch.no_grad():
            expected = native(torch.from_numpy(images)).numpy()
        (logits,) = session.run(None, {"input": images})
        np.testing.assert_allclose(logits, expected, rtol=1e-4, atol=1e-4)
        labels = logits.argmax(axis=1)
    else:
        labels, probabilities = session.run(None, {"input": split.X_test})
        assert np.array_equal(labels, native.predict(split.X_test))
        np.testing.assert_allclose(probabilities, native.predict_proba(split.X_test), atol=1e-5)
    assert np.mean(labels == split.y_test) >= 0.95


def test_cnn_training_is_deterministic(private_models_dir):
    first = onnx.load(zoo.ensure("digits_cnn"))
    (private_models_dir / "digits_cnn" / "model.onnx").unlink()
    second = onnx.load(zoo.ensure("digits_cnn"))
    weights = lambda m: {t.name: onnx.numpy_helper.to_array(t) for t in m.graph.initializer}  # noqa: E731
    a, b = weights(first), weights(second)
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


def _ensure_in_child(args):
    models, name = args
    os.environ["ORTSERVE_MODELS"] = models
    path = zoo.ensure(name)
    return str(path), path.stat().st_mtime_ns


def test_concurrent_ensure_builds_once(private_models_dir):
    with multiprocessing.get_context("spawn").Pool(2) as pool:
        results = pool.map(_ensure_in_child, [(str(private_models_dir), "digits_xgb")] * 2)
    (path_a, mtime_a), (path_b, mtime_b) = results
    assert path_a == path_b and mtime_a == mtime_b, "both processes built the model"
    leftovers = [p.name for p in private_models_dir.iterdir() if p.name.startswith(".digits_xgb-")]
    assert leftovers == []


def _ensure_repository_in_child(args):
    models, root, name = args
    os.environ["ORTSERVE_MODELS"] = models
    return str(zoo.ensure_repository(Path(root), names=(name,)))


def test_concurrent_ensure_repository(private_models_dir, tmp_path):
    # Several test workers fill the default repository at once on a fresh clone: no copy may trip over another's.
    zoo.ensure("digits_forest")
    jobs = [(str(private_models_dir), str(tmp_path / "repository"), "digits_forest")] * 8
    with multiprocessing.get_context("spawn").Pool(4) as pool:
        roots = pool.map(_ensure_repository_in_child, jobs)
    version_dir = tmp_path / "repository" / "digits_forest" / "1"
    assert set(roots) == {str(tmp_path / "repository")}
    assert [p.name for p in version_dir.iterdir()] == ["model.onnx"], "a temporary copy was left behind"
    assert (version_dir / "model.onnx").read_bytes() == zoo.ensure("digits_forest").read_bytes()


def test_repository_layout(private_models_dir):
    root = zoo.ensure_repository(names=("digits_forest",))
    assert root == Path(private_models_dir) / "repository"
    assert (root / "digits_forest" / "1" / "model.onnx").read_bytes() == zoo.ensure("digits_forest").read_bytes()


# --------------------------------------------------------------------------------------------------
# The sentence encoder (all-MiniLM-L6-v2) and the text model built around it

SENTENCES = [
    "The cat sits on the mat.",
    "A feline is resting on a rug.",
    "Interest rates rose again this quarter.",
    "How do I export a PyTorch model to ONNX?",
    "Converting neural networks into a portable format",
    "",
    "Ünïcödé, accents — and “quotes” don't break the tokenizer.",
    "日本語のテキストも少し",
    "x",
    "word " * 300,  # more than MINILM_MAX_TOKENS tokens: truncated
]


@pytest.fixture(scope="module")
def minilm_reference():
    """PyTorch's embeddings of SENTENCES (transformers' tokenizer, the zoo's torch encoder), and the tokenizer."""
    import torch

    tokenizer = zoo.load_minilm_tokenizer()
    batch = tokenizer(SENTENCES, padding=True, truncation=True, max_length=zoo.MINILM_MAX_TOKENS, return_tensors="pt")
    with torch.no_grad():
        embeddings = zoo.load_native("minilm")(*(batch[n] for n in zoo.ENCODER_INPUTS)).numpy()
    return embeddings, tokenizer


def _extensions_session(model):
    options = ort.SessionOptions()
    options.register_custom_ops_library(import_extensions().get_library_path())
    source = model.SerializeToString() if isinstance(model, onnx.ModelProto) else str(model)
    return ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])


def test_sentence_encoder_export_has_dynamic_batch_and_sequence_axes():
    graph = onnx.load(zoo.ensure("minilm")).graph
    dims = lambda value: [d.dim_param or d.dim_value for d in value.type.tensor_type.shape.dim]  # noqa: E731
    assert {i.name: dims(i) for i in graph.input} == {n: ["batch", "sequence"] for n in zoo.ENCODER_INPUTS}
    assert [(o.name, dims(o)) for o in graph.output] == [("embedding", ["batch", zoo.MINILM_DIM])]


def test_sentence_encoder_export_matches_pytorch(minilm_reference):
    expected, tokenizer = minilm_reference
    session = ort.InferenceSession(zoo.ensure("minilm"), providers=["CPUExecutionProvider"])
    batch = tokenizer(SENTENCES, padding=True, truncation=True, max_length=zoo.MINILM_MAX_TOKENS, return_tensors="np")
    (got,) = session.run(None, {n: batch[n] for n in zoo.ENCODER_INPUTS})
    assert got.shape == (len(SENTENCES), zoo.MINILM_DIM)
    cosine = np.sum(got * expected, axis=1) / np.linalg.norm(got, axis=1) / np.linalg.norm(expected, axis=1)
    assert cosine.min() >= 0.9999, cosine
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)
    # Other batch sizes and lengths than the export's example: one short sentence alone.
    alone = tokenizer(SENTENCES[8:9], return_tensors="np")
    np.testing.assert_allclose(session.run(None, {n: alone[n] for n in zoo.ENCODER_INPUTS})[0][0], got[8], atol=1e-5)


def test_tokenizer_graph_gives_transformers_ids_for_any_batch():
    tokenizer = zoo.load_minilm_tokenizer()
    session = _extensions_session(zoo.batch_tokenizer(tokenizer))
    # Two texts are the case the bare BertTokenizer operator reads as a sentence pair; three it refuses.
    for texts in [SENTENCES, SENTENCES[:2], SENTENCES[5:6], ["one", "two", "three words here"]]:
        expected = tokenizer(texts, padding=True, truncation=True, max_length=zoo.MINILM_MAX_TOKENS,
                             return_tensors="np")
        got = dict(zip([o.name for o in session.get_outputs()], session.run(None, {"text": np.array(texts, object)})))
        for name in zoo.ENCODER_INPUTS:
            np.testing.assert_array_equal(got[name], expected[name], err_msg=f"{name} for {len(texts)} texts")
    empty = session.run(None, {"text": np.array([], dtype=object)})
    assert [a.shape[0] for a in empty] == [0, 0, 0]


@pytest.mark.parametrize("max_tokens", [16, zoo.MINILM_MAX_TOKENS])
def test_tokenizer_graph_truncates_like_transformers_run_after_run(max_tokens):
    """Many batches of random texts, many longer than max_tokens, through one session: the operator's own
    truncation (its max_length attribute) corrupted memory in a Loop and crashed the process on a later run."""
    tokenizer = zoo.load_minilm_tokenizer()
    session = _extensions_session(zoo.batch_tokenizer(tokenizer, max_tokens))
    rng = np.random.default_rng(max_tokens)
    words = ["word", "café", "naïve", "the", "tokenizer", "日本", "unbelievable", ",", "!"]
    for _ in range(40):
        texts = [" ".join(rng.choice(words, size=int(rng.integers(0, 300)))) for _ in range(int(rng.integers(1, 5)))]
        got = session.run(list(zoo.ENCODER_INPUTS), {"text": np.array(texts, dtype=object)})
        expected = tokenizer(texts, padding=True, truncation=True, max_length=max_tokens, return_tensors="np")
        for array, name in zip(got, zoo.ENCODER_INPUTS):
            np.testing.assert_array_equal(array, expected[name], err_msg=name)


def test_text_model_matches_pytorch_and_is_the_same_in_any_batch(minilm_reference):
    expected, _ = minilm_reference
    graph = onnx.load(zoo.ensure("minilm_text")).graph
    assert [(i.name, i.type.tensor_type.elem_type) for i in graph.input] == [("text", onnx.TensorProto.STRING)]
    fused = {node.op_type for node in graph.node}
    assert {"Attention", "SkipLayerNormalization", "EmbedLayerNormalization", "Loop"} <= fused
    session = _extensions_session(zoo.ensure("minilm_text"))
    (together,) = session.run(None, {"text": np.array(SENTENCES, dtype=object)})
    cosine = np.sum(together * expected, axis=1)  # both unit length
    assert cosine.min() >= 0.9999, cosine
    alone = np.concatenate([session.run(None, {"text": np.array([s], dtype=object)})[0] for s in SENTENCES])
    np.testing.assert_allclose(together, alone, atol=1e-5)
