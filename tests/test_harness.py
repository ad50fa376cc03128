"""Tests for the benchmark harness and the baseline benchmark's quick mode."""

import argparse
import doctest
import json
import math
import re
import subprocess

import numpy as np
import pytest
from scipy import stats

from benchmarks import harness


def _args(tmp_path, quick: bool) -> argparse.Namespace:
    return harness.parser("demo", "demo").parse_args(
        (["--quick"] if quick else []) + ["--out-dir", str(tmp_path)]
    )


def test_doctests():
    failed, attempted = doctest.testmod(harness)
    assert attempted > 0 and failed == 0


def test_interleave_is_seed_major():
    order = []

    def arm(name):
        def run(seed):
            order.append((name, seed))
            return {"final_accuracy": seed / 10}

        return run

    runs = harness.interleave({"base": arm("base"), "method": arm("method")}, [0, 1, 2])
    want = [(a, s) for s in range(3) for a in ("base", "method")]
    assert order == want
    assert [(r["arm"], r["seed"]) for r in runs] == want
    assert runs[3]["final_accuracy"] == 0.1


def test_time_to_accuracy():
    hist = [
        {"train_time_s": 1.0, "test_accuracy": 0.5, "val_accuracy": 0.9},
        {"train_time_s": 2.5, "test_accuracy": 0.8, "val_accuracy": 0.7},
        {"train_time_s": 4.0, "test_accuracy": 0.95, "val_accuracy": 0.95},
    ]
    assert harness.time_to_accuracy(hist, 0.8) == 2.5
    assert harness.time_to_accuracy(hist, 0.95) == 4.0
    assert harness.time_to_accuracy(hist, 0.99) is None
    assert harness.time_to_accuracy(hist, 0.85, key="val_accuracy") == 1.0
    assert harness.time_to_accuracy([], 0.1) is None


def test_paired_ci_matches_hand_computation():
    a = [0.91, 0.93, 0.92, 0.95, 0.90]
    b = [0.93, 0.94, 0.95, 0.95, 0.93]
    d = np.array(b) - np.array(a)
    half = stats.t.ppf(0.975, len(d) - 1) * d.std(ddof=1) / math.sqrt(len(d))
    mean, lo, hi = harness.paired_ci(a, b)
    assert mean == pytest.approx(d.mean(), abs=1e-12)
    assert (lo, hi) == pytest.approx((d.mean() - half, d.mean() + half), abs=1e-12)
    m1, lo1, hi1 = harness.paired_ci([1.0], [3.0])
    assert m1 == 2.0 and math.isnan(lo1) and math.isnan(hi1)
    with pytest.raises(ValueError, match="paired"):
        harness.paired_ci([1.0, 2.0], [1.0])


def test_paired_ratio_is_median_of_per_round_ratios():
    # a drift that doubles the machine's speed halfway hits both arms in each round alike
    den = [10.0] * 10 + [5.0] * 10
    num = [11.0] * 10 + [5.5] * 10
    m, lo, hi = harness.paired_ratio(num, den)
    assert m == pytest.approx(1.1) and lo == pytest.approx(1.1) and hi == pytest.approx(1.1)
    # a ratio of medians would not see the pairing: 8.25 / 7.5 = 1.1 here by luck, so skew it
    num2 = [11.0] * 10 + [5.5] * 9 + [100.0]
    m2, lo2, hi2 = harness.paired_ratio(num2, den)
    assert m2 == pytest.approx(1.1) and lo2 <= m2 <= hi2
    # nan pairs (an arm not timed that round) are left out
    m3, _, _ = harness.paired_ratio([2.0, math.nan, 6.0], [1.0, 1.0, 3.0])
    assert m3 == 2.0
    rng = np.random.default_rng(0)
    r = 1.0 + 0.05 * rng.standard_normal(200)
    m4, lo4, hi4 = harness.paired_ratio(r, np.ones(200))
    assert lo4 < m4 < hi4 and hi4 - lo4 < 0.03
    with pytest.raises(ValueError, match="paired"):
        harness.paired_ratio([1.0], [1.0, 2.0])
    with pytest.raises(ValueError, match="no pair"):
        harness.paired_ratio([math.nan], [1.0])


def test_git_commit_dirty_counts_code_not_prose_or_results(tmp_path):
    def git(*args):
        subprocess.run(["git", "-C", str(tmp_path), *args], check=True, capture_output=True)

    paths = ("pkg/a.py", "docs/page.md", "docs/conf.py", "README.md", "benchmarks/results/r.json")
    for path in paths:
        (tmp_path / path).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / path).write_text("0")
    git("init", "-q")
    git("add", "-A")
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "init")
    clean = harness.git_commit(tmp_path)
    assert re.fullmatch(r"[0-9a-f]{40}", clean)
    for path in ("docs/page.md", "README.md", "benchmarks/results/r.json"):
        (tmp_path / path).write_text("1")
    (tmp_path / "untracked.py").write_text("1")
    assert harness.git_commit(tmp_path) == clean
    for path in ("pkg/a.py", "docs/conf.py"):
        (tmp_path / path).write_text("1")
        assert harness.git_commit(tmp_path) == clean + "+dirty", path
        git("checkout", "--", path)
    assert harness.git_commit(tmp_path / "no_such_dir") == "unknown"


