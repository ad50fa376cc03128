"""Flax NNX models end to end: every method through ``nnx.Optimizer`` and through the library's
phased step (same numbers), the phased step's masks, ``fit`` with evaluation, checkpoints and a
bitwise resume, and the examples of ``docs/nnx.md``."""

import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import optax_multirate as om
from optax_multirate.data import Split
from optax_multirate.train import evaluation

ROOT = pathlib.Path(__file__).resolve().parents[1]


class CNN(nnx.Module):
    """conv -> batch norm -> relu -> dropout -> mean -> dense -> head."""

    def __init__(self, rngs):
        self.conv1 = nnx.Conv(1, 4, (3, 3), rngs=rngs)
        self.bn1 = nnx.BatchNorm(4, rngs=rngs)
        self.drop = nnx.Dropout(0.5, rngs=rngs)
        self.dense = nnx.Linear(4, 6, rngs=rngs)
        self.head = nnx.Linear(6, 3, rngs=rngs)

    def __call__(self, x):
        x = nnx.relu(self.bn1(self.conv1(x)))
        x = self.drop(x).mean((1, 2))
        return self.head(nnx.relu(self.dense(x)))


_rng = np.random.default_rng(0)
X = _rng.normal(size=(8, 6, 6, 1)).astype(np.float32)
Y = _rng.integers(0, 3, 8).astype(np.int32)
BATCH = {"x": X, "y": Y}
KEY = jax.random.PRNGKey(0)


def _model():
    return CNN(nnx.Rngs(0))


def _loss(model):
    return optax.softmax_cross_entropy_with_integer_labels(model(X), Y).mean()


def _slow_fast(model):
    return om.rule_labels(nnx.state(model, nnx.Param), {"fast": "^head/"}, default="slow")


def _weight_bias(model):
    return om.weight_bias_labels(nnx.state(model, nnx.Param))


def _depth(model):
    return om.depth_labels(model, nnx.state(model, nnx.Param), X[:1])


def _sgd():
    return optax.sgd(0.1, momentum=0.9)


def _value(t):
    return {"value": jnp.float32(0.5 + 0.1 * (t % 3))}


# name -> (model -> tx with labels built from nnx.state(model, nnx.Param), extra of step t)
METHODS = {
    "freeze_schedule": lambda m: om.freeze_schedule(_sgd(), _slow_fast(m), {"slow": (1, 3)}),
    "multirate": lambda m: om.multirate(optax.sgd(0.1), optax.sgd(0.2), 2, _slow_fast(m)),
    "multirate_sgd": lambda m: om.multirate_sgd(0.1, 2, _slow_fast(m)),
    "multirate_subgroups": lambda m: om.multirate_subgroups(0.1, 2, 0.5, seed=0, momentum=0.9),
    "multirate_timescales": lambda m: om.multirate_timescales(0.1, (1, 2)),
    "wus": lambda m: om.wus(_sgd(), _weight_bias(m), window=2, warmup=0, force_windows=(1,)),
    "scale_by_lerac": lambda m: optax.chain(_sgd(), om.scale_by_lerac(_depth(m), k=3)),
    "lerac": lambda m: om.lerac(_sgd(), _depth(m), k=3),
    "two_regimes": lambda m: om.two_regimes(_sgd(), optax.adam(1e-2), switch_step=2),
    "two_regimes_sgd": lambda m: om.two_regimes_sgd(0.1, total_steps=4, large_fraction=0.5),
    "growth_lr_adaptation": lambda m: optax.chain(_sgd(), om.growth_lr_adaptation(2)),
}
EXTRA = {"wus": _value}
STEPS = 3


def _data(x):
    """A key array's key data; any other array as it is."""
    return jax.random.key_data(x) if jnp.issubdtype(x.dtype, jax.dtypes.prng_key) else x


def _pure(state):
    """A state as a dict of numpy arrays (keys as their key data)."""
    return jax.tree.map(lambda x: np.asarray(_data(x)), nnx.to_pure_dict(nnx.as_pure(state)))


def _close(a, b):
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=2e-5, atol=2e-6), a, b)


def test_methods_cover_every_transformation():
    assert sorted(METHODS) == sorted(om.TRANSFORMATIONS)


