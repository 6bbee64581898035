"""The digits data set that ships with scikit-learn, split and shaped the way every lesson uses it.

Nothing is downloaded: `sklearn.datasets.load_digits` reads a file inside the scikit-learn wheel.
Pixels are scaled from 0..16 to 0..1 and stored as float32, the dtype the ONNX models take.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

N_CLASSES = 10
IMAGE_SIDE = 8
N_FEATURES = IMAGE_SIDE * IMAGE_SIDE
SEED = 0
TEST_FRACTION = 0.25


@dataclass(frozen=True)
class DigitsSplit:
    """Flat features (N, 64) float32 in [0, 1] and int64 labels, train and test."""

    X_train: np.ndarray
    X_test: np.ndarray
    y_train: np.ndarray
    y_test: np.ndarray


def load_digits_split(test_fraction: float = TEST_FRACTION, seed: int = SEED) -> DigitsSplit:
    """The same stratified split for every lesson, so accuracies are comparable across notebooks."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    X = (digits.data / 16.0).astype(np.float32)
    y = digits.target.astype(np.int64)
    X_train, X_test, y_train, y_test = train_test_split(
        X, y, test_size=test_fraction, random_state=seed, stratify=y
    )
    return DigitsSplit(X_train, X_test, y_train, y_test)


def as_images(X: np.ndarray) -> np.ndarray:
    """Flat (N, 64) features to the CNN's NCHW layout (N, 1, 8, 8), float32, no copy when possible."""
    X = np.asarray(X, dtype=np.float32)
    if X.ndim != 2 or X.shape[1] != N_FEATURES:
        raise ValueError(f"expected features of shape (N, {N_FEATURES}), got {X.shape}")
    return X.reshape(-1, 1, IMAGE_SIDE, IMAGE_SIDE)


def sample_images(n: int = 8, seed: int = SEED) -> tuple[np.ndarray, np.ndarray]:
    """`n` test images (n, 1, 8, 8) and their labels, the same ones on every call with the same seed."""
    split = load_digits_split()
    idx = np.random.default_rng(seed).choice(len(split.X_test), size=n, replace=False)
    return as_images(split.X_test[idx]), split.y_test[idx]
