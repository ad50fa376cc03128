"""Smoke runs of the step-cost and overview benchmarks (figures are reported, not asserted)."""

import json

from benchmarks import overview, step_cost

STEP_COST_KEYS = [
    p + k
    for p in ("", "mlp_", "resnet_")
    for k in (
        "head_only_time_ratio",
        "head_only_flop_ratio",
        "bias_only_time_ratio",
        "bias_only_flop_ratio",
        "dispatch_overhead_ratio",
    )
]


def test_step_cost_quick_writes_summary(tmp_path):
    summary = step_cost.main(["--quick", "--out-dir", str(tmp_path)])
    data = json.loads((tmp_path / "step_cost.quick.json").read_text())
    assert data["quick"] is True and data["command"].startswith("python -m benchmarks.step_cost")
    assert not (tmp_path / "step_cost.json").exists()  # quick never writes the full results
    for k in STEP_COST_KEYS:
        assert k in summary and k in data["summary"]
    # Fewer FLOPs when only the head is differentiated: the protocol's whole point.
    for p in ("", "mlp_", "resnet_"):
        assert 0 < summary[p + "head_only_flop_ratio"] < 1


def test_overview_gathers_results(tmp_path):
    (tmp_path / "wus.json").write_text(
        json.dumps(
            {
                "command": "python -m benchmarks.wus",
                "date": "2026-11-24T00:00:00Z",
                "machine": {"device": "cpu"},
                "summary": {"time_ratio": 0.8, "accuracy_delta_pt": -0.1},
            }
        )
    )
    (tmp_path / "wus.quick.json").write_text("{}")
    text = overview.main(["--results-dir", str(tmp_path)])
    assert "`time_ratio` 0.8" in text and "python -m benchmarks.wus" in text
    assert "wus.quick.json" in text and "Not yet measured" in text
    assert (tmp_path / "overview.md").read_text() == text
