"""Models the library did not write, used as their authors wrote them, with no wrapper.

Four styles: a transformer encoder (Linen, ``__call__(x, deterministic)``), a deep MLP whose
layers are named ``layers_0..layers_11`` (Linen, no train argument), a scanned stack
(``nn.scan``) and an NNX CNN with BatchNorm and Dropout. Each goes through the label helpers,
every method of ``optax_multirate.TRANSFORMATIONS`` (a few updates), the loop with ``call=``
and a user loss, a checkpoint resumed bitwise, and growth into its wider twin; the scanned
stack's slices get their own LeRaC rates. The docs' example of scanned stacks runs here too.
"""

from __future__ import annotations

import dataclasses
import pathlib
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import optax_multirate as om
from optax_multirate.data import Split
from optax_multirate.growing import grow_module, grow_variables
from optax_multirate.labels import StackedDepth

ROOT = pathlib.Path(__file__).resolve().parents[1]
KEY = jax.random.key(0)

# ------------------------------------------------------------------------------- the models


class EncoderBlock(nn.Module):
    heads: int
    qkv: int
    mlp: int

    @nn.compact
    def __call__(self, x, deterministic):
        h = nn.LayerNorm(name="ln1")(x)
        attn = nn.MultiHeadDotProductAttention(self.heads, qkv_features=self.qkv,
                                               dropout_rate=0.1, name="attn")  # fmt: skip
        x = x + attn(h, h, deterministic=deterministic)
        h = nn.gelu(nn.Dense(self.mlp, name="fc1")(nn.LayerNorm(name="ln2")(x)))
        h = nn.Dropout(0.1)(h, deterministic=deterministic)
        return x + nn.Dense(x.shape[-1], name="fc2")(h)


class Encoder(nn.Module):
    """A small ViT-style encoder: embedding, a root ``pos_embed``, blocks, norm, head."""

    dim: int = 8
    heads: int = 2
    qkv: int = 8
    mlp: int = 16
    depth: int = 1

    @nn.compact
    def __call__(self, x, deterministic):
        x = nn.Dense(self.dim, name="embed")(x)
        x = x + self.param("pos_embed", nn.initializers.normal(0.02), (1, x.shape[1], self.dim))
        for i in range(self.depth):
            x = EncoderBlock(self.heads, self.qkv, self.mlp, name=f"block_{i}")(x, deterministic)
        return nn.Dense(3, name="head")(nn.LayerNorm(name="norm")(x).mean(1))


class DeepMLP(nn.Module):
    """Dense layers named ``layers_0..layers_{depth-1}`` (the last one the output)."""

    width: int = 8
    depth: int = 6

    @nn.compact
    def __call__(self, x):
        for i in range(self.depth - 1):
            x = nn.relu(nn.Dense(self.width, name=f"layers_{i}")(x))
        return nn.Dense(3, name=f"layers_{self.depth - 1}")(x)


class _Layer(nn.Module):
    @nn.compact
    def __call__(self, x, _):
        return nn.relu(nn.Dense(x.shape[-1])(x)), None


class Scanned(nn.Module):
    """A stem, four layers stacked by ``nn.scan``, a head."""

    width: int = 8

    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Dense(self.width, name="stem")(x))
        stack = nn.scan(_Layer, variable_axes={"params": 0}, split_rngs={"params": True},
                        length=4)  # fmt: skip
        return nn.Dense(3, name="head")(stack(name="layers")(x, None)[0])


class NnxCNN(nnx.Module):
    def __init__(self, features=(4, 8), *, rngs):
        self.conv1 = nnx.Conv(1, features[0], (3, 3), rngs=rngs)
        self.bn1 = nnx.BatchNorm(features[0], rngs=rngs)
        self.conv2 = nnx.Conv(features[0], features[1], (3, 3), rngs=rngs)
        self.bn2 = nnx.BatchNorm(features[1], rngs=rngs)
        self.dropout = nnx.Dropout(0.2, rngs=rngs)
        self.head = nnx.Linear(features[1], 3, rngs=rngs)

    def __call__(self, x):
        x = nnx.max_pool(nnx.relu(self.bn1(self.conv1(x))), (2, 2), (2, 2))
        x = nnx.relu(self.bn2(self.conv2(x)))
        return self.head(self.dropout(x.mean((1, 2))))