def test_median_mean_std_and_metadata():
    assert harness.median_ms([5.0, 1.0, 3.0]) == 3.0
    assert math.isnan(harness.median_ms([]))
    assert harness.mean_std([2.0]) == (2.0, 0.0)
    v = harness.versions()
    assert set(v) == {"jax", "jaxlib", "optax", "flax", "numpy", "optax_multirate", "git_commit"}
    assert v["git_commit"] == "unknown" or re.fullmatch(r"[0-9a-f]{40}(\+dirty)?", v["git_commit"])
    assert {"device", "cores", "platform"} <= set(harness.machine_info())
    assert harness.command_line(["--seeds", "3"], "baseline") == (
        "python -m benchmarks.baseline --seeds 3"
    )


def _write(tmp_path, quick, acc=0.9, plot=None):
    runs = [
        {
            "arm": "base",
            "seed": 0,
            "final_accuracy": acc,
            "history": [{"epoch": 1, "train_time_s": 1.0, "test_accuracy": acc}],
        }
    ]
    return harness.write_results(
        "demo",
        args=_args(tmp_path, quick),
        config={"epochs": 1},
        runs=runs,
        summary={"final_accuracy": acc, "nan_figure": float("nan"), "ok": True},
        claim_md="The paper says 1.",
        table_md="| a |\n| - |\n| 1 |",
        plot=plot if plot is not None else harness.plot_curves(runs),
        argv=["--quick"] if quick else [],
    )


def test_write_results_quick_and_full_files(tmp_path):
    full = _write(tmp_path, quick=False)
    assert sorted(p.name for p in full.values()) == ["demo.json", "demo.md", "demo.png"]
    quick = _write(tmp_path, quick=True, acc=0.1)
    assert sorted(p.name for p in quick.values()) == [
        "demo.quick.json",
        "demo.quick.md",
        "demo.quick.png",
    ]
    record = json.loads((tmp_path / "demo.json").read_text())
    assert list(record) == [
        "benchmark",
        "command",
        "date",
        "quick",
        "machine",
        "versions",
        "config",
        "runs",
        "summary",
    ]
    assert record["quick"] is False and record["summary"]["final_accuracy"] == 0.9
    assert record["summary"]["nan_figure"] is None  # JSON has no NaN
    assert record["command"] == "python -m benchmarks.demo"
    assert json.loads((tmp_path / "demo.quick.json").read_text())["quick"] is True
    md = (tmp_path / "demo.md").read_text()
    assert "The paper says 1." in md and "| 1 |" in md and "python -m benchmarks.demo" in md
    assert (tmp_path / "demo.png").read_bytes()[:4] == b"\x89PNG"


def test_failing_run_leaves_results_untouched(tmp_path):
    _write(tmp_path, quick=False)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}

    def broken(fig):
        raise RuntimeError("plot failed")

    with pytest.raises(RuntimeError, match="plot failed"):
        _write(tmp_path, quick=False, acc=0.1, plot=broken)

    def crash(seed):
        raise RuntimeError("run failed")

    with pytest.raises(RuntimeError, match="run failed"):
        harness.interleave({"base": crash}, [0])
    after = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    assert after == before  # same files, same bytes, no temp files left
    with pytest.raises(ValueError, match="summary"):
        harness.write_results(
            "demo",
            args=_args(tmp_path, False),
            config={},
            runs=[],
            summary={"x": [1]},
            claim_md="",
            table_md="",
        )


def test_baseline_quick(tmp_path):
    from benchmarks.baseline import QUICK_GRID, main

    main(["--quick", "--out-dir", str(tmp_path)])
    record = json.loads((tmp_path / "baseline.quick.json").read_text())
    keys = {
        "final_accuracy",
        "final_accuracy_std",
        "train_time_s",
        "compile_time_s",
        "step_time_ms",
        "diverged_runs",
    }
    assert keys <= set(record["summary"])
    assert record["quick"] is True and len(record["runs"]) == 1
    sel = record["selection"]["baseline"]  # the step size, selected on validation
    assert sel["grid"] == [{"learning_rate": lr} for lr in QUICK_GRID]
    assert sel["configs_tried"] == len(QUICK_GRID) == len(sel["scores"])
    assert sel["chosen"] in sel["grid"] and record["runs"][0]["config"] == sel["chosen"]
    assert record["summary"]["diverged_runs"] == 0 and record["runs"][0]["diverged"] is False
    assert record["config"]["splits"]["stratified"] is True
    assert not (tmp_path / "baseline.json").exists()
    assert (tmp_path / "baseline.quick.md").exists() and (tmp_path / "baseline.quick.png").exists()
