"""Tests for the fair-comparison protocol of the benchmarks (``benchmarks/protocol.py``)."""

import argparse
import dataclasses
import doctest
import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from scipy import stats

import optax_multirate as om
from benchmarks import harness, protocol
from optax_multirate.data import Dataset, Split, batches, validation_split
from optax_multirate.models import MLP

SIZES = (40, 30, 20, 7, 3)  # unbalanced classes, one of only 3 examples


def _dataset(sizes=SIZES, dim=4, seed=0, shift=1.0) -> Dataset:
    rng = np.random.default_rng(seed)
    y = np.repeat(np.arange(len(sizes), dtype=np.int32), sizes)
    rng.shuffle(y)
    x = (rng.normal(size=(len(y), dim)) + shift * y[:, None]).astype(np.float32)
    test = Split(x=x[:10] + 0.5, y=y[:10])
    return Dataset("toy", Split(x=x, y=y), test, len(sizes), (dim,))


def _outcome(acc, losses=(1.0, 0.5)):
    return protocol.RunOutcome(acc, tuple(losses))


def test_doctests():
    failed, attempted = doctest.testmod(protocol)
    assert attempted > 0 and failed == 0


# ------------------------------------------------------------------------------------ splits


def test_stratified_split_keeps_class_proportions_disjoint_and_deterministic():
    data = _dataset()
    n = len(data.train)
    indexed = Split(x=np.arange(n, dtype=np.float32), y=data.train.y)
    tr, va = validation_split(indexed, 0.15, seed=3, stratify=True)
    assert set(tr.x.tolist()).isdisjoint(va.x.tolist())
    assert sorted([*tr.x.tolist(), *va.x.tolist()]) == list(range(n))
    np.testing.assert_array_equal(va.y, data.train.y[va.x.astype(int)])
    got = np.bincount(va.y, minlength=len(SIZES))
    assert got.sum() == round(0.15 * n)
    for size, k in zip(SIZES, got):
        assert 1 <= k <= size - 1 and abs(k - 0.15 * size) < 1  # proportional, each represented
    assert (np.bincount(tr.y, minlength=len(SIZES)) >= 1).all()
    tr2, va2 = validation_split(indexed, 0.15, seed=3, stratify=True)
    np.testing.assert_array_equal(va.x, va2.x)
    np.testing.assert_array_equal(tr.x, tr2.x)
    _, other = validation_split(indexed, 0.15, seed=4, stratify=True)
    assert not np.array_equal(va.x, other.x)


def test_unstratified_split_is_unchanged():
    data = _dataset()
    tr, va = validation_split(data.train, 0.15, seed=1)
    perm = np.random.default_rng(1).permutation(len(data.train))
    k = round(0.15 * len(data.train))
    np.testing.assert_array_equal(va.x, data.train.x[np.sort(perm[:k])])
    np.testing.assert_array_equal(tr.y, data.train.y[np.sort(perm[k:])])


def test_stratified_split_errors():
    data = _dataset(sizes=(10, 1))
    with pytest.raises(ValueError, match="class 1"):
        validation_split(data.train, 0.3, stratify=True)
    with pytest.raises(TypeError, match="stratify"):
        validation_split(data.train, 0.3, stratify="yes")
    with pytest.raises(ValueError, match="fraction"):
        validation_split(data.train, 1.5, stratify=True)


def test_three_splits_record():
    data = _dataset()
    s = protocol.three_splits(data, seed=2)
    rec = s.record
    assert rec["validation_fraction"] == 0.15 and rec["validation_seed"] == 2
    assert rec["stratified"] is True
    assert (rec["train_examples"], rec["validation_examples"], rec["test_examples"]) == (
        len(s.train),
        len(s.validation),
        10,
    )
    assert rec["validation_class_counts"] == np.bincount(s.validation.y, minlength=5).tolist()
    assert np.add(rec["train_class_counts"], rec["validation_class_counts"]).tolist() == list(SIZES)
    json.dumps(rec)  # goes into the results as it is


