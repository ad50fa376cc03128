"""Tests for multirate: fast/slow partition, random subgroups, several time scales."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optax_multirate as om
from optax_multirate.models import MLP
from optax_multirate.multirate import (
    MultirateState,
    MultirateSubgroupsState,
    apply_slow_mask,
    multirate,
    multirate_sgd,
    multirate_subgroups,
    multirate_timescales,
)
from optax_multirate.phases import PhasedStep, find_tags

LABELS = {"body": {"w": "slow", "b": "slow"}, "head": {"w": "fast"}}


def _params():
    rng = np.random.default_rng(0)
    return {
        "body": {"w": jnp.asarray(rng.normal(size=(3, 2)), jnp.float32), "b": jnp.zeros(2)},
        "head": {"w": jnp.asarray(rng.normal(size=(2,)), jnp.float32)},
    }


def _grad(params, t):
    """A theta-dependent gradient (quadratic pull to 1) plus per-step noise."""
    rng = np.random.default_rng(100 + t)
    return jax.tree.map(
        lambda x: (x - 1.0) + jnp.asarray(rng.normal(size=x.shape), jnp.float32), params
    )


def _np(tree):
    return jax.tree.map(lambda x: np.asarray(x, np.float64), tree)


def _run(tx, params, n, grad_fn=_grad, jit=True):
    update = jax.jit(tx.update) if jit else tx.update
    state = tx.init(params)
    for t in range(n):
        u, state = update(grad_fn(params, t), state, params)
        params = optax.apply_updates(params, u)
    return params, state


def _assert_close(a, b, rtol=1e-6, atol=1e-6):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=rtol, atol=atol)


def _assert_equal(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


# --------------------------------------------------------------------------- references


def _reference_partition(params, n, h, k, mu, drift):
    """Spec §1.1 (drift) and §1.2 (no drift), step-indexed, in numpy float64."""
    theta = _np(params)
    p = jax.tree.map(np.zeros_like, theta)
    for t in range(n):
        g = _np(_grad(jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), theta), t))
        start = t % k == 0
        p["head"]["w"] = mu * p["head"]["w"] + g["head"]["w"]
        theta["head"]["w"] = theta["head"]["w"] - h * p["head"]["w"]
        for name in ("w", "b"):
            if start:
                p["body"][name] = mu * p["body"][name] + g["body"][name]
            if drift:
                theta["body"][name] = theta["body"][name] - h * p["body"][name]
            elif start:
                theta["body"][name] = theta["body"][name] - k * h * p["body"][name]
    return theta


@pytest.mark.parametrize("drift", [True, False])
@pytest.mark.parametrize("k", [2, 3])
def test_multirate_sgd_matches_spec_reference(drift, k):
    params = _params()
    tx = multirate_sgd(0.05, k, LABELS, momentum=0.9, linear_drift=drift)
    got, state = _run(tx, params, 4 * k + 1)
    _assert_close(got, _reference_partition(params, 4 * k + 1, 0.05, k, 0.9, drift), 1e-5)
    assert int(state.count) == 4 * k + 1
    assert int(state.tag.phase) == (0 if (4 * k + 1) % k == 0 else 1)


def test_k1_equals_sgd_exactly():
    params = _params()
    for jit in (False, True):
        got, _ = _run(multirate_sgd(0.1, 1, LABELS, momentum=0.9), params, 6, jit=jit)
        want, _ = _run(optax.sgd(0.1, momentum=0.9), params, 6, jit=jit)
        _assert_equal(got, want)


def test_generic_multirate_with_custom_optimizers():
    params = _params()
    tx = multirate(optax.adam(0.01), optax.sgd(0.3), 3, LABELS)
    got, _ = _run(tx, params, 7)
    # Reference: adam on the head every step; sgd on the body from cycle-start gradients,
    # its update spread over the cycle as U/3.
    adam, sgd = optax.adam(0.01), optax.sgd(0.3)
    p = params
    sa, ss = adam.init(p["head"]), sgd.init(p["body"])
    held = None
    for t in range(7):
        g = _grad(p, t)
        ua, sa = adam.update(g["head"], sa, p["head"])
        if t % 3 == 0:
            us, ss = sgd.update(g["body"], ss, p["body"])
            held = jax.tree.map(lambda x: x / 3, us)
        p = {
            "head": optax.apply_updates(p["head"], ua),
            "body": optax.apply_updates(p["body"], held),
        }
    _assert_close(got, p)


@pytest.mark.parametrize("garbage", ["zeros", "nan", "random"])
def test_slow_gradients_on_fast_steps_change_nothing(garbage):
    params = _params()
    k = 3
    tx = multirate_sgd(0.05, k, LABELS, momentum=0.9)

    def corrupt(p, t):
        g = _grad(p, t)
        if t % k == 0:
            return g
        fill = {
            "zeros": lambda x: jnp.zeros_like(x),
            "nan": lambda x: jnp.full_like(x, jnp.nan),
            "random": lambda x: x * 1e6 + 3.0,
        }[garbage]
        return {"body": jax.tree.map(fill, g["body"]), "head": g["head"]}

    for jit, n in ((False, k + 2), (True, 2 * k + 2)):
        want, s_want = _run(tx, params, n, jit=jit)
        got, s_got = _run(tx, params, n, grad_fn=corrupt, jit=jit)
        _assert_equal(got, want)
        _assert_equal(s_got, s_want)


def test_slow_momentum_frozen_within_cycle_and_drift_displacement_matches():
    params = _params()
    k = 4
    slow_g = {"body": {"w": jnp.ones((3, 2)), "b": jnp.ones(2)}, "head": {"w": jnp.ones(2)}}
    txd = multirate_sgd(0.1, k, LABELS, momentum=0.5)
    txn = multirate_sgd(0.1, k, LABELS, momentum=0.5, linear_drift=False)
    pd, pn = params, params
    sd, sn = txd.init(params), txn.init(params)
    for t in range(2 * k):
        ud, sd = txd.update(slow_g, sd, pd)
        un, sn = txn.update(slow_g, sn, pn)
        pd, pn = optax.apply_updates(pd, ud), optax.apply_updates(pn, un)
        slow_state = sd.inner_state.inner_states["slow"].inner_state
        if t % k == 0:
            held = slow_state.held
        else:  # p_S (held U/k) unchanged across phase-1 steps
            _assert_equal(slow_state.held, held)
        if (t + 1) % k == 0:  # same net slow displacement per cycle
            _assert_close(pd["body"], pn["body"], 1e-6, 1e-6)


def test_learning_rate_schedule_holds_slow_rate_per_cycle():
    params = _params()
    k = 3
    schedule = optax.linear_schedule(0.1, 0.01, 9)
    got, _ = _run(multirate_sgd(schedule, k, LABELS, momentum=0.0), params, 9)
    # Reference: slow steps use k * schedule(cycle start) / k each step of the cycle.
    theta = _np(params)
    for t in range(9):
        g = _np(_grad(jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), theta), t))
        h = float(schedule(t))
        theta["head"]["w"] -= h * g["head"]["w"]
        if t % k == 0:
            held = {n: float(schedule(t)) * g["body"][n] for n in ("w", "b")}
        for n in ("w", "b"):
            theta["body"][n] -= held[n]
    _assert_close(got, theta, 1e-5)


def test_inject_hyperparams_and_jit_no_retrace():
    params = _params()
    tx = optax.inject_hyperparams(multirate_sgd, static_args=("k", "param_labels"))(
        learning_rate=0.05, k=3, param_labels=LABELS, momentum=0.9
    )
    traces = []

    def update(g, s, p):
        traces.append(1)
        return tx.update(g, s, p)

    got, _ = _run(optax.GradientTransformation(tx.init, jax.jit(update)), params, 10)
    want, _ = _run(multirate_sgd(0.05, 3, LABELS, momentum=0.9), params, 10)
    _assert_close(got, want)
    assert len(traces) == 1


def test_jit_equals_no_jit_all_variants():
    params = _params()
    for tx in (
        multirate_sgd(0.05, 3, LABELS, weight_decay=1e-2),
        multirate_subgroups(0.05, 2, 0.5, seed=1, momentum=0.5),
        multirate_timescales(0.05, (1, 2, 4), momentum=0.9, weight_decay=1e-2),  # 1 full merge
    ):
        a, sa = _run(tx, params, 5, jit=False)
        b, sb = _run(tx, params, 5, jit=True)
        _assert_close(a, b)
        _assert_close(sa, sb)


# --------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    "kwargs, match, exc",
    [
        ({"k": 0}, "k", ValueError),
        ({"k": True}, "k", TypeError),
        ({"k": 2.0}, "k", TypeError),
        ({"learning_rate": 0.0}, "learning_rate", ValueError),
        ({"learning_rate": -1.0}, "learning_rate", ValueError),
        ({"learning_rate": float("nan")}, "learning_rate", ValueError),
        ({"learning_rate": float("inf")}, "learning_rate", ValueError),
        ({"learning_rate": "0.1"}, "learning_rate", TypeError),
        ({"momentum": 1.0}, "momentum", ValueError),
        ({"momentum": -0.1}, "momentum", ValueError),
        ({"weight_decay": -1e-4}, "weight_decay", ValueError),
    ],
)
def test_multirate_sgd_constructor_errors(kwargs, match, exc):
    args = {"learning_rate": 0.1, "k": 2, "param_labels": LABELS, **kwargs}
    with pytest.raises(exc, match=match):
        multirate_sgd(**args)


def test_multirate_init_errors():
    params = _params()
    bad = {"body": {"w": "slow", "b": "medium"}, "head": {"w": "fast"}}
    with pytest.raises(ValueError, match="param_labels.*'medium'"):
        multirate_sgd(0.1, 2, bad).init(params)
    with pytest.raises(ValueError, match="param_labels.*'slow'"):
        multirate_sgd(0.1, 2, jax.tree.map(lambda _: "fast", params)).init(params)
    with pytest.raises(ValueError, match="param_labels.*'fast'"):
        multirate_sgd(0.1, 2, jax.tree.map(lambda _: "slow", params)).init(params)
    with pytest.raises(ValueError, match="param_labels does not match"):
        multirate_sgd(0.1, 2, {"body": {"w": "slow"}, "head": {"w": "fast"}}).init(params)
    with pytest.raises(ValueError, match="rule"):  # a rule matching nothing names itself
        multirate_sgd(0.1, 2, lambda p: om.rule_labels(p, {"fast": "^fc/"}, default="slow")).init(
            params
        )


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"k": 0}, "k"),
        ({"slow_fraction": 0.0}, "slow_fraction"),
        ({"slow_fraction": 1.0}, "slow_fraction"),
        ({"learning_rate": 0.0}, "learning_rate"),
        ({"momentum": 1.5}, "momentum"),
    ],
)
def test_subgroups_constructor_errors(kwargs, match):
    args = {"learning_rate": 0.1, "k": 2, **kwargs}
    with pytest.raises(ValueError, match=match):
        multirate_subgroups(**args)


@pytest.mark.parametrize("multipliers", [(1,), (1, 1), (2, 1), (1, 3, 5), (0, 2)])
def test_timescales_multiplier_errors(multipliers):
    with pytest.raises(ValueError, match="multipliers"):
        multirate_timescales(0.1, multipliers)


@pytest.mark.parametrize("multipliers", [(1, 2.0), (True, 2), "12", 10])
def test_timescales_multiplier_type_errors(multipliers):
    with pytest.raises(TypeError, match="multipliers"):
        multirate_timescales(0.1, multipliers)


def test_subgroups_init_errors():
    params = _params()
    with pytest.raises(ValueError, match="param_labels"):
        multirate_subgroups(0.1, 2, param_labels=jax.tree.map(lambda _: "fast", params)).init(
            params
        )
    with pytest.raises(ValueError, match="param_labels.*'slow'"):
        multirate_subgroups(0.1, 2, param_labels=jax.tree.map(lambda _: "slow", params)).init(
            params
        )


def test_apply_slow_mask_finds_the_state_inside_any_optax_state():
    params = _params()
    sub = multirate_subgroups(0.1, 2, seed=0)
    alone = apply_slow_mask(params, sub.init(params))
    for wrapped in (
        optax.chain(optax.clip(1.0), sub),
        optax.inject_hyperparams(multirate_subgroups, static_args=("k", "seed"))(0.1, 2, seed=0),
    ):
        for a, b in zip(
            jax.tree.leaves(alone), jax.tree.leaves(apply_slow_mask(params, wrapped.init(params)))
        ):
            np.testing.assert_array_equal(a, b)
    with pytest.raises(
        ValueError, match="opt_state must hold exactly one MultirateSubgroupsState, found none"
    ):
        apply_slow_mask(params, optax.sgd(0.1).init(params))
    with pytest.raises(ValueError, match="found 2, at"):
        apply_slow_mask(params, optax.chain(sub, sub).init(params))


# --------------------------------------------------------------------------- phased train step


@pytest.fixture(scope="module")
def mlp():
    model = MLP(features=(16, 16), num_classes=3)
    x = jnp.asarray(np.random.default_rng(0).random((16, 8)), jnp.float32)
    y = jnp.asarray(np.random.default_rng(1).integers(0, 3, 16))
    params = model.init(jax.random.key(0), x[:1])["params"]

    def loss(p, x, y):
        logits = model.apply({"params": p}, x)
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    labels = om.rule_labels(params, {"fast": "^head/"}, default="slow")
    return params, labels, loss, x, y


def _steps(step, params, state, n, x, y):
    masks = []
    for t in range(n):
        out = step(params, state, x + 0.01 * t, y)
        params, state = out.params, out.opt_state
        masks.append(step.last_mask)
    return params, state, masks


def test_phased_step_equals_full_gradient_step(mlp):
    params, labels, loss, x, y = mlp
    tx = multirate_sgd(0.1, 3, labels, momentum=0.9)
    phased = PhasedStep(loss, tx)
    full = PhasedStep(loss, tx, dispatch="full")
    a, sa, masks = _steps(phased, params, tx.init(params), 7, x, y)
    b, sb, _ = _steps(full, params, tx.init(params), 7, x, y)
    _assert_close(a, b, 1e-6, 1e-7)
    head_only = tuple(p.startswith("head/") for p in om.labels.leaf_paths(params))
    assert masks == [(True,) * len(head_only) if t % 3 == 0 else head_only for t in range(7)]
    assert phased.num_compiles == 2


def test_multirate_inside_partition_and_chain(mlp):
    params, labels, loss, x, y = mlp
    # multirate on the last two layers only (holes), plain sgd on the rest, clipping inside.
    outer = om.rule_labels(params, {"mr": "^(Dense_1|head)/"}, default="plain")
    inner_labels = om.rule_labels(params, {"fast": "^head/"}, default="slow")
    fast = optax.chain(optax.clip_by_global_norm(1.0), optax.sgd(0.1))
    tx = optax.partition(
        {"mr": multirate(fast, optax.sgd(0.2), 2, inner_labels), "plain": optax.sgd(0.1)},
        outer,
    )
    a, _, masks = _steps(PhasedStep(loss, tx), params, tx.init(params), 4, x, y)
    b, _, _ = _steps(PhasedStep(loss, tx, dispatch="full"), params, tx.init(params), 4, x, y)
    _assert_close(a, b, 1e-6, 1e-7)
    paths = om.labels.leaf_paths(params)
    assert [dict(zip(paths, m))["Dense_1/kernel"] for m in masks] == [True, False, True, False]
    assert all(dict(zip(paths, m))["Dense_0/kernel"] for m in masks)


def test_resume_mid_cycle_bitwise(mlp, tmp_path):
    from optax_multirate.train import restore_checkpoint, save_checkpoint

    params, labels, loss, x, y = mlp
    tx = multirate_sgd(0.1, 3, labels, momentum=0.9)
    step = PhasedStep(loss, tx)
    want, s_want, _ = _steps(step, params, tx.init(params), 8, x, y)
    mid, s_mid, _ = _steps(step, params, tx.init(params), 4, x, y)  # count 4: mid-cycle
    assert int(s_mid.tag.phase) == 1
    save_checkpoint(tmp_path / "ckpt", (mid, s_mid))
    template = (jax.tree.map(jnp.zeros_like, params), tx.init(params))
    mid2, s_mid2 = restore_checkpoint(tmp_path / "ckpt", template)
    assert int(s_mid2.count) == 4 and int(find_tags(s_mid2)[0].phase) == 1
    p, s = mid2, s_mid2
    for t in range(4, 8):
        out = step(p, s, x + 0.01 * t, y)
        p, s = out.params, out.opt_state
    _assert_equal(p, want)
    _assert_equal(s, s_want)


# --------------------------------------------------------------------------- random subgroups


def test_subgroups_match_reference_and_masks():
    params = {
        "w": jnp.asarray(np.random.default_rng(0).normal(size=(40, 30)), jnp.float32),
        "bias": jnp.zeros(30),
    }
    k, h, mu, q = 3, 0.1, 0.5, 0.3
    tx = multirate_subgroups(h, k, q, seed=3, momentum=mu)
    state = tx.init(params)
    assert isinstance(state, MultirateSubgroupsState)
    theta, p = _np(params), jax.tree.map(np.zeros_like, _np(params))
    live = params
    masks = []
    update, fwd_fn = jax.jit(tx.update), jax.jit(apply_slow_mask)
    for t in range(3 * (k + 1)):
        c = t % (k + 1)
        m = np.asarray(state.mask["w"])
        assert not np.asarray(state.mask["bias"]).any()
        if c == 0:
            masks.append(m)
        else:
            np.testing.assert_array_equal(m, masks[-1])  # fixed within a cycle
        fwd = fwd_fn(live, state)
        slow = c == k
        np.testing.assert_array_equal(
            np.asarray(fwd["w"]), np.where(m & (not slow), 0.0, np.asarray(live["w"]))
        )
        g = _grad(fwd, t)
        u, state = update(g, state, live)
        live = optax.apply_updates(live, u)
        # reference
        gn = _np(g)
        act = {"w": m if slow else ~m, "bias": np.full(30, not slow)}
        lr = k * h if slow else h
        for n in ("w", "bias"):
            p[n] = np.where(act[n], mu * p[n] + gn[n], p[n])
            theta[n] = np.where(act[n], theta[n] - lr * p[n], theta[n])
        _assert_close(live, theta, 1e-5, 1e-6)
    assert not np.array_equal(masks[0], masks[1])
    assert abs(np.mean(masks) - q) < 0.05


# --------------------------------------------------------------------------- several time scales


def _reference_timescales(params, n, h, ms, mu):
    """Spec §1.6: brains with steps m_i h, one every m_i / m_0 steps, averaged when they meet."""
    theta = _np(params)
    periods = [m // ms[0] for m in ms]
    mom = [jax.tree.map(np.zeros_like, theta) for _ in ms]
    brains = [None] * len(ms)
    for t in range(n):
        g = _np(_grad(jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), theta), t))
        for i, (m, per) in enumerate(zip(ms, periods)):
            if t % per == 0:
                mom[i] = jax.tree.map(lambda p, g: mu * p + g, mom[i], g)
                brains[i] = jax.tree.map(lambda x, p, m=m: x - m * h * p, theta, mom[i])
        meet = [brains[i] for i in range(len(ms)) if (t + 1) % periods[i] == 0]
        theta = jax.tree.map(lambda *xs: sum(xs) / len(xs), *meet)
    return theta


@pytest.mark.parametrize("ms", [(1, 4), (1, 2, 6), (2, 6)])
def test_timescales_match_reference(ms):
    params = _params()
    n = 2 * ms[-1] // ms[0] + 1
    got, state = _run(multirate_timescales(0.05, ms, momentum=0.9), params, n)
    _assert_close(got, _reference_timescales(params, n, 0.05, ms, 0.9), 1e-5, 1e-6)
    assert len(state.brains) == len(ms) - 1


def test_timescales_single_rate_limit():
    # Two brains of equal rate in lockstep: merging two equal copies is plain momentum SGD.
    params = _params()
    got, _ = _run(multirate_timescales(0.05, (1, 2), momentum=0.0), params, 1)
    want, _ = _run(optax.sgd(0.05), params, 1)
    _assert_close(got, want)
    with pytest.raises(ValueError, match="params"):
        tx = multirate_timescales(0.05)
        tx.update(params, tx.init(params))


def test_state_types():
    params = _params()
    s = multirate_sgd(0.1, 2, LABELS).init(params)
    assert isinstance(s, MultirateState) and s.count.dtype == jnp.int32
    assert find_tags(s)[0].reads == ((True, True, True), (False, False, True))
