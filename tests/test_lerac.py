"""Tests for LeRaC: the spec's worked example in both modes against a float64 reference,
placement in a chain, depth units of a ResNet, k = 0 and after-k bitwise equality with the base
optimizer, the schedule-injection route, optax wrappers, jit, recompiles, resume, errors."""

import functools
import logging

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from optax_multirate import train as train_lib
from optax_multirate.lerac import (
    LeracState,
    lerac,
    lerac_depth_labels,
    lerac_schedules,
    scale_by_lerac,
)
from optax_multirate.models import MLP, ResNet
from optax_multirate.phases import PhasedStep

ETA0 = 0.1
R4 = (1.0, 1e-1, 1e-2, 1e-3)

# ----------------------------------------------------------------------------- reference


def reference_multipliers(r, u, *, mode, k=None, c=10.0):
    """Spec §2, in float64 Python: m_j after u ticks."""
    out = []
    for rj in r:
        if mode == "paper":
            out.append(1.0 if k == 0 else rj ** (1.0 - min(u, k) / k))
        else:
            out.append(min(1.0, rj * c**u))
    return np.array(out)


def _toy(n=4, shape=()):
    params = {f"d{j}": jnp.zeros(shape) for j in range(n)}
    depth = {f"d{j}": j for j in range(n)}
    grads = {f"d{j}": jnp.ones(shape) for j in range(n)}
    return params, depth, grads


def _rates(tx, steps, n=4):
    params, depth, grads = _toy(n)
    state = tx.init(params)
    rows = []
    for _ in range(steps):
        u, state = tx.update(grads, state, params)
        rows.append([-float(u[f"d{j}"]) for j in range(n)])
    return np.array(rows), state


# ----------------------------------------------------------------------------- arithmetic


# Spec §2 table, rounded to 4 significant digits.
PAPER_TABLE = [
    [0.1, 0.01, 0.001, 0.0001],
    [0.1, 0.01585, 0.002512, 0.0003981],
    [0.1, 0.02512, 0.00631, 0.001585],
    [0.1, 0.03981, 0.01585, 0.00631],
    [0.1, 0.0631, 0.03981, 0.02512],
    [0.1, 0.1, 0.1, 0.1],
]
STAIRCASE_TABLE = [
    [0.1, 0.01, 0.001, 0.0001],
    [0.1, 0.1, 0.01, 0.001],
    [0.1, 0.1, 0.1, 0.01],
    [0.1, 0.1, 0.1, 0.1],
    [0.1, 0.1, 0.1, 0.1],
    [0.1, 0.1, 0.1, 0.1],
]


@pytest.mark.parametrize("mode,table", [("paper", PAPER_TABLE), ("staircase", STAIRCASE_TABLE)])
def test_worked_example(mode, table):
    tx = optax.chain(
        optax.sgd(ETA0),
        scale_by_lerac(_toy()[1], k=5 if mode == "paper" else None, initial_scales=R4, mode=mode),
    )
    rates, state = _rates(tx, 9)
    for t in range(9):
        ref = ETA0 * reference_multipliers(R4, t, mode=mode, k=5)
        np.testing.assert_allclose(rates[t], ref, rtol=1e-6)
    for t, row in enumerate(table):
        got = [float(f"{x:.4g}") for x in rates[t]]
        assert got == row, (t, got)
    # the state's scales are the multipliers of the last update (tick 8: all 1)
    np.testing.assert_array_equal(np.asarray(state[1].scales), np.ones(4, np.float32))
    assert int(state[1].count) == 9


def test_staircase_derived_k_and_explicit_k():
    r = (1.0, 0.1, 0.01, 0.001)
    for k in (None, 3, 7):
        rates, _ = _rates(
            optax.chain(
                optax.sgd(ETA0), scale_by_lerac(_toy()[1], k=k, initial_scales=r, mode="staircase")
            ),
            5,
        )
        np.testing.assert_allclose(rates[2], [0.1, 0.1, 0.1, 0.01], rtol=1e-6)
        np.testing.assert_array_equal(rates[3], np.full(4, np.float32(ETA0)))