@dataclasses.dataclass(frozen=True)
class Case:
    """A Linen model as its author wrote it, and how the library is told to call it."""

    model: nn.Module
    wide: nn.Module  # the wider twin that growth maps into
    shape: tuple[int, ...]  # one example's input shape
    call: Any  # fit's call=
    eval_kwargs: dict
    head: str  # rule of the last layer


CASES = {
    "encoder": Case(Encoder(), Encoder(heads=4, qkv=16, mlp=24), (5, 6),
                    lambda train: {"deterministic": not train}, {"deterministic": True},
                    "^head/"),
    "deep_mlp": Case(DeepMLP(), DeepMLP(12), (6,), None, {}, "^layers_5/"),
    "scanned": Case(Scanned(), Scanned(12), (6,), None, {}, "^head/"),
}  # fmt: skip


def _data(shape: tuple[int, ...], n: int = 32) -> Split:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(n, *shape)).astype(np.float32)
    return Split(
        x=x, y=(x.reshape(n, -1)[:, 0] > 0).astype(np.int32) + (x.reshape(n, -1)[:, 1] > 1)
    )


def _fill(tree: Any, seed: int = 0) -> Any:
    """Values for an abstract tree: normal floats (variances positive), keys, zero counts.

    The tests build models abstractly (``jax.eval_shape``, ``nnx.eval_shape``) and fill them
    here: Flax's truncated-normal initializers compile a program per shape, which would cost
    this file most of its time.
    """
    rng = np.random.default_rng(seed)

    def one(path: Any, s: Any) -> Any:
        if jax.dtypes.issubdtype(s.dtype, jax.dtypes.prng_key):
            return jax.random.key(seed)
        if not jnp.issubdtype(s.dtype, jnp.floating):
            return jnp.zeros(s.shape, s.dtype)
        z = 0.4 * rng.normal(size=s.shape)
        return jnp.asarray(1 + np.abs(z) if om.labels.path_str(path).endswith("var") else z,
                           s.dtype)  # fmt: skip

    return jax.tree_util.tree_map_with_path(one, tree)


def _nnx(make: Callable[[], nnx.Module], seed: int = 0) -> nnx.Module:
    """An NNX model built abstractly, its state filled by :func:`_fill`."""
    graphdef, state = nnx.split(nnx.eval_shape(make))
    return nnx.merge(graphdef, _fill(state, seed))


@pytest.fixture(scope="module")
def init():
    """``name -> (variables, x)``, each model's variables filled once."""
    out = {}
    for name, c in CASES.items():
        x = jnp.asarray(_data(c.shape).x[:4])
        out[name] = (
            _fill(jax.eval_shape(lambda c=c, x=x: c.model.init(KEY, x, **c.eval_kwargs))),
            x,
        )
    return out


def _as_dict(tree: Any) -> Any:
    return nnx.to_pure_dict(tree) if isinstance(tree, nnx.State) else tree


# ------------------------------------------------------------------------------------ labels


def test_labels_encoder_embeddings_before_blocks(init):
    _, x = init["encoder"]
    model = Encoder(depth=2)
    v = jax.eval_shape(lambda: model.init(KEY, x, deterministic=True))  # shapes are enough
    d = om.depth_labels(model, v, x, deterministic=True)
    order = [d["embed"]["kernel"], d["pos_embed"], d["block_0"]["attn"]["query"]["kernel"],
             d["block_1"]["fc2"]["bias"], d["head"]["kernel"]]  # fmt: skip
    assert order == sorted(order) and len(set(order)) == 5
    assert d["block_0"]["ln1"]["scale"] == d["block_0"]["fc1"]["kernel"]  # one unit per block
    wb = om.weight_bias_labels(v["params"])
    assert wb["pos_embed"] == "weight" and wb["block_0"]["attn"]["out"]["bias"] == "bias"


