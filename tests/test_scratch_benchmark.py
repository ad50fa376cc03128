"""The multirate-from-scratch benchmark: its subgroups step, its init, and its quick run."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import optax

from benchmarks import multirate_scratch as scratch
from benchmarks import protocol
from optax_multirate.data import Split
from optax_multirate.models import MLP
from optax_multirate.multirate import apply_slow_mask, multirate_subgroups
from optax_multirate.train import classification_loss, fit, init_model


def _split(n=48, dim=5, seed=0) -> Split:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, dim)).astype(np.float32)
    return Split(x=x, y=(x[:, 0] > 0).astype(np.int32) + 2 * (x[:, 1] > 0).astype(np.int32))


def test_slow_mask_step_differentiates_at_the_masked_params():
    """Each step equals the documented reference: the gradient at apply_slow_mask(params,
    opt_state), the update from the unmasked params; fast and slow steps alike."""
    model = MLP((8,), num_classes=4)
    tx = multirate_subgroups(0.1, 2, 0.5, seed=3)
    step = scratch._SlowMaskStep(model, tx)
    loss = classification_loss(model)
    p, ms = init_model(model, jax.random.PRNGKey(0), _split().x[:1])
    s = tx.init(p)
    ref_p, ref_s = p, s
    split = _split()
    for t in range(4):  # two fast steps, the slow step, a fast step with a new mask
        batch = {"x": split.x[8 * t : 8 * t + 8], "y": split.y[8 * t : 8 * t + 8]}
        key = jax.random.PRNGKey(t)
        p, s, ms, metrics = step(p, s, ms, batch, key)
        fwd = lambda q, s=ref_s, b=batch, k=key: loss(apply_slow_mask(q, s), {}, b, k)[0]  # noqa: E731
        grads = jax.grad(fwd)(ref_p)
        u, ref_s = tx.update(grads, ref_s, ref_p)
        ref_p = optax.apply_updates(ref_p, u)
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7), p, ref_p)
        assert sorted(metrics) == ["accuracy", "loss"]
    assert step.phased.masks == [tuple([True] * len(jax.tree.leaves(p)))]  # one full program


def test_subgroups_runs_start_where_fit_would():
    """The subgroups runs pass their own init (masks drawn from the run's seed): the params are
    fit's default init for that seed, bitwise."""
    model, split = MLP((8,), num_classes=4), _split()
    default = fit(model, optax.sgd(0.1), split, epochs=0, batch_size=8, seed=7).params
    ours, _ = init_model(model, jax.random.PRNGKey(7), split.x[:1])
    jax.tree.map(np.testing.assert_array_equal, default, ours)
    # the mask seed enters the optimizer's init only: the update is the same function
    a = scratch._subgroups(0.1, 0.5, seed=7)
    b = scratch._subgroups(0.1, 0.5, seed=8)
    sa, sb = a.init(ours), b.init(ours)
    assert not all(jax.tree.leaves(jax.tree.map(jnp.array_equal, sa.mask, sb.mask)))
    g = jax.tree.map(jnp.ones_like, ours)
    ua, _ = a.update(g, sa, ours)
    ub, _ = scratch._subgroups(0.1, 0.5).update(g, sa, ours)
    jax.tree.map(np.testing.assert_array_equal, ua, ub)


def test_patch_data_shares_and_test_sets():
    x = np.random.default_rng(0).uniform(size=(200, 8, 8, 1)).astype(np.float32)
    y = np.arange(200, dtype=np.int32) % 10
    train, tests, shares = scratch._patch_data(Split(x=x, y=y), Split(x=x[:30], y=y[:30]))
    assert sorted(tests) == sorted(scratch.TEST_SETS)
    assert abs(sum(shares.values()) - 1.0) < 1e-9
    assert np.all(tests["patch"].x[:, 2:] == 0) and np.all(tests["patch"].x[:, :, 2:] == 0)
    np.testing.assert_array_equal(tests["both"].x[:, 2:], x[:30, 2:])
    np.testing.assert_array_equal(train.y, y)


def test_scratch_quick_writes_the_protocol_record(tmp_path):
    summary = scratch.main(["--quick", "--out-dir", str(tmp_path)])
    record = json.loads((tmp_path / "multirate_scratch.quick.json").read_text())
    assert record["quick"] is True and record["summary"] == json.loads(json.dumps(summary))
    assert not (tmp_path / "multirate_scratch.json").exists()
    arms = ("sgd", "sgd_dropout", "subgroups", "ts_sgd", "timescales")
    assert set(record["selection"]) == set(arms)
    for arm in arms:
        rec = record["selection"][arm]
        assert rec["configs_tried"] == len(scratch.QUICK_GRIDS[arm]) == len(rec["grid"])
        assert len(rec["scores"]) == len(rec["grid"]) and "diverged" in rec
        assert rec["chosen"] is None or rec["chosen"] in rec["grid"]
    s = record["summary"]
    deltas = [
        "subgroups_accuracy_delta_pt",
        "dropout_accuracy_delta_pt",
        "timescales_clean_accuracy_delta_pt",
        "timescales_patch_accuracy_delta_pt",
        "timescales_both_accuracy_delta_pt",
    ]
    keys = [
        "subgroups_test_loss_delta",
        "dropout_test_loss_delta",
        "overfit_gap_pt",
        "overfit_validation_gap_pt",
        "overfit_condition_met",
        "diverged_runs",
        *deltas,
        *(k for d in deltas for k in protocol.ci_keys(d)),
    ]
    missing = [k for k in keys if k not in s]
    assert not missing, missing
    assert isinstance(s["diverged_runs"], int)
    assert all(r["seed"] == 0 and "diverged" in r for r in record["runs"])
