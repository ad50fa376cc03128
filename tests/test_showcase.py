"""The main job (``python -m benchmarks.showcase``): what it runs, where it writes, its table."""

import json
import pathlib

import pytest

from benchmarks import showcase

ROOT = pathlib.Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"


def test_the_job_runs_the_top_of_the_equal_time_ranking():
    from benchmarks import which_method

    top = which_method.equal_time_ranking(RESULTS)[0]
    best = showcase.best_method(RESULTS)
    assert top.key == f"k{best['k']}_equal_time_accuracy_delta_pt"
    assert best["equal_time_accuracy_delta_pt"] == top.delta_pt and top.time_ratio < 1


def test_a_ranking_led_by_another_method_is_refused(tmp_path):
    summary = {"equal_time_accuracy_delta_pt": 0.3, "time_ratio": 0.9, "diverged_runs": 0}
    runs = [{"seed": i} for i in range(10)]
    record = {"selection": {}, "summary": summary, "runs": runs}
    (tmp_path / "wus.json").write_text(json.dumps(record))
    with pytest.raises(RuntimeError, match="wus"):
        showcase.best_method(tmp_path)


def test_quick_run_writes_a_fresh_folder_and_nothing_under_results(tmp_path, capsys):
    before = {p: p.stat().st_mtime_ns for p in RESULTS.iterdir()}
    out = tmp_path / "run"
    summary = showcase.main(["--quick", "--out-dir", str(out)])
    assert {p: p.stat().st_mtime_ns for p in RESULTS.iterdir()} == before
    assert sorted(p.name for p in out.iterdir()) == [
        "showcase.quick.json", "showcase.quick.md", "showcase.quick.png"]  # fmt: skip
    record = json.loads((out / "showcase.quick.json").read_text())
    assert {r["arm"] for r in record["runs"]} == {
        "train_all", f"k{showcase.best_method()['k']}",
        "train_all_equal_time"}  # fmt: skip
    assert record["config"]["seeds"] == [0, 1]
    assert 0 < summary["time_ratio"] and summary["equal_time_steps"] >= 1
    printed = capsys.readouterr().out
    assert "saving" in printed and "2 paired seeds" in printed
    assert ("does not show" in printed) == (not summary["saving_shown"])


def test_out_dir_must_be_new_or_empty(tmp_path):
    (tmp_path / "old.json").write_text("{}")
    with pytest.raises(FileExistsError, match="not empty"):
        showcase.fresh_out_dir(str(tmp_path))


def test_default_out_dir_never_reuses_a_folder(tmp_path):
    first = showcase.fresh_out_dir(None, tmp_path)
    first.mkdir(parents=True)
    second = showcase.fresh_out_dir(None, tmp_path)
    assert second != first and second.name.startswith(first.name)
