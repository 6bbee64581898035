"""The course's conventions hold for every notebook: structure, executed outputs, and a place in the README."""

import re
from pathlib import Path

import nbformat
import pytest

ROOT = Path(__file__).resolve().parents[1]
LESSONS = sorted((ROOT / "notebooks").glob("*.ipynb"))
SOLUTIONS = sorted((ROOT / "solutions").glob("*.ipynb"))
NAME = re.compile(r"^\d\d_[a-z0-9_]+\.ipynb$")


def _markdown(nb) -> str:
    return "\n".join(c.source for c in nb.cells if c.cell_type == "markdown")


def test_there_are_lessons_and_each_has_an_exercise_set():
    assert LESSONS, "notebooks/ holds no lesson"
    assert [p.name for p in LESSONS] == [p.name for p in SOLUTIONS], "every lesson needs solutions/ of the same name"


@pytest.mark.parametrize("path", LESSONS + SOLUTIONS, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_notebook_structure(path):
    assert NAME.match(path.name), f"{path.name}: expected NN_topic.ipynb"
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    assert nb.metadata.kernelspec.name == "python3"
    text = _markdown(nb)
    if path.parent.name == "notebooks":
        assert re.search(r"you will learn", text, re.IGNORECASE), f"{path.name}: no 'You will learn' list"
        assert re.search(r"recap", text, re.IGNORECASE), f"{path.name}: no recap"
    assert re.search(r"knowledge check", text, re.IGNORECASE), f"{path.name}: no knowledge check"
    assert "<details>" in text, f"{path.name}: knowledge-check answers belong in <details> blocks"


@pytest.mark.parametrize("path", LESSONS + SOLUTIONS, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_notebook_is_committed_executed_in_order(path):
    nb = nbformat.read(path, as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code" and c.source.strip()]
    counts = [c.execution_count for c in code]
    assert None not in counts, f"{path.name} has cells that were not run"
    assert counts == list(range(counts[0], counts[0] + len(counts))), f"{path.name} was not run top to bottom"


def test_readme_course_map_lists_every_lesson():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    for path in LESSONS:
        assert f"notebooks/{path.name}" in readme, f"README's course map misses {path.name}"