def test_staircase_other_c():
    r = (1.0, 0.25, 1 / 16)
    tx = optax.chain(
        optax.sgd(1.0), scale_by_lerac(_toy(3)[1], initial_scales=r, mode="staircase", c=2.0)
    )
    rates, _ = _rates(tx, 6, n=3)
    for t in range(6):
        np.testing.assert_allclose(
            rates[t], reference_multipliers(r, t, mode="staircase", c=2.0), rtol=1e-6
        )


def test_steps_per_tick():
    tx = optax.chain(
        optax.sgd(1.0), scale_by_lerac(_toy()[1], k=2, initial_scales=R4, steps_per_tick=3)
    )
    rates, _ = _rates(tx, 9)
    for t in range(9):
        np.testing.assert_allclose(
            rates[t], reference_multipliers(R4, t // 3, mode="paper", k=2), rtol=1e-6
        )


def test_default_rule_floor_and_head_scale():
    _, depth, _ = _toy(6)
    tx = scale_by_lerac(depth, k=4, decay=0.1, min_scale=1e-3)
    s = tx.init(_toy(6)[0])
    np.testing.assert_allclose(np.asarray(s.scales), [1, 0.1, 1e-2, 1e-3, 1e-3, 1e-3], rtol=1e-6)
    # the authors' separate head value (may exceed the last body unit's)
    tx = scale_by_lerac(depth, k=4, decay=0.1, min_scale=1e-5, head_scale=1e-2)
    s = tx.init(_toy(6)[0])
    np.testing.assert_allclose(np.asarray(s.scales), [1, 0.1, 1e-2, 1e-3, 1e-4, 1e-2], rtol=1e-6)
    assert s.scales.dtype == jnp.float32 and s.count.dtype == jnp.int32


def test_sgd_momentum_matches_pytorch_group_lr():
    """Placed after optax.trace the rate multiplies the velocity, as PyTorch's p -= lr*buf."""
    rng = np.random.default_rng(0)
    gs = rng.normal(size=(8, 4)).astype(np.float32)
    tx = lerac(optax.sgd(ETA0, momentum=0.9), _toy()[1], k=4, initial_scales=R4)
    params = _toy()[0]
    state = tx.init(params)
    buf = np.zeros(4)
    for t in range(8):
        g = {f"d{j}": jnp.asarray(gs[t, j]) for j in range(4)}
        u, state = tx.update(g, state, params)
        buf = 0.9 * buf + gs[t].astype(np.float64)
        ref = -ETA0 * reference_multipliers(R4, t, mode="paper", k=4) * buf
        np.testing.assert_allclose([float(u[f"d{j}"]) for j in range(4)], ref, rtol=2e-6)


# ----------------------------------------------------------------------------- placement


def test_placement_after_adam_not_cancelled_before_adam_cancelled():
    params, depth, _ = _toy(4, (3,))
    g = {f"d{j}": jnp.full((3,), 0.5) for j in range(4)}
    after = optax.chain(optax.adam(ETA0), scale_by_lerac(depth, k=5, initial_scales=R4))
    before = optax.chain(scale_by_lerac(depth, k=5, initial_scales=R4), optax.adam(ETA0))
    plain = optax.adam(ETA0)
    ua, _ = after.update(g, after.init(params), params)
    ub, _ = before.update(g, before.init(params), params)
    up, _ = plain.update(g, plain.init(params), params)
    for j, r in enumerate(R4):
        # last: the deepest unit moves r times the plain Adam step
        np.testing.assert_allclose(ua[f"d{j}"], r * up[f"d{j}"], rtol=1e-6)
        # first: Adam normalises the factor away, every unit moves the plain step
        np.testing.assert_allclose(ub[f"d{j}"], up[f"d{j}"], rtol=1e-4)
    assert abs(float(ua["d3"][0])) < 2e-3 * abs(float(ub["d3"][0]))


# ----------------------------------------------------------------------------- base equality


@functools.cache
def _mlp_problem():
    model = MLP(features=(8, 8), num_classes=3)
    x = jax.random.normal(jax.random.key(1), (16, 5))
    y = jnp.arange(16) % 3
    params = jax.jit(model.init)(jax.random.key(0), x)["params"]

    def loss(p):
        logits = model.apply({"params": p}, x)
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    depth = lerac_depth_labels(model, {"params": params}, x)
    return params, jax.jit(jax.grad(loss)), depth


def _train(tx, params, grad_fn, steps, jit=True):
    state = tx.init(params)
    upd = jax.jit(tx.update) if jit else tx.update
    for _ in range(steps):
        u, state = upd(grad_fn(params), state, params)
        params = optax.apply_updates(params, u)
    return params, state


def test_k0_equals_base_bitwise():
    params, grad_fn, depth = _mlp_problem()
    base = optax.sgd(0.05, momentum=0.9)
    ref, _ = _train(base, params, grad_fn, 10)
    for tx in (lerac(base, depth, k=0), optax.chain(base, scale_by_lerac(depth, k=0))):
        got, _ = _train(tx, params, grad_fn, 10)
        jax.tree.map(np.testing.assert_array_equal, got, ref)


@pytest.mark.parametrize("mode", ["paper", "staircase"])
def test_after_k_updates_equal_base_bitwise(mode):
    params, depth, _ = _toy(4, (2,))
    rng = np.random.default_rng(1)
    gs = [
        {f"d{j}": jnp.asarray(rng.normal(size=2), jnp.float32) for j in range(4)} for _ in range(8)
    ]
    base = optax.adam(1e-2)
    tx = lerac(base, depth, k=3 if mode == "paper" else None, initial_scales=R4, mode=mode)
    sb, st = base.init(params), tx.init(params)
    for t, g in enumerate(gs):
        ub, sb = base.update(g, sb, params)
        ut, st = tx.update(g, st, params)
        if t >= 3:
            jax.tree.map(np.testing.assert_array_equal, ut, ub)


# ----------------------------------------------------------------------------- depth units


def test_resnet_depth_order_blocks_bn_head():
    model = ResNet(stage_features=(2, 4), blocks_per_stage=(6, 6), num_classes=3)
    x = jnp.zeros((1, 8, 8, 1))
    v = jax.eval_shape(lambda: model.init(jax.random.key(0), x, train=False))
    d = lerac_depth_labels(model, v, x, train=False)
    assert set(jax.tree.leaves(d["stem"]) + jax.tree.leaves(d["stem_bn"])) == {0}
    for b in range(12):
        leaves = jax.tree.leaves(d[f"ResBlock_{b}"])
        assert set(leaves) == {b + 1}, b  # convs, batch norms and projection together
    assert "proj_bn" in d["ResBlock_6"] and d["ResBlock_6"]["proj_bn"]["scale"] == 7
    assert d["ResBlock_10"]["Conv_0"]["kernel"] > d["ResBlock_2"]["Conv_0"]["kernel"]
    assert set(jax.tree.leaves(d["head"])) == {13}
    assert "batch_stats" not in d
    # the transformation scales each unit by its own factor
    params = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), v["params"])
    tx = scale_by_lerac(d, k=10, decay=0.5, min_scale=1e-3)
    g = jax.tree.map(jnp.ones_like, params)
    u, s = tx.update(g, tx.init(params), params)
    assert s.scales.shape == (14,)
    r = np.maximum(0.5 ** np.arange(14), 1e-3)
    jax.tree.map(lambda x, j: np.testing.assert_allclose(x, r[j], rtol=1e-6), u, d)


