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


# A lesson is read in the minutes it claims: about 1,800 words before its "Going further" section.
MAX_BODY_WORDS = 1800
OPENING = re.compile(r"\*\*(\d+) minutes\*\* · \*\*Prerequisites:\*\* \S")
GOING_FURTHER = re.compile(r"(?im)^#+\s*going further")
DOCS_HEADING = re.compile(r"(?im)^#+\s*documentation\b")
# The course speaks of its subject, not of how it was made or checked, nor of the machine that ran it.
SELF_REFERENCE = re.compile(
    r"(?i)\bnbval\b|\btest suite\b|\bthe tests\b|while writing|when we wrote|this notebook was|\bre-?execut"
    r"|the machine that ran|this machine\b|on our machine|\bCI\b"
)
MACHINE_PATH = re.compile(r"(?<![\w.])/(?:work|home|root|tmp|Users)/[\w.-]+")


def _prose_words(markdown: str) -> int:
    return len(re.findall(r"\S+", re.sub(r"```.*?```", " ", markdown, flags=re.S)))


def _readme_minutes() -> dict[str, int]:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    rows = re.findall(r"^\| \d\d \| \[notebooks/(\d\d_[a-z0-9_]+\.ipynb)\].*\| (\d+) \|$", readme, re.MULTILINE)
    return {name: int(minutes) for name, minutes in rows}


@pytest.mark.parametrize("path", LESSONS, ids=lambda p: p.name)
def test_lesson_opens_with_minutes_and_prerequisites_and_fits_them(path):
    nb = nbformat.read(path, as_version=4)
    cells = [c.source for c in nb.cells if c.cell_type == "markdown"]
    opening = OPENING.search(cells[0])
    assert opening, f"{path.name}: the first cell needs '**NN minutes** · **Prerequisites:** ...'"
    assert int(opening.group(1)) == _readme_minutes().get(path.name), f"{path.name}: minutes differ from the README map"
    body = []
    for source in cells:
        if GOING_FURTHER.search(source):
            break
        body.append(source)
    words = _prose_words("\n".join(body))
    assert words <= MAX_BODY_WORDS, f"{path.name}: {words} words of prose before 'Going further' (at most {MAX_BODY_WORDS})"


@pytest.mark.parametrize("path", LESSONS, ids=lambda p: p.name)
def test_lesson_ends_with_links_to_the_official_documentation(path):
    nb = nbformat.read(path, as_version=4)
    last = [c.source for c in nb.cells if c.cell_type == "markdown"][-1]
    assert DOCS_HEADING.search(last), f"{path.name}: the last markdown cell should be the 'Documentation' section"
    links = re.findall(r"\]\((https://[^)\s]+)\)", last)
    assert 2 <= len(links) <= 4, f"{path.name}: {len(links)} documentation links, expected 2 to 4"


@pytest.mark.parametrize("path", LESSONS + SOLUTIONS, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_notebook_speaks_of_its_subject(path):
    nb = nbformat.read(path, as_version=4)
    for index, cell in enumerate(nb.cells):
        prose = cell.source if cell.cell_type == "markdown" else re.sub(r"#\s*NBVAL_\w+", "", cell.source)
        found = SELF_REFERENCE.search(prose)
        assert not found, f"{path.name} cell {index}: {found.group(0)!r} speaks of how the course was made or run"
        for output in cell.get("outputs", []):
            text = output.get("text", "") + "".join(str(v) for v in output.get("data", {}).values())
            found = MACHINE_PATH.search(text)
            assert not found, f"{path.name} cell {index}: output shows a machine path {found.group(0)!r}"


@pytest.mark.parametrize("path", LESSONS, ids=lambda p: p.name)
def test_lesson_shows_its_common_errors_before_the_recap(path):
    cells = nbformat.read(path, as_version=4).cells

    def heading(pattern: str) -> int | None:
        found = [i for i, c in enumerate(cells) if c.cell_type == "markdown" and re.search(pattern, c.source)]
        return found[0] if found else None

    errors, recap = heading(r"(?im)^##\s*common errors"), heading(r"(?im)^##\s*recap")
    assert errors is not None, f"{path.name}: no '## Common errors' section"
    assert recap is None or errors < recap, f"{path.name}: 'Common errors' should come before the recap"
    shown = cells[errors + 1 : recap]
    assert any(c.cell_type == "code" for c in shown), f"{path.name}: the common errors are not run in a cell"
