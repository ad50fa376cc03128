"""Label helpers on Flax NNX state, end to end through nnx.Optimizer; forward-order depth of
NNX models and of a ViT-style model (Linen and NNX) whose root owns its position embedding."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import optax_multirate as om
from optax_multirate import labels as L


class SmallCNN(nnx.Module):
    """Attributes declared head first; called conv -> bn -> dropout -> dense -> head."""

    def __init__(self, rngs):
        self.head = nnx.Linear(6, 3, rngs=rngs)
        self.dense = nnx.Linear(4, 6, rngs=rngs)
        self.conv1 = nnx.Conv(1, 4, (3, 3), rngs=rngs)
        self.bn1 = nnx.BatchNorm(4, rngs=rngs)
        self.drop = nnx.Dropout(0.5, rngs=rngs)

    def __call__(self, x):
        x = nnx.relu(self.bn1(self.conv1(x)))
        x = self.drop(x).mean((1, 2))
        return self.head(nnx.relu(self.dense(x)))


X = jnp.linspace(-1.0, 1.0, 2 * 6 * 6).reshape(2, 6, 6, 1)
SLOW_FAST = {
    "conv1": {"kernel": "slow", "bias": "slow"},
    "bn1": {"scale": "slow", "bias": "slow"},
    "dense": {"kernel": "slow", "bias": "slow"},
    "head": {"kernel": "fast", "bias": "fast"},
}
WEIGHT_BIAS = {
    "conv1": {"kernel": "weight", "bias": "bias"},
    "bn1": {"scale": "weight", "bias": "bias"},
    "dense": {"kernel": "weight", "bias": "bias"},
    "head": {"kernel": "weight", "bias": "bias"},
}


def _model():
    return SmallCNN(nnx.Rngs(0))


def _pure_dict(model_or_state):
    state = model_or_state
    if isinstance(model_or_state, nnx.Module):
        state = nnx.state(model_or_state, nnx.Param)
    return jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.as_pure(state)))


def _as_dict(labels):
    return nnx.to_pure_dict(labels) if isinstance(labels, nnx.State) else labels


# --------------------------------------------------------------------------- paths, helpers


def test_paths_leave_out_the_variable_value():
    state = nnx.state(_model(), nnx.Param)
    paths = L.leaf_paths(state)
    assert paths == L.leaf_paths(nnx.as_pure(state))
    assert "conv1/kernel" in paths and not any(p.endswith("value") for p in paths)
    # a Linen dict key named "value" (e.g. an attention's value projection) is kept
    assert L.leaf_paths({"value": {"kernel": 0.0}}) == ["value/kernel"]


@pytest.mark.parametrize("form", ["state", "split", "pure"])
def test_helpers_label_wrapped_and_pure_state_alike(form):
    model = _model()
    if form == "state":
        state = nnx.state(model, nnx.Param)
    elif form == "split":
        _, state, _ = nnx.split(model, nnx.Param, ...)
    else:
        state = nnx.as_pure(nnx.state(model, nnx.Param))
    pure_structure = jax.tree.structure(nnx.as_pure(nnx.state(model, nnx.Param)))
    built = {
        "weight_bias": L.weight_bias_labels(state),
        "rule": L.rule_labels(state, {"fast": "^head/"}, default="slow"),
        "random": L.random_labels(state, 0.5, seed=0, eligible="kernel$"),
        "depth": L.depth_labels(model, state, X),
    }
    for name, labels in built.items():
        assert jax.tree.structure(labels) == pure_structure, name
    assert _as_dict(built["weight_bias"]) == WEIGHT_BIAS
    assert _as_dict(built["rule"]) == SLOW_FAST
    assert _as_dict(built["depth"]) == {
        "conv1": {"kernel": 0, "bias": 0},
        "bn1": {"scale": 0, "bias": 0},
        "dense": {"kernel": 1, "bias": 1},
        "head": {"kernel": 2, "bias": 2},
    }
    scale_as_bias = _as_dict(L.weight_bias_labels(state, norm_scale="bias"))
    assert scale_as_bias["bn1"] == {"scale": "bias", "bias": "bias"}
    # the same labels resolve against both forms nnx.Optimizer passes
    wrapped = nnx.state(model, nnx.Param)
    by_path = L.check_labels(built["weight_bias"], wrapped)
    assert by_path == L.check_labels(built["weight_bias"], nnx.as_pure(wrapped))
    assert by_path["conv1/kernel"] == "weight" and by_path["bn1/bias"] == "bias"


def test_weight_bias_labels_embedding_and_norms():
    class Tokens(nnx.Module):
        def __init__(self, rngs):
            self.embed = nnx.Embed(10, 4, rngs=rngs)
            self.norm = nnx.LayerNorm(4, rngs=rngs)
            self.rms = nnx.RMSNorm(4, rngs=rngs)

    lab = _as_dict(L.weight_bias_labels(nnx.state(Tokens(nnx.Rngs(0)), nnx.Param)))
    assert lab == {
        "embed": {"embedding": "weight"},
        "norm": {"scale": "weight", "bias": "bias"},
        "rms": {"scale": "weight"},
    }


def test_helpers_refuse_state_that_is_not_trainable():
    model = _model()
    with pytest.raises(ValueError, match=r"BatchStat at 'bn1/mean'.*nnx.Param"):
        L.weight_bias_labels(nnx.state(model))
    with pytest.raises(ValueError, match="nnx.state\\(model, nnx.Param\\)"):
        L.rule_labels(nnx.state(model, nnx.BatchStat), {"a": "mean"}, default="b")


# --------------------------------------------------------------------------- end to end


def _loss(model):
    return jnp.mean(model(X) ** 2)


def _run(tx, labels_of, steps, *, jit=False, extra=None):
    """nnx.Optimizer with labels built from nnx.state, against plain optax on pure dicts."""
    model = _model()
    labels = labels_of(nnx.state(model, nnx.Param))
    opt = nnx.Optimizer(model, tx(labels), wrt=nnx.Param)
    ref_tx = tx(labels_of(None))
    ref_params = _pure_dict(model)
    ref_state = ref_tx.init(ref_params)

    def ref_step(g, state, params, kw):
        u, state = ref_tx.update(g, state, params, **kw)
        return optax.apply_updates(params, u), state

    if jit:  # both sides jitted, each as one program (update and apply)
        update = nnx.jit(lambda o, m, g, kw: o.update(m, g, **kw))
        ref_step = jax.jit(ref_step)
    else:
        update = lambda o, m, g, kw: o.update(m, g, **kw)
    history = [ref_params]
    for t in range(steps):
        grads = nnx.grad(_loss)(model)  # BatchNorm statistics and dropout keys advance
        kw = {} if extra is None else extra(t)
        update(opt, model, grads, kw)
        ref_params, ref_state = ref_step(_pure_dict(grads), ref_state, ref_params, kw)
        ref_params = jax.tree.map(np.asarray, ref_params)
        got = _pure_dict(model)
        jax.tree.map(np.testing.assert_array_equal, got, ref_params)
        history.append(got)
    return history


def _moved(history, t):
    """{path: whether the leaf changed in update t}."""
    before, after = history[t], history[t + 1]
    flat = jax.tree_util.tree_flatten_with_path(before)[0]
    return {
        L.path_str(p): bool(np.any(a != b))
        for (p, b), a in zip(flat, jax.tree.leaves(after), strict=True)
    }


def _slow_fast(state):
    return SLOW_FAST if state is None else L.rule_labels(state, {"fast": "^head/"}, default="slow")


def _weight_bias(state):
    return WEIGHT_BIAS if state is None else L.weight_bias_labels(state)


def test_partition_with_nnx_labels_updates_only_its_group():
    tx = lambda lab: optax.partition(
        {"fast": optax.sgd(0.1, momentum=0.9), "slow": optax.set_to_zero()}, lab
    )
    history = _run(tx, _slow_fast, 3)
    for t in range(3):
        moved = _moved(history, t)
        assert moved["head/kernel"] and moved["head/bias"]
        assert not any(v for k, v in moved.items() if not k.startswith("head/"))


@pytest.mark.parametrize("jit", [False, True])
def test_multirate_sgd_with_nnx_labels(jit):
    tx = lambda lab: om.multirate_sgd(0.1, 2, lab, momentum=0.9, linear_drift=False)
    history = _run(tx, _slow_fast, 4, jit=jit)
    for t in range(4):
        moved = _moved(history, t)
        assert moved["head/kernel"] and moved["head/bias"]
        slow = [v for k, v in moved.items() if not k.startswith("head/")]
        # cycle starts (t % k == 0) move every slow leaf; the fast-only steps none
        assert all(slow) if t % 2 == 0 else not any(slow), (t, moved)


def test_wus_with_nnx_labels_holds_weights_in_windows():
    tx = lambda lab: om.wus(
        optax.sgd(0.1, momentum=0.9), lab, threshold=0.0, window=2, warmup=0, force_windows=(1,)
    )
    history = _run(tx, _weight_bias, 4, extra=lambda t: {"value": jnp.float32(0.5)})
    for t in range(4):
        moved = _moved(history, t)
        biases = [v for k, v in moved.items() if k.endswith("/bias")]
        weights = [v for k, v in moved.items() if not k.endswith("/bias")]  # kernels, bn scale
        assert all(biases)
        # the window opens at the end of period 1 and lasts two periods: updates 1 and 2
        assert (not any(weights)) if t in (1, 2) else all(weights), (t, moved)


def test_freeze_schedule_with_nnx_labels():
    tx = lambda lab: om.freeze_schedule(optax.sgd(0.1), lab, {"slow": (0, 2)})
    history = _run(tx, _slow_fast, 3)
    for t in range(3):
        moved = _moved(history, t)
        slow = [v for k, v in moved.items() if not k.startswith("head/")]
        assert moved["head/kernel"] and (not any(slow) if t < 2 else all(slow)), (t, moved)


def test_label_tree_from_state_fits_a_callable_too():
    """A label function over the tree it is given also works (optax.partition calls it)."""
    tx = lambda lab: optax.partition(
        {"fast": optax.sgd(0.1), "slow": optax.set_to_zero()},
        lambda tree: L.rule_labels(tree, {"fast": "^head/"}, default="slow"),
    )
    history = _run(tx, lambda state: None, 2)
    assert _moved(history, 1)["head/kernel"] and not _moved(history, 1)["conv1/kernel"]


# --------------------------------------------------------------------------- depth, NNX


class Block(nnx.Module):
    def __init__(self, d, rngs):
        self.norm = nnx.LayerNorm(d, rngs=rngs)
        self.fc = nnx.Linear(d, d, rngs=rngs)

    def __call__(self, x):
        return x + self.fc(self.norm(x))


class Stack(nnx.Module):
    """An nnx.List of blocks called in reverse index order, a norm, a shared layer."""

    def __init__(self, rngs):
        self.out = nnx.Linear(4, 2, rngs=rngs)
        self.blocks = nnx.List([Block(4, rngs) for _ in range(3)])
        self.stem_norm = nnx.BatchNorm(4, rngs=rngs)
        self.stem = nnx.Linear(3, 4, rngs=rngs)
        self.shared = nnx.Linear(4, 4, rngs=rngs)

    def __call__(self, x):
        x = self.stem_norm(self.stem(x))
        x = self.shared(x)
        for b in reversed(self.blocks):
            x = b(x)
        return self.out(self.shared(x))


def test_depth_nnx_forward_order_not_attribute_order():
    model = Stack(nnx.Rngs(0))
    state = nnx.state(model, nnx.Param)
    d = _as_dict(L.depth_labels(model, state, jnp.zeros((2, 3))))
    assert d["stem"]["kernel"] == 0 and d["stem_norm"]["scale"] == 0  # the norm joins
    assert d["shared"]["kernel"] == 1  # called twice: keeps its first depth
    assert [d["blocks"][i]["fc"]["kernel"] for i in (2, 1, 0)] == [2, 3, 4]
    assert set(jax.tree.leaves(d["blocks"][0])) == {4}  # a block (norm + fc) is one unit
    assert d["out"]["bias"] == 5
    per_module = _as_dict(L.depth_labels(model, state, jnp.zeros((2, 3)), unit_level=None))
    assert per_module["blocks"][2]["norm"]["scale"] == per_module["blocks"][2]["fc"]["kernel"] - 1
    assert per_module["out"]["kernel"] == max(jax.tree.leaves(per_module))
    nomerge = _as_dict(L.depth_labels(model, state, jnp.zeros((2, 3)), merge_norm=False))
    assert nomerge["stem_norm"]["bias"] == 1 and nomerge["out"]["kernel"] == 6
    # part of the state (paths from the model's root), not a submodule's own state
    only_blocks = nnx.state(model, nnx.All(nnx.Param, nnx.PathContains("blocks")))
    part = _as_dict(L.depth_labels(model, only_blocks, jnp.zeros((2, 3))))
    assert list(part) == ["blocks"] and part["blocks"][0]["fc"]["bias"] == 4
    with pytest.raises(ValueError, match="'0/fc/bias', which is no nnx.Param of the model"):
        L.depth_labels(model, nnx.state(model.blocks, nnx.Param), jnp.zeros((2, 3)))


def test_depth_nnx_errors():
    class Unused(nnx.Module):
        def __init__(self, rngs):
            self.a = nnx.Linear(2, 2, rngs=rngs)
            self.b = nnx.Linear(2, 2, rngs=rngs)

        def __call__(self, x):
            return self.a(x)

    m = Unused(nnx.Rngs(0))
    with pytest.raises(ValueError, match="'b/(bias|kernel)' is never read"):
        L.depth_labels(m, nnx.state(m, nnx.Param), jnp.zeros((1, 2)))

    class Stacked(nnx.Module):
        def __init__(self, rngs):
            self.layers = nnx.Param(jnp.ones((3, 2, 2)))
            self.head = nnx.Linear(2, 1, rngs=rngs)

        def __call__(self, x):
            x, _ = jax.lax.scan(lambda h, w: (jnp.tanh(h @ w), None), x, self.layers[...])
            return self.head(x)

    m = Stacked(nnx.Rngs(0))  # a root's own stacked param, scanned: one depth per slice
    d = L.depth_labels(m, nnx.state(m, nnx.Param), jnp.zeros((1, 2)))
    assert d["layers"] == L.StackedDepth((0, 1, 2)) and d["head"]["kernel"] == 3
    lin = nnx.Linear(2, 2, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="'w/bias', which is no nnx.Param of the model"):
        L.depth_labels(lin, {"w": nnx.state(lin, nnx.Param)}, jnp.zeros((1, 2)))
    with pytest.raises(TypeError, match="model must be a flax"):
        L.depth_labels(lambda x: x, {}, jnp.zeros((1, 2)))


# --------------------------------------------------------------------------- depth, ViT

D, PATCH = 8, 2


class LinenBlock(nn.Module):
    @nn.compact
    def __call__(self, x):
        y = nn.LayerNorm()(x)
        y = nn.MultiHeadDotProductAttention(num_heads=2, qkv_features=D)(y)
        x = x + y
        y = nn.Dense(2 * D)(nn.LayerNorm()(x))
        return x + nn.Dense(D)(nn.gelu(y))


class LinenViT(nn.Module):
    """patch_embed runs first; cls_token and pos_embed, the root's own, come after it."""

    @nn.compact
    def __call__(self, img):
        x = nn.Conv(D, (PATCH, PATCH), strides=PATCH, name="patch_embed")(img)
        x = x.reshape(x.shape[0], -1, D)
        cls = self.param("cls_token", nn.initializers.zeros, (1, 1, D))
        x = jnp.concatenate([jnp.broadcast_to(cls, (x.shape[0], 1, D)), x], axis=1)
        x = x + self.param("pos_embed", nn.initializers.normal(0.02), (1, x.shape[1], D))
        for i in range(2):
            x = LinenBlock(name=f"block_{i}")(x)
        x = nn.LayerNorm(name="norm")(x)
        return nn.Dense(3, name="head")(x[:, 0])