# ----------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(), "k"),
        (dict(k=2.5), "k"),
        (dict(k=True), "k"),
        (dict(k="3"), "k"),
        (dict(k=3, steps_per_tick=1.5), "steps_per_tick"),
        (dict(k=3, c="10"), "c"),
        (dict(k=3, decay=None), "decay"),
        (dict(k=3, initial_scales="ab"), "initial_scales"),
        (dict(k=3, initial_scales=(1.0, "x")), "initial_scales"),
        (dict(k=3, allow_non_monotone=1), "allow_non_monotone"),
    ],
)
def test_constructor_type_errors(kwargs, match):
    with pytest.raises(TypeError, match=match):
        scale_by_lerac({"a": 0}, **kwargs)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(k=-1), "k"),
        (dict(k=3, mode="linear"), "mode"),
        (dict(k=3, steps_per_tick=0), "steps_per_tick"),
        (dict(k=3, c=0.0), "c"),
        (dict(k=3, c=1.0), "c"),
        (dict(mode="staircase", c=0.5), "c"),
        (dict(mode="staircase", c=float("inf")), "c"),
        (dict(k=3, decay=0.0), "decay"),
        (dict(k=3, decay=1.5), "decay"),
        (dict(k=3, min_scale=0.0), "min_scale"),
        (dict(k=3, min_scale=2.0), "min_scale"),
        (dict(k=3, head_scale=0.0), "head_scale"),
        (dict(k=3, initial_scales=(1.0, 0.0)), "initial_scales"),
        (dict(k=3, initial_scales=(1.0, 1.5)), "initial_scales"),
        (dict(k=3, initial_scales=(1.0, float("nan"))), "initial_scales"),
        (dict(k=3, initial_scales=(0.1, 1.0)), "initial_scales"),
        (dict(k=2, initial_scales=R4, mode="staircase"), "k"),
    ],
)
def test_constructor_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        scale_by_lerac({"a": 0}, **kwargs)


