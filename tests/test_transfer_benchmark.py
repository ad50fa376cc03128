"""Tests for the multirate transfer benchmark and its task (``benchmarks/multirate_transfer.py``,
``benchmarks/transfer_task.py``)."""

import doctest
import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from benchmarks import multirate_transfer as mt
from benchmarks import protocol
from benchmarks import transfer_task as tt
from optax_multirate.data import Split, batches
from optax_multirate.train import fit, init_model

SUMMARY_KEYS = (
    "time_ratio",
    "time_ratio_with_compile",
    "accuracy_delta_pt",
    "equal_time_accuracy_delta_pt",
    "predicted_time_ratio",
)
ONCE_KEYS = ("head_only_accuracy_delta_pt", "baseline_half_budget_delta_pt", "diverged_runs")
ARMS = (
    "train_all",
    "head_only",
    "k2",
    "k5",
    "k10",
    "train_all_half_budget",
    "train_all_equal_time_k2",
    "train_all_equal_time_k5",
    "train_all_equal_time_k10",
)


def test_doctests():
    for module in (tt, mt):
        failed, attempted = doctest.testmod(module)
        assert attempted > 0 and failed == 0


# --------------------------------------------------------------------------------- the task


def test_task_is_split_by_class_and_leaves_global_randomness_alone():
    state = np.random.get_state()[1].copy()
    task = tt.make_task(num_samples=500, seed=3, target_train=40)
    np.testing.assert_array_equal(np.random.get_state()[1], state)
    raw = tt.generate_mnist1d(500, 3)
    src, tgt = task.source, task.target
    assert len(src.train) == int(np.isin(raw["y"], tt.SOURCE_CLASSES).sum())
    assert len(src.test) == int(np.isin(raw["y_test"], tt.SOURCE_CLASSES).sum())
    assert len(tgt.train) == 40
    assert len(tgt.test) == int(np.isin(raw["y_test"], tt.TARGET_CLASSES).sum())
    for split in (src.train, src.test, tgt.train, tgt.test):
        assert split.x.dtype == np.float32 and split.x.shape[1:] == (40,)
        assert set(np.unique(split.y).tolist()) <= set(range(5))
    keep = np.isin(raw["y"], tt.TARGET_CLASSES)
    np.testing.assert_array_equal(tgt.train.x, raw["x"][keep][:40])
    np.testing.assert_array_equal(tgt.train.y, raw["y"][keep][:40] - 5)
    again = tt.make_task(num_samples=500, seed=3, target_train=40)
    np.testing.assert_array_equal(again.source.train.x, src.train.x)
    rev = tt.reverse_time(tgt)
    np.testing.assert_array_equal(rev.test.x, tgt.test.x[:, ::-1])
    np.testing.assert_array_equal(rev.test.y, tgt.test.y)
    with pytest.raises(ValueError, match="target_train"):
        tt.make_task(num_samples=500, seed=3, target_train=10_000)


def _reference_logits(params, x, kernel_size):
    """The same network with ``lax.conv_general_dilated`` and ``flax``-free max-pools."""
    h = x[..., None]
    convs = sorted(k for k in params if k.startswith("Conv_"))
    for name in convs:
        w = params[name]["kernel"]  # (kernel_size * c_in, c_out), window-major
        w = w.reshape(kernel_size, h.shape[-1], -1)
        left = kernel_size // 2
        h = jax.lax.conv_general_dilated(h, w, (1,), [(left, kernel_size - 1 - left)],
                                         dimension_numbers=("NWC", "WIO", "NWC"))  # fmt: skip
        h = jax.nn.relu(h + params[name]["bias"])
        h = jnp.maximum(h[:, 0::2], h[:, 1::2])
    h = h.reshape(h.shape[0], -1)
    return h @ params["head"]["kernel"] + params["head"]["bias"]


def test_patch_convolutions_are_1d_convolutions():
    model = tt.Conv1DNet((3, 4), kernel_size=5, num_classes=5)
    x = jax.random.normal(jax.random.PRNGKey(1), (6, 40))
    params = model.init(jax.random.PRNGKey(0), x[:1])["params"]
    got = model.apply({"params": params}, x)
    np.testing.assert_allclose(got, _reference_logits(params, x, 5), rtol=1e-5, atol=1e-5)


