"""Tests for the LeRaC benchmark (``benchmarks/lerac.py``) and its shared sets (``_sets``)."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from benchmarks import _sets, protocol
from benchmarks import lerac as bench
from benchmarks.batched import run_batched
from optax_multirate.lerac import LeracState, lerac_depth_labels
from optax_multirate.models import MLP


def _find_lerac(opt_state):
    leaves = jax.tree.leaves(opt_state, is_leaf=lambda x: isinstance(x, LeracState))
    return next(x for x in leaves if isinstance(x, LeracState))


def _digits(model=None, train_examples=500, epochs=30):
    model = MLP((8,) * 6) if model is None else model
    spec = bench.SetSpec("digits", model, train_examples, 25, epochs, model)
    return bench._Set(spec, quick=False)


def test_subset_leaves_the_stated_training_examples_stratified():
    data, rec = _sets.load("digits", train_examples=500)
    splits = protocol.three_splits(data)
    assert len(splits.train) == 500 and rec["subset_examples"] == len(data.train)
    assert len(splits.test) == 360  # the test split is untouched
    counts = np.bincount(data.train.y, minlength=10)
    full = np.bincount(_sets.load("digits")[0].train.y, minlength=10)
    np.testing.assert_allclose(counts / counts.sum(), full / full.sum(), atol=0.01)
    quick, _ = _sets.load("digits", train_examples=500, quick_examples=100)
    np.testing.assert_array_equal(quick.train.x, data.train.x[:100])
    for n in (1, 500, 1000, 3400):
        size = _sets._subset_size(n)
        assert size - round(protocol.VALIDATION_FRACTION * size) == n


@pytest.mark.parametrize("spec", bench.SETS, ids=lambda s: s.name)
def test_declared_models_have_seven_depth_units_in_forward_order(spec):
    x = {"mnist1d": jnp.zeros((2, 40)), "mnist_subset": jnp.zeros((2, 28, 28, 1)),
         "digits": jnp.zeros((2, 8, 8, 1))}[spec.name]  # fmt: skip
    variables = jax.eval_shape(lambda: spec.model.init(jax.random.key(0), x, train=False))
    out = jax.eval_shape(lambda v: spec.model.apply(v, x, train=False), variables)
    assert out.shape == (2, 10)
    depth = lerac_depth_labels(spec.model, variables, x, train=False)
    names = list(variables["params"])  # forward order: convs, dense layers, head
    names.sort(key=lambda n: (n == "head", n.split("_")[0] == "Dense", n))
    assert [depth[n]["kernel"] for n in names] == list(range(7))
    assert depth["head"]["bias"] == 6


def test_base_schedule_holds_for_the_curriculum_then_decays_to_zero():
    sched = bench.base_schedule(0.1, 100, 10)
    assert [float(sched(t)) for t in (0, 9, 10)] == pytest.approx([0.1, 0.1, 0.1])
    assert float(sched(55)) == pytest.approx(0.05)
    assert float(sched(100)) == pytest.approx(0.0, abs=1e-9)


def test_the_authors_curriculum_is_five_ticks_under_a_tenth_of_each_budget():
    for spec in bench.SETS:
        n = spec.train_examples or 3400  # mnist1d: all 4,000 less validation
        spe = n // spec.batch_size
        tick = spe // bench.TICKS_PER_EPOCH
        assert tick * bench.TICKS_PER_EPOCH == spe  # exactly 4 ticks per epoch
        assert bench.CURRICULUM_TICKS * tick / (spe * spec.epochs) < 0.1
    st = _digits()
    assert (st.tick, st.hold, st.total, st.depths) == (5, 25, 600, 7)


def test_plotted_rates_are_the_rates_the_optimizer_applies():
    st = _digits()
    lr = 0.05
    t, base, rates = bench.per_depth_rates(st, lr, epochs=2)
    assert rates.shape == (7, 40)
    tx = st.make(lr, **bench.AUTHORS)
    params = st.trainer.model.init(jax.random.key(0), st.splits.train.x[:1])["params"]
    grads = jax.tree.map(jnp.ones_like, params)
    state = tx.init(params)
    update = jax.jit(tx.update)
    for step in t:
        _, state = update(grads, state, params)
        got = float(base[step]) * np.asarray(_find_lerac(state).scales)
        np.testing.assert_allclose(rates[:, step], got, rtol=1e-6)
    assert rates[:, 0].tolist() == pytest.approx([lr * r for r in (1, 1e-1, 1e-2, 1e-3, 1e-4,
                                                                   1e-5, 1e-3)])  # fmt: skip
    np.testing.assert_allclose(rates[:, st.hold], base[st.hold])  # every depth at the base rate


def test_batched_selection_run_is_the_fit_run():
    st = _digits(MLP((8, 8)), train_examples=100, epochs=2)
    config = {"learning_rate": 0.05, **bench.AUTHORS}
    res = run_batched(st.model, lambda **c: st.make(**c), [config], [3], st.splits.train,
                      st.splits.validation, batch_size=25, epochs=2)  # fmt: skip
    got = st._run(config, 3)
    assert res.outcome(config, 3).val_accuracy == pytest.approx(got.val_accuracy, abs=1e-7)
    np.testing.assert_allclose(res.outcome(config, 3).train_loss, got.train_loss, rtol=1e-5)


def test_trainer_compiles_each_optimizer_once():
    st = _digits(MLP((8,)), train_examples=100, epochs=1)
    make = lambda: optax.sgd(0.1)  # noqa: E731
    first = st.trainer.run("sgd", make, 0, {"val": st.splits.validation})
    again = st.trainer.run("sgd", make, 1, {"val": st.splits.validation})
    assert first.num_compiles == 1 and again.num_compiles == 0
    assert again.history[-1]["val_accuracy"] >= 0


def test_quick_run_writes_the_selection_record_and_every_summary_key(tmp_path):
    bench.main(["--quick", "--out-dir", str(tmp_path)])
    record = json.loads((tmp_path / "lerac.quick.json").read_text())
    summary, selection = record["summary"], record["selection"]
    ran = [_sets.PREFIX[name] for name in bench.QUICK["sets"]]
    for prefix in _sets.PREFIX.values():  # every key; the sets left out of --quick: None
        for key in ("accuracy_delta_pt", "selected_accuracy_delta_pt"):
            for k in (key, *protocol.ci_keys(key)):
                assert prefix + k in summary
        assert summary[prefix + "diverged_runs"] == (0 if prefix in ran else None)
    for prefix in ran:
        assert selection[prefix + "lerac"]["inherits"] == prefix + "sgd"
        assert selection[prefix + "lerac"]["configs_tried"] == 0
        for arm in ("sgd", "lerac_selected"):
            rec = selection[prefix + arm]
            assert rec["configs_tried"] == len(rec["grid"]) == len(rec["scores"]) >= 1
        assert summary[prefix + "accuracy_delta_pt"] is not None
    for key in ("sets_above_0", "step_time_ratio", "diverged_runs"):
        assert key in summary
    assert summary["step_time_ratio"] > 0
    arms = {r["arm"] for r in record["runs"]}
    assert {p + a for p in ran for a in ("sgd", "lerac", "lerac_selected")} == arms
    assert (tmp_path / "lerac.quick.png").exists() and not (tmp_path / "lerac.json").exists()
