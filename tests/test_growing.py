"""Tests for optax_multirate.growing: schedule, function-preserving growth, grown state, LRA."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from optax_multirate import train as train_lib
from optax_multirate.data import Split
from optax_multirate.growing import (
    GrowthLRAState,
    GrowthSchedule,
    fit_grown,
    grow,
    grow_variables,
    growth_lr_adaptation,
)
from optax_multirate.growing.rate_adaptation import sq_norms_of
from optax_multirate.models import CNN, MLP, ResNet
from optax_multirate.phases import freeze_schedule

KEY = jax.random.key(0)


def _variables(model, x):
    """Init, then one train-mode pass so that running statistics are not trivial."""
    v = model.init(KEY, x, train=False)
    if "batch_stats" in v:
        _, upd = model.apply(v, x, train=True, mutable=["batch_stats"])
        v = {**v, **upd}
    return v


def _shapes(model, x):
    return jax.eval_shape(functools.partial(model.init, train=False), KEY, x)


@functools.partial(jax.jit, static_argnums=(0, 3))
def _apply(model, v, x, train):
    if "batch_stats" in v:
        return model.apply(v, x, train=train, mutable=["batch_stats"])[0]
    return model.apply(v, x, train=train)


def _tx(num_stages=3):
    return optax.chain(optax.trace(0.9), growth_lr_adaptation(num_stages), optax.scale(-0.1))


MODELS = {
    "mlp": (lambda w, bn: MLP(features=w, batch_norm=bn), (6, 7)),
    "cnn": (lambda w, bn: CNN(features=w, dense=(6,), batch_norm=bn), (6, 8, 8, 1)),
    "resnet": (
        lambda w, bn: ResNet(stage_features=w, blocks_per_stage=(2, 1), batch_norm=bn),
        (6, 8, 8, 1),
    ),
}


def _grown(name, bn, w0=(4, 6), w1=(8, 10), **kw):
    make, shape = MODELS[name]
    x = jax.random.normal(jax.random.key(3), shape)
    m0, m1 = make(w0, bn), make(w1, bn)
    v = _variables(m0, x)
    tx = _tx()
    v2, st = grow(v, tx.init(v["params"]), 0, key=jax.random.key(1),
                  next_shapes=_shapes(m1, x), optimizer=tx, **kw)  # fmt: skip
    return m0, m1, v, v2, st, x, tx


# ------------------------------------------------------------------------------ schedule


def test_schedule_plan_a_and_paper():
    s = GrowthSchedule((16, 32, 64), total_epochs=16, m0=0.25, p_c=0.5, t0=1)
    assert s.widths == (
        (4, 8, 16), (6, 12, 24), (10, 18, 36), (14, 28, 54), (16, 32, 64)
    )  # fmt: skip
    assert s.epochs == (1, 2, 3, 5, 5) and s.boundaries == (1, 3, 6, 11)
    assert abs(s.predicted_cost_ratio() - 0.63) < 0.01
    paper = GrowthSchedule((64,), total_epochs=200, t0=10)  # p_c = p_T = 0.2, CIFAR-100
    assert paper.num_stages == 9 and sum(paper.epochs[:-1]) == 161 and paper.epochs[-1] == 39
    assert paper.epochs[:4] == (10, 12, 14, 17) and paper.widths[0] == (16,)
    for sched in (s, paper, GrowthSchedule((15, 7), total_epochs=50, t0=2)):
        inc = np.diff(np.asarray(sched.widths), axis=0)
        assert (inc >= 0).all() and (inc % 2 == 0).all()
        assert sched.widths[-1] == sched.final_widths
    assert GrowthSchedule((8,), total_epochs=3, m0=1.0).epochs == (3,)


def test_schedule_multiple_of_rounds_early_widths_up_and_keeps_growth_working():
    kw = dict(total_epochs=20, m0=0.25, p_c=0.5, t0=3, p_t=0.0)
    s = GrowthSchedule((64, 40), multiple_of=16, **kw)
    plain = GrowthSchedule((64, 40), **kw)
    assert s.widths[-1] == (64, 40) and plain.epochs == (3, 3, 3, 3, 8)
    # 34 -> 48 capped at 40: stages 3 and 4 have the same widths and become one
    assert s.widths == ((16, 16), (32, 16), (48, 32), (64, 40)) and s.epochs == (3, 3, 3, 11)
    assert all(a >= b for w, p in zip(s.widths, plain.widths) for a, b in zip(w, p))
    assert all(a != b for a, b in zip(s.widths, s.widths[1:]))
    inc = np.diff(np.asarray(s.widths), axis=0)
    assert (inc >= 0).all() and (inc % 2 == 0).all()  # pairs, as grow(pairing=True) needs
    odd = GrowthSchedule((63,), even=False, multiple_of=8, **kw)  # 16, 24, 36, 54, 63 plain
    assert odd.widths == ((16,), (24,), (40,), (56,), (63,))
    # widths 4, 6 -> 8, 8: one growth fewer, and the grown training runs
    split = _toy_split()
    sched = GrowthSchedule((8,), total_epochs=6, m0=0.5, p_c=0.2, t0=1, p_t=0.0, multiple_of=8)
    small = GrowthSchedule((8,), total_epochs=6, m0=0.5, p_c=0.2, t0=1, p_t=0.0)
    assert small.widths == ((4,), (6,), (8,)) and small.epochs == (1, 2, 3)  # 4, 6, 6, 8, 8
    assert sched.widths == ((8,),) and sched.epochs == (6,)
    sched = GrowthSchedule((16,), total_epochs=6, m0=0.25, p_c=1.0, t0=1, multiple_of=8)
    assert sched.widths == ((8,), (16,)) and sched.epochs == (3, 3)  # 4 and 8 -> one stage
    res = fit_grown(lambda w: MLP(w, num_classes=2), _tx(sched.num_stages), split, split, sched,
                    batch_size=32, seed=0)  # fmt: skip
    assert [g["stage"] for g in res.growths] == [1] and res.growths[0]["max_logit_change"] < 1e-4


@pytest.mark.parametrize(
    "kwargs,arg",
    [
        (dict(multiple_of=0), "multiple_of"),
        (dict(multiple_of=5), "multiple_of"),  # odd, with even=True
        (dict(final_widths=(63,), multiple_of=8), "multiple_of"),  # an odd final width
        (dict(m0=0.0), "m0"),
        (dict(m0=1.5), "m0"),
        (dict(p_c=0.0), "p_c"),
        (dict(t0=0), "t0"),
        (dict(p_t=-1.0), "p_t"),
        (dict(total_epochs=100, t0=8, p_c=0.2), "total_epochs"),  # CIFAR-10 figures: 134
        (dict(final_widths=(0,)), "final_widths"),
    ],
)
def test_schedule_errors(kwargs, arg):
    base = dict(final_widths=(64,), total_epochs=16, m0=0.25, p_c=0.5, t0=1)
    with pytest.raises(ValueError, match=arg):
        GrowthSchedule(**{**base, **kwargs})


# ------------------------------------------------------------------------ growth exactness


@pytest.mark.parametrize("bn", [False, True])
@pytest.mark.parametrize("name", sorted(MODELS))
def test_growth_is_function_preserving(name, bn):
    m0, m1, v, v2, _, x, _ = _grown(name, bn)
    for train in (False, True):
        a, b = _apply(m0, v, x, train), _apply(m1, v2, x, train)
        # train-mode batch norm is exact up to eps / var (eps does not scale)
        tol = 1e-4 if (bn and train) else 1e-5
        np.testing.assert_allclose(b, a, rtol=tol, atol=tol * float(jnp.abs(a).max()))
    got = jax.tree.map(jnp.shape, v2)
    want = jax.tree.map(lambda s: s.shape, _shapes(m1, x))
    assert got == want


@pytest.mark.parametrize(
    "kw",
    [
        dict(rescale=None),
        dict(rescale="measured_old"),
        dict(rescale="measured_new", new_init="mup_sq"),
        dict(new_init=lambda key, shape, dtype: np.full(shape, 0.5, np.float32)),
        dict(momentum="carry"),
    ],
)
def test_growth_options_stay_exact(kw):
    for bn in (False, True):
        m0, m1, v, v2, _, x, _ = _grown("cnn", bn, **kw)
        a, b = _apply(m0, v, x, False), _apply(m1, v2, x, False)
        np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-5 * float(jnp.abs(a).max()))


def test_pairs_cancel_and_kernels_are_paired():
    _, _, v, v2, _, _, _ = _grown("mlp", False, rescale=None)
    k = np.asarray(v2["params"]["Dense_1"]["kernel"])  # (8, 10) from (4, 6)
    np.testing.assert_array_equal(k[6:8], -k[4:6])  # [Z, -Z] on new input slots
    np.testing.assert_array_equal(k[:, 8:10], k[:, 6:8])  # [V; V] on new output slots
    np.testing.assert_array_equal(k[:4, :6], v["params"]["Dense_1"]["kernel"])  # no rescale
    np.testing.assert_array_equal(v2["params"]["Dense_1"]["bias"][6:], 0.0)


def test_variance_transfer_and_bn_statistics():
    _, _, v, v2, _, _, _ = _grown("mlp", True)
    s = np.sqrt(4 / 8)  # fan-in of Dense_1 grows 4 -> 8
    old, new = v["params"]["Dense_1"]["kernel"], v2["params"]["Dense_1"]["kernel"]
    np.testing.assert_allclose(new[:4, :6], s * old, rtol=1e-6)
    bs, bs2 = v["batch_stats"]["BatchNorm_1"], v2["batch_stats"]["BatchNorm_1"]
    np.testing.assert_allclose(bs2["mean"][:6], s * bs["mean"], rtol=1e-6)
    np.testing.assert_allclose(bs2["var"][:6] + 1e-5, s**2 * (bs["var"] + 1e-5), rtol=1e-5)
    np.testing.assert_array_equal(bs2["mean"][6:], 0.0)
    np.testing.assert_array_equal(bs2["var"][6:], 1.0)
    np.testing.assert_array_equal(v2["params"]["BatchNorm_1"]["scale"][6:], 1.0)
    # the input layer's fan-in is fixed: no rescale
    np.testing.assert_array_equal(
        v2["params"]["Dense_0"]["kernel"][:, :4], v["params"]["Dense_0"]["kernel"]
    )


@pytest.mark.parametrize("bn", [False, True])
def test_paper_form_scales_logits(bn):
    m0, m1, v, v2, _, x, _ = _grown("mlp", bn, exact=False)
    a, b = _apply(m0, v, x, False), _apply(m1, v2, x, False)
    ratio = np.sqrt(6 / 10)  # the head's own s
    if not bn:
        ratio *= np.sqrt(4 / 8)  # times A_{L-1}: the product of the hidden scales (s_0 = 1)
    np.testing.assert_allclose(b, ratio * a, rtol=1e-5, atol=1e-6)
    assert (jnp.argmax(a, -1) == jnp.argmax(b, -1)).all()


def test_unpaired_growth_allows_odd_increments():
    m0, m1, v, v2, _, x, _ = _grown("mlp", False, w1=(7, 9), pairing=False)
    np.testing.assert_allclose(_apply(m1, v2, x, False), _apply(m0, v, x, False), rtol=1e-5)
    np.testing.assert_array_equal(v2["params"]["head"]["kernel"][6:], 0.0)  # zero fan-out


class _Depthwise(nn.Module):
    """A model in the naming contract with a depthwise convolution."""

    features: int

    @nn.compact
    def __call__(self, x, *, train=True):
        del train
        x = nn.relu(nn.Conv(self.features, (3, 3), name="Conv_0")(x))
        x = nn.relu(
            nn.Conv(self.features, (3, 3), feature_group_count=self.features, name="Conv_1")(x)
        )
        return nn.Dense(3, name="head")(jnp.mean(x, axis=(1, 2)))


def test_depthwise_conv_grows_exactly():
    x = jax.random.normal(jax.random.key(3), (2, 6, 6, 1))
    v = _Depthwise(4).init(KEY, x)
    v2, _ = grow(v, None, 0, key=KEY, next_shapes=_shapes(_Depthwise(8), x))
    np.testing.assert_allclose(
        _Depthwise(8).apply(v2, x), _Depthwise(4).apply(v, x), rtol=1e-5, atol=1e-6
    )


def test_pair_noise_breaks_the_pairs_a_little():
    m0, m1, v, v2, _, x, _ = _grown("mlp", False, pair_noise=1e-3)
    k = np.asarray(v2["params"]["Dense_1"]["kernel"])
    assert 0 < np.abs(k[:, 8:10] - k[:, 6:8]).max() < 1e-2
    a, b = _apply(m0, v, x, False), _apply(m1, v2, x, False)
    assert 0 < float(jnp.abs(a - b).max()) < 1e-2 * float(jnp.abs(a).max())


def test_same_key_same_growth():
    *_, v2, _, _, _ = _grown("cnn", True)
    *_, v3, _, _, _ = _grown("cnn", True)
    jax.tree.map(np.testing.assert_array_equal, v2, v3)
    make, shape = MODELS["cnn"]
    x = jnp.ones(shape)
    v = _variables(make((4, 6), True), x)
    v4, _ = grow(v, None, 0, key=jax.random.key(9), next_shapes=_shapes(make((8, 10), True), x))
    assert not np.array_equal(v4["params"]["Conv_1"]["kernel"], v2["params"]["Conv_1"]["kernel"])


# ------------------------------------------------------------------------------ grown state


def test_grown_state_shapes_values_and_births():
    _, _, v, v2, st, _, tx = _grown("mlp", False)
    want = tx.init(v2["params"])
    assert jax.tree.structure(st) == jax.tree.structure(want)
    assert jax.tree.map(jnp.shape, st) == jax.tree.map(jnp.shape, want)
    lra = st[1]
    assert isinstance(lra, GrowthLRAState) and bool(lra.lra_stale)
    b = np.asarray(lra.birth["Dense_1"]["kernel"])
    assert b.dtype == np.int8
    assert (b[:4, :6] == 0).all() and (b[:4, 6:] == 1).all() and (b[4:] == 1).all()
    assert (np.asarray(lra.birth["head"]["bias"]) == 0).all()
    # a second growth: stage 1 -> 2 gives new elements 2, keeps 1s
    make, shape = MODELS["mlp"]
    x = jnp.ones(shape)
    v3, st3 = grow(v2, st, 1, key=KEY, next_shapes=_shapes(make((10, 12), False), x),
                   optimizer=tx)  # fmt: skip
    b3 = np.asarray(st3[1].birth["Dense_1"]["kernel"])
    assert (b3[:8, :10] == b).all() and (b3[8:] == 2).all() and (b3[:, 10:] == 2).all()
    assert v3["params"]["Dense_1"]["kernel"].shape == (10, 12)


@pytest.mark.parametrize("momentum", ["reset", "carry"])
def test_momentum_reset_or_carry_and_counts_survive(momentum):
    make, shape = MODELS["mlp"]
    x = jnp.ones(shape)
    m0, m1 = make((4, 6), False), make((8, 10), False)
    v = _variables(m0, x)
    labels = {k: jax.tree.map(lambda _, k=k: "head" if k == "head" else "body", sub)
              for k, sub in v["params"].items()}  # fmt: skip
    sched = optax.cosine_decay_schedule(0.1, 100)
    inner = optax.chain(
        optax.trace(0.9), optax.scale_by_schedule(sched), growth_lr_adaptation(3), optax.scale(-1)
    )
    tx = optax.partition(
        {"body": freeze_schedule(inner, labels, {"body": (0, 1)}), "head": optax.adam(1e-3)},
        labels,
    )
    state = tx.init(v["params"])
    g = jax.tree.map(jnp.ones_like, v["params"])
    update = jax.jit(tx.update)
    for _ in range(3):
        _, state = update(g, state, v["params"])
    v2, st = grow(v, state, 0, key=KEY, next_shapes=_shapes(m1, x), optimizer=tx,
                  momentum=momentum)  # fmt: skip
    body = st.inner_states["body"].inner_state
    old_body = state.inner_states["body"].inner_state
    assert int(body.count) == 3 and int(body.inner_state[1].count) == 3  # schedule continues
    assert int(st.inner_states["head"].inner_state[0].count) == 3  # adam count
    tr, old_tr = body.inner_state[0].trace["Dense_1"]["kernel"], old_body.inner_state[0].trace
    assert tr.shape == (8, 10)
    if momentum == "reset":
        np.testing.assert_array_equal(tr, 0.0)
    else:
        np.testing.assert_array_equal(tr[:4, :6], old_tr["Dense_1"]["kernel"])
        np.testing.assert_array_equal(tr[4:], 0.0)
    # the head kernel grew too; its adam moments follow the same rule
    mu = st.inner_states["head"].inner_state[0].mu["head"]["kernel"]
    assert mu.shape == (10, 10)
    # the state works with the grown params
    _, st = jax.jit(tx.update)(jax.tree.map(jnp.ones_like, v2["params"]), st, v2["params"])


def test_symmetry_breaks_after_one_step():
    _, m1, _, v2, st, x, tx = _grown("mlp", False)
    params, model_state = v2["params"], {}
    batch = {"x": np.asarray(x), "y": np.arange(6, dtype=np.int32) % 10}
    step = train_lib.make_train_step(m1, tx)
    p, st, _, metrics = step(params, st, model_state, batch, KEY)
    p, st, _, metrics2 = step(p, st, model_state, batch, KEY)
    assert float(metrics2["loss"]) != float(metrics["loss"])
    k = np.asarray(p["Dense_1"]["kernel"])
    assert not np.allclose(k[:, 8:10], k[:, 6:8])  # V copies got opposite gradients
    assert not np.allclose(k[6:8], -k[4:6])  # Z copies got equal gradients


# -------------------------------------------------------------------------------- errors


def test_grow_errors():
    make, shape = MODELS["resnet"]
    x = jnp.ones(shape)
    m0 = make((4, 6), False)
    v = _variables(m0, x)
    shapes = _shapes(make((8, 10), False), x)
    tx = _tx(3)
    st = tx.init(v["params"])
    ok = dict(key=KEY, next_shapes=shapes)
    with pytest.raises(ValueError, match="stage"):
        grow(v, None, -1, **ok)
    with pytest.raises(ValueError, match="stage"):
        grow(v, st, 2, optimizer=tx, **ok)  # num_stages = 3 from the LRA state
    with pytest.raises(TypeError, match="key"):
        grow(v, None, 0, key=None, next_shapes=shapes)
    with pytest.raises(ValueError, match="optimizer"):
        grow(v, st, 0, **ok)
    with pytest.raises(ValueError, match="opt_state"):
        grow(v, _tx(4).init(v["params"]), 0, optimizer=optax.sgd(0.1), **ok)
    with pytest.raises(ValueError, match="grows nothing"):
        grow(v, None, 0, key=KEY, next_shapes=_shapes(m0, x))
    with pytest.raises(ValueError, match="next_shapes"):  # shrinks
        grow(v, None, 0, key=KEY, next_shapes=_shapes(make((2, 6), False), x))
    with pytest.raises(ValueError, match="pairing"):
        grow(v, None, 0, key=KEY, next_shapes=_shapes(make((7, 10), False), x))
    bad = jax.tree.map(lambda s: s, shapes)
    bad["params"]["stem"]["kernel"] = jax.ShapeDtypeStruct((5, 3, 1, 8), jnp.float32)
    with pytest.raises(ValueError, match="next_shapes"):  # a non-growth axis
        grow(v, None, 0, key=KEY, next_shapes=bad)
    bad = jax.tree.map(lambda s: s, shapes)
    bad["params"]["ResBlock_2"]["proj"]["kernel"] = jax.ShapeDtypeStruct((1, 1, 8, 12), jnp.float32)
    with pytest.raises(ValueError, match="residual stream"):
        grow(v, None, 0, key=KEY, next_shapes=bad)
    weird = {"params": {**v["params"], "LayerNorm_0": {"scale": jnp.ones(3)}}}
    with pytest.raises(ValueError, match="naming contract"):
        grow(weird, None, 0, key=KEY, next_shapes={"params": {**shapes["params"],
             "LayerNorm_0": {"scale": jax.ShapeDtypeStruct((3,), jnp.float32)}}})  # fmt: skip
    for kw, arg in [
        (dict(rescale="sqrt"), "rescale"),
        (dict(momentum="keep"), "momentum"),
        (dict(new_init="he"), "new_init"),
        (dict(head_exponent=0.0), "head_exponent"),
    ]:
        with pytest.raises(ValueError, match=arg):
            grow(v, None, 0, **ok, **kw)


@pytest.mark.parametrize(
    "kwargs,arg",
    [
        (dict(num_stages=0), "num_stages"),
        (dict(num_stages=3, eps=0.0), "eps"),
        (dict(num_stages=3, clip=(2.0, 1.0)), "clip"),
        (dict(num_stages=3, clip=(0.0, 1.0)), "clip"),
        (dict(num_stages=3, refresh="epoch"), "refresh"),
        (dict(num_stages=3, scope="unit"), "scope"),
        (dict(num_stages=3, apply_to="bias"), "apply_to"),
        (dict(num_stages=3, scope="per_layer", apply_to="all"), "apply_to"),
    ],
)
def test_lra_errors(kwargs, arg):
    with pytest.raises(ValueError, match=arg):
        growth_lr_adaptation(**kwargs)


def test_lra_needs_params():
    tx = growth_lr_adaptation(2)
    p = {"kernel": jnp.ones(2)}
    with pytest.raises(ValueError, match="params"):
        tx.update(p, tx.init(p), None)


# ---------------------------------------------------------------------- growth of any model


@pytest.mark.parametrize("name", ["cnn", "resnet"])
def test_grow_variables_finds_what_grow_knows_by_name(name):
    """On the library's models with batch norm the generic path, which reads no names, finds
    the same pairs, variance-transfer scales and running statistics: old blocks bitwise."""
    make = {"cnn": lambda w: CNN(features=w, batch_norm=True),
            "resnet": lambda w: MODELS["resnet"][0](w, True)}[name]  # fmt: skip
    x = jax.random.normal(jax.random.key(3), (6, 8, 8, 1))
    m0, m1 = make((4, 6)), make((8, 10))
    v, tx = _variables(m0, x), _tx()
    shapes = _shapes(m1, x)
    st = tx.init(v["params"])
    ref, ref_st = grow(v, st, 0, key=KEY, next_shapes=shapes, optimizer=tx)
    out, out_st = grow_variables(m0, v, shapes, x, train=False, key=KEY, opt_state=st,
                                 optimizer=tx)  # fmt: skip
    for a, b, o in zip(jax.tree.leaves(ref), jax.tree.leaves(out), jax.tree.leaves(v)):
        block = tuple(slice(0, n) for n in np.shape(o))
        np.testing.assert_array_equal(np.asarray(a)[block], np.asarray(b)[block])
    # births, momentum; the stage norms (new units drawn apart) each from its own params
    lra = lambda s: s[1]  # noqa: E731  (trace, LRA, scale)
    for st_, params in ((ref_st, ref["params"]), (out_st, out["params"])):
        want = sq_norms_of(params, lra(st_).birth, 3, per_layer=False, host=True)
        np.testing.assert_array_equal(lra(st_).sq_norms, want)
        traced = jax.jit(lambda p, b: sq_norms_of(p, b, 3, per_layer=False))(params, lra(st_).birth)
        np.testing.assert_allclose(traced, want, rtol=1e-5)  # the in-step sums: the same norms
    strip = lambda s: optax.tree_utils.tree_set(s, sq_norms=jnp.zeros(3))  # noqa: E731
    for a, b in zip(jax.tree.leaves(strip(ref_st)), jax.tree.leaves(strip(out_st))):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_allclose(_apply(m1, out, x, False), _apply(m0, v, x, False), atol=1e-5)


class _Deep(nn.Module):
    """No naming contract: ``layers_0..``, ``out``; ``pairing=False`` and shapes only."""

    width: int

    @nn.compact
    def __call__(self, x):
        for i in range(3):
            x = nn.tanh(nn.Dense(self.width, name=f"layers_{i}")(x))
        return nn.Dense(2, name="out")(x)


def test_grow_variables_unpaired_and_from_shapes():
    x = jax.random.normal(KEY, (3, 4))
    m0, m1 = _Deep(4), _Deep(7)
    v = m0.init(KEY, x)
    shapes = jax.eval_shape(m1.init, KEY, x)
    g, _ = grow_variables(m0, v, shapes, x, key=jax.random.key(2), pairing=False)
    np.testing.assert_allclose(m1.apply(g, x), m0.apply(v, x), atol=1e-6)
    k = np.asarray(g["params"]["layers_1"]["kernel"])
    assert np.all(k[4:] == 0) and np.any(k[:4, 4:] != 0)  # new units: zero fan-out only
    with pytest.raises(ValueError, match="odd number"):
        grow_variables(m0, v, shapes, x, key=KEY)
    with pytest.raises(ValueError, match="key is needed"):
        grow_variables(m0, v, shapes, x, pairing=False)


class _Flatten(nn.Module):
    width: int

    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Conv(self.width, (3, 3))(x))
        return nn.Dense(2)(x.reshape(x.shape[0], -1))


class _Heads(nn.Module):
    """A hand-written attention: the features split into heads by a reshape."""

    width: int

    @nn.compact
    def __call__(self, x):
        q = nn.Dense(self.width)(x).reshape(*x.shape[:2], 2, self.width // 2)
        a = jax.nn.softmax(jnp.einsum("bqhd,bkhd->bhqk", q, q), -1)
        return nn.Dense(2)(jnp.einsum("bhqk,bkhd->bqhd", a, q).reshape(*x.shape[:2], -1))


class _Softmax(nn.Module):
    width: int

    @nn.compact
    def __call__(self, x):
        return nn.Dense(2)(jax.nn.softmax(nn.Dense(self.width)(x), -1))


class _Tied(nn.Module):
    width: int

    @nn.compact
    def __call__(self, x):
        emb = nn.Embed(5, self.width)
        return emb.attend(nn.relu(emb(x)))


class _Classes(nn.Module):
    width: int

    @nn.compact
    def __call__(self, x):
        return nn.Dense(self.width)(nn.relu(nn.Dense(4)(x)))


@pytest.mark.parametrize(
    "model,shape,match",
    [
        (_Flatten, (1, 4, 4, 1), "reshape .* merges a grown axis"),
        (_Heads, (1, 3, 2), "reshape .* splits or merges a grown axis"),
        (_Softmax, (1, 3), "reduces over a grown axis"),
        (_Tied, None, "tied weights"),
        (_Classes, (1, 3), "output grows"),
    ],
)
def test_grow_variables_refuses_layers_that_cannot_keep_the_function(model, shape, match):
    x = jnp.zeros((1, 3), jnp.int32) if shape is None else jnp.zeros(shape)
    m0, m1 = model(4), model(8)
    with pytest.raises(ValueError, match=match):
        grow_variables(m0, m0.init(KEY, x), m1.init(KEY, x), x)


def test_grow_variables_errors():
    x = jnp.zeros((1, 4))
    m0, m1 = _Deep(4), _Deep(6)
    v, v1 = m0.init(KEY, x), m1.init(KEY, x)
    with pytest.raises(ValueError, match="grows nothing"):
        grow_variables(m0, v, v, x)
    with pytest.raises(ValueError, match="enlarges it"):
        grow_variables(m1, v1, v, x)
    with pytest.raises(ValueError, match="other leaves"):
        grow_variables(m0, v, MLP((6,)).init(KEY, x), x)
    with pytest.raises(ValueError, match="optimizer"):
        grow_variables(m0, v, v1, x, opt_state=optax.sgd(0.1).init(v["params"]))
    with pytest.raises(TypeError, match="model"):
        grow_variables(lambda x: x, v, v1, x)
    with pytest.raises(ValueError, match="rescale"):
        grow_variables(m0, v, v1, x, rescale="measured_old")
    with pytest.raises(ValueError, match="naming contract.*grow_variables"):
        grow(v, None, 0, key=KEY, next_shapes=jax.eval_shape(m1.init, KEY, x))


# ------------------------------------------------------------------------------------- LRA


def _reference_sgd(params, births, grads, lr, num, scope="global", apply_to="kernels"):
    """Hand-written per-slice SGD from the spec (plain numpy loops)."""
    names = sorted(params)
    sq = {n: np.zeros(num) for n in names}
    cnt = {n: np.zeros(num) for n in names}
    for n in names:
        if n.endswith("kernel"):
            for w, b in zip(np.ravel(params[n]), np.ravel(births[n])):
                sq[n][b] += float(w) ** 2
                cnt[n][b] += 1

    def ratios(s, c):
        return [np.sqrt(s[t]) / np.sqrt(max(s[0], 1e-12)) if c[t] else 1.0 for t in range(num)]

    glob = ratios(sum(sq.values()), sum(cnt.values()))
    out = {}
    for n in names:
        r = ratios(sq[n], cnt[n]) if scope == "per_layer" else glob
        scaled = n.endswith("kernel") or apply_to == "all"
        g, b = np.ravel(grads[n]), np.ravel(births[n])
        new = [w - lr * gi * (r[bi] if scaled else 1.0)
               for w, gi, bi in zip(np.ravel(params[n]), g, b)]  # fmt: skip
        out[n] = np.asarray(new, np.float32).reshape(np.shape(params[n]))
    return out


@pytest.mark.parametrize(
    "scope,apply_to", [("global", "kernels"), ("global", "all"), ("per_layer", "kernels")]
)
def test_lra_matches_hand_written_sgd(scope, apply_to):
    rng = np.random.default_rng(0)
    params = {
        "a_kernel": rng.normal(size=(4, 6)).astype(np.float32),
        "b_kernel": rng.normal(size=(6, 3)).astype(np.float32) * 3,
        "c_bias": rng.normal(size=(6,)).astype(np.float32),
    }
    births = {
        "a_kernel": np.pad(np.zeros((2, 4), np.int8), ((0, 2), (0, 2)), constant_values=1),
        "b_kernel": np.pad(np.zeros((4, 3), np.int8), ((0, 2), (0, 0)), constant_values=2),
        "c_bias": np.asarray([0, 0, 1, 1, 2, 2], np.int8),
    }
    # _is_kernel reads the last path component: name leaves like Flax does
    tree = lambda d: {k.split("_")[0]: {k.split("_")[1]: jnp.asarray(v)} for k, v in d.items()}
    flat = lambda t: {f"{a}_{b}": np.asarray(t[a][b]) for a in t for b in t[a]}
    tx = optax.chain(growth_lr_adaptation(4, scope=scope, apply_to=apply_to), optax.scale(-0.1))
    p = tree(params)
    state = tx.init(p)
    state = (state[0]._replace(birth=tree(births)), state[1])
    ref = dict(params)
    update = jax.jit(tx.update)
    for _ in range(3):
        grads = {k: rng.normal(size=v.shape).astype(np.float32) for k, v in params.items()}
        u, state = update(tree(grads), state, p)
        u_eager, _ = tx.update(tree(grads), state, p)
        p = optax.apply_updates(p, u)
        ref = _reference_sgd(ref, births, grads, 0.1, 4, scope, apply_to)
        for k in params:
            np.testing.assert_allclose(flat(p)[k], ref[k], rtol=1e-5, atol=1e-6)
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6), u, u_eager)
    r = np.asarray(state[0].ratios)
    assert r.shape == ((4,) if scope == "global" else (2, 4))
    assert np.all(r[..., 3] == 1.0)  # stage 3 has no elements


def test_lra_refresh_stage_freezes_until_growth():
    tx = growth_lr_adaptation(2, refresh="stage", clip=(0.5, 4.0))
    p = {"k": {"kernel": jnp.asarray([1.0, 2.0])}}
    st = tx.init(p)
    update = jax.jit(tx.update)
    st = st._replace(birth={"k": {"kernel": jnp.asarray([0, 1], jnp.int8)}})
    _, st = update(p, st, p)
    assert float(st.ratios[1]) == 2.0 and not bool(st.lra_stale)
    p2 = {"k": {"kernel": jnp.asarray([1.0, 3.0])}}
    _, st = update(p, st, p2)
    assert float(st.ratios[1]) == 2.0  # frozen within the stage
    st = optax.tree_utils.tree_set(st, lra_stale=jnp.asarray(True))  # what grow does
    p3 = {"k": {"kernel": jnp.asarray([1.0, 9.0])}}
    u, st = update(p, st, p3)
    assert float(st.ratios[1]) == 4.0 and float(u["k"]["kernel"][1]) == 8.0  # clipped


@pytest.mark.parametrize("scope", ["global", "per_layer"])
def test_lra_refresh_growth_equals_stage_through_grow(scope):
    """``refresh="growth"`` reads the norms that init and ``grow`` record: the same updates as
    ``refresh="stage"`` (which computes them in the step), before and after a growth."""
    m0, m1 = MLP(features=(4, 5)), MLP(features=(8, 9))
    x = jax.random.normal(jax.random.key(1), (6, 7))
    grads = lambda p: jax.tree.map(lambda w: jnp.cos(w) + 0.5, p)  # noqa: E731
    txs = {r: optax.chain(optax.trace(0.9), growth_lr_adaptation(3, refresh=r, scope=scope,
                                                                 clip=(0.25, 8.0)),
                          optax.scale(-0.1)) for r in ("stage", "growth")}  # fmt: skip
    runs = {}
    for refresh, tx in txs.items():
        v = _variables(m0, x)
        st, update, seen = tx.init(v["params"]), jax.jit(tx.update), []
        for step in range(5):
            if step == 2:
                v, st = grow(v, st, 0, key=KEY, next_shapes=_shapes(m1, x), optimizer=tx)
            u, st = update(grads(v["params"]), st, v["params"])
            v = {**v, "params": optax.apply_updates(v["params"], u)}
            seen.append((u, st[1].ratios))
        runs[refresh] = seen
    assert not np.all(np.asarray(runs["stage"][-1][1]) == 1.0)  # a stage with its own rate
    for (u_stage, r_stage), (u_growth, r_growth) in zip(runs["stage"], runs["growth"]):
        np.testing.assert_allclose(r_growth, r_stage, rtol=1e-6)
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7),
                     u_growth, u_stage)  # fmt: skip


def test_lra_under_inject_hyperparams():
    tx = optax.inject_hyperparams(growth_lr_adaptation, static_args=("num_stages",))(
        num_stages=2, eps=1e-12
    )
    p = {"k": {"kernel": jnp.asarray([3.0, 4.0])}}
    u, _ = jax.jit(tx.update)(p, tx.init(p), p)
    np.testing.assert_allclose(u["k"]["kernel"], [3.0, 4.0])


# -------------------------------------------------------------------- steps and the loop


def _toy_split(n=96, d=7, seed=0):
    x = np.random.default_rng(seed).normal(size=(n, d)).astype(np.float32)
    return Split(x=x, y=(x[:, 0] + x[:, 1] > 0).astype(np.int32))


def test_fit_grown_one_compile_per_stage_and_exact_growth():
    split = _toy_split()
    sched = GrowthSchedule((8, 8), total_epochs=4, m0=0.5, p_c=0.5, t0=1)
    assert sched.num_stages == 3
    tx = _tx(sched.num_stages)
    model_fn = lambda w: MLP(w, num_classes=2, batch_norm=True)
    cache = {}
    res = fit_grown(model_fn, tx, split, split, sched, batch_size=32, seed=0,
                    measure_flops=True, step_cache=cache)  # fmt: skip
    assert res.num_compiles == [1, 1, 1]
    again = fit_grown(model_fn, tx, split, split, sched, batch_size=32, seed=1, step_cache=cache)
    assert again.num_compiles == [0, 0, 0] and len(cache) == 3
    assert res.steps_per_stage == [3, 6, 3] and len(res.history) == 4
    assert [g["stage"] for g in res.growths] == [1, 2]
    assert all(g["max_logit_change"] < 1e-4 * max(g["max_logit"], 1) for g in res.growths)
    assert res.flops_per_step[0] < res.flops_per_step[1] < res.flops_per_step[2]
    assert res.params["Dense_0"]["kernel"].shape == (7, 8)
    assert len(res.history[-1]["lra_ratios"]) == 3
    assert res.history[-1]["train_time_s"] == pytest.approx(res.train_time_s)


def test_phased_step_matches_full_step_after_growth():
    make, shape = MODELS["mlp"]
    x = jax.random.normal(KEY, shape)
    m0, m1 = make((4, 6), False), make((8, 10), False)
    v = _variables(m0, x)
    labels = {k: jax.tree.map(lambda _, k=k: "head" if k == "head" else "body", sub)
              for k, sub in v["params"].items()}  # fmt: skip
    tx = freeze_schedule(_tx(), labels, {"body": (0, 2)})
    v2, st = grow(v, tx.init(v["params"]), 0, key=KEY, next_shapes=_shapes(m1, x), optimizer=tx)
    batch = {"x": np.asarray(x), "y": np.arange(6, dtype=np.int32) % 10}
    outs = {}
    for dispatch in ("host", "full"):
        step = train_lib.make_train_step(m1, tx, dispatch=dispatch)
        p, s = v2["params"], st
        for _ in range(4):
            p, s, _, _ = step(p, s, {}, batch, KEY)
        outs[dispatch] = p
        if dispatch == "host":
            assert len(step.phased.masks) == 2
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7), *outs.values()
    )


def test_checkpoint_resume_is_bitwise(tmp_path):
    m0, m1, v, v2, st, x, tx = _grown("cnn", True)
    params, model_state = v2["params"], {"batch_stats": v2["batch_stats"]}
    batch = {"x": np.asarray(x), "y": np.arange(6, dtype=np.int32) % 10}
    step = train_lib.make_train_step(m1, tx)
    p, s, ms = params, st, model_state
    for _ in range(2):
        p, s, ms, _ = step(p, s, ms, batch, KEY)
    train_lib.save_checkpoint(tmp_path / "ckpt", (p, s, ms))
    for _ in range(2):
        p, s, ms, _ = step(p, s, ms, batch, KEY)
    template = (params, tx.init(params), model_state)
    rp, rs, rms = train_lib.restore_checkpoint(tmp_path / "ckpt", template)
    for _ in range(2):
        rp, rs, rms, _ = step(rp, rs, rms, batch, KEY)
    jax.tree.map(np.testing.assert_array_equal, (p, s, ms), (rp, rs, rms))
    assert step.phased.num_compiles == 1
