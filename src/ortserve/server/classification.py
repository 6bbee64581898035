"""Triton's classification extension: an output's top classes as strings instead of its values.

A request that asks for an output with the parameter `classification: N` gets, for each row of that output, the
N highest values, highest first, as BYTES "value:index" or "value:index:label" -- the label is line `index` of
the output's label file, named in the model's config.json (`"output": [{"name", "label_filename"}]`) and read
from the model's folder when the model loads. As Triton does, the value is printed as C++'s std::to_string
prints it (six decimals for floats, digits for integers) and N is clamped to the number of classes. A rank-1
output is one row ([N] back), a rank-2 output one row per batch item ([batch, N] back); ties go to the lower
index (Triton leaves their order open).
"""

from __future__ import annotations

from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from ortserve.server.errors import InvalidInput, RepositoryError

# numpy kinds that have an order: signed, unsigned integers and floats (FP16 too; Triton refuses FP16 and BOOL).
_NUMERIC_KINDS = "iuf"


def classify(array: np.ndarray, count: int, labels: Sequence[str] = (), what: str = "the output") -> np.ndarray:
    """The top `count` classes of each row of `array` as an object array of bytes, shape [rows, k] or [k],
    k = min(count, classes); InvalidInput for an output that is not numeric or not of rank 1 or 2."""
    if array.dtype.kind not in _NUMERIC_KINDS:
        raise InvalidInput(f"{what} holds {_kind_name(array)}; classification needs numbers (integers or floats)")
    if array.ndim not in (1, 2):
        raise InvalidInput(f"{what} has shape {list(array.shape)}; classification needs one axis of classes, "
                           "or a batch axis and one of classes (rank 1 or 2)")  # fmt: skip
    rows = array.reshape(-1, array.shape[-1])
    classes = rows.shape[1]
    k = min(count, classes)
    # Highest first, ties to the lower index: a stable ascending sort of each row reversed, read backwards.
    order = classes - 1 - np.argsort(rows[:, ::-1], axis=1, kind="stable")[:, ::-1][:, :k]
    text = _format_float if array.dtype.kind == "f" else str
    answer = np.empty((len(rows), k), dtype=object)
    for r, (row, indices) in enumerate(zip(rows.tolist(), order.tolist())):
        for c, index in enumerate(indices):
            entry = f"{text(row[index])}:{index}"
            if index < len(labels):
                entry += f":{labels[index]}"
            answer[r, c] = entry.encode()
    return answer.reshape(k) if array.ndim == 1 else answer


def _format_float(value: float) -> str:
    return f"{value:.6f}"  # std::to_string's "%f", which Triton prints classification values with


def _kind_name(array: np.ndarray) -> str:
    return "strings" if array.dtype.kind in "OSU" else f"{array.dtype} values"


def read_labels(label_files: Mapping[str, str], folder: Path) -> dict[str, list[str]]:
    """Output name -> its labels, one per line of its label file in the model's `folder` (line i: class i), split
    on newlines only, as Triton reads them; RepositoryError naming the file when it cannot be read."""
    labels = {}
    for output, filename in label_files.items():
        path = folder / filename
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as error:
            raise RepositoryError(f"cannot read the label file of output {output!r} at {path}: {error}") from None
        lines = [line.rstrip("\r") for line in text.split("\n")]
        if lines and lines[-1] == "":  # the file's final newline ends the last label
            lines.pop()
        labels[output] = lines
    return labels
