"""Tests for WUS / WUS+LR: the monitor against a hand-written reference of the spec, holding
of weights and their optimizer state, the phased step, jit, resume, errors."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optax_multirate as om
from optax_multirate import train as train_lib
from optax_multirate.models import CNN, MLP
from optax_multirate.phases import PhasedStep
from optax_multirate.wus import WusState, wus, wus_labels, wus_phase

# ----------------------------------------------------------------------------- reference


def reference_monitor(
    values,
    *,
    threshold=0.005,
    window=2,
    acc=1,
    patience=1,
    warmup=3,
    max_windows=None,
    lr_factor=None,
    min_lr_scale=0.0,
    force=(),
):
    """Spec §1 rules 2-6 and WUS+LR, as plain Python over float32 numbers.

    Returns one dict per update call: the phase the call was gated with and the state after.
    """
    f32 = np.float32
    count, total, prev = 0, f32(0), f32(np.nan)
    periods = flat = skip = windows = skipped = 0
    lr = f32(1.0)
    out = []
    for x in values:
        gate_phase = int(skip > 0)
        skipped += gate_phase
        gate_lr = lr
        total = f32(total + f32(x))
        count += 1
        if count == acc:
            v = f32(total / f32(acc))
            count, total = 0, f32(0)
            periods += 1
            if skip > 0:
                skip -= 1  # rule 5: no judgement inside a window
            else:
                d = f32(v - prev)
                is_flat = bool(np.isfinite(d)) and abs(float(d)) < threshold
                flat = flat + 1 if is_flat else 0
                opens = flat >= patience and periods >= warmup
                opens = opens and (max_windows is None or windows < max_windows)
                if opens or periods in force:
                    skip, flat, windows = window, 0, windows + 1
                    if lr_factor is not None:
                        lr = f32(max(f32(lr * f32(lr_factor)), f32(min_lr_scale)))
            prev = v
        out.append(
            dict(
                gate_phase=gate_phase,
                gate_lr=float(gate_lr),
                phase=int(skip > 0),
                skip_left=skip,
                periods=periods,
                flat_count=flat,
                windows=windows,
                skipped_steps=skipped,
                lr_scale=float(lr),
                prev_value=float(prev),
            )
        )
    return out


def _tiny():
    params = {"Dense_0": {"kernel": jnp.ones((2, 3)), "bias": jnp.zeros(3)}}
    return params, wus_labels(params)


def _values(seed, n, nan_rate=0.0):
    """An accuracy-like walk with plateaus; steps far from the 0.005 threshold."""
    rng = np.random.default_rng(seed)
    steps = rng.choice([0.0, 0.001, 0.002, 0.02, 0.05, -0.03], size=n)
    v = 0.3 + np.cumsum(steps)
    if nan_rate:
        v[rng.random(n) < nan_rate] = np.nan
    return v.astype(np.float32)


def _run_monitor(tx, values, params):
    state = tx.init(params)
    g = jax.tree.map(jnp.ones_like, params)
    update = jax.jit(tx.update)
    got = []
    for v in values:
        u, state = update(g, state, params, value=v)
        got.append((u, state))
    return got


CONFIGS = [
    dict(),
    dict(patience=2, window=1, warmup=0),
    dict(acc=3, window=3, warmup=2),
    dict(max_windows=2, window=1),
    dict(lr_factor=0.5, min_lr_scale=0.2, window=1, warmup=1),
    dict(threshold=0.0),
    dict(force=(2, 9, 10), threshold=0.0, window=2),
    dict(force=(5,), patience=2, lr_factor=0.7),
]


@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items()))
@pytest.mark.parametrize("nan_rate", [0.0, 0.15])
def test_monitor_matches_reference(cfg, nan_rate):
    cfg = dict(cfg)
    acc = cfg.pop("acc", 1)
    force = cfg.pop("force", ())
    values = _values(len(cfg) * 7 + int(nan_rate * 100), 90, nan_rate)
    params, labels = _tiny()
    tx = wus(
        optax.sgd(1.0),
        labels,
        accumulation_size=acc,
        force_windows=force or None,
        **cfg,
    )
    ref = reference_monitor(values, acc=acc, force=force, **cfg)
    got = _run_monitor(tx, values, params)
    assert sum(r["gate_phase"] for r in ref) > 0 or cfg.get("threshold") == 0.0
    for t, (r, (u, s)) in enumerate(zip(ref, got)):
        state = {k: np.asarray(getattr(s, k)) for k in r if hasattr(s, k)}
        for k in ("skip_left", "periods", "flat_count", "windows", "skipped_steps"):
            assert int(state[k]) == r[k], (t, k)
        assert int(wus_phase(s)) == r["phase"], t
        np.testing.assert_array_equal(state["lr_scale"], np.float32(r["lr_scale"]))
        np.testing.assert_allclose(state["prev_value"], r["prev_value"], rtol=1e-6)
        # The update of this call is gated by the incoming phase, scaled by the incoming lr.
        w = float(u["Dense_0"]["kernel"][0, 0])
        b = float(u["Dense_0"]["bias"][0])
        assert w == (0.0 if r["gate_phase"] else -r["gate_lr"]), t
        assert b == -r["gate_lr"], t
    if cfg.get("threshold") == 0.0 and not force:
        assert ref[-1]["windows"] == 0


def test_nan_values_never_open_a_window():
    params, labels = _tiny()
    tx = wus(optax.sgd(1.0), labels, warmup=0, accumulation_size=2)
    got = _run_monitor(tx, [np.nan] * 40 + [np.inf, -np.inf] * 10, params)
    assert all(int(s.windows) == 0 and int(wus_phase(s)) == 0 for _, s in got)
    # A flat finite run opens one at once; the same with every other value NaN does not.
    got = _run_monitor(tx, [0.5, 0.5] * 3, params)
    assert int(got[-1][1].windows) == 1
    got = _run_monitor(tx, [0.5, np.nan] * 10, params)
    assert int(got[-1][1].windows) == 0


def test_warmup_and_window_length():
    params, labels = _tiny()
    tx = wus(optax.sgd(1.0), labels, warmup=4, window=3)
    phases = [int(wus_phase(s)) for _, s in _run_monitor(tx, [0.5] * 12, params)]
    # Flat from period 2 on, but no window before 4 periods; then 3 periods skipped, at least
    # one full period, and the next window.
    assert phases == [0, 0, 0, 1, 1, 1, 0, 1, 1, 1, 0, 1]


# ----------------------------------------------------------------- holding weights and state


def test_weights_and_their_optimizer_state_unchanged_in_a_window():
    params = {
        "Conv_0": {"kernel": jnp.ones((3, 3, 1, 2)), "bias": jnp.zeros(2)},
        "head": {"kernel": jnp.ones((2, 4)), "bias": jnp.zeros(4)},
    }
    tx = wus(
        optax.adamw(0.1, weight_decay=0.1),
        wus_labels(params),
        threshold=0.0,
        force_windows=(3,),
        window=2,
        accumulation_size=2,
    )
    state = tx.init(params)
    rng = np.random.default_rng(0)
    update = jax.jit(tx.update)
    snaps = []
    for _ in range(12):
        g = jax.tree.map(lambda x: jnp.asarray(rng.normal(size=x.shape), x.dtype), params)
        u, state = update(g, state, params, value=0.5)
        params = optax.apply_updates(params, u)
        snaps.append((params, state))
    # Window: periods 4..5 = steps 6..9 (0-based); phase 1 after step 5 through step 8.
    assert [int(wus_phase(s)) for _, s in snaps] == [0] * 5 + [1] * 4 + [0] * 3
    before_p, before_s = snaps[5]
    # The held group: partition's MaskedState > adamw's state (count, moments).
    hold = lambda s: s.inner_state.inner_states["hold"].inner_state  # noqa: E731
    keep = lambda s: s.inner_state.inner_states["keep"]  # noqa: E731
    for p, s in snaps[6:10]:
        for name in ("Conv_0", "head"):
            np.testing.assert_array_equal(p[name]["kernel"], before_p[name]["kernel"])
            assert not np.array_equal(p[name]["bias"], before_p[name]["bias"])
        for a, b in zip(jax.tree.leaves(hold(s)), jax.tree.leaves(hold(before_s))):
            np.testing.assert_array_equal(a, b)
    assert not all(
        np.array_equal(a, b)
        for a, b in zip(jax.tree.leaves(keep(snaps[9][1])), jax.tree.leaves(keep(before_s)))
    )
    assert not np.array_equal(snaps[10][0]["head"]["kernel"], before_p["head"]["kernel"])
    assert int(snaps[-1][1].skipped_steps) == 4 and int(snaps[-1][1].steps) == 12


def test_nan_in_unread_weight_gradients_changes_nothing():
    params, labels = _tiny()
    tx = wus(optax.sgd(0.1, momentum=0.9), labels, threshold=0.0, force_windows=(1,))
    s = tx.init(params)
    g = jax.tree.map(jnp.ones_like, params)
    _, s = tx.update(g, s, params, value=0.5)
    assert int(wus_phase(s)) == 1
    g_nan = {"Dense_0": {"kernel": jnp.full((2, 3), jnp.nan), "bias": jnp.ones(3)}}
    u, s2 = jax.jit(tx.update)(g_nan, s, params, value=0.5)
    assert bool(jnp.all(u["Dense_0"]["kernel"] == 0)) and bool(
        jnp.all(jnp.isfinite(u["Dense_0"]["bias"]))
    )
    assert all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(s2))


def test_equals_inner_optimizer_without_windows():
    params = {"a": {"kernel": jnp.arange(6.0).reshape(2, 3), "bias": jnp.ones(3)}}
    ref_tx, tx = optax.adam(0.01), wus(optax.adam(0.01), wus_labels(params), threshold=0.0)
    p1, s1, p2, s2 = params, ref_tx.init(params), params, tx.init(params)
    for i in range(5):
        g = jax.tree.map(lambda x, i=i: jnp.sin(x + i), p1)
        u, s1 = ref_tx.update(g, s1, p1)
        p1 = optax.apply_updates(p1, u)
        u, s2 = tx.update(jax.tree.map(lambda x, i=i: jnp.sin(x + i), p2), s2, p2, value=0.1 * i)
        p2 = optax.apply_updates(p2, u)
    for a, b in zip(jax.tree.leaves(p1), jax.tree.leaves(p2)):
        np.testing.assert_allclose(a, b, rtol=1e-6)


def test_custom_keep_label_and_composition():
    params = {"body": {"kernel": jnp.ones(3), "bias": jnp.ones(3)}, "head": {"kernel": jnp.ones(2)}}
    labels = om.rule_labels(params, {"head": "^head/"}, default="weight")
    tx = wus(optax.sgd(1.0), labels, keep="head", threshold=0.0, force_windows=(1,))
    s = tx.init(params)
    assert s.tag.reads[1] == (False, False, True)
    g = jax.tree.map(jnp.ones_like, params)
    _, s = tx.update(g, s, params, value=0.0)
    u, _ = tx.update(g, s, params, value=0.0)
    assert float(u["body"]["bias"][0]) == 0.0 and float(u["head"]["kernel"][0]) == -1.0
    # In a chain, inside partition, under inject_hyperparams.
    base = wus(optax.sgd(1.0), wus_labels(params), threshold=0.0, force_windows=(1,))
    part = optax.partition({"b": base, "h": optax.sgd(1.0)}, {"body": "b", "head": "h"})
    chain = optax.chain(optax.clip(10.0), part)
    s = chain.init(params)
    assert int(wus_phase(s)) == 0
    _, s = chain.update(g, s, params, value=0.0)
    u, s = jax.jit(chain.update)(g, s, params, value=0.0)
    assert float(u["body"]["kernel"][0]) == 0.0 and float(u["body"]["bias"][0]) == -1.0
    mask = om.needed_mask(s, params)
    assert mask == (True, False, True)
    inj = optax.inject_hyperparams(
        wus, static_args=("window", "accumulation_size", "patience", "warmup", "max_windows")
    )(optax.sgd(1.0), wus_labels(params), threshold=0.005, lr_factor=0.5, warmup=0, window=1)
    s = inj.init(params)
    for _ in range(2):
        u, s = jax.jit(inj.update)(g, s, params, value=0.5)
    assert int(wus_phase(s)) == 1 and float(s.inner_state.lr_scale) == 0.5


# -------------------------------------------------------------------------- phased steps


def _problem(model):
    rng = np.random.default_rng(0)
    xs = jnp.asarray(rng.random((6, 16, 8, 8, 1)), jnp.float32)
    ys = jnp.asarray(rng.integers(0, 3, (6, 16)))
    params = jax.jit(model.init)(jax.random.key(0), xs[0, :1])["params"]

    def loss(p, x, y):
        logits = model.apply({"params": p}, x)
        ce = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
        return ce, jnp.mean(jnp.argmax(logits, -1) == y)

    return params, loss, xs, ys


@pytest.fixture(scope="module")
def cnn():
    return _problem(CNN(features=(4, 8), num_classes=3))


@pytest.fixture(scope="module")
def mlp():
    return _problem(MLP(features=(8,), num_classes=3))


def _train(step, params, state, xs, ys, n, start=0):
    masks = []
    for t in range(start, start + n):
        out = step(params, state, xs[t % 6], ys[t % 6])
        params, state = out.params, out.opt_state
        masks.append(step.last_mask)
    return params, state, masks


def _wus_forced(params, **kw):
    return wus(
        optax.sgd(0.1, momentum=0.9),
        wus_labels(params),
        window=1,
        accumulation_size=2,
        threshold=0.0,
        force_windows=(2, 4),
        **kw,
    )


def _step(loss, tx, **kw):
    return PhasedStep(loss, tx, has_aux=True, extra_args_fn=lambda _, a: {"value": a}, **kw)


def test_phased_step_equals_full_gradient_step(cnn):
    params, loss, xs, ys = cnn
    tx = _wus_forced(params, lr_factor=0.5)
    phased = _step(loss, tx)
    p1, s1, masks = _train(phased, params, tx.init(params), xs, ys, 12)
    p2, s2, _ = _train(_step(loss, tx, dispatch="full"), params, tx.init(params), xs, ys, 12)
    for a, b in zip(jax.tree.leaves((p1, s1)), jax.tree.leaves((p2, s2))):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
    bias_only = tuple(p.endswith("bias") for p in om.labels.leaf_paths(params))
    full = (True,) * 6
    assert masks == [full] * 4 + [bias_only] * 2 + [full] * 2 + [bias_only] * 2 + [full] * 2
    assert phased.num_compiles == 2 and int(s1.skipped_steps) == 4


def test_jit_and_no_jit_agree():
    params = {"a": {"kernel": jnp.ones((3, 2)), "bias": jnp.zeros(2)}, "b": {"scale": jnp.ones(2)}}
    tx = wus(optax.adam(0.1), wus_labels(params, norm_scale="bias"), window=1, warmup=1,
             threshold=0.02, lr_factor=0.5, accumulation_size=2)  # fmt: skip
    out = []
    for update in (tx.update, jax.jit(tx.update)):
        p, s, phases = params, tx.init(params), []
        for t, v in enumerate(_values(5, 12)):
            g = jax.tree.map(lambda x, t=t: jnp.cos(x * (t + 1)), p)
            u, s = update(g, s, p, value=v)
            p = optax.apply_updates(p, u)
            phases.append(int(wus_phase(s)))
        out.append((p, s, phases))
    assert out[0][2] == out[1][2] and 1 in out[0][2]
    for a, b in zip(jax.tree.leaves(out[0][:2]), jax.tree.leaves(out[1][:2])):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)


def test_no_retrace_across_many_steps():
    params, labels = _tiny()
    tx = wus(optax.sgd(0.1), labels, warmup=0, window=1)
    traces = []

    @jax.jit
    def update(g, s, p, v):
        traces.append(1)
        return tx.update(g, s, p, value=v)

    s = tx.init(params)
    for v in _values(3, 50):
        _, s = update(params, s, params, v)
    assert len(traces) == 1 and int(s.windows) > 0


def test_resume_mid_window_is_bitwise(mlp, tmp_path):
    params, loss, xs, ys = mlp
    tx = _wus_forced(params, lr_factor=0.5)
    step = _step(loss, tx)
    p_ref, s_ref, _ = _train(step, params, tx.init(params), xs, ys, 12)
    p, s, _ = _train(step, params, tx.init(params), xs, ys, 5)
    assert int(wus_phase(s)) == 1 and int(s.count) == 1  # mid-window, mid-period
    train_lib.save_checkpoint(tmp_path / "ckpt", (p, s))
    template = (jax.tree.map(jnp.zeros_like, params), tx.init(params))
    p, s = train_lib.restore_checkpoint(tmp_path / "ckpt", template)
    assert isinstance(s, WusState) and int(s.skip_left) == 1
    p, s, _ = _train(_step(loss, tx), p, s, xs, ys, 7, start=5)
    for a, b in zip(jax.tree.leaves((p, s)), jax.tree.leaves((p_ref, s_ref))):
        np.testing.assert_array_equal(a, b)


# --------------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    "kwargs, name",
    [
        (dict(threshold=-0.1), "threshold"),
        (dict(threshold=math.inf), "threshold"),
        (dict(threshold=math.nan), "threshold"),
        (dict(window=0), "window"),
        (dict(accumulation_size=0), "accumulation_size"),
        (dict(patience=0), "patience"),
        (dict(warmup=-1), "warmup"),
        (dict(lr_factor=1.0), "lr_factor"),
        (dict(lr_factor=0.0), "lr_factor"),
        (dict(min_lr_scale=1.5), "min_lr_scale"),
        (dict(max_windows=-1), "max_windows"),
        (dict(force_windows=(0,)), "force_windows"),
        (dict(force_windows=(2, 2)), "force_windows"),
        (dict(keep=()), "keep"),
    ],
)
def test_constructor_errors(kwargs, name):
    _, labels = _tiny()
    with pytest.raises(ValueError, match=name):
        wus(optax.sgd(0.1), labels, **kwargs)


@pytest.mark.parametrize(
    "kwargs, name",
    [
        (dict(threshold="0.1"), "threshold"),
        (dict(window=2.0), "window"),
        (dict(window=True), "window"),
        (dict(patience=None), "patience"),
        (dict(max_windows=1.5), "max_windows"),
        (dict(force_windows=(1.0,)), "force_windows"),
        (dict(force_windows=3), "force_windows"),
    ],
)
def test_constructor_type_errors(kwargs, name):
    _, labels = _tiny()
    with pytest.raises(TypeError, match=name):
        wus(optax.sgd(0.1), labels, **kwargs)


def test_init_and_update_errors():
    params, labels = _tiny()
    with pytest.raises(ValueError, match="norm_scale"):
        wus_labels(params, norm_scale="gamma")
    no_bias = {"Dense_0": {"kernel": jnp.ones(2)}}
    with pytest.raises(ValueError, match="nothing would train in a window.*keep="):
        wus(optax.sgd(0.1), wus_labels(no_bias)).init(no_bias)
    only_bias = {"Dense_0": {"bias": jnp.ones(2)}}
    with pytest.raises(ValueError, match="nothing would be skipped"):
        wus(optax.sgd(0.1), wus_labels(only_bias)).init(only_bias)
    with pytest.raises(ValueError, match="labels"):
        wus(optax.sgd(0.1), {"Dense_0": {"kernel": "weight"}}).init(params)
    with pytest.raises(ValueError, match="labels.*'wieght'"):
        bad = {"Dense_0": {"kernel": "wieght", "bias": "bias"}}
        wus(optax.sgd(0.1), bad).init(params)
    tx = wus(optax.sgd(0.1), labels)
    s = tx.init(params)
    with pytest.raises(TypeError, match="value"):
        tx.update(params, s, params)
    with pytest.raises(TypeError, match="value"):
        tx.update(params, s, params, value=jnp.ones(2))
    with pytest.raises(ValueError, match="WusState"):
        wus_phase(optax.sgd(0.1).init(params))
    forced = wus(optax.sgd(0.1), labels, force_windows=(1,), threshold=0.0)
    _, s = forced.update(params, forced.init(params), params)  # value optional here
    assert int(wus_phase(s)) == 1
