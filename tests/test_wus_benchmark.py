"""Tests for the WUS benchmark (``benchmarks/wus.py``): the window pattern follows the decision
signal, the random-window control's schedule, and the ``--quick`` run's record."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from benchmarks import protocol
from benchmarks import wus as bench
from optax_multirate.wus import wus_phase

SPE = 3  # steps per decision period (an epoch)


def _phases(values_per_period, **config):
    """The phase of each step of the benchmark's WUS fed one value per period."""
    params = {"Conv_0": {"kernel": jnp.ones((3, 3, 1, 2)), "bias": jnp.zeros(2)},
              "head": {"kernel": jnp.ones((2, 2)), "bias": jnp.zeros(2)}}  # fmt: skip
    cfg = {"learning_rate": 0.1, "signal": "train_accuracy", "threshold": 0.005, "window": 2,
           "patience": 1, **config}  # fmt: skip
    tx = bench.make_tx(steps=100, steps_per_epoch=SPE, warmup=1, **cfg)
    state = tx.init(params)
    grads = jax.tree.map(jnp.ones_like, params)
    update = jax.jit(tx.update)
    phases = []
    for v in values_per_period:
        for _ in range(SPE):
            phases.append(int(wus_phase(state)))
            _, state = update(grads, state, params, value=jnp.float32(v))
    return np.array(phases).reshape(-1, SPE), state


def test_a_flat_signal_opens_windows():
    phases, state = _phases([0.9] * 8)
    assert (phases == phases[:, :1]).all()  # a period is in a window or not, as a whole
    # periods 1-2 judge nothing flat yet (no previous value, then warmup is met at 2: flat);
    # each window lasts 2 periods, then one judged period
    np.testing.assert_array_equal(phases[:, 0], [0, 0, 1, 1, 0, 1, 1, 0])
    windows, skipped = (
        int(optax.tree_utils.tree_get(state, k)) for k in ("windows", "skipped_steps")
    )
    assert windows == 3 and skipped == 4 * SPE  # the 3rd opens at the end of period 8


def test_a_rising_signal_opens_none():
    phases, state = _phases(0.5 + 0.01 * np.arange(8))  # +1 pt per period: never flat
    assert phases.sum() == 0 and int(optax.tree_utils.tree_get(state, "windows")) == 0


def test_windows_open_once_the_signal_flattens():
    values = [0.3, 0.5, 0.7, 0.8, 0.85, 0.851, 0.852, 0.852, 0.852, 0.852]
    phases, _ = _phases(values)
    assert phases[:6].sum() == 0  # still rising (periods 1-5), judged flat at the 6th
    np.testing.assert_array_equal(phases[6:, 0], [1, 1, 0, 1])


def test_threshold_and_patience_shape_the_pattern():
    values = [0.9, 0.903, 0.906, 0.909, 0.912, 0.915, 0.918, 0.921]  # +0.3 pt per period
    tight, _ = _phases(values, threshold=0.002)
    loose, _ = _phases(values, threshold=0.005)
    assert tight.sum() == 0 and loose.sum() > 0
    patient, _ = _phases([0.9] * 8, patience=2)
    np.testing.assert_array_equal(patient[:, 0], [0, 0, 0, 1, 1, 0, 0, 1])


@pytest.mark.parametrize("skipped, window", [(0, 2), (4, 2), (5, 2), (6, 4), (9, 4)])
def test_random_windows_skip_what_wus_skipped(skipped, window):
    epochs, warmup = 20, 3
    for seed in range(5):
        opens = bench._random_windows(np.random.default_rng(seed), skipped, window, warmup,
                                      epochs)  # fmt: skip
        covered = [e for p in opens for e in range(p, min(p + window, epochs))]
        assert len(covered) == len(set(covered)) == skipped
        starts = sorted(opens)
        assert all(b - a >= window + 1 for a, b in zip(starts, starts[1:]))
        assert all(p >= warmup for p in starts)


def test_quick_run_records_selection_and_every_summary_key(tmp_path):
    bench.main(["--quick", "--out-dir", str(tmp_path)])
    record = json.loads((tmp_path / "wus.quick.json").read_text())
    sel = record["selection"]
    selected = ("baseline", "wus", "wuslr", "baseline_equal_time")  # no wuslr twin in --quick
    for arm in selected:
        assert sel[arm]["configs_tried"] == len(bench.QUICK_LEARNING_RATES), arm
        assert len(sel[arm]["scores"]) == len(sel[arm]["grid"]) == sel[arm]["configs_tried"]
    assert {r["signal"] for r in sel["wus"]["grid"]} == set(bench.SIGNALS)
    assert sel["random_windows"]["inherits"] == "wus"
    assert sel["baseline_half_budget"]["inherits"] == "baseline"
    assert sel["random_windows"]["chosen"] == sel["wus"]["chosen"]
    s = record["summary"]
    plain = ["time_ratio", "time_ratio_with_compile", "skipped_step_fraction",
             "predicted_time_ratio", "bias_only_step_time_ratio", "bias_only_flop_ratio",
             "diverged_runs"]  # fmt: skip
    deltas = ["accuracy_delta_pt", "equal_time_accuracy_delta_pt",
              "baseline_half_budget_delta_pt", "random_windows_accuracy_delta_pt"]  # fmt: skip
    twins = ["wuslr_time_ratio", "wuslr_time_ratio_with_compile"]
    twin_deltas = ["wuslr_accuracy_delta_pt", "wuslr_equal_time_accuracy_delta_pt"]  # None ok
    for key in plain + twins:
        assert key in s, key
    for key in deltas + twin_deltas:
        assert key in s, key
        for ci in protocol.ci_keys(key):
            assert ci in s and s[ci] is None, ci  # one seed: no interval
    assert s["diverged_runs"] == sum(r["diverged"] for r in record["runs"])
    arms = {r["arm"] for r in record["runs"]}
    assert arms == {"baseline", "wus", "wuslr", "random_windows", "baseline_half_budget",
                    "baseline_equal_time"}  # fmt: skip
    assert s["time_ratio"] > 0 and s["accuracy_delta_pt"] is not None
    assert 0.0 < s["bias_only_flop_ratio"] < 1.0
    assert (tmp_path / "wus.quick.md").exists() and (tmp_path / "wus.quick.png").exists()


def test_wus_without_windows_is_the_baseline_optimizer():
    """The schedule sits outside ``wus``; with no window the updates are the baseline's."""
    rng = np.random.default_rng(0)
    params = {"Conv_0": {"kernel": jnp.ones((3, 3, 1, 2)), "bias": jnp.zeros(2)}}
    kw = dict(steps=6, steps_per_epoch=SPE, learning_rate=0.1)
    base = bench.make_tx(**kw)
    never = bench.make_tx(**kw, signal="train_accuracy", threshold=0.0, window=2)
    sb, sn = base.init(params), never.init(params)
    for _ in range(6):
        g = jax.tree.map(lambda p: jnp.asarray(rng.normal(size=p.shape), jnp.float32), params)
        ub, sb = base.update(g, sb, params)
        un, sn = never.update(g, sn, params, value=jnp.float32(0.9))
        jax.tree.map(np.testing.assert_array_equal, ub, un)