def test_test_split_is_sealed_from_selection_and_open_to_final_runs():
    data = _dataset()
    s = protocol.three_splits(data)
    assert len(s.test) == 10
    for read in (lambda: s.test.x, lambda: s.test.y):
        with pytest.raises(protocol.SealedSplitError, match="sealed"):
            read()

    def peeking_run(config, seed):  # a selection run that tries to look at test
        return {"val_accuracy": float(np.mean(s.test.y == 0)), "train_loss": [0.1]}

    with pytest.raises(protocol.SealedSplitError):
        protocol.select("a", [{"lr": 0.1}], peeking_run, final_seeds=[0], num_classes=5)

    seen = []

    def final(config, seed, test):
        seen.append((test.x.copy(), s.test.y.copy()))  # open here, through either handle
        return {"final_accuracy": 0.5, "train_loss": [0.1]}

    record = {"chosen": {"lr": 0.1}, "seeds": [1000, 1001]}
    protocol.final_runs({"a": final}, {"a": record}, s.test, seeds=[0], num_classes=5)
    np.testing.assert_array_equal(seen[0][0], data.test.x)
    np.testing.assert_array_equal(seen[0][1], data.test.y)
    with pytest.raises(protocol.SealedSplitError):
        _ = s.test.x  # sealed again afterwards
    with pytest.raises(TypeError, match="SealedSplit"):
        protocol.final_runs({"a": final}, {"a": record}, data.test, seeds=[0], num_classes=5)


# --------------------------------------------------------------------------------- selection


def test_selection_seeds_are_two_and_disjoint_from_final_seeds():
    run = lambda c, s: _outcome(0.5)
    with pytest.raises(ValueError, match="disjoint"):
        protocol.select("a", [{}], run, seeds=(9, 1000), final_seeds=range(10), num_classes=3)
    with pytest.raises(ValueError, match="exactly two"):
        protocol.select("a", [{}], run, seeds=(1000,), final_seeds=range(10), num_classes=3)
    with pytest.raises(ValueError, match="distinct"):
        protocol.select("a", [{}], run, seeds=(1000, 1000), final_seeds=[0], num_classes=3)
    rec = protocol.select("a", [{}], run, final_seeds=range(10), num_classes=3)
    assert rec["seeds"] == list(protocol.SELECTION_SEEDS)
    assert set(protocol.SELECTION_SEEDS).isdisjoint(protocol.FINAL_SEEDS)
    # final_runs checks the record's seeds against its own final seeds again
    final = lambda c, s, t: {"train_loss": [0.1]}
    test = protocol.SealedSplit(_dataset().test)
    bad = {"a": {**rec, "seeds": [3, 1001]}}
    with pytest.raises(ValueError, match="disjoint"):
        protocol.final_runs({"a": final}, bad, test, seeds=range(5), num_classes=3)


def test_select_scores_records_and_runs_every_config_on_both_seeds():
    calls = []
    table = {(0.1, 1000): 0.80, (0.1, 1001): 0.84, (0.3, 1000): 0.86, (0.3, 1001): 0.86}

    def run(config, seed):
        calls.append((config["lr"], seed))
        return {"val_accuracy": table[config["lr"], seed], "train_loss": [1.0, 0.4]}

    grid = [{"lr": 0.1}, {"lr": 0.3}]
    rec = protocol.select("sgd", grid, run, final_seeds=range(10), num_classes=10, budget=2)
    assert sorted(calls) == sorted(table)
    assert rec["grid"] == grid and rec["configs_tried"] == 2
    assert rec["scores"] == pytest.approx([0.82, 0.86])
    assert rec["chosen"] == {"lr": 0.3} and rec["diverged"] == [] and not rec["all_diverged"]
    assert rec["val_accuracy"] == [[0.80, 0.84], [0.86, 0.86]]
    with pytest.raises(ValueError, match="budget"):
        protocol.select("sgd", grid, run, final_seeds=range(10), num_classes=10, budget=3)


def test_tie_goes_to_the_earlier_config():
    accs = {0: (0.5, 0.7), 1: (0.6, 0.6), 2: (0.7, 0.5)}  # equal means, unequal float sums
    run = lambda c, s: _outcome(accs[c["i"]][s - 1000])
    rec = protocol.select("a", [{"i": i} for i in range(3)], run, final_seeds=[0], num_classes=3)
    assert rec["chosen"] == {"i": 0}
    rec = protocol.select("a", [{"i": 1}, {"i": 0}], run, final_seeds=[0], num_classes=3)
    assert rec["chosen"] == {"i": 1}