@pytest.mark.parametrize("name", sorted(METHODS))
def test_method_through_nnx_optimizer_and_phased_step(name):
    """nnx.Optimizer with labels from nnx.state, and the library's step on the split of a
    twin module: the same params and batch statistics after every step (both eager, to keep
    the test fast; the jitted step is checked against a hand-written one below)."""
    ref, model = _model(), _model()
    opt = nnx.Optimizer(ref, METHODS[name](ref), wrt=nnx.Param)
    tx = METHODS[name](model)
    step = om.make_train_step(model, tx, jit=False)
    params, model_state = om.init_model(model)
    opt_state = tx.init(params)
    start = _pure(params)
    extra = EXTRA.get(name, lambda t: {})
    for t in range(STEPS):
        opt.update(ref, nnx.grad(_loss)(ref), **extra(t))
        params, opt_state, model_state, _ = step(
            params, opt_state, model_state, BATCH, KEY, **extra(t)
        )
        _close(_pure(nnx.state(ref, nnx.Param)), _pure(params))
        _close(_pure(nnx.state(ref, nnx.BatchStat))["bn1"], _pure(model_state)["bn1"])
    assert _pure(model_state)["drop"]["rngs"]["count"] == STEPS  # dropout drew every step
    moved = jax.tree.map(lambda a, b: bool(np.any(a != b)), start, _pure(params))
    assert all(jax.tree.leaves(moved)), moved
    # the module itself is untouched
    jax.tree.map(np.testing.assert_array_equal, _pure(nnx.state(model, nnx.Param)), start)


def test_multirate_fast_steps_differentiate_only_the_head():
    model = _model()
    tx = om.multirate_sgd(0.1, 3, _slow_fast(model))
    step = om.make_train_step(model, tx)
    params, model_state = om.init_model(model)
    opt_state = tx.init(params)
    used = []
    for _ in range(6):
        params, opt_state, model_state, _ = step(params, opt_state, model_state, BATCH, KEY)
        used.append(step.phased.last_mask)
    paths = om.labels.leaf_paths(params)
    head_only = tuple(p.startswith("head/") for p in paths)
    full = (True,) * len(paths)
    assert used == [full, head_only, head_only] * 2
    assert step.phased.masks == [full, head_only] and step.phased.num_compiles == 2
    flops = {m: step.phased.flops(m, params, opt_state, model_state, BATCH, KEY) for m in used}
    assert flops[head_only] < 0.8 * flops[full]


def test_nnx_step_equals_a_hand_written_split_merge_step():
    """The step is the split/merge step a user would write: value_and_grad over the params."""
    model, tx = _model(), optax.sgd(0.1)
    graphdef, params, rest = nnx.split(_model(), nnx.Param, ...)
    params, rest = nnx.as_pure(params), nnx.as_pure(rest)  # new Variables at each merge

    @jax.jit
    def manual(params, rest):
        def loss_fn(p):
            m = nnx.merge(graphdef, p, rest)
            loss = optax.softmax_cross_entropy_with_integer_labels(m(X), Y).mean()
            return loss, nnx.split(m, nnx.Param, ...)[2]

        (loss, rest), g = jax.value_and_grad(loss_fn, has_aux=True)(params)
        updates, _ = tx.update(g, tx.init(params), params)
        return optax.apply_updates(params, updates), rest

    p, s = om.init_model(model)
    got_p, _, got_s, _ = om.make_train_step(model, tx)(p, tx.init(p), s, BATCH, KEY)
    want_p, want_s = manual(params, rest)
    _close(_pure(want_p), _pure(got_p))
    _close(_pure(nnx.state(nnx.merge(graphdef, want_p, want_s), nnx.BatchStat))["bn1"],
           _pure(got_s)["bn1"])  # fmt: skip


class Flagged(nnx.Module):
    """A module told its mode by a keyword, with no Dropout or BatchNorm."""

    def __init__(self, rngs):
        self.lin = nnx.Linear(3, 2, rngs=rngs)

    def __call__(self, x, *, training):
        return self.lin(x) * (2.0 if training else 1.0)


def test_call_modes_and_keywords():
    model = _model()
    params, model_state = om.init_model(model)
    # default: eval mode as model.eval() sets it (running averages, no dropout)
    twin = nnx.clone(model)
    twin.eval()
    want = float(optax.softmax_cross_entropy_with_integer_labels(twin(X), Y).mean())
    assert om.evaluate(model, params, model_state, [BATCH])["loss"] == pytest.approx(want)
    assert not model.drop.deterministic and not model.bn1.use_running_average  # untouched
    # call=None: the module as it is (here in train mode: batch statistics, dropout)
    as_is = om.evaluate(model, params, model_state, [BATCH], call=None)["loss"]
    assert as_is != pytest.approx(want)
    # a keyword, by name or through a callable
    flagged = Flagged(nnx.Rngs(0))
    p, s = om.init_model(flagged)
    xy = [(np.ones((2, 3), np.float32), np.zeros(2, np.int32))]
    sq = lambda out, b: jnp.mean(out**2)
    ev = lambda call: om.evaluate(flagged, p, s, xy, loss=sq, call=call)["loss"]
    assert ev("training") == ev(lambda train: {"training": train}) > 0
    assert ev(lambda train: {"training": True}) == pytest.approx(4 * ev("training"))
    step = om.make_train_step(flagged, optax.sgd(0.1), loss=sq, call="training")
    _, _, _, metrics = step(p, optax.sgd(0.1).init(p), s, xy[0], KEY)
    assert float(metrics["loss"]) == pytest.approx(4 * ev("training"))
    with pytest.raises(TypeError, match="model must be a flax.linen.Module or a flax.nnx"):
        om.init_model(lambda x: x)
    with pytest.raises(TypeError, match="needs rng and sample_x"):
        om.init_model(om.models.MLP((2,)))