def test_non_monotone_allowed_on_request():
    tx = scale_by_lerac({"a": 0, "b": 1}, k=2, initial_scales=(0.1, 1.0), allow_non_monotone=True)
    s = tx.init({"a": jnp.zeros(()), "b": jnp.zeros(())})
    np.testing.assert_allclose(np.asarray(s.scales), [0.1, 1.0], rtol=1e-6)


@pytest.mark.parametrize(
    "labels,kwargs,match,exc",
    [
        ({"a": 0}, dict(k=2), "no label", ValueError),  # leaf b unlabelled
        ({"a": 0, "b": "x"}, dict(k=2), "label at 'b' must be an int", TypeError),
        ({"a": 0, "b": 1.0}, dict(k=2), "label at 'b' must be an int", TypeError),
        ({"a": 0, "b": -1}, dict(k=2), "label at 'b' must be an int >= 0", ValueError),
        ({"a": 0, "b": 2}, dict(k=2), "depth 1 labels no param", ValueError),
        ({"a": 0, "b": 3}, dict(k=2, initial_scales=(1.0, 0.1)), "outside", ValueError),
        (
            {"a": 0, "b": 1},
            dict(k=2, initial_scales=(1.0, 0.1, 0.01)),
            "initial_scales has 3",
            ValueError,
        ),
        ({"a": 0, "b": 1}, dict(k=2, initial_scales=(1.0,)), "initial_scales", ValueError),
        # derived at init: needs 1
        ({"a": 0, "b": 1}, dict(k=0, mode="staircase"), "k", ValueError),
    ],
)
def test_init_errors(labels, kwargs, match, exc):
    tx = scale_by_lerac(labels, **kwargs)
    with pytest.raises(exc, match=match):
        tx.init({"a": jnp.zeros(()), "b": jnp.zeros(())})


def test_single_depth_warns_plain_warmup(caplog):
    with caplog.at_level(logging.WARNING, logger="optax_multirate.lerac"):
        scale_by_lerac({"a": 0}, k=2, initial_scales=(0.1,)).init({"a": jnp.zeros(())})
    assert "plain warmup" in caplog.text
    # default scales on one depth: m = 1, identity
    rates, _ = _rates(optax.chain(optax.sgd(1.0), scale_by_lerac(_toy(1)[1], k=3)), 2, n=1)
    np.testing.assert_array_equal(rates, np.ones((2, 1), np.float32))


def test_lerac_errors():
    with pytest.raises(TypeError, match="inner"):
        lerac(0.1, {"a": 0}, k=1)
    with pytest.raises(TypeError, match="num_depths"):
        lerac_schedules(0.1, k=2)
    with pytest.raises(TypeError, match="num_depths"):
        lerac_schedules(0.1, 2.0, k=2)
    with pytest.raises(ValueError, match="num_depths"):
        lerac_schedules(0.1, 0, k=2)
    with pytest.raises(TypeError, match="k"):
        lerac_schedules(0.1, 3)