def test_divergence_rule():
    c = 10
    thr = 0.9 * math.log(c)
    assert protocol.divergence_threshold(c) == pytest.approx(thr)
    assert protocol.is_diverged([5.0, thr], c)  # at the threshold: diverged
    assert not protocol.is_diverged([5.0, np.nextafter(thr, 0.0)], c)
    assert protocol.is_diverged([0.1, float("inf"), 0.1], c)  # non-finite anywhere
    assert protocol.is_diverged(float("nan"), c)
    with pytest.raises(ValueError):
        protocol.is_diverged([], c)
    assert protocol.diverged_runs([{"diverged": False}, {"diverged": True}]) == 1
    with pytest.raises(ValueError, match="diverged"):
        protocol.diverged_runs([{"arm": "a"}])


def test_a_config_that_diverged_on_one_seed_is_never_chosen():
    def run(config, seed):
        if config["lr"] == 1.0 and seed == 1001:
            return _outcome(0.99, [0.3, float("nan")])  # best accuracy, but a NaN loss
        if config["lr"] == 0.3:
            return _outcome(0.95, [2.2, 2.1])  # ends above 0.9 ln 10: learned nothing
        return _outcome(0.80)

    grid = [{"lr": 0.1}, {"lr": 0.3}, {"lr": 1.0}]
    rec = protocol.select("a", grid, run, final_seeds=[0], num_classes=10)
    assert rec["chosen"] == {"lr": 0.1}
    assert rec["scores"] == [0.8, None, None]
    assert rec["diverged"] == [
        {"config": 1, "seed": 1000},
        {"config": 1, "seed": 1001},
        {"config": 2, "seed": 1001},
    ]


def test_an_arm_whose_every_config_diverged_gets_no_final_runs():
    run = lambda c, s: _outcome(0.9, [float("inf")])
    sel = {
        "bad": protocol.select("bad", [{"lr": 9.0}, {"lr": 99.0}], run, final_seeds=[0, 1],
                               num_classes=3),
        "ok": protocol.select("ok", [{"lr": 0.1}, {"lr": 0.2}], lambda c, s: _outcome(0.5),
                              final_seeds=[0, 1], num_classes=3),
    }  # fmt: skip
    assert sel["bad"]["chosen"] is None and sel["bad"]["all_diverged"]
    sel["control"] = protocol.inherit(sel, "bad")
    assert sel["control"]["chosen"] is None
    calls = []

    def final(config, seed, test):
        calls.append(seed)
        return {"final_accuracy": 0.5, "history": [{"train_loss": 2.0}, {"train_loss": 0.9}]}

    arms = {"bad": final, "ok": final, "control": final}
    runs = protocol.final_runs(arms, sel, protocol.SealedSplit(_dataset().test), seeds=[0, 1],
                               num_classes=3)  # fmt: skip
    assert [(r["arm"], r["seed"]) for r in runs] == [("ok", 0), ("ok", 1)]
    assert calls == [0, 1]
    assert all(r["config"] == {"lr": 0.1} for r in runs)
    assert protocol.diverged_runs(runs) == 1 - 1  # 0.9 < 0.9 ln 3 = 0.989: not diverged


def test_equal_budgets_and_inheriting_arms():
    run = lambda c, s: _outcome(0.5 + c["lr"])
    grid3 = [{"lr": x} for x in (0.01, 0.02, 0.03)]
    sel = {
        "sgd": protocol.select("sgd", grid3, run, final_seeds=[0], num_classes=3),
        "method": protocol.select("method", grid3, run, final_seeds=[0], num_classes=3),
    }
    sel["head_only"] = protocol.inherit(sel, "sgd")
    assert sel["head_only"] == {
        "grid": [],
        "scores": [],
        "chosen": {"lr": 0.03},
        "configs_tried": 0,
        "inherits": "sgd",
    }
    assert protocol.check_equal_budgets(sel) == 3
    sel["other"] = protocol.select("other", grid3[:2], run, final_seeds=[0], num_classes=3)
    with pytest.raises(ValueError, match="same number"):
        protocol.check_equal_budgets(sel)
    with pytest.raises(ValueError, match="inherit"):
        protocol.inherit(sel, "head_only")
    with pytest.raises(ValueError, match="no arm"):
        protocol.check_equal_budgets({"c": sel["head_only"]})