def test_warm_start_keeps_the_backbone_and_draws_the_head_from_the_seed():
    x = np.zeros((1, 40), np.float32)
    pre = init_model(tt.Conv1DNet((4, 8)), jax.random.PRNGKey(7), x)[0]
    model = tt.Conv1DNet((4, 8), backbone=tt.Backbone(pre))
    p0, _ = init_model(model, jax.random.PRNGKey(0), x)
    p1, _ = init_model(model, jax.random.PRNGKey(1), x)
    for name in ("Conv_0", "Conv_1"):
        for p in (p0, p1):
            np.testing.assert_array_equal(p[name]["kernel"], pre[name]["kernel"])
    assert not np.array_equal(p0["head"]["kernel"], p1["head"]["kernel"])
    np.testing.assert_array_equal(
        p0["head"]["kernel"], init_model(tt.Conv1DNet((4, 8)), jax.random.PRNGKey(0), x)[0]
        ["head"]["kernel"]
    )  # fmt: skip
    with pytest.raises(ValueError, match="backbone params do not match"):
        init_model(tt.Conv1DNet((4, 6), backbone=tt.Backbone(pre)), jax.random.PRNGKey(0), x)


def test_labels_make_the_head_fast():
    params = init_model(tt.Conv1DNet((4,)), jax.random.PRNGKey(0), np.zeros((1, 40)))[0]
    labels = tt.fast_slow_labels(params)
    assert labels == {"Conv_0": {"bias": "slow", "kernel": "slow"},
                      "head": {"bias": "fast", "kernel": "fast"}}  # fmt: skip


