"""Tests for the phase protocol: masks, dispatch, equality with full-gradient steps."""

import logging

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optax_multirate as om
from optax_multirate.models import CNN
from optax_multirate.phases import PhasedStep, find_tags, freeze_schedule, needed_mask


@pytest.fixture(scope="module")
def cnn():
    model = CNN(features=(4, 8), num_classes=3)
    x = jnp.asarray(np.random.default_rng(0).random((16, 8, 8, 1)), jnp.float32)
    y = jnp.asarray(np.random.default_rng(1).integers(0, 3, 16))
    params = model.init(jax.random.key(0), x[:1])["params"]

    def loss(p, x, y):
        logits = model.apply({"params": p}, x)
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    labels = om.rule_labels(params, {"head": "^head/"}, default="body")
    return model, params, labels, loss, x, y


def _maxdiff(a, b):
    return max(
        float(jnp.max(jnp.abs(u - v))) for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b))
    )


def _run(step, params, state, n, *args):
    masks = []
    for _ in range(n):
        out = step(params, state, *args)
        params, state = out.params, out.opt_state
        masks.append(step.last_mask)
    return params, state, masks


def test_head_only_phases_equal_full_gradient_reference(cnn):
    _, params, labels, loss, x, y = cnn
    tx = freeze_schedule(optax.sgd(0.1, momentum=0.9), labels, {"body": (2, 5)})
    p_phased, s_phased, masks = _run(PhasedStep(loss, tx), params, tx.init(params), 7, x, y)
    # Hand reference: full gradients, frozen gradients and updates zeroed on steps 2..4.
    opt = optax.sgd(0.1, momentum=0.9)
    p, s = params, opt.init(params)
    for t in range(7):
        g = jax.grad(loss)(p, x, y)
        frozen = 2 <= t < 5
        g = {
            k: jax.tree.map(jnp.zeros_like, v) if frozen and k != "head" else v
            for k, v in g.items()
        }
        u, s = opt.update(g, s, p)
        u = {
            k: jax.tree.map(jnp.zeros_like, v) if frozen and k != "head" else v
            for k, v in u.items()
        }
        p = optax.apply_updates(p, u)
    assert _maxdiff(p_phased, p) < 1e-6
    head_only = tuple(path.startswith("head") for path in om.labels.leaf_paths(params))
    assert masks[:2] == [(True,) * 6] * 2 and masks[2:5] == [head_only] * 3
    assert masks[5:] == [(True,) * 6] * 2


def test_head_only_program_has_fewer_flops(cnn):
    _, params, labels, loss, x, y = cnn
    # Two phases, so the full program cannot fold the freeze away as a constant.
    tx = freeze_schedule(optax.sgd(0.1), labels, {"body": (0, 5)})
    s = tx.init(params)
    step = PhasedStep(loss, tx)
    mask = needed_mask(s, params)
    assert sum(mask) == 2
    assert step.flops(mask, params, s, x, y) < 0.8 * step.flops((True,) * 6, params, s, x, y)


def test_nan_in_unread_slot_changes_nothing(cnn):
    _, params, labels, _, _, _ = cnn
    tx = freeze_schedule(optax.adam(0.1), labels, {"body": (0, None)})
    s = tx.init(params)
    g = jax.tree.map(jnp.ones_like, params)
    bad = {
        k: jax.tree.map(lambda v: jnp.full_like(v, jnp.nan), v) if k != "head" else v
        for k, v in g.items()
    }
    zero = {k: jax.tree.map(jnp.zeros_like, v) if k != "head" else v for k, v in g.items()}
    u1, s1 = jax.jit(tx.update)(bad, s, params)
    u2, s2 = jax.jit(tx.update)(zero, s, params)
    assert all(bool(jnp.all(jnp.isfinite(v))) for v in jax.tree.leaves(u1))
    assert _maxdiff(u1, u2) == 0.0 and _maxdiff(s1, s2) == 0.0