def test_labels_deep_mlp_by_forward_order_not_names(init):
    _, x = init["deep_mlp"]
    model = DeepMLP(depth=12)  # layers_0..layers_11: sorted as strings, layers_10 comes first
    v = jax.eval_shape(lambda: model.init(KEY, x))
    d = om.depth_labels(model, v, x)
    assert [d[f"layers_{i}"]["kernel"] for i in (2, 10, 11)] == [2, 10, 11]
    fast = om.rule_labels(v["params"], {"fast": "^layers_11/"}, default="slow")
    assert fast["layers_11"]["bias"] == "fast" and fast["layers_1"]["kernel"] == "slow"


def test_labels_scanned_stack_per_slice(init):
    v, x = init["scanned"]
    d = om.depth_labels(CASES["scanned"].model, v, x)
    assert d["stem"]["kernel"] == 0 and d["head"]["bias"] == 5
    assert d["layers"]["Dense_0"]["kernel"] == StackedDepth((1, 2, 3, 4), axis=0)
    with pytest.raises(ValueError, match="'layers/Dense_0/bias' is StackedDepth"):
        om.freeze_schedule(optax.sgd(0.1), d, {0: (0, 2)}).init(v["params"])


def test_labels_nnx_cnn():
    model = nnx.eval_shape(lambda: NnxCNN(rngs=nnx.Rngs(0)))  # shapes are enough
    state = nnx.state(model, nnx.Param)
    d = _as_dict(om.depth_labels(model, state, jnp.zeros((1, 8, 8, 1))))
    assert d["conv1"]["kernel"] == d["bn1"]["scale"] == 0 and d["conv2"]["bias"] == 1
    assert d["head"]["kernel"] == 2
    wb = _as_dict(om.weight_bias_labels(state))
    assert wb["bn2"]["bias"] == "bias" and wb["conv1"]["kernel"] == "weight"


# ---------------------------------------------------------------------------- every method


def _methods(params: Any, depth: Any, head: str) -> dict[str, Callable[[], Any]]:
    fast = om.rule_labels(params, {"fast": head}, default="slow")
    frozen = om.rule_labels(params, {"head": head}, default="body")
    wb = om.weight_bias_labels(params)
    sub = om.rule_labels(params, {"random": head + "kernel$"}, default="fast")  # one draw
    sgd = lambda: optax.sgd(0.1, momentum=0.9)  # noqa: E731
    return {
        "freeze_schedule": lambda: om.freeze_schedule(sgd(), frozen, {"body": (0, 2)}),
        "multirate": lambda: om.multirate(sgd(), optax.sgd(0.2), 2, fast),
        "multirate_sgd": lambda: om.multirate_sgd(0.1, 2, fast),
        "multirate_subgroups": lambda: om.multirate_subgroups(0.1, 2, 0.5, param_labels=sub),
        "multirate_timescales": lambda: om.multirate_timescales(0.1, (1, 2)),
        "wus": lambda: om.wus(sgd(), wb, window=2, warmup=1, force_windows=(1,)),
        "scale_by_lerac": lambda: optax.chain(sgd(), om.scale_by_lerac(depth, k=3)),
        "lerac": lambda: om.lerac(optax.adam(1e-2), depth, k=3),
        "two_regimes": lambda: om.two_regimes(sgd(), optax.adam(1e-3), switch_step=2),
        "two_regimes_sgd": lambda: om.two_regimes_sgd(0.1, total_steps=4),
        "growth_lr_adaptation": lambda: optax.chain(sgd(), om.growth_lr_adaptation(2)),
    }


