"""Prompt sources: deterministic per (seed, iteration); bad prompt files reported line by line."""

import pytest

from learner.evaluation import heldout_prompts
from services import shapes_world
from services.prompts import PromptSource, read_prompts_file


def test_shapes_prompts_are_a_function_of_seed_and_iteration():
    a, b = PromptSource("shapes", 0), PromptSource("shapes", 0)
    assert a.for_iteration(5, 8) == b.for_iteration(5, 8)
    assert a.for_iteration(5, 8) != a.for_iteration(6, 8)
    assert a.for_iteration(5, 8) != PromptSource("shapes", 1).for_iteration(5, 8)
    assert not any(shapes_world.is_heldout(p) for p in a.for_iteration(3, 64))
    assert all(shapes_world.is_heldout(p) for p in heldout_prompts(8, seed=0))


def test_prompts_file_reports_every_bad_line_with_its_number(tmp_path):
    f = tmp_path / "p.txt"
    f.write_text("a red circle\n\n# comment\na purple circle\ntwo blue squares\nx\ty\n" + "a" * 3000 + "\n")
    with pytest.raises(ValueError) as err:
        read_prompts_file(f, shapes_grammar=True)
    msg = str(err.value)
    assert "3 bad line(s)" in msg and "line 4:" in msg and "purple" in msg and "line 6:" in msg and "line 7:" in msg
    assert "line 1:" not in msg and "line 5:" not in msg


def test_prompts_file_ok_and_empty(tmp_path):
    f = tmp_path / "p.txt"
    f.write_text("a photo of a cat\n\n  a dog on a bike  \n")
    assert read_prompts_file(f) == ["a photo of a cat", "a dog on a bike"]
    src = PromptSource("file", 0, str(f))
    assert set(src.for_iteration(0, 10)) <= {"a photo of a cat", "a dog on a bike"}
    (tmp_path / "e.txt").write_text("\n# only a comment\n")
    with pytest.raises(ValueError, match="no prompts"):
        read_prompts_file(tmp_path / "e.txt")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        read_prompts_file(tmp_path / "missing.txt")
    with pytest.raises(FileNotFoundError, match="is a folder; give a text file"):  # it read "does not exist"
        read_prompts_file(tmp_path)
    (tmp_path / "b.bin").write_bytes(b"\xff\xfe\x00bad")
    with pytest.raises(ValueError, match="not UTF-8"):
        read_prompts_file(tmp_path / "b.bin")
