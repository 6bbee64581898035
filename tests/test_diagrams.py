"""The diagrams draw reproducibly: each PNG opens at its fixed size, and drawing it again gives the same bytes."""

import matplotlib.image
import pytest

from ortserve import diagrams

SIZES = {"02_export_path.png": (500, 1360), "08_request_path.png": (580, 1400), "13_deployment.png": (760, 1400)}


def test_every_diagram_has_an_expected_size():
    assert set(SIZES) == set(diagrams.DIAGRAMS)


@pytest.mark.parametrize("name", sorted(SIZES))
def test_diagram_opens_at_its_size_and_redraws_identically(name, tmp_path):
    first = diagrams.draw(name, tmp_path / "first")
    image = matplotlib.image.imread(first)
    assert image.shape[:2] == SIZES[name]
    second = diagrams.draw(name, tmp_path / "second")
    assert first.read_bytes() == second.read_bytes()
    assert b"Matplotlib" not in first.read_bytes()  # no version embedded in the PNG


def test_command_line_writes_every_diagram(tmp_path, capsys):
    assert diagrams.main(["--out", str(tmp_path)]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(SIZES)