@pytest.mark.parametrize("name", sorted(CASES))
def test_every_method_updates_the_model(init, name):
    c = CASES[name]
    v, x = init[name]
    params = v["params"]
    depth = om.depth_labels(c.model, v, x, **c.eval_kwargs)
    methods = _methods(params, depth, c.head)
    assert sorted(methods) == sorted(om.TRANSFORMATIONS)
    rng = np.random.default_rng(1)
    grads = jax.tree.map(lambda p: jnp.asarray(rng.normal(size=p.shape), p.dtype), params)

    def steps(make):  # one program per method: init and two updates
        tx = make()
        state, p, out = tx.init(params), params, []
        for t in range(2):
            u, state = tx.update(grads, state, p, value=jnp.float32(0.5 + 0.1 * t))
            p = optax.apply_updates(p, u)
            out.append(u)
        return p, out

    for method, make in methods.items():
        p, updates = jax.jit(steps, static_argnums=0)(make)
        assert jax.tree.structure(p) == jax.tree.structure(params), method
        assert all(bool(jnp.all(jnp.isfinite(u))) for u in jax.tree.leaves(updates)), method
        moved = [bool(jnp.any(a != b)) for a, b in zip(jax.tree.leaves(p), jax.tree.leaves(params))]
        assert any(moved), method


# ----------------------------------------------------------------- the loop and checkpoints


def _loss(outputs: jax.Array, batch: Any) -> tuple[jax.Array, dict]:
    """A user loss: cross-entropy with label smoothing, and its own metric."""
    y = jax.nn.one_hot(batch["y"], 3)
    value = optax.softmax_cross_entropy(outputs, optax.smooth_labels(y, 0.1)).mean()
    return value, {"hit": jnp.mean(jnp.argmax(outputs, -1) == batch["y"])}


@pytest.mark.parametrize("name", sorted(CASES))
def test_fit_with_call_and_user_loss_resumes_bitwise(init, name, tmp_path):
    c = CASES[name]
    v, _ = init[name]
    data = _data(c.shape)
    if name == "encoder":  # a transformer with LeRaC: one program
        x = jnp.asarray(data.x[:1])
        tx = om.lerac(optax.adam(1e-3), om.lerac_depth_labels(c.model, v, x, **c.eval_kwargs), k=4)
    else:  # multirate: the full gradient on cycle starts, the head's in between
        tx = om.multirate_sgd(
            0.05, 2, om.rule_labels(v["params"], {"fast": c.head}, default="slow")
        )
    step = om.make_train_step(c.model, tx, loss=_loss, call=c.call)
    start = om.LoopState(v["params"], {}, tx.init(v["params"]))
    kw = dict(epochs=2, batch_size=8, step=step, init=start)
    full = om.fit(c.model, tx, data, **kw)
    assert len(full.masks) == (1 if name == "encoder" else 2)
    assert {"train_loss", "train_hit"} <= set(full.history[-1])
    ckpt = om.Checkpoint(tmp_path / "ckpt")
    om.fit(c.model, tx, data, max_steps=5, callbacks=[ckpt], **kw)  # stops inside epoch 2
    resumed = om.fit(c.model, tx, data, callbacks=[om.Checkpoint(tmp_path / "ckpt", resume=True)],
                     **kw)  # fmt: skip
    for a, b in zip(jax.tree.leaves(full.params), jax.tree.leaves(resumed.params)):
        np.testing.assert_array_equal(a, b)
    if name == "encoder":  # eval mode through call: deterministic=True
        ev = om.evaluate(c.model, full.params, full.model_state, data, loss=_loss, call=c.call)
        assert set(ev) == {"loss", "hit"}


# ------------------------------------------------------------------------------------ growth