def test_multirate_tx_takes_fast_and_slow_step_sizes_apart():
    """Head: SGD-momentum at h_F(t); backbone: one update of h_S per cycle, spread over k."""
    h_f, h_s, k, steps = 0.1, 0.4, 2, 4
    tx = tt.multirate_tx(fast_learning_rate=h_f, slow_learning_rate=h_s, k=k, steps=steps)
    p = {"Conv_0": jnp.zeros(()), "head": jnp.zeros(())}
    state = tx.init(p)
    cos = lambda lr, t, n: lr * 0.5 * (1 + math.cos(math.pi * t / n))
    v_fast = v_slow = 0.0
    for t in range(steps):
        u, state = tx.update({"Conv_0": jnp.ones(()), "head": jnp.ones(())}, state, p)
        v_fast = 0.9 * v_fast + 1.0
        if t % k == 0:
            v_slow = 0.9 * v_slow + 1.0
            held = -cos(h_s, t // k, steps // k) * v_slow / k
        np.testing.assert_allclose(float(u["head"]), -cos(h_f, t, steps) * v_fast, rtol=1e-6)
        np.testing.assert_allclose(float(u["Conv_0"]), held, rtol=1e-6)


def test_budget_data_yields_the_split_batches_up_to_the_budget():
    rng = np.random.default_rng(0)
    split = Split(x=rng.normal(size=(20, 40)).astype(np.float32), y=np.arange(20) % 5)
    data, epochs = tt.budget_data(split, 8, 5, seed=3)  # 2 batches per epoch: 2 + 2 + 1
    assert epochs == 3
    for e in range(epochs):
        want = list(batches(split, 8, seed=3, epoch=e))[: [2, 2, 1][e]]
        got = list(data(e))
        assert len(got) == len(want)
        for a, b in zip(got, want):
            np.testing.assert_array_equal(a["x"], b["x"])
    res = fit(tt.Conv1DNet((2,)), tt.train_all_tx(learning_rate=0.1, steps=5), data,
              epochs=epochs, seed=3)  # fmt: skip
    assert res.steps == 5 and [row["step"] for row in res.history] == [2, 4, 5]


# ----------------------------------------------------------------------------- the benchmark


def test_quick_run_records_selection_every_key_and_the_phased_step(tmp_path):
    summary = mt.main(["--quick", "--out-dir", str(tmp_path)])
    record = json.loads((tmp_path / "multirate_transfer.quick.json").read_text())
    assert not (tmp_path / "multirate_transfer.json").exists()
    assert set(record["summary"]) == set(summary)
    s = record["summary"]
    keys = [*SUMMARY_KEYS, *(f"k{k}_{key}" for k in mt.KS for key in SUMMARY_KEYS), *ONCE_KEYS]
    for key in keys:
        assert key in s, key
        if key.endswith("_pt"):
            assert all(ci in s for ci in protocol.ci_keys(key)), key
    assert record["best_arm"] == f"k{s['best_arm_k']}"
    sel = record["selection"]
    assert set(ARMS) <= set(sel)
    n = protocol.check_equal_budgets(sel)
    assert n == len(mt.QUICK.lr_grid) == len(mt._multirate_grid(mt.QUICK, 2))
    assert sel["train_all_half_budget"]["inherits"] == "train_all"
    for arm in ("train_all", "head_only", "k5"):
        assert len(sel[arm]["scores"]) == len(sel[arm]["grid"]) == n
    # the phased step: multirate and head-only steps differentiate the head alone
    steps = record["config"]["steps"]
    fast = record["config"]["fast_mask"]
    assert {"train_all", "head_only", "k2", "k5", "k10"} <= {r["arm"] for r in record["runs"]}
    assert fast == "phase:2/4"  # head kernel and bias of Conv_0's and the head's four leaves
    for r in record["runs"]:
        masks = r["steps_per_mask"]
        if r["arm"] == "head_only":
            assert set(masks) == {fast} and masks[fast] == steps - 1  # the first step compiled
        elif r["arm"].startswith("train_all"):
            assert set(masks) == {"full"}
        else:
            k = int(r["arm"][1:])
            starts = -(-steps // k)  # full steps at cycle starts; each program's first compiled
            assert masks == {"full": starts - 1, fast: steps - starts - 1}


def _stand_in_bench(monkeypatch):
    """Selection and final runs without training: fixed scores, times and accuracies."""

    def select(self, arm, make_tx, grid, steps):
        rec = protocol.select(arm, grid, lambda c, s: protocol.RunOutcome(0.8, (0.5,)),
                              final_seeds=self.final_seeds, num_classes=5,
                              budget=len(grid))  # fmt: skip
        rec["steps"] = steps
        return rec

    def final(self, make_tx, steps, dispatch):
        def run(config, seed, test):
            k = config.get("k")
            full_steps = mt.QUICK.epochs * (len(self.splits.train) // self.batch_size)
            if k is not None:  # time (1 + (k - 1) r) / k of train all's with r = 1/2
                acc, t = 0.88, 0.01 * steps * (1 + (k - 1) * 0.5) / k
            else:
                acc, t = (0.90 if steps == full_steps else 0.85), 0.01 * steps
            acc += 0.01 * seed
            return {"final_accuracy": acc, "train_time_s": t, "compile_time_s": 0.0,
                    "steps": steps, "step_time_ms": {"full": 2.0, "phase:2/4": 1.0},
                    "steps_per_mask": {}, "history": [{"train_loss": 0.5, "test_accuracy": acc,
                    "train_time_s": t}]}  # fmt: skip

        return run

    monkeypatch.setattr(mt.Bench, "select", select)
    monkeypatch.setattr(mt.Bench, "final", final)


def test_regime_map_writes_its_cells_figure_and_command(tmp_path, monkeypatch):
    _stand_in_bench(monkeypatch)
    argv = ["--map", "--quick", "--seeds", "2", "--out-dir", str(tmp_path)]
    mt.main(argv)
    record = json.loads((tmp_path / "multirate_transfer_map.quick.json").read_text())
    assert record["command"] == "python -m benchmarks.multirate_transfer " + " ".join(argv)
    md = (tmp_path / "multirate_transfer_map.quick.md").read_text()
    assert "benchmarks.multirate_transfer_map" not in md and record["command"] in md
    assert (tmp_path / "multirate_transfer_map.quick.png").exists()
    cells = record["regime_map"]
    levels = [lv.name for lv in mt.QUICK.map_levels]
    assert len(levels) >= 3
    assert [(c["pretrain"], c["k"]) for c in cells] == [(lv, k) for lv in levels for k in mt.KS]
    for c in cells:
        assert 0.0 <= c["pretrained_accuracy"] <= 1.0
        np.testing.assert_allclose(c["time_ratio"], (1 + (c["k"] - 1) * 0.5) / c["k"])
        np.testing.assert_allclose(c["predicted_time_ratio"], c["time_ratio"])
        np.testing.assert_allclose(c["accuracy_delta_pt"], -2.0, atol=1e-9)
        np.testing.assert_allclose(c["equal_time_accuracy_delta_pt"], 3.0, atol=1e-9)
        assert c["accuracy_delta_ci_low_pt"] is None  # paired deltas all equal: undefined
    assert record["summary"]["cells"] == len(cells)
    assert record["summary"]["cells_equal_time_positive"] == len(cells)
    assert set(record["selection"]) >= {f"{lv}_{arm}" for lv in levels for arm in
                                        ("train_all", "k2", "k5", "k10")}  # fmt: skip
