"""The model zoo builds each artifact deterministically, atomically, once, and the exports match the originals."""

import multiprocessing
import os
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from ortserve import data, zoo


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


def test_repository_layout(private_models_dir):
    root = zoo.ensure_repository(names=("digits_forest",))
    assert root == Path(private_models_dir) / "repository"
    assert (root / "digits_forest" / "1" / "model.onnx").read_bytes() == zoo.ensure("digits_forest").read_bytes()