@pytest.mark.parametrize("name", sorted(CASES))
def test_growth_into_the_wider_twin_keeps_the_function(init, name):
    c = CASES[name]
    v, x = init[name]
    wide = jax.eval_shape(lambda: c.wide.init(KEY, x, **c.eval_kwargs))  # new entries drawn
    tx = optax.chain(optax.adam(1e-2), om.growth_lr_adaptation(2))
    grads = jax.tree.map(jnp.ones_like, v["params"])
    state = jax.jit(lambda p: tx.update(grads, tx.init(p), p)[1])(v["params"])
    grown, grown_state = grow_variables(
        c.model, v, wide, x, **c.eval_kwargs, opt_state=state, optimizer=tx, key=KEY
    )
    run = jax.jit(lambda m, v: m.apply(v, x, **c.eval_kwargs), static_argnums=0)
    np.testing.assert_allclose(run(c.wide, grown), run(c.model, v), atol=2e-5)
    assert jax.tree.structure(grown_state) == jax.tree.structure(tx.init(grown["params"]))
    births = np.concatenate([np.ravel(b) for b in jax.tree.leaves(grown_state[1].birth)])
    assert set(np.unique(births)) == {0, 1}  # new elements are born in stage 1
    assert int(optax.tree_utils.tree_get(grown_state, "count")) == 1  # counts carry over


def test_growth_refuses_the_encoder_layers_that_cannot_grow(init):
    v, x = init["encoder"]
    model = CASES["encoder"].model
    for wider, match in [
        (Encoder(dim=12), "layer 'block_0/ln1' is a LayerNorm over a grown axis"),
        (Encoder(qkv=16), "layer 'block_0/attn' is an attention whose head dimension grows"),
    ]:
        shapes = jax.eval_shape(lambda w=wider: w.init(KEY, x, deterministic=True))
        with pytest.raises(ValueError, match=match):
            grow_variables(model, v, shapes, x, deterministic=True, key=KEY)


def test_growth_nnx_cnn_with_its_optimizer():
    model, x = _nnx(lambda: NnxCNN(rngs=nnx.Rngs(0))), jax.random.normal(KEY, (4, 8, 8, 1))
    opt = nnx.Optimizer(model, optax.sgd(0.1, momentum=0.9), wrt=nnx.Param)
    grads = jax.tree.map(jnp.ones_like, nnx.state(model, nnx.Param))
    opt.update(model, grads)
    wide = _nnx(lambda: NnxCNN((6, 12), rngs=nnx.Rngs(1)), seed=1)
    new_opt = grow_module(model, wide, x, optimizer=opt)
    model.eval()
    wide.eval()
    np.testing.assert_allclose(wide(x), model(x), atol=1e-5)
    assert wide.conv2.kernel.shape == (3, 3, 6, 12) and int(new_opt.step[...]) == 1
    trace = new_opt.opt_state[0].trace  # momentum: old block carried? reset by default
    assert trace["conv2"]["kernel"].shape == (3, 3, 6, 12)
    np.testing.assert_array_equal(trace["conv2"]["kernel"][...], 0.0)
    s = (4 / 6) ** 0.5  # variance transfer: conv2's fan-in grows, bn2 absorbs the scale
    np.testing.assert_allclose(wide.conv2.kernel[:, :, :4, :8], s * model.conv2.kernel[...],
                               rtol=1e-6)  # fmt: skip
    np.testing.assert_allclose(wide.bn2.mean[:8], s * model.bn2.mean[...], rtol=1e-6)
    new_opt.update(wide, jax.tree.map(jnp.ones_like, nnx.state(wide, nnx.Param)))


def test_growth_nnx_layer_norm_is_refused():
    class Net(nnx.Module):
        def __init__(self, width, rngs):
            self.body = nnx.Linear(3, width, rngs=rngs)
            self.norm = nnx.LayerNorm(width, rngs=rngs)
            self.head = nnx.Linear(width, 2, rngs=rngs)

        def __call__(self, x):
            return self.head(self.norm(self.body(x)))

    small, wide = _nnx(lambda: Net(4, nnx.Rngs(0))), _nnx(lambda: Net(6, nnx.Rngs(1)))
    with pytest.raises(ValueError, match="layer 'norm' is a LayerNorm over a grown axis"):
        grow_module(small, wide, jnp.zeros((1, 3)))