def test_final_runs_are_interleaved_by_seed_and_flagged():
    order = []

    def arm(name, loss):
        def run(config, seed, test):
            order.append((name, seed))
            return {"final_accuracy": 0.9, "train_loss": [3.0, loss]}

        return run

    rec = {"chosen": {"lr": 0.1}, "seeds": [1000, 1001]}
    sel = {"base": rec, "method": {**rec, "chosen": {"lr": 0.2}}}
    arms = {"base": arm("base", 0.2), "method": arm("method", 3.0)}
    test = protocol.SealedSplit(_dataset().test)
    runs = protocol.final_runs(arms, sel, test, num_classes=10)
    want = [(a, s) for s in range(10) for a in ("base", "method")]
    assert order == want and [(r["arm"], r["seed"]) for r in runs] == want
    assert [r["diverged"] for r in runs[:2]] == [False, True]
    assert runs[1]["config"] == {"lr": 0.2}
    assert protocol.diverged_runs(runs) == 10
    with pytest.raises(ValueError, match="no selection record"):
        protocol.final_runs({"x": arms["base"]}, sel, test, num_classes=10)
    with pytest.raises(ValueError, match="training loss"):
        protocol.final_runs({"base": lambda c, s, t: {}}, sel, test, seeds=[0], num_classes=10)


# ------------------------------------------------------------------------- deltas, intervals


def test_paired_deltas_and_intervals_against_scipy():
    base = [0.90, 0.91, 0.93, 0.92, 0.95]
    meth = [0.92, 0.91, 0.96, 0.93, 0.96]
    runs = [{"arm": "base", "seed": s, "final_accuracy": a} for s, a in enumerate(base)]
    runs += [{"arm": "m", "seed": s, "final_accuracy": a} for s, a in enumerate(meth)]
    runs = runs[::-1]  # pairing is by seed, not by position
    deltas = protocol.paired_deltas_pt(runs, "m", "base")
    want = 100 * (np.array(meth) - np.array(base))
    np.testing.assert_allclose(deltas, want, rtol=1e-12)
    summary = {}
    protocol.put_delta(summary, "k5_accuracy_delta_pt", deltas)
    ci = stats.ttest_1samp(want, 0.0).confidence_interval(0.95)
    assert summary["k5_accuracy_delta_pt"] == pytest.approx(want.mean())
    assert summary["k5_accuracy_delta_ci_low_pt"] == pytest.approx(ci.low)
    assert summary["k5_accuracy_delta_ci_high_pt"] == pytest.approx(ci.high)
    assert sorted(summary) == [
        "k5_accuracy_delta_ci_high_pt",
        "k5_accuracy_delta_ci_low_pt",
        "k5_accuracy_delta_pt",
    ]
    assert protocol.ci_keys("accuracy_delta_vs_best_schedule_pt") == (
        "accuracy_delta_vs_best_schedule_ci_low_pt",
        "accuracy_delta_vs_best_schedule_ci_high_pt",
    )
    with pytest.raises(ValueError, match="_pt"):
        protocol.ci_keys("accuracy_delta")
    with pytest.raises(ValueError, match="share seeds"):
        protocol.paired_deltas_pt(runs[1:], "m", "base")


def test_undefined_intervals_are_none_never_nan(tmp_path):
    summary = {}
    protocol.put_delta(summary, "one_seed_pt", [1.5])
    protocol.put_delta(summary, "all_equal_pt", [0.25, 0.25, 0.25])
    assert summary["one_seed_ci_low_pt"] is None and summary["one_seed_ci_high_pt"] is None
    assert summary["all_equal_ci_low_pt"] is None and summary["all_equal_ci_high_pt"] is None
    assert summary["all_equal_pt"] == 0.25
    args = argparse.Namespace(quick=True, out_dir=str(tmp_path))
    sel = {"a": {"grid": [], "scores": [], "chosen": {}, "configs_tried": 0, "inherits": "b"}}
    paths = harness.write_results("demo", args=args, config={}, runs=[], summary=summary,
                                  claim_md="-", table_md="-", argv=[], selection=sel)  # fmt: skip
    written = json.loads(paths["json"].read_text())
    assert written["summary"]["one_seed_ci_low_pt"] is None
    assert written["selection"] == sel
    assert list(written).index("selection") == list(written).index("config") + 1


# ------------------------------------------------------------------------------ time controls