# ----------------------------------------------------------------------------- jit, traces


@pytest.mark.parametrize("mode", ["paper", "staircase"])
def test_jit_equals_no_jit(mode):
    params, grad_fn, depth = _mlp_problem()
    tx = lerac(
        optax.adam(1e-2),
        depth,
        k=4 if mode == "paper" else None,
        mode=mode,
        decay=0.1,
        steps_per_tick=2,
    )
    a, sa = _train(tx, params, grad_fn, 6, jit=True)
    b, sb = _train(tx, params, grad_fn, 6, jit=False)
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-7), a, b)
    np.testing.assert_allclose(sa[1].scales, sb[1].scales, rtol=1e-6)


def test_no_recompile_over_steps_and_stable_state():
    params, depth, grads = _toy(4, (2,))
    tx = lerac(optax.sgd(0.1, momentum=0.9), depth, k=5)
    traces = []

    @jax.jit
    def update(g, s, p):
        traces.append(1)
        return tx.update(g, s, p)

    s = tx.init(params)
    shapes = jax.tree.map(lambda x: (x.shape, x.dtype), s)
    for _ in range(30):
        _, s = update(grads, s, params)
    assert len(traces) == 1
    assert jax.tree.map(lambda x: (x.shape, x.dtype), s) == shapes
    assert int(s[1].count) == 30


def test_keeps_leaf_dtype():
    params = {"a": jnp.zeros(3, jnp.bfloat16), "b": jnp.zeros(3, jnp.float32)}
    tx = scale_by_lerac({"a": 0, "b": 1}, k=2)
    u, _ = tx.update(jax.tree.map(jnp.ones_like, params), tx.init(params), params)
    assert u["a"].dtype == jnp.bfloat16 and u["b"].dtype == jnp.float32


# ----------------------------------------------------------------------------- optax routes


@pytest.mark.parametrize("mode", ["paper", "staircase"])
def test_schedules_route_equals_scale_by_lerac(mode):
    params, grad_fn, depth = _mlp_problem()
    k = 6 if mode == "paper" else None
    kw = dict(k=k, mode=mode, decay=0.1, steps_per_tick=2)
    lr = optax.cosine_decay_schedule(0.05, 40)
    scheds = lerac_schedules(lr, 3, **kw)
    routed = optax.partition(
        {
            j: optax.inject_hyperparams(optax.sgd)(learning_rate=s, momentum=0.9)
            for j, s in enumerate(scheds)
        },
        depth,
    )
    direct = lerac(optax.sgd(lr, momentum=0.9), depth, **kw)
    a, _ = _train(routed, params, grad_fn, 14)
    b, _ = _train(direct, params, grad_fn, 14)
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-7), a, b)
    np.testing.assert_allclose(
        [float(s(3)) for s in scheds],
        [float(lr(3)) * m for m in reference_multipliers((1, 0.1, 0.01), 1, mode=mode, k=k)],
        rtol=1e-6,
    )


def test_inside_inject_hyperparams():
    params, depth, grads = _toy(4, (2,))
    make = optax.inject_hyperparams(
        scale_by_lerac, static_args=("param_labels", "k", "steps_per_tick")
    )
    tx = make(depth, k=4, decay=0.1)
    plain = scale_by_lerac(depth, k=4, decay=0.1)
    s, sp = tx.init(params), plain.init(params)
    step = jax.jit(tx.update)
    for _ in range(3):
        u, s = step(grads, s, params)
        up, sp = plain.update(grads, sp, params)
        jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-6), u, up)
    # decay is a live hyperparameter
    s.hyperparams["decay"] = jnp.asarray(0.5, jnp.float32)
    u, s = step(grads, s, params)
    ref = reference_multipliers(0.5 ** np.arange(4), 3, mode="paper", k=4)
    np.testing.assert_allclose([float(u[f"d{j}"][0]) for j in range(4)], ref, rtol=1e-6)