class LinenViTSetup(nn.Module):
    """The same with every param declared in setup, pos_embed before patch_embed."""

    def setup(self):
        self.pos_embed = self.param("pos_embed", nn.initializers.normal(0.02), (1, 5, D))
        self.cls_token = self.param("cls_token", nn.initializers.zeros, (1, 1, D))
        self.patch_embed = nn.Conv(D, (PATCH, PATCH), strides=PATCH)
        self.blocks = [LinenBlock() for _ in range(2)]
        self.norm = nn.LayerNorm()
        self.head = nn.Dense(3)

    def __call__(self, img):
        x = self.patch_embed(img).reshape(img.shape[0], -1, D)
        cls = jnp.broadcast_to(self.cls_token, (x.shape[0], 1, D))
        x = jnp.concatenate([cls, x], axis=1) + self.pos_embed
        for b in self.blocks:
            x = b(x)
        return self.head(self.norm(x)[:, 0])


class NNXBlock(nnx.Module):
    def __init__(self, rngs):
        self.ln1 = nnx.LayerNorm(D, rngs=rngs)
        self.attn = nnx.MultiHeadAttention(2, D, decode=False, rngs=rngs)
        self.ln2 = nnx.LayerNorm(D, rngs=rngs)
        self.fc1 = nnx.Linear(D, 2 * D, rngs=rngs)
        self.fc2 = nnx.Linear(2 * D, D, rngs=rngs)

    def __call__(self, x):
        x = x + self.attn(self.ln1(x))
        return x + self.fc2(nnx.gelu(self.fc1(self.ln2(x))))


