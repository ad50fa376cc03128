"""Tests for optax_multirate.labels: depth in forward order, weight/bias, rules, random."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
import pytest

from optax_multirate import labels as L
from optax_multirate.models import CNN, MLP, ResNet


def _init(model, shape):
    x = jnp.zeros(shape)
    return model.init(jax.random.key(0), x, train=False), x


def test_depth_mlp_eleven_layers_forward_order():
    m = MLP(features=(4,) * 12, num_classes=3)
    v, x = _init(m, (1, 5))
    d = L.depth_labels(m, v, x, train=False)
    for i in range(12):
        assert d[f"Dense_{i}"]["kernel"] == i
        assert d[f"Dense_{i}"]["bias"] == i
    assert d["head"]["kernel"] == 12
    # Flax flattens in sorted order, where Dense_10 comes before Dense_2; depth must not.
    assert d["Dense_10"]["kernel"] > d["Dense_2"]["kernel"]


@pytest.mark.parametrize("bn", [False, True])
def test_depth_cnn(bn):
    m = CNN(features=(4, 8), dense=(6,), batch_norm=bn)
    v, x = _init(m, (1, 8, 8, 1))
    d = L.depth_labels(m, v, x, train=False)
    assert d["Conv_0"]["kernel"] == 0
    assert d["Conv_1"]["kernel"] == 1
    assert d["Dense_0"]["kernel"] == 2
    assert d["head"]["kernel"] == 3
    if bn:
        assert d["BatchNorm_0"]["scale"] == 0 and d["BatchNorm_0"]["bias"] == 0
        assert d["BatchNorm_1"]["scale"] == 1
        nomerge = L.depth_labels(m, v, x, train=False, merge_norm=False)
        assert nomerge["BatchNorm_0"]["scale"] == 1 and nomerge["Conv_1"]["kernel"] == 2


def test_depth_resnet_blocks_bn_head():
    m = ResNet(stage_features=(4, 8, 8), blocks_per_stage=(2, 1, 1))
    v, x = _init(m, (1, 8, 8, 1))
    d = L.depth_labels(m, v, x, train=False)
    assert d["stem"]["kernel"] == 0 and d["stem_bn"]["scale"] == 0 and d["stem_bn"]["bias"] == 0
    for b in range(4):
        blk = d[f"ResBlock_{b}"]
        assert set(jax.tree.leaves(blk)) == {b + 1}, blk
    assert "proj" in d["ResBlock_2"]  # projection shortcut shares its block's depth
    assert d["head"]["kernel"] == 5 and d["head"]["bias"] == 5
    per_module = L.depth_labels(m, v, x, train=False, unit_level=None)
    assert (
        per_module["ResBlock_0"]["Conv_0"]["kernel"] < per_module["ResBlock_0"]["Conv_1"]["kernel"]
    )
    assert per_module["head"]["kernel"] == max(jax.tree.leaves(per_module))


class Unsorted(nn.Module):
    """Names whose sorted order is the reverse of the call order."""

    @nn.compact
    def __call__(self, x, train=False):
        x = nn.Dense(4, name="zz_first")(x)
        x = nn.LayerNorm(name="yy_norm")(x)
        x = nn.Dense(4, name="mm_second")(x)
        return nn.Dense(2, name="aa_head")(x)


def test_depth_names_not_sorted_in_forward_order():
    m = Unsorted()
    v, x = _init(m, (1, 3))
    d = L.depth_labels(m, v, x)
    assert d["zz_first"]["kernel"] == 0
    assert d["yy_norm"]["scale"] == 0  # the norm joins the layer it normalizes
    assert d["mm_second"]["kernel"] == 1
    assert d["aa_head"]["kernel"] == 2


class Scanned(nn.Module):
    @nn.compact
    def __call__(self, x, train=False):
        class Body(nn.Module):
            @nn.compact
            def __call__(self, c, _):
                return nn.Dense(3)(c), None

        scan = nn.scan(Body, variable_axes={"params": 0}, split_rngs={"params": True}, length=4)
        x, _ = scan(name="layers")(x, None)
        return nn.Dense(2, name="head")(x)


def test_depth_scan_stack_one_depth_per_slice():
    m = Scanned()
    v, x = _init(m, (1, 3))
    d = L.depth_labels(m, v, x)
    assert d["layers"]["Dense_0"]["kernel"] == L.StackedDepth((0, 1, 2, 3), axis=0)
    assert d["head"]["bias"] == 4
    with pytest.raises(ValueError, match="'layers/Dense_0/bias' is StackedDepth"):
        L.check_labels(d, v["params"])  # one label per leaf for every partitioning method
    assert L.check_labels(d, v["params"], allow_stacked=True)["head/kernel"] == 4


class ScannedTwice(nn.Module):
    @nn.compact
    def __call__(self, x, train=False):
        w = self.param("w", nn.initializers.normal(), (2, 3, 3, 3))

        def outer(h, ws):
            return jax.lax.scan(lambda c, wi: (jnp.tanh(c @ wi), None), h, ws)[0], None

        return jax.lax.scan(outer, x, w)[0]


def test_depth_scan_of_a_stack_clear_error():
    m = ScannedTwice()
    v, x = _init(m, (1, 3))
    with pytest.raises(ValueError, match="'w' is stacked twice"):
        L.depth_labels(m, v, x)


def test_depth_params_only_and_bad_unit_level():
    m = MLP(features=(3,), num_classes=2)
    v, x = _init(m, (1, 2))
    d = L.depth_labels(m, v["params"], x)
    assert d["head"]["bias"] == 1
    with pytest.raises(ValueError, match="unit_level"):
        L.depth_labels(m, v, x, unit_level=0)


def test_weight_bias_labels():
    m = CNN(features=(4,), batch_norm=True)
    v, _ = _init(m, (1, 8, 8, 1))
    lab = L.weight_bias_labels(v["params"])
    assert lab["Conv_0"]["kernel"] == "weight"
    assert lab["BatchNorm_0"]["bias"] == "bias" and lab["BatchNorm_0"]["scale"] == "weight"
    assert lab["head"]["bias"] == "bias"
    lab2 = L.weight_bias_labels(v["params"], norm_scale="bias")
    assert lab2["BatchNorm_0"]["scale"] == "bias"
    with pytest.raises(ValueError, match="norm_scale"):
        L.weight_bias_labels(v["params"], norm_scale="both")


def test_rule_labels_and_errors():
    p = {"Conv_0": {"kernel": 1.0, "bias": 1.0}, "head": {"kernel": 1.0, "bias": 1.0}}
    lab = L.rule_labels(p, {"fast": ["^head/"], "slow": [lambda path, _: path.startswith("Conv")]})
    assert lab == {
        "Conv_0": {"kernel": "slow", "bias": "slow"},
        "head": {"kernel": "fast", "bias": "fast"},
    }
    with pytest.raises(ValueError, match="'Dense_2'"):
        L.rule_labels(p, {"fast": ["Dense_2"]}, default="slow")
    with pytest.raises(ValueError, match="matches rules of labels"):
        L.rule_labels(p, {"fast": "head", "slow": "kernel"}, default="x")
    with pytest.raises(ValueError, match="no default"):
        L.rule_labels(p, {"fast": "head"})
    with pytest.raises(ValueError, match="regular expression"):
        L.rule_labels(p, {"fast": "("}, default="slow")
    with pytest.raises(ValueError, match="rules"):
        L.rule_labels(p, {})


def test_random_labels_seeded():
    p = {f"l{i}": {"kernel": 0.0, "bias": 0.0} for i in range(10)}
    a = L.random_labels(p, 0.5, seed=3, eligible="kernel$")
    b = L.random_labels(p, 0.5, seed=3, eligible="kernel$")
    c = L.random_labels(p, 0.5, seed=4, eligible="kernel$")
    assert a == b and a != c
    flat = jax.tree_util.tree_flatten_with_path(a)[0]
    assert sum(v == "slow" for _, v in flat) == 5
    assert all(v == "fast" for k, v in flat if L.path_str(k).endswith("bias"))
    with pytest.raises(ValueError, match="fraction"):
        L.random_labels(p, 1.0, seed=0)


def test_check_labels_mismatch_and_masked_params():
    p = {"a": {"kernel": 1.0}, "b": {"kernel": 1.0}}
    with pytest.raises(ValueError, match="no label for the param at 'b/kernel'"):
        L.check_labels({"a": {"kernel": "x"}}, p)
    with pytest.raises(ValueError, match="have no param"):
        L.check_labels({"a": {"kernel": "x"}, "b": {"kernel": "x"}, "c": {"kernel": "x"}}, p)
    with pytest.raises(ValueError, match="not one of"):
        L.check_labels({"a": {"kernel": "x"}, "b": {"kernel": "y"}}, p, allowed={"x"})
    with pytest.raises(ValueError, match="no param is labelled 'z'"):
        L.check_labels({"a": {"kernel": "x"}, "b": {"kernel": "y"}}, p, require=["z"])
    holed = {"a": {"kernel": 1.0}, "b": {"kernel": optax.MaskedNode()}}
    assert L.check_labels({"a": {"kernel": "x"}, "b": {"kernel": "y"}}, holed) == {"a/kernel": "x"}
    assert L.resolve_labels(lambda q: jax.tree.map(lambda _: 0, q), p) == {
        "a": {"kernel": 0},
        "b": {"kernel": 0},
    }