def test_multisteps_counts_real_updates():
    params, depth, grads = _toy(4)
    tx = optax.MultiSteps(lerac(optax.sgd(1.0), depth, k=4, initial_scales=R4), every_k_schedule=2)
    s = tx.init(params)
    for _ in range(6):
        u, s = tx.update(grads, s, params)
    assert int(s.inner_opt_state[1].count) == 3
    np.testing.assert_allclose(
        [-float(u[f"d{j}"]) for j in range(4)],
        reference_multipliers(R4, 2, mode="paper", k=4),
        rtol=1e-6,
    )


def test_apply_if_finite_skip_does_not_advance():
    params, depth, grads = _toy(4)
    tx = optax.apply_if_finite(lerac(optax.sgd(1.0), depth, k=4, initial_scales=R4), 5)
    s = tx.init(params)
    _, s = tx.update(grads, s, params)
    bad = dict(grads, d0=jnp.asarray(jnp.nan))
    _, s = tx.update(bad, s, params)
    assert int(s.inner_state[1].count) == 1
    u, s = tx.update(grads, s, params)
    np.testing.assert_allclose(
        [-float(u[f"d{j}"]) for j in range(4)],
        reference_multipliers(R4, 1, mode="paper", k=4),
        rtol=1e-6,
    )


def test_inside_partition_with_full_label_tree():
    params, depth, grads = _toy(4)
    route = {"d0": "lerac", "d1": "lerac", "d2": "lerac", "d3": "head"}
    tx = optax.partition(
        {"lerac": lerac(optax.sgd(1.0), depth, k=2, initial_scales=R4), "head": optax.sgd(1.0)},
        route,
    )
    s = tx.init(params)
    u, s = tx.update(grads, s, params)
    # depth 3 lives in the other branch; the branch still sees n = 4 from the label tree
    np.testing.assert_allclose([-float(u[f"d{j}"]) for j in range(4)], [1, 0.1, 0.01, 1], rtol=1e-6)


# ----------------------------------------------------------------------------- train steps


def _flax_setup():
    model = MLP(features=(8, 8), num_classes=3)
    x = np.random.default_rng(0).normal(size=(16, 5)).astype(np.float32)
    batch = {"x": x, "y": (np.arange(16) % 3).astype(np.int32)}
    params, model_state = train_lib.init_model(model, jax.random.key(0), x[:1])
    depth = lerac_depth_labels(model, params, x[:1], train=False)
    tx = lerac(optax.sgd(0.05, momentum=0.9), depth, k=4)
    return model, tx, params, model_state, batch


def _run_steps(step, params, opt_state, model_state, batch, n, start=0):
    for i in range(start, start + n):
        params, opt_state, model_state, _ = step(
            params, opt_state, model_state, batch, jax.random.key(i)
        )
    return params, opt_state, model_state


def test_phased_step_equals_full_gradient_step():
    model, tx, params, model_state, batch = _flax_setup()
    host = train_lib.make_train_step(model, tx)
    full = train_lib.make_train_step(model, tx, dispatch="full")
    a = _run_steps(host, params, tx.init(params), model_state, batch, 6)
    b = _run_steps(full, params, tx.init(params), model_state, batch, 6)
    jax.tree.map(np.testing.assert_array_equal, a, b)
    assert isinstance(host.phased, PhasedStep) and host.phased.num_compiles == 1


def test_resume_from_checkpoint_bitwise(tmp_path):
    model, tx, params, model_state, batch = _flax_setup()
    step = train_lib.make_train_step(model, tx)
    ref = _run_steps(step, params, tx.init(params), model_state, batch, 8)
    mid = _run_steps(step, params, tx.init(params), model_state, batch, 3)
    train_lib.save_checkpoint(tmp_path / "ckpt", mid)
    template = (params, tx.init(params), model_state)
    restored = train_lib.restore_checkpoint(tmp_path / "ckpt", template)
    assert isinstance(restored[1][1], LeracState) and int(restored[1][1].count) == 3
    got = _run_steps(step, *restored, batch, 5, start=3)
    jax.tree.map(np.testing.assert_array_equal, got, ref)
