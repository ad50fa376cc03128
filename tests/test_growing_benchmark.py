"""Tests for the growing benchmark (``benchmarks/growing.py``): the schedule rule, the compile
clock of a run, and the ``--quick`` run's record."""

import dataclasses
import json

import pytest

from benchmarks import growing as bench
from benchmarks import protocol

# widths 16 -> 32 (one growth); stage lengths 1..7 of a 10-epoch budget
PLAN = dataclasses.replace(bench.QUICK, final_width=32, m0=0.5, p_c=1.0, epochs=10,
                           stage_epochs=(1, 2, 3, 4, 5, 6, 7), train_examples=512)  # fmt: skip


def _costs(ratio_16: float) -> dict:
    table = [{"width": 16, "step_time_ratio": ratio_16, "flop_ratio": 0.5},
             {"width": 32, "step_time_ratio": 1.0, "flop_ratio": 1.0}]  # fmt: skip
    return {"table": table}


def test_the_schedule_is_the_first_mostly_small_candidate_predicting_at_most_0_7():
    setup = bench.Setup(PLAN, [0])
    # predicted = (0.5 t0 + (10 - t0)) / 10 = 1 - 0.05 t0; steps growing: t0 / 10
    schedule, records = bench.choose_schedule(setup, _costs(0.5))
    assert schedule.epochs == (6, 4) and schedule.widths == ((16, 16), (32, 32))
    assert [r["chosen"] for r in records] == [False] * 5 + [True, False]
    assert [r["predicted_time_ratio"] for r in records] == pytest.approx(
        [0.95, 0.9, 0.85, 0.8, 0.75, 0.7, 0.65]
    )
    assert [r["growing_share"] for r in records] == pytest.approx([t / 10 for t in range(1, 8)])
    assert records[5]["predicted_flop_ratio"] == pytest.approx((6 * 0.5 + 4) / 10)
    assert records[5]["widths"] == [16, 32] and records[5]["epochs"] == [6, 4]
    # a cheap small stage: 3 epochs would predict 0.7, but most steps must run small
    schedule, records = bench.choose_schedule(setup, _costs(0.0))
    assert schedule.epochs == (5, 5) and records[4]["predicted_time_ratio"] == pytest.approx(0.5)


def test_without_a_qualifying_candidate_the_cheapest_is_taken():
    setup = bench.Setup(dataclasses.replace(PLAN, stage_epochs=(5, 6, 12)), [0])  # 12 overflows
    schedule, records = bench.choose_schedule(setup, _costs(0.9))
    assert schedule.epochs == (6, 4) and [r["chosen"] for r in records] == [False, True]
    assert records[1]["predicted_time_ratio"] == pytest.approx(0.94)
    with pytest.raises(ValueError, match="no candidate"):
        bench.choose_schedule(bench.Setup(dataclasses.replace(PLAN, stage_epochs=(10,)), [0]),
                              _costs(0.9))  # fmt: skip


def test_a_run_with_fresh_steps_compiles_and_counts_every_stage():
    setup = bench.Setup(dataclasses.replace(PLAN, epochs=3), [0])
    schedule = setup.schedule(1)  # (1, 2) epochs at widths 16, 32
    config = {"learning_rate": 0.1}
    tx, cache = setup.optimizer("grown", config, schedule, shared=False)
    assert cache is None
    r = bench.run_arm(setup, "grown", tx, 0, {"val": setup.val}, schedule, measure_flops=True)
    assert r["num_compiles"] == [1, 1] and r["steps_per_stage"] == [setup.spe, 2 * setup.spe]
    assert len(r["flops_per_step"]) == 2 and 0 < r["flops_per_step"][0] < r["flops_per_step"][1]
    clock = [row["compile_time_s"] for row in r["history"]]
    assert 0 < clock[0] < clock[1] == clock[2] == pytest.approx(r["compile_time_s"])
    assert r["growths"][0]["max_logit_change"] < 1e-4  # the growth preserves the function
    # shared steps (the selection seeds): a second run compiles nothing and its clock says so
    tx, cache = setup.optimizer("grown", config, schedule, shared=True)
    assert setup.optimizer("grown_no_vt", config, schedule, shared=True)[0] is tx
    assert setup.optimizer("grown_no_lra", config, schedule, shared=True)[0] is not tx
    first = bench.run_arm(setup, "grown", tx, 0, {"val": setup.val}, schedule, step_cache=cache)
    again = bench.run_arm(setup, "grown", tx, 1, {"val": setup.val}, schedule, step_cache=cache)
    assert first["num_compiles"] == [1, 1] and again["num_compiles"] == [0, 0]
    assert again["compile_time_s"] == 0.0
    assert all(row["compile_time_s"] == 0.0 for row in again["history"])


def test_quick_run_records_selection_and_every_summary_key_of_both_twins(tmp_path):
    bench.main(["--quick", "--out-dir", str(tmp_path)])
    record = json.loads((tmp_path / "growing.quick.json").read_text())
    sel, s, n = record["selection"], record["summary"], len(bench.QUICK.learning_rates)
    plain = ["time_ratio", "time_ratio_with_compile", "time_to_accuracy_ratio",
             "time_to_accuracy_ratio_with_compile", "time_to_accuracy_seeds_reached",
             "predicted_time_ratio", "flop_ratio", "max_logit_change", "diverged_runs"]  # fmt: skip
    deltas = ["accuracy_delta_pt", "no_vt_accuracy_delta_pt", "no_lra_accuracy_delta_pt",
              "plain_accuracy_delta_pt", "carry_accuracy_delta_pt"]  # fmt: skip
    twins = (("", "mlp", record["config"], [16, 32]),
             ("cnn_", "cnn", record["config"]["cnn"], [8, 16]))  # fmt: skip
    for prefix, model, config, widths in twins:
        for arm in ("fixed", "grown"):
            assert sel[prefix + arm]["configs_tried"] == n, prefix + arm
            assert len(sel[prefix + arm]["scores"]) == n, prefix + arm
        for arm in bench.ABLATIONS:
            assert sel[prefix + arm]["inherits"] == "grown", prefix + arm
            assert sel[prefix + arm]["configs_tried"] == 0, prefix + arm
            assert sel[prefix + arm]["chosen"] == sel[prefix + "grown"]["chosen"]
        for key in plain + deltas:
            assert prefix + key in s, prefix + key
        for key in deltas:
            for ci in protocol.ci_keys(prefix + key):
                assert ci in s and s[ci] is None, ci  # one seed: no interval
        runs = [r for r in record["runs"] if r["model"] == model]
        assert s[prefix + "diverged_runs"] == sum(r["diverged"] for r in runs)
        assert {r["arm"] for r in runs} == set(bench.ARMS), model
        assert None not in (s[prefix + "fixed_accuracy"], s[prefix + "accuracy_delta_pt"])
        assert s[prefix + "max_logit_change"] < 1e-4  # every growth preserved the function
        assert [r["width"] for r in config["step_costs"]["table"]] == widths
        assert sum(c["chosen"] for c in config["schedule_candidates"]) == 1
    assert record["config"]["model"].startswith("MLP") and config["model"].startswith("CNN")
    md = (tmp_path / "growing.quick.md").read_text()
    assert "### The CNN twin" in md and (tmp_path / "growing.quick.png").exists()
