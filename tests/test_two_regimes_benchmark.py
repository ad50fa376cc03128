"""Tests for the two-regimes benchmark (``benchmarks/two_regimes.py``)."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from benchmarks import _sets, protocol
from benchmarks import two_regimes as bench
from optax_multirate.data import Split
from optax_multirate.models import MLP
from optax_multirate.train import evaluate

PARAMS = {"w": jnp.arange(6.0).reshape(2, 3), "b": jnp.ones(3)}


def _toy_split(n=96, seed=0):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 3, n).astype(np.int32)
    x = (rng.normal(size=(n, 4)) + y[:, None]).astype(np.float32)
    return Split(x=x, y=y)


@pytest.mark.parametrize("fraction", [0.6, 0.8, 0.35])
def test_switch_step_is_the_same_integer_traced_or_not(fraction):
    totals = np.arange(1, 3000)
    traced = jax.jit(jax.vmap(lambda t: bench.switch_step(jnp.float32(fraction), t)))(totals)
    concrete = [bench.switch_step(fraction, int(t)) for t in totals]
    np.testing.assert_array_equal(np.asarray(traced), concrete)
    assert bench.switch_step(0.8, 100) == 80


def _steps(tx, n=4):
    grads = jax.tree.map(lambda p: jnp.full_like(p, 0.5), PARAMS)
    state, params, out, update = tx.init(PARAMS), PARAMS, [], jax.jit(tx.update)
    for _ in range(n):
        u, state = update(grads, state, params)
        params = optax.apply_updates(params, u)
        out.append(u)
    return out


@pytest.mark.parametrize("small", ["adam", "sgd"])
def test_the_controls_are_each_optimizer_alone(small):
    # Within float rounding: the method's branches run inside a lax.cond.
    config = {"learning_rate": 0.5, "large_fraction": 0.5, "small": small}
    both = _steps(bench.make_two_regimes(**config, total=4))
    small_only = _steps(bench.make_two_regimes(**config, total=4, switch_at=0))
    large_only = _steps(bench._large(0.5))
    for got, want in zip(both[:2] + small_only, large_only[:2] + _steps(bench._small(0.5, small))):
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6), got, want)


def test_step_schedule_drops_tenfold_at_half_and_three_quarters():
    tx = bench.make_schedule(0.2, "step", total=100)
    grads = jax.tree.map(jnp.ones_like, PARAMS)
    state, rates, update = tx.init(PARAMS), [], jax.jit(tx.update)
    for _ in range(100):
        u, state = update(grads, state, PARAMS)
        rates.append(float(u["b"][0]))
    vel = np.cumsum([0.9**k for k in range(100)])[:100]  # the momentum buffer on unit gradients
    lr = -np.asarray(rates) / (vel + 5e-4 * vel)  # coupled L2 on b = 1 adds 5e-4 per step
    np.testing.assert_allclose(lr[[0, 49, 50, 74, 75, 99]], [0.2, 0.2, 0.02, 0.02, 0.002, 0.002],
                               rtol=1e-4)  # fmt: skip


def test_schedule_free_is_evaluated_at_its_averaged_params():
    train, test = _toy_split(), _toy_split(48, seed=1)
    model = MLP((8,), num_classes=3)
    trainer = _sets.Trainer(model, train, batch_size=16, epochs=2)
    make = lambda: bench.make_schedule_free(1.0, 0.0, total=12)  # noqa: E731
    res = trainer.run("sf", make, 0, {"test": test}, eval_params=bench._eval_schedule_free)
    x = optax.contrib.schedule_free_eval_params(res.opt_state, res.params)
    at_x = evaluate(model, x, res.model_state, test)["accuracy"]
    at_y = evaluate(model, res.params, res.model_state, test)["loss"]
    assert res.history[-1]["test_accuracy"] == pytest.approx(at_x)
    assert res.history[-1]["test_loss"] != pytest.approx(at_y)  # not the training point
    again = trainer.run("sf", make, 0, {"test": test}, eval_params=bench._eval_schedule_free)
    jax.tree.map(np.testing.assert_array_equal, again.params, res.params)  # loop params kept


def test_quick_run_writes_the_selection_record_and_every_summary_key(tmp_path):
    bench.main(["--quick", "--out-dir", str(tmp_path)])
    record = json.loads((tmp_path / "two_regimes.quick.json").read_text())
    summary, selection = record["summary"], record["selection"]
    ran = [_sets.PREFIX[name] for name in bench.QUICK["sets"]]
    for prefix in ran:
        for arm in ("two_regimes", "best_schedule", "schedule_free"):
            rec = selection[prefix + arm]
            assert rec["configs_tried"] == len(rec["grid"]) == len(rec["scores"]) >= 1
        for control in ("small_only", "large_only"):
            assert selection[prefix + control]["inherits"] == prefix + "two_regimes"
        assert summary[prefix + "accuracy_delta_vs_best_schedule_pt"] is not None
        assert summary[prefix + "configs_tried"] == summary[prefix + "schedule_free_configs_tried"]
    for prefix in _sets.PREFIX.values():  # every key; the sets left out of --quick: None
        for key in (
            "accuracy_delta_vs_best_schedule_pt",
            "accuracy_delta_vs_schedule_free_pt",
            "small_only_accuracy_delta_pt",
            "large_only_accuracy_delta_pt",
        ):
            for k in (key, *protocol.ci_keys(key)):
                assert prefix + k in summary
        for key in (
            "configs_tried",
            "best_schedule_configs_tried",
            "schedule_free_configs_tried",
            "diverged_runs",
        ):
            assert prefix + key in summary
    assert "goal_met" in summary and "diverged_runs" in summary
    assert (tmp_path / "two_regimes.quick.png").exists()
    assert not (tmp_path / "two_regimes.json").exists()
