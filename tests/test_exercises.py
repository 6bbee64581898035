"""exercises/ is generated from solutions/: it must be up to date and must hold no answer."""

from pathlib import Path

import nbformat
import pytest

from ortserve import exercises

ROOT = Path(__file__).resolve().parents[1]
SOLUTIONS = ROOT / "solutions"
EXERCISES = ROOT / "exercises"


def test_every_solution_has_an_up_to_date_exercise():
    expected = exercises.expected_exercises(SOLUTIONS)
    assert expected, "solutions/ holds no notebook"
    committed = {p.name for p in EXERCISES.glob("*.ipynb")}
    assert committed == set(expected), "exercises/ and solutions/ hold different notebooks: run `make exercises`"
    for name, text in expected.items():
        assert (EXERCISES / name).read_text(encoding="utf-8") == text, f"exercises/{name} is stale: run `make exercises`"


@pytest.mark.parametrize("path", sorted(EXERCISES.glob("*.ipynb")), ids=lambda p: p.name)
def test_exercise_holds_no_answer_and_no_output(path):
    nb = nbformat.read(path, as_version=4)
    prompts = 0
    for cell in nb.cells:
        assert not exercises.has_solution(cell.source), f"{path.name} still holds a solution block"
        if cell.cell_type == "code":
            assert cell.outputs == [] and cell.execution_count is None, f"{path.name} has outputs"
            prompts += exercises.CODE_RAISE in cell.source
    assert prompts > 0, f"{path.name} asks the student for nothing"


def test_code_answer_becomes_prompt_at_its_indentation():
    source = "x = 1\nif x:\n    ### BEGIN SOLUTION\n    y = 2\n    ### END SOLUTION\nprint(y)\n"
    assert exercises.strip_solutions(source, "code") == (
        "x = 1\nif x:\n    # YOUR CODE HERE\n"
        '    raise NotImplementedError("Exercise: replace this line with your answer")\nprint(y)\n'
    )


def test_markdown_answer_becomes_prompt():
    source = "Why?\n\n### BEGIN SOLUTION\nBecause.\n### END SOLUTION"
    assert exercises.strip_solutions(source, "markdown") == "Why?\n\n_Your answer here._"


def test_several_blocks_in_one_cell_are_all_replaced():
    source = "### BEGIN SOLUTION\na = 1\n### END SOLUTION\nb = 2\n### BEGIN SOLUTION\nc = 3\n### END SOLUTION\n"
    out = exercises.strip_solutions(source, "code")
    assert out.count("raise NotImplementedError") == 2 and "b = 2" in out and "a = 1" not in out


def test_unpaired_marker_is_an_error_not_a_leak():
    with pytest.raises(exercises.SolutionMarkerError):
        exercises.strip_solutions("### BEGIN SOLUTION\nanswer = 42\n", "code")


def test_generator_writes_and_removes_stale(tmp_path):
    solutions = tmp_path / "solutions"
    solutions.mkdir()
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell("### BEGIN SOLUTION\nx = 1\n### END SOLUTION")])
    nb.cells[0].outputs = [nbformat.v4.new_output("stream", text="1\n")]
    nbformat.write(nb, solutions / "01_a.ipynb")
    out = tmp_path / "exercises"
    out.mkdir()
    (out / "99_stale.ipynb").write_text("{}")
    exercises.write_exercises(solutions, out)
    assert sorted(p.name for p in out.iterdir()) == ["01_a.ipynb"]
    written = nbformat.read(out / "01_a.ipynb", as_version=4)
    assert written.cells[0].outputs == [] and "x = 1" not in written.cells[0].source