def test_compiles_equal_distinct_masks(cnn):
    _, params, labels, loss, x, y = cnn
    tx = freeze_schedule(optax.sgd(0.1), labels, {"body": (3, 6)})
    step = PhasedStep(loss, tx)
    _, _, masks = _run(step, params, tx.init(params), 12, x, y)
    assert len(set(masks)) == 2 == len(step.masks) == step.num_compiles
    assert step.compile_time_s > 0


def test_alternating_batch_shapes_compile_once_per_mask_and_shape(caplog):
    """A short batch every other step: each (mask, input shape) compiles exactly once."""
    params = {"body": {"kernel": jnp.ones((3, 4))}, "head": {"kernel": jnp.ones((4, 2))}}
    labels = {"body": {"kernel": "body"}, "head": {"kernel": "head"}}
    tx = freeze_schedule(optax.sgd(0.1), labels, {"body": (3, 6)})  # two phases
    step = PhasedStep(
        lambda p, x: jnp.mean((x @ p["body"]["kernel"] @ p["head"]["kernel"]) ** 2), tx
    )
    xs = [jnp.ones((8, 3)), np.ones((5, 3), np.float32)]  # a jax batch and a short numpy one
    state, seen = tx.init(params), []
    caplog.set_level(logging.WARNING, logger="jax")
    with jax.log_compiles():
        for t in range(10):
            out = step(params, state, xs[t % 2])
            params, state = out.params, out.opt_state
            seen.append((step.last_mask, xs[t % 2].shape))
    logged = [r for r in caplog.records if "XLA compilation of jit(_grad_and_update)" in r.message]
    assert len(set(seen)) == 4 and len(step.masks) == 2
    assert step.num_compiles == len(set(seen)) == len(logged)
    step(params, state, jnp.asarray(xs[1]))  # a jax array of a seen shape: no compile
    assert step.num_compiles == 4
    assert step.flops(step.last_mask, params, state, xs[0]) > 0 and step.num_compiles == 4


def test_switch_dispatch_and_no_jit_match_host(cnn):
    _, params, labels, loss, x, y = cnn
    tx = freeze_schedule(optax.sgd(0.1, momentum=0.9), labels, {"body": (1, 3)})
    s0 = tx.init(params)
    ph, _, _ = _run(PhasedStep(loss, tx), params, s0, 4, x, y)
    sw, _, _ = _run(PhasedStep(loss, tx, dispatch="switch"), params, s0, 4, x, y)
    nj, _, _ = _run(PhasedStep(loss, tx, jit=False), params, s0, 4, x, y)
    assert _maxdiff(ph, sw) < 1e-6
    for a, b in zip(jax.tree.leaves(ph), jax.tree.leaves(nj)):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)


def test_chain_ands_masks_and_wrappers_are_seen_through():
    params = {"a": jnp.ones(2), "b": jnp.ones(2), "c": jnp.ones(2)}
    lab = {"a": "a", "b": "b", "c": "c"}
    tx = optax.chain(
        freeze_schedule(optax.identity(), lab, {"a": (0, None)}),
        freeze_schedule(optax.sgd(0.1), lab, {"b": (0, None)}),
    )
    s = tx.init(params)
    assert len(find_tags(s)) == 2
    assert needed_mask(s, params) == (False, False, True)
    # inject_hyperparams, apply_if_finite and MultiSteps keep inner states as children.
    inj = optax.inject_hyperparams(
        lambda learning_rate: freeze_schedule(optax.sgd(learning_rate), lab, {"a": (0, None)})
    )(learning_rate=0.1)
    for wrapped in (inj, optax.apply_if_finite(inj, 3), optax.MultiSteps(inj, 2)):
        assert needed_mask(wrapped.init(params), params) == (False, True, True)