# --------------------------------------------------------------------------- the loop


def _split(n=32, seed=1):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 6, 6, 1)).astype(np.float32)
    return Split(x=x, y=(x.mean((1, 2, 3)) > 0).astype(np.int32))


def test_fit_evaluate_checkpoint_and_bitwise_resume(tmp_path):
    model, split = _model(), _split()
    tx = om.multirate_sgd(0.1, 2, _slow_fast(model))
    step = om.make_train_step(model, tx)

    def run(directory, resume=False, **kw):
        cbs = [om.Evaluate({"test": split}, batch_size=16), om.Checkpoint(directory, resume=resume)]
        return om.fit(model, tx, split, epochs=2, batch_size=8, step=step, callbacks=cbs, **kw)

    sizes = evaluation._metric_sums._cache_size()
    full = run(tmp_path / "a")
    assert [r["epoch"] for r in full.history] == [1, 2] and 0 <= full.final_accuracy <= 1
    assert evaluation._metric_sums._cache_size() - sizes == 1  # one eval program, both epochs
    assert full.num_compiles == 2 and set(full.masks) == {"full", "phase:2/8"}
    assert _pure(full.model_state)["drop"]["rngs"]["count"] == 8
    stopped = run(tmp_path / "b", max_steps=5)  # inside the second epoch
    assert stopped.steps == 5 and om.train.latest_checkpoint(tmp_path / "b") == 5
    resumed = run(tmp_path / "b", resume=True)
    assert resumed.steps == 8 and resumed.num_compiles == 0
    for got, want in [(resumed.params, full.params), (resumed.model_state, full.model_state),
                      (resumed.opt_state, full.opt_state)]:  # fmt: skip
        jax.tree.map(np.testing.assert_array_equal, *(jax.tree.map(_data, t) for t in (got, want)))
    untimed = lambda h: [{k: v for k, v in r.items() if k != "train_time_s"} for r in h]
    assert untimed(resumed.history) == untimed(full.history)
    # the trained values back into the module: it now computes what evaluate reported
    nnx.update(model, full.params, full.model_state)
    model.eval()
    logits = model(split.x)
    acc = float(jnp.mean(jnp.argmax(logits, -1) == split.y))
    assert acc == pytest.approx(full.history[-1]["test_accuracy"])


def test_fit_builds_its_own_step_and_refuses_a_foreign_model():
    model = _model()
    res = om.fit(model, optax.sgd(0.1), _split(16), epochs=1, batch_size=8)
    assert res.steps == 2 and res.num_compiles == 1
    assert isinstance(res.params, nnx.State) and sorted(res.params) == sorted(
        nnx.state(model, nnx.Param)
    )
    with pytest.raises(TypeError, match="model must be a flax.linen.Module or a flax.nnx"):
        om.fit(object(), optax.sgd(0.1), _split(16), epochs=1, batch_size=8)


# --------------------------------------------------------------------------- docs/nnx.md


def test_step_cost_cnn_is_the_same_model_in_linen_and_nnx():
    """The Linen-vs-NNX step-cost figure compares one model written in the two APIs."""
    from benchmarks.step_cost import NNXCNN

    linen = om.models.CNN(features=(4, 8))
    x = np.random.default_rng(0).random((2, 12, 12, 1), dtype=np.float32)
    params, _ = om.init_model(linen, KEY, x[:1])
    module = NNXCNN((4, 8), rngs=nnx.Rngs(1))
    convs = {i: params[f"Conv_{i}"] for i in range(2)}
    nnx.update(module, nnx.State({"convs": convs, "head": params["head"]}))
    want = linen.apply({"params": params}, x, train=False)
    np.testing.assert_allclose(module(x), want, rtol=1e-5, atol=1e-6)
