"""Tests for two_regimes: the step/plateau/signal triggers, the latch, re-init, resume, errors."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from optax_multirate import train as train_lib
from optax_multirate.phases import PhasedStep, find_tags
from optax_multirate.two_regimes import (
    PlateauTrigger,
    TwoRegimesState,
    phase_of,
    two_regimes,
    two_regimes_sgd,
)

PARAMS = {"w": jnp.asarray([0.5, -1.0, 2.0], jnp.float32), "b": jnp.asarray(0.3, jnp.float32)}


def _grads(n, seed=0):
    rng = np.random.default_rng(seed)
    return [
        {
            "w": jnp.asarray(rng.normal(size=3), jnp.float32),
            "b": jnp.asarray(rng.normal(), jnp.float32),
        }
        for _ in range(n)
    ]


def _run(tx, grads, params=PARAMS, jit=True, extras=None):
    """Applies ``tx`` to a fixed gradient sequence; returns per-call updates, params, state."""
    update = jax.jit(tx.update) if jit else tx.update
    state = tx.init(params)
    outs = []
    for t, g in enumerate(grads):
        kw = extras[t] if extras is not None else {}
        u, state = update(g, state, params, **kw)
        params = optax.apply_updates(params, u)
        outs.append(u)
    return outs, params, state


def _equal(a, b):
    return all(
        np.array_equal(np.asarray(x), np.asarray(y))
        for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)
    )


def _anchor():
    """A transformation whose state copies the params at ``init`` (like schedule-free, EMA)."""

    def init_fn(params):
        return {"anchor": jax.tree.map(jnp.asarray, params)}

    def update_fn(updates, state, params=None):
        u = jax.tree.map(lambda g, a, p: 0.5 * (a - p) + 0.0 * g, updates, state["anchor"], params)
        return u, state

    return optax.GradientTransformation(init_fn, update_fn)


def _scale_by_extra():
    """Multiplies updates by the required extras ``value`` and ``foo``."""

    def update_fn(updates, state, params=None, *, value, foo, **extra):
        del params, extra
        return jax.tree.map(lambda g: g * value * foo, updates), state

    return optax.GradientTransformationExtraArgs(lambda p: optax.EmptyState(), update_fn)


# --------------------------------------------------------------------------- the step trigger


@pytest.mark.parametrize("switch_step", [0, 4, 20])
@pytest.mark.parametrize("reinit", [True, False])
def test_step_trigger_equals_chain_of_conditionally_transform(switch_step, reinit):
    large, small = optax.sgd(0.3, momentum=0.9), optax.adam(0.05)
    tx = two_regimes(large, small, switch_step=switch_step, reinit_small_at_switch=reinit)
    ref = optax.chain(
        optax.conditionally_transform(large, lambda s: s < switch_step),
        optax.conditionally_transform(small, lambda s: s >= switch_step),
    )
    grads = _grads(12)
    u_tr, p_tr, s_tr = _run(tx, grads)
    u_ref, p_ref, _ = _run(ref, grads)
    assert _equal(u_tr, u_ref) and _equal(p_tr, p_ref)  # bitwise
    switched = switch_step < 12
    assert int(s_tr.phase) == int(switched) and int(s_tr.count) == 12
    assert int(s_tr.switched_at) == (switch_step if switched else -1)


def test_switch_zero_is_small_alone_and_late_switch_is_large_alone():
    large, small = optax.sgd(0.3, momentum=0.9), optax.adam(0.05)
    grads = _grads(8)
    for s, alone in ((0, small), (8, large), (100, large)):
        u, p, _ = _run(two_regimes(large, small, switch_step=s), grads)
        u_ref, p_ref, _ = _run(alone, grads)
        assert _equal(u, u_ref) and _equal(p, p_ref), s


def test_jit_equals_eager():
    tx = two_regimes(
        optax.sgd(0.3, momentum=0.9),
        optax.adam(0.05),
        switch_step=3,
        plateau=PlateauTrigger(patience=1, accumulation_size=1, rtol=0.5),
    )
    grads = _grads(4)
    extras = [{"value": jnp.float32(v)} for v in (1.0, 1.0, 0.5, 0.5)]
    _, p_jit, s_jit = _run(tx, grads, extras=extras)
    _, p_eager, s_eager = _run(tx, grads, jit=False, extras=extras)
    for a, b in zip(jax.tree.leaves((p_jit, s_jit)), jax.tree.leaves((p_eager, s_eager))):
        np.testing.assert_allclose(a, b, rtol=1e-6)


# ------------------------------------------------------------------------ the plateau trigger


def _plateau_reference(values, trig):
    """Hand-written reference from the spec (section 2.3): the phase of each call."""
    best, bad, acc_sum, acc_n, phase, phases = math.inf, 0, 0.0, 0, 0, []
    for count, v in enumerate(values):
        if phase == 0:
            acc_sum += v
            acc_n += 1
            if acc_n == trig.accumulation_size:
                m = acc_sum / acc_n
                thr = math.inf if best == math.inf else (1 - trig.rtol) * best - trig.atol
                if m < thr:  # False for NaN
                    best, bad = m, 0
                else:
                    bad += 1
                acc_sum, acc_n = 0.0, 0
            fire = bad >= trig.patience and count >= trig.min_steps
            if trig.max_large_steps is not None:
                fire = fire or count >= trig.max_large_steps
            phase = int(fire)
        phases.append(phase)
    return phases, best, bad


@pytest.mark.parametrize(
    "trig,values",
    [
        (
            PlateauTrigger(patience=2, accumulation_size=3, rtol=0.1),
            [4, 4, 4, 3, 3, 3] + [2.9] * 14,
        ),
        (
            PlateauTrigger(patience=1, accumulation_size=1, rtol=0.0, atol=0.5),
            [5, 4, 3.8, 3, 2, 1.9],
        ),
        (PlateauTrigger(patience=2, accumulation_size=2, rtol=0.01), [1, math.nan] * 4 + [0.5] * 4),
        (
            PlateauTrigger(patience=1, accumulation_size=1, rtol=0.1, min_large_steps=6),
            [1.0] * 10,
        ),
        (
            PlateauTrigger(patience=3, accumulation_size=2, rtol=0.1, max_large_steps=5),
            list(np.geomspace(1, 1e-3, 10)),
        ),
        (PlateauTrigger(patience=1, accumulation_size=1, rtol=1.0), [2.0, -1.0, -3.0, -3.0]),
    ],
)
def test_plateau_trigger_matches_hand_reference(trig, values):
    tx = two_regimes(optax.sgd(1.0), optax.sgd(0.01), plateau=trig)
    update = jax.jit(tx.update)
    state = tx.init(PARAMS)
    g = _grads(1)[0]
    phases = []
    for v in values:
        _, state = update(g, state, PARAMS, value=jnp.float32(v))
        phases.append(int(state.phase))
    ref, best, bad = _plateau_reference([float(np.float32(v)) for v in values], trig)
    assert phases == ref
    assert int(state.switched_at) == (ref.index(1) if 1 in ref else -1)
    assert int(state.plateau_state.bad_windows) == bad
    np.testing.assert_allclose(float(state.plateau_state.best), best, rtol=1e-6)


def test_plateau_reads_value_only_in_phase_0_and_forwards_value():
    # Phase 1 holds reduce_on_plateau: it must still receive value after the switch.
    small = optax.chain(optax.sgd(1.0), optax.contrib.reduce_on_plateau(patience=1, factor=0.5))
    trig = PlateauTrigger(patience=1, accumulation_size=1, rtol=0.1)
    tx = two_regimes(optax.sgd(1.0), small, plateau=trig)
    extras = [{"value": jnp.float32(1.0)} for _ in range(6)]
    u, _, s = _run(tx, [{"w": jnp.ones(3), "b": jnp.ones(())}] * 6, extras=extras)
    assert int(s.switched_at) == 1
    assert int(s.plateau_state.bad_windows) == 1  # frozen once phase 1 starts
    u_small, _, _ = _run(small, [{"w": jnp.ones(3), "b": jnp.ones(())}] * 5, extras=extras[1:])
    assert float(u[0]["b"]) == -1.0 and _equal(u[1:], u_small)
    assert float(u[-1]["b"]) < -0.0 and float(u[-1]["b"]) > -1.0  # the plateau scaled it


# ------------------------------------------------------------------------- signal and latch


def test_signal_latches_and_never_goes_back():
    large, small = optax.sgd(1.0), optax.sgd(0.1)
    tx = two_regimes(large, small, signal=True)
    flags = [False, False, True, False, False, True, False]
    grads = [{"w": jnp.ones(3), "b": jnp.ones(())}] * len(flags)
    u, _, s = _run(tx, grads, extras=[{"switch": jnp.asarray(f)} for f in flags])
    assert [float(x["b"]) for x in u] == [-1.0, -1.0] + [float(np.float32(-0.1))] * 5
    assert int(s.phase) == 1 and int(s.switched_at) == 2 and int(phase_of(s)) == 1


def test_phase_never_decreases_with_any_trigger():
    trig = PlateauTrigger(patience=1, accumulation_size=1, rtol=0.1)
    tx = two_regimes(optax.sgd(1.0), optax.sgd(0.1), switch_step=50, plateau=trig, signal=True)
    rng = np.random.default_rng(0)
    update = jax.jit(tx.update)
    state, last = tx.init(PARAMS), 0
    for _ in range(40):
        value, flag = jnp.float32(rng.normal()), jnp.asarray(rng.random() < 0.1)
        _, state = update(_grads(1)[0], state, PARAMS, value=value, switch=flag)
        assert int(state.phase) >= last and int(state.tag.phase) == int(state.phase)
        last = int(state.phase)
    assert last == 1


# ----------------------------------------------------------------------------- re-init


def test_reinit_restarts_a_params_copying_state_from_the_current_params():
    grads = _grads(6)
    _, _, s_re = _run(two_regimes(optax.sgd(0.5), _anchor(), switch_step=3), grads)
    _, _, s_no = _run(
        two_regimes(optax.sgd(0.5), _anchor(), switch_step=3, reinit_small_at_switch=False),
        grads,
    )
    # Params at the switch: three sgd(0.5) steps from PARAMS.
    p3 = PARAMS
    for g in grads[:3]:
        p3 = jax.tree.map(lambda p, x: p - 0.5 * x, p3, g)
    assert _equal(s_re.small_state["anchor"], p3)
    assert _equal(s_no.small_state["anchor"], PARAMS)


def test_reinit_is_bitwise_noop_for_adam():
    grads = _grads(10)
    a = _run(two_regimes(optax.sgd(0.3), optax.adam(0.1), switch_step=4), grads)
    b = _run(
        two_regimes(optax.sgd(0.3), optax.adam(0.1), switch_step=4, reinit_small_at_switch=False),
        grads,
    )
    assert _equal(a, b)


# ----------------------------------------------------------------------------- extra args


def test_extra_args_forwarded_to_both_optimizers():
    tx = two_regimes(_scale_by_extra(), _scale_by_extra(), switch_step=2)
    g = {"w": jnp.ones(3), "b": jnp.ones(())}
    extras = [{"value": jnp.float32(t + 1.0), "foo": jnp.float32(10.0)} for t in range(4)]
    u, _, s = _run(tx, [g] * 4, extras=extras)
    assert [float(x["b"]) for x in u] == [10.0, 20.0, 30.0, 40.0]
    assert int(s.switched_at) == 2
    # switch= is forwarded too (with signal=True), as optax.chain forwards every extra.
    seen = []

    def update_fn(updates, state, params=None, *, switch, **extra):
        seen.append(switch)
        return updates, state

    spy = optax.GradientTransformationExtraArgs(lambda p: optax.EmptyState(), update_fn)
    tx = two_regimes(spy, spy, signal=True)
    tx.update(g, tx.init(PARAMS), PARAMS, switch=True)
    assert len(seen) >= 2  # traced in both branches


# ------------------------------------------------------------------------ traces and steps


def test_one_trace_over_a_run_crossing_the_switch():
    traces = []
    tx = two_regimes_sgd(0.1, total_steps=20, large_fraction=0.5)

    @jax.jit
    def step(params, state, g):
        traces.append(1)
        u, state = tx.update(g, state, params)
        return optax.apply_updates(params, u), state

    params, state = PARAMS, tx.init(PARAMS)
    for g in _grads(20):
        params, state = step(params, state, g)
    assert len(traces) == 1
    assert int(state.switched_at) == 10 and int(state.phase) == 1


def test_phased_step_compiles_once_and_equals_full_gradient_step():
    x = jnp.asarray(np.random.default_rng(0).normal(size=(8, 3)), jnp.float32)
    y = jnp.asarray(np.random.default_rng(1).normal(size=(8,)), jnp.float32)

    def loss(p, x, y):
        return jnp.mean((x @ p["w"] + p["b"] - y) ** 2)

    tx = two_regimes(optax.sgd(0.1), optax.adam(0.01), switch_step=3)
    steps = {d: PhasedStep(loss, tx, dispatch=d) for d in ("host", "full")}
    out = {}
    for d, step in steps.items():
        p, s = PARAMS, tx.init(PARAMS)
        for _ in range(8):
            p, s, *_ = step(p, s, x, y)
        out[d] = (p, s)
    assert _equal(out["host"], out["full"])
    assert steps["host"].num_compiles == 1 and steps["host"].masks == [(True, True)]
    tags = find_tags(out["host"][1])
    assert len(tags) == 1 and tags[0].reads == ((True, True), (True, True))


def test_inside_partition_and_inject_hyperparams():
    labels = {"w": "a", "b": "c"}
    inner = optax.inject_hyperparams(two_regimes, static_args=())(
        optax.sgd(1.0), optax.sgd(0.1), switch_step=2
    )
    tx = optax.partition({"a": inner, "c": optax.sgd(1.0)}, labels)
    g = {"w": jnp.ones(3), "b": jnp.ones(())}
    u, _, s = _run(tx, [g] * 3)
    assert [float(x["w"][0]) for x in u] == [-1.0, -1.0, float(np.float32(-0.1))]
    assert int(phase_of(s)) == 1
    assert find_tags(s)[0].paths == ("w",)


def test_vmap_over_seeds_matches_per_seed_runs():
    tx = two_regimes(optax.sgd(0.3, momentum=0.9), optax.adam(0.05), signal=True)
    grads = _grads(6)
    flags = np.zeros((6, 2), bool)
    flags[1, 0] = True  # seed 0 switches at call 1, seed 1 at call 4
    flags[4, 1] = True
    params = jax.tree.map(lambda x: jnp.stack([x, 2 * x]), PARAMS)

    stacked = jax.tree.map(lambda *x: jnp.stack(x), *grads)

    @jax.jit
    def run(p, fl):
        def body(carry, xs):
            p, s = carry
            g, f = xs
            u, s = tx.update(g, s, p, switch=f)
            return (optax.apply_updates(p, u), s), None

        return jax.lax.scan(body, (p, tx.init(p)), (stacked, fl))[0]

    pv, sv = jax.vmap(run, in_axes=(0, 1))(params, jnp.asarray(flags))
    for i in range(2):
        p_i, s_i = run(jax.tree.map(lambda x, i=i: x[i], params), jnp.asarray(flags[:, i]))
        for a, b in zip(jax.tree.leaves(p_i), jax.tree.leaves(pv)):
            np.testing.assert_allclose(a, b[i], rtol=1e-6)
        assert int(sv.switched_at[i]) == int(s_i.switched_at)
    assert sv.switched_at.tolist() == [1, 4]


@pytest.mark.parametrize("stop", [3, 8])
def test_resume_from_checkpoint_is_bitwise(tmp_path, stop):
    trig = PlateauTrigger(patience=1, accumulation_size=2, rtol=0.05)
    tx = two_regimes(optax.sgd(0.2, momentum=0.9), optax.adam(0.05), switch_step=5, plateau=trig)
    grads = _grads(12)
    values = [jnp.float32(v) for v in np.linspace(2.0, 1.0, 12)]
    update = jax.jit(tx.update)

    def go(params, state, ts):
        for t in ts:
            u, state = update(grads[t], state, params, value=values[t])
            params = optax.apply_updates(params, u)
        return params, state

    straight = go(PARAMS, tx.init(PARAMS), range(12))
    mid = go(PARAMS, tx.init(PARAMS), range(stop))
    path = tmp_path / "ckpt"
    train_lib.save_checkpoint(path, mid)
    restored = train_lib.restore_checkpoint(path, (PARAMS, tx.init(PARAMS)))
    assert int(restored[1].phase) == int(stop > 5)
    resumed = go(*restored, range(stop, 12))
    assert _equal(resumed, straight)
    assert isinstance(resumed[1], TwoRegimesState)


# ------------------------------------------------------------------------------- the preset


def test_preset_switch_step_weight_decay_and_traced_lr():
    tx = two_regimes_sgd(0.5, total_steps=7, large_fraction=0.6, weight_decay=0.1)
    g = {"w": jnp.ones(3), "b": jnp.ones(())}
    u, _, s = _run(tx, [g] * 7, params=PARAMS)
    assert int(s.switched_at) == round(0.6 * 7)
    # Phase 0: -0.5 * (g + 0.1 * p) on the first call.
    np.testing.assert_allclose(u[0]["w"], -0.5 * (1.0 + 0.1 * PARAMS["w"]), rtol=1e-6)

    def final_b(lr):
        tx = two_regimes_sgd(lr, total_steps=4, large_fraction=0.5)
        u, s = tx.update(g, tx.init(PARAMS), PARAMS)
        return u["b"]

    np.testing.assert_allclose(jax.vmap(final_b)(jnp.asarray([0.1, 1.0])), [-0.1, -1.0])


def test_preset_warns_when_it_never_switches(caplog):
    with caplog.at_level("WARNING"):
        two_regimes_sgd(0.1, total_steps=10, large_fraction=1.0)
    assert "never runs" in caplog.text


# ---------------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"large_tx": "sgd"}, "large_tx"),
        ({"small_tx": None}, "small_tx"),
        ({"plateau": {"patience": 3}}, "plateau"),
        ({"switch_step": True}, "switch_step"),
        ({"switch_step": 2.0}, "switch_step"),
        ({"signal": 1}, "signal"),
        ({"reinit_small_at_switch": None}, "reinit_small_at_switch"),
    ],
)
def test_constructor_type_errors(kwargs, match):
    args = {"large_tx": optax.sgd(1.0), "small_tx": optax.sgd(0.1), "switch_step": 3}
    args.update(kwargs)
    with pytest.raises(TypeError, match=match):
        two_regimes(**args)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"switch_step": None}, "trigger"),
        ({"switch_step": -1}, "switch_step"),
    ],
)
def test_constructor_value_errors(kwargs, match):
    args = {"switch_step": 3}
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        two_regimes(optax.sgd(1.0), optax.sgd(0.1), **args)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"patience": 0}, "patience"),
        ({"accumulation_size": 0}, "accumulation_size"),
        ({"rtol": 1.5}, "rtol"),
        ({"rtol": -0.1}, "rtol"),
        ({"atol": -1.0}, "atol"),
        ({"rtol": 0.0, "atol": 0.0}, "rtol and atol"),
        ({"min_large_steps": -1}, "min_large_steps"),
        ({"min_large_steps": 10, "max_large_steps": 5}, "max_large_steps"),
    ],
)
def test_plateau_trigger_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        PlateauTrigger(**kwargs)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"patience": True}, "patience"),
        ({"patience": 2.0}, "patience"),
        ({"rtol": "0.1"}, "rtol"),
        ({"max_large_steps": 1.5}, "max_large_steps"),
    ],
)
def test_plateau_trigger_type_errors(kwargs, match):
    with pytest.raises(TypeError, match=match):
        PlateauTrigger(**kwargs)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"learning_rate": 0.0}, "learning_rate"),
        ({"learning_rate": math.inf}, "learning_rate"),
        ({"total_steps": 0}, "total_steps"),
        ({"large_fraction": 0.0}, "large_fraction"),
        ({"large_fraction": 1.2}, "large_fraction"),
        ({"weight_decay": -1e-4}, "weight_decay"),
    ],
)
def test_preset_errors(kwargs, match):
    args = {"learning_rate": 0.1, "total_steps": 10}
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        two_regimes_sgd(**args)
    with pytest.raises(TypeError, match="small_tx"):
        two_regimes_sgd(0.1, total_steps=10, small_tx="adam")
    with pytest.raises(TypeError, match="total_steps"):
        two_regimes_sgd(0.1, total_steps=10.0)
    with pytest.raises(TypeError, match="learning_rate"):
        two_regimes_sgd("0.1", total_steps=10)


def test_update_errors():
    g = {"w": jnp.ones(3), "b": jnp.ones(())}
    trig = PlateauTrigger(patience=1)
    tx = two_regimes(optax.sgd(1.0), optax.sgd(0.1), plateau=trig)
    with pytest.raises(TypeError, match="value"):
        tx.update(g, tx.init(PARAMS), PARAMS)
    with pytest.raises(TypeError, match="value"):
        tx.update(g, tx.init(PARAMS), PARAMS, value=jnp.ones(2))
    tx = two_regimes(optax.sgd(1.0), optax.sgd(0.1), switch_step=2)
    with pytest.raises(TypeError, match="signal=False"):
        tx.update(g, tx.init(PARAMS), PARAMS, switch=True)
    with pytest.raises(ValueError, match="params"):
        tx.update(g, tx.init(PARAMS), None)
    tx = two_regimes(optax.sgd(1.0), optax.sgd(0.1), signal=True)
    with pytest.raises(TypeError, match="switch"):
        tx.update(g, tx.init(PARAMS), PARAMS)
    with pytest.raises(TypeError, match="switch"):
        tx.update(g, tx.init(PARAMS), PARAMS, switch=jnp.ones(2, bool))
    # Branches whose updates differ in dtype: the message names both optimizers.
    to16 = optax.stateless(lambda u, p: jax.tree.map(lambda x: x.astype(jnp.bfloat16), u))
    tx = two_regimes(optax.sgd(1.0), to16, switch_step=2)
    with pytest.raises(ValueError, match="large_tx and small_tx"):
        jax.jit(tx.update)(g, tx.init(PARAMS), PARAMS)


def test_phase_of_errors_and_nesting():
    with pytest.raises(ValueError, match="exactly one"):
        phase_of(optax.sgd(0.1).init(PARAMS))
    tx = two_regimes(optax.sgd(1.0), optax.sgd(0.1), switch_step=1)
    both = optax.chain(tx, tx).init(PARAMS)
    with pytest.raises(ValueError, match="exactly one"):
        phase_of(both)