def test_equal_time_budget_from_measured_times():
    runs = [
        {"arm": "method", "train_time_s": 2.0, "compile_time_s": 1.0},
        {"arm": "method", "train_time_s": 2.2, "compile_time_s": 1.0},
        {"arm": "sgd", "train_time_s": 3.0, "compile_time_s": 0.5, "steps": 300},
        {"arm": "sgd", "train_time_s": 3.4, "compile_time_s": 0.5, "steps": 300},
    ]
    b = protocol.equal_time_budget(runs, "method", "sgd")
    step_s = 6.4 / 600
    assert b.step_time_s == pytest.approx(step_s)
    assert b.seconds == pytest.approx(2.1)
    assert b.steps == math.floor(2.1 / step_s) == 196
    assert protocol.time_ratio(runs, "method", "sgd") == pytest.approx(2.1 / 3.2)
    assert protocol.time_ratio_with_compile(runs, "method", "sgd") == pytest.approx(3.1 / 3.7)
    with pytest.raises(ValueError, match="no runs"):
        protocol.time_ratio(runs, "x", "sgd")


@pytest.mark.parametrize("kind", ["cosine", "linear", "warmup_cosine", "constant"])
def test_half_budget_schedule_is_fitted_to_its_steps(kind):
    full = 310
    half = protocol.half_budget(full)
    assert half == 155 and protocol.half_budget(1) == 1
    lr = 0.1
    sched = protocol.fitted_schedule({"learning_rate": lr, "schedule": kind}, half)
    t = np.arange(half + 20)
    got = np.array([float(sched(i)) for i in t])
    tc = np.minimum(t, half)
    if kind == "cosine":
        want = lr * 0.5 * (1 + np.cos(np.pi * tc / half))
    elif kind == "linear":
        want = lr * (1 - tc / half)
    elif kind == "constant":
        want = np.full(t.shape, lr)
    else:
        w = round(0.05 * half)
        tw = np.clip(t - w, 0, half - w)
        want = np.where(t < w, lr * t / w, lr * 0.5 * (1 + np.cos(np.pi * tw / (half - w))))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)
    if kind != "constant":
        assert got[half] == pytest.approx(0.0, abs=1e-7)  # annealed at the budget's end
    with pytest.raises(ValueError, match="schedule"):
        protocol.fitted_schedule({"learning_rate": lr, "schedule": "step"}, half)


# ----------------------------------------------------------------------------- batched runner


def _make_tx(learning_rate, momentum, decay_steps):
    return optax.sgd(optax.cosine_decay_schedule(learning_rate, decay_steps), momentum=momentum)


def _reference(model, config, seed, train, val, batch_size, steps):
    """One run, one step at a time, written out by hand."""
    key = jax.random.PRNGKey(seed)
    params, ms = om.init_model(model, key, train.x[:1])
    tx = _make_tx(**config)
    state = tx.init(params)
    loss_fn = om.classification_loss(model)

    @jax.jit
    def step(p, s, ms, batch, k):
        (loss, (ms, _)), g = jax.value_and_grad(loss_fn, has_aux=True)(p, ms, batch, k)
        u, s = tx.update(g, s, p)
        return optax.apply_updates(p, u), s, ms, loss

    nb = len(train) // batch_size
    losses, epoch = [], 0
    while len(losses) < steps:
        keys = jax.random.split(jax.random.fold_in(key, epoch), nb)
        for i, batch in enumerate(batches(train, batch_size, seed=seed, epoch=epoch)):
            if len(losses) == steps:
                break
            params, state, ms, loss = step(params, state, ms, batch, keys[i])
            losses.append(float(loss))
        epoch += 1
    logits = model.apply({"params": params, **ms}, val.x, train=False)
    acc = float(jnp.mean(jnp.argmax(logits, -1) == val.y))
    per_epoch = [float(np.mean(losses[i : i + nb])) for i in range(0, steps, nb)]
    return acc, per_epoch


