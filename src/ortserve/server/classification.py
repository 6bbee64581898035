"""Triton's classification extension: an output asked for with `classification: N` answers, per row, its N highest
values as BYTES strings "value:index" or "value:index:label", highest first.

Values are printed with six decimals (C's %f, as Triton does), so clients that parse Triton's strings parse ours.
Labels come from a file the model's config.json names (output [{"name", "label_filename"}]), one per line, line i
for class i; `read_labels` reads them when the model is loaded.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ortserve.server.errors import InvalidInput, RepositoryError


def classify(array: np.ndarray, count: int, labels: list[str], name: str = "the output") -> np.ndarray:
    """The top `count` classes of each row of `array` ([classes] or [batch, classes]) as an object array of bytes."""
    if array.dtype.kind not in "biuf" or array.ndim not in (1, 2):
        raise InvalidInput(f"classification needs a numeric output of shape [classes] or [batch, classes]; {name} is "
                           f"{array.dtype} of shape {list(array.shape)}")  # fmt: skip
    rows = array.reshape(1, -1) if array.ndim == 1 else array
    count = min(count, rows.shape[1])  # as Triton: asking for more classes than there are gives them all
    order = np.argsort(-rows, axis=1, kind="stable")[:, :count]
    answer = np.empty(order.shape, dtype=object)
    for r, indices in enumerate(order):
        for c, index in enumerate(indices):
            text = f"{float(rows[r, index]):f}:{int(index)}"
            if index < len(labels):
                text += f":{labels[index]}"
            answer[r, c] = text.encode()
    return answer.reshape(count) if array.ndim == 1 else answer


def read_labels(label_files: dict[str, str], folder: Path) -> dict[str, list[str]]:
    """Output name -> its labels, from the files a model's config names (relative to the model's folder)."""
    labels = {}
    for output, filename in label_files.items():
        path = folder / filename
        try:
            labels[output] = path.read_text(encoding="utf-8").splitlines()
        except OSError as error:
            raise RepositoryError(f"the label file {filename!r} of output {output!r} cannot be read in {folder}: "
                                  f"{error.strerror or error}") from None  # fmt: skip
    return labels
