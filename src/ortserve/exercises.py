"""Write exercises/ from solutions/: every answer block replaced by a prompt, every output cleared.

solutions/ is the single source. An answer is marked the way nbgrader marks it:

    ### BEGIN SOLUTION
    ...the answer...
    ### END SOLUTION

In a code cell the block becomes a comment and `raise NotImplementedError(...)` at the block's indentation;
in a markdown cell it becomes a line asking for the student's answer. The knowledge-check answers inside
`<details>` blocks stay: they are folded away on purpose, for self-checking.
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import nbformat

BEGIN = "### BEGIN SOLUTION"
END = "### END SOLUTION"
CODE_PROMPT = "# YOUR CODE HERE"
CODE_RAISE = 'raise NotImplementedError("Exercise: replace this line with your answer")'
MARKDOWN_PROMPT = "_Your answer here._"
NB_VERSION = 4

_BLOCK = re.compile(
    r"^(?P<indent>[ \t]*)" + re.escape(BEGIN) + r"[^\n]*\n.*?^[ \t]*" + re.escape(END) + r"[^\n]*(\n|$)",
    re.MULTILINE | re.DOTALL,
)


class SolutionMarkerError(ValueError):
    """A solution cell whose BEGIN/END markers do not pair up."""


def strip_solutions(source: str, cell_type: str) -> str:
    """`source` with each marked answer replaced by the prompt for its cell type."""

    def prompt(match: re.Match) -> str:
        indent = match.group("indent")
        if cell_type == "code":
            return f"{indent}{CODE_PROMPT}\n{indent}{CODE_RAISE}\n"
        return f"{indent}{MARKDOWN_PROMPT}\n"

    stripped = _BLOCK.sub(prompt, source)
    if BEGIN in stripped or END in stripped:
        raise SolutionMarkerError(f"unpaired solution marker in a {cell_type} cell:\n{source}")
    return stripped.rstrip("\n") if not source.endswith("\n") else stripped


def has_solution(source: str) -> bool:
    return BEGIN in source or END in source


def exercise_notebook(solution: nbformat.NotebookNode) -> nbformat.NotebookNode:
    """The exercise version of a solution notebook (a new object; the input is not changed)."""
    nb = nbformat.from_dict(solution)
    for cell in nb.cells:
        if cell.cell_type in ("code", "markdown") and has_solution(cell.source):
            cell.source = strip_solutions(cell.source, cell.cell_type)
        if cell.cell_type == "code":
            cell.outputs = []
            cell.execution_count = None
            cell.metadata.pop("execution", None)
    nb.metadata.pop("widgets", None)
    return nb


def render(nb: nbformat.NotebookNode) -> str:
    """The exact text written to disk, so that a test can compare it with what is committed."""
    return nbformat.writes(nb, version=NB_VERSION) + "\n"


def expected_exercises(solutions_dir: Path) -> dict[str, str]:
    """File name -> text that exercises/ should hold for every notebook in `solutions_dir`."""
    return {
        path.name: render(exercise_notebook(nbformat.read(path, as_version=NB_VERSION)))
        for path in sorted(solutions_dir.glob("*.ipynb"))
    }


def write_exercises(solutions_dir: Path, exercises_dir: Path) -> list[Path]:
    """Regenerate `exercises_dir` from `solutions_dir`; stale exercise notebooks are removed."""
    exercises_dir.mkdir(parents=True, exist_ok=True)
    expected = expected_exercises(solutions_dir)
    for stale in exercises_dir.glob("*.ipynb"):
        if stale.name not in expected:
            stale.unlink()
    written = []
    for name, text in expected.items():
        path = exercises_dir / name
        path.write_text(text, encoding="utf-8")
        written.append(path)
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="ortserve exercises", description=__doc__.splitlines()[0])
    parser.add_argument("--solutions", type=Path, default=Path("solutions"), help="source notebooks")
    parser.add_argument("--exercises", type=Path, default=Path("exercises"), help="folder to (re)write")
    args = parser.parse_args(argv)
    for path in write_exercises(args.solutions, args.exercises):
        print(f"wrote {path}")
    return 0