def test_partition_maps_masks_back_to_full_tree():
    params = {"a": jnp.ones(2), "b": jnp.ones(2), "c": jnp.ones(2)}
    inner_labels = {"a": "x", "b": "y", "c": "y"}
    tx = optax.partition(
        {
            "frozen_part": freeze_schedule(optax.sgd(0.1), inner_labels, {"x": (0, 2)}),
            "plain": optax.sgd(0.1),
        },
        {"a": "frozen_part", "b": "frozen_part", "c": "plain"},
    )
    s = tx.init(params)
    (tag,) = find_tags(s)
    assert tag.paths == ("a", "b")  # the tag sees only its partition's leaves
    assert needed_mask(s, params) == (False, True, True)
    loss = lambda p: jnp.sum(p["a"] ** 2 + 2 * p["b"] ** 2 + 3 * p["c"] ** 2)
    step = PhasedStep(loss, tx)
    p, st = params, s
    for _ in range(3):
        out = step(p, st)
        p, st = out.params, out.opt_state
    assert len(step.masks) == 2
    # a frozen for 2 steps then one step: 1 - 0.1 * 2
    np.testing.assert_allclose(p["a"], 0.8, rtol=1e-6)


def test_aux_and_extra_args_reach_update():
    seen = {}

    def update_fn(u, s, params=None, *, value=None, **_):
        seen["value"] = value
        return u, s

    tx = optax.GradientTransformationExtraArgs(lambda p: optax.EmptyState(), update_fn)
    loss = lambda p, x: (jnp.sum(p * x), {"acc": jnp.float32(0.5)})
    step = PhasedStep(
        loss, tx, has_aux=True, extra_args_fn=lambda loss_, a: {"value": a["acc"]}, jit=False
    )
    out = step(jnp.ones(2), tx.init(jnp.ones(2)), jnp.ones(2))
    assert float(seen["value"]) == 0.5 and float(out.aux["acc"]) == 0.5


def test_errors():
    with pytest.raises(ValueError, match="dispatch"):
        PhasedStep(lambda p: 0.0, optax.sgd(0.1), dispatch="cond")
    with pytest.raises(TypeError, match="tx"):
        PhasedStep(lambda p: 0.0, "sgd")
    with pytest.raises(ValueError, match="frozen"):
        freeze_schedule(optax.sgd(0.1), {}, {"a": (3, 3)})
    with pytest.raises(TypeError, match="frozen"):
        freeze_schedule(optax.sgd(0.1), {}, {"a": (True, 3)})
    with pytest.raises(TypeError, match="frozen"):
        freeze_schedule(optax.sgd(0.1), {}, {"a": (0, 2, 3)})
    with pytest.raises(TypeError, match="frozen"):
        freeze_schedule(optax.sgd(0.1), {}, [("a", (0, 2))])
    with pytest.raises(ValueError, match="frozen"):
        freeze_schedule(optax.sgd(0.1), {}, {})
    tx = freeze_schedule(optax.sgd(0.1), {"a": "x"}, {"z": (0, 1)})
    with pytest.raises(ValueError, match="'z' labels no param"):
        tx.init({"a": jnp.ones(1)})
    with pytest.raises(ValueError, match="no label for the param at 'b'"):
        freeze_schedule(optax.sgd(0.1), {"a": "x"}, {"x": (0, 1)}).init(
            {"a": jnp.ones(1), "b": jnp.ones(1)}
        )
    tx = freeze_schedule(optax.sgd(0.1), {"a": "x", "b": "y"}, {"x": (0, 1)})
    s = tx.init({"a": jnp.ones(1), "b": jnp.ones(1)})
    with pytest.raises(ValueError, match="same params"):
        needed_mask(s, {"a": jnp.ones(1), "c": jnp.ones(1)})
    with pytest.raises(ValueError, match="phases 0..n-1"):
        om.phase_tag({"a": 1.0}, {"a": "x"}, {1: {"x"}})
    with pytest.raises(ValueError, match="phase"):
        om.phase_tag({"a": 1.0}, {"a": "x"}, {0: {"x"}}, phase=1)
    with pytest.raises(TypeError, match="reads"):
        om.phase_tag({"a": 1.0}, {"a": "x"}, [{"x"}])