class NNXViT(nnx.Module):
    def __init__(self, rngs):
        self.pos_embed = nnx.Param(jnp.zeros((1, 5, D)))
        self.cls_token = nnx.Param(jnp.zeros((1, 1, D)))
        self.patch_embed = nnx.Conv(1, D, (PATCH, PATCH), strides=PATCH, rngs=rngs)
        self.blocks = nnx.List([NNXBlock(rngs) for _ in range(2)])
        self.norm = nnx.LayerNorm(D, rngs=rngs)
        self.head = nnx.Linear(D, 3, rngs=rngs)

    def __call__(self, img):
        x = self.patch_embed(img).reshape(img.shape[0], -1, D)
        cls = jnp.broadcast_to(self.cls_token[...], (x.shape[0], 1, D))
        x = jnp.concatenate([cls, x], axis=1) + self.pos_embed[...]
        for b in self.blocks:
            x = b(x)
        return self.head(self.norm(x)[:, 0])


IMG = jnp.zeros((1, 4, 4, 1))


def _check_vit(d, blocks):
    assert d["patch_embed"]["kernel"] == 0 and d["patch_embed"]["bias"] == 0
    assert d["cls_token"] == 1 and d["pos_embed"] == 1  # read after patch_embed, together
    for i, b in enumerate(blocks):
        assert set(jax.tree.leaves(b)) == {2 + i}
    assert d["norm"]["scale"] == 3  # the final norm joins the last block
    assert d["head"]["kernel"] == 4 and d["head"]["bias"] == 4


@pytest.mark.parametrize("model", [LinenViT(), LinenViTSetup()], ids=["compact", "setup"])
def test_depth_linen_vit_root_params_where_first_read(model):
    v = model.init(jax.random.key(0), IMG)
    d = L.depth_labels(model, v, IMG)
    blocks = [d["block_0"], d["block_1"]] if "block_0" in d else [d["blocks_0"], d["blocks_1"]]
    _check_vit(d, blocks)
    # LeRaC's units are depth_labels' defaults
    assert om.lerac_depth_labels(model, v, IMG) == d
    per_module = L.depth_labels(model, v, IMG, unit_level=None)
    assert per_module["patch_embed"]["kernel"] == 0 and per_module["pos_embed"] == 1


def test_depth_nnx_vit_root_params_where_first_read():
    model = NNXViT(nnx.Rngs(0))
    d = _as_dict(L.depth_labels(model, nnx.state(model, nnx.Param), IMG))
    _check_vit(d, [d["blocks"][0], d["blocks"][1]])