@pytest.mark.parametrize("budget", ["epochs", "steps"])
def test_batched_runner_matches_one_at_a_time_runs(budget):
    data = _dataset(sizes=(40, 40, 30), dim=5, shift=2.0)
    splits = protocol.three_splits(data)
    model = MLP((8,), num_classes=3, batch_norm=True)
    grid = [
        {"learning_rate": 0.1, "momentum": 0.9, "decay_steps": 12},
        {"learning_rate": 0.3, "momentum": 0.5, "decay_steps": 12},
        {"learning_rate": 0.2, "momentum": 0.9, "decay_steps": 6},  # another program
        {"learning_rate": 1e30, "momentum": 0.9, "decay_steps": 12},  # diverges
    ]
    seeds = [3, 7]
    bs = 16  # 94 training examples: 5 steps per epoch
    kw = {"epochs": 2} if budget == "epochs" else {"steps": 7}
    res = protocol.run_batched(
        model, _make_tx, grid, seeds, splits.train, splits.validation, batch_size=bs, chunk=3, **kw
    )
    steps = 10 if budget == "epochs" else 7
    assert res.programs == 2
    assert res.val_accuracy.shape == res.diverged.shape == (4, 2)
    assert res.train_loss.shape == (4, 2, 2)
    for i, config in enumerate(grid):
        for j, seed in enumerate(seeds):
            acc, losses = _reference(
                model, config, seed, splits.train, splits.validation, bs, steps
            )
            assert res.diverged[i, j] == protocol.is_diverged(losses, 3)
            if i == 3:
                assert res.diverged[i, j]
                continue
            assert not res.diverged[i, j]
            np.testing.assert_allclose(res.train_loss[i, j], losses, rtol=1e-5, atol=1e-6)
            assert res.val_accuracy[i, j] == pytest.approx(acc, abs=1e-7)
    rec = protocol.select("sgd", grid, res.outcome, seeds=seeds, final_seeds=[0], num_classes=3)
    assert rec["scores"][3] is None
    assert rec["chosen"] in grid[:3]
    assert res.outcome(grid[1], 7).val_accuracy == res.val_accuracy[1, 1]


def test_batched_runner_errors():
    data = _dataset(sizes=(20, 20))
    s = protocol.three_splits(data)
    model = MLP((4,), num_classes=2)
    args = (model, _make_tx, [{"learning_rate": 0.1, "momentum": 0.0, "decay_steps": 4}])
    with pytest.raises(ValueError, match="exactly one"):
        protocol.run_batched(*args, [0], s.train, s.validation, batch_size=8)
    with pytest.raises(ValueError, match="exactly one"):
        protocol.run_batched(*args, [0], s.train, s.validation, batch_size=8, epochs=1, steps=2)
    with pytest.raises(ValueError, match="distinct"):
        protocol.run_batched(*args, [0, 0], s.train, s.validation, batch_size=8, epochs=1)
    with pytest.raises(ValueError, match="grid"):
        protocol.run_batched(model, _make_tx, [], [0], s.train, s.validation, batch_size=8,
                             epochs=1)  # fmt: skip


# ------------------------------------------------------------------------------------- plot


def test_plot_accuracy_time_draws_mean_band_and_equal_time_point(tmp_path):
    from matplotlib.figure import Figure

    hist = lambda a, t: [
        {"train_time_s": t * (e + 1), "test_accuracy": a + e / 10} for e in range(3)
    ]
    runs = [
        {"arm": "sgd", "seed": 0, "history": hist(0.5, 1.0)},
        {"arm": "sgd", "seed": 1, "history": hist(0.6, 1.2)},
        {"arm": "method", "seed": 0, "history": hist(0.55, 0.5)},
    ]
    fig = Figure()
    protocol.plot_accuracy_time(runs, equal_time_s=1.5, equal_time_arm="sgd")(fig)
    ax = fig.axes[0]
    labels = [line.get_label() for line in ax.get_lines()]
    assert {"sgd", "method", "sgd (equal time)"} <= set(labels)
    sgd = ax.get_lines()[labels.index("sgd")]
    np.testing.assert_allclose(sgd.get_xdata(), [1.1, 2.2, 3.3])
    np.testing.assert_allclose(sgd.get_ydata(), [0.55, 0.65, 0.75])
    assert len(ax.collections) == 2  # one band per arm
    fig.savefig(tmp_path / "p.png")


def test_splits_record_of_a_subset():
    data = _dataset()
    sub = dataclasses.replace(data, train=Split(x=data.train.x[:60], y=data.train.y[:60]))
    s = protocol.three_splits(sub)
    assert s.record["train_examples"] + s.record["validation_examples"] == 60
