"""benchmarks/report.py: the benchmark tables in benchmarks/README.md and docs/ and the result pages are what the
JSON under benchmarks/results/ says (regenerated, not hand-edited), and the generator notices a changed number."""

import copy

import pytest

from benchmarks import report


def test_generated_tables_match_results():
    diffs = report.check()
    assert not diffs, "run `python benchmarks/report.py` (or fix the JSON):\n" + "\n".join(diffs)


def test_every_block_is_generated_from_an_existing_result():
    missing = [name for _, name, result_file, _ in report.BLOCKS if report.load(result_file) is None]
    assert not missing, missing


def test_a_changed_measurement_changes_the_table():
    result = report.load("step_time.json")
    if result is None:
        pytest.skip("no benchmarks/results/step_time.json")
    changed = copy.deepcopy(result)
    row = next(r for r in changed["tables"][0]["rows"] if r["config"] == "fqt-W8A8G8-inductor")
    row["vs_fp32_eager"] = 9.99
    assert "**9.99x**" in report.step_time_ratios(changed)
    assert "**9.99x**" not in report.step_time_ratios(result)


def test_replace_block_needs_its_markers():
    text = "a\n<!-- report.py: t -->\nold\n<!-- /report.py: t -->\nb\n"
    assert report.replace_block(text, "t", "new") == "a\n<!-- report.py: t -->\nnew\n<!-- /report.py: t -->\nb\n"
    with pytest.raises(ValueError):
        report.replace_block("no markers", "t", "new")
