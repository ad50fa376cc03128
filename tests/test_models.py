"""Tests for optax_multirate.models: shapes, widths, batch norm, errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from optax_multirate.models import CNN, MLP, ResNet, widths


@pytest.mark.parametrize(
    "model,shape",
    [
        (MLP(features=(8, 4), num_classes=3), (2, 5)),
        (MLP(features=(8,), num_classes=3, batch_norm=True), (2, 6, 6, 1)),
        (CNN(features=(4, 8), num_classes=5), (2, 8, 8, 1)),
        (CNN(features=(4, 8), dense=(6,), num_classes=5, batch_norm=True), (2, 8, 8)),
        (ResNet(stage_features=(4, 8, 8), blocks_per_stage=(1, 1, 1), num_classes=7), (2, 8, 8, 1)),
        (ResNet(stage_features=(4, 8), blocks_per_stage=(1, 2), batch_norm=False), (2, 8, 8, 1)),
    ],
)
def test_shapes_and_train_eval(model, shape):
    x = jnp.ones(shape)
    v = model.init(jax.random.key(0), x, train=False)
    y = model.apply(v, x, train=False)
    assert y.shape == (2, model.num_classes) and y.dtype == jnp.float32
    if "batch_stats" in v:
        y2, upd = model.apply(v, x, train=True, mutable=["batch_stats"])
        assert y2.shape == y.shape
        assert jax.tree.structure(upd["batch_stats"]) == jax.tree.structure(v["batch_stats"])


def test_cnn_head_fan_in_is_channel_count():
    m = CNN(features=(4, 12))
    v = m.init(jax.random.key(0), jnp.ones((1, 8, 8, 1)))
    assert v["params"]["head"]["kernel"].shape == (12, 10)
    assert "bias" in v["params"]["Conv_0"]
    vb = CNN(features=(4, 12), batch_norm=True).init(jax.random.key(0), jnp.ones((1, 8, 8, 1)))
    assert "bias" not in vb["params"]["Conv_0"] and "BatchNorm_0" in vb["params"]


def test_resnet_projection_only_where_needed():
    m = ResNet(stage_features=(4, 4, 8), blocks_per_stage=(1, 1, 1))
    p = m.init(jax.random.key(0), jnp.ones((1, 8, 8, 1)))["params"]
    assert "proj" not in p["ResBlock_0"]
    assert "proj" in p["ResBlock_1"]  # stride 2
    assert "proj" in p["ResBlock_2"]  # width change


def test_widths_and_errors():
    assert widths((16, 32, 64), 0.5) == (8, 16, 32)
    assert widths((3,), 0.1) == (1,)
    with pytest.raises(ValueError, match="multiplier"):
        widths((4,), 0)
    with pytest.raises(ValueError, match="features"):
        CNN(features=()).init(jax.random.key(0), jnp.ones((1, 8, 8, 1)))
    with pytest.raises(ValueError, match="blocks_per_stage"):
        ResNet(stage_features=(4, 8), blocks_per_stage=(1,)).init(
            jax.random.key(0), jnp.ones((1, 8, 8, 1))
        )
    with pytest.raises(ValueError, match="features"):
        MLP(features=(4, 0)).init(jax.random.key(0), jnp.ones((1, 3)))
    # wrong types are TypeErrors; numpy ints are ints
    with pytest.raises(TypeError, match="multiplier"):
        widths((4,), "2")
    with pytest.raises(TypeError, match="base"):
        widths((4.0,), 2)
    with pytest.raises(TypeError, match="features"):
        CNN(features=(4.0,)).init(jax.random.key(0), jnp.ones((1, 8, 8, 1)))
    with pytest.raises(TypeError, match="stage_features"):
        ResNet(stage_features="48").init(jax.random.key(0), jnp.ones((1, 8, 8, 1)))
    assert widths((np.int64(16),), np.float32(0.5), minimum=np.int32(1)) == (8,)
    p = MLP(features=(np.int32(3),)).init(jax.random.key(0), jnp.ones((1, 2)))["params"]
    assert p["Dense_0"]["kernel"].shape == (2, 3)


def test_max_pool_2x2_equals_flax_max_pool():
    import flax.linen as nn
    import numpy as np

    from optax_multirate.models import max_pool_2x2

    for shape in [(2, 8, 8, 3), (2, 7, 9, 1)]:
        x = jnp.asarray(np.random.default_rng(0).standard_normal(shape), jnp.float32)
        ref = nn.max_pool(x, (2, 2), strides=(2, 2))
        np.testing.assert_array_equal(max_pool_2x2(x), ref)
        g = jax.grad(lambda v: jnp.sum(max_pool_2x2(v) ** 2))(x)
        gref = jax.grad(lambda v: jnp.sum(nn.max_pool(v, (2, 2), strides=(2, 2)) ** 2))(x)
        np.testing.assert_allclose(g, gref, rtol=1e-6)  # no ties in random data
    # ties (small integers, relu zeros): the derivative goes to the window's first maximum, as
    # flax's max_pool (XLA select-and-scatter) sends it; bitwise, in reverse and forward mode
    rng = np.random.default_rng(1)
    for shape in [(3, 8, 8, 2), (2, 7, 9, 3)]:
        x = jnp.asarray(rng.integers(-1, 2, shape), jnp.float32)
        x = jax.nn.relu(x)
        flax_pool = lambda v: nn.max_pool(v, (2, 2), strides=(2, 2))
        ct = jnp.asarray(rng.standard_normal(flax_pool(x).shape), jnp.float32)
        got = jax.vjp(max_pool_2x2, x)[1](ct)[0]
        ref = jax.vjp(flax_pool, x)[1](ct)[0]
        np.testing.assert_array_equal(got, ref)
        t = jnp.asarray(rng.standard_normal(shape), jnp.float32)
        np.testing.assert_array_equal(
            jax.jvp(max_pool_2x2, (x,), (t,))[1], jax.jvp(flax_pool, (x,), (t,))[1]
        )
    # jit, vmap and bf16 go through the rule
    xb = jnp.asarray(rng.standard_normal((4, 2, 6, 6, 1)), jnp.bfloat16)
    gb = jax.jit(jax.vmap(jax.grad(lambda v: max_pool_2x2(v).sum())))(xb)
    assert gb.dtype == jnp.bfloat16 and float(gb.sum()) == 4 * 2 * 9
