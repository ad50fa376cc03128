"""The 'which method when' page: every figure read from a results file, the page up to date."""

import json
import pathlib

import pytest

from benchmarks import which_method

RESULTS = pathlib.Path(__file__).resolve().parents[1] / "benchmarks" / "results"


def test_every_question_names_figures_its_results_file_has():
    for q in which_method.QUESTIONS:
        summary = json.loads((RESULTS / f"{q.benchmark}.json").read_text())["summary"]
        missing = [k for k, _ in q.figures if k not in summary]
        assert not missing, (q.benchmark, missing)
        which_method.render(q.holds + q.fails, summary)  # KeyError if a template names no figure


def test_the_committed_page_is_the_page_the_results_give():
    committed = (RESULTS / which_method.OUT_NAME).read_text()
    assert committed == which_method.build(RESULTS), "run python -m benchmarks.overview"


def test_figures_carry_their_interval():
    s = {"d_pt": -0.6801, "d_ci_low_pt": -1.839, "d_ci_high_pt": 0.479, "r": 0.6624}
    assert which_method.render("{d_pt:ci} at {r:.2f}", s) == "-0.68 [-1.84, +0.48] at 0.66"


def test_a_template_naming_an_unmeasured_figure_fails():
    with pytest.raises(KeyError):
        which_method.render("{nothing:ci}", {"d_pt": 1.0})


def test_a_results_file_without_the_figures_is_listed_as_not_measured(tmp_path):
    record = {"command": "python -m benchmarks.wus", "summary": {"time_ratio": 0.8}}
    (tmp_path / "wus.json").write_text(json.dumps(record))
    page = which_method.build(tmp_path)
    assert "not measured under the protocol (rerun `python -m benchmarks.wus`)" in page