def test_grown_training_through_the_loop_linen_and_nnx():
    """fit with the GrowthStages callback on a model without the naming contract and without
    a train argument, and on the NNX CNN: one compile per stage, exact growth."""
    for model_fn, widths, data, call in [
        (lambda w: DeepMLP(w[0], depth=3), (8,), _data((6,)), None),
        (
            lambda w: _nnx(lambda: NnxCNN(w, rngs=nnx.Rngs(0))),
            (4, 8),
            _data((8, 8, 1), 16),
            "train",
        ),
    ]:
        sched = om.GrowthSchedule(widths, total_epochs=2, m0=0.5, p_c=1.0, t0=1)
        stages = om.GrowthStages(model_fn, sched, probe=data.x[:8], call=call)
        tx = optax.sgd(0.05, momentum=0.9)
        model = stages.models[0]
        res = om.fit(model, tx, data, epochs=2, batch_size=8, step=stages.step_for(model, tx),
                     callbacks=[stages])  # fmt: skip
        assert stages.num_compiles == [1, 1] and stages.growths[0]["max_logit_change"] < 1e-5
        kernels = [x.shape for x in jax.tree.leaves(res.params) if x.ndim >= 2]
        assert max(k[-1] for k in kernels[:-1]) == widths[-1]


# ------------------------------------------------------------------ LeRaC on a scanned stack


def test_lerac_gives_each_slice_of_a_scanned_stack_its_rate(init):
    v, x = init["scanned"]
    depth = om.lerac_depth_labels(CASES["scanned"].model, v, x)
    r = (1.0, 0.5, 0.2, 0.1, 0.05, 0.02)  # stem, the four slices, head
    k = 4
    tx = om.lerac(optax.sgd(1.0), depth, k=k, initial_scales=r)
    state = tx.init(v["params"])
    grads = jax.tree.map(jnp.ones_like, v["params"])
    for u in range(k + 1):
        upd, state = tx.update(grads, state)
        want = [rj ** (1 - min(u, k) / k) for rj in r]  # the paper's form
        got = -np.asarray(upd["layers"]["Dense_0"]["kernel"])
        for i in range(4):  # slice i of the stack sits at depth i + 1
            np.testing.assert_allclose(got[i], want[i + 1], rtol=1e-5)
        np.testing.assert_allclose(-upd["stem"]["bias"], want[0], rtol=1e-5)
        np.testing.assert_allclose(-upd["head"]["kernel"], want[5], rtol=1e-5)


def test_lerac_nnx_scan_stack_through_nnx_optimizer():
    class Block(nnx.Module):
        def __init__(self, rngs):
            self.lin = nnx.Linear(4, 4, rngs=rngs)

        def __call__(self, x):
            return nnx.relu(self.lin(x))

    class Net(nnx.Module):
        def __init__(self, rngs):
            self.stem = nnx.Linear(2, 4, rngs=rngs)

            @nnx.split_rngs(splits=3)
            @nnx.vmap(in_axes=(0,), out_axes=0)
            def make(rngs):
                return Block(rngs)

            self.blocks = make(rngs)
            self.head = nnx.Linear(4, 2, rngs=rngs)

        def __call__(self, x):
            forward = nnx.scan(lambda h, b: b(h), in_axes=(nnx.Carry, 0), out_axes=nnx.Carry)
            return self.head(forward(self.stem(x), self.blocks))

    model = _nnx(lambda: Net(nnx.Rngs(0)))
    depth = om.depth_labels(model, nnx.state(model, nnx.Param), jnp.zeros((1, 2)))
    assert depth["blocks"]["lin"]["kernel"] == StackedDepth((1, 2, 3))
    r = (1.0, 0.5, 0.25, 0.125, 0.0625)
    opt = nnx.Optimizer(model, om.lerac(optax.sgd(1.0), depth, k=2, initial_scales=r),
                        wrt=nnx.Param)  # fmt: skip
    before = model.blocks.lin.bias[...]
    opt.update(model, jax.tree.map(jnp.ones_like, nnx.state(model, nnx.Param)))
    moved = before - model.blocks.lin.bias[...]
    np.testing.assert_allclose(moved[:, 0], r[1:4], rtol=1e-6)


# ----------------------------------------------------------------------------- docs examples
